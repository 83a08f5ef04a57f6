"""The selective reader: samples by id from sharded Zarr, each shard index read once.

zarr reads one inner chunk per request, re-reads the shard index for every read, and spends
~85 µs of Python per chunk. Here a read maps sample ids to byte ranges through cached shard
indexes, merges nearby ranges (`coalesce_ranges`), fetches all of them in one concurrent fsspec
call, and decodes with the array's own codecs. The answer always equals `zarr_array[ids]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.codecs import BytesCodec, ShardingCodec
from zarr.codecs.sharding import MAX_UINT_64, ShardingCodecIndexLocation
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.codec_pipeline import codecs_from_list
from zarr.core.dtype import UInt64

from nearstore.errors import DatasetError
from nearstore.storage.dataset import Dataset, check_ids
from nearstore.storage.iostats import IOStats
from nearstore.storage.ranges import TRAINING_READS, Coalescing, coalesce_ranges

_Decode = Callable[[bytes], np.ndarray]


class SelectiveReader:
    """Read samples by id from a dataset's sharded arrays, counting bytes and requests.

    arrays: which sample arrays to read (default: all of the dataset's).
    reads: how byte ranges are merged (`Coalescing`): training reads by default.
    stats: where to count (default: a counter of its own).
    The reader never writes; `stats` counts every request it makes and every byte it receives.
    """

    def __init__(
        self,
        dataset: Dataset,
        arrays: Sequence[str] | None = None,
        *,
        reads: Coalescing = TRAINING_READS,
        stats: IOStats | None = None,
    ) -> None:
        names = tuple(arrays) if arrays is not None else dataset.sample_arrays
        unknown = [n for n in names if n not in dataset.arrays]
        if unknown:
            raise DatasetError(f"{dataset.url!r} has no sample arrays {unknown}; it has {list(dataset.arrays)}")
        self.dataset = dataset
        self.num_samples = dataset.num_samples
        self.reads = reads
        self.fs, root = dataset.filesystem()
        self.layouts = {name: _ArrayLayout.of(dataset, name, root) for name in names}
        self.stats = stats if stats is not None else IOStats()
        # Shard indexes as they arrive, (shards, chunks per shard, 2) of (offset, nbytes), and which
        # have: shared by every reader of this opened dataset, so each is read once.
        self._index: dict[str, np.ndarray] = {}
        self._indexed: dict[str, np.ndarray] = {}
        for name, lay in self.layouts.items():
            self._index[name], self._indexed[name] = dataset._kept(
                ("shard index", name),
                lambda lay=lay: (
                    np.full((lay.num_shards, lay.chunks_per_shard, 2), MAX_UINT_64, dtype=np.uint64),
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
        plans = [_ReadPlan(layout, ids) for layout in self.layouts.values()]
        self._load_indexes(plans)
        self._fetch_chunks(plans)
        for plan in plans:
            plan.decode()
        self.stats.add(samples=len(ids))
        return {plan.layout.name: plan.assemble() for plan in plans}

    def _load_indexes(self, plans: list[_ReadPlan]) -> None:
        """Fetch the shard indexes not cached yet; a shard wanted whole comes in one request with
        its index, and its bytes go to the plan."""
        wanted = []
        for plan in plans:
            missing = plan.shards[~self._indexed[plan.layout.name][plan.shards]]
            wanted += zip([plan] * len(missing), missing.tolist(), plan.complete(missing).tolist())
        if not wanted:
            return
        ranges = [plan.layout.index_range(whole) for plan, _, whole in wanted]
        blobs = self._cat(
            [plan.layout.shard_path(shard) for plan, shard, _ in wanted], [r[0] for r in ranges], [r[1] for r in ranges]
        )
        for (plan, shard, whole), blob in zip(wanted, blobs):
            name = plan.layout.name
            self._index[name][shard] = plan.layout.parse_index(blob, whole)
            self._indexed[name][shard] = True
            if whole:
                rows = np.flatnonzero(plan.shard_of_chunk == shard)
                plan.add_pieces([0], [blob], rows, np.zeros(len(rows), dtype=np.int64))

    def _fetch_chunks(self, plans: list[_ReadPlan]) -> None:
        """Fetch the coalesced byte runs of every stored chunk not in hand yet, in one call."""
        planned: list[tuple[_ReadPlan, np.ndarray, np.ndarray, np.ndarray]] = []
        paths: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        for plan in plans:
            plan.locate(self._index[plan.layout.name])
            todo = np.flatnonzero(plan.stored & (plan.piece_of_chunk < 0))
            if not len(todo):
                continue
            offsets, shards = plan.offsets[todo], plan.shard_of_chunk[todo]
            run_starts, run_ends, run_of = coalesce_ranges(
                offsets,
                offsets + plan.lengths[todo],
                groups=shards,
                gap_bytes=self.reads.gap_bytes,
                max_overhead=self.reads.max_overhead,
            )
            run_shards = np.empty(len(run_starts), dtype=np.int64)
            run_shards[run_of] = shards
            planned.append((plan, run_starts, todo, run_of))
            paths += [plan.layout.shard_path(shard) for shard in run_shards.tolist()]
            starts += run_starts.tolist()
            ends += run_ends.tolist()
        blobs = self._cat(paths, starts, ends) if paths else []
        for plan, run_starts, todo, run_of in planned:
            plan.add_pieces(run_starts.tolist(), blobs[: len(run_starts)], todo, run_of)
            blobs = blobs[len(run_starts) :]

    def _cat(self, paths: list[str], starts: list[int | None], ends: list[int | None]) -> list[bytes]:
        """Fetch byte ranges, concurrently where the filesystem is async; count them.

        A range is [start, end) with None for an open end and a negative start counted from the
        end of the object. A missing object reads as empty: zarr deletes a shard whose chunks
        all equal the fill value.
        """
        if self.fs.async_impl:
            blobs = self.fs.cat_ranges(paths, starts, ends, on_error="return")
        else:
            blobs = self._cat_sync(paths, starts, ends)
        for path, blob in zip(paths, blobs):
            if isinstance(blob, BaseException) and not isinstance(blob, FileNotFoundError):
                raise OSError(f"reading {path!r} of {self.dataset.url!r} failed: {blob}") from blob
        data = [b"" if isinstance(b, FileNotFoundError) else b for b in blobs]
        self.stats.add(bytes=sum(len(b) for b in data), requests=len(paths))
        return data

    def _cat_sync(self, paths: list[str], starts: list[int | None], ends: list[int | None]) -> list[bytes | Exception]:
        """Ranges of a blocking filesystem: each object opened once (fsspec opens it per range)."""
        by_path: dict[str, list[int]] = {}
        for i, path in enumerate(paths):
            by_path.setdefault(path, []).append(i)
        blobs: list[bytes | Exception] = [b""] * len(paths)
        for path, members in by_path.items():
            try:
                with self.fs.open(path, "rb") as f:
                    for i in members:
                        start, end = starts[i] or 0, ends[i]
                        f.seek(start, 0 if start >= 0 else 2)
                        # a tell() per range is 1/4 of the Python calls of a read of many small ranges
                        blobs[i] = f.read() if end is None else f.read(end - (start if start >= 0 else f.tell()))
            except FileNotFoundError as e:
                for i in members:
                    blobs[i] = e
        return blobs


def read_labels(dataset: Dataset, who: str) -> tuple[np.ndarray, SelectiveReader]:
    """Every label of the dataset, (N,), with the reader that read them: read whole, shard by
    shard, on first use, then kept with the opened dataset (the store is read-only), so later
    rounds read nothing. `who` names what needs them, for the error if there are none."""
    name = dataset.required_labels(who)
    reader = SelectiveReader(dataset, [name])

    def read() -> np.ndarray:
        labels = np.concatenate([reader.read_shard(shard)[name] for shard in range(reader.num_shards)])
        labels.flags.writeable = False  # shared by every later round: none may change it
        return labels

    return dataset._kept(("labels", name), read), reader


class _ReadPlan:
    """What one `read` needs from one array: its inner chunks, where they are stored, the bytes
    fetched for them, and the decoded chunks."""

    def __init__(self, layout: _ArrayLayout, ids: np.ndarray):
        self.layout = layout
        self.ids = ids
        self.chunks, self.inverse = np.unique(ids // layout.chunk_samples, return_inverse=True)
        self.shard_of_chunk = self.chunks // layout.chunks_per_shard
        self.shards = np.unique(self.shard_of_chunk)
        self.decoded = np.empty((len(self.chunks), *layout.chunk_shape), dtype=layout.dtype)
        # Fetched pieces of shard objects: blobs[k] holds bytes from piece_starts[k] of its object.
        self.blobs: list[bytes] = []
        self.piece_starts: list[int] = []
        self.piece_of_chunk = np.full(len(self.chunks), -1, dtype=np.int64)

    def complete(self, shards: np.ndarray) -> np.ndarray:
        """For each shard, whether this read wants every chunk of it."""
        first = shards * self.layout.chunks_per_shard
        last = np.minimum(first + self.layout.chunks_per_shard, self.layout.num_chunks)
        wanted = np.searchsorted(self.chunks, last) - np.searchsorted(self.chunks, first)
        return wanted == last - first

    def locate(self, index: np.ndarray) -> None:
        """Look every chunk up in the shard index table (shards, chunks per shard, 2)."""
        located = index[self.shard_of_chunk, self.chunks % self.layout.chunks_per_shard]
        self.stored = located[:, 0] != MAX_UINT_64
        self.offsets = np.where(self.stored, located[:, 0], 0).astype(np.int64)
        self.lengths = np.where(self.stored, located[:, 1], 0).astype(np.int64)

    def add_pieces(self, starts: list[int], blobs: list[bytes], rows: np.ndarray, piece_of_row: np.ndarray) -> None:
        """blobs[k] starts at byte starts[k] of its shard object and holds chunk rows[piece_of_row == k]."""
        self.piece_of_chunk[rows] = len(self.blobs) + piece_of_row
        self.piece_starts += starts
        self.blobs += blobs

    def decode(self) -> None:
        """Decode every stored chunk from the fetched pieces; the others hold the fill value."""
        self.decoded[~self.stored] = self.layout.fill_value
        rows = np.flatnonzero(self.stored)
        if not len(rows):
            return
        blob = b"".join(self.blobs)
        blob_at = np.cumsum([0] + [len(b) for b in self.blobs[:-1]])
        piece = self.piece_of_chunk[rows]
        positions = self.offsets[rows] - np.asarray(self.piece_starts)[piece] + blob_at[piece]
        lengths = self.lengths[rows]
        raw = self.layout.raw_dtype
        if raw is not None and np.all(lengths == self.layout.chunk_nbytes):
            # Stored raw: gather every chunk's bytes in one numpy step instead of a call each.
            gathered = np.frombuffer(blob, dtype=np.uint8)[positions[:, None] + np.arange(self.layout.chunk_nbytes)]
            self.decoded[rows] = gathered.view(raw).reshape(len(rows), *self.layout.chunk_shape)
            return
        view = memoryview(blob)
        for row, at, length in zip(rows.tolist(), positions.tolist(), lengths.tolist()):
            self.decoded[row] = self.layout.decode(view[at : at + length])

    def assemble(self) -> np.ndarray:
        return self.decoded[self.inverse, self.ids % self.layout.chunk_samples]


@dataclass(frozen=True)
class _ArrayLayout:
    """Where one array's shards live and how their indexes and inner chunks are encoded."""

    name: str
    root: str
    dataset: Dataset
    array: zarr.Array
    chunk_samples: int
    shard_samples: int
    chunks_per_shard: int
    num_chunks: int
    num_shards: int
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: object
    index_nbytes: int
    index_at_start: bool
    decode: _Decode
    decode_index: _Decode
    raw_dtype: np.dtype | None
    chunk_nbytes: int
    paths: dict[int, str] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, dataset: Dataset, name: str, root: str) -> _ArrayLayout:
        array, url = dataset.arrays[name], dataset.url
        codecs = array.metadata.codecs if array.metadata.zarr_format == 3 else ()
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            raise DatasetError(
                f"array {array.path!r} of {url!r} is not a sharded zarr v3 array (codecs {codecs}); "
                "write it with nearstore.write_dataset or `nearstore convert`"
            )
        sharding = codecs[0]
        shard_shape, chunk_shape = tuple(array.shards), tuple(sharding.chunk_shape)
        if shard_shape[1:] != array.shape[1:] or chunk_shape[1:] != array.shape[1:]:
            raise DatasetError(
                f"array {array.path!r} of {url!r}: shards {shard_shape} and inner chunks {chunk_shape} must "
                f"span whole samples {array.shape[1:]}, so that a sample is one byte range"
            )
        chunks_per_shard = shard_shape[0] // chunk_shape[0]
        index_shape = (*(s // c for s, c in zip(shard_shape, chunk_shape)), 2)
        index_spec = _spec(index_shape, UInt64(endianness="little"), MAX_UINT_64)
        chunk_spec = _spec(chunk_shape, array.metadata.data_type, array.metadata.fill_value)
        index_nbytes = 16 * chunks_per_shard
        for codec in sharding.index_codecs:
            index_nbytes = codec.compute_encoded_size(index_nbytes, index_spec)
        return cls(
            name=name,
            root=root,
            dataset=dataset,
            array=array,
            chunk_samples=chunk_shape[0],
            shard_samples=shard_shape[0],
            chunks_per_shard=chunks_per_shard,
            num_chunks=math.ceil(array.shape[0] / chunk_shape[0]),
            num_shards=math.ceil(array.shape[0] / shard_shape[0]),
            chunk_shape=chunk_shape,
            dtype=array.dtype,
            fill_value=array.fill_value,
            index_nbytes=index_nbytes,
            index_at_start=sharding.index_location == ShardingCodecIndexLocation.start,
            decode=_sync_decoder(sharding.codecs, chunk_spec, array.path),
            decode_index=_sync_decoder(sharding.index_codecs, index_spec, array.path),
            raw_dtype=_raw_dtype(sharding.codecs, array.dtype),
            chunk_nbytes=array.dtype.itemsize * math.prod(chunk_shape),
        )

    def shard_path(self, shard: int) -> str:
        path = self.paths.get(shard)
        if path is None:
            path = self.paths[shard] = self.dataset.shard_path(self.name, shard, self.root)
        return path

    def index_range(self, whole: bool) -> tuple[int | None, int | None]:
        if whole:
            return None, None
        return (0, self.index_nbytes) if self.index_at_start else (-self.index_nbytes, None)

    def parse_index(self, blob: bytes, whole: bool) -> np.ndarray:
        """(chunks_per_shard, 2) uint64 (offset, nbytes) rows; all MAX_UINT_64 for a missing shard."""
        if not blob:
            return np.full((self.chunks_per_shard, 2), MAX_UINT_64, dtype=np.uint64)
        if whole:
            blob = blob[: self.index_nbytes] if self.index_at_start else blob[-self.index_nbytes :]
        return self.decode_index(blob).reshape(self.chunks_per_shard, 2)


def _spec(shape: tuple[int, ...], dtype, fill_value) -> ArraySpec:
    return ArraySpec(
        shape=shape,
        dtype=dtype,
        fill_value=fill_value,
        config=ArrayConfig(order="C", write_empty_chunks=False),
        prototype=default_buffer_prototype(),
    )


def _raw_dtype(codecs, dtype: np.dtype) -> np.dtype | None:
    """The dtype, byte order included, of chunks stored raw (bytes codec alone); else None."""
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return None
    endian = codecs[0].endian
    if dtype.itemsize == 1 or endian is None:
        return dtype
    return dtype.newbyteorder("<" if endian.value == "little" else ">")


def _sync_decoder(codecs, spec: ArraySpec, array_name: str) -> _Decode:
    """Decode one chunk through a zarr codec chain without zarr's event loop (µs, not 85 µs)."""
    array_array, array_bytes, bytes_bytes = codecs_from_list(codecs)
    for codec in (*array_array, array_bytes, *bytes_bytes):
        if not hasattr(codec, "_decode_sync"):
            raise NotImplementedError(f"array {array_name!r}: codec {codec} has no synchronous decoder")
    specs = [spec]
    for codec in array_array:
        specs.append(codec.resolve_metadata(specs[-1]))
    buffer_type = spec.prototype.buffer

    def decode(data: bytes) -> np.ndarray:
        chunk = buffer_type.from_bytes(data)
        for codec in reversed(bytes_bytes):
            chunk = codec._decode_sync(chunk, specs[-1])
        chunk = array_bytes._decode_sync(chunk, specs[-1])
        for codec, codec_spec in zip(reversed(array_array), reversed(specs[:-1])):
            chunk = codec._decode_sync(chunk, codec_spec)
        return chunk.as_numpy_array()

    return decode
