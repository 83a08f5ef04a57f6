from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearstore.ranges import coalesce_ranges


@st.composite
def range_sets(draw):
    n = draw(st.integers(0, 40))
    starts = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n))
    lengths = draw(st.lists(st.integers(1, 500), min_size=n, max_size=n))
    return np.array(starts, dtype=np.int64), np.array(starts, dtype=np.int64) + np.array(lengths, dtype=np.int64)


@settings(max_examples=300, deadline=None)
@given(range_sets(), st.integers(0, 2_000), st.floats(0, 2))
def test_runs_cover_ranges_within_the_byte_budget(ranges, gap_bytes, max_overhead):
    starts, ends = ranges
    run_starts, run_ends, run_of = coalesce_ranges(starts, ends, gap_bytes=gap_bytes, max_overhead=max_overhead)
    assert len(run_of) == len(starts)
    # every range lies inside its run
    assert np.all(run_starts[run_of] <= starts) and np.all(ends <= run_ends[run_of])
    # runs are disjoint and sorted, each holds at least one range
    assert np.all(run_ends[:-1] < run_starts[1:])
    assert set(run_of.tolist()) == set(range(len(run_starts)))
    # bytes fetched beyond the union of the ranges stay within the budget, holes within gap_bytes
    covered = np.zeros(10_600, dtype=bool)
    for s, e in zip(starts, ends):
        covered[s:e] = True
    fetched = np.zeros_like(covered)
    for s, e in zip(run_starts, run_ends):
        fetched[s:e] = True
    extra = int(fetched.sum() - covered.sum())
    assert extra <= max_overhead * int(np.sum(ends - starts)) + 1e-9
    for s, e in zip(run_starts, run_ends):
        assert max(_uncovered_stretches(covered[s:e]), default=0) <= gap_bytes


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
