"""Writes the generated blocks of the documentation's pages: the configuration reference (from the config tree),
the loss table (from `LOSSES`' rows, as `--help` is), the library reference (one mkdocstrings directive per module
of the package) and the results pages (from the committed result files in docs/results/, which
benchmarks/record.py writes).

    python docs/generate.py           # rewrite the generated blocks of every page
    python docs/generate.py --check   # exit 1, naming the stale pages, if a committed page differs

A generated block sits between two markers in a page; the text around it is written by hand:

    <!-- generated: NAME (docs/generate.py writes this block; edit the generator or its inputs) -->
    ...
    <!-- end generated: NAME -->

The pages are committed with their blocks filled, so that they read the same on GitHub, in the sdist and on the
site; tests/test_docs.py fails when a committed block differs from what this script makes of the code and the
result files (a number edited by hand, a result file replaced without regenerating, a changed option or loss).
"""

from __future__ import annotations

import argparse
import ast
import json
import pkgutil
import re
import sys
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
RESULTS = DOCS / "results"
BLOCK = re.compile(
    r"(?P<start><!-- generated: (?P<name>[a-z0-9-]+) \(docs/generate.py writes this block; edit the generator or "
    r"its inputs\) -->\n)(?P<body>.*?)(?P<end><!-- end generated: (?P=name) -->)",
    re.DOTALL,
)
# The package's layers, bottom to top (tests/test_layers.py holds the order): the library reference's sections.
LAYERS = ("errors", "data", "objectives", "config", "runtime", "models", "forward", "evaluation", "tasks",
          "recipes", "study", "commands", "api", "cli")


# ---- the code's own tables ---------------------------------------------------------------------------------------
def config_reference() -> str:
    """Every option once: its flag, YAML key, default and meaning, by section (`preftune.config`)."""
    from preftune.config import reference_markdown

    return reference_markdown()


def cell(text: str) -> str:
    """Text as one Markdown table cell: a single line, literal bars escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def loss_formula(function: Callable) -> str:
    """A loss function's first docstring paragraph: its formula in words (the paper and shapes follow it)."""
    return cell((function.__doc__ or "").strip().split("\n\n")[0])


def loss_options(spec) -> str:
    """The loss options a `LossSpec` row reads, as flags."""
    read = []
    if spec.label_smoothing is not None:
        low, high, low_included = spec.label_smoothing
        read.append(f"`--label-smoothing` in {'[' if low_included else '('}{low:g}, {high:g})")
    if spec.f_divergence is True:
        read.append("`--f-divergence-type`")
    if spec.ld_alpha:
        read.append("`--ld-alpha`")
    if spec.per_pair:
        read.append("`--use-weighting`")
    read += [f"`--{option.replace('_', '-')}`" for option in spec.reads]
    return ", ".join(read)


def loss_table() -> str:
    """One row per `LOSSES` entry: name, what it is (--help's line), the loss per pair, the paper, the options."""
    from preftune.objectives.losses import LOSSES

    lines = ["| `--loss-type` | what it is | loss per pair | paper | options it reads |", "|---|---|---|---|---|"]
    for name, spec in LOSSES.items():
        lines.append(f"| `{name}` | {cell(spec.meaning)} | {loss_formula(spec.function)} | {cell(spec.paper)} | "
                     f"{loss_options(spec)} |")
    return "\n".join(lines) + "\n"


def package_modules() -> list[str]:
    """Every module of the package (a package's `__init__` as the package), layer by layer, bottom to top; the
    package itself, whose members are `preftune.api`'s functions, is the API reference's page."""
    import preftune

    names = [m.name for m in pkgutil.walk_packages(preftune.__path__, "preftune.")]
    unplaced = [name for name in names if name.split(".")[1] not in LAYERS]
    if unplaced:
        raise ValueError(f"modules outside the layers {LAYERS}: {unplaced}")
    return sorted(names, key=lambda name: (LAYERS.index(name.split(".")[1]), name))


def layer_modules(layer: str) -> list[str]:
    """The modules of one layer (a folder's modules, or the one module of that name)."""
    return [name for name in package_modules() if name.split(".")[1] == layer]


