"""generate / score / judge on tiny random models: shapes, determinism, the interval by hand, exact KL."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.cli import main
from preftune.evaluation.judge import win_rate
from preftune.evaluation.measure import kl_from_samples
from preftune.forward.rollout import sample, sequence_logps_of_samples
from tests.conftest import PAIRS, write_jsonl

PROMPTS = [{"prompt": "The movie was"}, {"prompt": [{"role": "user", "content": "Review a film."}]}]


def last_json(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_generate_shapes_and_determinism(tmp_path, tiny_model_dir, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--num-samples", "3",
            "--max-new-tokens", "5", "--seed", "1"]
    assert main(args) == 0
    first = last_json(capsys)
    assert len(first) == 6 and [r["sample_index"] for r in first] == [0, 1, 2, 0, 1, 2]
    assert [r["location"] for r in first] == ["line 1"] * 3 + ["line 2"] * 3
    assert main(args) == 0
    assert last_json(capsys) == first  # same seed, same samples
    assert main([*args[:-1], "2"]) == 0
    assert last_json(capsys) != first


def test_score_pairs_equal_eval_rewards(tmp_path, tiny_model_dir, tiny_ref_dir, pairs_file, capsys):
    common = ["--model", str(tiny_model_dir), "--ref-model", str(tiny_ref_dir), "--data", str(pairs_file),
              "--beta", "0.3", "--batch-size", "3"]
    assert main(["score", *common]) == 0
    scores = last_json(capsys)
    assert main(["eval", *common]) == 0
    metrics = last_json(capsys)[-1]
    assert len(scores) == len(PAIRS)
    mean = lambda key: sum(r[key] for r in scores) / len(scores)  # noqa: E731
    assert mean("chosen_reward") == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert mean("rejected_reward") == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    accuracy = sum(r["chosen_reward"] > r["rejected_reward"] for r in scores) / len(scores)
    assert accuracy == pytest.approx(metrics["rewards/accuracies"])
    for r in scores:
        assert r["chosen_reward"] == pytest.approx(0.3 * (r["policy_logp_chosen"] - r["reference_logp_chosen"]))


def test_score_candidates_ranks_best_of_n(tmp_path, tiny_model_dir, tiny_ref_dir, capsys):
    records = [{"prompt": "The movie was", "responses": [" great", " bad", " fine, I guess", " long"]},
               {"prompt": "Honestly,", "completions": [" yes", " no"]}]
    prompts = write_jsonl(tmp_path / "candidates.jsonl", records)
    out = tmp_path / "scores.csv"
    assert main(["score", "--model", str(tiny_model_dir), "--ref-model", str(tiny_ref_dir), "--prompts",
                 str(prompts), "--output", str(out)]) == 0
    import csv

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6
    for location, count in (("line 1", 4), ("line 2", 2)):
        group = [r for r in rows if r["location"] == location]
        assert sorted(int(r["rank"]) for r in group) == list(range(1, count + 1))
        best = min(group, key=lambda r: int(r["rank"]))
        assert float(best["reward"]) == max(float(r["reward"]) for r in group)
    assert main(["score", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err  # nothing is overwritten


def test_win_rate_interval_by_hand():
    # outcomes: win, tie, loss, win -> mean 0.625; sample sd sqrt(0.6875 / 3)
    result = win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0])
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)
    assert result.rate == pytest.approx(0.625)
    half = 1.96 * math.sqrt(0.6875 / 3) / 2
    assert result.low == pytest.approx(0.625 - half) and result.high == 1.0  # clipped at 1


def test_judge_a_model_against_itself(tmp_path, tiny_model_dir, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    assert main(["judge", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--num-samples", "4",
                 "--max-new-tokens", "6"]) == 0
    summary = last_json(capsys)[-1]
    assert summary["kl_policy_reference"] == 0.0  # same model: every log-ratio is exactly 0
    assert summary["win_rate"] == 0.5 and summary["ties"] == summary["comparisons"] == 8


def test_judge_with_a_python_reward_callable(tmp_path, tiny_model_dir, tiny_ref_dir, capsys, monkeypatch):
    (tmp_path / "my_reward.py").write_text("def length(prompt, completion):\n    return float(len(completion))\n")
    monkeypatch.chdir(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    assert main(["judge", "--model", str(tiny_model_dir), "--ref-model", str(tiny_ref_dir), "--prompts",
                 str(prompts), "--reward", "my_reward:length", "--max-new-tokens", "4", "--output",
                 str(tmp_path / "judged.jsonl")]) == 0
    summary = last_json(capsys)[-1]
    records = [json.loads(line) for line in (tmp_path / "judged.jsonl").read_text().splitlines()]
    assert summary["comparisons"] == len(records) == 2
    assert summary["policy_reward_mean"] == pytest.approx(sum(len(r["policy"]) for r in records) / 2)
    assert 0 <= summary["win_rate_95ci"][0] <= summary["win_rate"] <= summary["win_rate_95ci"][1] <= 1


def tiny_vocab_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper distributions than the random init, so the KL is far from 0
        model.lm_head.weight.mul_(40)
    return model


def test_kl_estimate_matches_exact_enumeration():
    policy, reference = tiny_vocab_model(0), tiny_vocab_model(1)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None, decode=lambda ids, **kwargs: "")
    prompt = [1, 2]
    exact = 0.0
    with torch.no_grad():
        for a, b in itertools.product(range(6), repeat=2):
            ids = torch.tensor([prompt + [a, b]])
            lp = torch.log_softmax(policy(ids).logits[0], -1)
            lr = torch.log_softmax(reference(ids).logits[0], -1)
            log_p = lp[1, a] + lp[2, b]
            log_r = lr[1, a] + lr[2, b]
            exact += (log_p.exp() * (log_p - log_r)).item()
    samples = sample(policy, tokenizer, [prompt], num_samples=3000, max_new_tokens=2, batch_size=1000, seed=0)
    assert all(len(s.completion_ids) == 2 for s in samples)
    estimate = kl_from_samples(sequence_logps_of_samples(policy, samples, 0, batch_size=1000),
                               sequence_logps_of_samples(reference, samples, 0, batch_size=1000))
    assert exact > 0.1
    assert abs(estimate.mean - exact) < 4 * estimate.stderr
    assert estimate.stderr < 0.1 * exact


def test_bad_prompts_file_names_line_and_field(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": 7}\n')
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl: line 2: field 'prompt': expected a string or a list of messages, got int" in err


def test_judge_with_a_sequence_classification_reward_model(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer_dir,
                                                            capsys):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=2)
    reward_dir = tmp_path / "reward-model"
    LlamaForSequenceClassification(config).save_pretrained(reward_dir)
    for file in tokenizer_dir.iterdir():
        (reward_dir / file.name).write_bytes(file.read_bytes())
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "judged.jsonl"
    assert main(["judge", "--model", str(tiny_model_dir), "--ref-model", str(tiny_ref_dir), "--prompts",
                 str(prompts), "--reward", str(reward_dir), "--max-new-tokens", "4", "--output", str(out)]) == 0
    summary = last_json(capsys)[-1]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # the reward model's logits differ between completions: real scores, not a constant
    assert len({r["policy_reward"] for r in records} | {r["reference_reward"] for r in records}) > 1
    assert summary["reward"] == str(reward_dir)
