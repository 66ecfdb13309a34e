"""Where reference log-probs come from: none (--reference-free), and TR-DPO's updates of the reference model
(against TRL's SyncRefModelCallback); training runs that use them and the per-token loss extras."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import preftune.trainer
from preftune.batching import collate_padded
from preftune.cli import main
from preftune.errors import UserError
from preftune.logprobs import sequence_logps
from preftune.reference import check_syncable, reference_source, sync_reference_model
from preftune.tokenize import TokenizedPair


def read_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_reference_free_source_is_zeros_with_the_token_counts(tiny_model_dir):
    pairs = [TokenizedPair([5, 6], [8, 9, 10], [12], 0), TokenizedPair([20], [23], [24, 25], 1)]
    batch = collate_padded(pairs, pad_token_id=2)
    zeros = reference_source(None, None, reference_free=True)(batch)
    with torch.no_grad():
        real = sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    assert zeros.chosen.tolist() == [0.0, 0.0] and zeros.rejected.tolist() == [0.0, 0.0]
    assert zeros.chosen_tokens.tolist() == real.chosen_tokens.tolist() == [3, 1]
    assert zeros.rejected_tokens.tolist() == real.rejected_tokens.tolist() == [1, 2]


def test_sync_reference_model_equals_trls_callback(tiny_model_dir, tiny_ref_dir):
    from trl.trainer.callbacks import SyncRefModelCallback

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ours = AutoModelForCausalLM.from_pretrained(tiny_ref_dir)
    theirs, before = copy.deepcopy(ours), copy.deepcopy(ours)
    sync_reference_model(policy, ours, 0.3)
    SyncRefModelCallback._sync_target_model(policy, theirs, 0.3)
    for a, b, old, p in zip(ours.parameters(), theirs.parameters(), before.parameters(), policy.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, 0.3 * p + 0.7 * old)


def test_sync_needs_the_policys_architecture(tiny_model_dir):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    check_syncable(policy, copy.deepcopy(policy))
    with pytest.raises(UserError, match="--sync-ref-model needs a reference model with the policy's architecture"):
        check_syncable(policy, torch.nn.Linear(3, 3))


def test_training_updates_the_reference_every_sync_steps(tmp_path, tiny_model_dir, tiny_ref_dir, pairs_file,
                                                         monkeypatch):
    calls = []

    def checked_sync(policy, reference, alpha):
        before = [p.detach().clone() for p in reference.parameters()]
        sync_reference_model(policy, reference, alpha)
        for new, old, p in zip(reference.parameters(), before, policy.parameters(), strict=True):
            torch.testing.assert_close(new, alpha * p + (1 - alpha) * old)
        calls.append(alpha)

    monkeypatch.setattr(preftune.trainer, "sync_reference_model", checked_sync)
    code = main(["train", "--model", str(tiny_model_dir), "--ref-model", str(tiny_ref_dir), "--data",
                 str(pairs_file), "--output-dir", str(tmp_path / "run"), "--max-steps", "5", "--batch-size", "2",
                 "--learning-rate", "1e-2", "--sync-ref-model", "--ref-model-sync-steps", "2",
                 "--ref-model-mixup-alpha", "0.5"])
    assert code == 0
    assert calls == [0.5, 0.5]  # after steps 2 and 4


def test_training_with_the_per_token_extras_matches_eval(tmp_path, tiny_model_dir, tiny_ref_dir, pairs_file, capsys):
    """LD-DPO tails (policy and reference) and WPO weights flow through training; the run's final evaluation
    equals `preftune eval` of the saved model with the same loss options."""
    options = ["--loss-type", "sigmoid,sft", "--loss-weights", "1,0.5", "--ld-alpha", "0.5", "--use-weighting",
               "--f-divergence-type", "js_divergence"]
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--ref-model", str(tiny_ref_dir), "--data", str(pairs_file),
                 "--output-dir", str(out), "--max-steps", "2", "--learning-rate", "1e-2", "--eval-data",
                 str(pairs_file), *options]) == 0
    final = [r for r in read_rows(out) if "eval_loss" in r][-1]
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--ref-model", str(tiny_ref_dir), "--data", str(pairs_file),
                 *options]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert scored[name] == pytest.approx(final[f"eval_{name}"], rel=1e-5, abs=1e-7), name


def test_reference_free_training_rewards_are_beta_log_pi(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out),
                 "--max-steps", "2", "--loss-type", "simpo", "--reference-free", "--beta", "2.0"]) == 0
    for row in (r for r in read_rows(out) if "loss" in r):
        assert row["rewards/chosen"] == pytest.approx(2.0 * row["logps/chosen"], rel=1e-6)
        assert row["rewards/rejected"] == pytest.approx(2.0 * row["logps/rejected"], rel=1e-6)
    # no reference was kept: report.md compares with the starting model, loaded for it
    assert "| prompt | reference sample | policy sample |" in (out / "report.md").read_text()
