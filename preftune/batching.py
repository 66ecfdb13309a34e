"""list[TokenizedPair] -> Batch: how pairs are laid out as tensors for one forward pass.

Three layouts, one `Batch`:
- `padded` (the reference layout, as TRL's): rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], each row
  prompt + completion, right-padded; the prompt is computed twice per pair.
- `shared_prefix`: one row per pair, prompt | chosen | rejected, right-padded, so the prompt is computed once.
  The rejected tokens do not attend to the chosen ones and their positions restart after the prompt, so each
  completion sees exactly what it sees alone (the exact prefix-sharing of arXiv:2410.20305). It needs a 4D
  attention mask, which SDPA and eager attention take.
- `packed` (the default): as shared_prefix, with several pairs side by side in a row (each pair's segment sees
  only itself, positions restarting per segment), rows as wide as attention's quadratic cost makes worth it
  (`cheapest_packing`); so little padding is computed. Same 4D mask.
The shared layouts are built from `Segment`s (a prompt and the completions that continue it): a pair is a segment of
two, a rollout's k samples of one prompt a segment of k (rollout.sample_rows).
A Batch also says where every scored (completion) token is: its row, the column whose logits predict it, its id,
its sequence and its place in its completion. Everything after the layout (log-probs, losses, the loop) reads
only that, so a layout is one function here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import torch

from preftune.tokenize import TokenizedPair


@dataclass
class Batch:
    """One forward pass. Sequences are numbered 0..2B-1: pair i's chosen is i, its rejected B + i. T = scored
    tokens, in row-major order of their predicting positions."""

    input_ids: torch.Tensor  # (R, L) long
    # (R, L) long, 1 on real tokens (causal attention implied); or (R, 1, L, L) bool: True where query attends key
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None  # (R, L) long; None: 0, 1, 2, ... in every row
    token_rows: torch.Tensor  # (T,) long: the row of each scored token
    token_predictors: torch.Tensor  # (T,) long: the column whose logits predict it
    token_labels: torch.Tensor  # (T,) long: its id
    token_sequences: torch.Tensor  # (T,) long: its sequence, in [0, 2B)
    token_ranks: torch.Tensor  # (T,) long: its place in its completion, from 0
    pair_indices: list[int]  # which loaded pairs these are, for messages that name them

    @property
    def num_pairs(self) -> int:
        return len(self.pair_indices)

    def token_counts(self) -> torch.Tensor:
        """(2B,) long: completion tokens of each sequence."""
        return torch.bincount(self.token_sequences, minlength=2 * self.num_pairs)

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return Batch(**moved)


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


def padded_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, pair_indices: list[int]
) -> Batch:
    """A Batch of one sequence per row: row r is sequence r; token t of a row is predicted by column t - 1."""
    rows, columns = completion_mask.nonzero(as_tuple=True)  # row-major
    first_column = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long)
    first_column = first_column.scatter_reduce(0, rows, columns, reduce="amin")
    return Batch(input_ids, attention_mask, None, rows, columns - 1, input_ids[rows, columns], rows.clone(),
                 columns - first_column[rows], pair_indices)


def collate_padded(pairs: Sequence[TokenizedPair], pad_token_id: int) -> Batch:
    """Right-padded layout: one row per sequence, chosen rows first."""
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return padded_batch(*pad_rows(prompts, completions, pad_token_id), [p.index for p in pairs])


# A row of width W costs about W * (1 + W / ATTENTION_TOKENS): the linear layers grow with W, attention with W^2
# (the CPU and SDPA kernels compute masked-out blocks too). Measured on SmolLM2-135M, CPU, forward + backward:
# attention equals the rest at ~2,600 tokens per row. Larger models have wider layers, so the true crossover is
# later and this only errs towards shorter rows.
ATTENTION_TOKENS = 2600


def segment_length(pair: TokenizedPair) -> int:
    """Tokens of a pair laid out as one segment prompt | chosen | rejected."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pairs (by position) grouped into rows of at most `capacity` tokens (or one pair, if longer): first-fit,
    longest first."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(max(capacity, lengths[i]))
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


@dataclass
class Segment:
    """A prompt and the completions that continue it, laid out in one stretch of a row as prompt | completion 1 |
    completion 2 | ...: the prompt is computed once; each completion attends to the prompt and to itself only, its
    positions starting where the prompt ends, so it sees exactly what it sees alone. A DPO pair is a segment of
    two completions (chosen, rejected); a rollout's k samples of one prompt are one of k."""

    prompt_ids: Sequence[int]
    completions: Sequence[Sequence[int]]
    sequences: Sequence[int]  # each completion's sequence number in the Batch

    def __len__(self) -> int:
        return len(self.prompt_ids) + sum(len(c) for c in self.completions)