def library_layer(layer: str) -> str:
    """One mkdocstrings directive per module of the layer: its public functions, classes and constants."""
    lines = []
    for name in layer_modules(layer):
        lines += [f"::: {name}", "    options:", "      show_submodules: false", ""]
    return "\n".join(lines)


def library_index() -> str:
    """A table of the layers, bottom to top, each page's modules listed."""
    lines = ["| layer | modules |", "|---|---|"]
    for layer in LAYERS:
        modules = ", ".join(f"`{name}`" for name in layer_modules(layer))
        lines.append(f"| [{layer}]({layer}.md) | {modules} |")
    return "\n".join(lines) + "\n"


# ---- the results pages -------------------------------------------------------------------------------------------
def read_result(name: str) -> dict | None:
    """docs/results/NAME.json, the file benchmarks/record.py wrote; None when it is not committed."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def duration(seconds: float) -> str:
    """Whole seconds, cut as `preftune frontier`'s costs.md cuts them: '9 min 14 s'."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    hours, rest = divmod(seconds, 3600)
    return (f"{hours} h " if hours else "") + f"{rest // 60} min {rest % 60} s"


def provenance(result: dict) -> str:
    """When, on what machine and with which command a result was measured."""
    machine = result["machine"]
    rate = machine.get("matmul_fp32_gflops")
    parts = [f"{machine['cores']} CPU cores" + (f" ({machine['cpu']})" if machine.get("cpu") else "")]
    if machine.get("gpu"):
        parts.append(machine["gpu"])
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']:g} GiB of memory")
    parts.append(f"fp32 matmul {rate:g} GFLOP/s measured before the run" if rate is not None
                 else "fp32 matmul rate not recorded")
    versions = ", ".join(f"{key} {machine[key]}" for key in ("python", "torch") if machine.get(key))
    commit = f", code at commit `{machine['commit'][:12]}`" if machine.get("commit") else ""
    lines = [f"Measured on {result['date']} on {', '.join(parts)}; {versions}{commit}. "
             f"The command ({duration(result['wall_seconds'])}):" if result.get("wall_seconds") else
             f"Measured on {result['date']} on {', '.join(parts)}; {versions}{commit}. The command:",
             "", "```bash", result["command"], "```"]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def missing(name: str, command: str) -> str:
    return (f"Not yet recorded: `docs/results/{name}.json` is not committed. Record it with\n\n```bash\n{command}\n"
            "```\n\nthen run `python docs/generate.py`.\n")


def default_job(result: dict) -> str:
    report = result["files"]["sentiment_report.json"]
    per_prompt, prompts = report["samples_per_prompt"], report["held_out_prompts"]
    ref, pol, kl = report["reference_reward"], report["policy_reward"], report["kl_policy_reference"]
    lines = [f"| held-out requests ({prompts} x {per_prompt} samples) | mean reward | std | share positive |",
             "|---|---|---|---|"]
    for label, row in (("reference (the starting model)", ref), ("DPO policy", pol)):
        lines.append(f"| {label} | {row['mean']:+.3f} +- {row['stderr']:.3f} | {row['std']:.3f} | "
                     f"{row['positive_fraction']:.0%} |")
    accuracy = report.get("held_out_preference_accuracy")
    pairs = report.get("held_out_eval", {}).get("num_pairs")
    lines += ["", f"Reward gain **{report['reward_gain']:+.3f} +- {report['reward_gain_stderr']:.3f}** (paired by "
              f"prompt); KL(policy \\|\\| reference) {kl['mean']:.2f} +- {kl['stderr']:.2f} nats per reply"
              + (f"; held-out preference accuracy {accuracy:.3f}" + (f" ({pairs} pairs)" if pairs else "")
                 if accuracy is not None else "")
              + f"; the job took {duration(report['total_seconds'])} by its own count."]
    return provenance(result) + "\n" + "\n".join(lines) + "\n"


