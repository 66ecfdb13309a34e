"""Several CPU processes (torchrun, gloo) train exactly as one process with the combined batch."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from benchmarks.bench_sharding import launch_environment
from preftune.cli import main
from preftune.data.batching import process_batches
from tests.conftest import PAIRS, write_jsonl

# the tests that launch several processes are slow: the full suite (CI, the README's command) runs them


@pytest.mark.parametrize(("num_pairs", "batch_size", "world_size"), [(12, 2, 2), (13, 2, 2), (10, 3, 3), (7, 1, 4)])
def test_processes_see_disjoint_pairs_that_cover_the_epoch(num_pairs, batch_size, world_size):
    shares = [process_batches(num_pairs, batch_size, world_size, rank, True, 5, 0) for rank in range(world_size)]
    assert len({len(s) for s in shares}) == 1  # every process runs the same number of micro-batches
    seen = [i for share in shares for batch in share for i in batch]
    assert len(seen) == len(set(seen))  # disjoint
    dropped = num_pairs - len(seen)
    assert dropped < world_size  # only a last global batch too small for every process is dropped
    one_process = process_batches(num_pairs, batch_size * world_size, 1, 0, True, 5, 0)
    for step, global_batch in enumerate(one_process[: len(shares[0])]):
        assert sorted(i for share in shares for i in share[step]) == sorted(global_batch)


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_twice(tmp_path: Path, model_dir: Path, grad_accum: int, two_process_options: list[str],
                monkeypatch: pytest.MonkeyPatch, two_process_environment: dict[str, str] | None = None,
                options: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The same 3 steps (and evaluations) in one process with batch 4 and in two processes with batch 2 each;
    `options` for both runs, `two_process_options` for the second only."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    common = ["--model", str(model_dir), "--data", str(data), "--max-steps", "3", "--grad-accum",
              str(grad_accum), "--learning-rate", "1e-3", "--seed", "3", "--eval-data", str(data), "--cache-dir",
              str(tmp_path / "cache"), *options]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *common, "--output-dir", str(one), "--batch-size", "4"]) == 0
    for name, value in (two_process_environment or {}).items():  # read by the processes torchrun starts
        monkeypatch.setenv(name, value)
    assert main(["train", *common, "--output-dir", str(two), "--batch-size", "2", "--num-processes", "2",
                 *two_process_options]) == 0
    return one, two


def assert_same_training(one: Path, two: Path) -> None:
    """Losses, rewards and evaluation metrics at every logged step, and the saved weights, equal to 1e-5."""
    one_rows, two_rows = rows(one), rows(two)
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows]
    for a, b in zip(one_rows, two_rows, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/margins", "grad_norm", "eval_loss", "eval_rewards/accuracies"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
        if "eval_num_pairs" in a:
            assert b["eval_num_pairs"] == a["eval_num_pairs"] == len(PAIRS) * 4
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("grad_accum", "two_process_options"), [
    (1, []),
    (2, []),
    (1, ["--precompute-ref-log-probs"]),  # each process reads or computes the table; the main one writes it
], ids=["accum-1", "accum-2", "precomputed-reference"])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_model_dir, grad_accum,
                                                              two_process_options, monkeypatch):
    one, two = train_twice(tmp_path, tiny_model_dir, grad_accum, two_process_options, monkeypatch)
    if two_process_options:
        # one entry: the evaluation pairs are the training pairs here, so their key is the same
        assert len(list((tmp_path / "cache" / "reference-logps").iterdir())) == 1
    assert_same_training(one, two)


@pytest.mark.slow
@pytest.mark.parametrize(("config", "grad_accum", "options", "two_process_options"), [
    ("fsdp", 1, (), []),
    # 16 evaluation pairs: shares of 8 in 3 batches, the last one short
    ("fsdp-shard-grad-op", 2, (), ["--eval-batch-size", "3"]),
    ("fsdp", 1, ("--gradient-checkpointing",), ["--precompute-ref-log-probs"]),
    ("fsdp", 1, ("--lora", "--merge", "--learning-rate", "1e-2"), []),  # reference: the sharded policy, adapter off
    ("fsdp", 1, ("--sync-ref-model", "--ref-model-sync-steps", "1", "--ref-model-mixup-alpha", "0.5"), []),  # TR-DPO
], ids=["accum-1", "grad-op-accum-2", "precomputed-reference", "lora-merged", "tr-dpo"])
def test_fsdp_on_two_processes_equals_one_process(tmp_path, tiny_model_dir, config, grad_accum, options,
                                                  two_process_options, monkeypatch, capfd):
    """FSDP2 as the shipped accelerate configs set it up, on two CPU processes over gloo: weights, gradients and
    optimizer state sharded, the reference model sharded too, the saved model gathered whole."""
    environment = launch_environment(config, processes=2)  # as `accelerate launch` sets it
    assert environment["FSDP_VERSION"] == "2" and environment["ACCELERATE_USE_FSDP"] == "true"
    one, two = train_twice(tmp_path, tiny_model_dir, grad_accum, two_process_options, monkeypatch, environment,
                           options)
    held, total = (int(n.replace(",", "")) for n in re.search(
        r"FSDP: each process holds a slice of the weights \(([\d,]+) of ([\d,]+)", capfd.readouterr().out).groups())
    assert held <= total // 2 + 64  # sharded: half of every weight, up to rounding of odd first dimensions
    assert_same_training(one, two)
    # the report's samples, generated and scored by the sharded models, are the one-process run's
    samples = [[line for line in (run / "report.md").read_text().splitlines() if "implicit" in line]
               for run in (one, two)]
    assert samples[0] and samples[0] == samples[1]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_checkpoint_resumes_under_the_same_number_of_processes(tmp_path, tiny_model_dir, capfd, monkeypatch, engine):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    out = tmp_path / "run"
    environment = launch_environment(engine, processes=2)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    def args(processes: int) -> list[str]:
        return ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                "--batch-size", "2", "--num-processes", str(processes), "--max-steps", "4", "--save-steps", "2",
                "--learning-rate", "1e-3"]

    assert main(args(2)) == 0
    finished = load_file(out / "model.safetensors")
    shutil.rmtree(out / "checkpoint-4")
    assert main([*args(2), "--resume"]) == 0
    resumed = load_file(out / "model.safetensors")
    # the same weights to the bit: under FSDP the optimizer state went through gather-to-file and back to slices
    assert max((finished[k] - resumed[k]).abs().max().item() for k in finished) == 0.0
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4]
    capfd.readouterr()
    assert main([*args(1), "--resume"]) == 2
    assert "train.num_processes: 2 in the checkpoint, 1 now" in capfd.readouterr().err
    if engine == "fsdp":  # its optimizer state is keyed by name: only FSDP reads it back
        monkeypatch.delenv("ACCELERATE_USE_FSDP")
        assert main([*args(2), "--resume"]) == 2
        assert "was written under FSDP; resume it the same way (now without)" in capfd.readouterr().err


def test_engines_without_a_tested_path_are_refused_with_what_to_use_instead():
    """DeepSpeed and FSDP version 1 wrap or shard the model in ways preftune's loop has no path for: it stops
    before loading anything rather than save or score a slice of a model."""
    import accelerate.utils

    from preftune.errors import UserError
    from preftune.runtime.accelerator import DATA_PARALLEL_ENGINES, check_engine

    for engine in DATA_PARALLEL_ENGINES:
        check_engine(engine)
    check_engine("FSDP", fsdp_version=2)
    assert {"NO", "MULTI_CPU", "MULTI_GPU"} <= set(DATA_PARALLEL_ENGINES)
    assert set(DATA_PARALLEL_ENGINES) <= {t.value for t in accelerate.utils.DistributedType}
    for engine, version, named in (("DEEPSPEED", None, "DEEPSPEED engine"), ("MEGATRON_LM", None, "MEGATRON_LM"),
                                   ("FSDP", 1, "FSDP version 1")):
        with pytest.raises(UserError, match=f"{named}.*configs/accelerate/fsdp.yaml.*configs/accelerate/ddp.yaml"):
            check_engine(engine, version)
