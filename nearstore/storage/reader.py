"""The selective reader: samples by id from sharded Zarr, each shard index read once.

zarr re-reads the shard index for every read (and up to 3.2 asks one inner chunk per request).
Here a read maps sample ids to byte ranges through cached shard indexes, merges nearby ranges
(`coalesce_ranges`), fetches all of them in one concurrent fsspec call, and decodes them as the
array's zarr.json says (`nearstore.storage.codecs`: by the Zarr v3 specification, not zarr's
internals, so any zarr release that writes the format will do). The answer always equals
`zarr_array[ids]`, or is an `IntegrityError`: every fetched range must have the length asked for
within the object size the manifest records, every index and inner chunk its checksum, every inner
chunk the crc32c the manifest records for its place, and no shard object may be missing. A reader
given a `ChunkCache` takes the inner chunks it holds from there instead of storage, checked the
same, and puts there the chunks it fetched once all of its read's checks passed, with the chunks
it read through between them that pass the same checks; a chunk another read is fetching meanwhile
it waits for and takes from there, instead of fetching it too (`ChunkCache.claim`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import google_crc32c
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from nearstore.errors import DatasetError, IntegrityError
from nearstore.storage.chunk_cache import ChunkCache, ChunkKey
from nearstore.storage.codecs import NOT_STORED, ChunkCodecs, Sharding, crc32c_before
from nearstore.storage.dataset import SHORT_READ_BACKOFF, Dataset, check_ids
from nearstore.storage.digests import content_digest
from nearstore.storage.iostats import IOStats
from nearstore.storage.ranges import DEFAULT_READS, Coalescing, coalesce_ranges

log = logging.getLogger("nearstore")
WHOLE_READ_SHARDS = 64  # shard objects a read of a whole array asks at once
GATHER_BYTES = 4 << 20  # raw chunks copied out of a read's bytes at a time (`_ReadPlan.decode`)


def size_problem(size: int, written: int) -> str | None:
    """What a shard object of `size` bytes is, where the manifest records `written`; None: the same."""
    if size == written:
        return None
    if size < written:
        return f"is cut short: {size} of the {written} bytes written"
    return f"is longer than written: {size} bytes, the manifest records {written}"


class SelectiveReader:
    """Read samples by id from a dataset's sharded arrays, counting bytes and requests.

    arrays: which sample arrays to read (default: all of the dataset's).
    reads: how byte ranges are planned (`Coalescing`: what a request is worth in bytes; by default
        the store's: a page for local files, 64 KiB for object storage and HTTP).
    stats: where to count (default: a counter of its own).
    keep: arrays among `arrays` read a shard whole the first time a read wants any of its samples,
        and kept with the opened dataset, then served from memory (small per-sample arrays,
        `small_arrays`: a label is 8 bytes, and a range request of its own every epoch; a shard at
        a time, so a rank of W reading its own shards reads their labels alone).
    cache: inner chunks read before, by this reader or any other sharing the cache (a server's
        readers): a chunk held there is not read from storage again, nor one that another read
        is fetching (this read waits for that fetch).
    digests: a shard read whole is also checked against its samples' digest where the manifest
        records every inner chunk's crc32c, which by itself finds a shard replaced by another
        (`verify_dataset` asks it); where the manifest does not, always.
    The reader never writes; `stats` counts every request it makes and every byte it receives.

    Several threads may read through one reader at once (a server's trainers): a read's state is
    its own, and what readers share through the opened dataset is made once (`Dataset._kept`: a
    kept array's shard is read by the first thread to want it, others wanting it wait) or filled
    idempotently (a shard index two reads fetch at once is written twice, the same; damage found is
    recorded the same by either). fsspec's filesystems are used from any thread: an async one
    (s3fs, HTTP) runs every call on its one event loop thread, a local one opens a file per call.
    """

    def __init__(
        self,
        dataset: Dataset,
        arrays: Sequence[str] | None = None,
        *,
        reads: Coalescing = DEFAULT_READS,
        stats: IOStats | None = None,
        keep: Sequence[str] = (),
        cache: ChunkCache | None = None,
        digests: bool = False,
    ) -> None:
        names = tuple(arrays) if arrays is not None else dataset.sample_arrays
        unknown = [n for n in names if n not in dataset.arrays]
        if unknown:
            raise DatasetError(f"{dataset.url!r} has no sample arrays {unknown}; it has {list(dataset.arrays)}")
        if not set(keep) <= set(names):
            raise DatasetError(f"arrays to keep {sorted(set(keep) - set(names))} are not among those read {names}")
        self.keep = tuple(keep)
        self.digests = digests
        self.dataset = dataset
        self.num_samples = dataset.num_samples
        self.fs, root = dataset.filesystem()
        self.reads = reads.for_store(self.fs.protocol)
        self.layouts = {name: _ArrayLayout.of(dataset, name, root) for name in names}
        self.stats = stats if stats is not None else IOStats()
        self.cache = cache
        # Shard indexes as they arrive, (shards, chunks per shard, 2) of (offset, nbytes), and which
        # have: shared by every reader of this opened dataset, so each is read once.
        self._index: dict[str, np.ndarray] = {}
        self._indexed: dict[str, np.ndarray] = {}
        for name, lay in self.layouts.items():
            self._index[name], self._indexed[name] = dataset._kept(
                ("shard index", name),
                lambda lay=lay: (
                    np.full((lay.num_shards, lay.chunks_per_shard, 2), NOT_STORED, dtype=np.uint64),
                    np.zeros(lay.num_shards, dtype=bool),
                ),
            )

    def shard_range(self, shard: int) -> range:
        """Sample ids of shard `shard` of the first array: the unit of a streaming pass."""
        size = next(iter(self.layouts.values())).shard_samples
        return range(shard * size, min((shard + 1) * size, self.num_samples))

    @property
    def num_shards(self) -> int:
        return next(iter(self.layouts.values())).num_shards

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        """All samples of one shard: one request per array when its index is not cached yet."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.num_shards}) in {self.dataset.url!r}")
        r = self.shard_range(shard)
        return self.read(np.arange(r.start, r.stop))

    def read(self, ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """{array: array[ids]} for every array, rows in the order of `ids` (repeats allowed)."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"ids must be a 1-D sequence of integers, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64, copy=False)
        check_ids(ids, self.num_samples, repr(self.dataset.url))
        # kept arrays' shards not kept yet are read in threads of their own while the other arrays'
        # chunks are fetched: in a read of its own before them, each shard's labels cost a round trip
        # more (an epoch in order over object storage took 2-3x as long)
        kept = {name: self._kept_soon(name, ids) for name in self.keep}
        plans = [_ReadPlan(layout, ids) for name, layout in self.layouts.items() if name not in kept]
        for plan in plans:
            plan.check_known_damage()
        claimed: list[ChunkKey] = []  # the indexes and chunks this read fetches for every reader of the cache
        try:
            self._load_indexes(plans, claimed)
            self._fetch_chunks(plans, claimed)
            for plan in plans:
                plan.decode()
                plan.check_digests(self.digests)
            if self.cache is not None:  # only now: every chunk fetched passed every check
                self.cache.put([chunk for plan in plans for chunk in plan.fetched_chunks()])
        finally:  # after the put, or failed: the reads waiting for them take them or fetch them
            if claimed:
                self.cache.release(claimed)
        read = {plan.layout.name: plan.assemble() for plan in plans}
        for name, soon in kept.items():
            try:
                read[name] = soon.result()[ids]
            except IntegrityError:  # this read's samples of it by ranges, so that damage names their ids
                ranged = SelectiveReader(self.dataset, [name], reads=self.reads, stats=self.stats, cache=self.cache)
                read[name] = ranged.read(ids)[name]
        self.stats.add(samples=len(ids))
        return {name: read[name] for name in self.layouts}

    def whole(self, name: str) -> np.ndarray:
        """Every sample of array `name` (read-only), its shards not kept yet read whole,
        WHOLE_READ_SHARDS at a time (counted here), then kept with the opened dataset (the store is
        read-only): later readers read nothing."""
        num_shards = self.layouts[name].num_shards
        for first in range(0, num_shards, WHOLE_READ_SHARDS):
            self._kept_rows(name, np.arange(first, min(first + WHOLE_READ_SHARDS, num_shards)))
        values = self._kept_rows(name, np.empty(0, dtype=np.int64)).view()
        values.flags.writeable = False  # shared by every later reader: none may change it
        return values

    def keep_ahead(self, ids: np.ndarray) -> None:
        """Read the shards of `ids` of the kept arrays not kept yet, WHOLE_READ_SHARDS a request
        batch, in a thread of their own (a reader wanting one meanwhile waits for it, or reads it
        first): an epoch in order over object storage otherwise pays a round trip a shard for its
        labels. Their failures are left to the reads that want them."""
        for name in self.keep:
            missing = np.unique(ids // self.layouts[name].shard_samples)
            missing = missing[~self._kept(name).read[missing]]
            if len(missing):
                groups = np.array_split(missing, -(-len(missing) // WHOLE_READ_SHARDS))
                threading.Thread(
                    target=self._keep_groups, args=(name, groups), name="nearstore-ahead", daemon=True
                ).start()

    def _keep_groups(self, name: str, groups: list[np.ndarray]) -> None:
        for shards in groups:
            try:
                self._kept_rows(name, shards)
            except Exception as e:  # noqa: BLE001 (the read that wants the shard raises it, naming its ids)
                log.debug("reading %s's shards %s ahead failed: %s", name, shards.tolist(), e)

    def _kept_soon(self, name: str, ids: np.ndarray) -> _Soon:
        """Array `name` as kept, with the shards of `ids` among those read: now where they are,
        else soon (`_kept_rows` in a thread)."""
        shards = np.unique(ids // self.layouts[name].shard_samples)
        kept = self._kept(name)
        if kept.read[shards].all():
            return _Soon(None, kept.values)
        return _Soon(lambda: self._kept_rows(name, shards))

    def _kept(self, name: str) -> _Kept:
        return self.dataset._kept(("kept", name), lambda: _Kept(self.layouts[name], self.num_samples))

    def _kept_rows(self, name: str, shards: np.ndarray) -> np.ndarray:
        """Array `name` as kept with the opened dataset, its `shards` among those read (each read
        whole the first time, counted here; a shard another thread is reading is waited for, and
        the other shards' readers go on meanwhile)."""
        kept = self._kept(name)
        while not kept.read[shards].all():  # a shard's flag is set after its rows are written
            with kept.lock:
                missing = shards[~kept.read[shards]].tolist()
                ours = [shard for shard in missing if shard not in kept.reading]
                theirs = [kept.reading[shard] for shard in missing if shard in kept.reading]
                kept.reading.update((shard, threading.Event()) for shard in ours)
            if ours:
                try:
                    self._read_kept(name, kept, np.array(ours))
                finally:  # read or failed: who waits for them looks again (and reads what failed)
                    with kept.lock:
                        for shard in ours:
                            kept.reading.pop(shard).set()
            for done in theirs:
                done.wait()
        return kept.values

    def _read_kept(self, name: str, kept: _Kept, shards: np.ndarray) -> None:
        """Shards `shards` of array `name` read whole into `kept` (one read, counted here)."""
        reader = SelectiveReader(self.dataset, [name], reads=self.reads)
        ids = np.concatenate([np.arange(r.start, r.stop) for r in map(reader.shard_range, shards.tolist())])
        try:
            kept.values[ids] = reader.read(ids)[name]
        finally:
            self.stats.add(bytes=reader.stats.bytes, requests=reader.stats.requests, retries=reader.stats.retries)
        kept.read[shards] = True

    def _load_indexes(self, plans: list[_ReadPlan], claimed: list[ChunkKey]) -> None:
        """Fetch the shard indexes not cached yet; a shard wanted whole comes in one request with
        its index, and its bytes go to the plan. With a cache, an index another read is fetching
        (with its shard's chunks, maybe) is waited for instead; those this read fetches go to
        `claimed`."""
        wanted = []
        for plan in plans:
            missing = plan.shards[~self._indexed[plan.layout.name][plan.shards]]
            wanted += zip([plan] * len(missing), missing.tolist(), plan.complete(missing).tolist())
        if self.cache is None or not wanted:
            self._fetch_indexes(wanted)
            return
        keys = [_index_key(plan.layout.shard_path(shard)) for plan, shard, _ in wanted]
        ours, others = self.cache.claim(keys)
        claimed += [key for key, mine in zip(keys, ours) if mine]
        self._fetch_indexes([w for w, mine in zip(wanted, ours) if mine])
        later = [w for w, mine in zip(wanted, ours) if not mine]
        for fetch in others:
            fetch.wait()
        # what the others' fetches did not index (they failed), fetched as if never claimed
        self._fetch_indexes([(p, shard, whole) for p, shard, whole in later if not self._indexed[p.layout.name][shard]])

    def _fetch_indexes(self, wanted: list[tuple[_ReadPlan, int, bool]]) -> None:
        """Fetch the indexes of (plan, shard, whole) `wanted`, in one call."""
        if not wanted:
            return
        ranges = [plan.layout.index_range(shard, whole) for plan, shard, whole in wanted]
        blobs = self._cat(
            [(plan, shard) for plan, shard, _ in wanted],
            [r[0] for r in ranges],
            [r[1] for r in ranges],
            np.array([_range_nbytes(*r) for r in ranges], dtype=np.int64),
        )
        for (plan, shard, whole), blob, bounds in zip(wanted, blobs, ranges):
            name = plan.layout.name
            self._index[name][shard], blob = self._parsed_index(plan, shard, whole, blob, bounds)
            self._indexed[name][shard] = True  # after the index: a thread that sees it finds the index
            if whole:
                rows = np.flatnonzero(plan.shard_of_chunk == shard)
                plan.add_pieces([0], [blob], rows, np.zeros(len(rows), dtype=np.int64))

    def _parsed_index(
        self, plan: _ReadPlan, shard: int, whole: bool, blob: bytes, bounds: tuple[int | None, int | None]
    ) -> tuple[np.ndarray, bytes]:
        """The shard's index parsed from `blob` (its range `bounds`), and the bytes it was parsed
        from. One that fails its checks is asked again (SHORT_READ_BACKOFF) before it is lasting
        damage: a range's bytes changed on the way (no client checksums a ranged GET) made the
        opened dataset refuse a whole shard for good; a damaged object stays damaged."""
        for delay in SHORT_READ_BACKOFF:
            with contextlib.suppress(_Damaged):
                return plan.layout.parse_index(blob, whole, shard), blob
            time.sleep(delay)
            self.stats.add(retries=1)
            (blob,) = self._cat([(plan, shard)], [bounds[0]], [bounds[1]], np.array([_range_nbytes(*bounds)]))
        try:
            return plan.layout.parse_index(blob, whole, shard), blob
        except _Damaged as e:
            raise plan.damage(shard, str(e), lasting=True) from None

    def _fetch_chunks(self, plans: list[_ReadPlan], claimed: list[ChunkKey]) -> None:
        """Fetch every stored chunk not in hand yet. With a cache, those it holds are taken from
        there, and those another read is fetching are waited for and then taken (single flight,
        `ChunkCache.claim`); the chunks this read fetches for the others go to `claimed`."""
        todo = []
        for plan in plans:
            plan.locate(self._index[plan.layout.name])
            rows = np.flatnonzero(plan.stored & (plan.piece_of_chunk < 0))
            todo.append(rows if self.cache is None else plan.take_cached(self.cache, rows))
        if self.cache is None:
            self._fetch_runs(plans, todo)
            return
        keys = [key for plan, rows in zip(plans, todo) for key in plan.keys(rows)]
        ours, others = self.cache.claim(keys)  # all in one claim: a read waits only on earlier claims
        claimed += [key for key, mine in zip(keys, ours) if mine]
        mine = np.split(np.array(ours, dtype=bool), np.cumsum([len(rows) for rows in todo])[:-1])
        self._fetch_runs(plans, [rows[m] for rows, m in zip(todo, mine)])
        for fetch in others:  # after this read's own fetch: both under way at once
            fetch.wait()
        # what the others' fetches did not put (failed, or dropped since), fetched as if never claimed
        self._fetch_runs(plans, [plan.take_cached(self.cache, rows[~m]) for plan, rows, m in zip(plans, todo, mine)])

    def _fetch_runs(self, plans: list[_ReadPlan], rows: list[np.ndarray]) -> None:
        """Fetch the coalesced byte runs of each plan's chunk rows `rows`, in one call."""
        planned: list[tuple[_ReadPlan, np.ndarray, np.ndarray, np.ndarray]] = []
        owners: list[tuple[_ReadPlan, int]] = []
        starts: list[int] = []
        ends: list[int] = []
        lengths: list[np.ndarray] = []
        for plan, todo in zip(plans, rows):
            if not len(todo):
                continue
            offsets, shards = plan.offsets[todo], plan.shard_of_chunk[todo]
            run_starts, run_ends, run_of = coalesce_ranges(
                offsets,
                offsets + plan.lengths[todo],
                groups=shards,
                request_bytes=self.reads.request_bytes,
            )
            run_shards = np.empty(len(run_starts), dtype=np.int64)
            run_shards[run_of] = shards
            planned.append((plan, run_starts, run_ends, run_shards, todo, run_of))
            owners += [(plan, shard) for shard in run_shards.tolist()]
            starts += run_starts.tolist()
            ends += run_ends.tolist()
            lengths.append(run_ends - run_starts)
        blobs = self._cat(owners, starts, ends, np.concatenate(lengths)) if owners else []
        for plan, run_starts, run_ends, run_shards, todo, run_of in planned:
            runs = blobs[: len(run_starts)]
            plan.add_pieces(run_starts.tolist(), runs, todo, run_of)
            if self.cache is not None:
                index = self._index[plan.layout.name]
                read_through = plan.chunks_read_through(index, run_starts, run_ends, run_shards, runs)
                if read_through is not None:
                    plan.read_through.append(read_through)
            blobs = blobs[len(run_starts) :]

    def _cat(
        self,
        owners: list[tuple[_ReadPlan, int]],
        starts: list[int | None],
        ends: list[int | None],
        expected: np.ndarray,
    ) -> list[bytes]:
        """Fetch byte ranges of the shard objects of (plan, shard) `owners`, concurrently where the
        filesystem is async; count them; check each has its `expected` length (-1: unknown).

        A range is [start, end) with None for an open end and a negative start counted from the
        end of the object (format 1 only: the manifest gives every object's size). In a format-1
        store a missing object reads as empty: its zarr deleted shards of fill values only.
        A range that comes back short, or whose transfer failed a check of the client's (botocore's
        checksum of a whole object: any error that is no OSError), is asked again (after each of
        SHORT_READ_BACKOFF) before it is damage or an error: a body cut on the way reads to the
        client as a whole, shorter answer. An OSError (missing, refused, unreachable, throttled,
        timed out) is the filesystem's verdict after its own retries (s3fs, botocore).
        """
        paths = [plan.layout.shard_path(shard) for plan, shard in owners]
        blobs, sizes = self._fetch(paths, starts, ends)

        def cut() -> np.ndarray:  # the ranges that came back, shorter than asked
            return np.flatnonzero((sizes >= 0) & (expected >= 0) & (sizes != expected))

        for delay in SHORT_READ_BACKOFF:
            short = cut().tolist()
            short += [k for k in np.flatnonzero(sizes < 0).tolist() if not isinstance(blobs[k], OSError)]
            if not short:
                break
            time.sleep(delay)
            again, sizes[short] = self._fetch(
                [paths[k] for k in short], [starts[k] for k in short], [ends[k] for k in short]
            )
            self.stats.add(retries=len(short))
            for k, blob in zip(short, again):
                blobs[k] = blob
        for k in np.flatnonzero(sizes < 0).tolist():  # errors, in place of bytes
            plan, shard = owners[k]
            if not isinstance(blobs[k], FileNotFoundError):
                # a range past the end of a cut object is refused (S3's InvalidRange, HTTP's 416),
                # not answered short as a local file does: the object's size tells
                resized = self._resized(plan.layout, shard, paths[k])
                if resized:
                    raise plan.damage(shard, resized, lasting=True)
                raise OSError(f"reading {paths[k]!r} of {self.dataset.url!r} failed: {blobs[k]}") from blobs[k]
            if self.dataset.manifest is not None:
                raise plan.damage(shard, "is missing", lasting=True)
            blobs[k] = b""  # its size stays -1: no length to check
        short = cut()
        if len(short):
            k = int(short[0])
            if sizes[k] > expected[k]:  # no object answers a range with more: the server ignored it
                raise OSError(
                    f"reading {paths[k]!r} of {self.dataset.url!r} failed: {sizes[k]} bytes came back for a range "
                    f"of {expected[k]} at {starts[k]}; the server does not serve byte ranges (HTTP Range)"
                )
            problem = f"is cut short: {sizes[k]} of the {expected[k]} bytes asked for at {starts[k]}"
            raise owners[k][0].damage(owners[k][1], problem, lasting=True)
        return blobs

    def _resized(self, layout: _ArrayLayout, shard: int, path: str) -> str | None:
        """How shard object `shard`'s size differs from the manifest's record of it, or None: the
        same, unrecorded (format 1), or not to be had."""
        if layout.nbytes is None:
            return None
        try:
            size = self.fs.size(path)
        except Exception:  # the read's own error says more
            return None
        return None if size is None else size_problem(size, int(layout.nbytes[shard]))

    def _fetch(
        self, paths: list[str], starts: list[int | None], ends: list[int | None]
    ) -> tuple[list[bytes | Exception], np.ndarray]:
        """Each range's bytes, or the error reading it, and their lengths (-1: an error); counted
        in `stats`."""
        if self.fs.async_impl:
            blobs = self.fs.cat_ranges(paths, starts, ends, on_error="return")
        else:
            blobs = self._cat_sync(paths, starts, ends)
        try:  # a numpy pass over the lengths: per-range Python is what small ranges cost
            sizes = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
        except TypeError:  # an error among them: it has no length
            sizes = np.array([len(b) if isinstance(b, bytes) else -1 for b in blobs], dtype=np.int64)
        self.stats.add(bytes=int(sizes[sizes > 0].sum()), requests=len(paths))
        return blobs, sizes

    def _cat_sync(self, paths: list[str], starts: list[int | None], ends: list[int | None]) -> list[bytes | Exception]:
        """Ranges of a blocking filesystem: each object opened once (fsspec opens it per range), a
        local file's read by os.pread (`_pread_ranges`)."""
        by_path: dict[str, list[int]] = {}
        for i, path in enumerate(paths):
            by_path.setdefault(path, []).append(i)
        blobs: list[bytes | Exception] = [b""] * len(paths)
        if isinstance(self.fs, LocalFileSystem):
            for path, members in by_path.items():
                _pread_ranges(path, members, starts, ends, blobs)
            return blobs
        for path, members in by_path.items():
            try:
                with self.fs.open(path, "rb") as f:
                    for i in members:
                        start, end = starts[i] or 0, ends[i]
                        f.seek(start, 0 if start >= 0 else 2)
                        # a tell() per range is 1/4 of the Python calls of a read of many small ranges
                        blobs[i] = f.read() if end is None else f.read(end - (start if start >= 0 else f.tell()))
            except OSError as e:  # missing, or a seek before the start of an object cut short
                for i in members:
                    blobs[i] = e
        return blobs


def _pread_ranges(
    path: str, members: list[int], starts: list[int | None], ends: list[int | None], blobs: list[bytes | Exception]
) -> None:
    """`blobs[i]` for each i of `members`, ranges of the local file `path`, as `_cat_sync` reads
    them (an open end to the end of the file, a negative start from it; an error in place of every
    one where the file cannot be opened or a start falls before it), by os.pread: fsspec's file
    object spends a Python seek and read, each wrapped, on every range, which made a first epoch of
    small samples 1.3-1.4x slower (bench/loader.py)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            for i in members:
                start, end = starts[i] or 0, ends[i]
                if start < 0:
                    start += size
                    if start < 0:
                        raise OSError(errno.EINVAL, f"a range from {starts[i]} bytes before the end of {size}", path)
                want = (size if end is None else end) - start
                blob = os.pread(fd, want, start) if want > 0 else b""
                while 0 < len(blob) < want:  # pread may return less than asked (over 2 GiB on Linux)
                    more = os.pread(fd, want - len(blob), start + len(blob))
                    if not more:
                        break
                    blob += more
                blobs[i] = blob
        finally:
            os.close(fd)
    except OSError as e:
        for i in members:
            blobs[i] = e


class _Soon:
    """`value`, or call() in a thread of its own started now; `result()` either, or raises the
    call's error. A thread for the call's life, not a pool's: a pool's threads are gone in a child
    forked from this process."""

    def __init__(self, call: Callable[[], np.ndarray] | None, value: np.ndarray | None = None) -> None:
        self._call, self._value, self._error = call, value, None
        self._thread = None
        if call is not None:
            self._thread = threading.Thread(target=self._run, name="nearstore-kept", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as e:  # raised in the caller's thread, by result()
            self._error = e

    def result(self) -> np.ndarray:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class _Kept:
    """An array kept with its opened dataset, filled a shard at a time (`read`: which are)."""

    def __init__(self, layout: _ArrayLayout, num_samples: int) -> None:
        self.values = np.empty((num_samples, *layout.chunk_shape[1:]), dtype=layout.dtype)
        self.read = np.zeros(layout.num_shards, dtype=bool)
        self.reading: dict[int, threading.Event] = {}  # shards a thread is reading, set once it is done
        self.lock = threading.Lock()  # over `reading`


def read_labels(dataset: Dataset, who: str) -> tuple[np.ndarray, SelectiveReader]:
    """Every label of the dataset, (N,), with the reader that read them: read whole, shard by
    shard, on first use, then kept with the opened dataset (the store is read-only), so later
    rounds read nothing. `who` names what needs them, for the error if there are none."""
    name = dataset.required_labels(who)
    reader = SelectiveReader(dataset, [name], keep=[name])
    return reader.whole(name), reader


# Arrays kept whole in memory by the loader and the server: samples of at most this many bytes
# (labels, weights, ids), and the whole array within SMALL_ARRAY_BYTES.
SMALL_SAMPLE_BYTES = 16
SMALL_ARRAY_BYTES = 256 << 20


def small_arrays(dataset: Dataset, names: Sequence[str]) -> tuple[str, ...]:
    """Those of `names` worth reading whole once and keeping: fixed-size samples of at most
    SMALL_SAMPLE_BYTES (a request a sample every epoch would cost more than the bytes), the whole
    array within SMALL_ARRAY_BYTES."""
    small = []
    for name in names:
        sample = dataset.sample_nbytes(name)
        if sample is not None and sample <= SMALL_SAMPLE_BYTES and sample * dataset.num_samples <= SMALL_ARRAY_BYTES:
            small.append(name)
    return tuple(small)


class _ReadPlan:
    """What one `read` needs from one array: its inner chunks, where they are stored, the bytes
    fetched for them, and the decoded chunks."""

    def __init__(self, layout: _ArrayLayout, ids: np.ndarray, wanted: bool = True):
        self.layout = layout
        self.ids = ids
        self.wanted = wanted  # False: chunks a read fetched between its own, whose damage it does not record
        self.chunks, self.inverse = np.unique(ids // layout.chunk_samples, return_inverse=True)
        self.shard_of_chunk = self.chunks // layout.chunks_per_shard
        self.shards = np.unique(self.shard_of_chunk)
        self.decoded = np.empty((len(self.chunks), *layout.chunk_shape), dtype=layout.dtype)
        # Fetched pieces of shard objects: blobs[k] holds bytes from piece_starts[k] of its object.
        self.blobs: list[bytes] = []
        self.piece_starts: list[int] = []
        self.piece_of_chunk = np.full(len(self.chunks), -1, dtype=np.int64)
        self.from_cache = np.zeros(len(self.chunks), dtype=bool)  # pieces of their own, from a ChunkCache
        self.read_through: list[_ReadPlan] = []  # the chunks fetched between these, for a ChunkCache

    def damage(
        self, shard: int, problem: str, chunk_rows: np.ndarray | None = None, lasting: bool = False
    ) -> IntegrityError:
        """An IntegrityError naming shard object `shard` and `problem`, with the ids this read
        wanted from it (or from its chunks `chunk_rows`). `lasting`: the whole object is damaged
        (missing, cut, its index): remembered with the opened dataset, so that later reads of it
        fail at once instead of asking again (the store is read-only: damage does not heal)."""
        if lasting and self.wanted:
            self.layout.damaged[shard] = problem
        wanted = self.shard_of_chunk[self.inverse] == shard if chunk_rows is None else np.isin(self.inverse, chunk_rows)
        ids = tuple(sorted(set(self.ids[wanted].tolist())))
        lay = self.layout
        first = shard * lay.shard_samples
        last = min(first + lay.shard_samples, lay.dataset.num_samples) - 1
        shown = ", ".join(map(str, ids[:8])) + (f", ... ({len(ids)} ids)" if len(ids) > 8 else "")
        return IntegrityError(
            f"{lay.dataset.url!r}, array {lay.name!r}: shard object {lay.shard_path(shard)!r} (samples "
            f"{first}..{last}) {problem}; this read wanted samples {shown} from it",
            ids,
        )

    def check_known_damage(self) -> None:
        """Raise at once for a shard object found damaged by an earlier read."""
        for shard in self.shards.tolist():
            if shard in self.layout.damaged:
                raise self.damage(shard, self.layout.damaged[shard])

    def complete(self, shards: np.ndarray) -> np.ndarray:
        """For each shard, whether this read wants every chunk of it."""
        first = shards * self.layout.chunks_per_shard
        last = np.minimum(first + self.layout.chunks_per_shard, self.layout.num_chunks)
        wanted = np.searchsorted(self.chunks, last) - np.searchsorted(self.chunks, first)
        return wanted == last - first

    def locate(self, index: np.ndarray) -> None:
        """Look every chunk up in the shard index table (shards, chunks per shard, 2)."""
        located = index[self.shard_of_chunk, self.chunks % self.layout.chunks_per_shard]
        self.stored = located[:, 0] != NOT_STORED
        self.offsets = np.where(self.stored, located[:, 0], 0).astype(np.int64)
        self.lengths = np.where(self.stored, located[:, 1], 0).astype(np.int64)

    def add_pieces(self, starts: list[int], blobs: list[bytes], rows: np.ndarray, piece_of_row: np.ndarray) -> None:
        """blobs[k] starts at byte starts[k] of its shard object and holds chunk rows[piece_of_row == k]."""
        self.piece_of_chunk[rows] = len(self.blobs) + piece_of_row
        self.piece_starts += starts
        self.blobs += blobs

    def take_cached(self, cache: ChunkCache, rows: np.ndarray) -> np.ndarray:
        """Chunk rows `rows`' bytes from `cache`, each a piece of its own, where it holds them;
        returns the rows it does not hold."""
        found = cache.get(self.keys(rows))
        held = np.fromiter((blob is not None for blob in found), dtype=bool, count=len(rows))
        if held.any():
            hits = rows[held]
            blobs = [blob for blob in found if blob is not None]
            self.add_pieces(self.offsets[hits].tolist(), blobs, hits, np.arange(len(hits)))
            self.from_cache[hits] = True
        return rows[~held]

    def chunks_read_through(
        self, index: np.ndarray, starts: np.ndarray, ends: np.ndarray, shards: np.ndarray, runs: list[bytes]
    ) -> _ReadPlan | None:
        """A plan of the stored chunks, not this plan's, that runs[k] (bytes [starts[k], ends[k]) of
        shard object shards[k], in (shard, start) order) hold whole: a hole read through."""
        lay = self.layout
        chunks = (np.unique(shards)[:, None] * lay.chunks_per_shard + np.arange(lay.chunks_per_shard)).ravel()
        chunks = chunks[(chunks < lay.num_chunks) & ~np.isin(chunks, self.chunks)]
        located = index[chunks // lay.chunks_per_shard, chunks % lay.chunks_per_shard]
        stored = located[:, 0] != NOT_STORED
        chunks, located = chunks[stored], located[stored].astype(np.int64)
        # the run each starts in: the last at or before it (shards < 2**23, offsets < 2**40)
        run = np.searchsorted(
            (shards << 40) | starts, ((chunks // lay.chunks_per_shard) << 40) | located[:, 0], "right"
        )
        run = np.maximum(run - 1, 0)
        inside = (shards[run] == chunks // lay.chunks_per_shard) & (located[:, 0] >= starts[run])
        inside &= located[:, 0] + located[:, 1] <= ends[run]
        if not inside.any():
            return None
        plan = _ReadPlan(lay, chunks[inside] * lay.chunk_samples, wanted=False)
        plan.locate(index)
        plan.add_pieces(starts.tolist(), runs, np.arange(len(plan.chunks)), run[inside])
        return plan

    def fetched_chunks(self) -> Iterator[tuple[ChunkKey, bytes]]:
        """Each stored chunk whose bytes this read fetched from storage, by where it is stored,
        with those bytes (a copy: the run they came in is not kept); then those of the chunks it
        read through that pass the checks its own passed (decoded now: no read wanted them)."""
        rows = np.flatnonzero(self.stored & ~self.from_cache)
        pieces = self.piece_of_chunk[rows]
        at = self.offsets[rows] - np.asarray(self.piece_starts, dtype=np.int64)[pieces]
        ends = at + self.lengths[rows]
        for key, piece, start, end in zip(self.keys(rows), pieces.tolist(), at.tolist(), ends.tolist()):
            yield key, self.blobs[piece][start:end]
        for through in self.read_through:
            try:
                through.decode()
            except IntegrityError:
                continue  # not kept: a read that wants them reads them, and finds what is wrong
            yield from through.fetched_chunks()

    def keys(self, rows: np.ndarray) -> list[ChunkKey]:
        """Where chunk rows `rows` are stored: (shard object path, offset, bytes)."""
        paths = [self.layout.shard_path(shard) for shard in self.shard_of_chunk[rows].tolist()]
        return list(zip(paths, self.offsets[rows].tolist(), self.lengths[rows].tolist()))

    def decode(self) -> None:
        """Decode every stored chunk from the fetched pieces, checked, and check it is the chunk
        written at its place; the others hold the fill value."""
        self.decoded[~self.stored] = self.layout.fill_value
        rows = np.flatnonzero(self.stored)
        if not len(rows):
            return
        blob = b"".join(self.blobs)
        blob_at = np.cumsum([0] + [len(b) for b in self.blobs[:-1]])
        piece = self.piece_of_chunk[rows]
        positions = self.offsets[rows] - np.asarray(self.piece_starts)[piece] + blob_at[piece]
        lengths = self.lengths[rows]
        lay, codecs = self.layout, self.layout.codecs
        data = np.frombuffer(blob, dtype=np.uint8)
        if codecs.raw and np.all(lengths == codecs.raw_nbytes):
            # Stored raw: gather chunks' bytes in a few numpy steps instead of a call each, as rows
            # of a window view (a row a start byte; 5-26x faster than an index a byte), GATHER_BYTES
            # at a time: the rows gathered are a copy, not a read's whole bytes once more.
            payload = codecs.raw_nbytes - 4 * codecs.checksummed
            window = np.lib.stride_tricks.sliding_window_view(data, codecs.raw_nbytes)
            step, bad = max(1, GATHER_BYTES // codecs.raw_nbytes), []
            for first in range(0, len(rows), step):
                block, records = rows[first : first + step], window[positions[first : first + step]]
                gathered = records[:, :payload]
                if codecs.checksummed:
                    bad.append(self._bad_sums(block, gathered, records[:, payload:].copy().view("<u4").ravel()))
                self.decoded[block] = gathered.view(codecs.stored_dtype).reshape(len(block), *lay.chunk_shape)
            bad = np.concatenate(bad) if bad else rows[:0]
            if len(bad):
                shard, bad, chunks = self._first_shard(bad)
                raise self.damage(shard, f"holds {len(bad)} damaged {chunks} (crc32c does not match)", bad)
        else:
            for row, at, length in zip(rows.tolist(), positions.tolist(), lengths.tolist()):
                try:
                    self.decoded[row] = codecs.decode(data[at : at + length])
                except Exception as e:  # a checksum that fails, or bytes no codec can decode (format 1)
                    shard = int(self.shard_of_chunk[row])
                    raise self.damage(shard, f"holds a damaged sample ({e})", np.array([row])) from e
        if lay.chunk_sums is not None:
            # its own crc32c holds, so it is whole; the manifest's says whether it is this place's
            # (a shard object swapped for another of its size is whole and of other samples)
            bad = rows[crc32c_before(data, positions + lengths) != lay.chunk_sums[self.chunks[rows]]]
            if len(bad):
                shard, bad, chunks = self._first_shard(bad)
                problem = (
                    f"holds other samples than were written: {len(bad)} {chunks} whose crc32c the manifest "
                    "does not record there"
                )
                raise self.damage(shard, problem, bad, lasting=True)

    def check_digests(self, always: bool = False) -> None:
        """Each shard this read took whole (and not checked before): its samples' digest against
        the one the manifest records, which catches a shard object replaced by another whole one
        (its checksums hold, its samples are not the ones written), in a store written before the
        manifest recorded every inner chunk's crc32c (`decode` compares those, read whole or not);
        in a store that records them, only `always` (`verify_dataset`): hashing every sample of each
        shard was 5% of a round 0 over 2,000 photo-like JPEGs (1.51 s against 1.44)."""
        lay = self.layout
        if lay.digests is None or (lay.chunk_sums is not None and not always):
            return
        for shard in self.shards[self.complete(self.shards)].tolist():
            if shard in lay.digested:
                continue
            first = shard * lay.shard_samples
            count = min(lay.shard_samples, lay.dataset.num_samples - first)
            rows = np.flatnonzero(self.shard_of_chunk == shard)
            samples = self.decoded[rows].reshape(-1, *lay.chunk_shape[1:])[:count]
            if content_digest(samples) != lay.digests[shard]:
                problem = "holds other samples than were written (checksums hold, the samples' digest does not)"
                raise self.damage(shard, problem, lasting=True)
            lay.digested.add(shard)

    def _bad_sums(self, rows: np.ndarray, payloads: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """The rows whose chunk's payload's crc32c is not the one stored after it (little-endian uint32)."""
        computed = np.fromiter(map(google_crc32c.value, payloads), dtype=np.uint32, count=len(payloads))
        return rows[stored != computed]

    def _first_shard(self, bad: np.ndarray) -> tuple[int, np.ndarray, str]:
        """The first shard among chunk rows `bad`, its rows among them, and what its chunks are
        called in a message."""
        shard = int(self.shard_of_chunk[bad[0]])
        per = self.layout.chunk_samples
        return (
            shard,
            bad[self.shard_of_chunk[bad] == shard],
            "samples" if per == 1 else f"inner chunks of {per} samples",
        )

    def assemble(self) -> np.ndarray:
        """The samples read, in the order asked. The fetched pieces go first: the read's memory is
        then its decoded chunks and the samples, not those as well."""
        self.blobs, self.read_through = [], []
        return self.decoded[self.inverse, self.ids % self.layout.chunk_samples]


@dataclass(frozen=True)
class _ArrayLayout:
    """Where one array's shards live and how their indexes and inner chunks are encoded."""

    name: str
    root: str
    dataset: Dataset
    chunk_samples: int
    shard_samples: int
    chunks_per_shard: int
    num_chunks: int
    num_shards: int
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: object
    codecs: ChunkCodecs  # of an inner chunk
    index: ChunkCodecs  # of a shard index
    index_at_start: bool
    nbytes: tuple[int, ...] | None  # each shard object's size, from the manifest (None: format 1)
    digests: tuple[str, ...] | None  # each shard's samples' digest, from the manifest (None: format 1)
    # each inner chunk's crc32c as written, uint32, from the manifest (None: written before it recorded them)
    chunk_sums: np.ndarray | None
    damaged: dict[int, str]  # shard objects found damaged, and how: shared by the opened dataset's readers
    digested: set[int]  # shards whose digest was checked: shared likewise
    paths: dict[int, str] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, dataset: Dataset, name: str, root: str) -> _ArrayLayout:
        array = dataset.arrays[name]
        where = f"array {name!r} of {dataset.url!r}"
        sharding = Sharding.parse(dataset.array_json[name], array.dtype, where)
        shard_shape, chunk_shape = sharding.shard_shape, sharding.chunk_shape
        if shard_shape[1:] != array.shape[1:] or chunk_shape[1:] != array.shape[1:]:
            raise DatasetError(
                f"{where}: shards {shard_shape} and inner chunks {chunk_shape} must span whole samples "
                f"{array.shape[1:]}, so that a sample is one byte range"
            )
        sums = dataset.manifest.chunk_sums if dataset.manifest else None
        return cls(
            name=name,
            root=root,
            dataset=dataset,
            chunk_samples=chunk_shape[0],
            shard_samples=shard_shape[0],
            chunks_per_shard=shard_shape[0] // chunk_shape[0],
            num_chunks=math.ceil(array.shape[0] / chunk_shape[0]),
            num_shards=math.ceil(array.shape[0] / shard_shape[0]),
            chunk_shape=chunk_shape,
            dtype=array.dtype,
            fill_value=array.fill_value,
            codecs=sharding.chunks,
            index=sharding.index,
            index_at_start=sharding.index_at_start,
            nbytes=dataset.manifest.nbytes[name] if dataset.manifest else None,
            digests=dataset.manifest.digests[name] if dataset.manifest else None,
            chunk_sums=np.frombuffer(sums[name], dtype="<u4") if sums is not None else None,
            damaged=dataset._kept(("damaged", name), dict),
            digested=dataset._kept(("digested", name), set),
        )

    def shard_path(self, shard: int) -> str:
        path = self.paths.get(shard)
        if path is None:
            path = self.paths[shard] = self.dataset.shard_path(self.name, shard, self.root)
        return path

    def index_range(self, shard: int, whole: bool) -> tuple[int | None, int | None]:
        """The byte range of shard `shard` that holds its index (the whole object if `whole`)."""
        size = None if self.nbytes is None else self.nbytes[shard]
        if whole:
            return (None, None) if size is None else (0, size)
        if self.index_at_start:
            return 0, self.index.raw_nbytes
        return (-self.index.raw_nbytes, None) if size is None else (size - self.index.raw_nbytes, size)

    def parse_index(self, blob: bytes, whole: bool, shard: int) -> np.ndarray:
        """(chunks_per_shard, 2) uint64 (offset, nbytes) rows, checked: every chunk within the
        object, and (format 2) every sample of the shard stored. All NOT_STORED for a missing
        shard of a format-1 store. Raises _Damaged saying what is wrong."""
        if not blob:
            return np.full((self.chunks_per_shard, 2), NOT_STORED, dtype=np.uint64)
        size = len(blob) if whole else (None if self.nbytes is None else self.nbytes[shard])
        if whole:
            blob = blob[: self.index.raw_nbytes] if self.index_at_start else blob[-self.index.raw_nbytes :]
        try:
            index = self.index.decode(np.frombuffer(blob, dtype=np.uint8)).reshape(self.chunks_per_shard, 2)
        except Exception as e:
            raise _Damaged(f"has a damaged index ({e})") from None
        stored = index[:, 0] != NOT_STORED
        if size is not None and np.any(index[stored, 0] + index[stored, 1] > size):
            raise _Damaged(f"has an index pointing past its {size} bytes")
        present = min(self.chunks_per_shard, self.num_chunks - shard * self.chunks_per_shard)
        if self.nbytes is not None and not stored[:present].all():
            missing = int(np.flatnonzero(~stored[:present])[0])
            raise _Damaged(f"has an index without inner chunk {missing}, which the writer stored")
        return index


class _Damaged(Exception):
    """What is wrong with a shard object, before the read that found it names the samples."""


def _index_key(path: str) -> ChunkKey:
    """What a read claims in a `ChunkCache` to fetch shard object `path`'s index: a key no chunk
    has (the cache never holds it; the index goes to the opened dataset)."""
    return path, -1, -1


def _range_nbytes(start: int | None, end: int | None) -> int:
    """How many bytes the range [start, end) holds, where that is known without the object's size
    (-1 where not: a whole object of a format-1 store)."""
    if start is not None and end is not None:
        return end - start
    if start is not None and start < 0 and end is None:
        return -start
    return -1
