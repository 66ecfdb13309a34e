"""The process group one run is in: who it is, how many there are, and the collectives a loop needs.

Every helper is a no-op (no communication) in a single process, so a loop calls them unconditionally. Under FSDP
(`sharded`) each process holds a slice of every weight: every forward is then a collective that all processes
run together, which is why some helpers here run on every process, not only the main one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from preftune.runtime.accelerator import sharded_engine

if TYPE_CHECKING:
    from preftune.objectives.metrics import MetricTotals


@dataclass(frozen=True)
class ProcessGroup:
    accelerator: Accelerator
    rank: int
    world_size: int
    sharded: bool  # FSDP: each process holds a slice of the weights

    @classmethod
    def of(cls, accelerator: Accelerator) -> ProcessGroup:
        return cls(accelerator, accelerator.process_index, accelerator.num_processes, sharded_engine(accelerator))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def print(self, *args: Any) -> None:
        """Print once (on the main process), flushed."""
        self.accelerator.print(*args, flush=True)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model without accelerate's DDP wrapper (FSDP2 modules are their own class, and stay as they are)."""
        return self.accelerator.unwrap_model(model)

    def broadcast(self, value: Any) -> Any:
        """The main process's `value`, on every process (any picklable object)."""
        if self.world_size == 1:
            return value
        box = [value]
        broadcast_object_list(box)
        return box[0]

    def reduce(self, totals: MetricTotals) -> MetricTotals:
        """Metric sums added over all processes: means are then over every pair of the step, not per process."""
        if self.world_size == 1:
            return totals
        names = sorted(totals.sums)
        packed = torch.tensor([totals.sums[n] for n in names] + [totals.num_pairs], dtype=torch.float64,
                              device=self.device)
        packed = self.accelerator.reduce(packed, reduction="sum").tolist()
        reduced = type(totals)()
        reduced.add(dict(zip(names, packed[:-1])), int(packed[-1]))
        return reduced

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes (each process's own mean counts once; every process calls it)."""
        if self.world_size == 1:
            return values
        names = sorted(values)
        packed = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=self.device)
        packed = self.accelerator.reduce(packed, reduction="mean").tolist()
        return dict(zip(names, packed))

    def any_process(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any (so that all stop, or all compute, together)."""
        if self.world_size == 1:
            return flag
        flags = torch.tensor([float(flag)], device=self.device)
        return bool(self.accelerator.reduce(flags, reduction="sum").item() > 0)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (a reference) ready for this run's forwards: under FSDP sharded as the policy is (so a
        process holds a slice of it too), else moved to the device."""
        if not self.sharded:
            return model.to(self.device)
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        plugin = self.accelerator.state.fsdp_plugin
        configured = plugin.reshard_after_forward
        # always free the gathered weights after the forward: no backward follows to do it (with the ZeRO-2-like
        # setting a frozen model would otherwise stay gathered, unsharded, for the rest of the run)
        plugin.reshard_after_forward = True
        try:
            return fsdp2_prepare_model(self.accelerator, model)
        finally:
            plugin.reshard_after_forward = configured


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (FSDP's gradient norm comes as one), else `value` itself."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
