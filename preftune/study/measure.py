"""How every point of the study is measured: the held-out prompts, the frozen reference and the ground truth.

A seed's points are all measured alike: `samples_per_eval_prompt` samples per held-out prompt at temperature 1
with the seed's sampling seed, their mean ground-truth reward (given each prompt's columns, as the arithmetic
task's answers) (standard error clustered by prompt), each prompt's
mean kept for the pairings of the report, and KL(policy || reference) from the policy's samples. Best-of-N reads
the reference's samples instead: N per prompt, the one the reward model scores highest judged by the ground truth.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from preftune.data.read import Text
from preftune.evaluation.measure import ModelPair, measure, prompt_means, sample_columns, stderr
from preftune.forward.rewards import all_judged, checked
from preftune.forward.rollout import sample
from preftune.study.methods import Point


class Measure:
    """The held-out measurement of one seed. `seconds`: time spent measuring, left out of the training time."""

    def __init__(self, tokenizer, reference: torch.nn.Module, reward: Callable, prompts: Sequence[Text],
                 samples_per_prompt: int, max_new_tokens: int, seed: int,
                 columns: Sequence[dict[str, Any]] | None = None) -> None:
        from preftune.data.tokenize import prompt_ids

        self.tokenizer, self.reference, self.prompts = tokenizer, reference, list(prompts)
        self.reward = checked(reward, getattr(reward, "name", "given"))
        self.columns = list(columns) if columns else None  # per prompt, the reward's keywords (TRL's columns)
        self.prompt_ids = [prompt_ids(p, tokenizer) for p in self.prompts]
        self.samples_per_prompt = samples_per_prompt
        self.sampling = dict(max_new_tokens=max_new_tokens, seed=seed + 11)
        self.seed = seed
        self.seconds = 0.0

    def judged(self, samples: Sequence[Any]) -> list[float]:
        """The ground truth of each sample (prompt-major), every one judged (a None is a RewardError)."""
        prompts, completions = [self.prompts[s.prompt_index] for s in samples], [s.text for s in samples]
        values = self.reward(prompts, completions, [s.completion_ids for s in samples],
                             sample_columns(self.columns, samples))
        return all_judged(values, self.reward, prompts, completions)

    def reference_point(self) -> Point:
        """The reference's own samples on the held-out prompts: the point at KL 0 every gain is paired with."""
        started = time.perf_counter()
        samples = sample(self.reference, self.tokenizer, self.prompt_ids, num_samples=self.samples_per_prompt,
                         **self.sampling)
        self.seconds += time.perf_counter() - started
        return rewards_point(self.judged(samples), self.samples_per_prompt, method="reference", budget=None,
                             seed=self.seed, step=0, n=None, kl=0.0, kl_stderr=0.0)

    def policy_point(self, policy: torch.nn.Module, method: str, budget: int | None, step: int,
                     **budgets: Any) -> Point:
        """The policy's samples on the held-out prompts: mean reward, per-prompt means, KL from its samples."""
        started = time.perf_counter()
        measured = measure(ModelPair(policy, self.reference), self.tokenizer, self.prompt_ids,
                           num_samples=self.samples_per_prompt, sample_reference=False, reward=self.reward,
                           prompts=self.prompts, columns=self.columns, **self.sampling)
        self.seconds += time.perf_counter() - started
        return rewards_point(measured.policy_rewards, self.samples_per_prompt, method=method, budget=budget,
                             seed=self.seed, step=step, n=None, kl=measured.kl.mean, kl_stderr=measured.kl.stderr,
                             **budgets)

    def reference_samples(self, n: int) -> dict[str, Any]:
        """n samples per held-out prompt from the reference (another sampling seed than the point's), with their
        ground truth: what best-of-N chooses among."""
        started = time.perf_counter()
        samples = sample(self.reference, self.tokenizer, self.prompt_ids, num_samples=n,
                         max_new_tokens=self.sampling["max_new_tokens"], seed=self.seed + 13)
        seconds = time.perf_counter() - started
        return {"per_prompt": n, "texts": [s.text for s in samples], "rewards": self.judged(samples),
                "seconds": seconds}


def rewards_point(rewards: Sequence[float], samples_per_prompt: int, **fields: Any) -> Point:
    """A Point from per-sample rewards (prompt-major, `samples_per_prompt` each): mean, stderr clustered by prompt
    (sd_i(m_i) / sqrt(n_prompts)), and the per-prompt means m_i."""
    means = prompt_means(list(rewards), samples_per_prompt)
    return Point(reward=statistics.fmean(rewards), reward_stderr=stderr(means), prompt_rewards=means, **fields)


def powers_of_two(largest: int) -> list[int]:
    """1, 2, 4, ... up to `largest` (itself included when it is not a power of two)."""
    values = [2**i for i in range(int(math.log2(largest)) + 1)]
    return values if values[-1] == largest else [*values, largest]


def best_of_n_choice(scores: Sequence[float], truths: Sequence[float], per_prompt: int, n: int) -> list[float]:
    """For each prompt, the ground truth of the sample among its first n that the reward model scores highest
    (the first such on a tie): (n_prompts * per_prompt,) -> (n_prompts,)."""
    chosen = []
    for start in range(0, len(scores), per_prompt):
        window = range(start, start + n)
        best = max(window, key=lambda i: (scores[i], -i))
        chosen.append(truths[best])
    return chosen


def best_of_n_points(scores: Sequence[float], samples: dict[str, Any], largest: int, budget: int, seed: int,
                     score_seconds: float) -> list[Point]:
    """Best-of-N for N in `powers_of_two(largest)`: each prompt's highest-scored sample of its first N, judged by the
    ground truth; KL the analytic log N - (N - 1) / N, an upper bound on the true KL (Beirami et al. 2024,
    arXiv:2401.01879). A point's time and queries are those of its N samples per prompt."""
    per_prompt, truths = samples["per_prompt"], samples["rewards"]
    prompts = len(truths) // per_prompt
    points = []
    for n in powers_of_two(largest):
        chosen = best_of_n_choice(scores, truths, per_prompt, n)
        used = n * prompts
        share = n / per_prompt
        points.append(Point("best-of-N", budget, seed, None, n, math.log(n) - (n - 1) / n, 0.0,
                            statistics.fmean(chosen), stderr(chosen), (samples["seconds"] + score_seconds) * share,
                            used, used, budget, prompt_rewards=chosen))
    return points
