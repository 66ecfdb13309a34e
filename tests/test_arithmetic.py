"""The verifiable task (issue 25, item 4): generated problems, their checker, held-out disjointness, --task."""

from __future__ import annotations

import json
import re

import pytest

from preftune.cli import main
from preftune.config import Config, resolved_task, set_option, validate
from preftune.errors import ConfigError
from preftune.forward.answers import accuracy_reward, final_number, format_reward
from preftune.tasks import arithmetic


@pytest.mark.parametrize(("completion", "answer", "reward"), [
    ("12", "12", 1.0),
    ("7 + 5 = 12.", "12", 1.0),  # the final number is the answer given
    ("The answer is 12", 12, 1.0),
    ("12.0", "12", 1.0),
    ("It is 1,200 grams.", "1200", 1.0),
    ("5 + 7 = 12, so 13", "12", 0.0),  # a later number is the answer given
    ("13", "12", 0.0),
    ("-12", "12", 0.0),
    ("", "12", 0.0),  # malformed: no number at all
    ("twelve", "12", 0.0),
    ("12", "not a number", None),  # cannot judge: left out, as TRL's accuracy_reward
    ("12", None, None),
])
def test_accuracy_reads_the_final_number_of_the_completion(completion, answer, reward):
    assert accuracy_reward([completion], [answer]) == [reward]
    # after a chat prompt TRL gives the completion as the assistant's message
    assert accuracy_reward([[{"role": "assistant", "content": completion}]], [answer]) == [reward]


@pytest.mark.parametrize(("completion", "reward"), [
    ("12", 1.0), (" 12.\n", 1.0), ("-3", 1.0), ("2.5", 1.0),
    ("The answer is 12", 0.0), ("12 apples", 0.0), ("", 0.0), ("7 + 5 = 12", 0.0), ("12\n13", 0.0),
])
def test_format_rewards_the_number_alone(completion, reward):
    assert format_reward(completions=[completion]) == [reward]


def test_final_number_by_hand():
    assert final_number("1 and 2 and 30") == 30.0 and final_number("none") is None and final_number("3,4") == 4.0


def test_every_problem_is_exact_and_training_and_held_out_never_share_a_fact():
    train, held_out = arithmetic.problem_pool(False), arithmetic.problem_pool(True)
    assert len(held_out) >= 200 and len(train) >= 512
    assert not {q for q, _ in train} & {q for q, _ in held_out}
    symbol = {"+": "+", "plus": "+", "-": "-", "minus": "-", "x": "x", "times": "x"}

    def fact(question: str) -> tuple[str, int, int]:
        a, operation, b = re.fullmatch(r"(?:What|How much) is (\d+) (\S+) (\d+)\?", question).groups()
        return symbol[operation], int(a), int(b)

    assert not {fact(q) for q, _ in train} & {fact(q) for q, _ in held_out}
    for question, answer in train + held_out:
        operation, a, b = fact(question)
        assert answer == {"+": a + b, "-": a - b, "x": a * b}[operation] >= 0, question


@pytest.mark.parametrize("seed", [0, 42, 7])
def test_a_run_draws_distinct_problems_by_seed_from_each_set(seed):
    train, held_out = arithmetic.make_rows(256, seed, False), arithmetic.make_rows(200, seed, True)
    texts = lambda rows: [p[0]["content"] for p, _ in rows]  # noqa: E731
    assert len(set(texts(train))) == 256 and len(set(texts(held_out))) == 200
    assert not set(texts(train)) & set(texts(held_out))
    assert train == arithmetic.make_rows(256, seed, False)  # the same seed, the same problems
    assert texts(train) != texts(arithmetic.make_rows(256, seed + 1, False))
    prompt, columns = held_out[0]
    assert prompt[0]["role"] == "user" and prompt[0]["content"].endswith(arithmetic.INSTRUCTION)
    assert accuracy_reward([columns["answer"]], [columns["answer"]]) == [1.0]
    with pytest.raises(ValueError, match="held-out problems available"):
        arithmetic.make_problems(10_000, seed, True)


def test_task_is_checked_and_grpo_defaults_to_arithmetic():
    config = Config()
    assert resolved_task(config, "grpo") == "arithmetic" and resolved_task(config, "rloo") == "sentiment"
    set_option(config, "task", "arithmetic", "test")
    assert resolved_task(config, "rloo") == "arithmetic"
    validate(config, "rloo")
    set_option(config, "task", "algebra", "test")
    with pytest.raises(ConfigError, match="--task must be one of sentiment, arithmetic, got 'algebra'"):
        validate(config, "rloo")
    config = Config()
    set_option(config, "task", "arithmetic", "test")
    set_option(config, "prompts", "p.jsonl", "test")
    with pytest.raises(ConfigError, match="--task has no effect with --prompts"):
        validate(config, "rloo")


