"""`preftune study` (alias `preftune frontier`): DPO against reward model + RL on the same labels, over label budgets
and seeds, measured on held-out prompts by a ground truth.

The data: the user's labelled pairs (--data), held-out pairs or prompts (--eval-data) and the reward that judges
held-out samples (--ground-truth: sentiment, module:function or a reward-model folder), or with none of these the
built-in task: the default job's movie-review pairs judged by VADER sentiment, or with --task arithmetic the
checker's pairs of the reference's answers judged by the checker's accuracy. For each seed the training pairs are
shuffled once (random.Random(seed)); a budget N is the first N of that order, the same N labels for every method,
and the reward model of a budget sees those N alone.

Every unit (method, budget, seed) runs in a process of its own (`python -m preftune.study.unit`, killed with the
study) and is cached in `units/<unit>.json` with a key of everything its numbers depend on: its method's row, its
budget, seed and labels, the study's settings that reach it, the reward model it uses (that unit's key), and the
code it runs (a hash of the source of its recipe, the loop and the measurement: a changed method recomputes its
points, where the older frontier reused stale ones). A record is written whole once its unit finishes, so the study
resumes after a kill -9 and a re-run computes only what is missing or changed. The report (study/report.py) is then
written from the records alone.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import preftune
from preftune.config import (
    ARITHMETIC_STUDY_DEFAULTS,
    STUDY_DEFAULTS,
    STUDY_QUICK,
    Config,
    apply_unset,
    number_list,
    resolved_task,
)
from preftune.data.read import Text, load_and_report, load_prompts
from preftune.errors import UserError
from preftune.runtime.run_folder import prepare_output_dir
from preftune.study.methods import Unit, from_dict, plan, selected_methods

Runner = Callable[[Path], None]  # runs the unit whose task file it is given; the unit writes its record

# the source files each kind of unit runs, under preftune/ (a folder: every .py in it); their hash is the code
# version in the unit's cache key
MEASUREMENT_CODE = ("study/measure.py", "study/unit.py", "study/methods.py", "evaluation/measure.py",
                    "forward/rollout.py", "forward/rewards.py", "models/load.py", "data/tokenize.py")
KIND_CODE = {
    "reference": (),
    "best-of-n": (),
    "pairs": ("recipes/dpo.py", "recipes/pairs.py", "objectives/losses.py", "objectives/logps.py",
              "objectives/metrics.py", "forward/logprobs.py", "forward/reference.py", "data/batching.py"),
    "reward-model": ("recipes/reward_model.py", "recipes/pairs.py", "data/batching.py"),
}
ONLINE_CODE = ("recipes/online", "objectives/policy_gradient.py", "objectives/losses.py", "forward/logprobs.py",
               "tasks/sources.py")


@dataclass
class StudyInputs:
    """What every unit reads: the labelled pairs, the held-out prompts and the ground truth."""

    pairs: list[dict[str, Any]]  # every labelled training pair, as records
    eval_prompts: list[Text]
    ground_truth: str
    train_prompts_from: str | None  # the file the online methods take their prompts from (None: built-in task)
    eval_columns: list[dict[str, Any]] | None = None  # per held-out prompt, the ground truth's keywords (an answer)


def code_version(kind: str) -> str:
    """A hash of the source files a unit of `kind` runs (an online recipe: recipes/<kind>.py and the loop)."""
    root = Path(preftune.__file__).parent
    names = (*MEASUREMENT_CODE, *KIND_CODE.get(kind, (f"recipes/{kind.replace('-', '_')}.py", *ONLINE_CODE)))
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        for file in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def record_of(pair) -> dict[str, Any]:
    record = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    return record if pair.margin is None else {**record, "margin": pair.margin}


def held_out_prompts(path: str, split: str) -> list[Text]:
    """--eval-data's prompts: of its pairs, or of a prompts file (one {"prompt": ...} a line)."""
    try:
        return [pair.prompt for pair in load_and_report(path, split=split, name="eval_data").pairs]
    except UserError as as_pairs:
        try:
            return [record.prompt for record in load_prompts(path)]
        except UserError:
            raise as_pairs from None


