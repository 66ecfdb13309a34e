"""The default job end to end on the real SmolLM2-135M-Instruct, at reduced size (slow; runs in CI)."""

from __future__ import annotations

import json
import math

import gguf
import pytest
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.model_card import read_front_matter


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
    # the model card: the embedded default's hub id and license; the generated pairs are local, so no datasets
    card = read_front_matter((out / "README.md").read_text(encoding="utf-8"))
    assert card["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and card["license"] == "apache-2.0"
    assert "datasets" not in card and card["tags"][:3] == ["preftune", "dpo", "sigmoid"]
    # the trained model leaves as GGUF with the embedded file's tokenizer naming (q8_0: a few seconds)
    assert main(["export", str(out), "--gguf", str(tmp_path / "policy.gguf"), "--outtype", "q8_0"]) == 0
    exported = gguf.GGUFReader(tmp_path / "policy.gguf")
    assert exported.fields["tokenizer.ggml.pre"].contents() == "smollm" and len(exported.tensors) == 272


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # the model converted once, the pairs sampled once, for both cases


@pytest.mark.slow
@pytest.mark.parametrize("option", ["--precompute-ref-log-probs", "--reference-free"])
def test_default_job_without_a_held_reference_ends_with_its_reports(tmp_path, shared_cache, option):
    """No reference model is held while training: the reports load the starting model to sample from it."""
    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), "--cache-dir", str(shared_cache), "--num-prompts", "16",
                 "--num-eval-prompts", "4", "--max-new-tokens", "8", "--max-steps", "2", "--batch-size", "4", option])
    assert code == 0
    report = json.loads((out / "sentiment_report.json").read_text())
    assert report["kl_policy_reference"]["num_samples"] == 4 * 2
    assert math.isfinite(report["reward_gain"])
    markdown = (out / "report.md").read_text()
    shown = markdown.count("*(implicit ")  # a reference and a policy sample per held-out prompt shown
    assert shown >= 2 and shown % 2 == 0 and markdown.count(", ground truth ") == shown
