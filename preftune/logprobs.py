"""(model, Batch) -> SequenceLogps: the only place that runs a model forward for training and evaluation.

Log-probabilities are summed over completion tokens only: token t is scored by the logits at position t-1.
Training, `preftune eval` and the reward scores all go through `sequence_logps`, so they agree by construction.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from dataclasses import dataclass

import torch

from preftune.batching import Batch


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


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, (..., V), (...) -> (...), in float32.

    logsumexp + gather instead of log_softmax: avoids a second (N, L, V) tensor.
    """
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def keeps_positions(model: torch.nn.Module) -> bool:
    """Whether `model(..., logits_to_keep=<bool (N, L) mask>)` computes the logits at the masked positions only.

    transformers' models that slice with `slice_logits_to_keep` (nearly all causal LMs since 5.x) do; others get
    the full logits, sliced here.
    """
    while True:  # through DDP's and peft's wrappers to the transformers model
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
    modeling = sys.modules.get(type(model).__module__)
    return (hasattr(modeling, "slice_logits_to_keep")
            and "logits_to_keep" in inspect.signature(model.forward).parameters)


def completion_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    log_sum_sq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-position log-probs of the completion tokens (0 elsewhere) and the completion mask, (N, L) -> (N, L-1);
    with `log_sum_sq`, also log sum_v p(v)^2 at each completion position (WPO's normaliser; 0 elsewhere),
    detached, else None.

    The output head runs only where a completion token is predicted: the (tokens x vocabulary) logits of the
    prompts and the padding are never formed, which saves the head's compute there and most of the logits' memory.
    """
    mask = completion_mask[:, 1:]  # position t predicts token t + 1
    labels = input_ids[:, 1:][mask]  # (T,), T = completion tokens in the batch, row by row
    if keeps_positions(model):
        predicting = torch.zeros_like(completion_mask)
        predicting[:, :-1] = mask
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=predicting).logits  # (T, V)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][mask]
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(
        mask, token_logps(logits, labels)
    )
    sum_sq = None
    if log_sum_sq:
        with torch.no_grad():
            z = logits.float()
            values = torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)
            sum_sq = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, values)
    return per_token, mask, sum_sq


def completion_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of each row, and their counts; (N, L) inputs -> (N,), (N,)."""
    per_token, mask, _ = completion_token_logps(model, input_ids, attention_mask, completion_mask)
    return per_token.sum(dim=-1), mask.sum(dim=-1)


def sequence_logps(
    model: torch.nn.Module, batch: Batch, length_split: bool = False, wpo_weights: bool = False
) -> SequenceLogps:
    """Run `model` once over chosen and rejected rows together and sum completion log-probs per sequence.

    length_split: also the LD-DPO tails (arXiv:2409.06411); wpo_weights: also the WPO weights (arXiv:2406.11827).
    """
    per_token, mask, sum_sq = completion_token_logps(
        model, batch.input_ids, batch.attention_mask, batch.completion_mask, log_sum_sq=wpo_weights
    )
    counts = mask.sum(dim=-1)
    logps = SequenceLogps(*per_token.sum(dim=-1).chunk(2), *counts.chunk(2))
    if length_split:
        # rows are [chosen..., rejected...]: pair i's shared length applies to rows i and B + i
        shared = torch.minimum(*counts.chunk(2)).repeat(2)
        past_shared = mask.cumsum(dim=-1) > shared.unsqueeze(-1)
        logps.chosen_tail, logps.rejected_tail = per_token.masked_fill(~past_shared, 0.0).sum(dim=-1).chunk(2)
    if wpo_weights:
        with torch.no_grad():
            aligned = ((per_token - sum_sq) * mask).sum(dim=-1) / counts.clamp(min=1)
            logps.chosen_weight, logps.rejected_weight = torch.exp(aligned).chunk(2)
    return logps
