"""Where the reference log-probabilities come from.

Today: a separate frozen model, or (LoRA without --ref-model) the policy itself with its adapter switched off,
which costs no extra weights; or none (--reference-free). A later on-disk cache of reference log-probs plugs in
here as another source. TR-DPO's reference updates (--sync-ref-model) live here too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from preftune.batching import Batch
from preftune.errors import UserError
from preftune.logprobs import SequenceLogps, sequence_logps

ReferenceSource = Callable[[Batch], SequenceLogps]


def reference_source(
    policy: torch.nn.Module, reference: torch.nn.Module | None, length_split: bool = False,
    reference_free: bool = False,
) -> ReferenceSource:
    """A function giving the reference's SequenceLogps for a batch, without gradients.

    length_split: with LD-DPO's tails (see `sequence_logps`). reference_free: no forward at all, zeros (the
    losses then read log pi_ref = 0).
    """
    if reference_free:

        def zeros(batch: Batch) -> SequenceLogps:
            counts = batch.completion_mask[:, 1:].sum(dim=-1)
            nothing = torch.zeros(counts.shape[0] // 2, device=counts.device)
            return SequenceLogps(nothing, nothing, *counts.chunk(2))

        return zeros

    if reference is not None:

        def from_model(batch: Batch) -> SequenceLogps:
            with torch.no_grad():
                return sequence_logps(reference, batch, length_split=length_split)

        return from_model

    if not hasattr(policy, "disable_adapter"):
        raise ValueError("no reference model, and the policy has no adapter to switch off")

    def from_disabled_adapter(batch: Batch) -> SequenceLogps:
        with torch.no_grad(), policy.disable_adapter():
            return sequence_logps(policy, batch, length_split=length_split)

    return from_disabled_adapter


def check_syncable(policy: torch.nn.Module, reference: torch.nn.Module) -> None:
    """--sync-ref-model mixes the weights one to one: the reference needs the policy's parameter shapes."""
    shapes = [tuple(p.shape) for p in policy.parameters()]
    if shapes != [tuple(p.shape) for p in reference.parameters()]:
        raise UserError("--sync-ref-model needs a reference model with the policy's architecture (the same "
                        "parameters, in the same order); --ref-model has others")


def sync_reference_model(policy: torch.nn.Module, reference: torch.nn.Module, mixup_alpha: float) -> None:
    """TR-DPO's soft update, in place: pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref.

    Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", arXiv:2404.09656 (TR-DPO^alpha);
    the trainer calls it after every --ref-model-sync-steps optimizer steps, as TRL's SyncRefModelCallback.
    """
    with torch.no_grad():
        for target, source in zip(reference.parameters(), policy.parameters(), strict=True):
            target.mul_(1.0 - mixup_alpha).add_(source.detach(), alpha=mixup_alpha)
