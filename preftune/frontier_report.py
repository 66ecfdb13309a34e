"""What `preftune frontier` writes: the points' table, the cost table, the reward-KL plot and the sample-efficiency
plot (held-out reward against each budget a method spends)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from preftune.frontier_methods import Cost, Point

# methods drawn with their own style; the others (the DPO betas) take solid lines with circles
STYLES = {
    "best-of-N": {"marker": "s", "linestyle": "--"},
    "Preferred-FT": {"marker": "^", "linestyle": ":"},
    "PPO": {"marker": "D", "linestyle": "-."},
    "PPO-GT": {"marker": "d", "linestyle": "-."},
    "RLOO": {"marker": "v", "linestyle": "-."},
    "online DPO": {"marker": "P", "linestyle": "-"},
}
BUDGETS = (  # (Point field, axis label) of the sample-efficiency panels
    ("seconds", "training wall time, s (reward model's included)"),
    ("completions", "completions sampled for training"),
    ("reward_queries", "reward queries (ground truth or reward model)"),
    ("labels", "preference labels consumed"),
)


def write_csv(path: Path, records: list) -> None:
    """Dataclass records as CSV, one column per field."""
    columns = [f.name for f in dataclasses.fields(records[0])] if records else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([getattr(record, c) for c in columns] for record in records)


def write_table(points: list[Point], folder: Path) -> None:
    """frontier.csv (every field) and frontier.md: KL, mean reward and gain over the reference, each +- its standard
    error (clustered by prompt; the gain's paired by prompt)."""
    write_csv(folder / "frontier.csv", points)
    lines = ["| method | steps | N | KL (nats) | mean reward | gain over the reference (paired by prompt) |",
             "|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.method} | {'' if p.step is None else p.step} | {'' if p.n is None else p.n} | "
                     f"{p.kl:.2f} +- {p.kl_stderr:.2f} | {p.reward:+.3f} +- {p.reward_stderr:.3f} | "
                     f"{p.gain:+.3f} +- {p.gain_stderr:.3f} |")
    (folder / "frontier.md").write_text("\n".join(lines) + "\n")


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s" if seconds >= 60 else f"{seconds:.0f} s"


def reward_model_seconds(costs: list[Cost]) -> float:
    return next((c.train_seconds for c in costs if c.method == "reward model"), 0.0)


def write_costs(costs: list[Cost], points: list[Point], folder: Path) -> None:
    """costs.csv (every field) and costs.md: one row per method with its last point's held-out reward and KL."""
    write_csv(folder / "costs.csv", costs)
    lines = ["| method | training time | process wall time | peak RSS | models held | completions sampled | "
             "reward queries | preference labels | last point: reward, KL |", "|---|---|---|---|---|---|---|---|---|"]
    for cost in costs:
        own = [p for p in points if p.method == cost.method or (cost.method == "best-of-N" and p.method == "reference")]
        last = max(own, key=lambda p: (p.step or 0, p.n or 0)) if own else None
        result = "" if last is None else f"{last.reward:+.3f} +- {last.reward_stderr:.3f}, {last.kl:.2f} nats"
        if cost.method == "reward model" and cost.extra.get("held_out_accuracy") is not None:
            result = (f"held-out accuracy {cost.extra['held_out_accuracy']:.3f} +- "
                      f"{cost.extra['held_out_accuracy_stderr']:.3f}")
        time_text = minutes(cost.train_seconds) + (" + reward model" if cost.uses_reward_model else "")
        lines.append(f"| {cost.method} | {time_text} | {minutes(cost.wall_seconds)} | "
                     f"{cost.peak_rss_bytes / 1e9:.2f} GB | {cost.model_copies} ({cost.copies}) | {cost.completions} | "
                     f"{cost.reward_queries} | {cost.labels} | {result} |")
    (folder / "costs.md").write_text("\n".join(lines) + "\n")


def plot_frontier(points: list[Point], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    methods = list(dict.fromkeys(p.method for p in points if p.method != "reference"))
    for method in methods:
        group = sorted((p for p in points if p.method == method), key=lambda p: p.kl)
        axis.errorbar([p.kl for p in group], [p.reward for p in group], xerr=[p.kl_stderr for p in group],
                      yerr=[p.reward_stderr for p in group], label=method, capsize=2,
                      **STYLES.get(method, {"marker": "o", "linestyle": "-"}))
    for p in points:
        if p.method == "reference":
            axis.scatter([p.kl], [p.reward], color="black", zorder=5, label="reference (KL 0)")
    axis.set_xlabel("KL(policy || reference), nats per completion")
    axis.set_ylabel("mean ground-truth reward (VADER compound)")
    axis.set_title("Reward vs KL on held-out prompts (higher and further left is better)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.savefig(output, dpi=110)
    plt.close(figure)


def plot_sample_efficiency(points: list[Point], costs: list[Cost], output: Path) -> None:
    """Held-out reward (with its standard error) against each budget, one panel per budget; the reward model's
    training time is added to the time of the methods that optimise against it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra_seconds = reward_model_seconds(costs)
    uses_reward_model = {c.method for c in costs if c.uses_reward_model}
    reference = next((p for p in points if p.method == "reference"), None)
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    methods = list(dict.fromkeys(p.method for p in points if p.method != "reference"))
    for axis, (budget, label) in zip(axes.flat, BUDGETS):
        for method in methods:
            group = [p for p in points if p.method == method]
            spent = [getattr(p, budget) + (extra_seconds if budget == "seconds" and method in uses_reward_model
                                           else 0) for p in group]
            order = sorted(range(len(group)), key=lambda i: spent[i])
            axis.errorbar([spent[i] for i in order], [group[i].reward for i in order],
                          yerr=[group[i].reward_stderr for i in order], label=method, capsize=2,
                          **STYLES.get(method, {"marker": "o", "linestyle": "-"}))
        if reference is not None:
            axis.axhline(reference.reward, color="black", linewidth=0.8, linestyle=":", label="reference")
        axis.set_xlabel(label)
        axis.set_ylabel("held-out mean ground-truth reward")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle("What each method spends for its held-out reward (default job, 2 CPU cores)", fontsize=11)
    figure.savefig(output, dpi=100)
    plt.close(figure)
