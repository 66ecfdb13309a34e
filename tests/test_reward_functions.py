"""Reward functions as TRL users write them (issue 25, item 2): several --reward values with --reward-weights, a
function called as TRL's GRPOTrainer calls one (prompts, completions, completion_ids and the prompts' other
columns as keyword lists), None left out, the two-argument form kept, and each function's metrics."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from preftune.cli import main
from preftune.errors import UserError
from preftune.forward.rewards import (
    CheckedReward,
    Rewards,
    load_rewards,
    takes_keywords,
    user_function,
    weighted_sum,
)
from tests.conftest import write_jsonl

CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


def test_weights_sum_the_functions_that_judged_a_completion_and_none_judged_is_none():
    """By hand: w = (1, 0.5); r = 1*1 + 0.5*2, 0.5*3 (the first cannot judge), 1*0.5, and nothing judged: None."""
    per_function = [[1.0, None, 0.5, None], [2.0, 3.0, None, None]]
    assert weighted_sum(per_function, [1.0, 0.5]) == [2.0, 1.5, 0.5, None]
    rewards = Rewards([CheckedReward(functools.partial(lambda v, p, c: v, values), f"r{i}")
                       for i, values in enumerate(per_function)], [1.0, 0.5])
    assert rewards(["x"] * 4, ["a", "b", "c", "d"]) == [2.0, 1.5, 0.5, None]


def test_the_rollout_combines_rewards_as_trl_does():
    """TRL 1.16's _generate_and_score_completions: (rewards_per_func * weights).nansum(1), a row every function
    left NaN unscorable; here that row is not judged (no loss) and its reward 0."""
    from preftune.recipes.online.rollouts import combined_rewards

    nan = float("nan")
    per_func = torch.tensor([[1.0, 2.0], [nan, 3.0], [0.5, nan], [nan, nan]])
    raw, judged = combined_rewards(per_func, [1.0, 0.5])
    assert raw.tolist() == [2.0, 1.5, 0.5, 0.0] and judged.tolist() == [True, True, True, False]
    trl = (per_func * torch.tensor([1.0, 0.5])).nansum(1)
    assert torch.equal(raw[:3], trl[:3])


def test_each_function_logs_its_mean_and_std_over_what_it_judged():
    from preftune.recipes.online.rollouts import reward_function_metrics

    nan = float("nan")
    metrics = reward_function_metrics({"accuracy": torch.tensor([1.0, nan, 0.0, 1.0]),
                                       "never": torch.tensor([nan, nan, nan, nan]),
                                       "once": torch.tensor([nan, 2.0, nan, nan])})
    assert metrics["rewards/accuracy/mean"] == pytest.approx(2 / 3)
    assert metrics["rewards/accuracy/std"] == pytest.approx(math.sqrt(1 / 3))  # n - 1: ((1/9)*2 + 4/9) / 2
    assert metrics["rewards/never/mean"] == 0.0 and metrics["rewards/never/std"] == 0.0
    assert metrics["rewards/once/mean"] == 2.0 and metrics["rewards/once/std"] == 0.0


def trl_form(prompts, completions, completion_ids, answer, **kwargs):
    trl_form.calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                           "answer": answer, **kwargs})
    return [1.0 if c[0]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]


trl_form.calls = []


def test_a_function_of_trl_form_gets_prompts_completions_ids_and_the_columns_as_keyword_lists():
    trl_form.calls.clear()
    reward = user_function(trl_form, "mine:trl_form")
    assert reward.keywords and reward.label == "trl_form"
    values = reward([CHAT, CHAT], [" 5", "6"], [[330, 2], [334, 2]], {"answer": ["5", "5"], "level": [1, 2]})
    assert values == [1.0, 0.0]
    assert trl_form.calls == [{
        "prompts": [CHAT, CHAT],
        "completions": [[{"role": "assistant", "content": " 5"}], [{"role": "assistant", "content": "6"}]],
        "completion_ids": [[330, 2], [334, 2]], "answer": ["5", "5"], "level": [1, 2],
    }]
    # after text prompts, completions are texts (TRL's standard format)
    text_form = user_function(lambda completions, **kwargs: [float(len(c)) for c in completions], "lengths")
    assert text_form(["p"], ["abc"]) == [3.0]


def two_arguments(prompt, completion):
    two_arguments.calls.append((prompt, completion))
    return None if completion == "?" else float(len(completion))


two_arguments.calls = []


def test_the_two_argument_form_is_called_per_sample_on_texts_and_ignores_the_columns():
    two_arguments.calls.clear()
    reward = user_function(two_arguments, "mine:two_arguments")
    assert not reward.keywords
    assert reward(["a prompt", CHAT], ["xy", "?"], [[1], [2]], {"answer": ["1", "2"]}) == [2.0, None]
    assert two_arguments.calls == [("a prompt", "xy"), ("What is 2 + 3?", "?")]


class ByClass:
    def __call__(self, completions, **kwargs):
        return [0.0] * len(completions)


@pytest.mark.parametrize(("function", "keywords"), [
    (two_arguments, False),
    (lambda prompt, completion: 0.0, False),
    (trl_form, True),
    (lambda completions, **kwargs: [], True),
    (lambda prompts, completions: [], True),  # named as TRL's: called with keywords (as TRL would)
    (lambda **kwargs: [], True),
    (functools.partial(trl_form, answer=["1"]), True),
    (ByClass(), True),
])
def test_the_form_is_decided_by_the_signature(function, keywords):
    assert takes_keywords(function) is keywords


def test_each_function_is_checked_and_a_failure_names_the_reward_prompt_and_completion():
    def bad(completions, **kwargs):
        return [1.0, float("nan")]

    rewards = Rewards([user_function(trl_form, "mine:trl_form"), user_function(bad, "mine:bad")])
    with pytest.raises(UserError, match=r"(?s)the reward mine:bad returned nan\n  prompt: 'What is 2 \+ 3\?'"
                                        r"\n  completion: '6'"):
        rewards([CHAT, CHAT], ["5", "6"], None, {"answer": ["5", "5"]})

    def missing(completions, answer):  # TRL would raise too: no completion_ids parameter, no **kwargs
        return [0.0] * len(completions)

    with pytest.raises(UserError, match=r"the reward mine:missing raised TypeError"):
        user_function(missing, "mine:missing")(["p"], ["c"], None, {"answer": ["1"]})


def test_labels_are_the_function_names_made_unique():
    def f(completions, **kwargs):
        return [0.0] * len(completions)

    rewards = Rewards([user_function(f, "a:f"), user_function(f, "b:f"), load_rewards("accuracy").functions[0]])
    assert rewards.labels == ["f", "f_2", "accuracy"] and rewards.weights == [1.0, 1.0, 1.0]


def test_reward_and_weight_lists_are_read_like_the_loss_lists():
    from preftune.config import parse_reward_list

    assert parse_reward_list("accuracy, format", "1,0.25") == (["accuracy", "format"], [1.0, 0.25])
    assert parse_reward_list("sentiment") == (["sentiment"], [1.0])
    with pytest.raises(ValueError, match="gives 1 weights for the 2 rewards"):
        parse_reward_list("accuracy,format", "1")
    with pytest.raises(ValueError, match="empty name"):
        parse_reward_list("accuracy,,format")


def test_prompt_records_keep_their_other_columns(tmp_path, tokenizer):
    from preftune.data.prompts import PromptRow, columns_of, distinct_prompts
    from preftune.data.read import load_prompts

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4",
                                                                                     "level": 3}])
    records = load_prompts(path)
    assert [r.columns for r in records] == [{"answer": "2"}, {"answer": "4", "level": 3}]

    rows = [PromptRow(r.prompt, r.columns) for r in records] + [PromptRow("1+1=", {"answer": "2"})]
    prompts = distinct_prompts(rows, tokenizer)
    assert len(prompts) == 2  # the same prompt and columns once
    assert columns_of(prompts, [0, 0, 1]) == {"answer": ["2", "2", "4"], "level": [None, None, 3]}


def write_reward_module(tmp_path, monkeypatch):
    (tmp_path / "trl_rewards.py").write_text(
        "import json\n\n"
        "def exact(prompts, completions, completion_ids, answer, **kwargs):\n"
        "    assert len(prompts) == len(completions) == len(completion_ids) == len(answer)\n"
        "    assert all(isinstance(c, str) and isinstance(i, list) for c, i in zip(completions, completion_ids))\n"
        "    with open('calls.jsonl', 'a') as log:\n"
        "        log.write(json.dumps({'answer': answer, 'keys': sorted(kwargs)}) + '\\n')\n"
        "    return [float(len(c) % 3 == int(a)) for c, a in zip(completions, answer)]\n\n"
        "def odd(prompt, completion):\n"
        "    return None if len(completion) % 2 else float(len(completion))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("command", ["rloo", "ppo", "online-dpo"])
def test_an_online_run_sums_weighted_trl_and_two_argument_rewards_and_logs_each(tmp_path, tiny_model_dir,
                                                                                monkeypatch, command):
    write_reward_module(tmp_path, monkeypatch)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Count {i}:", "answer": str(i % 3), "level": i}
                                                       for i in range(4)])
    out = tmp_path / "run"
    assert main([command, "--model", str(tiny_model_dir), "--prompts", str(prompts), "--output-dir", str(out),
                 "--rollout-batch-size", "2", "--max-new-tokens", "6", "--max-steps", "2", "--report-to", "none",
                 "--reward", "trl_rewards:exact,trl_rewards:odd", "--reward-weights", "1,0.5",
                 "--eval-data", str(write_jsonl(tmp_path / "pairs.jsonl", [
                     {"prompt": "x", "chosen": " a", "rejected": " b"}])),
                 "--eval-reward", "sentiment"]) == 0
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and all(call["keys"] == ["level"] and len(call["answer"]) == 4 for call in calls)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "objective/scores" in r]
    assert len(train) == 2
    for row in train:
        for name in ("rewards/exact/mean", "rewards/exact/std", "rewards/odd/mean", "rewards/odd/std"):
            assert isinstance(row[name], float) and math.isfinite(row[name]), name
        assert 0.0 <= row["rewards/exact/mean"] <= 1.0


def test_bad_reward_weights_exit_2_before_anything_is_written(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert main(["rloo", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--output-dir", str(out),
                 "--reward", "accuracy,format", "--reward-weights", "1,x"]) == 2
    assert "--reward-weights '1,x' is not a comma-separated list of numbers" in capsys.readouterr().err
    assert main(["rloo", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--output-dir", str(out),
                 "--reward", "accuracy,format", "--reward-weights", "1"]) == 2
    assert "gives 1 weights for the 2 rewards" in capsys.readouterr().err
    assert not out.exists()


def test_the_python_api_takes_reward_funcs_and_weights_as_trl(tmp_path, tiny_model_dir):
    import preftune

    seen = []

    def correct(prompts, completions, answer, **kwargs):
        seen.append(answer)
        return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

    def short(completions, **kwargs):
        return [-float(len(c)) for c in completions]

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {i}:", "answer": str(i)} for i in range(4)])
    run = preftune.rloo(model=str(tiny_model_dir), prompts=str(prompts), reward_funcs=[correct, short],
                        reward_weights=[1.0, 0.1], output_dir=str(tmp_path / "run"), rollout_batch_size=2,
                        max_new_tokens=4, max_steps=1, report_to="none")
    assert run.reward.labels == ["correct", "short"] and run.reward.weights == [1.0, 0.1]
    assert seen and all(len(answers) == 4 for answers in seen)
    assert run.config.sample.reward == "<in-memory reward: correct>,<in-memory reward: short>"
    rows = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/correct/mean" in rows[0] and "rewards/short/std" in rows[0]
    with pytest.raises(UserError, match="reward or reward_funcs, not both"):
        preftune.rloo(model=str(tiny_model_dir), prompts=str(prompts), reward="sentiment", reward_funcs=[short])
