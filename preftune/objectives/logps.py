"""`SequenceLogps`: what a preference loss reads of a batch, the per-pair log-probabilities of chosen and rejected.

The forward layer (forward/logprobs.py) computes it; the losses and metrics in this folder consume it, so it lives
here, below both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class SequenceLogps:
    """Per-pair summed log-probabilities of the chosen and rejected completions, and their token counts.

    All tensors have shape (B,), B = pairs in the batch. The optional extras are computed only when a loss option
    needs them (`sequence_logps(..., length_split=True, wpo_weights=True)`) and are None otherwise.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    # LD-DPO: the part of `chosen` / `rejected` from the tokens past the pair's shared length min(|y_w|, |y_l|)
    chosen_tail: torch.Tensor | None = None
    rejected_tail: torch.Tensor | None = None
    # WPO: exp(mean over the completion of log p(y_t) - log sum_v p(v)^2), the policy's weight of each sequence;
    # detached (WPO treats the weights as constants)
    chosen_weight: torch.Tensor | None = None
    rejected_weight: torch.Tensor | None = None

    def detach(self) -> SequenceLogps:
        return SequenceLogps(*(None if t is None else t.detach() for t in dataclasses.astuple(self)))
