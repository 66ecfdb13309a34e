"""The accelerate runtime (device, mixed precision, processes) that training and evaluation run under."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator


def make_accelerator(bf16: bool, grad_accum: int = 1) -> Accelerator:
    """An Accelerator for one run.

    accelerate keeps a process-wide state and refuses a second Accelerator with another precision; several runs
    in one process (tests, sweeps, notebooks) are normal here, so the previous run's precision state is cleared
    first. The process group (PartialState) is kept. Remove once accelerate lets an Accelerator be re-configured.
    """
    # imported here: the CLI imports this module for launching, and `--help` should not wait for torch
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: accelerate then runs several CPU processes (torchrun, accelerate launch) on gloo
    accelerator = Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=grad_accum,
        cpu=not torch.cuda.is_available(),
    )
    check_engine(str(accelerator.distributed_type.value))
    return accelerator


# What preftune's loop has been built and tested for: one process, or data parallel (DDP) over CPU or GPU
# processes. Under a sharding engine each process holds a slice of the weights, and the main-process-only model
# saving, per-process evaluation and sampling would silently write or score a slice.
SUPPORTED_ENGINES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA")


def check_engine(distributed_type: str) -> None:
    """Refuse to run under an engine whose sharded weights preftune's loop does not handle (FSDP, DeepSpeed)."""
    from preftune.errors import UserError

    if distributed_type not in SUPPORTED_ENGINES:
        raise UserError(
            f"preftune does not run under accelerate's {distributed_type} engine yet (it shards the weights, and "
            "preftune saves, evaluates and samples from whole ones). Launch with data parallelism instead "
            "(configs/accelerate/ddp.yaml, torchrun, --num-processes) and save memory with --gradient-checkpointing, "
            "--lora, --load-in-4bit or --precompute-ref-log-probs; see the README's 'More than one process'."
        )


def launched() -> bool:
    """True inside a process started by torchrun or accelerate launch."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_processes(num_processes: int, argv: list[str]) -> int:
    """Run `preftune <argv>` in `num_processes` processes with torchrun; returns the exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
               "-m", "preftune.cli", *argv]
    return subprocess.call(command)
