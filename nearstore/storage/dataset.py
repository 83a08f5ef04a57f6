"""The nearstore dataset format, opened read-only: a sharded Zarr v3 group, small inner chunks.

Layout (any zarr/xarray/dask user can open it)::

    ds.zarr/
      zarr.json            group attributes: {"nearstore": {format_version, num_samples,
                           sample_arrays, label_array, class_names, fingerprint, shards, layouts}}
      x/                   (N, ...) any fixed-size dtype; shards of `shard_samples` samples,
                           inner chunks of one sample (one byte range), or of a few small ones
      y/                   (N,) integer labels
      image/               or (N,) encoded samples (JPEG, PNG, ... bytes as they were encoded) of
                           any length: zarr's variable-length bytes dtype, one sample an inner chunk
      tokens/              or (N,) ragged numeric samples, stored the same way: each sample's rows
                           as bytes, the dtype and row shape in the array's attributes

Every inner chunk ends in its crc32c (zarr's crc32c codec inside the sharding codec), and the
attributes record every shard object's size, the digest of the samples it holds and every inner
chunk's crc32c (`Manifest`), so a missing, empty, short, changed or swapped shard is an
`IntegrityError`, never samples of fill values or another shard's.
The attributes are written last (`nearstore.storage.writer`): a store whose writer died half-way
has none and is refused by `open_dataset`, so a partial store is never mistaken for a whole one.
Stores of format 1 (no checksums, no manifest) still open, with a warning saying how to rewrite them.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
import zarr.errors
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import Store
from zarr.storage import StorePath

from nearstore.errors import DatasetError, ParameterError, SampleIdError
from nearstore.storage.iostats import IOStats
from nearstore.storage.ragged import RaggedLayout

FORMAT_VERSION = 2
# Format 1: no checksums and no manifest; read as before, with a warning.
UNCHECKED_FORMAT = 1
ATTRS_KEY = "nearstore"
ZARR_JSON = "zarr.json"  # a Zarr v3 node's metadata document
# The one attribute of the bare group a replacement leaves while copying the new store in over the
# old on object storage (`nearstore.storage.writer`): the suffix of the URL where the new one is whole.
REPLACEMENT_KEY = "nearstore_replacement"
# The one attribute of the bare group a write puts first (and replaces with the dataset's attributes
# last): what a killed write leaves says it is nearstore's, which overwrite may replace.
WRITING_KEY = "nearstore_writing"

log = logging.getLogger("nearstore")


class UncheckedStoreWarning(UserWarning):
    """A store written before checksums (format 1): damage in it cannot be told from data."""


@dataclass(frozen=True)
class Manifest:
    """What the writer recorded of every shard object, array by array: its size in bytes, a
    digest of the samples it holds (`nearstore.storage.digests.content_digest`) and the crc32c
    each of its inner chunks stores; and the dataset's fingerprint, a digest of every array's
    samples in order: two stores of the same shapes but other samples have other fingerprints,
    the same samples sharded otherwise the same."""

    fingerprint: str
    nbytes: dict[str, tuple[int, ...]]
    digests: dict[str, tuple[str, ...]]
    # What each array's bytes mean (`array_layout`), as written; None in stores written before it.
    layouts: dict[str, dict[str, Any]] | None = None
    # Each array's inner chunks' crc32c in order, little-endian uint32 (base64 in the attributes):
    # a read of some chunks of a shard checks they are those written there, which their own
    # crc32c cannot tell (a shard object swapped for another of its size). None: written before.
    chunk_sums: dict[str, bytes] | None = None

    def to_attrs(self) -> dict[str, Any]:
        shards = {
            name: {"nbytes": list(self.nbytes[name]), "digests": list(self.digests[name])} for name in self.nbytes
        }
        for name, sums in (self.chunk_sums or {}).items():
            shards[name]["crc32c"] = base64.b64encode(sums).decode()
        layouts = {} if self.layouts is None else {"layouts": self.layouts}
        return {"fingerprint": self.fingerprint, "shards": shards, **layouts}

    @classmethod
    def from_attrs(
        cls, attrs: Mapping[str, Any], shards: Mapping[str, int], chunks: Mapping[str, int], url: str
    ) -> Manifest:
        """The manifest in a store's attributes; `shards` and `chunks` are how many shard objects
        and inner chunks each array has."""
        try:
            recorded = attrs["shards"]
            nbytes = {name: tuple(int(n) for n in recorded[name]["nbytes"]) for name in shards}
            digests = {name: tuple(str(d) for d in recorded[name]["digests"]) for name in shards}
            fingerprint = str(attrs["fingerprint"])
            layouts = attrs.get("layouts")
            if layouts is not None:
                layouts = {name: dict(layouts[name]) for name in shards}
            chunk_sums = None
            if any("crc32c" in recorded[name] for name in shards):
                chunk_sums = {name: base64.b64decode(recorded[name]["crc32c"], validate=True) for name in shards}
        except (KeyError, TypeError, ValueError) as e:  # binascii.Error is a ValueError
            problem = f"{type(e).__name__}: {e}"
            raise DatasetError(f"{url!r}: the shard manifest in its attributes is damaged ({problem})") from None
        for name, count in shards.items():
            if len(nbytes[name]) != count or len(digests[name]) != count:
                raise DatasetError(
                    f"{url!r}: the manifest records {len(nbytes[name])} shard objects of array {name!r}, "
                    f"which has {count}"
                )
            if chunk_sums is not None and len(chunk_sums[name]) != 4 * chunks[name]:
                raise DatasetError(
                    f"{url!r}: the manifest records {len(chunk_sums[name])} bytes of crc32c for array {name!r}, "
                    f"whose {chunks[name]} inner chunks take {4 * chunks[name]}"
                )
        return cls(fingerprint, nbytes, digests, layouts, chunk_sums)

    def check_layouts(self, url: str, layouts: Mapping[str, dict[str, Any]]) -> None:
        """Refuse an array whose zarr.json says its bytes mean other than when written (a dtype of
        the same size would read every sample as something else, whole and checksummed)."""
        for name, found in layouts.items():
            if self.layouts is not None and found != self.layouts[name]:
                raise DatasetError(
                    f"{url!r}: array {name!r} was written as {self.layouts[name]}, and its {ZARR_JSON} now says "
                    f"{found}: its samples would be read as something else (the metadata was edited)"
                )


@dataclass(frozen=True)
class Dataset:
    """A nearstore dataset opened read-only from a URL (local path, s3://, http://, ...)."""

    url: str
    storage_options: dict[str, Any] = field(repr=False)  # credentials: kept out of logs and tracebacks
    group: zarr.Group
    num_samples: int
    sample_arrays: tuple[str, ...]
    label_array: str | None
    class_names: tuple[str, ...]
    format_version: int
    arrays: dict[str, zarr.Array] = field(repr=False)
    # Each sample array's zarr.json document as stored: what the reader decodes by (its codecs, shards).
    array_json: dict[str, dict[str, Any]] = field(repr=False)
    manifest: Manifest | None = field(default=None, repr=False)  # None: format 1, unchecked
    # The requests and bytes that opening it took (its zarr.json documents).
    open_stats: IOStats = field(default_factory=IOStats, repr=False, compare=False)
    # What readers learn of the store, which is read-only, kept for every later reader of this
    # opened dataset: shard indexes and all labels (nearstore.storage.reader).
    # Re-selection rounds then re-read neither.
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    # A lock a key, taken while it is made: readers in several threads (a server's trainers, a
    # round) make each once; other keys are made meanwhile (labels read whole hold up no index).
    _making: dict[Any, threading.Lock] = field(default_factory=dict, init=False, repr=False, compare=False)
    _making_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def _kept(self, key: Any, make: Callable[[], Any]) -> Any:
        """What readers learn of this read-only store under `key`: made by `make` once, then kept.
        Threads asking for it while it is made wait for it; where `make` raises, the next asks again."""
        if key not in self._cache:
            with self._making_lock:
                making = self._making.setdefault(key, threading.Lock())
            with making:
                if key not in self._cache:
                    self._cache[key] = make()
        return self._cache[key]

    @property
    def labels(self) -> zarr.Array:
        """The label array; a DatasetError if the dataset has none."""
        if self.label_array is None:
            raise DatasetError(f"dataset {self.url} has no label array")
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

    def array_shards(self, name: str) -> int:
        """How many shard objects array `name` has."""
        return math.ceil(self.num_samples / self.arrays[name].shards[0])

    def encoded(self, name: str) -> bool:
        """Whether array `name` holds encoded samples (bytes of any length) rather than fixed-size ones."""
        return self.arrays[name].dtype == object

    def ragged(self, name: str) -> RaggedLayout | None:
        """How array `name`'s ragged numeric samples are laid out; None for an array of another kind."""
        return ragged_layout(self.array_json[name], f"{self.url!r}, array {name!r}")

    def required_labels(self, who: str) -> str:
        """The label array's name; a DatasetError saying that `who` needs labels if there are none."""
        if self.label_array is None:
            raise DatasetError(f"{who} needs labels, and {self.url!r} has no label array")
        return self.label_array

    @property
    def input_array(self) -> str:
        """The first sample array other than the labels: what a model takes by default."""
        inputs = [n for n in self.sample_arrays if n != self.label_array]
        if not inputs:
            raise DatasetError(f"{self.url!r} has no input array besides the labels")
        return inputs[0]

    def identity(self) -> dict[str, Any]:
        """What a `Selection` records to refuse being applied to another dataset."""
        return {
            "url": self.url,
            "format_version": self.format_version,
            "num_samples": self.num_samples,
            "arrays": {name: self._array_identity(name) for name in self.arrays},
            "fingerprint": self.manifest.fingerprint if self.manifest else None,
        }

    def _array_identity(self, name: str) -> dict[str, Any]:
        array, ragged = self.arrays[name], self.ragged(name)
        described = {"shape": list(array.shape), "dtype": str(array.dtype)}
        return described if ragged is None else {**described, "ragged": ragged.to_attrs()}

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem of the URL, and the store's root path in it."""
        fs, root = url_to_fs(self.url, self.storage_options)
        return fs, root.rstrip("/")

    def sample_nbytes(self, name: str) -> int | None:
        """Bytes a sample of array `name` takes in memory; None where they vary (encoded samples)."""
        array = self.arrays[name]
        return None if array.dtype == object else array.dtype.itemsize * math.prod(array.shape[1:])

    def check_outside(self, url: str, what: str) -> None:
        """Refuse to write `what` at `url` if it lies inside this store, which is read-only to us."""
        check_outside(self.url, url, what, self.storage_options)

    def shard_path(self, name: str, shard: int, root: str | None = None) -> str:
        """Path of shard `shard` of array `name` in the filesystem (root: from `filesystem()`)."""
        return f"{self.filesystem()[1] if root is None else root}/{shard_key(name, self.array_json[name], shard)}"

    def stored_nbytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes of the named arrays' shards (default: all arrays) in storage, metadata excluded:
        what reading every sample costs. From the manifest; a format-1 store is asked the size
        of each shard object."""
        names = list(names or self.arrays)
        if self.manifest is not None:
            return sum(sum(self.manifest.nbytes[name]) for name in names)
        fs, root = self.filesystem()
        paths = [self.shard_path(name, shard, root) for name in names for shard in range(self.array_shards(name))]
        return sum(_size_or_zero(fs, path) for path in paths)


@contextlib.contextmanager
def encoded_bytes() -> Iterator[None]:
    """Silence zarr's warning that its variable-length bytes dtype has no Zarr v3 specification
    yet: nearstore chose it knowingly (docs/format.md says what it means for other readers)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=zarr.errors.UnstableSpecificationWarning)
        yield


