"""Where the reference log-probabilities come from.

Today: a separate frozen model, or (LoRA without --ref-model) the policy itself with its adapter switched off,
which costs no extra weights. A later on-disk cache of reference log-probs plugs in here as another source.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from preftune.batching import Batch
from preftune.logprobs import SequenceLogps, sequence_logps

ReferenceSource = Callable[[Batch], SequenceLogps]


def reference_source(policy: torch.nn.Module, reference: torch.nn.Module | None) -> ReferenceSource:
    """A function giving the reference's SequenceLogps for a batch, without gradients."""
    if reference is not None:

        def from_model(batch: Batch) -> SequenceLogps:
            with torch.no_grad():
                return sequence_logps(reference, batch)

        return from_model

    if not hasattr(policy, "disable_adapter"):
        raise ValueError("no reference model, and the policy has no adapter to switch off")

    def from_disabled_adapter(batch: Batch) -> SequenceLogps:
        with torch.no_grad(), policy.disable_adapter():
            return sequence_logps(policy, batch)

    return from_disabled_adapter
