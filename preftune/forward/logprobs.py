"""(model, Batch) -> SequenceLogps: the only place that runs a model forward for training and evaluation.

Log-probabilities are summed over completion tokens only, each scored by the logits of the position the Batch
names as its predictor (in the padded layout, the position before it).
Training, `preftune eval` and the reward scores all go through `sequence_logps`, so they agree by construction.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Iterator

import torch

from preftune.data.batching import Batch, padded_batch
from preftune.objectives.logps import SequenceLogps
from preftune.runtime.accelerator import sharded_model


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
    return _slices_logits(model_class(model))


def model_class(model: torch.nn.Module) -> type:
    """The transformers class of `model` (FSDP2 swaps a sharded model's class for an `FSDP<Name>` subclass)."""
    cls = type(unwrapped(model))
    from torch.distributed.fsdp import FSDPModule

    return next(base for base in cls.__mro__ if not issubclass(base, FSDPModule))


# Model types whose logits are exactly `lm_head(hidden)` (no soft-capping or scaling after the head), so the head
# can be applied here, in chunks. Others run their own head (on the kept positions only).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
# Logits held at once by the chunked head: 2**26 floats (256 MB) is 1,365 positions of a 49,152-token vocabulary,
# 512 of Llama 3's 128,256. Micro-batches with fewer scored positions run the model's own head (on those positions
# only): the chunked head recomputes the logits in the backward, about 5% of a step on SmolLM2-135M (CPU).
HEAD_CHUNK_ELEMENTS = 2**26


def plain_output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output head if preftune may apply it itself (see PLAIN_HEAD_MODEL_TYPES), else None."""
    inner = unwrapped(model)
    if getattr(getattr(inner, "config", None), "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if sharded_model(model) or sharded_model(inner):  # FSDP gathers the head's weight inside the forward only
        return None
    head = inner.get_output_embeddings()
    # exactly a Linear: a LoRA-wrapped head (peft's modules_to_save or a targeted lm_head) runs as the model's
    return head if type(head) is torch.nn.Linear and keeps_positions(model) else None


@contextlib.contextmanager
def output_head_bypassed(model: torch.nn.Module, head: torch.nn.Module) -> Iterator[None]:
    """Within: the model's forward returns the final hidden states (at `logits_to_keep`) in place of logits
    (`head`, its output head, is swapped for an identity). The forward still goes through every wrapper (DDP must
    see it, to reduce the gradients)."""
    inner = unwrapped(model)
    name = next(name for name, child in inner.named_children() if child is head)
    setattr(inner, name, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(inner, name, head)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Log-softmax in float32 at least: bf16 logits are widened; a float64 model keeps float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class ChunkedHeadLogps(torch.autograd.Function):
    """log softmax(hidden W^T + b)[label] per row, computed HEAD_CHUNK_ELEMENTS logits at a time, forward and
    backward (which recomputes each chunk's logits): the (rows x vocabulary) logits, and their gradient, are never
    held whole. (T, H) hidden, (V, H) weight, (V,) bias or None, (T,) labels -> (T,) log-probs (float32 or wider),
    (T,) log sum_v p(v)^2 (WPO's normaliser, no gradient) if `with_sum_sq` and (T,) entropies -sum_v p(v) log p(v)
    (no gradient) if `with_entropy` (else empty tensors)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, with_sum_sq, with_entropy):  # noqa: ANN001, ANN205
        rows = max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])
        logps, normalisers, sums_sq, entropies = [], [], [], []
        for start in range(0, hidden.shape[0], rows):
            logits = torch.nn.functional.linear(hidden[start : start + rows], weight, bias)
            ctx.compute_dtype = logits.dtype  # bf16 under autocast (the same for every chunk); the backward too
            logits = at_least_float32(logits)
            normaliser = torch.logsumexp(logits, dim=-1)
            logps.append(logits.gather(1, labels[start : start + rows, None]).squeeze(1) - normaliser)
            normalisers.append(normaliser)
            if with_sum_sq:
                sums_sq.append(torch.logsumexp(2 * logits, dim=-1) - 2 * normaliser)
            if with_entropy:
                entropies.append(entropy_of(logits, normaliser))
        ctx.save_for_backward(hidden, weight, bias, labels, torch.cat(normalisers))
        ctx.rows = rows
        empty = logps[0].new_empty(0)  # an output not asked for
        sum_sq = torch.cat(sums_sq) if with_sum_sq else empty
        entropy = torch.cat(entropies) if with_entropy else empty.clone()
        ctx.mark_non_differentiable(sum_sq, entropy)
        return torch.cat(logps), sum_sq, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_sum_sq, _grad_entropy):  # noqa: ANN001, ANN205
        hidden, weight, bias, labels, normaliser = ctx.saved_tensors
        dtype, rows = ctx.compute_dtype, ctx.rows
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = at_least_float32(torch.zeros_like(weight)) if needs_weight else None
        grad_bias = at_least_float32(torch.zeros_like(bias)) if needs_bias else None
        weight_in, bias_in = weight.to(dtype), None if bias is None else bias.to(dtype)
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            h = hidden[chunk].to(dtype)
            logits = at_least_float32(torch.nn.functional.linear(h, weight_in, bias_in))
            # d log p(label) / d logits = onehot(label) - softmax(logits), times the incoming gradient
            grad_logits = logits.sub_(normaliser[chunk, None]).exp_().mul_(-grad_logps[chunk, None])
            grad_logits[torch.arange(len(h), device=h.device), labels[chunk]] += grad_logps[chunk]
            grad_logits = grad_logits.to(dtype)
            if needs_hidden:
                grad_hidden[chunk] = grad_logits @ weight_in
            if needs_weight:
                grad_weight += grad_logits.T @ h
            if needs_bias:
                grad_bias += grad_logits.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def entropy_of(logits: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """-sum_v p(v) log p(v) of each row of (K, V) logits, p = softmax, `normaliser` their logsumexp (K,); no
    gradient: (K,)."""
    with torch.no_grad():
        return normaliser - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def sum_per_sequence(values: torch.Tensor, sequences: torch.Tensor, count: int) -> torch.Tensor:
    """(T,) per-token values -> (count,) sums over the tokens of each sequence."""
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, sequences, values)


