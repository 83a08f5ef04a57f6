"""The planning functions' invariants, over generated inputs: budgets add up exactly, windows
partition a class's samples however the stream is cut, pools and draws are reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nearstore import ParameterError, SampleIdError
from nearstore.selection.plan import (
    check_keep,
    class_balanced_draw,
    class_budget,
    class_budgets,
    class_pools,
    share,
    uniform_draw,
    window_bounds,
)
from nearstore.selection.windows import ClassWindows

keeps = st.floats(min_value=0.001, max_value=1.0)


@given(total=st.integers(0, 500), cuts=st.lists(st.integers(1, 50), min_size=1, max_size=30))
def test_shares_of_consecutive_parts_add_up_to_the_total(total, cuts):
    bounds = np.concatenate([[0], np.cumsum(cuts)])
    of = int(bounds[-1])
    total = min(total, of)
    parts = [share(total, of, int(a), int(b)) for a, b in zip(bounds, bounds[1:])]
    assert sum(parts) == total
    assert all(0 <= k <= b - a for k, a, b in zip(parts, bounds, bounds[1:]))


@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=12),
    keep=keeps,
    power=st.floats(min_value=0.0, max_value=1.0),
)
def test_class_budgets_favour_the_tail_and_add_up(sizes, keep, power):
    sizes = dict(enumerate(sizes))
    budgets = class_budgets(sizes, keep, power)
    assert all(1 <= budgets[c] <= n for c, n in sizes.items())
    if power == 1:
        assert budgets == {c: class_budget(n, keep) for c, n in sizes.items()}
        return
    total = class_budget(sum(sizes.values()), keep)
    # exactly the total, but for classes lifted to one sample from a share that rounded to none
    assert total <= sum(budgets.values()) <= total + len(sizes)
    for a in sizes:
        for b in sizes:
            if sizes[a] < sizes[b]:  # a smaller class keeps no more samples, but no smaller a share
                assert budgets[a] <= budgets[b] + 1
                assert budgets[a] / sizes[a] >= budgets[b] / sizes[b] - 1 / sizes[a] - 1e-9


def test_class_budgets_examples():
    long_tail = {0: 5000, 1: 500, 2: 50}
    assert class_budgets(long_tail, 0.1, 1.0) == {0: 500, 1: 50, 2: 5}
    assert class_budgets(long_tail, 0.1, 0.5) == {0: 392, 1: 124, 2: 39}  # ∝ √n_c: 70.7, 22.4, 7.1
    assert class_budgets(long_tail, 0.1, 0.0) == {0: 253, 1: 252, 2: 50}  # equal, class 2 capped
    assert class_budgets(long_tail, 0.5, 0.5) == {0: 2225, 1: 500, 2: 50}  # the tail taken whole
    assert class_budgets({0: 100, 1: 100}, 0.1, 0.5) == {0: 10, 1: 10}  # equal classes: as in proportion
    with pytest.raises(ParameterError, match=r"power must be in \[0, 1\], got -0.5"):
        class_budgets(long_tail, 0.1, -0.5)


@given(size=st.integers(0, 1000), window=st.integers(1, 200))
def test_windows_partition_the_samples(size, window):
    bounds = window_bounds(size, window)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(size))
    assert all(b - a == window for a, b in bounds[:-1]) and all(1 <= b - a <= window for a, b in bounds)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=300),
    batch=st.integers(1, 64),
    window=st.integers(2, 40),
    keep=keeps,
)
def test_class_windows_follow_the_plan_however_the_stream_is_cut(labels, batch, window, keep):
    labels = np.asarray(labels)
    ids = np.arange(len(labels))
    got: dict[int, list[tuple[np.ndarray, int]]] = {}
    windows = ClassWindows(window, lambda group: (keep, 1))
    for start in range(0, len(ids), batch):
        part = slice(start, start + batch)
        for c in np.unique(labels[part]).tolist():
            rows = np.flatnonzero(labels[part] == c)
            values = torch.from_numpy(ids[part][rows])
            for cut_ids, ((parts,), k) in windows.add(c, ids[part][rows], (values,)):
                assert torch.equal(parts, torch.from_numpy(cut_ids))  # embeddings travel with their ids
                got.setdefault(c, []).append((cut_ids, k))
    for _, cut_ids, (_, k) in windows.finish():  # each class's last window
        got.setdefault(int(labels[cut_ids[0]]), []).append((cut_ids, k))
    for c in np.unique(labels).tolist():
        members = np.flatnonzero(labels == c)
        cuts = got[c]
        assert [(a, b) for a, b in zip(*_edges(cuts))] == window_bounds(len(members), window)
        np.testing.assert_array_equal(np.concatenate([i for i, _ in cuts]), members)
        assert sum(k for _, k in cuts) == max(1, round(keep * len(members)))


def _edges(cuts: list[tuple[np.ndarray, int]]) -> tuple[list[int], list[int]]:
    sizes = np.cumsum([0] + [len(i) for i, _ in cuts])
    return sizes[:-1].tolist(), sizes[1:].tolist()


@settings(max_examples=50, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=400),
    keep=keeps,
    pool=st.floats(1.0, 4.0),
    seed=st.integers(0, 2**31),
    carried=st.floats(0.0, 1.0),
)
def test_pools_hold_the_previous_round_and_are_reproducible(labels, keep, pool, seed, carried):
    labels = np.asarray(labels)
    previous = np.flatnonzero(np.random.default_rng(seed).random(len(labels)) < carried)
    budgets, pools = class_pools(labels, keep, pool, seed, previous=previous)
    again = class_pools(labels, keep, pool, seed, previous=previous)
    assert budgets == again[0] and all(np.array_equal(pools[c], again[1][c]) for c in pools)
    for c, members in ((c, np.flatnonzero(labels == c)) for c in np.unique(labels).tolist()):
        assert budgets[c] == class_budget(len(members), keep)
        size = min(len(members), math.ceil(pool * budgets[c]))
        assert len(pools[c]) == size and np.all(np.diff(pools[c]) > 0) and np.all(labels[pools[c]] == c)
        theirs = np.intersect1d(previous, members)
        assert len(np.intersect1d(pools[c], theirs)) == min(len(theirs), size)  # carried first
    whole = class_pools(labels, keep, pool, seed, whole=True)[1]
    assert all(np.array_equal(whole[c], np.flatnonzero(labels == c)) for c in whole)


@given(n=st.integers(1, 5000), keep=keeps, seed=st.integers(0, 2**31))
def test_uniform_draws_are_reproducible_sorted_and_sized(n, keep, seed):
    ids = uniform_draw(n, keep, seed)
    np.testing.assert_array_equal(ids, uniform_draw(n, keep, seed))
    assert len(ids) == class_budget(n, keep) and np.all(np.diff(ids) > 0) and 0 <= ids[0] and ids[-1] < n


@given(labels=st.lists(st.integers(0, 5), min_size=1, max_size=500), keep=keeps, seed=st.integers(0, 2**31))
def test_class_balanced_draws_keep_each_class_budget(labels, keep, seed):
    labels = np.asarray(labels)
    ids = class_balanced_draw(labels, keep, seed)
    np.testing.assert_array_equal(ids, class_balanced_draw(labels, keep, seed))
    assert np.all(np.diff(ids) > 0)
    counts = np.bincount(labels[ids], minlength=6)
    for c in np.unique(labels):
        assert counts[c] == class_budget(int((labels == c).sum()), keep)


def test_bad_plans_are_named():
    for keep in (0, -0.1, 1.5, float("nan"), "a", True, None, [0.5]):
        with pytest.raises(ParameterError, match=r"keep must be in \(0, 1\], got "):
            check_keep(keep)
    with pytest.raises(SampleIdError, match="previous ids in 'd.zarr' must be integers, got float64"):
        class_pools(np.zeros(5, int), 0.5, 2, 0, previous=np.array([1.0, 2.0]), where="'d.zarr'")
    with pytest.raises(ParameterError, match="pool must be >= 1"):
        class_pools(np.zeros(5, int), 0.5, 0.5, 0)
    with pytest.raises(SampleIdError, match=r"previous id 5 out of range \[0, 5\) in 'd.zarr'"):
        class_pools(np.zeros(5, int), 0.5, 2, 0, previous=np.array([1, 5]), where="'d.zarr'")
    with pytest.raises(ParameterError, match="window must be >= 1"):
        window_bounds(10, 0)
