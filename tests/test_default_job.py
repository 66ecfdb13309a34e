"""The default job end to end on the real SmolLM2-135M-Instruct, at reduced size (slow; runs in CI)."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM

from preftune.cli import main


@pytest.mark.slow
def test_default_job_end_to_end_reduced(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = main([
        "train", "--output-dir", str(out), "--cache-dir", str(cache), "--num-prompts", "24",
        "--num-eval-prompts", "6", "--max-new-tokens", "12", "--max-steps", "3", "--batch-size", "4",
    ])
    assert code == 0
    report = json.loads((out / "sentiment_report.json").read_text())
    for key in ("reference_reward", "policy_reward"):
        assert -1.0 <= report[key]["mean"] <= 1.0
    assert math.isfinite(report["reward_gain"]) and math.isfinite(report["kl_policy_reference"]["mean"])
    assert 0.0 <= report["held_out_preference_accuracy"] <= 1.0
    assert report["kl_policy_reference"]["num_samples"] == 6 * 2
    assert len(report["examples"]) == 5
    # the generated preference pairs: chosen scored above rejected by the ground-truth reward
    pair_files = list(cache.glob("data/sentiment-*/train.jsonl"))
    assert len(pair_files) == 1
    records = [json.loads(line) for line in pair_files[0].read_text().splitlines()]
    assert records and all(r["chosen_reward"] > r["rejected_reward"] for r in records)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 30
