"""`preftune plot`: a PNG with one panel per quantity, train and eval curves."""

from __future__ import annotations

import json

from preftune.cli import main
from preftune.evaluation.plot import PANELS, draw


def metrics_rows() -> list[dict]:
    rows = []
    for step in range(1, 7):
        rows.append({"step": step, "epoch": step / 6, "time": 0.0, "loss": 0.69 - 0.01 * step,
                     "rewards/accuracies": 0.5 + 0.05 * step, "rewards/margins": 0.1 * step,
                     "rewards/chosen": 0.05 * step, "rewards/rejected": -0.05 * step})
        if step % 3 == 0:
            rows.append({"step": step, "eval_loss": 0.7, "eval_rewards/accuracies": 0.6, "eval_rewards/margins": 0.2,
                         "eval_rewards/chosen": 0.1, "eval_rewards/rejected": -0.1, "eval_num_pairs": 4})
    return rows


def test_each_panel_has_train_and_eval_curves():
    figure = draw(metrics_rows(), "test")
    assert len(figure.axes) == len(PANELS) == 4
    for axis, (_, names) in zip(figure.axes, PANELS):
        labels = [line.get_label() for line in axis.get_lines() if not line.get_label().startswith("_")]
        assert len(labels) == 2 * len(names)  # train and eval of each metric in the panel
        train = [line for line in axis.get_lines() if line.get_label().endswith("train")][0]
        assert list(train.get_xdata()) == [1, 2, 3, 4, 5, 6]


def test_plot_command_writes_a_png(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics_rows()))
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert str(png) in capsys.readouterr().out


def test_plot_of_a_folder_without_metrics_is_a_user_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
