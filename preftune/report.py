"""`OUTPUT_DIR/report.md`, written at the end of training: the config, the final metrics, the curves, and five
held-out prompts with a reference and a policy sample side by side, with their rewards (with --reference-free and
no LoRA, the "reference" column is the starting model, loaded for the report).

The rewards shown are the implicit reward beta * log(pi(y|x) / pi_ref(y|x)) of each sample and, when the run
has one (the default job), the ground-truth reward.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import torch
import yaml

from preftune.evaluate import sample, sequence_logps_of_samples
from preftune.plot import plot_run

NUM_EXAMPLES = 5


def cell(text: str) -> str:
    """Text fit for one markdown table cell."""
    return " ".join(text.replace("|", "\\|").split()) or "(empty)"


def example_prompts(data, tokenizer, count: int = NUM_EXAMPLES) -> list[tuple[str, list[int]]]:
    """(text to show, ids to sample from) for the first `count` distinct prompts of a LoadResult."""
    from preftune.tokenize import prompt_ids

    chosen: list[tuple[str, list[int]]] = []
    for pair in data.pairs:
        text = pair.prompt if isinstance(pair.prompt, str) else pair.prompt[-1]["content"]
        if text not in (shown for shown, _ in chosen):
            chosen.append((text, prompt_ids(pair.prompt, tokenizer)))
        if len(chosen) == count:
            break
    return chosen


def example_rows(
    policy: torch.nn.Module,
    reference: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]],
    tokenizer,
    prompts: Sequence[tuple[str, list[int]]],
    beta: float,
    max_new_tokens: int,
    seed: int,
    ground_truth: Callable[[str], float] | None,
) -> list[str]:
    """Markdown table rows: prompt | reference sample (rewards) | policy sample (rewards)."""
    ids = [p for _, p in prompts]
    pad = tokenizer.pad_token_id
    policy_samples = sample(policy, tokenizer, ids, max_new_tokens=max_new_tokens, seed=seed)
    policy_logps = sequence_logps_of_samples(policy, policy_samples, pad)
    with reference() as reference_model:
        reference_samples = sample(reference_model, tokenizer, ids, max_new_tokens=max_new_tokens, seed=seed)
        reference_logps = sequence_logps_of_samples(reference_model, reference_samples, pad)
        ref_of_policy = sequence_logps_of_samples(reference_model, policy_samples, pad)
    policy_of_reference = sequence_logps_of_samples(policy, reference_samples, pad)
    rows = []
    for i, (text, _) in enumerate(prompts):
        rewards = []
        for s, implicit in ((reference_samples[i], beta * (policy_of_reference[i] - reference_logps[i]).item()),
                            (policy_samples[i], beta * (policy_logps[i] - ref_of_policy[i]).item())):
            truth = f", ground truth {ground_truth(s.text):+.3f}" if ground_truth else ""
            rewards.append(f"{cell(s.text)} *(implicit {implicit:+.3f}{truth})*")
        rows.append(f"| {cell(text)} | {rewards[0]} | {rewards[1]} |")
    return rows


def write_report(
    output_dir: Path,
    config_dict: dict,
    final_metrics: dict,
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
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
          for name, value in final_metrics.items()],
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


def final_metrics_of(output_dir: Path) -> dict:
    """The last logged training row and the last evaluation row of metrics.jsonl, merged."""
    merged: dict = {}
    for line in (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "loss" in row or "eval_loss" in row:
            merged.update({k: v for k, v in row.items() if k not in ("time", "epoch")})
    return merged
