"""The accelerate runtime (device, mixed precision, processes) that training and evaluation run under."""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.state import AcceleratorState


def make_accelerator(bf16: bool, grad_accum: int = 1) -> Accelerator:
    """An Accelerator for one run.

    accelerate keeps a process-wide state and refuses a second Accelerator with another precision; several runs
    in one process (tests, sweeps, notebooks) are normal here, so the previous run's precision state is cleared
    first. The process group (PartialState) is kept. Remove once accelerate lets an Accelerator be re-configured.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision="bf16" if bf16 else "no", gradient_accumulation_steps=grad_accum)