def dpo_vs_trl(result: dict) -> str:
    report = result["stdout"]
    settings = report["settings"]
    lines = [f"{settings['model'].split('/')[-1]}, batch {settings['batch_size']}, max_length "
             f"{settings['max_length']}, {settings['steps']} steps a side ({settings['warmup_steps_left_out']} "
             f"warm-up steps left out), {settings['dtype']}, activation checkpointing "
             f"{'on' if settings['activation_checkpointing'] else 'off'} (both sides), preftune's "
             f"`{settings['preftune_batch_layout']}` layout; TRL {report['machine']['trl']}, transformers "
             f"{report['machine']['transformers']}.", "",
             "| mode | TRL s/step | preftune s/step | pairs/s ratio | peak RSS TRL / preftune | MFU TRL / preftune "
             "| max loss difference |", "|---|---|---|---|---|---|---|"]
    for mode, sides in report["modes"].items():
        trl, ours = sides["trl"], sides["preftune"]
        lines.append(f"| {mode} | {trl['median_step_seconds']:.1f} | {ours['median_step_seconds']:.1f} | "
                     f"**{sides['ratios']['pairs_per_second']:.2f}x** | {trl['peak_rss_gb']:.2f} / "
                     f"{ours['peak_rss_gb']:.2f} GB ({sides['ratios']['peak_rss']:.2f}x) | "
                     f"{trl['mfu_of_matmul_peak']:.0%} / {ours['mfu_of_matmul_peak']:.0%} | "
                     f"{sides['max_abs_loss_difference']:.0e} |")
    if report.get("scaling_seconds_per_step"):
        lines += ["", "Seconds per step (live reference; the median of steps 2 and 3 of a 3-step run) and peak RSS "
                  "over max_length and batch size:", "",
                  "| max_length | batch | TRL s/step | preftune s/step | speed ratio | peak RSS TRL / preftune |",
                  "|---|---|---|---|---|---|"]
        for row in report["scaling_seconds_per_step"]:
            lines.append(f"| {row['max_length']} | {row['batch_size']} | {row['trl_seconds']:.2f} | "
                         f"{row['preftune_seconds']:.2f} | {row['speed_ratio']:.2f}x | "
                         f"{row['trl_peak_rss_gb']:.2f} / {row['preftune_peak_rss_gb']:.2f} GB |")
    return provenance(result) + "\n" + "\n".join(lines) + "\n"


def online_vs_trl(result: dict, trainer: str, command: str, objective: str) -> str:
    """An online recipe against its TRL trainer (bench_rloo_vs_trl.py, bench_grpo.py): settings, one row a side,
    the ratios. `objective`: the setting that names the recipe's objective beside the shared ones."""
    report = result["stdout"]
    settings = report["settings"]
    lines = [f"{settings['model'].split('/')[-1]}, {settings['prompts_per_step']} prompts x "
             f"{settings['num_generations']} samples a step, {settings['max_new_tokens']} new tokens, learning rate "
             f"{settings['learning_rate']:g}, {objective}, {settings['dtype']}; "
             f"{settings['steps']} steps a side (warm-up steps left out: {settings['warmup_steps_left_out']}); TRL "
             f"{report['machine']['trl']}. The same prompts at every step on both sides: "
             f"{'yes' if report['same_prompts_each_step'] else 'NO'}.", "",
             "| side | median s/step | steps/s | completion tokens/s | peak RSS | mean score |",
             "|---|---|---|---|---|---|"]
    for side, label in (("trl", f"TRL {trainer}"), ("preftune", f"preftune {command}")):
        row = report[side]
        lines.append(f"| {label} | {row['median_step_seconds']:.1f} | {row['steps_per_second']:.4f} | "
                     f"{row['completion_tokens_per_second']:.1f} | {row['peak_rss_gb']:.2f} GB | "
                     f"{row['mean_score']:+.3f} |")
    ratios = report["ratios"]
    lines += ["", f"preftune / TRL: **{ratios['steps_per_second']:.2f}x the steps per second**, "
              f"{ratios['completion_tokens_per_second']:.2f}x the completion tokens per second, "
              f"{ratios['peak_rss']:.2f}x the peak RSS."]
    return provenance(result) + "\n" + "\n".join(lines) + "\n"


def rloo_vs_trl(result: dict) -> str:
    return online_vs_trl(result, "RLOOTrainer", "rloo", f"KL coefficient {result['stdout']['settings']['kl_coef']:g}")


def grpo_vs_trl(result: dict) -> str:
    settings = result["stdout"]["settings"]
    return online_vs_trl(result, "GRPOTrainer", "grpo", f"loss {settings['loss_type']}, beta {settings['beta']:g}")


