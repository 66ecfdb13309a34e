"""Integration through the CLI on tiny random models: train, eval, saving, user errors."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.cli import main
from tests.conftest import PAIRS, write_jsonl


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_llama_learns_preferences(tmp_path, tiny_model_dir, pairs_file):
    """A few steps of DPO on a tiny random Llama: loss falls below ln 2 and accuracy rises."""
    out = tmp_path / "run"
    code = main([
        "train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out),
        "--max-steps", "12", "--batch-size", "4", "--learning-rate", "1e-2", "--beta", "0.5", "--warmup-ratio", "0",
        "--lr-scheduler-type", "constant", "--eval-data", str(pairs_file), "--seed", "0",
    ])
    assert code == 0
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = rows[0], rows[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert last["loss"] < math.log(2) - 0.1
    assert last["rewards/accuracies"] > first["rewards/accuracies"]
    for key in ("epoch", "time", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in last
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert evals and evals[-1]["eval_num_pairs"] == len(PAIRS)
    # the saved model loads with plain transformers and differs from the start
    trained = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)
    assert (out / "preftune_config.yaml").is_file() and (out / "tokenizer_config.json").is_file()
    report = (out / "report.md").read_text()
    assert "![training and evaluation curves](curves.png)" in report and (out / "curves.png").is_file()
    assert "| eval_loss |" in report and "prompt_length" not in report
    sample_rows = [line for line in report.splitlines() if line.startswith("| ") and "*(implicit" in line]
    assert len(sample_rows) == len(PAIRS)  # four distinct held-out prompts (five at most)
    assert any((out / "tensorboard").iterdir())


def test_eval_prints_metrics_json_equal_to_training_rewards(tmp_path, tiny_model_dir, tiny_ref_dir, pairs_file,
                                                            capsys):
    code = main(["eval", "--model", str(tiny_model_dir), "--ref-model", str(tiny_ref_dir), "--data", str(pairs_file),
                 "--batch-size", "3", "--beta", "0.2"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_pairs"] == len(PAIRS)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert math.isfinite(metrics[key])
    assert metrics["rewards/margins"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"],
                                                       abs=1e-5)
    # model against itself: zero rewards, loss ln 2
    main(["eval", "--model", str(tiny_model_dir), "--data", str(pairs_file)])
    itself = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert itself["loss"] == pytest.approx(math.log(2), abs=1e-6) and itself["rewards/chosen"] == 0.0


def test_lora_saves_adapter_and_merged_model(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "lora"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out),
                 "--max-steps", "2", "--lora", "--lora-r", "4", "--merge", "--learning-rate", "1e-2"])
    assert code == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain model, no peft needed
    assert merged.config.num_hidden_layers == 2


def test_non_empty_output_dir_is_refused(tmp_path, tiny_model_dir, pairs_file, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out)])
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_data_exits_2_without_traceback_before_loading_a_model(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"prompt": "x", "chosen": 3, "rejected": "y"}])
    # a model path that does not exist: the run must stop on the data before it looks at the model
    result = subprocess.run(
        [sys.executable, "-m", "preftune.cli", "train", "--data", str(bad), "--model", str(tmp_path / "no-model"),
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "bad.jsonl: line 2" in result.stderr and "chosen" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_option_exits_2_before_loading(tmp_path, pairs_file, capsys):
    assert main(["train", "--data", str(pairs_file), "--beta", "-1"]) == 2
    assert "--beta must be > 0" in capsys.readouterr().err


def test_trains_on_empty_and_whitespace_replies(tmp_path, tiny_model_dir, capsys):
    """Empty and whitespace-only chosen replies are trained on (scored by their EOS), with one notice naming them."""
    records = [PAIRS[0], {**PAIRS[1], "chosen": ""}, PAIRS[2], {**PAIRS[3], "chosen": " \n"}]
    data = write_jsonl(tmp_path / "blank.jsonl", records)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-2"])
    assert code == 0
    captured = capsys.readouterr().out
    notices = [line for line in captured.splitlines() if "empty or whitespace-only" in line]
    assert notices == [f"note: 2 completions are empty or whitespace-only, kept and scored as TRL does, by the tokens "
                       f"that end a reply (EOS after plain text, the chat template's end of turn after messages): "
                       f"{data}: line 2 (chosen); {data}: line 4 (chosen)"]
    assert re.search(r"on 4 pairs", captured)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


def test_trains_on_real_hh_rlhf_pairs(tmp_path, tiny_model_dir, capsys):
    """The real HH-RLHF harmless-base test split (implicit prompts) through the whole CLI, on a tiny model: its 4
    empty chosen replies are trained on, without --skip-invalid, and named in one notice."""
    from tests.conftest import HH_RLHF

    if not HH_RLHF.is_file():
        pytest.skip(f"{HH_RLHF} not present (it lives in ../shared beside the checkout)")
    out = tmp_path / "hh"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(HH_RLHF), "--output-dir",
                 str(out), "--max-steps", "2", "--batch-size", "2", "--max-length", "256"])
    assert code == 0
    captured = capsys.readouterr().out
    assert "skipped" not in captured
    notices = [line for line in captured.splitlines() if "empty or whitespace-only" in line]
    assert len(notices) == 1 and notices[0].startswith("note: 4 completions are empty or whitespace-only")
    assert all(f"{HH_RLHF}: line {n} (chosen)" in notices[0] for n in (87, 517, 926, 1104))
    trained = int(re.search(r"on (\d+) pairs", captured).group(1))
    dropped = re.search(r"dropped (\d+) training pairs", captured)
    assert trained + (int(dropped.group(1)) if dropped else 0) == 2312
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines()]) == 2
