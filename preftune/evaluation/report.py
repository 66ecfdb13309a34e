"""`OUTPUT_DIR/report.md`, written at the end of training: the config, the final metrics, the curves, and five
held-out prompts with a reference and a policy sample side by side, with their rewards (with --reference-free and
no LoRA, the "reference" column is the starting model, loaded for the report).

The rewards shown are the implicit reward beta * log(pi(y|x) / pi_ref(y|x)) of each sample and, when the run
has one (the default job), the ground-truth reward.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from preftune.config import Config
from preftune.evaluation.measure import Measurement, ModelPair, measure
from preftune.evaluation.plot import plot_run, read_metrics
from preftune.forward.rewards import RewardFunction
from preftune.objectives.metrics import METRIC_NAMES

NUM_EXAMPLES = 5


def cell(text: str) -> str:
    """Text fit for one markdown table cell."""
    return " ".join(text.replace("|", "\\|").split()) or "(empty)"


def example_prompts(data, tokenizer, count: int = NUM_EXAMPLES) -> list[tuple[str, list[int]]]:
    """(text to show, ids to sample from) for the first `count` distinct prompts of a LoadResult."""
    from preftune.data.tokenize import prompt_ids

    chosen: list[tuple[str, list[int]]] = []
    for pair in data.pairs:
        text = pair.prompt if isinstance(pair.prompt, str) else pair.prompt[-1]["content"]
        if text not in (shown for shown, _ in chosen):
            chosen.append((text, prompt_ids(pair.prompt, tokenizer)))
        if len(chosen) == count:
            break
    return chosen


def example_rows(prompts: Sequence[tuple[str, list[int]]], measured: Measurement) -> list[str]:
    """Markdown table rows: prompt | reference sample (rewards) | policy sample (rewards), one sample per prompt."""
    rows = []
    for i, (text, _) in enumerate(prompts):
        cells = []
        for samples, implicit, truth in (
            (measured.reference_samples, measured.reference_implicit, measured.reference_rewards),
            (measured.policy_samples, measured.policy_implicit, measured.policy_rewards),
        ):
            ground_truth = f", ground truth {truth[i]:+.3f}" if truth is not None else ""
            cells.append(f"{cell(samples[i].text)} *(implicit {implicit[i]:+.3f}{ground_truth})*")
        rows.append(f"| {cell(text)} | {cells[0]} | {cells[1]} |")
    return rows


def write_run_report(
    folder: Path, config: Config, models: ModelPair, tokenizer, prompts: Sequence[tuple[str, list[int]]],
    ground_truth: RewardFunction | None, *, main_process: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Path | None:
    """report.md of a training run: samples from both models on `prompts` (every process takes part under FSDP;
    the main process writes)."""
    with autocast():
        measured = measure(models, tokenizer, [ids for _, ids in prompts], max_new_tokens=config.sample.max_new_tokens,
                           seed=config.train.seed, reward=ground_truth, prompts=[text for text, _ in prompts],
                           beta=config.loss.beta)
    if not main_process:
        return None
    path = write_report(folder, config.to_dict(), final_metrics_of(folder), example_rows(prompts, measured),
                        f"preftune run {folder.name}")
    print(f"wrote {path}", flush=True)
    return path


def write_report(
    output_dir: Path,
    config_dict: dict,
    final_metrics: list[str],
    examples: list[str],
    title: str,
) -> Path:
    curves = plot_run(output_dir)
    lines = [
        f"# {title}",
        "",
        f"Written {datetime.now().strftime('%Y-%m-%d %H:%M')} by preftune.",
        "",
        "## Final metrics",
        "",
        *final_metrics,
        "",
        "## Curves",
        "",
        f"![training and evaluation curves]({curves.name})",
        "",
        f"## {len(examples)} held-out prompts: reference and policy samples",
        "",
        "| prompt | reference sample | policy sample |",
        "|---|---|---|",
        *examples,
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(config_dict, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    path = output_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@dataclass(frozen=True)
class TrainingMeans:
    """Each training metric's mean over the logged rows of the last epoch (one optimizer step can hold few pairs,
    the last of an epoch often does, so it alone says little)."""

    means: dict[str, float]
    first_step: int
    last_step: int
    num_rows: int
    whole_run: bool  # the window is all of training


def last_epoch_means(rows: list[dict], metric_names: Sequence[str] = METRIC_NAMES) -> TrainingMeans | None:
    """The means of `metric_names` over the last epoch's training rows of metrics.jsonl; None if none was logged."""
    train_rows = [row for row in rows if metric_names[0] in row]  # the recipe's first metric marks its training rows
    if not train_rows:
        return None
    last_epoch = train_rows[-1]["epoch"]
    window = [row for row in train_rows if row["epoch"] > last_epoch - 1] or train_rows[-1:]
    logged = {name: [row[name] for row in window if isinstance(row.get(name), int | float)] for name in metric_names}
    means = {name: statistics.fmean(values) for name, values in logged.items() if values}
    return TrainingMeans(means, window[0]["step"], window[-1]["step"], len(window), len(window) == len(train_rows))


def final_metrics_of(output_dir: Path) -> list[str]:
    """The "Final metrics" section: the training means of the last epoch beside the last held-out evaluation."""
    rows = read_metrics(output_dir)
    training = last_epoch_means(rows)
    last_eval = next((row for row in reversed(rows) if "eval_loss" in row), {})
    if training is None:
        return ["No optimizer step was logged."]
    lines = [
        f"Training metrics (`loss`, `rewards/*`, `logps/*`): the mean of the {training.num_rows} logged rows of steps "
        f"{training.first_step}-{training.last_step}, the last epoch"
        + (" (all of training)" if training.whole_run else "") + ". "
        + (f"Held-out metrics (`eval_*`): the evaluation at step {last_eval['step']}." if last_eval
           else "No held-out evaluation (no --eval-data)."),
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {value:.4g} |" for name, value in training.means.items()],
        *[f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
          for name, value in last_eval.items() if name.startswith("eval_")],
    ]
    return lines
