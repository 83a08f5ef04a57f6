"""Inner chunks and shard indexes decoded from what an array's `zarr.json` says of them.

The Zarr v3 specification fixes the names and configurations of codecs and the sharding codec's
index layout (per inner chunk a little-endian uint64 pair, offset and nbytes, 2^64 - 1 for a chunk
not stored, then perhaps the index's crc32c). Decoding from those, with numcodecs (zstd through a
context kept per thread, `Zstd`) and google-crc32c, keeps the reader off zarr's internals, which
change between releases. Shards are also encoded here, `encode_shard`: zarr encodes a shard's inner
chunks one by one in its event loop, which costs about 0.4 ms a chunk.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zstandard

from nearstore.errors import DatasetError

NOT_STORED = 2**64 - 1  # offset and nbytes of an inner chunk the shard does not hold


class Zstd(numcodecs.Zstd):
    """numcodecs' Zstd, decoding with a decompression context kept per thread (zstandard's):
    numcodecs makes one a call, 13 of the 17 µs it took to decode a token sequence of 1 KB (one
    inner chunk a sample), against 3.7 µs. What zstandard does not take as one whole frame (a frame
    that does not state its size, several frames: it would return the first alone) numcodecs
    decodes, as before; encoding is numcodecs' own."""

    _contexts = threading.local()

    def decode(self, buf: Any, out: Any = None) -> Any:
        if out is None:
            context = getattr(self._contexts, "decompressor", None)
            if context is None:
                context = self._contexts.decompressor = zstandard.ZstdDecompressor()
            try:
                return context.decompress(buf, allow_extra_data=False)
            except zstandard.ZstdError:
                pass
        return super().decode(buf, out)


# bytes -> bytes codecs by their Zarr v3 name; each one's stream names its own parameters.
COMPRESSORS = {"zstd": Zstd, "gzip": numcodecs.GZip, "blosc": numcodecs.Blosc}
_VLEN_BYTES = numcodecs.VLenBytes()


@dataclass(frozen=True)
class ChunkCodecs:
    """How chunks of one shape are stored: an array -> bytes codec (`bytes`, in `stored_dtype`, or
    `vlen-bytes`), then compressors, then perhaps a crc32c of the bytes as stored."""

    shape: tuple[int, ...]
    stored_dtype: np.dtype | None  # byte order included; None: variable-length bytes (vlen-bytes)
    compressors: tuple[numcodecs.abc.Codec, ...]  # in the order they were applied
    checksummed: bool

    @classmethod
    def parse(
        cls, codecs: Sequence[Mapping[str, Any]], dtype: np.dtype, shape: tuple[int, ...], where: str
    ) -> ChunkCodecs:
        """The chain `codecs` (JSON) for chunks of `shape` and `dtype`; a DatasetError naming `where`
        and the codec nearstore does not decode."""
        names = [codec.get("name") for codec in codecs]
        first, config = (names[0], codecs[0].get("configuration") or {}) if codecs else (None, {})
        if first == "vlen-bytes" and dtype.kind == "O":
            stored_dtype = None
        elif first == "bytes" and dtype.kind != "O":
            endian = config.get("endian")
            # a dtype of no byte order (fixed-width bytes, S12: zarr writes no endian for it) as it is
            ordered = dtype.itemsize > 1 and dtype.byteorder != "|"
            if ordered and endian not in ("little", "big"):
                raise DatasetError(f"{where}: the bytes codec's endian is {endian!r}, not 'little' or 'big'")
            stored_dtype = dtype.newbyteorder("<" if endian == "little" else ">") if ordered else dtype
        else:
            raise DatasetError(
                f"{where}: codecs {names} do not start with the bytes codec (fixed-size samples) or vlen-bytes "
                f"(encoded samples), which nearstore decodes; samples of {dtype} stored so cannot be read"
            )
        checksummed = names[-1] == "crc32c"
        middle = codecs[1 : len(codecs) - checksummed]
        unknown = [codec.get("name") for codec in middle if codec.get("name") not in COMPRESSORS]
        if unknown:
            raise DatasetError(
                f"{where}: codec {unknown[0]!r} is not one nearstore decodes between {first!r} and the crc32c "
                f"(it decodes {sorted(COMPRESSORS)})"
            )
        return cls(shape, stored_dtype, tuple(COMPRESSORS[codec["name"]]() for codec in middle), checksummed)

    @property
    def raw(self) -> bool:
        """Whether chunks are stored as their bytes (and perhaps a crc32c): gathered by numpy, not decoded."""
        return self.stored_dtype is not None and not self.compressors

    @property
    def raw_nbytes(self) -> int:
        """Bytes of a raw chunk as stored, its checksum included."""
        return self.stored_dtype.itemsize * math.prod(self.shape) + 4 * self.checksummed

    def decode(self, data: np.ndarray) -> np.ndarray:
        """One chunk from its stored bytes (a uint8 array); a ValueError saying what is wrong."""
        if self.checksummed:
            data = checked(data)
        for codec in reversed(self.compressors):
            data = codec.decode(data)
        values = vlen_items(data) if self.stored_dtype is None else np.frombuffer(data, self.stored_dtype)
        if values.size != math.prod(self.shape):
            raise ValueError(f"it decodes to {values.size} values, a chunk holds {math.prod(self.shape)}")
        return values.reshape(self.shape)


