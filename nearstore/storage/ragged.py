"""Ragged numeric samples: arrays of one dtype whose first axis differs from sample to sample
(token sequences (L,), audio (L,) or (L, channels), point sets (L, 3)).

Stored as encoded samples are (zarr's variable-length bytes, one sample an inner chunk, so a
sample is still one byte range): each sample's rows as little-endian C-order bytes. The array's
zarr attributes say how to read them back, `{"nearstore": {"ragged": {"dtype": "<i4", "row_shape":
[]}}}`: a zarr user gets `np.frombuffer(blob, dtype).reshape(-1, *row_shape)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nearstore.errors import DatasetError


@dataclass(frozen=True)
class RaggedLayout:
    """How a ragged array's samples are laid out: rows of `row_shape` in `dtype` (little-endian)."""

    dtype: np.dtype
    row_shape: tuple[int, ...]

    @classmethod
    def of(cls, sample: np.ndarray, where: str = "a ragged sample") -> RaggedLayout:
        """The layout of `sample` (at least 1-D; its first axis is the ragged one): rows of numbers
        of up to 8 bytes, every row axis at least 1 long; refused naming `where` otherwise (as
        a written layout is on reading, `from_attrs`)."""
        dtype, row_shape = np.dtype(sample.dtype), tuple(int(n) for n in sample.shape[1:])
        if sample.ndim < 1 or dtype.kind not in "biuf" or dtype.itemsize > 8 or 0 in row_shape:
            raise DatasetError(
                f"{where} holds {dtype} rows of shape {row_shape}: ragged samples are rows of booleans, integers "
                "or floats of up to 8 bytes, each row axis at least 1 long"
            )
        return cls(dtype.newbyteorder("<"), row_shape)

    @property
    def row_nbytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))

    def to_attrs(self) -> dict[str, Any]:
        return {"dtype": self.dtype.str, "row_shape": list(self.row_shape)}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str) -> RaggedLayout:
        try:
            dtype = np.dtype(attrs["dtype"])
            row_shape = tuple(int(n) for n in attrs["row_shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{where}: its ragged layout {dict(attrs)!r} is damaged ({e})") from None
        if dtype.kind not in "biuf" or any(n < 1 for n in row_shape):
            raise DatasetError(f"{where}: its ragged layout {dict(attrs)!r} is not rows of numbers")
        return cls(dtype, row_shape)

    def fits(self, sample: Any) -> bool:
        """Whether `sample` is an array of this layout (its byte order aside)."""
        return (
            isinstance(sample, np.ndarray)
            and sample.ndim == 1 + len(self.row_shape)
            and sample.shape[1:] == self.row_shape
            and sample.dtype.newbyteorder("<") == self.dtype
        )

    def encode(self, sample: np.ndarray) -> bytes:
        """A sample's rows as stored."""
        return np.ascontiguousarray(sample, dtype=self.dtype).tobytes()

    def decode(self, blob: bytes, sample: int) -> np.ndarray:
        """A stored sample (`sample` is its id, for the error) as an array (L, *row_shape), read-only."""
        if len(blob) % self.row_nbytes:
            raise DatasetError(
                f"sample {sample}: {len(blob)} bytes are not whole rows of {self.row_shape} {self.dtype}"
            )
        return np.frombuffer(blob, dtype=self.dtype).reshape(-1, *self.row_shape)

    def decode_all(self, blobs: np.ndarray, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored samples, a 1-D object array of bytes, as a 1-D object array of arrays."""
        out = np.empty(len(blobs), dtype=object)
        for i, (blob, sample) in enumerate(zip(blobs, ids)):
            out[i] = self.decode(blob, int(sample))
        return out

    def pack(self, blobs: np.ndarray, ids: Sequence[int] | np.ndarray) -> RaggedBatch:
        """Stored samples as one array of all their rows and where each sample's start."""
        lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
        broken = np.flatnonzero(lengths % self.row_nbytes)
        if len(broken):
            self.decode(blobs[broken[0]], int(ids[broken[0]]))  # raises, naming the sample
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum(lengths // self.row_nbytes, out=offsets[1:])
        # a bytearray, so that the rows are writable (torch.from_numpy warns on read-only memory)
        values = np.frombuffer(bytearray(b"".join(blobs)), dtype=self.dtype).reshape(-1, *self.row_shape)
        return RaggedBatch(values.astype(self.dtype.newbyteorder("="), copy=False), offsets)


@dataclass(frozen=True)
class RaggedBatch:
    """A batch of ragged samples: `values` (all rows, sample after sample, (R, *row_shape)) and
    `offsets` (n + 1,): sample i is values[offsets[i]:offsets[i + 1]]."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def of(cls, samples: Sequence[np.ndarray]) -> RaggedBatch:
        """Decoded samples (arrays of one dtype and row shape) packed into one batch."""
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum([len(sample) for sample in samples], out=offsets[1:])
        return cls(np.concatenate(samples), offsets)
