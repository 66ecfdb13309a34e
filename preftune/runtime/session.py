"""Opening a training run, for every loop: trackers checked, run folder claimed, process group started, resume
checked, config saved, seeds set; and the optimizer and schedule every loop builds the same way."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

from preftune.config import Config
from preftune.errors import UserError
from preftune.runtime.accelerator import make_accelerator
from preftune.runtime.checkpoint import find_checkpoint
from preftune.runtime.logging import MetricLogger, tracker_names
from preftune.runtime.processes import ProcessGroup
from preftune.runtime.run_folder import check_resumable, claim_run_folder, save_config


@dataclass
class Session:
    """A run before its models: the process group, the run folder and the checkpoint to resume from."""

    config: Config
    group: ProcessGroup
    folder: Path
    resume_from: Path | None

    def logger(self, first_step: int) -> MetricLogger:
        t = self.config.train
        return MetricLogger(self.group.accelerator, self.folder, first_step, project=t.project, run_name=t.run_name,
                            config=self.config.to_dict())


def open_session(config: Config) -> Session:
    """Start the process group and create the run folder (the main process decides it; a non-empty one is refused
    unless resuming or --overwrite), refuse resuming with settings that change the math, save the resolved config.
    Call it after the data is checked: a bad file stops before this writes anything."""
    c = config
    trackers = tracker_names(c.train.report_to)  # an unknown or missing tracker stops before anything loads
    folder = claim_run_folder(c.train.output_dir, c.train.overwrite, bool(c.train.resume))
    c.train.output_dir = str(folder)
    group = ProcessGroup.of(make_accelerator(c.model.bf16, c.train.grad_accum, trackers, str(folder / "tensorboard")))
    if group.sharded and c.model.load_in_4bit:  # FSDP over bitsandbytes' packed weights needs its own storage
        raise UserError("--load-in-4bit under FSDP is not supported: use QLoRA with data parallelism "
                        "(configs/accelerate/ddp.yaml), or LoRA under FSDP")
    resume_from = find_checkpoint(c.train.resume, folder) if c.train.resume else None
    if resume_from is not None:
        check_resumable(resume_from, c)
    if group.is_main:
        save_config(c, folder)
    set_seed(c.train.seed)
    return Session(c, group, folder, resume_from)


def evaluation_interval(eval_steps: float, total_steps: int) -> int:
    """--eval-steps as optimizer steps: a whole number as it is, a fraction in (0, 1) of the run's steps (TRL)."""
    if 0 < eval_steps < 1:
        return max(1, math.ceil(round(eval_steps * total_steps, 6)))
    return int(eval_steps)


def make_optimizer(config: Config, model: torch.nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    t = config.train
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
        # one kernel over all parameters: no whole-model temporaries (the for-each path makes several) and faster;
        # TRL's default (adamw_torch_fused) too
        fused=True,
    )
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def prepare_training(session: Session, model: torch.nn.Module, total_steps: int) -> tuple[torch.nn.Module, Any, Any]:
    """The optimizer and schedule, and the model and optimizer prepared by accelerate (DDP or FSDP)."""
    optimizer, scheduler = make_optimizer(session.config, model, total_steps)
    # the scheduler stays out of accelerate's prepare: that wrapper steps it once per process, for loaders it
    # shards itself; our step count is already global
    model, optimizer = session.group.accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler
