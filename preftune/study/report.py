"""What `preftune study` writes, every number computed from the unit records (study/stats.py does the statistics):

- records.json: every point (with its per-prompt rewards) and cost, and the budgets the tables are over;
- points.csv: every point of every unit, with its gain over the seed's reference paired by prompt;
- label_efficiency.png: held-out reward against label budget, a line per method with its 95% band over seeds, at
  the last point and at each matched KL budget; reward_kl.png: reward against KL, every point of every seed;
- gains.md: per method and budget, the gain over the reference at the last point (paired by prompt, over seeds);
- matched_kl.md/.csv: per method and budget, the last point's and each KL budget's best reward over seeds;
- differences.md: per budget, DPO minus each RLHF method, paired by seed and by prompt;
- costs.md/.csv: per method and budget, training and wall time, peak RSS, models held, completions sampled,
  reward queries and labels (means over seeds);
- decision.md: for constraints a user has, the method of highest held-out reward within them;
- summary.md: sentences generated from those numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from preftune.config import Config, number_list
from preftune.study.methods import Cost, Point
from preftune.study.stats import (
    Constraints,
    Difference,
    Interval,
    Option,
    Select,
    best_within,
    cell,
    chosen_per_seed,
    decide,
    last_point,
    overtakes,
    paired_difference,
    seed_interval,
)

REFERENCE = "reference"
REWARD_MODEL = "reward model"
ACCESS = ((False, False, "offline: no sampling"), (True, False, "sampling, reward model only"),
          (True, True, "sampling and the ground truth"))


@dataclasses.dataclass
class Study:
    """The records of a study, and what the report reads of its config."""

    points: list[Point]
    costs: list[Cost]
    budgets: list[int]
    kl_budgets: list[float]
    dpo: str  # the DPO row the differences are taken against (the first beta)

    @property
    def methods(self) -> list[str]:
        """The methods with points, in the order first seen (the reference left out)."""
        return list(dict.fromkeys(p.method for p in self.points if p.method != REFERENCE))

    def budgets_of(self, method: str) -> list[int | None]:
        return sorted({p.budget for p in self.points if p.method == method}, key=lambda b: -1 if b is None else b)

    def selections(self) -> list[tuple[str, Select]]:
        return [("last point", last_point)] + [(f"KL <= {k:g}", best_within(k)) for k in self.kl_budgets]

    def rlhf(self) -> list[str]:
        """The methods compared with DPO: those that learn from the same labels through a reward model."""
        users = {c.method for c in self.costs if c.uses_reward_model}
        return [m for m in self.methods if m in users]

    def ceilings(self) -> list[str]:
        """Methods that use no labels (trained on the ground truth)."""
        return [m for m in self.methods if self.budgets_of(m) == [None]]


def with_gains(points: list[Point]) -> list[Point]:
    """Each point's gain over its seed's reference, paired by prompt: mean_i and sd_i / sqrt(n) of m_i - r_i."""
    from preftune.evaluation.measure import stderr

    references = {p.seed: p for p in points if p.method == REFERENCE}
    for p in points:
        reference = references.get(p.seed)
        if reference is not None and len(reference.prompt_rewards) == len(p.prompt_rewards):
            differences = [x - y for x, y in zip(p.prompt_rewards, reference.prompt_rewards)]
            p.gain, p.gain_stderr = statistics.fmean(differences), stderr(differences)
    return points


def write_csv(path: Path, records: Sequence, leave_out: tuple[str, ...] = ()) -> None:
    columns = [f.name for f in dataclasses.fields(records[0]) if f.name not in leave_out] if records else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([getattr(record, c) for c in columns] for record in records)


def budget_text(budget: int | None) -> str:
    return "none (ground truth)" if budget is None else str(budget)


def matched_kl_table(study: Study) -> list[str]:
    """Per method and budget: the last point's reward and each KL budget's best, over seeds."""
    names = [name for name, _ in study.selections()]
    lines = ["| method | labels | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for method in study.methods:
        for budget in study.budgets_of(method):
            cells = [cell(study.points, method, budget, select) for _, select in study.selections()]
            lines.append(f"| {method} | {budget_text(budget)} | " + " | ".join(
                f"{c.text()} ({plural(c.n, 'seed')})" for c in cells) + " |")
    return lines


def gain_interval(study: Study, method: str, budget: int | None) -> Interval:
    """The gain over the reference at the method's last point (paired by prompt within a seed), over seeds."""
    return seed_interval([p.gain for p in chosen_per_seed(study.points, method, budget, last_point).values()
                          if not math.isnan(p.gain)])


