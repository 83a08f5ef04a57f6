"""Epoch orders and rank shares, alone: pure functions of (size, seed, epoch, rank)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loaders.order import EpochOrder, epoch_order, rank_share, share_size
from nearstore import DatasetError, ParameterError


@given(size=st.integers(0, 3000), seed=st.integers(0, 2**31), epoch=st.integers(0, 1000), shuffle=st.booleans())
def test_an_epoch_is_a_reproducible_permutation(size, seed, epoch, shuffle):
    order = epoch_order(size, seed=seed, epoch=epoch, shuffle=shuffle)
    np.testing.assert_array_equal(np.sort(order), np.arange(size))
    np.testing.assert_array_equal(order, epoch_order(size, seed=seed, epoch=epoch, shuffle=shuffle))
    if not shuffle:
        np.testing.assert_array_equal(order, np.arange(size))


@given(size=st.integers(0, 2000), world_size=st.integers(1, 9), seed=st.integers(0, 100))
def test_rank_shares_are_equal_and_cover_the_epoch(size, world_size, seed):
    order = epoch_order(size, seed=seed, epoch=0, shuffle=True)
    padded = [rank_share(order, rank=r, world_size=world_size, uneven="pad") for r in range(world_size)]
    dropped = [rank_share(order, rank=r, world_size=world_size, uneven="drop") for r in range(world_size)]
    assert {len(s) for s in padded} == {share_size(size, world_size, "pad")}
    assert {len(s) for s in dropped} == {share_size(size, world_size, "drop")}
    every = np.concatenate(padded)
    assert set(every.tolist()) == set(range(size)) and len(every) - size < world_size  # a few twice
    kept = np.concatenate(dropped)
    assert len(np.unique(kept)) == len(kept) == size - size % world_size  # disjoint, a few left out


def test_batches_and_places():
    order = EpochOrder(10, True, 3, False, 0, 1, "pad", 0)
    batches = order.batches(epoch=2, size=95)
    assert [len(b) for b in batches] == [10] * 9 + [5] and order.num_batches(95) == 10
    np.testing.assert_array_equal(np.concatenate(batches), epoch_order(95, seed=3, epoch=2, shuffle=True))
    assert [b.tolist() for b in order.batches(2, 95, first=7)] == [b.tolist() for b in batches[7:]]
    dropping = EpochOrder(10, True, 3, True, 0, 1, "pad", 0)
    assert dropping.num_batches(95) == 9
    state = {**order.state_dict(), "epoch": 2, "batches_done": 4}
    order.check(state, 95)
    order.load_state_dict(state)
    assert order.start() == 4 and order.start() == 0  # a loaded place is resumed once
    with pytest.raises(DatasetError, match="state_dict says 11 batches of 10 were delivered"):
        order.check({**state, "batches_done": 11}, 95)
    with pytest.raises(DatasetError, match="taken with seed=4; this loader has 3"):
        order.check({**state, "seed": 4}, 95)
    with pytest.raises(ParameterError, match="batch_size must be >= 1, got 0"):
        EpochOrder(0, True, 3, False, 0, 1, "pad", 0)
    with pytest.raises(ParameterError, match="uneven must be 'pad' or 'drop'"):
        EpochOrder(1, True, 3, False, 0, 1, "wrap", 0)