def vlen_items(data: Any) -> np.ndarray:
    """numcodecs' VLenBytes decoded (the item count, then each item's length and bytes, uint32 LE):
    an object array of bytes. A chunk of exactly one item, as encoded samples are stored, is cut
    here: numcodecs' checks of its argument cost more than the cut (10% of an uncached epoch of
    token sequences); any other goes to numcodecs, which checks it."""
    view = memoryview(data).cast("B")  # the item's bytes copied once, out of the chunk
    if len(view) >= 8 and view[:4] == b"\x01\x00\x00\x00" and int.from_bytes(view[4:8], "little") == len(view) - 8:
        items = np.empty(1, dtype=object)
        items[0] = bytes(view[8:])
        return items
    return _VLEN_BYTES.decode(data)


def checked(data: np.ndarray) -> np.ndarray:
    """The payload of `data` (uint8), whose last 4 bytes are its crc32c (little-endian); a
    ValueError if they do not match."""
    if len(data) < 4:
        raise ValueError(f"{len(data)} bytes cannot end in a crc32c")
    payload = data[:-4]
    stored = int.from_bytes(data[-4:].tobytes(), "little")
    if google_crc32c.value(payload) != stored:
        raise ValueError("crc32c does not match")
    return payload


@dataclass(frozen=True)
class Sharding:
    """An array's sharding codec as its `zarr.json` describes it."""

    shard_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]  # of an inner chunk
    chunks: ChunkCodecs
    index: ChunkCodecs  # of the shard index, an array (*chunks a shard, 2) of uint64
    index_at_start: bool

    @classmethod
    def parse(cls, document: Mapping[str, Any], dtype: np.dtype, where: str) -> Sharding:
        """The sharding of the array whose zarr.json is `document`, of samples of `dtype`; a
        DatasetError naming `where` if it is not a regularly chunked, sharded Zarr v3 array."""
        codecs = document.get("codecs") or []
        grid = document.get("chunk_grid") or {}
        if document.get("zarr_format") != 3 or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            raise DatasetError(
                f"{where} is not a sharded zarr v3 array (codecs {[c.get('name') for c in codecs]}); "
                "write it with nearstore.write_dataset or `nearstore convert`"
            )
        if grid.get("name") != "regular":
            raise DatasetError(f"{where}: chunk grid {grid.get('name')!r} is not regular; shards must be of one shape")
        config = codecs[0]["configuration"]
        shard_shape = tuple(grid["configuration"]["chunk_shape"])
        chunk_shape = tuple(config["chunk_shape"])
        index = ChunkCodecs.parse(
            config.get("index_codecs") or [],
            np.dtype(np.uint64),
            (*(s // c for s, c in zip(shard_shape, chunk_shape)), 2),
            f"{where}, shard index",
        )
        if not index.raw:  # the specification asks a fixed-size index
            raise DatasetError(
                f"{where}: the shard index is compressed ({config['index_codecs']}); it must be of fixed size"
            )
        location = config.get("index_location", "end")
        if location not in ("start", "end"):
            raise DatasetError(f"{where}: index_location {location!r} is neither 'start' nor 'end'")
        chunks = ChunkCodecs.parse(config.get("codecs") or [], dtype, chunk_shape, where)
        return cls(shard_shape, chunk_shape, chunks, index, location == "start")


def encode_shard(
    payloads: Iterable[bytes], chunks: int, compressor: numcodecs.abc.Codec | None = None
) -> tuple[bytes, np.ndarray]:
    """A shard of `chunks` inner chunks as `write_dataset` lays it out, from the bytes of its first
    inner chunks (`payloads`; those past them not stored): each chunk's bytes, then `compressor`,
    then its crc32c; the index (offset and nbytes a chunk, little-endian uint64) at the end, then
    its crc32c. The bytes zarr writes for the same array (checked against zarr's in the tests),
    without zarr's event loop, which cost about 0.4 ms a chunk. The reader decodes it from the
    array's zarr.json as it decodes any shard. Returns the shard and the crc32c stored after each
    chunk (uint32, in index order): what the manifest records of it, for the reader to compare."""
    index = np.full((chunks, 2), NOT_STORED, dtype="<u8")
    parts, sums, offset = [], [], 0
    for k, data in enumerate(payloads):
        data = bytes(compressor.encode(data)) if compressor is not None else data
        sums.append(google_crc32c.value(data))
        parts += [data, sums[-1].to_bytes(4, "little")]
        index[k] = offset, len(data) + 4
        offset += len(data) + 4
    parts += [index.tobytes(), crc32c_of(index.tobytes())]
    return b"".join(parts), np.array(sums, dtype=np.uint32)


def fixed_payloads(values: np.ndarray, chunk_samples: int) -> Iterator[bytes]:
    """Inner chunks of `chunk_samples` fixed-size samples as the bytes codec lays them out (in
    values' byte order, C order), the last padded with zeros (the fill value) to a whole chunk."""
    for start in range(0, len(values), chunk_samples):
        chunk = values[start : start + chunk_samples]
        if len(chunk) < chunk_samples:
            chunk = np.concatenate([chunk, np.zeros((chunk_samples - len(chunk), *values.shape[1:]), values.dtype)])
        yield chunk.tobytes()


def vlen_payloads(blobs: Iterable[bytes]) -> Iterator[bytes]:
    """Variable-length byte samples, one an inner chunk, each as numcodecs' VLenBytes of one item:
    the item count, then its length and bytes (uint32 LE)."""
    for blob in blobs:
        yield b"\x01\x00\x00\x00" + len(blob).to_bytes(4, "little") + blob


def crc32c_before(data: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The crc32c (little-endian uint32) in the 4 bytes of `data` (uint8) before each of `ends`:
    where each chunk that ends there stores its own."""
    return data[ends[:, None] + np.arange(-4, 0)].view("<u4").ravel()


def crc32c_of(data: bytes) -> bytes:
    """The 4 bytes of `data`'s crc32c that follow it as stored (little-endian), as `checked` reads them."""
    return google_crc32c.value(data).to_bytes(4, "little")