def gains_table(study: Study) -> list[str]:
    """Per method and budget: the gain over the reference at the last point (each seed's paired by prompt, then
    the 95% interval over seeds), and the seeds' KL there: whether a method learned anything measurable."""
    lines = ["| method | labels | gain over the reference (last point) | KL (nats, mean over seeds) |",
             "|---|---|---|---|"]
    for method in study.methods:
        for budget in study.budgets_of(method):
            chosen = chosen_per_seed(study.points, method, budget, last_point).values()
            kl = statistics.fmean([p.kl for p in chosen]) if chosen else math.nan
            lines.append(f"| {method} | {budget_text(budget)} | {gain_interval(study, method, budget).text()} | "
                         f"{kl:.2f} |")
    return lines


def gains_sentence(study: Study) -> str:
    """Which (method, budget) gained over the reference with 95% confidence over seeds, or that none did."""
    above = [f"{m} at {budget_text(b)} labels ({iv.text()})" for m in study.methods for b in study.budgets_of(m)
             if (iv := gain_interval(study, m, b)).n > 1 and iv.low > 0]
    if above:
        return "Gains over the reference above 0 with 95% confidence over seeds: " + "; ".join(above) + "."
    return ("No method's gain over the reference at its last point is above 0 with 95% confidence over seeds, at "
            "any budget: within these budgets and steps the measurement does not tell any method from the "
            "reference (the gains' table).")


def differences(study: Study, method: str, select: Select) -> dict[int, Difference]:
    """DPO minus `method` at each budget both have, paired by seed and by prompt."""
    return {budget: paired_difference(chosen_per_seed(study.points, study.dpo, budget, select),
                                      chosen_per_seed(study.points, method, budget, select))
            for budget in study.budgets if budget in study.budgets_of(method)}


