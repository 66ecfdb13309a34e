"""list[TokenizedPair] -> Batch: how pairs are laid out as tensors for one forward pass.

The padded layout is the reference: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], each row
prompt + completion, right-padded. Chosen and rejected go through the model in one forward pass together.
`completion_mask` marks the tokens whose log-probabilities count; everything after the layout is chosen
(log-probs, losses, the loop) reads only `Batch`, so other layouts can replace this one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from preftune.tokenize import TokenizedPair


@dataclass
class Batch:
    input_ids: torch.Tensor  # (2B, L) long: B chosen rows, then B rejected rows
    attention_mask: torch.Tensor  # (2B, L) long: 1 on real tokens
    completion_mask: torch.Tensor  # (2B, L) bool: True on completion tokens (the ones scored)
    pair_indices: list[int]  # which loaded pairs these are, for messages that name them

    @property
    def num_pairs(self) -> int:
        return len(self.pair_indices)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.pair_indices,
        )


def pad_rows(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad rows of prompt + completion: (input_ids, attention_mask, completion_mask), each (N, L)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        end = len(prompt) + len(completion)
        input_ids[i, :end] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        attention_mask[i, :end] = 1
        completion_mask[i, len(prompt) : end] = True
    return input_ids, attention_mask, completion_mask


def collate_padded(pairs: Sequence[TokenizedPair], pad_token_id: int) -> Batch:
    """Right-padded layout: one row per sequence, chosen rows first."""
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return Batch(*pad_rows(prompts, completions, pad_token_id), [p.index for p in pairs])


def batch_order(num_pairs: int, batch_size: int, shuffle: bool, seed: int, epoch: int) -> list[list[int]]:
    """Positions of the pairs in each batch of one epoch; the last batch may be smaller.

    The order depends only on (seed, epoch), so a run is reproducible and a resumed run can find its place.
    """
    order = list(range(num_pairs))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, num_pairs, batch_size)]


def process_batches(
    num_pairs: int, batch_size: int, world_size: int, rank: int, shuffle: bool, seed: int, epoch: int
) -> list[list[int]]:
    """This process's share of each global micro-batch of one epoch.

    A global micro-batch is `world_size * batch_size` pairs in `batch_order`; process `rank` takes the rank-th
    contiguous slice, so the processes see disjoint pairs that together cover the epoch, and N processes of
    batch b see what one process of batch N*b sees. A last global batch too small to give every process a pair
    is dropped (only when world_size > 1).
    """
    batches = batch_order(num_pairs, batch_size * world_size, shuffle, seed, epoch)
    if world_size > 1 and len(batches[-1]) < world_size:
        batches = batches[:-1]
    shares = []
    for positions in batches:
        start, end = rank * len(positions) // world_size, (rank + 1) * len(positions) // world_size
        shares.append(positions[start:end])
    return shares


def iterate_batches(
    pairs: Sequence[TokenizedPair], batch_size: int, pad_token_id: int, shuffle: bool = False, seed: int = 0,
    epoch: int = 0,
) -> Iterator[Batch]:
    for positions in batch_order(len(pairs), batch_size, shuffle, seed, epoch):
        yield collate_padded([pairs[i] for i in positions], pad_token_id)