def test_rloo_runs_the_arithmetic_task_and_reports_held_out_accuracy(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    assert main(["rloo", "--task", "arithmetic", "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--num-prompts", "4", "--num-eval-prompts", "3", "--rollout-batch-size", "2", "--max-steps", "2",
                 "--max-new-tokens", "4", "--report-to", "none"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "objective/scores" in r]
    assert len(train) == 2 and all("rewards/accuracy/mean" in r and "rewards/format/std" in r for r in train)
    report = json.loads((out / "rl_report.json").read_text())
    assert report["reward"] == "accuracy" and report["trained_on_reward"] == "accuracy,format"
    assert report["held_out_prompts"] == 3
    assert len(report["rewards"]["policy"]) == 6 and set(report["rewards"]["policy"]) <= {0.0, 1.0}
    assert "held-out reward (accuracy)" in capsys.readouterr().out


def test_pairs_put_the_first_correct_answer_over_the_first_wrong_one_of_each_problem():
    rows = [([{"role": "user", "content": "What is 2 + 3?"}], {"answer": "5"}),
            ([{"role": "user", "content": "What is 4 x 2?"}], {"answer": "8"}),
            ([{"role": "user", "content": "What is 9 - 9?"}], {"answer": "0"})]
    texts = ["6", "2 + 3 = 5", "5", "no idea",  # right and wrong: one pair, (2 + 3 = 5) over 6
             "8", "8.", "8", "8",  # all right: no pair
             "1", "", " ", "2"]  # all wrong (blank samples are never paired)
    records, unpaired = arithmetic.checked_pairs(rows, texts, 4)
    assert unpaired == 2 and records == [{
        "prompt": rows[0][0], "chosen": [{"role": "assistant", "content": "2 + 3 = 5"}],
        "rejected": [{"role": "assistant", "content": "6"}], "answer": "5", "correct_samples": 2}]


def test_train_with_the_arithmetic_task_runs_dpo_on_the_checkers_pairs_and_reports_accuracy(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A random tiny model never answers right: its samples are made half right (the answer) and half wrong, so
    that every problem gives a pair; the rest of the path (cache, DPO, held-out report) is the real one."""
    import dataclasses

    from preftune.tasks import arithmetic as task

    real_sample = task.sample

    answers = dict(task.problem_pool(False) + task.problem_pool(True))

    def answer_in(prompt: str) -> str:
        return str(answers[re.search(r"(?:What|How much) is [^?]*\?", prompt).group(0)])

    def half_right(model, tokenizer, prompt_ids, *, num_samples, **settings):
        samples = real_sample(model, tokenizer, prompt_ids, num_samples=num_samples, **settings)
        return [dataclasses.replace(s, text=answer_in(tokenizer.decode(s.prompt_ids)) if i % 2 else f"no {i}")
                for i, s in enumerate(samples)]

    monkeypatch.setattr(task, "sample", half_right)
    monkeypatch.setattr(task, "EVAL_PAIR_PROMPTS", 3)
    out = tmp_path / "run"
    args = ["train", "--task", "arithmetic", "--model", str(tiny_model_dir), "--output-dir", str(out),
            "--num-prompts", "4", "--num-eval-prompts", "3", "--max-new-tokens", "4", "--batch-size", "2",
            "--cache-dir", str(tmp_path / "cache"), "--report-to", "none"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "sampled 4 training checker-labelled pairs (0 problems all right or all wrong)" in printed
    assert "reference accuracy" in printed and "policy accuracy" in printed
    report = json.loads((out / task.REPORT_FILE).read_text())
    assert report["pairs"] == 4 and report["held_out_prompts"] == 3 and report["samples_per_prompt"] == 2
    assert report["samples"]["completions_generated"] == (4 + 3) * task.SAMPLES_PER_PAIR_PROMPT
    assert report["peak_rss_gb"] > 0 and report["total_seconds"] > 0
    for name in ("reference_accuracy", "policy_accuracy"):
        assert 0.0 <= report[name]["mean"] <= 1.0 and report[name]["stderr"] >= 0.0
    assert set(report["rewards"]["policy"]) <= {0.0, 1.0} and len(report["rewards"]["policy"]) == 6
    assert report["accuracy_gain"] == pytest.approx(report["policy_accuracy"]["mean"]
                                                    - report["reference_accuracy"]["mean"])
    assert (out / "model.safetensors").is_file() and json.loads((out / "eval_results.json").read_text())
    pairs = [json.loads(line) for line in (tmp_path / "cache").glob("data/arithmetic-*/train.jsonl").__next__().open()]
    assert all(p["chosen"][0]["content"] == p["answer"] for p in pairs)
    # a second run reuses the cached pairs
    assert main([*args[:5], str(tmp_path / "run2"), *args[6:]]) == 0
    assert "using cached checker-labelled pairs" in capsys.readouterr().out
