"""Win rates of a policy over its reference under a ground-truth reward, with KL(policy || reference).

Each prompt is sampled from both models (same seed, same count), each sample scored by the reward, and sample i
of the policy compared with sample i of the reference: a win counts 1, a tie 1/2. The 95% interval is the normal
approximation, mean +- 1.96 * s / sqrt(n), with s the sample standard deviation of those outcomes. KL(policy ||
reference) is estimated from the policy's own samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from preftune.data.read import PromptRecord
from preftune.evaluation.measure import ModelPair, measure
from preftune.forward.rewards import RewardFunction


@dataclass
class WinRate:
    rate: float  # wins + ties / 2, over comparisons
    low: float  # 95% interval, clipped to [0, 1]
    high: float
    wins: int
    ties: int
    losses: int


def win_rate(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> WinRate:
    """Pairwise comparison of sample i of the policy with sample i of the reference; ties count half."""
    outcomes = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_rewards, reference_rewards,
                                                                        strict=True)]
    n = len(outcomes)
    rate = statistics.fmean(outcomes)
    half_width = 1.96 * statistics.stdev(outcomes) / math.sqrt(n) if n > 1 else float("nan")
    return WinRate(rate, max(0.0, rate - half_width), min(1.0, rate + half_width), outcomes.count(1.0),
                   outcomes.count(0.5), outcomes.count(0.0))


def judge(
    models: ModelPair, tokenizer, prompts: Sequence[PromptRecord], prompt_ids: Sequence[Sequence[int]],
    reward: RewardFunction, *, num_samples: int, max_new_tokens: int, batch_size: int, seed: int, reward_name: str,
) -> tuple[dict, list[dict]]:
    """The win rate of `models.policy` over its reference, and KL(policy || reference): a summary and one record
    per comparison. The reward gets each prompt record's other columns (its answer, ...) as TRL gives them."""
    measured = measure(models, tokenizer, prompt_ids, num_samples=num_samples, max_new_tokens=max_new_tokens,
                       seed=seed, batch_size=batch_size, reward=reward,
                       prompts=[p.prompt for p in prompts], columns=[p.columns for p in prompts])
    policy_rewards, reference_rewards, kl = measured.policy_rewards, measured.reference_rewards, measured.kl
    result = win_rate(policy_rewards, reference_rewards)
    summary = {
        "win_rate": result.rate, "win_rate_95ci": [result.low, result.high], "wins": result.wins,
        "ties": result.ties, "losses": result.losses, "comparisons": len(policy_rewards),
        "policy_reward_mean": statistics.fmean(policy_rewards),
        "reference_reward_mean": statistics.fmean(reference_rewards),
        "kl_policy_reference": kl.mean, "kl_stderr": kl.stderr, "reward": reward_name,
    }
    records = [{"location": prompts[p.prompt_index].location, "sample_index": i % num_samples,
                "policy": p.text, "reference": r.text, "policy_reward": pr, "reference_reward": rr}
               for i, (p, r, pr, rr) in enumerate(zip(measured.policy_samples, measured.reference_samples,
                                                      policy_rewards, reference_rewards))]
    return summary, records