def plus_minus(row: dict, key: str, digits: int, sign: bool = False) -> str:
    value, stderr = float(row[key]), float(row[f"{key}_stderr"])
    return f"{value:{'+' if sign else ''}.{digits}f} +- {stderr:.{digits}f}"


def last_point(cost: dict, points: list[dict]) -> str:
    """A method's last held-out point (the reward model: its held-out accuracy), as `preftune frontier`'s costs.md
    writes it."""
    extra = ast.literal_eval(cost.get("extra") or "{}")
    if cost["method"] == "reward model" and extra.get("held_out_accuracy") is not None:
        return f"held-out accuracy {extra['held_out_accuracy']:.3f} +- {extra['held_out_accuracy_stderr']:.3f}"
    own = [p for p in points if p["method"] == cost["method"]
           or (cost["method"] == "best-of-N" and p["method"] == "reference")]
    if not own:
        return ""
    last = max(own, key=lambda p: (int(p["step"] or 0), int(p["n"] or 0)))
    return f"{plus_minus(last, 'reward', 3, sign=True)}, {float(last['kl']):.2f} nats"


def frontier(result: dict) -> str:
    points, costs = result["files"]["frontier.csv"], result["files"]["costs.csv"]
    gain = bool(points) and "gain" in points[0]
    lines = ["| method | steps | N | KL (nats) | mean reward |" + (" gain (paired by prompt) |" if gain else ""),
             "|---|---|---|---|---|" + ("---|" if gain else "")]
    for p in points:
        lines.append(f"| {p['method']} | {p['step']} | {p['n']} | {plus_minus(p, 'kl', 2)} | "
                     f"{plus_minus(p, 'reward', 3, sign=True)} |" + (f" {plus_minus(p, 'gain', 3, True)} |"
                                                                      if gain else ""))
    lines += ["", "What each method cost (training time excludes loading and the held-out measurements; process "
              "wall time is the method's whole process; peak RSS includes the frozen reference every process holds "
              "for the measurement; \"+ reward model\": the reward model's time and labels come first):", "",
              "| method | training time | process wall time | peak RSS | models held | completions sampled | "
              "reward queries | preference labels | last point: reward, KL |", "|---|---|---|---|---|---|---|---|---|"]
    for c in costs:
        uses_rm = c["uses_reward_model"] == "True"
        lines.append(f"| {c['method']} | {duration(float(c['train_seconds']))}{' + reward model' if uses_rm else ''} "
                     f"| {duration(float(c['wall_seconds']))} | {int(c['peak_rss_bytes']) / 1e9:.2f} GB | "
                     f"{c['model_copies']} ({c['copies']}) | {c['completions']} | {c['reward_queries']} | "
                     f"{c['labels']} | {last_point(c, points)} |")
    return provenance(result) + "\n" + "\n".join(lines) + "\n"


def study_records(result: dict):
    """The Study of a recorded `preftune study` (its records.json) and its seed count."""
    from preftune.study.report import study_of

    records = result["files"]["records.json"]
    return study_of(records), records["seeds"]


def study(result: dict) -> str:
    """`preftune study`'s report, every table made by the study's own report code from the recorded records.json
    (the figures beside the page: `study_figures`)."""
    from preftune.study.report import report_tables

    records, seeds = study_records(result)
    tables = report_tables(records, seeds)
    sections = [("Summary (sentences generated from the numbers below)", "summary.md", None),
                ("Held-out reward against label budget", None, "![held-out reward against label budget, a line per "
                 "method with its 95% band over seeds](study-label-efficiency.png)"),
                ("Gain over the reference", "gains.md", None),
                ("Held-out reward at the last point and at matched KL", "matched_kl.md", None),
                ("DPO minus each RLHF method", "differences.md", None),
                ("What each method cost", "costs.md", None),
                ("Which method, under your constraints", "decision.md", None),
                ("Reward against KL, every point of every seed", None,
                 "![held-out reward against KL, every point of every seed](study-reward-kl.png)")]
    lines = []
    for title, table, figure in sections:
        if table is not None and table not in tables:
            continue
        lines += [f"### {title}", "", *(tables[table] if table else [figure]), ""]
    return provenance(result) + "\n" + "\n".join(lines).rstrip() + "\n"


