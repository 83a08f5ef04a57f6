"""Byte-range planning by cost: a request is worth some bytes of transfer, so a hole cheaper to
read through than a request is read through. And batches bounded by their bytes (`batch_bounds`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nearstore.checks import check_integer, check_range
from nearstore.errors import ParameterError

# What a request to object storage or HTTP costs, in bytes of transfer: 64 KiB. Measured over HTTP
# on 127.0.0.1, a 10% pool read in whole shards made 51 requests in 0.21 s, not 7,519 in 3.2 s, for
# 5x the bytes (bench/round_cost.py); on S3 (20 ms to the first byte, 100 MB/s, 32 requests in
# flight) a request is worth about 20 ms × 100 MB/s / 32 = 62 KB of transfer time.
REQUEST_BYTES = 1 << 16
# What a read of a local file costs: a page. Measured on 2,048 JPEGs of 46 kB on local disk, a 25%
# selection took 0.039 s reading only its ranges (0.252 of the store, 391 reads) and 0.043 s with
# holes under 64 KiB read through (0.299, 292 reads): locally a read costs less than 46 kB.
LOCAL_REQUEST_BYTES = 1 << 12


@dataclass(frozen=True)
class Coalescing:
    """How a reader plans byte ranges (see `coalesce_ranges`): a request is worth `request_bytes`
    of transfer, so every hole shorter than that between wanted ranges of one object is read
    through, and every longer one starts a new request. Small samples wanted densely are then read
    in whole shards, large or sparse ones by ranges. None: the store's own (`for_store`), a page
    for local files, 64 KiB for object storage and HTTP."""

    request_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.request_bytes is not None:
            check_integer("request_bytes", self.request_bytes, 0)

    def for_store(self, protocol: str | tuple[str, ...]) -> Coalescing:
        """This plan with a store's default filled in: the store's fsspec `protocol`."""
        if self.request_bytes is not None:
            return self
        local = {"file", "local"} & set((protocol,) if isinstance(protocol, str) else protocol)
        return Coalescing(LOCAL_REQUEST_BYTES if local else REQUEST_BYTES)

    @classmethod
    def of(cls, value: Coalescing | Mapping[str, Any], name: str = "reads") -> Coalescing:
        """`value` itself, or the Coalescing its fields name (as JSON options give them); a
        ParameterError naming `name` otherwise."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping) or not set(value) <= {"request_bytes"}:
            raise ParameterError(f"{name} must be an object of request_bytes, got {value!r}")
        request_bytes = value.get("request_bytes")
        return cls(None if request_bytes is None else check_integer(f"{name}.request_bytes", request_bytes, 0))

    @classmethod
    def for_link(cls, latency: float, bandwidth: float, concurrency: int = 32) -> Coalescing:
        """The plan for a store `latency` seconds to its first byte and `bandwidth` bytes/s away,
        `concurrency` requests in flight: a request costs latency × bandwidth / concurrency bytes."""
        check_range("latency", latency, 0, 3600)
        check_range("bandwidth", bandwidth, 1, 1e15)
        concurrency = check_integer("concurrency", concurrency, 1)
        return cls(int(latency * bandwidth / concurrency))


DEFAULT_READS = Coalescing()


def coalesce_ranges(
    starts: np.ndarray,
    ends: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    request_bytes: int = REQUEST_BYTES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge non-empty byte ranges [start, end) into the runs that cost least, where a run costs
    its bytes plus `request_bytes`.

    groups: the object each range is in (default: all in one); ranges of different objects
        never merge, so one call plans a whole read.
    Overlapping and touching ranges always merge (that costs no byte). Each hole between the
    remaining runs is read through when it is shorter than `request_bytes`: holes are independent,
    so bridging each one that costs less than the request it saves is the cheapest plan.

    Returns (run_starts, run_ends, run_of_range): run_of_range[i] is the run holding range i;
    runs are numbered in (group, start) order.
    """
    check_integer("request_bytes", request_bytes, 0)
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
    bridge = (s[1:] - e[:-1] < request_bytes) & ~new_group
    bridge |= (s[1:] <= e[:-1]) & ~new_group  # overlapping or touching: free, whatever request_bytes is

    run_sorted = np.concatenate([[0], np.cumsum(~bridge)])
    num_runs = int(run_sorted[-1]) + 1
    run_starts = np.full(num_runs, np.iinfo(np.int64).max, dtype=np.int64)
    run_ends = np.zeros(num_runs, dtype=np.int64)
    np.minimum.at(run_starts, run_sorted, s)
    np.maximum.at(run_ends, run_sorted, e)
    run_of_range = np.empty_like(run_sorted)
    run_of_range[order] = run_sorted
    return run_starts, run_ends, run_of_range


def batch_bounds(sizes: np.ndarray, most: int, limit: int) -> list[int]:
    """Where consecutive batches of items of `sizes` bytes start, and the end: at most `most` items
    and `limit` bytes a batch, an item over `limit` alone; [0] for none."""
    ends, bounds = np.cumsum(sizes), [0]
    while bounds[-1] < len(sizes):
        start = bounds[-1]
        fits = int(np.searchsorted(ends, (ends[start - 1] if start else 0) + limit, side="right"))
        bounds.append(min(max(fits, start + 1), start + most))
    return bounds