def scored_token_logps(
    model: torch.nn.Module, batch: Batch, log_sum_sq: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token | what precedes it) of every scored token of `batch`, (T,) float32; with `log_sum_sq`, also
    log sum_v p(v)^2 at each one's predicting position (WPO's normaliser), detached, else None
    (`scored_token_statistics`)."""
    per_token, sum_sq, _ = scored_token_statistics(model, batch, log_sum_sq=log_sum_sq)
    return per_token, sum_sq


def scored_token_statistics(
    model: torch.nn.Module, batch: Batch, log_sum_sq: bool = False, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log p(token | what precedes it) of every scored token of `batch`, (T,) float32; with `log_sum_sq`, also
    log sum_v p(v)^2 at each one's predicting position (WPO's normaliser), with `entropy` the entropy
    -sum_v p(v) log p(v) of that position's distribution (GRPO's), both detached, else None.

    The output head runs only at the predicting positions: the (tokens x vocabulary) logits of the prompts and
    the padding are never formed, which saves the head's compute there and most of the logits' memory. For the
    common architectures (`plain_output_head`), when the logits would exceed HEAD_CHUNK_ELEMENTS, preftune applies
    the head itself, a chunk of positions at a time.
    """
    rows, columns = batch.input_ids.shape
    keep = torch.zeros((rows, columns), dtype=torch.bool, device=batch.input_ids.device)
    keep[batch.token_rows, batch.token_predictors] = True
    # where each token's predicting position lands among the kept ones (row-major; two tokens may share one)
    slot = keep.flatten().cumsum(0).sub_(1)[batch.token_rows * columns + batch.token_predictors]
    inputs = model_inputs(model, batch)
    head = plain_output_head(model)
    if head is not None and len(slot) * head.weight.shape[0] > HEAD_CHUNK_ELEMENTS:
        # the head applied here, in chunks: the (K, V) logits are never held whole (not needed for one chunk's
        # worth, where the recomputation would cost more than the memory it saves)
        with output_head_bypassed(model, head):
            hidden = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (K, H)
        per_token, sum_sq, entropies = ChunkedHeadLogps.apply(hidden[slot], head.weight, head.bias,
                                                              batch.token_labels, log_sum_sq, entropy)
        return per_token, (sum_sq if log_sum_sq else None), (entropies if entropy else None)
    if keeps_positions(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (K, V)
    else:
        logits = model(**inputs, use_cache=False).logits[keep]
    logits = at_least_float32(logits)
    normaliser = torch.logsumexp(logits, dim=-1)  # (K,)
    per_token = logits[slot, batch.token_labels] - normaliser[slot]
    sum_sq = entropies = None
    if log_sum_sq:
        with torch.no_grad():
            sum_sq = (torch.logsumexp(2 * logits, dim=-1) - 2 * normaliser)[slot]
    if entropy:
        entropies = entropy_of(logits, normaliser)[slot]
    return per_token, sum_sq, entropies


def model_inputs(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """A Batch as `model`'s forward takes it: ids, the mask in the form its attention wants, and positions when the
    layout restarts them."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": attention_mask_for(model, batch.attention_mask)}
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
    return inputs


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
