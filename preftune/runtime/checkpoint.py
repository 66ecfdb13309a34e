"""Checkpoints that resume exactly and are never taken whole when they are not.

A checkpoint `OUTPUT_DIR/checkpoint-STEP` holds the trainable weights (safetensors), the optimizer and scheduler
state, every random state, the loop's position in the data, the metrics logged so far and the resolved config.
It is written into a hidden staging folder, each file fsynced, then renamed into place; `manifest.json`, written
last, lists every file with its size and SHA-256, so a checkpoint damaged later (a truncated copy, a full disk
on another tool) is detected on resume and the previous one is used instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune.errors import UserError
from preftune.runtime.run_folder import METRICS_FILE

if TYPE_CHECKING:
    from preftune.runtime.processes import ProcessGroup

MANIFEST = "manifest.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def random_states() -> dict[str, Any]:
    """Every random state a run draws from, as plain lists and tensors (safe to load with weights_only)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates (all weights, or the LoRA adapter), by name."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def gather_training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool
) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable weights by name and the optimizer state, whole, for the main process to save.

    Sharded (FSDP): a collective that every process must call; the slices are gathered onto the main process's
    CPU (the others get empty dicts), and the optimizer state is keyed by parameter name rather than position.
    """
    if not sharded:
        return trainable_state(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {name: value for name, value in get_model_state_dict(model, options=options).items() if name in trainable}
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def save_checkpoint(
    output_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler: Any,
    loop_state: dict[str, Any],
    metrics_lines: list[str],
    config_yaml: str,
    keep: int | None,
) -> Path:
    """Write `checkpoint-STEP` atomically and keep only the newest `keep` checkpoints. Returns its path.
    `weights` and `optimizer_state` as `gather_training_state` gives them."""
    final = output_dir / f"checkpoint-{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    try:
        save_file(weights, staging / "model.safetensors")
        torch.save(
            {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "random": random_states()},
            staging / "training_state.pt",
        )
        (staging / "loop_state.json").write_text(json.dumps(loop_state), encoding="utf-8")
        (staging / "metrics.jsonl").write_text("".join(metrics_lines), encoding="utf-8")
        (staging / "preftune_config.yaml").write_text(config_yaml, encoding="utf-8")
        files = sorted(p for p in staging.iterdir())
        for path in files:
            _fsync(path)
        manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (staging / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1), encoding="utf-8")
        _fsync(staging / MANIFEST)
        if final.exists():  # a checkpoint of this step from an interrupted earlier attempt: replace it
            shutil.rmtree(final)
        staging.rename(final)
        _fsync(output_dir)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = "the disk is full" if error.errno == errno.ENOSPC else str(error)
        previous = latest_checkpoint(output_dir, warn=False)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise UserError(f"could not save checkpoint {final}: {reason}{kept}") from None
    for old in list_checkpoints(output_dir)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders in `output_dir`, oldest first (staging folders are hidden and never listed)."""
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a whole checkpoint, or None when every file matches its manifest."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return "its manifest is missing or unreadable"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{name} has {file.stat().st_size} bytes, expected {expected['size']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(output_dir: Path, warn: bool = True) -> Path | None:
    """The newest whole checkpoint; damaged newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if warn:
            warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
            print(f"warning: skipping damaged checkpoint {path}: {problem}", flush=True)
    return None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, sharded: bool = False,
    main_process: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Restore weights, optimizer, scheduler and random states in place; returns (loop state, metrics lines).

    Sharded (FSDP): a collective that every process must call; the main process reads the whole weights and
    optimizer state and sends each process its slice.
    """
    # mmap: under FSDP only the main process reads the optimizer state; the others touch just the small parts
    state = torch.load(path / "training_state.pt", weights_only=True, mmap=True)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # strict=False: the file holds the trainable weights only
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        weights = load_file(path / "model.safetensors") if main_process else {}
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"] if main_process else {}, options=options)
    else:
        weights = load_file(path / "model.safetensors")
        parameters = dict(model.named_parameters())
        for name, value in weights.items():
            with torch.no_grad():
                parameters[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_random_states(state["random"])
    loop_state = json.loads((path / "loop_state.json").read_text(encoding="utf-8"))
    metrics_lines = (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    return loop_state, metrics_lines


# ---- a run's checkpoints: what every loop calls ------------------------------------------------------------------
def find_checkpoint(resume: str, output_dir: Path) -> Path:
    """The checkpoint named by --resume: 'latest' (the newest whole one in the run folder) or a folder."""
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise UserError(f"--resume: no whole checkpoint in {output_dir} (were checkpoints saved, --save-steps?)")
        return found
    path = Path(resume)
    if not (path / "loop_state.json").is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no loop_state.json)")
    return path


def write_run_checkpoint(
    group: ProcessGroup, folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, loop_state: dict[str, Any], config_yaml: str, keep: int | None,
) -> Path:
    """`checkpoint-STEP` of a run (every process calls it: under FSDP each sends its slices). `loop_state` must hold
    `world_size` and `sharded`, which `restore_run_checkpoint` checks."""
    path = folder / f"checkpoint-{step}"
    if group.is_main or group.sharded:
        weights, optimizer_state = gather_training_state(group.unwrap(model), optimizer, group.sharded)
    if group.is_main:
        metrics_lines = (folder / METRICS_FILE).read_text(encoding="utf-8").splitlines(keepends=True)
        path = save_checkpoint(folder, step, weights, optimizer_state, scheduler, loop_state, metrics_lines,
                               config_yaml, keep)
    group.wait()
    return path


def restore_run_checkpoint(
    group: ProcessGroup, checkpoint: Path, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Continue from `checkpoint`: weights, optimizer, schedule, random states, and metrics.jsonl (rows a killed
    run wrote after the checkpoint are dropped). Returns the loop state saved with it."""
    saved = json.loads((checkpoint / "loop_state.json").read_text(encoding="utf-8"))
    if saved.get("world_size", 1) != group.world_size:
        raise UserError(f"{checkpoint} was written by {saved.get('world_size', 1)} processes; resume it "
                        f"with the same number (now {group.world_size})")
    if saved.get("sharded", False) != group.sharded:
        written, now = ("under FSDP", "without") if saved.get("sharded") else ("without FSDP", "under FSDP")
        raise UserError(f"{checkpoint} was written {written}; resume it the same way (now {now})")
    loop_state, metrics_lines = load_checkpoint(checkpoint, group.unwrap(model), optimizer, scheduler, group.sharded,
                                                group.is_main)
    if group.is_main:
        staging = folder / (METRICS_FILE + ".tmp")
        staging.write_text("".join(metrics_lines), encoding="utf-8")
        staging.replace(folder / METRICS_FILE)
    group.wait()
    group.print(f"resuming from {checkpoint} at step {loop_state['step']}")
    return loop_state