def study_figures(result: dict) -> None:
    """The study page's two plots, drawn by the study's own plotting code from the recorded records."""
    from preftune.study.report import plot_label_efficiency, plot_reward_kl

    records, _ = study_records(result)
    plot_label_efficiency(records, RESULTS / "study-label-efficiency.png")
    plot_reward_kl(records, RESULTS / "study-reward-kl.png")


def accuracy(row: dict) -> str:
    return f"{row['mean']:.3f} +- {row['stderr']:.3f}"


def arithmetic_row(name: str) -> dict | None:
    """One method's row on the arithmetic task from its recorded report (DPO's arithmetic_report.json, GRPO's
    rl_report.json, where the accuracy is its held-out reward)."""
    result = read_result(name)
    if result is None:
        return None
    if name == "arithmetic-dpo":
        r = result["files"]["arithmetic_report.json"]
        return {"method": f"DPO on the checker's pairs ({r['pairs']} pairs)", "reference": r["reference_accuracy"],
                "policy": r["policy_accuracy"], "gain": r["accuracy_gain"], "gain_stderr": r["accuracy_gain_stderr"],
                "kl": r["kl_policy_reference"], "peak_rss_gb": r["peak_rss_gb"], "result": result,
                "samples": f"{r['samples']['completions_generated']:,} reference samples for the pairs",
                "held_out": f"{r['held_out_prompts']} x {r['samples_per_prompt']}"}
    r = result["files"]["rl_report.json"]
    return {"method": f"GRPO on the checker ({r['steps']} rollouts)", "reference": r["reference_reward"],
            "policy": r["policy_reward"], "gain": r["reward_gain"], "gain_stderr": r["reward_gain_stderr"],
            "kl": r["kl_policy_reference"], "peak_rss_gb": r.get("peak_rss_gb"), "result": result,
            "samples": f"{r['completions_generated']:,} policy samples in training",
            "held_out": f"{r['held_out_prompts']} x {r['samples_per_prompt']}"}


def arithmetic_table(missing_text: str) -> str:
    """DPO against GRPO on the arithmetic task, a row each, from their result files (`missing_text`: what to say
    when neither is recorded)."""
    rows = [row for row in map(arithmetic_row, ("arithmetic-dpo", "arithmetic-grpo")) if row is not None]
    if not rows:
        return missing_text
    lines = ["| method | held-out problems x samples | reference accuracy | policy accuracy | gain (paired by "
             "problem) | KL (nats) | wall time | peak RSS | samples | measured |", "|---|" + "---|" * 9]
    for row in rows:
        result = row["result"]
        rss = "" if row["peak_rss_gb"] is None else f"{row['peak_rss_gb']:.2f} GiB"
        lines.append(f"| {row['method']} | {row['held_out']} | {accuracy(row['reference'])} | "
                     f"{accuracy(row['policy'])} | **{row['gain']:+.3f}** +- {row['gain_stderr']:.3f} | "
                     f"{row['kl']['mean']:.2f} +- {row['kl']['stderr']:.2f} | {duration(result['wall_seconds'])} | "
                     f"{rss} | {row['samples']} | {result['date']}, fp32 matmul "
                     f"{result['machine']['matmul_fp32_gflops']:g} GFLOP/s |")
    return "\n".join(lines) + "\n"


def arithmetic_result(result: dict) -> str:
    """A results page of the arithmetic task: its provenance, and the comparison with the other method."""
    return provenance(result) + "\n" + arithmetic_table("")


# ---- the README's results (its links are from the repository's root) ---------------------------------------------
def short_provenance(result: dict) -> str:
    machine = result["machine"]
    rate = machine.get("matmul_fp32_gflops")
    return (f"`{result['command']}`, {result['date']}, {machine['cores']} CPU cores"
            + (f" ({machine['cpu']})" if machine.get("cpu") else "")
            + (f", fp32 matmul {rate:g} GFLOP/s" if rate is not None else "")
            + (f", {duration(result['wall_seconds'])}" if result.get("wall_seconds") else ""))