def segments_batch(segments: Sequence[Segment], rows_of_segments: Sequence[Sequence[int]], pad_token_id: int,
                   pair_indices: list[int]) -> Batch:
    """The segments of each row side by side, rows right-padded; a token attends to the earlier tokens of its own
    segment only, and not to the segment's other completions."""
    length = [len(segment) for segment in segments]
    width = max(sum(length[i] for i in row) for row in rows_of_segments)
    input_ids = torch.full((len(rows_of_segments), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows_of_segments), width), dtype=torch.long)
    # pad queries attend to themselves only: a fully masked row would give NaN, which 0-weight attention
    # to it would still spread (0 * NaN)
    mask = torch.eye(width, dtype=torch.bool).repeat(len(rows_of_segments), 1, 1)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    tokens: list[list[int]] = [[], [], [], [], []]  # rows, predictors, labels, sequences, ranks
    for row, members in enumerate(rows_of_segments):
        start = 0
        for i in members:
            segment = segments[i]
            p, end = len(segment.prompt_ids), start + length[i]
            stretch = [*segment.prompt_ids, *(token for completion in segment.completions for token in completion)]
            input_ids[row, start:end] = torch.tensor(stretch, dtype=torch.long)
            position_ids[row, start : start + p] = torch.arange(p)
            mask[row, start:end, start:end] = causal[: length[i], : length[i]]
            offset = start + p
            for completion, sequence in zip(segment.completions, segment.sequences):
                n = len(completion)
                position_ids[row, offset : offset + n] = torch.arange(p, p + n)
                mask[row, offset : offset + n, start + p : offset] = False  # not the segment's earlier completions
                predictors = [start + p - 1, *range(offset, offset + n - 1)]  # the first from the prompt's last
                for rank, (predictor, label) in enumerate(zip(predictors, completion)):
                    tokens[0].append(row)
                    tokens[1].append(predictor)
                    tokens[2].append(label)
                    tokens[3].append(sequence)
                    tokens[4].append(rank)
                offset += n
            start = end
    # row-major order of the predicting positions (the completions' first tokens share one)
    order = sorted(range(len(tokens[0])), key=lambda t: (tokens[0][t], tokens[1][t], tokens[3][t]))
    rows, predictors, labels, sequences, ranks = (torch.tensor([column[t] for t in order], dtype=torch.long)
                                                  for column in tokens)
    return Batch(input_ids, mask.unsqueeze(1), position_ids, rows, predictors, labels, sequences, ranks,
                 pair_indices)


def prefix_sharing_batch(pairs: Sequence[TokenizedPair], rows_of_pairs: Sequence[Sequence[int]],
                         pad_token_id: int) -> Batch:
    """Each pair as one segment prompt | chosen | rejected (chosen is sequence i, rejected B + i), the segments of
    a row side by side."""
    count = len(pairs)
    segments = [Segment(pair.prompt_ids, (pair.chosen_ids, pair.rejected_ids), (i, count + i))
                for i, pair in enumerate(pairs)]
    return segments_batch(segments, rows_of_pairs, pad_token_id, [p.index for p in pairs])


def collate_shared_prefix(pairs: Sequence[TokenizedPair], pad_token_id: int) -> Batch:
    """One row per pair, prompt | chosen | rejected, right-padded; the prompt is computed once."""
    return prefix_sharing_batch(pairs, [[i] for i in range(len(pairs))], pad_token_id)


def cheapest_packing(lengths: Sequence[int]) -> list[list[int]]:
    """`pack_rows` with the row capacity (a multiple of the longest pair) whose padded rows cost least."""
    def cost(rows: list[list[int]]) -> float:
        width = max(sum(lengths[i] for i in row) for row in rows)  # every row is padded to the widest
        return len(rows) * width * (1 + width / ATTENTION_TOKENS)

    # past ceil(total / longest) times the longest pair, every capacity gives the same single row
    widest = -(-sum(lengths) // max(lengths))
    packings = [pack_rows(lengths, k * max(lengths)) for k in range(1, widest + 1)]
    return min(packings, key=cost)  # the first (shortest rows) of equal costs


def collate_packed(pairs: Sequence[TokenizedPair], pad_token_id: int) -> Batch:
    """As shared_prefix, with several pairs per row (`cheapest_packing`): little padding is left to compute."""
    return prefix_sharing_batch(pairs, cheapest_packing([segment_length(p) for p in pairs]), pad_token_id)


LAYOUTS: dict[str, Callable[[Sequence[TokenizedPair], int], Batch]] = {
    "padded": collate_padded,
    "shared_prefix": collate_shared_prefix,
    "packed": collate_packed,
}


def batch_order(num_pairs: int, batch_size: int, shuffle: bool, seed: int, epoch: int) -> list[list[int]]:
    """Positions of the pairs in each batch of one epoch; the last batch may be smaller.

    The order depends only on (seed, epoch), so a run is reproducible and a resumed run can find its place.
    """
    order = list(range(num_pairs))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, num_pairs, batch_size)]


def process_batches(
    num_pairs: int, batch_size: int, world_size: int, rank: int, shuffle: bool, seed: int, epoch: int,
    drop_last: bool = False,
) -> list[list[int]]:
    """This process's share of each global micro-batch of one epoch.

    A global micro-batch is `world_size * batch_size` pairs in `batch_order`; process `rank` takes the rank-th
    contiguous slice, so the processes see disjoint pairs that together cover the epoch, and N processes of
    batch b see what one process of batch N*b sees. A last global batch too small to give every process a pair
    is dropped (only when world_size > 1); with `drop_last` (TRL's online trainers), a last global batch short of
    `world_size * batch_size` is, so every share holds exactly `batch_size`.
    """
    batches = batch_order(num_pairs, batch_size * world_size, shuffle, seed, epoch)
    smallest = batch_size * world_size if drop_last else world_size
    if batches and len(batches[-1]) < smallest:
        batches = batches[:-1]
    shares = []
    for positions in batches:
        start, end = rank * len(positions) // world_size, (rank + 1) * len(positions) // world_size
        shares.append(positions[start:end])
    return shares


def iterate_batches(
    pairs: Sequence[TokenizedPair], batch_size: int, pad_token_id: int, shuffle: bool = False, seed: int = 0,
    epoch: int = 0, layout: str = "padded",
) -> Iterator[Batch]:
    collate = LAYOUTS[layout]
    for positions in batch_order(len(pairs), batch_size, shuffle, seed, epoch):
        yield collate([pairs[i] for i in positions], pad_token_id)
