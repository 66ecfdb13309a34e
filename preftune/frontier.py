"""`preftune frontier`: the DPO paper's reward-KL comparison (Figure 2, left) in miniature on the default job, with
the RLHF methods DPO replaces beside it and what each costs.

On the default job's movie-review pairs (SmolLM2-135M-Instruct, VADER sentiment as the ground-truth reward), each
method gives points (KL(policy || reference), mean ground-truth reward) on the same held-out prompts:

- offline, from the 242 labelled pairs: DPO at several betas, Preferred-FT (SFT on the chosen replies), and the
  RLHF pipeline on the same pairs: a reward model fit to them, then PPO, RLOO and online DPO against it;
- with the ground truth itself: PPO-GT (PPO on the sentiment score), best-of-N from the reference (N = 1 to 16,
  KL the analytic log N - (N - 1) / N, an upper bound on the true KL, Beirami et al. 2024, arXiv:2401.01879).

Each method runs in a process of its own (its wall time and peak memory are its own) and is cached in
`methods/<method>.json` with the settings it ran with: a re-run in the same folder computes only the methods that are
missing or whose settings changed. Writes frontier.csv/.md/.png, costs.csv/.md and sample_efficiency.png
(frontier_report.py); the methods themselves are in frontier_methods.py.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from preftune.config import Config
from preftune.frontier_methods import Cost, MethodSpec, Point, as_dict, from_dict, method_specs, run_method
from preftune.frontier_report import plot_frontier, plot_sample_efficiency, write_costs, write_table
from preftune.runtime.run_folder import prepare_output_dir

__all__ = ["Point", "plot_frontier", "run_frontier", "write_table"]

# bump when a method's measurement changes, so that older cached records are recomputed (2: standard errors
# clustered by prompt, and each point's gain over the reference paired by prompt)
RECORD_VERSION = 2
Runner = Callable[[MethodSpec, Config, Path], tuple[list[Point], Cost]]


def run_in_own_process(spec: MethodSpec, config: Config, folder: Path) -> tuple[list[Point], Cost]:
    """`run_method` in a fresh process (spawned: no state shared with this one), so that its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        return pool.submit(run_method, spec, config, folder).result()


def settings_of(spec: MethodSpec, config: Config, records: dict[str, dict]) -> dict[str, Any]:
    """What a method's result depends on; a cached record is reused only when these are equal."""
    job = config.default_job
    settings = {"version": RECORD_VERSION, "method": spec.settings, "model": config.model.model,
                "seed": config.train.seed, "num_prompts": job.num_prompts, "num_eval_prompts": job.num_eval_prompts,
                "samples_per_eval_prompt": job.samples_per_eval_prompt,
                "max_new_tokens": config.sample.max_new_tokens}
    if spec.uses_reward_model:  # a new reward model invalidates what was trained against the old one
        settings["reward_model"] = records.get("reward-model", {}).get("settings")
    return settings


def frontier_folder(config: Config) -> Path:
    """--output-dir (default runs/frontier): a folder of an earlier frontier run is reused with its cached
    methods; any other existing folder is refused unless --overwrite."""
    folder = Path(config.train.output_dir or "runs/frontier")
    if (folder / "methods").is_dir() and not config.train.overwrite:
        return folder
    return prepare_output_dir(str(folder), config.train.overwrite, resuming=False)


def run_frontier(config: Config, keys: list[str], runner: Runner = run_in_own_process) -> Path:
    """Run (or read from the cache) every selected method; write the tables and plots. Returns the folder."""
    from preftune.sentiment import prepare_default_job

    started = time.time()
    prepare_default_job(config)  # builds the default job's pairs once, before the methods read them
    folder = frontier_folder(config)
    (folder / "methods").mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    for spec in method_specs(config, keys):
        path = folder / "methods" / f"{spec.slug}.json"
        settings = settings_of(spec, config, records)
        cached = json.loads(path.read_text()) if path.is_file() else None
        if cached is not None and cached["settings"] == settings:
            print(f"{spec.label}: read from {path}", flush=True)
            records[spec.slug] = cached
            continue
        method_started = time.time()
        points, cost = runner(spec, config, folder)
        records[spec.slug] = {"settings": settings, **as_dict(points, cost)}
        path.write_text(json.dumps(records[spec.slug], indent=2) + "\n")
        print(f"{spec.label} measured in {time.time() - method_started:.0f} s ({time.time() - started:.0f} s "
              "in all)", flush=True)

    results = [from_dict(record) for record in records.values()]
    points = [p for method_points, _ in results for p in method_points]
    costs = [cost for _, cost in results]
    write_table(points, folder)
    write_costs(costs, points, folder)
    plot_frontier(points, folder / "frontier.png")
    plot_sample_efficiency(points, costs, folder / "sample_efficiency.png")
    summary = {"seconds": round(time.time() - started), "points": len(points),
               "methods": [cost.method for cost in costs]}
    (folder / "frontier.json").write_text(json.dumps(summary) + "\n")
    print(f"frontier of {len(points)} points in {folder} ({summary['seconds']} s)", flush=True)
    return folder
