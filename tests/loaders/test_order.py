"""Epoch orders and rank shares, alone: pure functions of (size, seed, epoch, rank)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loaders.order import EpochOrder, _sorted_within, epoch_order, rank_share, share_size
from nearstore import DatasetError, ParameterError


def shards_of(size: int, shard: int = 7) -> np.ndarray:
    """The shard of each of `size` samples, sorted ids with gaps (a selection's), `shard` a shard."""
    return np.sort(np.random.default_rng(size).choice(3 * size + 1, size, replace=False)) // shard


@given(
    size=st.integers(0, 3000),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 1000),
    shuffle=st.sampled_from([False, True, "global", "shards"]),
    block=st.integers(1, 500),
)
def test_an_epoch_is_a_reproducible_permutation(size, seed, epoch, shuffle, block):
    shards = shards_of(size)
    order = epoch_order(shards, seed=seed, epoch=epoch, shuffle=shuffle, block=block)
    np.testing.assert_array_equal(np.sort(order), np.arange(size))
    np.testing.assert_array_equal(order, epoch_order(shards, seed=seed, epoch=epoch, shuffle=shuffle, block=block))
    if not shuffle:
        np.testing.assert_array_equal(order, np.arange(size))
    if shuffle == "shards" and size:
        # a shard lies within one block: whole shards of `block` samples, but for the last one's tail
        visited = shards[order]
        largest = np.bincount(shards).max()
        for shard in np.unique(shards):
            where = np.flatnonzero(visited == shard)
            assert where[-1] - where[0] < block + largest - 1


@given(
    runs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=300),
    draws=st.lists(st.integers(0, 5), max_size=300),
)
def test_a_sort_within_runs_is_lexsorts(runs, draws):
    """The shards shuffle sorts its draws a run of keys at a time (lexsort over millions took
    seconds): the order lexsort gives, ties in the draws too, so a state resumes the same order."""
    n = min(len(runs), len(draws))
    keys = np.sort(np.array(runs[:n], dtype=np.int64).reshape(n, 2), axis=0)  # each key non-decreasing
    values = np.array(draws[:n], dtype=np.float64)
    np.testing.assert_array_equal(_sorted_within(values, keys[:, 0], keys[:, 1]), np.lexsort((values, *keys.T)))
    np.testing.assert_array_equal(_sorted_within(values), np.lexsort((values,)))


def test_a_shards_shuffle_draws_each_batch_from_a_block_of_whole_shards():
    shards = np.repeat(np.arange(40), 25)  # 40 shards of 25 samples
    order = epoch_order(shards, seed=1, epoch=0, shuffle="shards", block=100)
    blocks = [set(shards[order[i : i + 100]].tolist()) for i in range(0, 1000, 100)]
    assert all(len(b) == 4 for b in blocks) and set().union(*blocks) == set(range(40))
    assert sorted(order[:100].tolist()) != order[:100].tolist()  # shuffled within its block
    other = epoch_order(shards, seed=1, epoch=1, shuffle="shards", block=100)
    assert [set(shards[other[i : i + 100]].tolist()) for i in range(0, 1000, 100)] != blocks  # a new epoch, new blocks
    spread = epoch_order(shards, seed=1, epoch=0, shuffle="global")
    assert np.mean([len(set(shards[spread[i : i + 100]].tolist())) for i in range(0, 1000, 100)]) > 30


@given(size=st.integers(0, 2000), world_size=st.integers(1, 9), seed=st.integers(0, 100))
def test_rank_shares_are_equal_and_cover_the_epoch(size, world_size, seed):
    order = epoch_order(shards_of(size), seed=seed, epoch=0, shuffle=True)
    padded = [rank_share(order, rank=r, world_size=world_size, uneven="pad") for r in range(world_size)]
    dropped = [rank_share(order, rank=r, world_size=world_size, uneven="drop") for r in range(world_size)]
    assert {len(s) for s in padded} == {share_size(size, world_size, "pad")}
    assert {len(s) for s in dropped} == {share_size(size, world_size, "drop")}
    every = np.concatenate(padded)
    assert set(every.tolist()) == set(range(size)) and len(every) - size < world_size  # a few twice
    kept = np.concatenate(dropped)
    assert len(np.unique(kept)) == len(kept) == size - size % world_size  # disjoint, a few left out