def array_layout(array: zarr.Array, document: Mapping[str, Any]) -> dict[str, Any]:
    """What an array's stored bytes mean: its dtype, a sample's shape, a ragged array's layout."""
    layout = {"dtype": str(array.dtype), "sample_shape": list(array.shape[1:])}
    ragged = ((document.get("attributes") or {}).get(ATTRS_KEY) or {}).get("ragged")
    return layout if ragged is None else {**layout, "ragged": ragged}


# The suffix of the URL where a replacement writes the new store beside the old one, and where a
# local one moves the old store aside before it renames the new one in (`writer._replace`).
WRITING_BESIDE = re.compile(r"\.writing-[0-9a-f]{8}")
REPLACED_BESIDE = re.compile(r"\.replaced-[0-9a-f]{8}")


def stores_beside(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[str, str]]:
    """(path, suffix) of what lies beside `root` under a replacement's names (WRITING_BESIDE,
    REPLACED_BESIDE), sorted: what one stopped half-way may have left."""
    found = ((path, path[len(root) :]) for path in fs.glob(f"{glob.escape(root)}.*"))
    return sorted(
        (path, name) for path, name in found if WRITING_BESIDE.fullmatch(name) or REPLACED_BESIDE.fullmatch(name)
    )


def _moved_aside(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """Where a local overwrite stopped between its two renames left the stores: the old one moved
    aside (`.replaced-*`) and the new one whole (`.writing-*`), named so; nothing is at the URL."""
    beside = [path for path, _ in stores_beside(fs, root)] if isinstance(fs, LocalFileSystem) else []
    if not beside:
        return ""
    return (
        f"; an overwrite stopped half-way left {', '.join(repr(p) for p in beside)} beside it (.replaced-: the old "
        "dataset, .writing-: the new one, whole where `nearstore verify` says so): rename the one you want to it"
    )


def _checksummed(codecs: Any) -> bool:
    """Whether a sharded array's inner chunks and shard index both end in a crc32c, as written."""
    sharding = [c for c in codecs or () if isinstance(c, Mapping) and c.get("name") == "sharding_indexed"]
    config = (sharding[0].get("configuration") or {}) if sharding else {}
    chains = (config.get("codecs"), config.get("index_codecs"))
    return all(chain and isinstance(chain[-1], Mapping) and chain[-1].get("name") == "crc32c" for chain in chains)


def _byte_orders(codecs: Any) -> Iterator[str]:
    """The byte orders its `bytes` codecs give an array's numbers, inside a sharding codec too."""
    for codec in codecs or ():
        if not isinstance(codec, Mapping):
            continue
        configuration = codec.get("configuration") or {}
        if codec.get("name") == "bytes" and "endian" in configuration:
            yield configuration["endian"]
        yield from _byte_orders(configuration.get("codecs"))
        yield from _byte_orders(configuration.get("index_codecs"))


@contextlib.contextmanager
def _damaged_metadata(url: str, what: str) -> Iterator[None]:
    """zarr's refusals of a zarr.json document (a KeyError for a field missing) as a DatasetError naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{url!r}: the {ZARR_JSON} of {what} is not zarr's ({type(e).__name__}: {e})") from e


def ragged_layout(document: Mapping[str, Any], where: str) -> RaggedLayout | None:
    """The ragged layout an array's zarr.json `document` records in its attributes, or None."""
    recorded = ((document.get("attributes") or {}).get(ATTRS_KEY) or {}).get("ragged")
    return None if recorded is None else RaggedLayout.from_attrs(recorded, where)


def check_outside(store_url: str, url: str, what: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse to write `what` at `url` if it lies inside the store at `store_url` (no request made)."""
    if within(url, store_url, storage_options):
        raise ParameterError(f"{what} {url!r} lies inside the dataset {store_url!r}, which is read-only to us")


def within(url: str, root_url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether `url` is `root_url` or lies inside it, by their paths on one filesystem (no request
    made but a local path's resolution: `./x`, `d/../x` and a symlink to x are x), fsspec's caching
    layers left out of both (simplecache::file:///d is /d: a selection saved through one spelling
    landed inside the store opened by the other)."""
    bare_root, bare = _uncached(root_url), _uncached(url)
    try:
        fs, root = url_to_fs(bare_root, storage_options if bare_root == root_url else None)
    except ParameterError:  # no filesystem (a server's grpc:// URL, as a selection it sent names it): nothing inside
        return False
    theirs, path = url_to_fs(bare)
    if type(theirs) is not type(fs):
        return False
    if isinstance(fs, LocalFileSystem):
        root, path = os.path.realpath(root), os.path.realpath(path)
    root = root.rstrip("/")
    return path.rstrip("/") == root or path.startswith(root + "/")


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem of `url`, and the path in it; a protocol fsspec does not know, or whose
    package is not installed (gs:// without gcsfs), refused naming the URL (fsspec's errors name
    only the protocol, and crossed the command line as a traceback)."""
    try:
        return fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    except (ImportError, ValueError) as e:
        if isinstance(e, ValueError) and "Protocol not known" not in str(e):
            raise
        raise ParameterError(f"{str(url)!r}: {e}") from e


def _uncached(url: str) -> str:
    """`url` without fsspec's caching layers (`_CACHING_LAYERS`): the files it names."""
    return "::".join(part for part in url.split("::") if not _caching(part)) or url


def _caching(layer: str) -> bool:
    """Whether a layer of a chained URL ('simplecache', of 'simplecache::s3://...') is fsspec's cache."""
    return layer.split("://")[0] in _CACHING_LAYERS


def local_absolute(url: str) -> str:
    """A local path made absolute: a dataset opened by a relative one looked it up again in the
    working directory at every read (after a chdir, intact shards read as missing, and a
    selection saved inside the store by its absolute path was not refused)."""
    if "::" in url or url.startswith("file://") or fsspec.utils.get_protocol(url) != "file":
        return url
    return os.path.abspath(os.path.expanduser(url))


def sample_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """A `Dataset.identity()` without its URL: what must match for ids to name the same samples
    (an identity recorded before fingerprints has none, as a format-1 store)."""
    return {"fingerprint": None, **{k: v for k, v in identity.items() if k != "url"}}


def shard_key(name: str, document: Mapping[str, Any], shard: int) -> str:
    """Path, relative to the store's root, of shard `shard` of array `name`, whose zarr.json is
    `document`: by its chunk key encoding, Zarr v3's `default` (x/c/0/0) or `v2` (x/0.0)."""
    encoding = document["chunk_key_encoding"]
    default = encoding["name"] == "default"
    separator = (encoding.get("configuration") or {}).get("separator", "/" if default else ".")
    key = separator.join([str(shard)] + ["0"] * (len(document["shape"]) - 1))
    return f"{name}/c{separator}{key}" if default else f"{name}/{key}"


def check_ids(ids: np.ndarray, num_samples: int, where: str, *, what: str = "sample id") -> None:
    """Raise SampleIdError naming the first of `ids` outside [0, num_samples), and `where` it came from."""
    bad = ids[(ids < 0) | (ids >= num_samples)]
    if bad.size:
        more = f" ({bad.size} ids out of range)" if bad.size > 1 else ""
        raise SampleIdError(f"{what} {int(bad[0])} out of range [0, {num_samples}) in {where}{more}")


def _size_or_zero(fs: fsspec.AbstractFileSystem, path: str) -> int:
    try:
        return fs.size(path)
    except FileNotFoundError:  # zarr writes no object for a shard of fill values only
        return 0


# s3fs (aiobotocore) keeps 10 connections to S3 by default: at 20 ms to the first byte, a read of 169
# ranges waits for 17 round trips, where the reader plans for 32 requests in flight (`Coalescing`).
# Measured through the bench's link (tests/slow_link.py): a read of 101 ranges took 0.80-0.85 s on 10
# connections and 0.55-0.56 s on 32 once they were open (opened at once: 0.60 s for the first read).
S3_CONNECTIONS = 32


def with_store_defaults(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """`storage_options` for the filesystem of `url`, with nearstore's defaults where not given."""
    protocol = fsspec.utils.get_protocol(url)
    if protocol not in ("s3", "s3a") or not fsspec.get_filesystem_class(protocol).__module__.startswith("s3fs"):
        return storage_options  # another store, or another client registered for s3:// (obstore's)
    config = {"max_pool_connections": S3_CONNECTIONS, **(storage_options.get("config_kwargs") or {})}
    return {**storage_options, "config_kwargs": config}


# fsspec's caching layers, chained before a URL ("simplecache::s3://..."): each fetches whole objects or blocks.
_CACHING_LAYERS = ("simplecache", "filecache", "blockcache", "cached")


# Seconds before each new request for what came back short or failed: 0.35 s in all before a short
# range is damage (on S3, a fault of the way heals at once; a cut object stays cut).
SHORT_READ_BACKOFF = (0.05, 0.1, 0.2)


def open_dataset(url: str, *, storage_options: Mapping[str, Any] | None = None) -> Dataset:
    """Open a nearstore dataset read-only; errors name the URL and what is missing.

    Reads the group's zarr.json, then its sample arrays' in one concurrent call, and hands zarr
    those documents: zarr itself asks the store nothing (left alone it probes for Zarr v2 and
    consolidated metadata, requests nothing counts). `Dataset.open_stats` counts the reads.
    On s3://, s3fs keeps S3_CONNECTIONS connections unless `storage_options` says otherwise."""
    url = local_absolute(url)
    storage_options = with_store_defaults(url, dict(storage_options or {}))
    if fsspec.utils.get_protocol(url) in ("http", "https") and any(c in url for c in "?#"):
        # the objects' names are appended to the URL: they would land in its query ('ds.zarr?t=1/zarr.json')
        raise ParameterError(
            f"{url!r}: an HTTP store's URL cannot hold a query or a fragment (its objects' names are appended to "
            "it); pass headers or credentials in storage_options, e.g. {'headers': {...}}"
        )
    layers = [p for p in url.split("::")[:-1] if _caching(p)]
    if layers:  # they download whole objects or blocks, then hand over the ranges asked
        log.warning(
            "%s: read through fsspec's %s, which fetches whole objects or large blocks of them: io_stats counts "
            "the ranges it hands over, not what crossed the network; the plain URL fetches only the selected "
            "samples' ranges",
            url,
            layers[0],
        )
    stats = IOStats()
    try:
        fs, root = url_to_fs(url, storage_options)
        root = root.rstrip("/")
        (group_json,) = _read_json(fs, [f"{root}/{ZARR_JSON}"], stats)
    except DatasetError:
        raise
    except Exception as e:  # the storage backend's own errors (unreachable endpoint, bad credentials)
        raise OSError(f"cannot open {url!r}: {type(e).__name__}: {e}") from e

    def read_arrays(names: tuple[str, ...]) -> list[dict[str, Any] | None]:
        return _read_json(fs, [f"{root}/{name}/{ZARR_JSON}" for name in names], stats)

    if group_json is None and any(fs.exists(f"{root}/{v2}") for v2 in (".zgroup", ".zarray")):
        raise DatasetError(
            f"{url!r} is a Zarr v2 store (.zgroup, .zarray); nearstore reads its own Zarr v3 datasets: write one "
            "from its arrays (nearstore.write_dataset, or `nearstore convert` from an .npz of them)"
        )
    return _dataset(url, storage_options, fs, root, group_json, read_arrays, stats)


def dataset_from_json(
    url: str,
    group_json: Mapping[str, Any],
    array_json: Mapping[str, Mapping[str, Any]],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Dataset:
    """The dataset at `url` whose group's and arrays' zarr.json documents are those given (what
    its writer uploaded there): checked as `open_dataset` checks what it reads, with no request."""
    storage_options = with_store_defaults(url, dict(storage_options or {}))
    fs, root = url_to_fs(url, storage_options)

    def given(names: tuple[str, ...]) -> list[dict[str, Any] | None]:
        return [dict(array_json[name]) if name in array_json else None for name in names]

    return _dataset(url, storage_options, fs, root.rstrip("/"), dict(group_json), given, IOStats())


def _dataset(
    url: str,
    storage_options: dict[str, Any],
    fs: fsspec.AbstractFileSystem,
    root: str,
    group_json: dict[str, Any] | None,
    read_arrays: Callable[[tuple[str, ...]], list[dict[str, Any] | None]],
    stats: IOStats,
) -> Dataset:
    """The dataset whose group's zarr.json is `group_json` and whose arrays' are `read_arrays`
    (None: missing), refused with a message naming `url` where they do not make one."""
    if group_json is None:
        raise FileNotFoundError(f"no zarr group at {url!r}: it has no {ZARR_JSON}{_moved_aside(fs, root)}")
    if group_json.get("zarr_format") != 3 or group_json.get("node_type") != "group":
        raise FileNotFoundError(
            f"no zarr group at {url!r}: its {ZARR_JSON} is a {group_json.get('node_type')!r} node of zarr format "
            f"{group_json.get('zarr_format')!r}, not a zarr v3 group"
        )
    attrs = (group_json.get("attributes") or {}).get(ATTRS_KEY)
    if not isinstance(attrs, Mapping):
        replacement = (group_json.get("attributes") or {}).get(REPLACEMENT_KEY)
        if isinstance(replacement, str):
            raise DatasetError(
                f"{url!r} is a zarr group but not a nearstore dataset: a replacement of it stopped while being "
                f"copied in; the new dataset is whole at {url.rstrip('/') + replacement!r} (open it, or write "
                "again with overwrite=True)"
            )
        if (group_json.get("attributes") or {}).get(WRITING_KEY) is True:
            raise DatasetError(
                f"{url!r} is a nearstore dataset whose write was interrupted (no {ATTRS_KEY!r} attributes): "
                "write it again with overwrite=True (`nearstore convert ... --overwrite`)"
            )
        raise DatasetError(
            f"{url!r} is a zarr group but not a nearstore dataset (no {ATTRS_KEY!r} attributes); write it with "
            "nearstore.write_dataset or `nearstore convert`"
        )
    version = attrs.get("format_version")
    if version not in (UNCHECKED_FORMAT, FORMAT_VERSION):
        raise DatasetError(
            f"{url!r} has format_version {version!r}; this nearstore reads {UNCHECKED_FORMAT} and {FORMAT_VERSION}"
        )
    try:
        names, num_samples = attrs["sample_arrays"], attrs["num_samples"]
    except KeyError as e:
        raise DatasetError(
            f"{url!r}: the {ATTRS_KEY!r} attributes of its {ZARR_JSON} are damaged ({type(e).__name__}: {e})"
        ) from e
    label_array = attrs.get("label_array")
    # each of its type: a string was read letter by letter as arrays, a list as a label array
    # raised a bare TypeError, and no array at all opened and failed at the first read
    for key, fits, must in (
        (
            "sample_arrays",
            isinstance(names, list) and names and all(isinstance(n, str) for n in names),
            "a non-empty list of array names",
        ),
        (
            "num_samples",
            isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 0,
            "an integer >= 0",
        ),
        ("label_array", label_array is None or isinstance(label_array, str), "an array name, or null"),
    ):
        if not fits:
            raise DatasetError(f"{url!r}: the {ATTRS_KEY!r} attribute {key!r} must be {must}, got {attrs[key]!r}")
    names = tuple(names)
    documents = read_arrays(names)
    missing = [name for name, document in zip(names, documents) if document is None]
    if missing:
        raise DatasetError(f"{url!r}: sample array {missing[0]!r} is listed in the attributes but missing")
    store = _zarr_store(fs, root, url, storage_options)
    with encoded_bytes(), _damaged_metadata(url, "the group"):
        group = zarr.Group(zarr.AsyncGroup.from_dict(StorePath(store), dict(group_json)))
    arrays: dict[str, zarr.Array] = {}
    for name, document in zip(names, documents):
        if document.get("node_type") != "array":
            raise DatasetError(f"{url!r}: {name!r} is a {document.get('node_type')}, expected an array")
        with encoded_bytes(), _damaged_metadata(url, f"array {name!r}"):
            array = zarr.Array.from_dict(StorePath(store, name), dict(document))
        if version == FORMAT_VERSION and any(order != "little" for order in _byte_orders(document.get("codecs"))):
            # the writer stores every number little-endian: another order is an edit, read as other
            # numbers (a format-1 store, which zarr may have written, is read in the order it says)
            raise DatasetError(
                f"{url!r}: the {ZARR_JSON} of array {name!r} says its bytes are big-endian, and nearstore writes them "
                "little-endian: its samples would be read as other numbers (the metadata was edited)"
            )
        if ragged_layout(document, f"{url!r}, array {name!r}") is not None and array.dtype != object:
            raise DatasetError(f"{url!r}: array {name!r} records a ragged layout but holds {array.dtype} samples")
        if not array.shape:  # a scalar has no sample axis
            raise DatasetError(f"{url!r}: array {name!r} is listed as a sample array but holds one value (no samples)")
        if array.shape[0] != num_samples:
            raise DatasetError(f"{url!r}: array {name!r} has {array.shape[0]} samples, the dataset has {num_samples}")
        if array.shards is None:
            raise DatasetError(f"{url!r}: array {name!r} is not sharded: not a nearstore dataset's (plain zarr?)")
        if version == FORMAT_VERSION and not _checksummed(document.get("codecs")):
            # a chunk without it is read unchecked (vlen-bytes takes the 4 bytes left as padding)
            raise DatasetError(
                f"{url!r}: the {ZARR_JSON} of array {name!r} stores its chunks or shard index without the crc32c "
                "nearstore writes after them: damage would be read as data (the metadata was edited)"
            )
        arrays[name] = array
    if label_array is not None and label_array not in arrays:
        raise DatasetError(f"{url!r}: label array {label_array!r} is not among the sample arrays {names}")
    manifest = None
    if version == FORMAT_VERSION:
        shards = {name: math.ceil(num_samples / (a.shards or a.chunks)[0]) for name, a in arrays.items()}
        chunks = {name: math.ceil(num_samples / a.chunks[0]) for name, a in arrays.items()}
        manifest = Manifest.from_attrs(attrs, shards, chunks, url)
        manifest.check_layouts(url, {name: array_layout(arrays[name], doc) for name, doc in zip(names, documents)})
    elif "shards" in attrs:
        raise DatasetError(
            f"{url!r} says format_version {version} but holds a format-{FORMAT_VERSION} manifest: its attributes "
            "were edited (read as format 1, nothing in it would be checked)"
        )
    else:
        warnings.warn(
            f"{url!r} was written without checksums (nearstore format {version}): a missing or damaged shard "
            f"cannot be told from data. Rewrite it: nearstore convert {url} NEW_URL",
            UncheckedStoreWarning,
            stacklevel=2,
        )
    # labels as the writer stores them, integers, one a sample (after the manifest's check, which
    # names an edited dtype the more precisely)
    if label_array is not None:
        labels = arrays[label_array]
        if labels.dtype.kind not in "iu" or labels.shape[1:] not in ((), (1,)):
            raise DatasetError(
                f"{url!r}: label array {label_array!r} holds {labels.dtype} samples of shape {labels.shape[1:]}, "
                "not one integer a sample (the attributes name another array as the labels: edited?)"
            )
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
        array_json=dict(zip(names, documents)),
        manifest=manifest,
        open_stats=stats,
    )


def _read_json(fs: fsspec.AbstractFileSystem, paths: list[str], stats: IOStats) -> list[dict[str, Any] | None]:
    """The JSON objects at `paths` (None: no such file), read in one call, concurrent on an async
    filesystem, and counted in `stats`. A read that fails, or a body that is not whole JSON (cut
    on the way), is asked again (SHORT_READ_BACKOFF) before it is an OSError naming the object, or
    a DatasetError: one fault of the way failed the open, read as damage to the store."""
    answers: list[Any] = [None] * len(paths)  # each a document, None, or why it is neither
    todo = list(range(len(paths)))
    for delay in (0.0, *SHORT_READ_BACKOFF):
        time.sleep(delay)
        asked = [paths[k] for k in todo]
        # From byte 0 rather than whole: s3fs asks an object's size (a HEAD) before reading it whole.
        blobs = fs.cat_ranges(asked, [0] * len(asked), [None] * len(asked), on_error="return")
        stats.add(requests=len(asked), bytes=sum(len(b) for b in blobs if isinstance(b, bytes)))
        for k, blob in zip(todo, blobs):
            answers[k] = _parsed_json(blob)
        todo = [k for k in todo if isinstance(answers[k], Exception)]
        if not todo:
            break
    for path, answer in zip(paths, answers):
        if isinstance(answer, _NOT_JSON):
            raise DatasetError(f"{path!r} is not JSON ({answer})") from None
        if isinstance(answer, Exception):  # a storage backend's own (botocore's are no OSError): named
            raise OSError(f"reading {path!r} failed: {type(answer).__name__}: {answer}") from answer
        if answer is not None and not isinstance(answer, dict):
            raise DatasetError(f"{path!r} holds a JSON {type(answer).__name__}, not an object")
    return answers


_NOT_JSON = (json.JSONDecodeError, UnicodeDecodeError)  # json.loads's refusals of bytes


def _parsed_json(blob: bytes | Exception) -> Any:
    """A read's answer: its JSON, None for no such file, or the error (_NOT_JSON: the bytes')."""
    if isinstance(blob, FileNotFoundError):
        return None
    if isinstance(blob, Exception):
        return blob
    try:
        return json.loads(blob)
    except _NOT_JSON as e:
        return e


def _zarr_store(fs: fsspec.AbstractFileSystem, root: str, url: str, storage_options: dict[str, Any]) -> Store:
    """The read-only zarr store zarr.open_group would make of `url`: local files as zarr's own
    LocalStore, everything else through fsspec."""
    if isinstance(fs, LocalFileSystem):
        return zarr.storage.LocalStore(root, read_only=True)
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or None, read_only=True)
