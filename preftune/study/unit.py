"""One unit of the study, (method, label budget, seed), in a process of its own: `python -m preftune.study.unit
TASK.json` trains (or samples) the method, measures its points and writes its record file whole (a temporary
file renamed into place: a killed unit leaves no record, and the study runs it again).

TASK.json (written by study/runner.py): the study's config, the unit (method label, budget, seed), where its
record and training folder go, the held-out prompts, the ground truth and the files of labels it trains on.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from preftune.config import Config, number_list, resolved_task
from preftune.study.methods import (
    GROUND_TRUTH,
    REFERENCE,
    REWARD_MODEL,
    REWARD_MODEL_SPEC,
    Cost,
    MethodSpec,
    Point,
    Unit,
    as_dict,
    method_table,
)

STARTED = time.perf_counter()


def config_from_dict(values: dict[str, dict[str, Any]], explicitly_set: list[str]) -> Config:
    """The Config `Config.to_dict` gave (and which options the user set)."""
    config = Config()
    for section, fields in values.items():
        for name, value in fields.items():
            setattr(getattr(config, section), name, value)
    config.explicitly_set = set(explicitly_set)
    return config


def spec_of(label: str, config: Config) -> MethodSpec:
    """The method row labelled `label` (the reference and reward model included)."""
    rows = [REFERENCE, REWARD_MODEL_SPEC, *method_table(number_list(config.study.betas))]
    return next(spec for spec in rows if spec.label == label)


def unit_config(config: Config, unit: Unit, task: dict[str, Any]) -> Config:
    """The study's config with the method's settings, its seed, its data and its stopping rule, training in the
    unit's own folder (recomputed whole when the unit runs)."""
    c = copy.deepcopy(config)
    c.train.seed = unit.seed
    for key, value in unit.spec.settings.items():
        section, name = key.split(".")
        value = {REWARD_MODEL: task.get("reward_model"), GROUND_TRUTH: task["ground_truth"]}.get(value, value)
        setattr(getattr(c, section), name, value)
        c.explicitly_set.add(key)  # the method's choice, not a default an override may replace
    c.data.eval_data = None  # the study measures held-out prompts itself
    c.default_job.task = resolved_task(config, "study")  # the study's task, also for grpo (whose own is arithmetic)
    c.train.eval_steps = 0
    if unit.spec.kind in ("pairs", "reward-model"):
        c.data.data = task["labels"]  # the budget's labels alone
        c.train.num_epochs, c.train.max_steps = config.study.epochs, -1
    else:  # the online methods sample the training prompts (the built-in task's: data None), not the labels
        c.data.data = task["train_prompts_from"]
        c.train.max_steps = config.study.rollouts
    c.train.output_dir = task["folder"]
    c.train.overwrite = True
    c.train.report_to = "none"
    c.train.save_steps = 0
    return c


def trained(run) -> int:
    """The parameters the run's optimizer trains (under --lora, the adapters' and heads' alone)."""
    return sum(p.numel() for p in run.trainable)


def measure_steps(total: int, points: int) -> set[int]:
    """`points` steps evenly spaced over `total`, the last one included."""
    return {max(1, round(total * k / points)) for k in range(1, points + 1)}


def train_on_pairs(unit: Unit, config: Config, measuring) -> tuple[list[Point], float, dict]:
    """DPO or Preferred-FT on the budget's labels, measured `--points` times along its steps."""
    from preftune.recipes import dpo, pairs

    config.train.precompute_ref_log_probs = True
    run = dpo.setup(config)
    at = measure_steps(run.total_steps, config.study.points)
    points: list[Point] = []
    started = time.perf_counter()

    def after_step(run: pairs.PairRun) -> None:
        if run.state.step in at:
            labels = min(run.state.micro_batches_seen * config.train.batch_size, len(run.train_pairs))
            seconds = time.perf_counter() - started - measuring.seconds
            points.append(measuring.policy_point(run.objective.models.policy, unit.spec.label, unit.budget,
                                                 run.state.step, seconds=seconds, labels=labels))

    try:
        pairs.train(run, after_step=after_step)
    finally:
        pairs.cleanup(run)
    return points, time.perf_counter() - started - measuring.seconds, {"trainable_parameters": trained(run)}


def train_reward_model(config: Config) -> tuple[list[Point], float, dict]:
    """The Bradley-Terry reward model of the budget, saved where the methods that use it read it."""
    from preftune.recipes import reward_model

    started = time.perf_counter()
    finished = reward_model.run(config)
    return [], time.perf_counter() - started, {"labels": len(finished.train_pairs)}