@given(
    size=st.integers(0, 3000),
    world_size=st.integers(2, 9),
    shard=st.integers(1, 300),
    block=st.integers(1, 1000),
    uneven=st.sampled_from(["pad", "drop"]),
)
def test_ranks_of_a_shards_shuffle_read_their_own_shards(size, world_size, shard, block, uneven):
    """Cut for `world_size` spans, each rank's share of a "shards" epoch is a run of whole shards
    (a shard at a cut shared with the next rank): the ranks touch each shard about once in all,
    where shares of the one order spread over every shard each rank touches."""
    shards = shards_of(size, shard)
    order = epoch_order(shards, seed=5, epoch=1, shuffle="shards", block=block, spans=world_size)
    np.testing.assert_array_equal(np.sort(order), np.arange(size))
    shares = [rank_share(order, rank=r, world_size=world_size, uneven=uneven) for r in range(world_size)]
    touched = [set(shards[s].tolist()) for s in shares]
    # at most a shard more a rank where a cut splits one; "pad" wraps a few of rank 0's samples on
    assert sum(map(len, touched)) <= len(set(shards.tolist())) + 2 * (world_size - 1)
    assert [len(s) for s in shares] == [share_size(size, world_size, uneven)] * world_size
    whole = np.concatenate([s[: size // world_size] for s in shares])
    assert len(np.unique(whole)) == len(whole)  # disjoint, as any rank shares are
    # the same samples a rank every epoch (its cache keeps them), in another order
    later = epoch_order(shards, seed=5, epoch=2, shuffle="shards", block=block, spans=world_size)
    assert [set(order[r::world_size].tolist()) for r in range(world_size)] == [
        set(later[r::world_size].tolist()) for r in range(world_size)
    ]
    assert size < 50 or not np.array_equal(order, later)
    # spans past one a sample cut nothing more: a state's is not trusted to allocate
    huge = epoch_order(shards, seed=5, epoch=1, shuffle="shards", block=block, spans=10**12)
    np.testing.assert_array_equal(
        huge, epoch_order(shards, seed=5, epoch=1, shuffle="shards", block=block, spans=max(1, size))
    )


def test_a_rank_keeps_its_shards_when_a_round_leaves_a_few_out():
    # spans cut from a permutation of the shards present moved every rank to others (its cache
    # then kept a quarter of what both rounds visit): a draw a shard id moves only the cuts
    shards = np.repeat(np.arange(100), 20)
    fewer = shards[shards % 20 != 3]  # 5 shards left out

    def owned(epoch_shards: np.ndarray) -> list[set[int]]:
        order = epoch_order(epoch_shards, seed=4, epoch=0, shuffle="shards", spans=4)
        return [set(epoch_shards[order[r::4]].tolist()) for r in range(4)]

    assert sum(len(a & b) for a, b in zip(owned(shards), owned(fewer))) >= 0.85 * 95


def test_a_state_at_an_epochs_end_starts_the_next_as_this_worlds_own():
    # taken after epoch 0 on 4 ranks, epoch 1 on 3 followed 4 spans: 2.1x the reads of 3 ranks' own
    shards = shards_of(500)
    four = EpochOrder(10, "shards", 64, 3, False, 0, 4, "pad", 0)
    four.finish()
    three = EpochOrder(10, "shards", 64, 3, False, 1, 3, "pad", 0)
    three.load_state_dict(four.state_dict())
    assert three.state_dict()["spans"] == 3 and three.start() == 0
    fresh = EpochOrder(10, "shards", 64, 3, False, 1, 3, "pad", 0)
    np.testing.assert_array_equal(three.positions(1, shards), fresh.positions(1, shards))


def test_a_state_without_spans_resumes_the_order_its_release_cut():
    """A state of a release before spans resumes its epoch's shares of the one order (spread over
    every shard), and cuts the epochs after it for its ranks."""
    shards = shards_of(500)
    order = EpochOrder(10, "shards", 64, 3, False, 1, 4, "pad", 0)
    old = {k: v for k, v in order.state_dict().items() if k != "spans"}
    order.check({**old, "batches_done": 2}, lambda epoch: 500)
    order.load_state_dict({**old, "batches_done": 2})
    one = epoch_order(shards, seed=3, epoch=0, shuffle="shards", block=64)
    np.testing.assert_array_equal(order.positions(0, shards), rank_share(one, rank=1, world_size=4, uneven="pad"))
    assert order.state_dict()["spans"] == 1 and order.start() == 2
    order.finish()
    four = epoch_order(shards, seed=3, epoch=1, shuffle="shards", block=64, spans=4)
    np.testing.assert_array_equal(order.positions(1, shards), rank_share(four, rank=1, world_size=4, uneven="pad"))
    assert order.state_dict()["spans"] == 4
    for bad, message in [(0, "['spans'] must be an integer >= 1, got 0"), ("4", "['spans'] must be an integer")]:
        with pytest.raises(DatasetError, match=re.escape(message)):
            order.check({**old, "spans": bad}, lambda epoch: 500)


def test_batches_and_places():
    order = EpochOrder(10, True, 64, 3, False, 0, 1, "pad", 0)
    shards = shards_of(95)
    batches = order.batches(epoch=2, shards=shards)
    assert [len(b) for b in batches] == [10] * 9 + [5] and order.num_batches(2, 95) == 10
    np.testing.assert_array_equal(np.concatenate(batches), epoch_order(shards, seed=3, epoch=2, shuffle=True))
    assert [b.tolist() for b in order.batches(2, shards, first=7)] == [b.tolist() for b in batches[7:]]
    dropping = EpochOrder(10, True, 64, 3, True, 0, 1, "pad", 0)
    assert dropping.num_batches(0, 95) == 9
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
    "shuffle_block": 64,
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
        ("shuffle", "no", "shuffle must be True, False or one of ('global', 'shards'), got 'no'"),
        ("shuffle_block", 0, "shuffle_block must be an integer >= 1, got 0"),
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
    order.check({k: v for k, v in state.items() if k != "shuffle_block"}, lambda epoch: 95)  # taken before blocks
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


@pytest.mark.parametrize("uneven", ["pad", "drop"])
@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2), (4, 1), (1, 4), (2, 2)])
def test_a_state_resumes_on_another_world_size_each_sample_once(before, after, uneven):
    """Every rank of `before` ranks stops after k batches (as DDP keeps them); each of `after` ranks
    resumes from one of their states: the epoch's samples are each delivered once in all (pad: a
    few twice, as padding; drop: a few left out), in an order fixed by (seed, epoch)."""
    shards, batch = shards_of(203), 8
    for k in range(4):
        old = [EpochOrder(batch, "shards", 50, 7, False, r, before, uneven, 0) for r in range(before)]
        head = [p for o in old for b in o.batches(0, shards)[:k] for p in b.tolist()]
        state = {**old[0].state_dict(), "batches_done": k}
        new = [EpochOrder(batch, "shards", 50, 7, False, r, after, uneven, 0) for r in range(after)]
        rest = []
        for o in new:
            o.check(state, lambda epoch: len(shards))
            o.load_state_dict(state)
            first = o.start()
            rest += [p for b in o.batches(0, shards, first) for p in b.tolist()]
            assert len(o.batches(0, shards, first)) == o.num_batches(0, len(shards)) - first
        delivered = head + rest
        if uneven == "drop":
            assert len(set(delivered)) == len(delivered) >= len(shards) - (before - 1) - (after - 1)
        else:
            assert set(delivered) == set(range(len(shards))) and len(delivered) < len(shards) + before + after
        again = EpochOrder(batch, "shards", 50, 7, False, 0, after, uneven, 0)
        again.load_state_dict(state)
        resumed_at = again.start()
        assert resumed_at == (k if before == after else 0)
        assert [b.tolist() for b in again.batches(0, shards, resumed_at)] == [
            b.tolist() for b in new[0].batches(0, shards, resumed_at)
        ]  # deterministic


