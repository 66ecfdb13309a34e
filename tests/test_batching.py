"""The padded layout: chosen rows then rejected rows, completion mask on completion tokens only."""

from __future__ import annotations

import torch

from preftune.batching import batch_order, collate_padded
from preftune.tokenize import TokenizedPair


def test_collate_padded_layout():
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6], index=7), TokenizedPair([8], [9], [10, 11], index=3)]
    batch = collate_padded(pairs, pad_token_id=0)
    assert batch.pair_indices == [7, 3] and batch.num_pairs == 2
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [8, 9, 0, 0, 0], [1, 2, 6, 0, 0], [8, 10, 11, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch.completion_mask.tolist() == [
        [False, False, True, True, True],
        [False, True, False, False, False],
        [False, False, True, False, False],
        [False, True, True, False, False],
    ]
    assert batch.completion_mask.dtype == torch.bool


def test_batch_order_covers_every_pair_once_and_depends_on_seed_and_epoch():
    order = batch_order(10, 4, shuffle=True, seed=3, epoch=0)
    assert [len(b) for b in order] == [4, 4, 2]
    assert sorted(i for b in order for i in b) == list(range(10))
    assert order == batch_order(10, 4, shuffle=True, seed=3, epoch=0)
    assert order != batch_order(10, 4, shuffle=True, seed=3, epoch=1)
    assert batch_order(5, 2, shuffle=False, seed=0, epoch=0) == [[0, 1], [2, 3], [4]]
