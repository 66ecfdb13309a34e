"""Metric logging for every loop: one JSON line per record in metrics.jsonl (the source of truth for plots,
reports and resume) and the numbers in TensorBoard. Only the main process writes; elsewhere `log` does nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

from preftune.runtime.run_folder import METRICS_FILE


class MetricLogger:
    def __init__(self, folder: Path, first_step: int, main_process: bool) -> None:
        """`first_step`: the step the run continues from (0 when fresh); TensorBoard drops the events a killed run
        logged past it (purge_step), as metrics.jsonl was restored from the checkpoint."""
        self.file = self.tensorboard = None
        if not main_process:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(folder / "tensorboard"), purge_step=first_step + 1)
        self.file = (folder / METRICS_FILE).open("a", encoding="utf-8")

    def log(self, values: dict, step: int, epoch: float) -> None:
        """One line {step, epoch, time, **values}; numbers go to TensorBoard as train/NAME or eval/NAME."""
        if self.file is None:
            return
        record = {"step": step, "epoch": round(epoch, 4), "time": time.time(), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in values.items():
            if isinstance(value, float | int):
                tag = f"eval/{name[5:]}" if name.startswith("eval_") else f"train/{name}"
                self.tensorboard.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tensorboard.close()
            self.file = self.tensorboard = None