@pytest.mark.parametrize("shuffle", [True, "shards"])
def test_a_resumed_layout_resumes_again_and_ends_with_its_epoch(shuffle):
    """2 ranks deliver 2 batches each, 3 ranks resume and deliver 1 each, 1 rank the rest: the
    epoch's samples each once, whatever spans the first world cut the order in."""
    shards = shards_of(100)
    two = [EpochOrder(10, shuffle, 64, 3, False, r, 2, "pad", 0) for r in range(2)]
    done = [p for o in two for b in o.batches(0, shards)[:2] for p in b.tolist()]
    three = [EpochOrder(10, shuffle, 64, 3, False, r, 3, "pad", 0) for r in range(3)]
    for o in three:
        o.load_state_dict({**two[0].state_dict(), "batches_done": 2})  # 40 of 100 done
        assert o.skipped == 40 and o.start() == 0 and o.num_batches(0, 100) == 2
        done += o.batches(0, shards)[0].tolist()
    state = {**three[1].state_dict(), "batches_done": 1}  # and a batch of the 20 each of 3 ranks has
    again = EpochOrder(10, shuffle, 64, 3, False, 1, 3, "pad", 0)
    again.load_state_dict(state)
    assert (again.skipped, again.start()) == (40, 1)  # same world size: the same layout, a batch on
    assert [b.tolist() for b in again.batches(0, shards, 1)] == [b.tolist() for b in three[1].batches(0, shards, 1)]
    other = EpochOrder(10, shuffle, 64, 3, False, 0, 1, "pad", 0)
    other.load_state_dict(state)
    assert other.skipped == 40 + 30 and other.num_batches(0, 100) == 3
    done += [p for b in other.batches(0, shards, other.start()) for p in b.tolist()]
    assert sorted(done) == list(range(100))
    other.finish()
    assert other.skipped == 0 and other.num_batches(1, 100) == 10  # the next epoch whole again