def study_inputs(config: Config) -> StudyInputs:
    """The user's pairs, held-out prompts and ground truth; or the built-in task's (its pairs built on first use).
    A ground truth that is not a folder is loaded here, so that a bad one fails before any unit starts."""
    from preftune.forward.rewards import load_reward
    from preftune.tasks.sentiment import make_prompts, prepare_default_job

    if config.data.data is None and resolved_task(config, "study") == "arithmetic":
        return arithmetic_inputs(config)
    if config.data.data is None:
        _, train_file, _ = prepare_default_job(config)  # (the default job's pairs, built with its own sizes)
        apply_unset(config, STUDY_DEFAULTS)  # the held-out measurement's size, where neither you nor --quick set it
        pairs = load_and_report(str(train_file)).pairs
        prompts: list[Text] = make_prompts(config.default_job.num_eval_prompts, config.train.seed, held_out=True)
        ground_truth, train_prompts_from = config.study.ground_truth or "sentiment", None
    else:
        apply_unset(config, STUDY_DEFAULTS)
        d = config.data
        pairs = load_and_report(d.data, split=d.split, skip_invalid=d.skip_invalid, name="train_data").pairs
        prompts = held_out_prompts(d.eval_data, d.eval_split)
        ground_truth, train_prompts_from = config.study.ground_truth, d.data
    if not Path(ground_truth).is_dir():
        load_reward(ground_truth)
    return StudyInputs([record_of(p) for p in pairs], prompts, ground_truth, train_prompts_from)


def arithmetic_inputs(config: Config) -> StudyInputs:
    """The arithmetic task's (--task arithmetic): the checker's pairs of the reference's own samples (built on
    first use, as `preftune train --task arithmetic` builds them), its held-out problems with their answers, and
    the checker's accuracy as the ground truth."""
    from preftune.tasks.arithmetic import make_rows, prepare_arithmetic_job

    _, train_file, _, _ = prepare_arithmetic_job(config)
    apply_unset(config, {**STUDY_DEFAULTS, **ARITHMETIC_STUDY_DEFAULTS})
    rows = make_rows(config.default_job.num_eval_prompts, config.train.seed, held_out=True)
    pairs = load_and_report(str(train_file)).pairs
    return StudyInputs([record_of(p) for p in pairs], [prompt for prompt, _ in rows],
                       config.study.ground_truth or "accuracy", None, [columns for _, columns in rows])


def write_labels(folder: Path, pairs: list[dict[str, Any]], seed: int, budget: int) -> tuple[Path, str]:
    """The first `budget` pairs of the seed's shuffle as a JSONL file (rewritten only when it changes), and the
    hash of its content."""
    if budget > len(pairs):
        raise UserError(f"--label-budgets: {budget} labels asked for, the training data has {len(pairs)} pairs")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    text = "".join(json.dumps(pairs[i]) + "\n" for i in order[:budget])
    path = folder / "labels" / f"labels-n{budget}-s{seed}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(text)
        os.replace(staging, path)
    return path, hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_reaching(unit: Unit, config: Config) -> dict[str, Any]:
    """The study's options that reach a unit's numbers: the model and its adapter, the measurement's sizes, the
    training options the methods inherit, and the unit kind's own stopping rule (not the lists of budgets, seeds,
    methods or KL budgets: those choose units, they do not change one)."""
    values = config.to_dict()
    study = values.pop("study")
    for name in ("output_dir", "overwrite", "report_to", "resume", "seed", "logging_steps", "run_name", "project"):
        values["train"].pop(name, None)
    values["data"] = {}  # the labels and prompts enter the key by content
    kind = unit.spec.kind
    own = {"pairs": ["epochs", "points"], "reward-model": ["epochs"], "reference": [], "best-of-n": ["best_of"]}
    values["stopping"] = {name: study[name] for name in own.get(kind, ["rollouts", "points"])}
    return values


def unit_key(unit: Unit, config: Config, inputs: StudyInputs, labels_hash: str | None,
             depends: list[str]) -> str:
    """The hash of everything the unit's record depends on (see the module docstring)."""
    content = {"code": code_version(unit.spec.kind), "method": asdict(unit.spec), "budget": unit.budget,
               "seed": unit.seed, "settings": settings_reaching(unit, config), "labels": labels_hash,
               "eval_prompts": inputs.eval_prompts, "eval_columns": inputs.eval_columns,
               "ground_truth": inputs.ground_truth,
               "train_prompts": (None if inputs.train_prompts_from is None
                                 else hashlib.sha256(Path(inputs.train_prompts_from).read_bytes()).hexdigest()),
               "depends": depends}
    if unit.spec.kind == "reference":
        content["best_of"] = config.study.best_of if "best-of-n" in methods_of(config) else 0
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:20]


def methods_of(config: Config) -> list[str]:
    return [name.strip() for name in config.study.methods.split(",")]


def study_folder(config: Config) -> Path:
    """--output-dir (default runs/study): a folder of an earlier study is reused with its cached units; any other
    existing folder is refused unless --overwrite."""
    folder = Path(config.train.output_dir or "runs/study")
    if (folder / "units").is_dir() and not config.train.overwrite:
        return folder
    return prepare_output_dir(str(folder), config.train.overwrite, resuming=False)


