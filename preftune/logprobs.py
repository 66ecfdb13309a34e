"""(model, Batch) -> SequenceLogps: the only place that runs a model forward for training and evaluation.

Log-probabilities are summed over completion tokens only: token t is scored by the logits at position t-1.
Training, `preftune eval` and the reward scores all go through `sequence_logps`, so they agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.batching import Batch


@dataclass
class SequenceLogps:
    """Per-pair summed log-probabilities of the chosen and rejected completions, and their token counts.

    All tensors have shape (B,), B = pairs in the batch.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def detach(self) -> SequenceLogps:
        return SequenceLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens, self.rejected_tokens)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, (N, L, V), (N, L) -> (N, L), in float32.

    logsumexp + gather instead of log_softmax: avoids a second (N, L, V) tensor.
    """
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of each row, and their counts; (N, L) inputs -> (N,), (N,)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    mask = completion_mask[:, 1:]
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:]).masked_fill(~mask, 0.0)
    return per_token.sum(dim=-1), mask.sum(dim=-1)


def sequence_logps(model: torch.nn.Module, batch: Batch) -> SequenceLogps:
    """Run `model` once over chosen and rejected rows together and sum completion log-probs per sequence."""
    sums, counts = completion_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
    chosen, rejected = sums.chunk(2)
    chosen_tokens, rejected_tokens = counts.chunk(2)
    return SequenceLogps(chosen, rejected, chosen_tokens, rejected_tokens)
