"""The frontier's pieces that need no training: the tables, both plots, and the cache of methods (with a stand-in
for the methods' processes)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.config import Config
from preftune.frontier import Point, plot_frontier, run_frontier, write_table
from preftune.frontier_methods import Cost, Measure
from preftune.measure import ModelPair, measure
from preftune.models import frozen


def test_table_and_plot(tmp_path):
    points = [
        Point("reference", None, 1, 0.0, 0.0, 0.1, 0.02, gain=0.01, gain_stderr=0.015),
        Point("best-of-N", None, 4, math.log(4) - 3 / 4, 0.0, 0.4, 0.03, gain=0.31, gain_stderr=0.025),
        Point("DPO beta=0.1", 10, None, 0.8, 0.1, 0.3, 0.04),
        Point("DPO beta=0.1", 20, None, 2.1, 0.2, 0.5, 0.04),
        Point("Preferred-FT", 20, None, 3.0, 0.3, 0.2, 0.05),
    ]
    write_table(points, tmp_path)
    plot_frontier(points, tmp_path / "frontier.png")
    rows = (tmp_path / "frontier.csv").read_text().splitlines()
    assert rows[0].startswith("method,step,n,kl,kl_stderr,reward,reward_stderr,seconds,") and len(rows) == 6
    table = (tmp_path / "frontier.md").read_text()
    assert "| best-of-N |  | 4 | 0.64 +- 0.00 | +0.400 +- 0.030 | +0.310 +- 0.025 |" in table
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def fake_runner(calls: list[str]):
    """Stands in for a method's process: points and a cost row from its name, and a record of what ran."""

    def run(spec, config, folder):
        calls.append(spec.label)
        if spec.kind == "reward-model":
            return [], Cost(spec.label, 5.0, 4.0, 10**9, 1, "reward model", 0, 0, 242, False,
                            {"held_out_accuracy": 0.6, "held_out_accuracy_stderr": 0.06, "labels": 242})
        if spec.kind == "best-of-n":
            points = [Point("reference", None, 1, 0.0, 0.0, 0.1, 0.02, 1.0, 64, 64, 0),
                      Point("best-of-N", None, 4, 0.64, 0.0, 0.4, 0.03, 4.0, 256, 256, 0)]
        else:
            budget = {"completions": 16 * 10, "reward_queries": 16 * 10} if spec.kind in ("ppo", "rloo") else {}
            points = [Point(spec.label, 10, None, 1.0, 0.1, 0.3, 0.04, 20.0, labels=242 if spec.kind != "ppo" or
                            spec.uses_reward_model else 0, **budget)]
        last = points[-1]
        return points, Cost(spec.label, 30.0, 20.0, 2 * 10**9, len(spec.copies), ", ".join(spec.copies),
                            last.completions, last.reward_queries, last.labels, spec.uses_reward_model)

    return run


def test_methods_are_cached_and_a_rerun_computes_only_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr("preftune.sentiment.prepare_default_job", lambda config: None)
    config = Config()
    config.train.output_dir = str(tmp_path / "frontier")
    config.default_job.frontier_betas = "0.1"
    calls: list[str] = []
    folder = run_frontier(config, ["best-of-n", "dpo", "rloo"], runner=fake_runner(calls))
    assert calls == ["reward model", "best-of-N", "DPO beta=0.1", "RLOO"]  # the reward model first: RLOO needs it
    costs = (folder / "costs.md").read_text()
    assert "| reward model | 4 s | 5 s | 1.00 GB | 1 (reward model) | 0 | 0 | 242 | held-out accuracy 0.600" in costs
    assert ("| RLOO | 20 s + reward model | 30 s | 2.00 GB | 3 (policy, reference, reward model) | 160 | 160 | 242 |"
            in costs)
    assert (folder / "sample_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    calls.clear()
    run_frontier(config, ["best-of-n", "dpo", "rloo", "ppo-gt"], runner=fake_runner(calls))
    assert calls == ["PPO-GT"]
    calls.clear()
    config.default_job.frontier_betas = "0.1,0.5"
    config.default_job.num_eval_prompts = 32  # every method's measurement changes: all are recomputed
    run_frontier(config, ["dpo"], runner=fake_runner(calls))
    assert calls == ["DPO beta=0.1", "DPO beta=0.5"]

    assert "DPO beta=0.5" in (folder / "frontier.md").read_text() and "RLOO" not in (folder / "costs.md").read_text()

def test_an_unknown_method_is_a_user_error(capsys):
    from preftune.cli import main

    assert main(["frontier", "--methods", "dpo,ppo-magic"]) == 2
    assert "--methods: 'ppo-magic' is not a method" in capsys.readouterr().err


def length_reward(prompts, completions):  # varies on a random model's text (VADER scores it 0 almost always)
    return [len(c) + 1e-3 * sum(map(ord, c)) for c in completions]


def test_a_points_gain_is_paired_by_prompt_with_the_reference(tiny_model_dir, tiny_ref_dir, tokenizer):
    """A frontier point: reward stderr clustered by prompt, and its gain over the reference's samples on the same
    prompts (the reference sampled as `measure` samples it) from per-prompt differences; best-of-N's gain pairs
    each prompt's best with the reference's mean there."""
    config = Config()
    config.default_job.num_eval_prompts, config.default_job.samples_per_eval_prompt = 4, 3
    config.sample.max_new_tokens = 6
    policy = frozen(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    reference = frozen(AutoModelForCausalLM.from_pretrained(tiny_ref_dir))
    measure_against = Measure(config, reference, tokenizer)
    measure_against.reward = length_reward
    point = measure_against.policy_point(policy, "X", 1)
    n, k = 4, 3
    both = measure(ModelPair(policy, reference), tokenizer, measure_against.prompt_ids, num_samples=k,
                   reward=length_reward, **measure_against.sampling)
    ours, theirs = (torch.tensor(r, dtype=torch.float64).view(n, k)
                    for r in (both.policy_rewards, both.reference_rewards))
    differences = ours.mean(dim=1) - theirs.mean(dim=1)
    assert point.reward == pytest.approx(ours.mean().item())
    assert point.reward_stderr == pytest.approx((ours.mean(dim=1).std() / math.sqrt(n)).item())
    assert point.gain == pytest.approx(differences.mean().item())
    assert point.gain_stderr == pytest.approx((differences.std() / math.sqrt(n)).item())
    assert point.kl == pytest.approx(both.kl.mean) and point.kl_stderr == pytest.approx(both.kl.stderr)
    best_of_n, _ = measure_against.best_of_n_points()
    best = best_of_n[-1]
    assert best.gain == pytest.approx(best.reward - theirs.mean().item())
