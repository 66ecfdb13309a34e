"""Metric logging for every loop: one JSON line per record in metrics.jsonl (the source of truth for plots,
reports and resume), and the same numbers to the experiment trackers named by --report-to through accelerate's
tracking (TensorBoard by default; wandb, mlflow, trackio, comet_ml, ...). Only the main process writes; elsewhere
`log` does nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import UserError
from preftune.runtime.run_folder import METRICS_FILE

if TYPE_CHECKING:
    from accelerate import Accelerator

# In the run folder: the tracker runs this run opened (to continue them on resume) and the last step of each kind
# of row they were sent.
TRACKERS_FILE = "trackers.json"

# pip names where they differ from accelerate's tracker names
PACKAGES = {"comet_ml": "comet-ml"}


def tracker_names(report_to: str) -> list[str]:
    """--report-to as accelerate's tracker names: comma-separated; 'none': none; 'all': every installed one.
    Unknown names, and trackers whose package is not installed, are errors (accelerate would skip them quietly)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names == ["none"]:
        return []
    installed = [str(tracker) for tracker in get_available_trackers()]
    if names == ["all"]:
        return installed
    known = sorted(LOGGER_TYPE_TO_CLASS)
    for name in names:
        if name not in known:
            raise UserError(f"--report-to: unknown tracker '{name}'; choose from {', '.join(known)}, all or none "
                            "(comma-separated)")
        if name not in installed:
            raise UserError(f"--report-to {name}: the {name} package is not installed "
                            f"(pip install {PACKAGES.get(name, name)}), or leave {name} out of --report-to")
    return list(dict.fromkeys(names))


def tracker_config(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The resolved config as the flat 'section.name' values every tracker takes (str, int, float, bool)."""
    return {f"{section}.{name}": value if isinstance(value, bool | int | float | str) else str(value)
            for section, values in config.items() for name, value in values.items()}


def read_tracker_state(path: Path) -> dict[str, Any]:
    """trackers.json, or a fresh state when it cannot be read (written by an older preftune before the write was
    atomic): the trackers then start new runs rather than the resume failing."""
    try:
        saved = json.loads(path.read_text())
        return {"runs": dict(saved["runs"]), "sent": dict(saved["sent"])}
    except (OSError, ValueError, KeyError, TypeError):
        print(f"warning: {path} is unreadable; the trackers start new runs", flush=True)
        return {"runs": {}, "sent": {}}


class MetricLogger:
    def __init__(self, accelerator: Accelerator, folder: Path, first_step: int, *, project: str,
                 run_name: str | None, config: dict[str, dict[str, Any]]) -> None:
        """`accelerator`: made with the trackers to log to (`log_with`), TensorBoard's folder as `logging_dir`.
        `first_step`: the step the run continues from (0 when fresh). On resume, metrics.jsonl has been restored
        from the checkpoint: TensorBoard drops the events a killed run logged past it (purge_step) and is sent
        them again; a tracker that cannot drop events (wandb, mlflow) continues its run and is not sent the
        steps it already has (the same numbers: the resume is exact)."""
        self.file = None
        self.trackers: list = []
        if not accelerator.is_main_process:
            return
        self.folder = folder
        resuming = first_step > 0 and (folder / TRACKERS_FILE).exists()
        saved = read_tracker_state(folder / TRACKERS_FILE) if resuming else {"runs": {}, "sent": {}}
        self.runs: dict[str, str] = saved["runs"]
        self.sent: dict[str, int] = saved["sent"]
        run_name = run_name or folder.name
        continued = {"resume": "allow"} if resuming else {}
        init_kwargs = {
            "tensorboard": {"purge_step": first_step + 1},
            "wandb": {"name": run_name, **({"id": self.runs["wandb"], **continued} if "wandb" in self.runs else {})},
            "mlflow": {"run_name": run_name, "run_id": self.runs.get("mlflow")},
            "trackio": {"name": run_name, **continued},
        }
        # a continued run holds its config already (mlflow refuses to change a logged parameter, and --resume
        # itself is one that changes)
        accelerator.init_trackers(project, config=None if resuming else tracker_config(config),
                                  init_kwargs=init_kwargs)
        self.trackers = list(accelerator.trackers)
        for tracker in self.trackers:  # the ids a resumed run continues
            if tracker.name == "wandb":
                self.runs["wandb"] = tracker.run.id
            elif tracker.name == "mlflow":
                self.runs["mlflow"] = tracker.active_run.info.run_id
        self.file = (folder / METRICS_FILE).open("a", encoding="utf-8")
        self.save_state()

    def log(self, values: dict, step: int, epoch: float) -> None:
        """One line {step, epoch, time, **values}; the numbers go to the trackers as train/NAME or eval/NAME."""
        if self.file is None:
            return
        record = {"step": step, "epoch": round(epoch, 4), "time": time.time(), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        kind = "eval" if any(name.startswith("eval_") for name in values) else "train"
        numbers = {(f"eval/{name[5:]}" if name.startswith("eval_") else f"train/{name}"): value
                   for name, value in values.items() if isinstance(value, float | int) and not isinstance(value, bool)}
        if not numbers:
            return
        for tracker in self.trackers:
            if tracker.name == "tensorboard" or step > self.sent.get(kind, 0):
                tracker.log(numbers, step=step)
        self.sent[kind] = max(step, self.sent.get(kind, 0))
        self.save_state()

    def save_state(self) -> None:
        # atomic: a run killed mid-write (kill -9) must leave the previous state, not an empty file
        staging = self.folder / (TRACKERS_FILE + ".tmp")
        staging.write_text(json.dumps({"runs": self.runs, "sent": self.sent}))
        staging.replace(self.folder / TRACKERS_FILE)

    def close(self) -> None:
        """Finish each tracker's run (not accelerate's end_training: it would also end the process group, which
        a notebook or sweep running several runs in one process keeps)."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
        if self.file is not None:
            self.file.close()
            self.file = None