def die_with_parent() -> None:
    """In a unit's process before it starts (Linux): SIGKILL it when the study's process dies, so that a killed
    study leaves no unit running on."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_in_own_process(task_path: Path) -> None:
    """`python -m preftune.study.unit TASK` with this preftune first on its path; a failed unit stops the study
    (the finished ones stay cached)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(preftune.__file__).parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    code = subprocess.run([sys.executable, "-m", "preftune.study.unit", str(task_path)], env=env,
                          preexec_fn=die_with_parent).returncode
    if code != 0:
        raise UserError(f"the study's unit {task_path.stem} failed (exit code {code}; its output is above). The "
                        "units that finished are kept: the same command resumes after the failed one is fixed")


def cached(path: Path, key: str, needs: Path | None) -> dict[str, Any] | None:
    """The unit's record if it is there with this key (and `needs`, a folder it saved, is there too)."""
    if not path.is_file() or (needs is not None and not (needs / "config.json").is_file()):
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key else None


def run_units(config: Config, inputs: StudyInputs, folder: Path, runner: Runner) -> list[dict[str, Any]]:
    """Every unit of the study, read from its record or run; their records in run order."""
    methods = selected_methods(methods_of(config), number_list(config.study.betas))
    units = plan(methods, number_list(config.study.label_budgets, int), number_list(config.study.seeds, int))
    (folder / "units").mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    records, started = [], time.time()
    for position, unit in enumerate(units, 1):
        labels, labels_hash = (write_labels(folder, inputs.pairs, unit.seed, unit.budget) if unit.budget is not None
                               else (None, None))
        reward_model = f"reward-model-n{unit.budget}-s{unit.seed}"
        reference = f"reference-s{unit.seed}"
        depends = [keys[reward_model]] if unit.spec.uses_reward_model else []
        depends += [keys[reference]] if unit.spec.kind == "best-of-n" else []
        key = keys[unit.name] = unit_key(unit, config, inputs, labels_hash, depends)
        path = folder / "units" / f"{unit.name}.json"
        run_folder = folder / "runs" / unit.name
        record = cached(path, key, run_folder if unit.spec.kind == "reward-model" else None)
        if record is None:
            task = {"config": config.to_dict(), "explicitly_set": sorted(config.explicitly_set),
                    "label": unit.spec.label, "budget": unit.budget, "seed": unit.seed, "key": key,
                    "record": str(path), "folder": str(run_folder), "labels": None if labels is None else str(labels),
                    "reward_model": str(folder / "runs" / reward_model), "ground_truth": inputs.ground_truth,
                    "eval_prompts": inputs.eval_prompts, "eval_columns": inputs.eval_columns,
                    "train_prompts_from": inputs.train_prompts_from,
                    "reference_record": str(folder / "units" / f"{reference}.json"),
                    "best_of": config.study.best_of if "best-of-n" in methods_of(config) else 0}
            task_path = folder / "units" / f"{unit.name}.task.json"
            task_path.write_text(json.dumps(task) + "\n")
            print(f"[{position}/{len(units)}] {unit.name}: running", flush=True)
            unit_started = time.time()
            runner(task_path)
            record = cached(path, key, None)
            if record is None:
                raise UserError(f"the study's unit {unit.name} ended without writing {path}")
            print(f"[{position}/{len(units)}] {unit.name}: {time.time() - unit_started:.0f} s "
                  f"({time.time() - started:.0f} s in all)", flush=True)
        else:
            print(f"[{position}/{len(units)}] {unit.name}: read from {path}", flush=True)
        records.append(record)
    return records


def apply_quick(config: Config) -> None:
    """--quick: STUDY_QUICK's settings where the user set none, held as set (the built-in task's own defaults, applied
    later, do not replace them)."""
    quick = {key: value for key, value in STUDY_QUICK.items() if key not in config.explicitly_set}
    apply_unset(config, quick)
    config.explicitly_set |= set(quick)


def run_study(config: Config, runner: Runner = run_in_own_process) -> Path:
    """Run (or read from the cache) every unit; write the report from the records. Returns the folder."""
    from preftune.study.report import write_report

    started = time.time()
    if config.study.quick:
        apply_quick(config)
    inputs = study_inputs(config)
    folder = study_folder(config)
    records = run_units(config, inputs, folder, runner)
    results = [from_dict(record) for record in records]
    points = [p for unit_points, _ in results for p in unit_points]
    costs = [cost for _, cost in results]
    write_report(points, costs, config, folder)
    summary = {"seconds": round(time.time() - started), "units": len(records), "points": len(points)}
    (folder / "study.json").write_text(json.dumps(summary) + "\n")
    print(f"study of {len(records)} units ({len(points)} points) in {folder} ({summary['seconds']} s); "
          f"summary: {folder / 'summary.md'}", flush=True)
    return folder
