"""(model, Batch) -> SequenceLogps: the only place that runs a model forward for training and evaluation.

Log-probabilities are summed over completion tokens only, each scored by the logits of the position the Batch
names as its predictor (in the padded layout, the position before it).
Training, `preftune eval` and the reward scores all go through `sequence_logps`, so they agree by construction.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from dataclasses import dataclass

import torch

from preftune.batching import Batch, padded_batch


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


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP's and peft's wrappers (which do not forward `config` or `forward`'s
    signature)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


@functools.cache
def _slices_logits(model_class: type) -> bool:
    modeling = sys.modules.get(model_class.__module__)
    return (hasattr(modeling, "slice_logits_to_keep")
            and "logits_to_keep" in inspect.signature(model_class.forward).parameters)


def keeps_positions(model: torch.nn.Module) -> bool:
    """Whether `model(..., logits_to_keep=<bool (N, L) mask>)` computes the logits at the masked positions only.

    transformers' models that slice with `slice_logits_to_keep` (nearly all causal LMs since 5.x) do; others get
    the full logits, sliced here. Decided once per model class: this runs on every forward.
    """
    return _slices_logits(type(unwrapped(model)))


def sum_per_sequence(values: torch.Tensor, sequences: torch.Tensor, count: int) -> torch.Tensor:
    """(T,) per-token values -> (count,) sums over the tokens of each sequence."""
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, sequences, values)


def scored_token_logps(
    model: torch.nn.Module, batch: Batch, log_sum_sq: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token | what precedes it) of every scored token of `batch`, (T,) float32; with `log_sum_sq`, also
    log sum_v p(v)^2 at each one's predicting position (WPO's normaliser), detached, else None.

    The output head runs only at the predicting positions: the (tokens x vocabulary) logits of the prompts and
    the padding are never formed, which saves the head's compute there and most of the logits' memory.
    """
    rows, columns = batch.input_ids.shape
    keep = torch.zeros((rows, columns), dtype=torch.bool, device=batch.input_ids.device)
    keep[batch.token_rows, batch.token_predictors] = True
    # where each token's predicting position lands among the kept ones (row-major; two tokens may share one)
    slot = keep.flatten().cumsum(0).sub_(1)[batch.token_rows * columns + batch.token_predictors]
    inputs = {"input_ids": batch.input_ids, "attention_mask": attention_mask_for(model, batch.attention_mask)}
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
    if keeps_positions(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (K, V)
    else:
        logits = model(**inputs, use_cache=False).logits[keep]
    logits = logits.float()
    normaliser = torch.logsumexp(logits, dim=-1)  # (K,)
    per_token = logits[slot, batch.token_labels] - normaliser[slot]
    sum_sq = None
    if log_sum_sq:
        with torch.no_grad():
            sum_sq = (torch.logsumexp(2 * logits, dim=-1) - 2 * normaliser)[slot]
    return per_token, sum_sq


def attention_mask_for(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A 4D boolean mask as the model's attention takes it: as is for SDPA; for eager, which adds the mask to
    the scores, 0 where allowed and the float minimum elsewhere."""
    if mask.dim() != 4:
        return mask
    config = getattr(unwrapped(model), "config", None)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)
    return mask


def completion_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of each right-padded row, and their counts; (N, L) inputs ->
    (N,), (N,)."""
    batch = padded_batch(input_ids, attention_mask, completion_mask, pair_indices=[])
    per_token, _ = scored_token_logps(model, batch)
    rows = input_ids.shape[0]
    return sum_per_sequence(per_token, batch.token_sequences, rows), torch.bincount(batch.token_sequences,
                                                                                  minlength=rows)


def sequence_logps(
    model: torch.nn.Module, batch: Batch, length_split: bool = False, wpo_weights: bool = False
) -> SequenceLogps:
    """Run `model` once over the batch (chosen and rejected together) and sum completion log-probs per sequence.

    length_split: also the LD-DPO tails (arXiv:2409.06411); wpo_weights: also the WPO weights (arXiv:2406.11827).
    """
    per_token, sum_sq = scored_token_logps(model, batch, log_sum_sq=wpo_weights)

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        return sum_per_sequence(values, batch.token_sequences, 2 * batch.num_pairs)

    counts = batch.token_counts()
    logps = SequenceLogps(*per_sequence(per_token).chunk(2), *counts.chunk(2))
    if length_split:
        # pair i's shared length min(|y_w|, |y_l|) applies to its sequences i and B + i
        shared = torch.minimum(*counts.chunk(2)).repeat(2)
        past_shared = batch.token_ranks >= shared[batch.token_sequences]
        logps.chosen_tail, logps.rejected_tail = per_sequence(per_token * past_shared).chunk(2)
    if wpo_weights:
        with torch.no_grad():
            aligned = per_sequence(per_token - sum_sq) / counts.clamp(min=1)
            logps.chosen_weight, logps.rejected_weight = torch.exp(aligned).chunk(2)
    return logps