def differences_table(study: Study) -> list[str]:
    names = [name for name, _ in study.selections()]
    lines = ["| labels | DPO minus | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for method in study.rlhf():
        tables = [differences(study, method, select) for _, select in study.selections()]
        for budget in study.budgets:
            if budget in tables[0]:
                lines.append(f"| {budget} | {method} | " + " | ".join(
                    f"{t[budget].interval.text()} (prompts' se {t[budget].prompt_stderr:.3f})" for t in tables) + " |")
    return lines


def cost_of(study: Study, method: str, budget: int | None) -> dict[str, float]:
    """Means over seeds of a unit's costs (peak RSS: the largest), the reward model's time added where used."""
    rows = [c for c in study.costs if c.method == method and c.budget == budget]
    uses = bool(rows) and rows[0].uses_reward_model
    model = [c for c in study.costs if c.method == REWARD_MODEL and c.budget == budget] if uses else []

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else 0.0

    return {"train": mean([c.train_seconds for c in rows]), "wall": mean([c.wall_seconds for c in rows]),
            "model_train": mean([c.train_seconds for c in model]), "model_wall": mean([c.wall_seconds for c in model]),
            "peak": max([c.peak_rss_bytes for c in rows + model], default=0) / 1e9,
            "completions": mean([c.completions for c in rows]), "queries": mean([c.reward_queries for c in rows]),
            "labels": mean([c.labels for c in rows])}


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s" if seconds >= 60 else f"{seconds:.0f} s"


def costs_table(study: Study) -> list[str]:
    lines = ["| method | labels | training time | process wall time | peak RSS | models held | completions sampled | "
             "reward queries | labels used |", "|---|---|---|---|---|---|---|---|---|"]
    for method in [REWARD_MODEL, *study.methods]:
        rows = [c for c in study.costs if c.method == method]
        for budget in sorted({c.budget for c in rows}, key=lambda b: -1 if b is None else b):
            c, first = cost_of(study, method, budget), next(r for r in rows if r.budget == budget)
            plus = f" + reward model {minutes(c['model_train'])}" if first.uses_reward_model else ""
            lines.append(f"| {method} | {budget_text(budget)} | {minutes(c['train'])}{plus} | "
                         f"{minutes(c['wall'] + c['model_wall'])} | {c['peak']:.2f} GB | {first.model_copies} "
                         f"({first.copies}) | {c['completions']:.0f} | {c['queries']:.0f} | {c['labels']:.0f} |")
    return lines


def headline_table(study: Study, budget: int) -> list[str]:
    """One label budget, a row a method: its last point and its gain over the reference there, its best within the
    middle KL budget (95% intervals over seeds), DPO minus it at its last point (paired by seed and prompt), and
    its cost with its reward model's."""
    name, select = study.selections()[1 + (len(study.kl_budgets) - 1) // 2 if study.kl_budgets else 0]
    lines = [f"| method | held-out reward, last point | gain over the reference | best within {name} | DPO minus it "
             "(last point) | wall time | peak RSS |", "|---|---|---|---|---|---|---|"]
    for method in study.methods:
        if budget not in study.budgets_of(method):
            continue
        difference = ("" if method == study.dpo or method not in study.rlhf()
                      else differences(study, method, last_point)[budget].interval.text())
        c = cost_of(study, method, budget)
        lines.append(f"| {method} | {cell(study.points, method, budget, last_point).text()} | "
                     f"{gain_interval(study, method, budget).text()} | "
                     f"{cell(study.points, method, budget, select).text()} | {difference} | "
                     f"{minutes(c['wall'] + c['model_wall'])} | {c['peak']:.2f} GB |")
    return lines


def options(study: Study) -> list[Option]:
    """Every (method, budget) with its last point's reward and its costs (the reward model's included)."""
    samples = {c.method: c.completions > 0 for c in study.costs}
    trains_on_truth = set(study.ceilings())
    result = []
    for method in [REFERENCE, *study.methods]:
        for budget in study.budgets_of(method):
            c = cost_of(study, method, budget)
            result.append(Option(method, budget or 0, cell(study.points, method, budget, last_point), c["peak"],
                                 (c["wall"] + c["model_wall"]) / 60, samples.get(method, False),
                                 method in trains_on_truth))
    return result


def constraint_rows(study: Study) -> list[Constraints]:
    """Labels available (each budget) x access (no sampling; sampling with the reward model; the ground truth too)
    x resources (any; no more memory and wall time than DPO needs at that budget)."""
    rows = []
    for budget in study.budgets:
        dpo = cost_of(study, study.dpo, budget)
        for sampling, truth, _ in ACCESS:
            rows.append(Constraints(budget, None, None, truth, sampling))
            if dpo["wall"]:
                rows.append(Constraints(budget, dpo["peak"], dpo["wall"] / 60, truth, sampling))
    return rows


def decision_table(study: Study) -> list[str]:
    lines = ["| labels available | memory | wall time | sampling | ground truth in training | best method | "
             "held-out reward (last point, 95% CI over seeds) | labels it uses |", "|---|---|---|---|---|---|---|---|"]
    every = options(study)
    for limits in constraint_rows(study):
        best = decide(every, limits)
        memory = "any" if limits.memory_gb is None else f"<= {limits.memory_gb:.2f} GB"
        time_limit = "any" if limits.minutes is None else f"<= {minutes(limits.minutes * 60)}"
        answer = ("none fits", "", "") if best is None else (best.method, best.reward.text(), str(best.budget))
        lines.append(f"| {limits.labels} | {memory} | {time_limit} | {'yes' if limits.sampling else 'no'} | "
                     f"{'yes' if limits.ground_truth else 'no'} | " + " | ".join(answer) + " |")
    return lines


def overtaking_sentence(study: Study, method: str) -> str:
    budgets = sorted(differences(study, method, last_point))
    if not budgets:
        return ""
    sure, mean = overtakes(differences(study, method, last_point))
    span = f"{budgets[0]}-{budgets[-1]} labels" if len(budgets) > 1 else f"{budgets[0]} labels"
    if sure is not None:
        return (f"{method} overtakes DPO at {sure} labels: DPO minus {method} is "
                f"{differences(study, method, last_point)[sure].interval.text()}, its interval below 0.")
    if mean is not None:
        return (f"{method}'s mean passes DPO's at {mean} labels (DPO minus {method} "
                f"{differences(study, method, last_point)[mean].interval.text()}), but no interval within {span} is "
                "below 0: it does not overtake DPO with 95% confidence within the budgets run.")
    return (f"{method} does not overtake DPO within the budgets run ({span}): its mean is not above DPO's at any "
            "of them.")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summary_lines(study: Study, seeds: int) -> list[str]:
    """The summary's sentences, each from the numbers of the tables."""
    top = max(study.budgets)
    reference = seed_interval([p.reward for p in study.points if p.method == REFERENCE])
    lines = [f"Held-out reward of the reference (no training): {reference.text()} over {plural(reference.n, 'seed')}. "
             f"Intervals are 95% Student-t intervals over {plural(seeds, 'seed')} (mean +- t(0.975, n-1) sd / "
             "sqrt(n)); with one seed, +- 1.96 of the prompts' paired standard error for differences, none for means.",
             ""]
    lines += [gains_sentence(study), ""]
    dpo = cell(study.points, study.dpo, top, last_point)
    lines.append(f"With {top} labels, {study.dpo} reached {dpo.text()} at its last point.")
    for method in study.rlhf():
        here = cell(study.points, method, top, last_point)
        difference = differences(study, method, last_point).get(top)
        if difference is not None:
            lines.append(f"- {method}: {here.text()}; DPO minus {method}: {difference.interval.text()}.")
    lines.append("")
    lines += [f"- {sentence}" for method in study.rlhf() if (sentence := overtaking_sentence(study, method))]
    for method in study.ceilings():
        ceiling = cell(study.points, method, None, last_point)
        lines.append(f"- {method} (trained on the ground truth, no labels): {ceiling.text()}.")
    lines.append("")
    for name, select in study.selections()[1:]:
        cells = [(m, cell(study.points, m, top, select)) for m in study.methods if top in study.budgets_of(m)]
        cells = [(m, c) for m, c in cells if c.n > 0]
        if cells:
            method, best = max(cells, key=lambda item: item[1].mean)
            lines.append(f"- Within {name} nats at {top} labels, the highest held-out reward is {method}'s "
                         f"{best.text()}.")
        else:
            lines.append(f"- Within {name} nats at {top} labels, no method has a point.")
    lines.append("")
    dpo_cost = cost_of(study, study.dpo, top)
    for method in study.rlhf():
        c = cost_of(study, method, top)
        wall = c["wall"] + c["model_wall"]
        if dpo_cost["wall"]:
            lines.append(f"- At {top} labels {method} took {minutes(wall)} of wall time with its reward model "
                         f"({wall / dpo_cost['wall']:.1f}x DPO's {minutes(dpo_cost['wall'])}) and {c['peak']:.2f} GB "
                         f"peak RSS (DPO {dpo_cost['peak']:.2f} GB).")
    every = options(study)
    for sampling, truth, access in ACCESS:
        best = decide(every, Constraints(top, None, None, truth, sampling))
        if best is not None:
            lines.append(f"- With {top} labels, {access}: {best.method} ({best.reward.text()}).")
    return lines


def plot_label_efficiency(study: Study, output: Path) -> None:
    """Held-out reward against label budget, a line per method with its 95% band over seeds; one panel per
    selection (last point, each KL budget); the reference and the ground-truth ceilings as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selections = study.selections()
    figure, axes = plt.subplots(1, len(selections), figsize=(5 * len(selections), 4.5), squeeze=False,
                                constrained_layout=True)
    reference = seed_interval([p.reward for p in study.points if p.method == REFERENCE])
    for axis, (name, select) in zip(axes[0], selections):
        for method in study.methods:
            budgets = [b for b in study.budgets_of(method) if b is not None]
            cells = [cell(study.points, method, b, select) for b in budgets]
            shown = [(b, c) for b, c in zip(budgets, cells) if c.n > 0]
            if shown:
                line, = axis.plot([b for b, _ in shown], [c.mean for _, c in shown], marker="o", label=method)
                banded = [(b, c) for b, c in shown if not math.isnan(c.low)]
                axis.fill_between([b for b, _ in banded], [c.low for _, c in banded], [c.high for _, c in banded],
                                  color=line.get_color(), alpha=0.2)
            elif budgets == [] and (ceiling := cell(study.points, method, None, select)).n:
                axis.axhline(ceiling.mean, linestyle="--", linewidth=1, label=f"{method} (no labels)")
        if reference.n:
            axis.axhline(reference.mean, color="black", linestyle=":", linewidth=1, label="reference")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("labelled pairs (label budget)")
        axis.set_ylabel("held-out ground-truth reward")
        axis.set_title(name, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.savefig(output, dpi=100)
    plt.close(figure)


def plot_reward_kl(study: Study, output: Path) -> None:
    """Every point of every seed: held-out reward against KL(policy || reference); marker size grows with the
    label budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    largest = max(study.budgets)
    for method in [REFERENCE, *study.methods]:
        group = [p for p in study.points if p.method == method]
        sizes = [12 + 60 * (p.budget or largest) / largest for p in group]
        axis.scatter([p.kl for p in group], [p.reward for p in group], s=sizes, alpha=0.6, label=method,
                     color="black" if method == REFERENCE else None)
    for k in study.kl_budgets:
        axis.axvline(k, color="grey", linestyle=":", linewidth=0.8)
    axis.set_xlabel("KL(policy || reference), nats per completion (dotted: the KL budgets)")
    axis.set_ylabel("held-out ground-truth reward")
    axis.set_title("Reward vs KL, every point of every seed (larger: more labels)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.savefig(output, dpi=100)
    plt.close(figure)


def study_of(records: dict) -> Study:
    """The Study of a `records.json` (what `write_report` writes first): the docs' results page is rendered from
    it (docs/generate.py) with the same tables and plots as the study's own report."""
    return Study(with_gains([Point(**p) for p in records["points"]]), [Cost(**c) for c in records["costs"]],
                 records["budgets"], records["kl_budgets"], records["dpo"])


def report_tables(study: Study, seeds: int) -> dict[str, list[str]]:
    """Every markdown table of the report and the summary, by file name."""
    tables = {"gains.md": gains_table(study), "matched_kl.md": matched_kl_table(study),
              "differences.md": differences_table(study), "costs.md": costs_table(study)}
    if study.dpo in study.methods:
        tables["decision.md"] = decision_table(study)
        tables["summary.md"] = summary_lines(study, seeds)
    else:
        tables["summary.md"] = [f"{study.dpo} was not run (--methods): no comparison with DPO to summarise."]
    return tables


def write_report(points: list[Point], costs: list[Cost], config: Config, folder: Path) -> None:
    """records.json (every point and cost, the input of every table), then every table, plot and the summary,
    into `folder`."""
    betas = number_list(config.study.betas)
    seeds = len(number_list(config.study.seeds, int))
    records = {"budgets": sorted(number_list(config.study.label_budgets, int)),
               "kl_budgets": number_list(config.study.kl_budgets), "dpo": f"DPO beta={betas[0]:g}", "seeds": seeds,
               "points": [dataclasses.asdict(p) for p in points], "costs": [dataclasses.asdict(c) for c in costs]}
    (folder / "records.json").write_text(json.dumps(records) + "\n")
    study = study_of(records)
    write_csv(folder / "points.csv", study.points, leave_out=("prompt_rewards",))
    write_csv(folder / "costs.csv", costs)
    for name, lines in report_tables(study, seeds).items():
        (folder / name).write_text("\n".join(lines) + "\n")
    plot_label_efficiency(study, folder / "label_efficiency.png")
    plot_reward_kl(study, folder / "reward_kl.png")
