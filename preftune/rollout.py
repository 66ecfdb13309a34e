"""Prompts -> sampled completions (batched, KV-cached generation), and the log-probs of what was sampled.

The one sampling path of preftune: reports, the default job's pairs, judge, generate and the frontier all sample
here, so their samples agree for the same seed and batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from preftune.batching import Batch, pad_rows, padded_batch
from preftune.logprobs import completion_logps, scored_token_logps
from preftune.runtime.accelerator import sharded_model


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]  # as sampled, ending at the first EOS (kept) or at max_new_tokens
    text: str  # the completion decoded without special tokens


def sample(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
) -> list[Sample]:
    """Sample `num_samples` completions per prompt, in prompt order. With the defaults (temperature 1, no top-k,
    top-p 1) the samples follow the model's own distribution, as a KL estimate needs. Deterministic for a given
    seed and batch size."""
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    sharded = sharded_model(model)
    if sharded:
        # peft's generate calls the inner model, past the root's FSDP hooks: gather the root's own weights
        # (embeddings, final norm, head) for the whole generation; the layers gather theirs in their forwards
        model.unshard()
    jobs = [(i, list(ids)) for i, ids in enumerate(prompt_ids) for _ in range(num_samples)]
    samples: list[Sample] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        width = max(len(ids) for _, ids in chunk)
        # left padding: every prompt ends at the same column, where generation starts
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, ids) in enumerate(chunk):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                # sharded weights (FSDP): every forward is a collective, so a process whose samples all ended
                # keeps running forwards until every process's have
                synced_gpus=sharded,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
        for row, (prompt_index, ids) in enumerate(chunk):
            completion = output[row, width:].tolist()
            if eos in completion:
                completion = completion[: completion.index(eos) + 1]
            text = tokenizer.decode(completion, skip_special_tokens=True)
            samples.append(Sample(prompt_index, ids, completion, text))
    torch.random.set_rng_state(generator_state)
    if sharded:
        model.reshard()
    model.train(was_training)
    return samples


def sequence_logps_of_samples(
    model: torch.nn.Module, samples: Sequence[Sample], pad_token_id: int, batch_size: int = 32
) -> torch.Tensor:
    """Summed log-prob of each sample's completion under `model`, shape (len(samples),)."""
    totals = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            rows = pad_rows([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk], pad_token_id)
            sums, _ = completion_logps(model, *rows)
            totals.append(sums.float())
    return torch.cat(totals)


def completion_mask(samples: Sequence[Sample], width: int) -> torch.Tensor:
    """(B, width) bool: True on each sample's completion tokens."""
    lengths = torch.tensor([len(s.completion_ids) for s in samples])
    return torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)


def sample_rows(samples: Sequence[Sample], pad_token_id: int, device: torch.device | str) -> Batch:
    """The samples as a right-padded Batch, one prompt + completion row each (no padding between them, so positions
    are those the samples were generated at)."""
    rows = pad_rows([s.prompt_ids for s in samples], [s.completion_ids for s in samples], pad_token_id)
    return padded_batch(*rows, pair_indices=[]).to(device)


def per_token(values: torch.Tensor, batch: Batch, rows: int, width: int) -> torch.Tensor:
    """(T,) values of a Batch's scored tokens -> (rows, width), token t of row r at [r, t], 0 elsewhere."""
    placed = values.new_zeros(rows, width)
    placed[batch.token_rows, batch.token_ranks] = values
    return placed


def token_logps(
    model: torch.nn.Module, samples: Sequence[Sample], pad_token_id: int, width: int, device: torch.device | str
) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every completion token, (B, width), 0 past a completion's end; with gradients
    unless called under no_grad. Through logprobs.py's forward (the output head only at completion positions)."""
    batch = sample_rows(samples, pad_token_id, device)
    values, _ = scored_token_logps(model, batch)
    return per_token(values, batch, len(samples), width)