def readme_study() -> str:
    """The study's headline for the README: the largest label budget's table, the reference, the plot."""
    from preftune.study.report import REFERENCE, gains_sentence, headline_table
    from preftune.study.stats import seed_interval

    result = read_result("study")
    if result is None:
        return "Not yet recorded: [results: the study](docs/results/study.md) says how.\n"
    records, seeds = study_records(result)
    largest = max(records.budgets)
    reference = seed_interval([p.reward for p in records.points if p.method == REFERENCE])
    lines = [f"Measured by {short_provenance(result)}: SmolLM2-135M-Instruct on the built-in sentiment task, "
             f"label budgets {', '.join(map(str, records.budgets))}, {seeds} seeds; the ground truth (VADER "
             f"sentiment) judges the held-out samples. At {largest} labels (the reference: {reference.text()}; "
             "95% intervals over seeds):", "", *headline_table(records, largest), "", gains_sentence(records), "",
             "![held-out reward against label budget, a line per method with its 95% band over seeds]"
             "(docs/results/study-label-efficiency.png)", "",
             "Every budget, the matched-KL and cost tables, the decision table and the generated summary: "
             "[results: the study](docs/results/study.md)."]
    return "\n".join(lines) + "\n"


DPO_MODES = {"live": "live reference", "precomputed": "precomputed reference", "lora": "LoRA"}


def readme_default_job() -> str:
    """The default job's before and after, for the README."""
    result = read_result("default-job")
    if result is None:
        return "Not yet recorded: [results: the default job](docs/results/default-job.md) says how.\n"
    report = result["files"]["sentiment_report.json"]
    ref, pol, kl = report["reference_reward"], report["policy_reward"], report["kl_policy_reference"]
    return (f"**The default job** ({short_provenance(result)}): held-out reward {ref['mean']:+.3f} +- "
            f"{ref['stderr']:.3f} for the reference, {pol['mean']:+.3f} +- {pol['stderr']:.3f} for the DPO policy, a "
            f"gain of **{report['reward_gain']:+.3f} +- {report['reward_gain_stderr']:.3f}** (paired by prompt) at KL "
            f"{kl['mean']:.2f} +- {kl['stderr']:.2f} nats ([results: the default job](docs/results/default-job.md)).\n")


def readme_speed() -> str:
    """The speed against TRL, a row per recorded comparison, for the README."""
    lines = ["| measured | command | pairs or steps per second, preftune / TRL | peak RSS, preftune / TRL |",
             "|---|---|---|---|"]
    dpo = read_result("dpo-vs-trl")
    if dpo is not None:
        rate = dpo["machine"]["matmul_fp32_gflops"]
        for position, (mode, sides) in enumerate(dpo["stdout"]["modes"].items()):
            when = f"{dpo['date']} (fp32 matmul {rate:g} GFLOP/s)" if position == 0 else "same run"
            seconds = (f" ({sides['preftune']['median_step_seconds']:.1f} s against "
                       f"{sides['trl']['median_step_seconds']:.1f} s a step)" if position == 0 else "")
            lines.append(f"| DPO, {DPO_MODES.get(mode, mode)}, {when} | " + (f"`{dpo['command']}`" if position == 0 else
                         "the same") + f" | **{sides['ratios']['pairs_per_second']:.2f}x**{seconds} | "
                         f"{sides['ratios']['peak_rss']:.2f}x |")
    for name, label in (("rloo-vs-trl", "RLOO"), ("grpo-vs-trl", "GRPO")):
        result = read_result(name)
        if result is not None:
            report = result["stdout"]
            lines.append(f"| {label}, {result['date']} (fp32 matmul {result['machine']['matmul_fp32_gflops']:g} "
                         f"GFLOP/s) | `{result['command']}` | **{report['ratios']['steps_per_second']:.2f}x** "
                         f"({report['preftune']['median_step_seconds']:.1f} s against "
                         f"{report['trl']['median_step_seconds']:.1f} s a step) | "
                         f"{report['ratios']['peak_rss']:.2f}x |")
    return "\n".join(lines) + "\n"