def train_online(unit: Unit, config: Config, measuring, labels: int) -> tuple[list[Point], float, dict]:
    """An online recipe (`preftune.recipes.<kind>`) measured `--points` times along its rollouts by the study's
    measurement (the recipe's own held-out evaluation is switched off: it would sample twice)."""
    from preftune.recipes import online

    recipe = importlib.import_module(f"preftune.recipes.{unit.spec.kind.replace('-', '_')}")
    run = recipe.setup(config)
    run.eval_prompts = []
    at = measure_steps(run.total_steps, config.study.points)
    points: list[Point] = []
    started = time.perf_counter()

    def after_step(run: online.OnlineRun) -> None:
        if run.state.step in at:
            generated = online.completions_generated(run)
            seconds = time.perf_counter() - started - measuring.seconds
            points.append(measuring.policy_point(run.models.policy, unit.spec.label, unit.budget, run.state.step,
                                                 seconds=seconds, completions=generated, reward_queries=generated,
                                                 labels=labels))

    try:
        online.train(run, after_step=after_step)
    finally:
        online.cleanup(run)
    return points, time.perf_counter() - started - measuring.seconds, {"trainable_parameters": trained(run)}


def best_of_n(unit: Unit, config: Config, task: dict[str, Any]) -> tuple[list[Point], float, dict]:
    """The budget's reward model scores the reference's samples of the seed; best-of-N's points from them."""
    from preftune.forward.rewards import load_reward
    from preftune.study.measure import best_of_n_points

    samples = json.loads(Path(task["reference_record"]).read_text())["samples"]
    prompts = [p for p in task["eval_prompts"] for _ in range(samples["per_prompt"])]
    started = time.perf_counter()
    scores = load_reward(task["reward_model"])(prompts, samples["texts"])
    seconds = time.perf_counter() - started
    points = best_of_n_points(scores, samples, config.study.best_of, unit.budget, unit.seed, seconds)
    return points, points[-1].seconds, {}


def run_unit(unit: Unit, config: Config, task: dict[str, Any]) -> dict[str, Any]:
    """Train (or sample) the unit's method and measure its points: its record."""
    from preftune.forward.rewards import load_reward
    from preftune.models.load import frozen, load_model, load_tokenizer, resolve_model
    from preftune.study.measure import Measure

    spec = unit.spec
    run_config = unit_config(config, unit, task)
    extra_record: dict[str, Any] = {}
    if spec.kind in ("reward-model", "best-of-n"):
        points, train_seconds, extra = (train_reward_model(run_config) if spec.kind == "reward-model"
                                        else best_of_n(unit, config, task))
    else:
        source = resolve_model(config.model.model, config.model.cache_dir)
        tokenizer = load_tokenizer(source, config.model.trust_remote_code)
        reference = frozen(load_model(source, config.model.trust_remote_code))
        measuring = Measure(tokenizer, reference, load_reward(task["ground_truth"]), task["eval_prompts"],
                            config.default_job.samples_per_eval_prompt, config.sample.max_new_tokens, unit.seed,
                            task.get("eval_columns"))
        extra = {}
        if spec.kind == "reference":
            points, train_seconds = [measuring.reference_point()], 0.0
            if task.get("best_of"):
                extra_record["samples"] = measuring.reference_samples(task["best_of"])
        elif spec.kind == "pairs":
            points, train_seconds, extra = train_on_pairs(unit, run_config, measuring)
        else:
            labels = unit.budget if spec.uses_reward_model else 0
            points, train_seconds, extra = train_online(unit, run_config, measuring, labels)
    last = points[-1] if points else Point(spec.label, unit.budget, unit.seed, None, None, 0.0, 0.0, 0.0, 0.0,
                                           labels=extra.get("labels", 0))
    cost = Cost(spec.label, unit.budget, unit.seed, time.perf_counter() - STARTED, train_seconds,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, len(spec.copies), ", ".join(spec.copies),
                last.completions, last.reward_queries, last.labels, spec.uses_reward_model, extra)
    return {**as_dict(points, cost), **extra_record}


def write_whole(path: Path, record: dict[str, Any]) -> None:
    """The record as JSON, renamed into place once written (never half a file)."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(staging, path)


def main(argv: list[str]) -> int:
    task = json.loads(Path(argv[0]).read_text())
    config = config_from_dict(task["config"], task["explicitly_set"])
    unit = Unit(spec_of(task["label"], config), task["budget"], task["seed"])
    record = run_unit(unit, config, task)
    write_whole(Path(task["record"]), {"key": task["key"], **record})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
