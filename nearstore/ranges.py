"""Byte-range coalescing: fewer requests for a bounded number of extra bytes."""

from __future__ import annotations

import numpy as np

DEFAULT_GAP_BYTES = 1 << 20
DEFAULT_MAX_OVERHEAD = 0.05


def coalesce_ranges(
    starts: np.ndarray,
    ends: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    gap_bytes: int = DEFAULT_GAP_BYTES,
    max_overhead: float = DEFAULT_MAX_OVERHEAD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge non-empty byte ranges [start, end) into fewer, larger runs.

    groups: the object each range is in (default: all in one); ranges of different objects
        never merge, so one call plans a whole read.
    Overlapping and touching ranges always merge (that costs no byte). Of the holes between
    the remaining runs, the smallest are bridged first, each no larger than `gap_bytes`, while
    the bridged bytes stay within `max_overhead` × the bytes asked for. The knob trades requests
    for bytes: object stores charge per request, and a request costs a round trip.

    Returns (run_starts, run_ends, run_of_range): run_of_range[i] is the run holding range i;
    runs are numbered in (group, start) order.
    """
    if gap_bytes < 0:
        raise ValueError(f"gap_bytes must be >= 0, got {gap_bytes}")
    if not max_overhead >= 0:
        raise ValueError(f"max_overhead must be >= 0, got {max_overhead}")
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    groups = np.zeros(len(starts), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    if starts.shape != ends.shape or starts.shape != groups.shape or starts.ndim != 1:
        raise ValueError(
            f"starts, ends and groups must be 1-D of one length, got {starts.shape}, {ends.shape}, {groups.shape}"
        )
    if np.any(ends <= starts):
        raise ValueError("every range needs start < end")
    if len(starts) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty

    order = np.lexsort((starts, groups))
    s, g = starts[order], groups[order]
    new_group = g[1:] != g[:-1]
    # Furthest end so far within each group: lift every group above all before it, take the
    # running maximum, lower it again.
    lift = np.concatenate([[0], np.cumsum(new_group)]) * (int(ends.max()) + 1)
    e = np.maximum.accumulate(ends[order] + lift) - lift
    # Hole before range i (i >= 1): how far it starts past everything before it in its group.
    holes = s[1:] - e[:-1]
    bridge = (holes <= 0) & ~new_group
    gaps = np.flatnonzero(~bridge & ~new_group)
    budget = max_overhead * int(np.sum(ends - starts))
    by_size = gaps[np.argsort(holes[gaps], kind="stable")]
    spent = np.cumsum(holes[by_size])
    affordable = by_size[(holes[by_size] <= gap_bytes) & (spent <= budget)]
    bridge[affordable] = True

    run_sorted = np.concatenate([[0], np.cumsum(~bridge)])
    num_runs = int(run_sorted[-1]) + 1
    run_starts = np.full(num_runs, np.iinfo(np.int64).max, dtype=np.int64)
    run_ends = np.zeros(num_runs, dtype=np.int64)
    np.minimum.at(run_starts, run_sorted, s)
    np.maximum.at(run_ends, run_sorted, e)
    run_of_range = np.empty_like(run_sorted)
    run_of_range[order] = run_sorted
    return run_starts, run_ends, run_of_range
