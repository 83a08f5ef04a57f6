"""Epoch orders and rank shares, alone: pure functions of (size, seed, epoch, rank)."""

from __future__ import annotations

import re

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
    order.check(state, lambda epoch: 95)
    order.load_state_dict(state)
    assert order.start() == 4 and order.start() == 0  # a loaded place is resumed once
    with pytest.raises(DatasetError, match="state_dict says 11 batches of 10 were delivered"):
        order.check({**state, "batches_done": 11}, lambda epoch: 95)
    with pytest.raises(DatasetError, match="taken with seed=4; this loader has 3"):
        order.check({**state, "seed": 4}, lambda epoch: 95)


ARGUMENTS = {
    "batch_size": 10,
    "shuffle": True,
    "seed": 3,
    "drop_last": False,
    "rank": 0,
    "world_size": 3,
    "uneven": "pad",
    "warm_start_epochs": 0,
}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
        ("batch_size", 2.5, "batch_size must be an integer >= 1, got 2.5"),
        ("batch_size", True, "batch_size must be an integer >= 1, got True"),  # a bool is no integer
        ("shuffle", "no", "shuffle must be True or False, got 'no'"),  # "no" would shuffle
        ("drop_last", 1, "drop_last must be True or False, got 1"),
        ("seed", -1, "seed must be an integer >= 0, got -1"),
        ("seed", "3", "seed must be an integer >= 0, got '3'"),
        ("world_size", 0, "world_size must be an integer >= 1, got 0"),
        ("rank", 3, "rank must be in [0, world_size), got rank 3 of world_size 3"),
        ("rank", 1.0, "rank must be an integer >= 0, got 1.0"),
        ("uneven", "wrap", "uneven must be 'pad' or 'drop', got 'wrap'"),
        ("warm_start_epochs", None, "warm_start_epochs must be an integer >= 0, got None"),
    ],
)
def test_bad_arguments_are_refused_by_name(name, value, message):
    with pytest.raises(ParameterError, match=re.escape(message)):
        EpochOrder(**{**ARGUMENTS, name: value})
    assert EpochOrder(**{**ARGUMENTS, "batch_size": np.int64(4)}).batch_size == 4  # numpy's integers are integers


def test_a_state_that_is_no_order_is_refused_by_key_and_changes_nothing():
    order = EpochOrder(**ARGUMENTS)
    order.set_epoch(1)
    before = order.state_dict()
    state = {**before, "epoch": 2, "batches_done": 3}
    without = {name: value for name, value in state.items() if name not in ("seed", "epochs_completed")}
    for bad, message in [
        ([state], "state_dict's order must be a mapping, got [{"),
        (without, "state_dict's order has no 'seed'"),
        ({**without, "seed": 3}, "state_dict's order has no 'epochs_completed'"),
        ({**state, "shuffle": 1}, "taken with shuffle=1; this loader has True"),
        ({**state, "seed": np.array([3, 3])}, "taken with seed=array([3, 3])"),
        ({**state, "epoch": "2"}, "state_dict's order['epoch'] must be an integer >= 0, got '2'"),
        ({**state, "epoch": -1}, "state_dict's order['epoch'] must be an integer >= 0, got -1"),
        ({**state, "batches_done": 2.0}, "state_dict's order['batches_done'] must be an integer >= 0, got 2.0"),
        ({**state, "epochs_completed": True}, "['epochs_completed'] must be an integer >= 0, got True"),
        ({**state, "batches_done": 5}, "state_dict says 5 batches of 4 were delivered"),
    ]:
        with pytest.raises(DatasetError, match=re.escape(message)):
            order.check(bad, lambda epoch: 95)  # 32 samples a rank: 4 batches
    order.check(state, lambda epoch: 95)
    assert order.state_dict() == before  # checking took nothing
    with pytest.raises(ParameterError, match="epoch must be an integer >= 0, got '3'"):
        order.set_epoch("3")
    assert order.epoch == 1