RESULTS_PAGES: dict[str, tuple[Callable[[dict], str], str]] = {
    "default-job": (default_job, "python benchmarks/record.py docs/results/default-job.json --collect "
                                 "WORKDIR/run/sentiment_report.json -- preftune train --output-dir WORKDIR/run"),
    "dpo-vs-trl": (dpo_vs_trl, "python benchmarks/record.py docs/results/dpo-vs-trl.json -- "
                               "python benchmarks/bench_vs_trl.py"),
    "rloo-vs-trl": (rloo_vs_trl, "python benchmarks/record.py docs/results/rloo-vs-trl.json -- "
                                 "python benchmarks/bench_rloo_vs_trl.py"),
    "grpo-vs-trl": (grpo_vs_trl, "python benchmarks/record.py docs/results/grpo-vs-trl.json -- "
                                 "python benchmarks/bench_grpo.py"),
    "frontier": (frontier, "python benchmarks/record.py docs/results/frontier.json --collect "
                           "WORKDIR/frontier/frontier.csv --collect WORKDIR/frontier/costs.csv -- "
                           "preftune frontier --output-dir WORKDIR/frontier"),
    "study": (study, "python benchmarks/record.py docs/results/study.json --collect runs/study/records.json -- "
                     "preftune study"),
    "arithmetic-dpo": (arithmetic_result, "python benchmarks/record.py docs/results/arithmetic-dpo.json --collect "
                                          "WORKDIR/run/arithmetic_report.json -- preftune train --task arithmetic "
                                          "--output-dir WORKDIR/run --report-to none"),
    "arithmetic-grpo": (arithmetic_result, "python benchmarks/record.py docs/results/arithmetic-grpo.json --collect "
                                           "WORKDIR/run/rl_report.json -- preftune grpo --output-dir WORKDIR/run "
                                           "--num-generations 8 --rollout-batch-size 8 --learning-rate 2e-5 "
                                           "--max-steps 20 --report-to none"),
}
# the figures a results page shows, drawn from its result file when the pages are written
RESULTS_FIGURES: dict[str, Callable[[dict], None]] = {"study": study_figures}


def results_files() -> str:
    """A link to each committed result file, with the page generated from it."""
    lines = [f"- [{name}.json]({name}.json): [{name}]({name}.md)" for name in RESULTS_PAGES
             if (RESULTS / f"{name}.json").exists()]
    return "\n".join(lines) + "\n" if lines else "(none recorded yet)\n"


def result_block(name: str) -> str:
    render, command = RESULTS_PAGES[name]
    result = read_result(name)
    return missing(name, command) if result is None else render(result)


GENERATORS: dict[str, Callable[[], str]] = {
    "config-reference": config_reference,
    "loss-table": loss_table,
    "library-index": library_index,
    **{f"library-{layer}": (lambda layer=layer: library_layer(layer)) for layer in LAYERS},
    **{f"results-{name}": (lambda name=name: result_block(name)) for name in RESULTS_PAGES},
    "results-files": results_files,
    "readme-study": readme_study,
    "readme-speed": readme_speed,
    "readme-default-job": readme_default_job,
    "arithmetic-table": lambda: arithmetic_table("Not yet recorded: [the results pages](results/index.md) say how.\n"),
    "readme-arithmetic": lambda: arithmetic_table("Not yet recorded.\n"),
}


# ---- pages -------------------------------------------------------------------------------------------------------
def render_page(text: str) -> str:
    """A page with every generated block rewritten; an unknown block name is an error."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise KeyError(f"unknown generated block {name!r}; known: {', '.join(GENERATORS)}")
        return match["start"] + GENERATORS[name]() + match["end"]

    return BLOCK.sub(replace, text)


def pages() -> list[Path]:
    """The documentation's Markdown pages (and the README) that hold a generated block."""
    return sorted(p for p in [*DOCS.rglob("*.md"), ROOT / "README.md"] if BLOCK.search(p.read_text(encoding="utf-8")))


def stale_pages() -> list[Path]:
    """The pages whose committed text differs from what the generator writes."""
    return [p for p in pages() if render_page(p.read_text(encoding="utf-8")) != p.read_text(encoding="utf-8")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 naming the stale pages")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.check:
        stale = stale_pages()
        for page in stale:
            print(f"stale: {page.relative_to(ROOT)} (run python docs/generate.py)", file=sys.stderr)
        sys.exit(1 if stale else 0)
    for name, draw in RESULTS_FIGURES.items():
        if (result := read_result(name)) is not None:
            draw(result)
    for page in pages():
        text = page.read_text(encoding="utf-8")
        rendered = render_page(text)
        if rendered != text:
            page.write_text(rendered, encoding="utf-8")
            print(f"wrote {page.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
