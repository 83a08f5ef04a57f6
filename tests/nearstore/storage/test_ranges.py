from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearstore.storage.ranges import coalesce_ranges


@st.composite
def range_sets(draw):
    n = draw(st.integers(0, 40))
    starts = np.array(draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n)), dtype=np.int64)
    lengths = np.array(draw(st.lists(st.integers(1, 500), min_size=n, max_size=n)), dtype=np.int64)
    groups = np.array(draw(st.lists(st.sampled_from([3, 7, 8]), min_size=n, max_size=n)), dtype=np.int64)
    return starts, starts + lengths, groups


@settings(max_examples=300, deadline=None)
@given(range_sets(), st.integers(0, 2_000), st.floats(0, 2))
def test_runs_cover_ranges_within_the_byte_budget(ranges, gap_bytes, max_overhead):
    starts, ends, groups = ranges
    run_starts, run_ends, run_of = coalesce_ranges(
        starts, ends, groups=groups, gap_bytes=gap_bytes, max_overhead=max_overhead
    )
    assert len(run_of) == len(starts)
    assert set(run_of.tolist()) == set(range(len(run_starts)))  # every run holds a range
    # every range lies inside its run, and a run never spans two objects
    assert np.all(run_starts[run_of] <= starts) and np.all(ends <= run_ends[run_of])
    run_group = np.full(len(run_starts), -1)
    run_group[run_of] = groups
    assert np.all(run_group[run_of] == groups)
    extra = 0
    for group in np.unique(groups):
        mine = groups == group
        runs = np.unique(run_of[mine])
        # runs of one object are disjoint and sorted
        assert np.all(run_ends[runs][:-1] < run_starts[runs][1:])
        covered = np.zeros(10_600, dtype=bool)
        for s, e in zip(starts[mine], ends[mine]):
            covered[s:e] = True
        fetched = np.zeros_like(covered)
        for s, e in zip(run_starts[runs], run_ends[runs]):
            fetched[s:e] = True
            assert max(_uncovered_stretches(covered[s:e]), default=0) <= gap_bytes
        extra += int(fetched.sum() - covered.sum())
    # bytes fetched beyond the union of the ranges stay within the budget
    assert extra <= max_overhead * int(np.sum(ends - starts)) + 1e-9


def _uncovered_stretches(covered: np.ndarray) -> list[int]:
    stretches, length = [], 0
    for byte_covered in covered:
        if byte_covered:
            stretches.append(length)
            length = 0
        else:
            length += 1
    return stretches + [length]


def test_no_budget_merges_only_touching_and_overlapping_ranges():
    starts = np.array([0, 10, 30, 35, 100])
    ends = np.array([10, 20, 40, 38, 101])
    run_starts, run_ends, run_of = coalesce_ranges(starts, ends, gap_bytes=10**6, max_overhead=0)
    assert run_starts.tolist() == [0, 30, 100]
    assert run_ends.tolist() == [20, 40, 101]
    assert run_of.tolist() == [0, 0, 1, 1, 2]


def test_smallest_holes_are_bridged_first():
    # holes of 50, 5 and 20 bytes; 100 bytes requested; 30% budget buys the 5 and the 20
    starts = np.array([0, 70, 95, 135])
    ends = np.array([20, 90, 115, 175])
    run_starts, run_ends, _ = coalesce_ranges(starts, ends, gap_bytes=1000, max_overhead=0.3)
    assert list(zip(run_starts, run_ends)) == [(0, 20), (70, 175)]


def test_ranges_of_different_objects_never_merge():
    starts, ends, groups = np.array([0, 10, 0]), np.array([10, 20, 10]), np.array([1, 1, 2])
    run_starts, run_ends, run_of = coalesce_ranges(starts, ends, groups=groups, max_overhead=10)
    assert run_of.tolist() == [0, 0, 1]
    assert run_starts.tolist() == [0, 0] and run_ends.tolist() == [20, 10]


def test_gap_bytes_caps_a_single_hole():
    run_starts, _, _ = coalesce_ranges(np.array([0, 200]), np.array([100, 300]), gap_bytes=99, max_overhead=10)
    assert len(run_starts) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gap_bytes": -1}, "gap_bytes"),
        ({"max_overhead": -0.1}, "max_overhead"),
        ({"max_overhead": float("nan")}, "max_overhead"),
    ],
)
def test_bad_knobs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        coalesce_ranges(np.array([0]), np.array([1]), **kwargs)


@pytest.mark.parametrize("end", [4, 5])
def test_inverted_or_empty_range_is_rejected(end):
    with pytest.raises(ValueError, match="start < end"):
        coalesce_ranges(np.array([5]), np.array([end]))
