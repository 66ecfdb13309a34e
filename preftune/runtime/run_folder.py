"""The run folder: created without losing anything a user made, its resolved config, and the resume checks."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import yaml

from preftune.config import Config, math_differences, save_yaml
from preftune.errors import UserError

CONFIG_FILE = "preftune_config.yaml"
METRICS_FILE = "metrics.jsonl"


def prepare_output_dir(output_dir: str | None, overwrite: bool, resuming: bool, prefix: str = "preftune") -> Path:
    """The run folder, created; a non-empty one is refused unless resuming or `overwrite`, so no run is lost."""
    path = Path(output_dir) if output_dir else Path("runs") / datetime.now().strftime(f"{prefix}-%Y%m%d-%H%M%S")
    if path.exists() and not path.is_dir():
        raise UserError(f"--output-dir {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise UserError(f"--output-dir {path} is not empty; choose another folder, pass --resume to continue the "
                        "run in it, or --overwrite")
    path.mkdir(parents=True, exist_ok=True)
    if overwrite and not resuming:  # a fresh log: appending to an old run's metrics would mix two runs
        (path / METRICS_FILE).unlink(missing_ok=True)
    return path


def claim_run_folder(output_dir: str | None, overwrite: bool, resuming: bool) -> Path:
    """The run folder, prepared by the main process (the default name has the time in it) and its path given to
    the others."""
    from accelerate.utils import broadcast_object_list

    from preftune.runtime.accelerator import process_state

    state = process_state()
    box = [str(prepare_output_dir(output_dir, overwrite, resuming)) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(box)
    return Path(box[0])


def check_resumable(checkpoint: Path, config: Config) -> None:
    """Refuse, before any model loads, to resume with settings that change the math."""
    saved = yaml.safe_load((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    differences = math_differences(saved, config)
    if differences:
        raise UserError(f"cannot resume from {checkpoint}: settings differ from the checkpoint's:\n  "
                        + "\n  ".join(differences))


def save_config(config: Config, folder: Path) -> None:
    save_yaml(config, folder / CONFIG_FILE)
