"""`SampleCache`: the samples a trainer was sent, kept beside it, so that within a selection round
each crosses the network once and later epochs read nothing.

Samples are kept in memory up to a byte budget, then in a local directory up to another. An epoch
visits every sample of its round once, in a new order, so past the budget nothing is evicted to
make room (least-recently-used would evict each sample just before its next visit and hit never):
the samples that fit stay, the rest are read each epoch. What a new round no longer visits is
let go when its first epoch starts (`retain`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from nearstore.checks import check_integer
from nearstore.errors import ParameterError

MEMORY_BYTES = 1 << 30  # the default in-memory budget: 1 GiB
# Left free on the cache directory's filesystem: the disk budget is cut to the room there is, less
# this, for what else writes there.
DISK_MARGIN = 256 << 20
log = logging.getLogger("nearstore")


# A cache's own directory inside `directory`, and the file in it naming the process it serves.
_PREFIX, _OWNER = "nearstore-cache-", "owner"


def _owner() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _sweep(directory: str | os.PathLike) -> None:
    """Remove the cache directories in `directory` of processes of this host that are gone: one
    stopped by a signal (SIGTERM from SLURM, Kubernetes, torchrun) never removed its own."""
    host = socket.gethostname()
    for entry in os.scandir(directory):
        if not (entry.name.startswith(_PREFIX) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            with open(os.path.join(entry.path, _OWNER)) as f:
                owner_host, pid = f.read().rsplit(" ", 1)
            if owner_host != host or _alive(int(pid)):
                continue
        except (OSError, ValueError):  # no owner (a release before it wrote one, or being made): kept
            continue
        log.info("sample cache: removing %s, left by process %s, which is gone", entry.path, pid)
        shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _after_fork() -> None:
    for cache in list(_SPILLING):
        cache._forked()


_SPILLING: weakref.WeakSet[SampleCache] = weakref.WeakSet()  # this process's caches with a directory
os.register_at_fork(after_in_child=_after_fork)


class CacheLost(Exception):
    """The disk tier failed a read (its directory gone, say): it is dropped, and its samples are
    no longer kept; the loader reads them again."""


@dataclass
class CacheStats:
    """hits: visits the cache served a sample read for an earlier one; misses: visits whose sample
    was read for them (or with a shard mate's, just before); bytes_saved: what the hits cost when
    their samples were read (each sample's share of the bytes of the read that brought it)."""

    hits: int = 0
    misses: int = 0
    bytes_saved: int = 0


class SampleCache:
    """Samples by id, in memory up to `memory_bytes`, then in files under `directory` up to
    `disk_bytes` (a directory of its own inside it, removed when the cache goes).

    Bound to one dataset on first use (`bind`); the dataset is read-only, so a kept sample never
    goes stale. Not thread-safe: one loader's reader thread uses it.
    """

    def __init__(
        self, memory_bytes: int = MEMORY_BYTES, *, directory: str | os.PathLike | None = None, disk_bytes: int = 0
    ) -> None:
        memory_bytes = check_integer("memory_bytes", memory_bytes, 0)
        disk_bytes = check_integer("disk_bytes", disk_bytes, 0)
        if disk_bytes and directory is None:
            raise ParameterError("disk_bytes needs a directory to spill to")
        if directory is not None and not os.path.isdir(directory):
            raise ParameterError(f"cache directory {os.fspath(directory)!r} is not a directory")
        if directory is not None and not disk_bytes:  # it spilled nothing, silently
            raise ParameterError(f"directory={os.fspath(directory)!r} needs disk_bytes=, the bytes it may spill there")
        self._budgets = (memory_bytes, disk_bytes)
        self._root: str | None = None  # the directory of its own it spills to
        if disk_bytes:
            _sweep(directory)
            try:  # here, not on first use: a directory it cannot write to fails by name, before any loader
                self._root = tempfile.mkdtemp(prefix=_PREFIX, dir=directory)
                with open(os.path.join(self._root, _OWNER), "w") as f:
                    f.write(_owner())
            except OSError as e:
                if self._root is not None:  # made, its owner file not written (a full disk): no one would sweep it
                    shutil.rmtree(self._root, ignore_errors=True)
                raise ParameterError(
                    f"cache directory {os.fspath(directory)!r} (directory=) cannot be written to: {e.strerror or e}"
                ) from e
            self._removal = weakref.finalize(self, shutil.rmtree, self._root, True)
            _SPILLING.add(self)
        self._dataset: str | None = None
        self._owner: weakref.ref | None = None  # the loader it serves
        self.stats = CacheStats()
        self.full = False  # a sample did not fit since the last `retain` that let any go

    @property
    def spill_directory(self) -> str | None:
        """The directory of its own it spills to, or None (memory alone)."""
        return self._root

    def bind(self, identity: Mapping[str, Any], arrays: list[str], owner: object = None) -> None:
        """Keep samples of `arrays` of the dataset `identity` names (its fingerprint, else URL and
        size) for `owner` (a loader) alone; a cache bound to another dataset, or other arrays, or
        still serving another owner, refuses (each epoch keeps only its own loader's samples, and
        one reader thread a cache)."""
        key = repr((identity.get("fingerprint") or (identity.get("url"), identity["num_samples"]), arrays))
        if owner is not None:
            current = self._owner() if self._owner is not None else None
            if current is not None and current is not owner:
                raise ParameterError(
                    "this SampleCache serves another loader: give each loader its own, or close() the other first"
                )
            self._owner = weakref.ref(owner)
        if self._dataset is not None:
            if key != self._dataset:
                raise ParameterError(
                    "this SampleCache holds samples of another dataset or arrays: give each loader its own"
                )
            return
        self._dataset, self._arrays = key, list(arrays)
        num_samples = int(identity["num_samples"])
        self._tier = np.full(num_samples, -1, dtype=np.int8)  # 0 memory, 1 disk, -1 not kept
        self._slot = np.zeros(num_samples, dtype=np.int64)
        self._cost = np.zeros(num_samples, dtype=np.float32)
        self._fresh = np.zeros(num_samples, dtype=bool)  # kept, and not visited since it was read
        self._tiers = [_Tier(self._budgets[0], None), None]
        root = self._root
        if root is not None:
            budget = max(0, min(self._budgets[1], shutil.disk_usage(root).free - DISK_MARGIN))
            if budget < self._budgets[1]:
                log.warning("sample cache: %s has room for %d of disk_bytes=%d bytes", root, budget, self._budgets[1])
            self._tiers[1] = _Tier(budget, root) if budget else None

    def unbind(self, owner: object) -> None:
        """`owner` (a closed loader) no longer uses the cache: another loader of its dataset may."""
        if self._owner is not None and self._owner() is owner:
            self._owner = None

    @property
    def samples(self) -> int:
        return int(np.count_nonzero(self._tier >= 0)) if self._dataset else 0

    def nbytes(self) -> tuple[int, int]:
        """Bytes kept (in memory, on disk)."""
        return tuple(t.used if t else 0 for t in self._tiers) if self._dataset else (0, 0)  # type: ignore[return-value]

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` are kept."""
        return self._tier[ids] >= 0

    def room_for(self, sample_bytes: int) -> int:
        """How many more samples of `sample_bytes` each it can keep."""
        return sum(t.room() // max(1, sample_bytes) for t in self._tiers if t is not None) if self._dataset else 0

    def in_memory(self, ids: np.ndarray) -> bool:
        """Whether every one of `ids` is kept in memory."""
        return bool(self._dataset) and bool(np.all(self._tier[ids] == 0))

    def get(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """{array: rows} of kept samples `ids` (at least one; rows in the order of ids) for a visit
        of each: hits, but for the first visit of a sample that came along with another. CacheLost
        where one is no longer kept (its disk tier dropped since it was asked `holds`)."""
        tiers, slots = self._tier[ids], self._slot[ids]
        if (tiers < 0).any():  # one row broadcast over the others, or a KeyError, was what followed
            raise CacheLost(f"sample {int(ids[np.argmax(tiers < 0)])} is no longer kept: its tier was dropped")
        held = {t: mask for t in (0, 1) if (mask := tiers == t).any()}
        out: dict[str, np.ndarray] = {}
        for name in self._arrays:
            try:
                parts = {t: self._tiers[t].get(name, slots[mask]) for t, mask in held.items()}
            except OSError as e:  # memory does not fail so: the disk tier did
                self._lose_disk(e)
                raise CacheLost(str(e)) from e
            if len(parts) == 1:  # all in one tier: its gather is the rows, in the order of ids
                out[name] = next(iter(parts.values()))
                continue
            like = parts[0]
            rows = np.empty((len(ids), *like.shape[1:]), dtype=like.dtype)
            for t, part in parts.items():
                rows[held[t]] = part
            out[name] = rows
        fresh = self._fresh[ids]
        self._fresh[ids] = False
        self.stats.misses += int(np.count_nonzero(fresh))
        self.stats.hits += int(np.count_nonzero(~fresh))
        self.stats.bytes_saved += int(self._cost[ids[~fresh]].sum())
        return out

    def put(self, ids: np.ndarray, arrays: Mapping[str, np.ndarray], cost: float, visited: np.ndarray) -> None:
        """Keep samples `ids` (unique, none kept yet) whose rows are `arrays`, each read for `cost`
        bytes, as many as fit: memory first, then disk (`full` says when some did not). `visited`:
        those of them read for a visit now (the rest came along: their next visit is no hit)."""
        sizes = sum(_row_nbytes(arrays[name]) for name in self._arrays)
        left = np.ones(len(ids), dtype=bool)
        for t, tier in enumerate(self._tiers):
            if tier is None or not left.any():
                continue
            fits = left & (np.cumsum(np.where(left, sizes, 0)) <= tier.room())
            if not fits.any():
                continue
            rows = np.flatnonzero(fits)
            try:
                slots = tier.put({name: arrays[name][rows] for name in self._arrays}, sizes[rows])
            except OSError as e:  # the disk tier (full, gone): the samples are read from the store
                self._lose_disk(e)
                continue
            self._tier[ids[rows]], self._slot[ids[rows]] = t, slots
            self._fresh[ids[rows]] = True
            left &= ~fits
        self._fresh[visited] = False
        self._cost[ids[~left]] = cost
        self.full |= bool(left.any())

    def _lose_disk(self, error: OSError) -> None:
        """Drop the disk tier after `error`: its samples are no longer kept (read from the store),
        and its files are removed (a full disk it gave up on stays full for no one)."""
        log.warning("sample cache: its directory failed (%s): what it kept is read from the store again", error)
        if self._dataset and self._tiers[1] is not None:
            self._tiers[1].remove_files()
        self._drop_disk()

    def _drop_disk(self) -> None:
        if self._dataset:
            self._tiers[1] = None
            self._tier[self._tier == 1] = -1
            self.full = True

    def _forked(self) -> None:
        """In a child process forked from the one that made this cache: its directory is the
        parent's, which goes on writing there and removes it. The child keeps what is in memory,
        spills nothing, and leaves the directory to the parent (its files were the child's to
        overwrite, and its cache going removed them under the parent)."""
        self._removal.detach()
        self._root = None
        self._drop_disk()

    def retain(self, ids: np.ndarray) -> None:
        """Let go of every kept sample not among `ids` (a new round's, or epoch's)."""
        if not self._dataset:
            return
        gone = self._tier >= 0
        gone[ids] = False
        self.full &= not gone.any()
        freed = [(tier, self._slot[gone & (self._tier == t)]) for t, tier in enumerate(self._tiers) if tier is not None]
        self._tier[gone] = -1  # first: a tier that fails to free them keeps them no longer either
        for tier, slots in freed:
            if len(slots):
                try:
                    tier.free(slots)
                except OSError as e:  # memory does not fail so: the directory went (a tmp cleaner)
                    self._lose_disk(e)

    def release(self) -> None:
        """Let go of every kept sample and the room taken for them, in memory and on disk (the
        figures in `stats` stay): a closed loader's own cache held its memory while the loader
        was still referred to (a notebook's variables)."""
        if not self._dataset:
            return
        self.retain(np.empty(0, dtype=np.int64))
        memory, disk = self._tiers
        self._tiers = [_Tier(memory.budget, None), disk and _Tier(disk.budget, disk.root)]
        if disk is not None:
            disk.remove_files()

    def as_dict(self) -> dict[str, int]:
        memory, disk = self.nbytes()
        return {
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "bytes_saved": self.stats.bytes_saved,
            "samples": self.samples,
            "memory_bytes": memory,
            "disk_bytes": disk,
        }


class _Tier:
    """Rows of every array in numbered slots, within a byte budget: in memory (`root` None), or in
    files under `root` (a memory-mapped file an array of fixed-size rows, a file a sample else)."""

    def __init__(self, budget: int, root: str | None) -> None:
        self.budget, self.root, self.used = budget, root, 0
        self.rows: dict[str, Any] = {}
        self.sums: dict[str, np.ndarray] = {}  # on disk: each slot's crc32c, checked as it is read back
        self.sizes = np.zeros(0, dtype=np.int64)  # bytes of each slot's sample, 0 where free
        self.slots = 0  # slots handed out so far; those freed again are in free_slots
        self.free_slots: list[int] = []

    def room(self) -> int:
        return self.budget - self.used

    def put(self, arrays: Mapping[str, np.ndarray], sizes: np.ndarray) -> np.ndarray:
        n = len(sizes)
        reuse = [self.free_slots.pop() for _ in range(min(n, len(self.free_slots)))]
        slots = np.array(reuse + list(range(self.slots, self.slots + n - len(reuse))), dtype=np.int64)
        self.slots += n - len(reuse)
        self._grow(self.slots, arrays)
        for name, values in arrays.items():
            store = self.rows[name]
            if self.root:
                self.sums[name][slots] = _crc32c(values)
            if isinstance(store, list):
                for slot, value in zip(slots.tolist(), values):
                    store[slot] = self._write(name, slot, value) if self.root else value
            elif self.root:
                _write_rows(store, slots, values)
            else:
                store[slots] = values
        self.sizes[slots] = sizes
        self.used += int(sizes.sum())
        return slots

    def get(self, name: str, slots: np.ndarray) -> np.ndarray:
        """The rows of `slots`; on disk, an OSError where one is not what was put (a file changed
        or cut short under the cache: damage is an error, never data)."""
        store = self.rows[name]
        if not isinstance(store, list):
            rows = store[slots]
        else:
            rows = np.empty(len(slots), dtype=object)
            for i, slot in enumerate(slots.tolist()):
                rows[i] = _read(store[slot]) if self.root else store[slot]
        if self.root:
            changed = np.flatnonzero(_crc32c(rows) != self.sums[name][slots])
            if len(changed):
                raise OSError(
                    errno.EIO, f"a kept row of {name!r} changed on disk under {self.root} (slot {slots[changed[0]]})"
                )
        return rows

    def remove_files(self) -> None:
        """Remove the files it keeps rows in (a tier on disk; its directory stays, with the cache's
        owner file)."""
        for store in self.rows.values():
            paths = [store.filename] if isinstance(store, np.memmap) else [p for p in store if isinstance(p, str)]
            for path in paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def free(self, slots: np.ndarray) -> None:
        for store in self.rows.values():
            if isinstance(store, list):
                for slot in slots.tolist():
                    if self.root:
                        os.unlink(store[slot])
                    store[slot] = None
        self.used -= int(self.sizes[slots].sum())
        self.sizes[slots] = 0
        self.free_slots += slots.tolist()

    def _grow(self, n: int, like: Mapping[str, np.ndarray]) -> None:
        """Room for slots 0..n-1: doubling in memory; a file of the whole budget's rows on disk
        (sparse: only written rows take space), read through a memory map, written by pwrite: a
        full disk then fails a write with ENOSPC, where a store into the map killed the process
        (SIGBUS; another cache or job filling the disk after this one measured its room)."""
        if n <= len(self.sizes):
            return
        capacity = max(n, 2 * len(self.sizes))
        for name, values in like.items():
            old = self.rows.get(name)
            if values.dtype == object:
                self.rows[name] = (old or []) + [None] * (capacity - len(old or []))
            elif self.root is None:
                store = np.empty((capacity, *values.shape[1:]), dtype=values.dtype)
                if old is not None:
                    store[: len(old)] = old
                self.rows[name] = store
            elif old is None:
                rows = max(capacity, self.budget // max(1, int(_row_nbytes(values)[0])) + 1)
                path = os.path.join(self.root, f"{len(self.rows)}.rows")
                self.rows[name] = np.lib.format.open_memmap(path, "w+", values.dtype, (rows, *values.shape[1:]))
            if self.root:
                old_sums = self.sums.get(name, np.zeros(0, np.uint32))
                self.sums[name] = np.concatenate([old_sums, np.zeros(capacity - len(old_sums), np.uint32)])
        self.sizes = np.concatenate([self.sizes, np.zeros(capacity - len(self.sizes), dtype=np.int64)])

    def _write(self, name: str, slot: int, value: bytes) -> str:
        path = os.path.join(self.root, f"{list(self.rows).index(name)}-{slot}.bin")
        with open(path, "wb") as f:
            f.write(value)
        return path


def _write_rows(store: np.memmap, slots: np.ndarray, values: np.ndarray) -> None:
    """values[i] into row slots[i] of a memory-mapped .npy file, by pwrite: one call a run of
    consecutive slots."""
    row = values[0].nbytes if len(values) else 0
    order = np.argsort(slots, kind="stable")
    slots, values = slots[order], np.ascontiguousarray(values[order])
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    values = values.astype(store.dtype, copy=False)
    fd = os.open(store.filename, os.O_WRONLY)
    try:
        for run, rows in zip(np.split(slots, breaks), np.split(values, breaks)):
            data = rows.tobytes()
            at, done = store.offset + int(run[0]) * row, 0
            while done < len(data):  # pwrite may write less than asked
                done += os.pwrite(fd, data[done:], at + done)
    finally:
        os.close(fd)


def _crc32c(rows: np.ndarray) -> np.ndarray:
    """Each row's crc32c: of its bytes, or of the bytes object it is."""
    data = rows if rows.dtype == object else (np.ascontiguousarray(row).tobytes() for row in rows)
    return np.fromiter(map(google_crc32c.value, data), dtype=np.uint32, count=len(rows))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _row_nbytes(values: np.ndarray) -> np.ndarray:
    """Bytes of each row: fixed for a numeric array, each one's length for encoded samples."""
    if values.dtype == object:
        return np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    return np.full(len(values), values[0].nbytes if len(values) else 0, dtype=np.int64)
