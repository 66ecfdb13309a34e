"""The layouts: padded (chosen rows then rejected rows), shared_prefix (prompt | chosen | rejected per row) and
packed (several such segments per row), and where each says its scored tokens are."""

from __future__ import annotations

from preftune.batching import (
    batch_order,
    cheapest_packing,
    collate_packed,
    collate_padded,
    collate_shared_prefix,
    pack_rows,
    process_batches,
)
from preftune.tokenize import TokenizedPair

PAIRS = [TokenizedPair([1, 2], [3, 4, 5], [6], index=7), TokenizedPair([8], [9], [10, 11], index=3)]


def scored(batch) -> list[tuple]:
    """(row, predicting column, label, sequence, rank) of each scored token."""
    return list(zip(batch.token_rows.tolist(), batch.token_predictors.tolist(), batch.token_labels.tolist(),
                    batch.token_sequences.tolist(), batch.token_ranks.tolist()))


def test_collate_padded_layout():
    batch = collate_padded(PAIRS, pad_token_id=0)
    assert batch.pair_indices == [7, 3] and batch.num_pairs == 2
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [8, 9, 0, 0, 0], [1, 2, 6, 0, 0], [8, 10, 11, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch.position_ids is None
    assert scored(batch) == [
        (0, 1, 3, 0, 0), (0, 2, 4, 0, 1), (0, 3, 5, 0, 2),  # chosen of pair 0: 3 4 5 after the prompt 1 2
        (1, 0, 9, 1, 0),  # chosen of pair 1
        (2, 1, 6, 2, 0),  # rejected of pair 0 (sequence B + 0)
        (3, 0, 10, 3, 0), (3, 1, 11, 3, 1),
    ]
    assert batch.token_counts().tolist() == [3, 1, 1, 2]


def test_collate_shared_prefix_layout():
    batch = collate_shared_prefix(PAIRS, pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [8, 9, 10, 11, 0, 0]]
    # positions restart after the prompt for the rejected completion
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2]
    assert batch.position_ids[1, :4].tolist() == [0, 1, 1, 2]
    assert scored(batch) == [
        (0, 1, 3, 0, 0), (0, 1, 6, 2, 0),  # the last prompt position predicts both first tokens
        (0, 2, 4, 0, 1), (0, 3, 5, 0, 2),
        (1, 0, 9, 1, 0), (1, 0, 10, 3, 0), (1, 2, 11, 3, 1),  # rejected's second token: predicted by its first
    ]
    assert batch.token_counts().tolist() == [3, 1, 1, 2]
    mask = batch.attention_mask[:, 0].int()
    assert mask.shape == (2, 6, 6)
    assert mask[0].tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1],  # rejected: the prompt and itself, not the chosen tokens
    ]
    assert mask[1].tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],  # padding attends to itself only (no fully masked row)
        [0, 0, 0, 0, 0, 1],
    ]


def test_pack_rows_fills_rows_up_to_the_capacity_longest_first():
    assert pack_rows([6, 3, 3], 6) == [[0], [1, 2]]
    assert pack_rows([2, 9, 4, 5, 3], 9) == [[1], [3, 2], [4, 0]]  # 9 | 5 + 4 | 3 + 2
    assert pack_rows([2, 9, 4, 5, 3], 23) == [[1, 3, 2, 4, 0]]
    assert pack_rows([7, 3], 5) == [[0], [1]]  # a pair longer than the capacity gets a row of its own
    lengths = [5, 1, 8, 3, 3, 2, 7, 1]
    rows = pack_rows(lengths, 8)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)


def test_cheapest_packing_trades_padding_against_attentions_quadratic_cost():
    assert cheapest_packing([6, 3, 3]) == [[0], [1, 2]]  # no padding either way: the shorter rows
    # one long pair and short ones: two rows would be mostly padding (2 x 1000 x 1.38 > 1300 x 1.5)
    assert cheapest_packing([1000, 100, 100, 100]) == [[0, 1, 2, 3]]
    # two long pairs: one row of 4,000 would spend more on attention than it saves (2 x 2000 x 1.77 < 4000 x 2.54)
    assert cheapest_packing([2000, 2000]) == [[0], [1]]


def test_collate_packed_layout():
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6], index=7), TokenizedPair([8], [9], [10], index=3),
             TokenizedPair([11], [12], [13], index=4)]
    batch = collate_packed(pairs, pad_token_id=0)
    assert batch.pair_indices == [7, 3, 4]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [8, 9, 10, 11, 12, 13]]
    # positions restart at each pair's segment, and after the prompt for the rejected completion
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 0, 1, 1]]
    assert scored(batch) == [
        (0, 1, 3, 0, 0), (0, 1, 6, 3, 0), (0, 2, 4, 0, 1), (0, 3, 5, 0, 2),
        (1, 0, 9, 1, 0), (1, 0, 10, 4, 0),  # pair 1: sequences 1 and B + 1
        (1, 3, 12, 2, 0), (1, 3, 13, 5, 0),  # pair 2, predicted from its own prompt at column 3
    ]
    assert batch.token_counts().tolist() == [3, 1, 1, 1, 1, 1]
    assert batch.attention_mask[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],  # the next pair sees nothing of the one before
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 0, 1],
    ]


def test_batch_order_covers_every_pair_once_and_depends_on_seed_and_epoch():
    order = batch_order(10, 4, shuffle=True, seed=3, epoch=0)
    assert [len(b) for b in order] == [4, 4, 2]
    assert sorted(i for b in order for i in b) == list(range(10))
    assert order == batch_order(10, 4, shuffle=True, seed=3, epoch=0)
    assert order != batch_order(10, 4, shuffle=True, seed=3, epoch=1)
    assert batch_order(5, 2, shuffle=False, seed=0, epoch=0) == [[0, 1], [2, 3], [4]]


def test_process_batches_with_drop_last_gives_every_process_a_full_share_of_full_global_batches():
    """7 items, 2 processes x 2: one global batch of 4 an epoch (the last 3 dropped); without drop_last the last
    one splits 1 and 2, which in the online loops meant unequal minibatch steps per process."""
    shares = [process_batches(7, 2, 2, rank, True, 3, 0, drop_last=True) for rank in range(2)]
    assert [len(share) for share in shares[0]] == [len(share) for share in shares[1]] == [2]
    assert process_batches(8, 2, 2, 1, True, 3, 0, drop_last=True) == process_batches(8, 2, 2, 1, True, 3, 0)
    assert [len(s) for s in process_batches(7, 2, 2, 0, True, 3, 0)] == [2, 1]  # the micro-batches of DPO, as before
    assert process_batches(3, 2, 2, 0, True, 3, 0, drop_last=True) == []
