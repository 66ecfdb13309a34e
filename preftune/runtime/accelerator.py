"""The accelerate runtime (device, mixed precision, engines) that every loop and evaluation runs under, and the
launcher for several processes."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


def make_accelerator(bf16: bool, grad_accum: int = 1, trackers: list[str] | None = None,
                     logging_dir: str | None = None) -> Accelerator:
    """An Accelerator for one run; `trackers` (accelerate's names) log there, TensorBoard's under `logging_dir`.

    accelerate keeps a process-wide state and refuses a second Accelerator with another precision; several runs
    in one process (tests, sweeps, notebooks) are normal here, so the previous run's precision state is cleared
    first. The process group (PartialState) is kept. Remove once accelerate lets an Accelerator be re-configured.
    """
    # imported here: the CLI imports this module for launching, and `--help` should not wait for torch
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: accelerate then runs several CPU processes (torchrun, accelerate launch) on gloo
    accelerator = Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=grad_accum,
        cpu=not torch.cuda.is_available(),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=logging_dir, logging_dir=logging_dir),
    )
    if fsdp_requested() and accelerator.distributed_type.value == "MULTI_CPU":
        shard_on_cpu_processes(accelerator)
    engine = accelerator.distributed_type.value
    check_engine(engine, accelerator.state.fsdp_plugin.fsdp_version if engine == "FSDP" else None)
    return accelerator


def process_state() -> Any:
    """accelerate's process group (PartialState) alone, started as make_accelerator's Accelerator starts it: who
    this process is, before a run's Accelerator exists (the run folder is decided first, as its trackers log
    there)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_on_cpu_processes(accelerator: Accelerator) -> None:
    """Turn FSDP on for CPU processes (gloo), as the launcher asked.

    accelerate 1.15 switches to FSDP only for GPU-type process groups and leaves CPU processes on plain data
    parallelism, though torch's FSDP2 runs over gloo. This sets the engine and the plugin (read from the same
    FSDP_* variables accelerate reads) the way accelerate does for GPUs; its prepare, clip_grad_norm_ and
    get_state_dict then take their FSDP2 paths. It is what lets the sharded paths be tested without a GPU.
    Remove once accelerate enables FSDP for MULTI_CPU.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    # as accelerate's own FSDP setup does: every later AcceleratorState() re-reads the type from PartialState
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


# The engines preftune's loop is built and tested for: one process; data parallel (DDP) over CPU or GPU
# processes; FSDP2, which shards weights, gradients and optimizer state (every forward is then a collective, and
# saving gathers the weights). DeepSpeed, and FSDP1's wrapper, need paths of their own and are refused.
DATA_PARALLEL_ENGINES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA")


def sharded_engine(accelerator: Accelerator) -> bool:
    """True when each process holds a slice of the weights (FSDP)."""
    return accelerator.distributed_type.value == "FSDP"


def sharded_model(model: torch.nn.Module) -> bool:
    """True when `model`'s weights are split across processes (FSDP2 has made it an FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Under FSDP, free the whole weights still gathered from the last forward (the root module keeps its own
    gathered after a forward), so that `model.parameters()` are this process's slices again. Else nothing."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def init_sharded_root(model: torch.nn.Module) -> None:
    """Under FSDP2, make `model` the root of its sharded modules now, as its first forward would; else nothing.

    FSDP takes the first sharded module to run a forward as the root. A loop whose first forward is peft's
    generate (the online loop's first rollout under LoRA) reaches an inner one first, the tied embedding and output
    head's shared unit, which FSDP refuses as a root. torch 2.13 has no public call for this."""
    if sharded_model(model):
        model._get_fsdp_state()._lazy_init()


def weights_held(model: torch.nn.Module) -> tuple[int, int]:
    """(elements of the weights this process holds, elements of the whole weights). Under FSDP each parameter is a
    DTensor whose local part is this process's slice (the root's gathered weights are freed first); else both are
    the whole count."""
    reshard(model)
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    return held, sum(p.numel() for p in model.parameters())


def check_engine(engine: str, fsdp_version: int | None = None) -> None:
    """Refuse an engine preftune's loop does not handle (DeepSpeed, FSDP version 1) before any model loads."""
    from preftune.errors import UserError

    if engine in DATA_PARALLEL_ENGINES or (engine == "FSDP" and fsdp_version == 2):
        return
    what = "FSDP version 1" if engine == "FSDP" else f"accelerate's {engine} engine"
    raise UserError(
        f"preftune does not run under {what}. For sharded weights use FSDP2 (configs/accelerate/fsdp.yaml, "
        "fsdp_version: 2), which shards like DeepSpeed ZeRO-3; for data parallelism configs/accelerate/ddp.yaml, "
        "torchrun or --num-processes; see the README's 'More than one process'."
    )


def launched() -> bool:
    """True inside a process started by torchrun or accelerate launch."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_processes(num_processes: int, argv: list[str]) -> int:
    """Run `preftune <argv>` in `num_processes` processes with torchrun; returns the exit code (2 when a process
    stopped on a user error, whose message it has printed)."""
    starter = "import sys; from preftune.runtime.accelerator import torchrun; sys.exit(torchrun())"
    command = [sys.executable, "-c", starter,
               "--standalone", f"--nproc-per-node={num_processes}", "-m", "preftune.cli", *argv]
    return subprocess.call(command)


def torchrun() -> int:
    """torchrun on sys.argv, exiting with the processes' own exit code when one fails, without torchrun's
    traceback on top: each process has already said why it stopped."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(sys.argv[1:]))
    except ChildFailedError as failed:
        codes = [failure.exitcode for failure in failed.failures.values()]
        return max(codes) if max(codes) > 0 else 1  # negative: killed by a signal
    return 0
