"""Where reference log-probs come from: none (--reference-free), TR-DPO's updates of the reference model (against
TRL's SyncRefModelCallback), and the precomputed, cached table (--precompute-ref-log-probs); training runs that use
them and the per-token loss extras."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import preftune.recipes.dpo
from preftune.cli import main
from preftune.data.batching import collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.errors import UserError
from preftune.forward.logprobs import sequence_logps
from preftune.forward.reference import (
    cache_key,
    cached_reference_table,
    check_syncable,
    compute_reference_table,
    reference_source,
    sync_reference_model,
    table_source,
    weights_fingerprint,
)


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

    monkeypatch.setattr(preftune.recipes.dpo, "sync_reference_model", checked_sync)
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


# ---- --precompute-ref-log-probs ---------------------------------------------------------------------------------
def train_rows(tmp_path, name, tiny_model_dir, pairs_file, capsys, *extra) -> tuple[list[dict], str]:
    out = tmp_path / name
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--eval-data", str(pairs_file),
                 "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2", "--learning-rate", "1e-2",
                 "--no-shuffle", "--cache-dir", str(tmp_path / "cache"), *extra]) == 0
    return read_rows(out), capsys.readouterr().out


@pytest.mark.parametrize("options", [  # the inner loop (-m "not slow") keeps the plain case
    pytest.param([], id="copy"),
    pytest.param(["--lora", "--learning-rate", "5e-2"], id="lora", marks=pytest.mark.slow),
    pytest.param(["--ref-model", "REF"], id="ref-model", marks=pytest.mark.slow),
    pytest.param(["--ld-alpha", "0.3"], id="ld-dpo-tails", marks=pytest.mark.slow),
])
def test_precomputed_reference_trains_as_the_live_one(tmp_path, tiny_model_dir, tiny_ref_dir, pairs_file, capsys,
                                                      options):
    options = [str(tiny_ref_dir) if o == "REF" else o for o in options]
    live, _ = train_rows(tmp_path, "live", tiny_model_dir, pairs_file, capsys, *options)
    first, printed = train_rows(tmp_path, "first", tiny_model_dir, pairs_file, capsys, "--precompute-ref-log-probs",
                                *options)
    assert "reference log-probs of 4 training pairs computed in" in printed
    again, printed = train_rows(tmp_path, "again", tiny_model_dir, pairs_file, capsys, "--precompute-ref-log-probs",
                                *options)
    assert "reference log-probs of 4 training pairs read from" in printed
    assert "reference log-probs of 4 evaluation pairs read from" in printed
    assert len(live) == len(first) == len(again) > 3
    for a, b, c in zip(live, first, again, strict=True):
        assert set(a) == set(b)
        for name in a:
            if name.startswith(("loss", "eval_loss", "rewards/", "eval_rewards/", "grad_norm")):
                # the same log-probs up to float rounding: the precompute batches pairs differently
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), name
                assert c[name] == b[name], name  # read back bit for bit


def test_reference_cache_key_follows_weights_pairs_and_settings(tiny_model_dir, tiny_ref_dir):
    policy, other = (AutoModelForCausalLM.from_pretrained(d) for d in (tiny_model_dir, tiny_ref_dir))
    pairs = [TokenizedPair([5, 6], [8, 9, 10], [12], 0), TokenizedPair([20], [23], [24, 25], 1)]
    fingerprint = weights_fingerprint(policy)
    key = cache_key(fingerprint, pairs, {"length_split": False})
    assert key == cache_key(weights_fingerprint(copy.deepcopy(policy)), pairs, {"length_split": False})
    assert key != cache_key(weights_fingerprint(other), pairs, {"length_split": False})
    assert key != cache_key(fingerprint, pairs[:1], {"length_split": False})
    moved_boundary = [TokenizedPair([5, 6], [8, 9], [10, 12], 0), pairs[1]]
    assert key != cache_key(fingerprint, moved_boundary, {"length_split": False})
    assert key != cache_key(fingerprint, pairs, {"length_split": True})
    # a LoRA adapter does not change the base weights the reference is (adapter off)
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(policy), LoraConfig(r=2, target_modules="all-linear"))
    assert weights_fingerprint(wrapped) == fingerprint


def test_table_source_reads_each_pairs_row(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pairs = [TokenizedPair([5, 6], [8, 9, 10], [12], 3), TokenizedPair([20], [23], [24, 25], 7),
             TokenizedPair([30, 31, 32], [33], [34], 9)]
    live = reference_source(None, model, length_split=True)
    table = compute_reference_table(live, pairs, batch_size=2, pad_token_id=2, device="cpu", length_split=True)
    assert table.shape == (3, 4)
    cache_file = tmp_path / "cache" / "entry.safetensors"
    calls = []
    for expected_cached in (False, True):
        read, cached = cached_reference_table(cache_file, lambda: calls.append(1) or table, write=True)
        assert cached is expected_cached and torch.equal(read, table)
    assert calls == [1] and [p.name for p in cache_file.parent.iterdir()] == ["entry.safetensors"]
    batch = collate_padded([pairs[2], pairs[0]], pad_token_id=2)  # another order and batch than the table's
    from_table, from_model = table_source(table, pairs)(batch), live(batch)
    for name in ("chosen", "rejected", "chosen_tail", "rejected_tail", "chosen_tokens", "rejected_tokens"):
        expected = getattr(from_model, name)
        torch.testing.assert_close(getattr(from_table, name), expected.to(getattr(from_table, name).dtype))


@pytest.mark.parametrize("extra, message", [
    (["--sync-ref-model"], "not with --sync-ref-model"),
    (["--reference-free", "--loss-type", "simpo"], "--precompute-ref-log-probs has no effect with --reference-free"),
])
def test_precompute_conflicts_are_config_errors(tmp_path, pairs_file, capsys, extra, message):
    assert main(["train", "--data", str(pairs_file), "--output-dir", str(tmp_path / "x"),
                 "--precompute-ref-log-probs", *extra]) == 2
    assert message in capsys.readouterr().err
