"""The nearstore dataset format: a sharded Zarr v3 group, one inner chunk per sample.

Layout (any zarr/xarray/dask user can open it)::

    ds.zarr/
      zarr.json            group attributes: {"nearstore": {format_version, num_samples,
                           sample_arrays, label_array, class_names}}
      x/                   (N, ...) any fixed-size dtype; shards of `shard_samples` samples,
                           inner chunks of one sample, so one sample is one byte range
      y/                   (N,) integer labels

The attributes are written last: a store whose writer died half-way has none and is refused
by `open_dataset`, so a partial store is never mistaken for a whole one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numcodecs
import numpy as np
import zarr
import zarr.errors
from tqdm.auto import tqdm
from zarr.codecs import ZstdCodec

FORMAT_VERSION = 1
ATTRS_KEY = "nearstore"
DEFAULT_SHARD_SAMPLES = 1024
# zstd must save this fraction of the first samples' bytes to be used; raw chunks decode faster.
_MIN_COMPRESSION_SAVING = 0.1


@dataclass(frozen=True)
class Dataset:
    """A nearstore dataset opened read-only from a URL (local path, s3://, http://, ...)."""

    url: str
    storage_options: dict[str, Any]
    group: zarr.Group
    num_samples: int
    sample_arrays: tuple[str, ...]
    label_array: str | None
    class_names: tuple[str, ...]
    format_version: int
    arrays: dict[str, zarr.Array] = field(repr=False)
    # What readers learn of the store, which is read-only, kept for every later reader of this
    # opened dataset: shard indexes (nearstore.reader) and all labels (nearstore.scan.read_labels).
    # Re-selection rounds then re-read neither.
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _kept(self, key: Any, make: Callable[[], Any]) -> Any:
        """What readers learn of this read-only store under `key`: made by `make` once, then kept."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def labels(self) -> zarr.Array:
        """The label array; a ValueError if the dataset has none."""
        if self.label_array is None:
            raise ValueError(f"dataset {self.url} has no label array")
        return self.arrays[self.label_array]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shard_samples(self) -> int:
        """Samples per shard of the first sample array: the unit the scan streams."""
        return self.arrays[self.sample_arrays[0]].shards[0]

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_samples)

    def identity(self) -> dict[str, Any]:
        """What a `Selection` records to refuse being applied to another dataset."""
        return {
            "url": self.url,
            "format_version": self.format_version,
            "num_samples": self.num_samples,
            "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in self.arrays.items()},
        }

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem of the URL, and the store's root path in it."""
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, root.rstrip("/")

    def shard_path(self, name: str, shard: int, root: str | None = None) -> str:
        """Path of shard `shard` of array `name` in the filesystem (root: from `filesystem()`)."""
        array = self.arrays[name]
        key = array.metadata.encode_chunk_key((shard, *[0] * (array.ndim - 1)))
        return f"{self.filesystem()[1] if root is None else root}/{array.path}/{key}"

    def stored_nbytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes of the named arrays' shards (default: all arrays) in storage, metadata excluded:
        what reading every sample costs. Asks the size of each shard object (no listing needed)."""
        fs, root = self.filesystem()
        paths = [
            self.shard_path(name, shard, root)
            for name in (names or self.arrays)
            for shard in range(math.ceil(self.num_samples / self.arrays[name].shards[0]))
        ]
        return sum(_size_or_zero(fs, path) for path in paths)


def sample_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """A `Dataset.identity()` without its URL: what must match for ids to name the same samples."""
    return {k: v for k, v in identity.items() if k != "url"}


def _size_or_zero(fs: fsspec.AbstractFileSystem, path: str) -> int:
    try:
        return fs.size(path)
    except FileNotFoundError:  # zarr writes no object for a shard of fill values only
        return 0


def open_dataset(url: str, *, storage_options: Mapping[str, Any] | None = None) -> Dataset:
    """Open a nearstore dataset read-only; errors name the URL and what is missing."""
    storage_options = dict(storage_options or {})
    try:
        group = zarr.open_group(url, mode="r", storage_options=storage_options or None)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
        raise FileNotFoundError(f"no zarr group at {url!r}: {e}") from e
    except Exception as e:  # the storage backend's own errors (unreachable endpoint, bad credentials)
        raise OSError(f"cannot open {url!r}: {type(e).__name__}: {e}") from e
    attrs = group.attrs.get(ATTRS_KEY)
    if not isinstance(attrs, Mapping):
        raise ValueError(
            f"{url!r} is a zarr group but not a nearstore dataset (no {ATTRS_KEY!r} attributes; "
            "an interrupted write leaves none); write it with nearstore.write_dataset or `nearstore convert`"
        )
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{url!r} has format_version {version!r}; this nearstore reads {FORMAT_VERSION}")
    names = tuple(attrs["sample_arrays"])
    label_array = attrs.get("label_array")
    num_samples = int(attrs["num_samples"])
    arrays: dict[str, zarr.Array] = {}
    for name in names:
        try:
            array = group[name]
        except KeyError:
            raise ValueError(f"{url!r}: sample array {name!r} is listed in the attributes but missing") from None
        if not isinstance(array, zarr.Array):
            raise ValueError(f"{url!r}: {name!r} is a group, expected an array")
        if array.shape[0] != num_samples:
            raise ValueError(f"{url!r}: array {name!r} has {array.shape[0]} samples, the dataset has {num_samples}")
        arrays[name] = array
    if label_array is not None and label_array not in arrays:
        raise ValueError(f"{url!r}: label array {label_array!r} is not among the sample arrays {names}")
    return Dataset(
        url=url,
        storage_options=storage_options,
        group=group,
        num_samples=num_samples,
        sample_arrays=names,
        label_array=label_array,
        class_names=tuple(attrs.get("class_names") or ()),
        format_version=version,
        arrays=arrays,
    )


def write_dataset(
    url: str,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    label_array: str | None = "y",
    class_names: Iterable[str] | None = None,
    num_samples: int | None = None,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    zstd_level: int = 3,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Dataset:
    """Stream batches of samples into a new dataset at `url`; memory is one shard, not the data.

    batches: an iterable of {array name: array of shape (n, ...)}, every batch with the same
        names, per-sample shapes and dtypes; n may differ from batch to batch.
    label_array: name of the integer label array among the batches (None: unlabelled).
    class_names: default "0".."C-1" from the largest label seen.
    num_samples: expected total, only for the progress bar and a final check.
    """
    if shard_samples < 1:
        raise ValueError(f"shard_samples must be >= 1, got {shard_samples}")
    storage_options = dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    if fs.exists(root) and not overwrite:
        raise FileExistsError(f"{url!r} already exists; pass overwrite=True to replace it")
    group = zarr.open_group(url, mode="w", storage_options=storage_options or None)

    writer = _ShardWriter(group, shard_samples, zstd_level, label_array)
    with tqdm(total=num_samples, unit="sample", desc=f"writing {url}", disable=not progress) as bar:
        for batch in batches:
            writer.append(batch)
            bar.update(len(next(iter(batch.values()))))
    writer.close()

    if writer.num_samples == 0:
        raise ValueError(f"no samples were given to write to {url!r}")
    if num_samples is not None and writer.num_samples != num_samples:
        raise ValueError(f"expected {num_samples} samples for {url!r}, got {writer.num_samples}")
    if label_array is not None and class_names is None:
        class_names = [str(c) for c in range(writer.max_label + 1)]
    group.attrs[ATTRS_KEY] = {
        "format_version": FORMAT_VERSION,
        "num_samples": writer.num_samples,
        "sample_arrays": list(writer.names),
        "label_array": label_array,
        "class_names": list(class_names or ()),
    }
    return open_dataset(url, storage_options=storage_options)


def _zstd_saves(samples: np.ndarray, level: int) -> bool:
    """Whether zstd, applied to each sample alone as the inner chunks store them, saves enough."""
    codec = numcodecs.Zstd(level=level)
    packed = sum(len(codec.encode(np.ascontiguousarray(sample))) for sample in samples)
    return packed < (1 - _MIN_COMPRESSION_SAVING) * samples.nbytes


class _ShardWriter:
    """Buffers samples until a whole shard is ready, so zarr writes every shard exactly once."""

    def __init__(self, group: zarr.Group, shard_samples: int, zstd_level: int, label_array: str | None):
        self.group, self.shard_samples, self.zstd_level = group, shard_samples, zstd_level
        self.label_array = label_array
        self.names: tuple[str, ...] = ()
        self.arrays: dict[str, zarr.Array] = {}
        self.pending: dict[str, list[np.ndarray]] = {}
        self.num_pending = 0
        self.num_samples = 0
        self.max_label = -1

    def append(self, batch: Mapping[str, np.ndarray]) -> None:
        batch = {name: np.asarray(v) for name, v in batch.items()}
        if not self.names:
            self._create(batch)
        self._check(batch)
        for name, values in batch.items():
            self.pending[name].append(values)
        self.num_pending += len(batch[self.names[0]])
        while self.num_pending >= self.shard_samples:
            self._flush(self.shard_samples)

    def close(self) -> None:
        if self.num_pending:
            self._flush(self.num_pending)

    def _create(self, batch: Mapping[str, np.ndarray]) -> None:
        if not batch:
            raise ValueError("a batch must hold at least one array")
        if self.label_array is not None and self.label_array not in batch:
            raise ValueError(f"label array {self.label_array!r} is not among the arrays {sorted(batch)}")
        self.names = tuple(batch)
        for name, values in batch.items():
            if values.ndim == 0:
                raise ValueError(f"array {name!r} needs a sample axis, got a scalar")
            if values.dtype == object:
                raise TypeError(f"array {name!r} has dtype object; only fixed-size dtypes are supported")
            sample_shape = values.shape[1:]
            compress = _zstd_saves(values[:64], self.zstd_level)
            self.arrays[name] = self.group.create_array(
                name,
                shape=(0, *sample_shape),
                dtype=values.dtype,
                chunks=(1, *sample_shape),
                shards=(self.shard_samples, *sample_shape),
                compressors=ZstdCodec(level=self.zstd_level) if compress else None,
                fill_value=0,
            )
            self.pending[name] = []

    def _check(self, batch: Mapping[str, np.ndarray]) -> None:
        if tuple(batch) != self.names:
            raise ValueError(f"batch arrays {tuple(batch)} differ from the first batch's {self.names}")
        lengths = {name: len(v) for name, v in batch.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays in one batch must have the same number of samples, got {lengths}")
        for name, values in batch.items():
            array = self.arrays[name]
            if values.shape[1:] != array.shape[1:] or values.dtype != array.dtype:
                raise ValueError(
                    f"array {name!r}: batch has samples of shape {values.shape[1:]} {values.dtype}, "
                    f"the dataset has {array.shape[1:]} {array.dtype}"
                )
        if self.label_array is not None:
            labels = batch[self.label_array]
            if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
                raise TypeError(
                    f"label array {self.label_array!r} must be 1-D integers, got {labels.dtype} {labels.shape}"
                )
            if len(labels) and labels.min() < 0:
                raise ValueError(f"label array {self.label_array!r} has a negative label {labels.min()}")
            if len(labels):
                self.max_label = max(self.max_label, int(labels.max()))

    def _flush(self, n: int) -> None:
        start, stop = self.num_samples, self.num_samples + n
        for name, array in self.arrays.items():
            values = np.concatenate(self.pending[name])
            array.resize((stop, *array.shape[1:]))
            array[start:stop] = values[:n]
            self.pending[name] = [values[n:]]
        self.num_pending -= n
        self.num_samples = stop
