"""The study's statistics, pure functions of its points: intervals over seeds, the matched-KL choice, the paired
difference of two methods, where one overtakes the other, and the decision over a user's constraints.

Intervals over seeds are Student-t intervals: mean +- t(0.975, n - 1) * sd / sqrt(n) over the n seeds' values
(sd with n - 1 in its denominator), each seed's value one number (its held-out mean reward). A seed varies the label
subset, the initialisation order and the sampling, so the interval is over all three; the held-out prompts are the
same for every seed. Within a seed, two methods' rewards are paired by prompt (`evaluation.measure.paired_gain`).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from preftune.evaluation.measure import stderr
from preftune.study.methods import Point

Z_95 = 1.959963984540054  # the standard normal's 0.975 quantile


def t_pdf(x: float, df: int) -> float:
    """Student's t density with `df` degrees of freedom."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, steps: int = 4000) -> float:
    """P(T <= x) for x >= 0: 1/2 + the density's integral over [0, x] (Simpson's rule, `steps` even)."""
    h = x / steps
    inner = sum((4 if i % 2 else 2) * t_pdf(i * h, df) for i in range(1, steps))
    return 0.5 + h / 3 * (t_pdf(0.0, df) + inner + t_pdf(x, df))


@functools.cache  # a report asks for the same few quantiles hundreds of times (each bisection: ~60 integrals)
def t_quantile(p: float, df: int) -> float:
    """The p quantile (p > 1/2) of Student's t with `df` degrees of freedom, by bisection on `t_cdf`."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval; n: how many values (seeds) it is over. low/high NaN: no interval (n = 1)."""

    mean: float
    low: float
    high: float
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "n/a"
        if math.isnan(self.low):
            return f"{self.mean:+.{digits}f}"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def seed_interval(values: Sequence[float]) -> Interval:
    """mean +- t(0.975, n - 1) * sd / sqrt(n) of per-seed values; one value: no interval; none: n = 0."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = t_quantile(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


Select = Callable[[Sequence[Point]], Point | None]


def last_point(points: Sequence[Point]) -> Point | None:
    """A unit's last point: its most steps (best-of-N: its largest N)."""
    return max(points, key=lambda p: (p.step or 0, p.n or 0)) if points else None


def best_within(kl_budget: float) -> Select:
    """The matched-KL choice (as Tang et al. 2024 compare online and offline methods): among a unit's points
    whose KL(policy || reference) estimate is at most `kl_budget`, the one of highest held-out reward (None if
    none is within it)."""

    def select(points: Sequence[Point]) -> Point | None:
        within = [p for p in points if p.kl <= kl_budget]
        return max(within, key=lambda p: p.reward) if within else None

    return select


def by_unit(points: Iterable[Point]) -> dict[tuple[str, int | None, int], list[Point]]:
    """Points grouped by (method, budget, seed)."""
    groups: dict[tuple[str, int | None, int], list[Point]] = {}
    for p in points:
        groups.setdefault((p.method, p.budget, p.seed), []).append(p)
    return groups


def chosen_per_seed(points: Iterable[Point], method: str, budget: int | None, select: Select) -> dict[int, Point]:
    """For each seed, the point `select` picks among the unit (method, budget, seed)'s points (seeds where it
    picks none left out)."""
    chosen = {}
    for (m, b, seed), group in by_unit(points).items():
        if m == method and b == budget and (point := select(group)) is not None:
            chosen[seed] = point
    return chosen


def cell(points: Iterable[Point], method: str, budget: int | None, select: Select) -> Interval:
    """The interval over seeds of the chosen points' held-out rewards."""
    chosen = chosen_per_seed(points, method, budget, select)
    return seed_interval([chosen[s].reward for s in sorted(chosen)])


@dataclass(frozen=True)
class Difference:
    """a - b paired: per seed the mean over prompts of a's minus b's per-prompt reward; `interval` over seeds
    (one seed: +- 1.96 of its prompt-paired stderr); `prompt_stderr`: the prompts' share of the mean's error,
    sqrt(sum_s se_s^2) / n with se_s the seed's paired-by-prompt standard error."""

    interval: Interval
    prompt_stderr: float


def paired_difference(a: dict[int, Point], b: dict[int, Point]) -> Difference:
    """a - b over the seeds both have, each seed paired by prompt (the same held-out prompts in both)."""
    seeds = sorted(set(a) & set(b))
    means, errors = [], []
    for seed in seeds:
        differences = [x - y for x, y in zip(a[seed].prompt_rewards, b[seed].prompt_rewards, strict=True)]
        means.append(statistics.fmean(differences))
        errors.append(stderr(differences))
    if not seeds:
        return Difference(Interval(math.nan, math.nan, math.nan, 0), math.nan)
    prompt_stderr = math.sqrt(sum(e * e for e in errors)) / len(seeds)
    if len(seeds) == 1:
        mean = means[0]
        return Difference(Interval(mean, mean - Z_95 * errors[0], mean + Z_95 * errors[0], 1), prompt_stderr)
    return Difference(seed_interval(means), prompt_stderr)


def overtakes(differences: dict[int, Difference]) -> tuple[int | None, int | None]:
    """From DPO - M per budget: the first budget where M is ahead with 95% confidence (the interval's upper end
    below 0), and the first where M's mean is ahead (the mean below 0); None: not within the budgets."""
    budgets = sorted(differences)
    sure = next((b for b in budgets if differences[b].interval.high < 0), None)
    mean = next((b for b in budgets if differences[b].interval.mean < 0), None)
    return sure, mean


@dataclass(frozen=True)
class Option:
    """A method at a budget, as the decision table weighs it (costs: the mean over seeds, the reward model's
    included for the methods that use it)."""

    method: str
    budget: int  # labels it needs (0: none)
    reward: Interval
    peak_gb: float
    minutes: float
    samples: bool  # needs sampling (online methods, best-of-N)
    ground_truth: bool  # calls the ground truth during training


@dataclass(frozen=True)
class Constraints:
    labels: int
    memory_gb: float | None  # None: no limit
    minutes: float | None
    ground_truth: bool  # the ground truth may be called during training
    sampling: bool  # sampling from the model is allowed


def allowed(option: Option, limits: Constraints) -> bool:
    return (option.budget <= limits.labels and (limits.memory_gb is None or option.peak_gb <= limits.memory_gb)
            and (limits.minutes is None or option.minutes <= limits.minutes)
            and (limits.ground_truth or not option.ground_truth) and (limits.sampling or not option.samples))


def decide(options: Sequence[Option], limits: Constraints) -> Option | None:
    """The allowed option of highest mean held-out reward (None: none is allowed)."""
    fits = [o for o in options if allowed(o, limits) and o.reward.n > 0]
    return max(fits, key=lambda o: o.reward.mean) if fits else None
