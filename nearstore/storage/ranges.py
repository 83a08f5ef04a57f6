"""Byte-range coalescing: fewer requests for a bounded number of extra bytes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nearstore.errors import ParameterError


@dataclass(frozen=True)
class Coalescing:
    """How a reader merges byte ranges (see `coalesce_ranges`): holes up to `gap_bytes` each are
    bridged, smallest first, while the bridged bytes stay within `max_overhead` × the bytes asked."""

    gap_bytes: int = 1 << 20
    max_overhead: float = 0.05

    @classmethod
    def of(cls, value: Coalescing | Mapping[str, Any]) -> Coalescing:
        """`value` itself, or the Coalescing its fields name (as JSON options give them)."""
        return value if isinstance(value, cls) else cls(**value)

    def __post_init__(self) -> None:
        if self.gap_bytes < 0:
            raise ParameterError(f"gap_bytes must be >= 0, got {self.gap_bytes}")
        if not self.max_overhead >= 0:
            raise ParameterError(f"max_overhead must be >= 0, got {self.max_overhead}")


# Training reads: a batch's samples, 5% more bytes at most.
TRAINING_READS = Coalescing()
# Pools read only to be scored, beside the data: every hole under 64 KiB (about what a request
# costs in transfer) is bridged, whatever the bytes add up to. Small samples' pools are then read
# in whole shards: a 10% round over HTTP on 127.0.0.1 made 51 requests in 0.21 s, not 7,519 in
# 3.2 s, for 5x the bytes (bench/round_cost.py).
POOL_READS = Coalescing(gap_bytes=1 << 16, max_overhead=math.inf)


def coalesce_ranges(
    starts: np.ndarray,
    ends: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    gap_bytes: int = TRAINING_READS.gap_bytes,
    max_overhead: float = TRAINING_READS.max_overhead,
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
    Coalescing(gap_bytes, max_overhead)  # checks both
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    groups = np.zeros(len(starts), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    if starts.shape != ends.shape or starts.shape != groups.shape or starts.ndim != 1:
        raise ParameterError(
            f"starts, ends and groups must be 1-D of one length, got {starts.shape}, {ends.shape}, {groups.shape}"
        )
    if np.any(ends <= starts):
        raise ParameterError("every range needs start < end")
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
