from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearstore.errors import ParameterError
from nearstore.storage.ranges import Coalescing, batch_bounds, coalesce_ranges


@st.composite
def range_sets(draw):
    n = draw(st.integers(0, 40))
    starts = np.array(draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n)), dtype=np.int64)
    lengths = np.array(draw(st.lists(st.integers(1, 500), min_size=n, max_size=n)), dtype=np.int64)
    groups = np.array(draw(st.lists(st.sampled_from([3, 7, 8]), min_size=n, max_size=n)), dtype=np.int64)
    return starts, starts + lengths, groups


@settings(max_examples=300, deadline=None)
@given(range_sets(), st.integers(0, 2_000))
def test_runs_cover_ranges_and_bridge_exactly_the_holes_cheaper_than_a_request(ranges, request_bytes):
    starts, ends, groups = ranges
    run_starts, run_ends, run_of = coalesce_ranges(starts, ends, groups=groups, request_bytes=request_bytes)
    assert len(run_of) == len(starts)
    assert set(run_of.tolist()) == set(range(len(run_starts)))  # every run holds a range
    # every range lies inside its run, and a run never spans two objects
    assert np.all(run_starts[run_of] <= starts) and np.all(ends <= run_ends[run_of])
    run_group = np.full(len(run_starts), -1)
    run_group[run_of] = groups
    assert np.all(run_group[run_of] == groups)
    for group in np.unique(groups):
        mine = groups == group
        runs = np.unique(run_of[mine])
        # runs of one object are disjoint, sorted, and a request apart at least
        assert np.all(run_ends[runs][:-1] + request_bytes <= run_starts[runs][1:])
        assert np.all(run_ends[runs][:-1] < run_starts[runs][1:])
        covered = np.zeros(10_600, dtype=bool)
        for s, e in zip(starts[mine], ends[mine]):
            covered[s:e] = True
        for s, e in zip(run_starts[runs], run_ends[runs]):
            # inside a run every hole is cheaper than the request it saves
            assert max(_uncovered_stretches(covered[s:e]), default=0) < max(request_bytes, 1)


@settings(max_examples=200, deadline=None)
@given(range_sets(), st.integers(0, 600))
def test_the_plan_costs_least_of_every_plan(ranges, request_bytes):
    """Against brute force: every way to split one object's sorted ranges into runs."""
    starts, ends, _ = ranges
    starts, ends = starts[:9], ends[:9]
    if not len(starts):
        return
    run_starts, run_ends, _ = coalesce_ranges(starts, ends, request_bytes=request_bytes)
    cost = int(np.sum(run_ends - run_starts)) + request_bytes * len(run_starts)
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    best = None
    for cuts in itertools.product([False, True], repeat=len(s) - 1):
        bounds = [0, *[i + 1 for i, cut in enumerate(cuts) if cut], len(s)]
        plan = sum(int(e[a:b].max() - s[a]) + request_bytes for a, b in zip(bounds[:-1], bounds[1:]))
        best = plan if best is None else min(best, plan)
    assert cost == best


def _uncovered_stretches(covered: np.ndarray) -> list[int]:
    stretches, length = [], 0
    for byte_covered in covered:
        if byte_covered:
            stretches.append(length)
            length = 0
        else:
            length += 1
    return stretches + [length]


def test_free_requests_merge_only_touching_and_overlapping_ranges():
    starts = np.array([0, 10, 30, 35, 100])
    ends = np.array([10, 20, 40, 38, 101])
    run_starts, run_ends, run_of = coalesce_ranges(starts, ends, request_bytes=0)
    assert run_starts.tolist() == [0, 30, 100]
    assert run_ends.tolist() == [20, 40, 101]
    assert run_of.tolist() == [0, 0, 1, 1, 2]


def test_a_hole_is_read_through_only_when_cheaper_than_a_request():
    # holes of 50, 5 and 20 bytes; a request worth 21 bytes bridges the 5 and the 20
    starts = np.array([0, 70, 95, 135])
    ends = np.array([20, 90, 115, 175])
    run_starts, run_ends, _ = coalesce_ranges(starts, ends, request_bytes=21)
    assert list(zip(run_starts, run_ends)) == [(0, 20), (70, 175)]


def test_ranges_of_different_objects_never_merge():
    starts, ends, groups = np.array([0, 10, 0]), np.array([10, 20, 10]), np.array([1, 1, 2])
    run_starts, run_ends, run_of = coalesce_ranges(starts, ends, groups=groups, request_bytes=10**6)
    assert run_of.tolist() == [0, 0, 1]
    assert run_starts.tolist() == [0, 0] and run_ends.tolist() == [20, 10]


def test_a_link_prices_a_request_by_latency_bandwidth_and_concurrency():
    assert Coalescing.for_link(0.02, 100e6, concurrency=32).request_bytes == 62_500
    assert Coalescing.for_link(0.0, 1e9).request_bytes == 0
    assert Coalescing.of({"request_bytes": 5}) == Coalescing(5)
    with pytest.raises(ParameterError, match="pool_reads must be an object of request_bytes"):
        Coalescing.of({"gap_bytes": 5}, "pool_reads")
    with pytest.raises(ParameterError, match=r"pool_reads.request_bytes must be an integer >= 0, got -1"):
        Coalescing.of({"request_bytes": -1}, "pool_reads")
    with pytest.raises(ParameterError, match="latency"):
        Coalescing.for_link(float("nan"), 1e6)


def test_the_default_plan_is_the_stores_own():
    assert Coalescing().for_store("file").request_bytes == 4096  # a local read costs a page
    assert Coalescing().for_store(("file", "local")).request_bytes == 4096
    assert Coalescing().for_store(("s3", "s3a")).request_bytes == 1 << 16  # a request to object storage
    assert Coalescing().for_store(("http", "https")).request_bytes == 1 << 16
    assert Coalescing(5).for_store("file") == Coalescing(5)  # a plan given is kept
    assert Coalescing.of({"request_bytes": None}) == Coalescing.of({}) == Coalescing()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"request_bytes": -1}, "request_bytes"),
        ({"request_bytes": 1.5}, "request_bytes"),
        ({"request_bytes": True}, "request_bytes"),
    ],
)
def test_bad_knobs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        coalesce_ranges(np.array([0]), np.array([1]), **kwargs)


@pytest.mark.parametrize("end", [4, 5])
def test_inverted_or_empty_range_is_rejected(end):
    with pytest.raises(ValueError, match="start < end"):
        coalesce_ranges(np.array([5]), np.array([end]))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 50), max_size=30),
    st.integers(1, 8),
    st.integers(1, 120),
)
def test_batches_are_greedy_by_count_and_bytes_and_a_large_item_alone(sizes, most, limit):
    bounds = batch_bounds(np.array(sizes, dtype=np.int64), most, limit)
    expected, held = [0], 0  # the rule item by item: a batch closes where the next item would pass a bound
    for i, size in enumerate(sizes):
        if i > expected[-1] and (i - expected[-1] == most or held + size > limit):
            expected.append(i)
            held = 0
        held += size
    assert bounds == (expected + [len(sizes)] if sizes else [0])
    for a, b in zip(bounds, bounds[1:]):
        assert 1 <= b - a <= most and (sum(sizes[a:b]) <= limit or b - a == 1)
