"""--report-to: the metrics and the resolved config reach accelerate's trackers (TensorBoard, and mlflow with a
local file store as the offline second one); a resumed run does not log a step twice; unknown or missing trackers
stop before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from preftune.cli import main
from tests.conftest import PAIRS, write_jsonl


def run_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--max-steps", "8", "--learning-rate", "1e-3", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", PAIRS * 2)


def logged(out: Path, name: str) -> dict[int, float]:
    """metrics.jsonl's values of `name` by step."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in rows if name in r}


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def resume_from_an_earlier_checkpoint(args: list[str], out: Path) -> None:
    """As after a kill past checkpoint-4: the trackers have seen steps the resumed run logs again."""
    shutil.rmtree(out / "checkpoint-8")
    assert main([*args, "--resume"]) == 0


def test_tensorboard_gets_every_step_once_also_across_a_resume(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    args = run_args(tiny_model_dir, data, out, "--save-steps", "4", "--eval-data", str(data), "--eval-steps", "4")
    assert main(args) == 0  # --report-to's default: tensorboard
    resume_from_an_earlier_checkpoint(args, out)
    folder = out / "tensorboard" / "preftune"
    losses = tensorboard_scalars(folder, "train/loss")
    assert [step for step, _ in losses] == list(range(1, 9))
    assert [value for _, value in losses] == pytest.approx(list(logged(out, "loss").values()), rel=1e-6)
    assert [step for step, _ in tensorboard_scalars(folder, "eval/loss")] == [4, 8]
    # the resolved config, as accelerate's TensorBoard tracker stores it (hparams.yml beside the events)
    stored = [p.read_text() for p in folder.glob("*/hparams.yml")]
    assert stored and all("train.learning_rate: 0.001" in text for text in stored)


def test_mlflow_gets_metrics_config_and_run_name_and_continues_its_run_on_resume(tmp_path, tiny_model_dir, data,
                                                                                  monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # the dev extra installs it; an offline file store needs no server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.x asks for this to use a plain folder
    out = tmp_path / "run"
    args = run_args(tiny_model_dir, data, out, "--save-steps", "4", "--report-to", "mlflow",
                    "--run-name", "first-try", "--project", "sentiment")
    assert main(args) == 0
    resume_from_an_earlier_checkpoint(args, out)
    assert not (out / "tensorboard").exists()
    client = mlflow.tracking.MlflowClient()
    [experiment] = [e for e in client.search_experiments() if e.name == "sentiment"]
    [run] = client.search_runs([experiment.experiment_id])  # the resumed run continued the same mlflow run
    assert run.info.run_name == "first-try"
    assert run.data.params["train.learning_rate"] == "0.001" and run.data.params["loss.loss_type"] == "sigmoid"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 9))  # no step twice
    assert {m.step: m.value for m in history} == pytest.approx(logged(out, "loss"), rel=1e-6)


def test_report_to_none_writes_metrics_jsonl_only(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    assert main(run_args(tiny_model_dir, data, out, "--max-steps", "2", "--report-to", "none")) == 0
    assert list(logged(out, "loss")) == [1, 2] and not (out / "tensorboard").exists()


@pytest.mark.parametrize(("report_to", "message"), [
    ("tensorbord", "--report-to: unknown tracker 'tensorbord'; choose from"),
    ("tensorboard,swanlab", "--report-to swanlab: the swanlab package is not installed (pip install swanlab)"),
])
def test_unknown_or_missing_tracker_stops_before_anything_loads(tmp_path, data, capsys, report_to, message):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--output-dir", str(out),
                 "--report-to", report_to])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_run_name_without_a_tracker_is_refused(tmp_path, data, capsys):
    code = main(["train", "--data", str(data), "--report-to", "none", "--run-name", "x"])
    assert code == 2
    assert "--run-name" in capsys.readouterr().err
