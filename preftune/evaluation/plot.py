"""`preftune plot RUN_DIR`: training and evaluation curves from a run's metrics.jsonl, as one PNG.

One panel per quantity, each titled with what it shows; train is a solid line and eval a dashed line with dots
in every panel, and chosen / rejected rewards are green / red, so that no legend needs hunting.
"""

from __future__ import annotations

import json
from pathlib import Path

from preftune.errors import UserError

# (panel title, metric names drawn in it); chosen and rejected rewards share a panel to show the gap opening
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("preference accuracy (rewards/accuracies)", ("rewards/accuracies",)),
    ("reward margin (rewards/margins)", ("rewards/margins",)),
    ("implicit rewards: chosen (up) vs rejected (down)", ("rewards/chosen", "rewards/rejected")),
)
# the online recipes (ppo, rloo): the ground-truth score of the rollouts beside the held-out reward, and the KL
ONLINE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward: rollouts' scores (train), held-out samples (eval)", ("objective/scores", "reward")),
    ("KL(policy || reference) per completion, nats", ("objective/kl", "kl")),
    ("score less the KL penalty (objective/rlhf_reward)", ("objective/rlhf_reward",)),
    ("-log pi of the sampled tokens per completion (objective/entropy)", ("objective/entropy",)),
)
COLOURS = {"rewards/chosen": "tab:green", "rewards/rejected": "tab:red"}  # others: blue
TRAIN_STYLE = {"linewidth": 1.5}
EVAL_STYLE = {"marker": "o", "linestyle": "--", "markersize": 4}

def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is it a preftune run folder?)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
    if not rows:
        raise UserError(f"{path}: no logged steps yet")
    return rows


def series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), int | float)]
    return [s for s, _ in points], [v for _, v in points]


def draw(rows: list[dict], title: str):
    """The figure for these metrics rows: one panel per entry of PANELS (ONLINE_PANELS for ppo and rloo runs)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    online = any("objective/scores" in row for row in rows)
    for axis, (panel_title, names) in zip(axes.flat, ONLINE_PANELS if online else PANELS):
        for name in names:
            colour = COLOURS.get(name, "tab:blue")
            prefix = "" if len(names) == 1 or online else f"{name.split('/')[-1]}, "
            for split, key, style in (("train", name, TRAIN_STYLE), ("eval", f"eval_{name}", EVAL_STYLE)):
                steps, values = series(rows, key)
                if steps:
                    axis.plot(steps, values, color=colour, label=f"{prefix}{split}", **style)
        if panel_title == "loss":
            axis.axhline(0.6931, color="grey", linewidth=0.8, linestyle=":")
            axis.annotate("ln 2 (policy = reference)", (0.01, 0.6931), xycoords=("axes fraction", "data"),
                          fontsize=8, color="grey", va="bottom")
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlabel("rollout" if online else "optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    figure.suptitle(title, fontsize=11)
    return figure


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the curves of `run_dir` to `output` (default RUN_DIR/curves.png); returns the PNG's path."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    output = Path(output) if output else run_dir / "curves.png"
    figure = draw(read_metrics(run_dir), f"preftune run {run_dir.name}: train (solid), eval (dashed, dots)")
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
