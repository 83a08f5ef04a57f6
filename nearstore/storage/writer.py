"""Writing a nearstore dataset: batches streamed into shards, one shard in memory at a time.

Every array is written with the sharding codec, `shard_samples` samples a shard, a sample an inner
chunk (one byte range) unless samples are small enough to share one (`chunk_samples`), each inner
chunk ending in its crc32c; every shard object is written, fill values or not, and its size,
samples' digest and inner chunks' crc32c recorded. Each array's zarr.json is uploaded once, with
its final length, when the last shard is; the group attributes, with that manifest, go last
(`open_dataset` refuses a store without them, what a killed writer leaves). Nothing is read back:
the dataset returned is made from the documents uploaded. A write that fails removes what it
wrote; replacing a store writes the new one beside it and swaps it in only when whole: folders
renamed, or on object storage each new object copied in once, the old store moved nowhere
(`_replace` says why that order loses nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import reprlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numcodecs
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm
from zarr.abc.buffer import Buffer
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.dtype import VariableLengthBytes
from zarr.storage import MemoryStore

from nearstore.checks import check_integer, is_integer
from nearstore.errors import DatasetError, IntegrityError, ParameterError, naming_file
from nearstore.storage.codecs import Sharding, Zstd, encode_shard, fixed_payloads, vlen_payloads
from nearstore.storage.dataset import (
    ATTRS_KEY,
    FORMAT_VERSION,
    REPLACED_BESIDE,
    REPLACEMENT_KEY,
    WRITING_BESIDE,
    WRITING_KEY,
    ZARR_JSON,
    Dataset,
    Manifest,
    array_layout,
    dataset_from_json,
    encoded_bytes,
    shard_key,
    stores_beside,
    url_to_fs,
)
from nearstore.storage.digests import digest_samples, fingerprint, new_digest
from nearstore.storage.ragged import RaggedLayout

log = logging.getLogger("nearstore")
DEFAULT_SHARD_SAMPLES = 1024
# Small fixed-size samples are stored this many bytes an inner chunk at most (`chunk_samples`): a
# sample alone is never worth a request (`Coalescing` prices one at 64 KiB), so a chunk of several
# saves each the 16 bytes of its index entry and the 4 of its checksum.
CHUNK_BYTES = 4096
# zstd must save this fraction of the first shard's first samples' bytes to be used; raw chunks
# decode faster.
_MIN_COMPRESSION_SAVING = 0.1
_COMPRESSION_SAMPLES = 64


def write_dataset(
    url: str,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    label_array: str | None = "y",
    class_names: Iterable[str] | None = None,
    num_samples: int | None = None,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    chunk_samples: int | None = None,
    zstd_level: int = 3,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Dataset:
    """Stream batches of samples into a new dataset at `url`; memory is one shard, not the data.

    batches: an iterable of {array name: array of shape (n, ...)}, every batch with the same
        names, per-sample shapes and dtypes; n may differ from batch to batch (batches of none
        are passed over), and a batch is copied as it comes (a generator may refill one buffer).
        An array of encoded samples (JPEG, PNG, token bytes, ...) is a 1-D object array of `bytes`, each
        stored as it is, of any length (zarr's variable-length bytes under the sharding codec).
        An array of ragged numeric samples (token ids, audio, point sets) is a 1-D object array
        of numpy arrays of one dtype and one shape but for their first axis, any length
        (`nearstore.storage.ragged`).
    label_array: name of the label array among the batches (None: unlabelled): integers, or
        strings (class names), stored as their index in `class_names`. Either of shape (n,) or
        (n, 1).
    class_names: default "0".."C-1" from the largest label seen, or with string labels the names
        in the order they first appear (the converters give them sorted, as ImageFolder does).
        With string labels, a label not among the names given is refused naming it and its sample.
    num_samples: expected total, only for the progress bar and a final check.
    chunk_samples: samples an inner chunk of each fixed-size array holds, a divisor of
        shard_samples. 1: a sample is one byte range, read alone at its own cost. More, for small
        samples, which are read in bulk anyway (a request is worth 64 KiB, `Coalescing`): a
        sample costs 20 bytes of index and checksum less (a 160-byte one at 16: 161 bytes stored,
        not 180), and one read alone costs its chunk. None (the default): per array, as many as
        fit in CHUNK_BYTES (1 for samples of 2 KiB or more). Encoded and ragged samples are one an
        inner chunk whatever this says.
    """
    shard_samples = check_integer("shard_samples", shard_samples, 1)  # numpy's too: its int64 is no JSON
    if chunk_samples is not None:
        chunk_samples = check_integer("chunk_samples", chunk_samples, 1)
    if chunk_samples is not None and shard_samples % chunk_samples:
        raise ParameterError(f"chunk_samples must be a divisor of shard_samples ({shard_samples}), got {chunk_samples}")
    if fsspec.utils.get_protocol(str(url)) in ("http", "https"):
        raise ParameterError(f"{url!r}: HTTP stores are read-only; write to a local path or to object storage")
    storage_options = dict(storage_options or {})
    fs, root = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):  # a link's target is the dataset: an overwrite replaced the link
        root = os.path.realpath(root)
    try:  # one listing says whether anything is there (s3fs lists the parent too where nothing is)
        present: list[str] | None = fs.ls(root, detail=False, refresh=True)
        # an object store's folder marker (the empty key 'name/' a console's "create folder" makes)
        present = [p for p in present if p != f"{root.rstrip('/')}/"]
    except FileNotFoundError:
        present = None
    # an empty folder (or bucket) is written in place: there is nothing to keep, nor anywhere beside a bucket
    empty = present == []
    replacing = bool(present)
    stopped: str | None = None  # the store beside that a replacement stopped half-way left, named by root
    if replacing:
        stopped = _check_replaceable(fs, root, url, folder=present != [root])
        if not overwrite:
            raise FileExistsError(f"{url!r} already exists; pass overwrite=True (--overwrite) to replace it")
        # a bucket (s3://bucket, gs://bucket: no root marker) has no folder beside it to write in
        if not isinstance(fs, LocalFileSystem) and not root.startswith("/") and "/" not in root.strip("/"):
            raise FileExistsError(
                f"{url!r} is a bucket's root: a dataset there cannot be replaced (the new one is written beside "
                "the old, then swapped in); write it under a key, as s3://bucket/name.zarr, or empty the bucket"
            )
    # The old store stays whole until the new one is: written beside it, then swapped in.
    suffix = f".writing-{uuid.uuid4().hex[:8]}" if replacing else ""  # WRITING_BESIDE
    target = root + suffix
    # local folders the write makes on the way (runs/2026/ of runs/2026/train.zarr), removed if it fails
    made = [str(p) for p in Path(root).parents if not p.exists()] if isinstance(fs, LocalFileSystem) else []
    try:
        written = _write(
            fs,
            target,
            batches,
            label_array,
            class_names,
            num_samples,
            shard_samples,
            chunk_samples,
            zstd_level,
            progress,
            url,
        )
        # opened from the documents uploaded, as open_dataset opens them, without reading them back
        dataset = dataset_from_json(url, written.group_json, written.array_json, storage_options=storage_options)
        if replacing:
            _check_whole(fs, target, written.sizes, url)
    except BaseException:  # what was written is ours alone, and not a dataset: nothing is left
        if empty:  # the folder was there before: emptied again, not removed (nor its folder marker)
            for path in fs.ls(target, detail=False, refresh=True):
                if path != f"{target.rstrip('/')}/":  # removing it removed all under it: the next rm raised
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm(path, recursive=True)
        elif fs.exists(target):
            fs.rm(target, recursive=True)
        for folder in made:  # deepest first; one another writer has filled since is kept
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    if replacing:
        _replace(fs, root, suffix, written.sizes, url, stopped)
        _remove_left_beside(fs, root, url)
    return dataset


def _remove_left_beside(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """Remove what earlier replacements of `root` killed half-way left beside it, which nothing
    else names: a new store (`.writing-*`, whole or still marked as being written; one the root no
    longer names once a later replacement wrote its own pointer) and, locally, an old one moved
    aside (`.replaced-*`). A failure is logged: the dataset is whole."""
    left = []
    for path, name in stores_beside(fs, root):
        if REPLACED_BESIDE.fullmatch(name) and isinstance(fs, LocalFileSystem):
            left.append(path)
        elif WRITING_BESIDE.fullmatch(name):
            try:
                attributes = json.loads(fs.cat_file(f"{path}/{ZARR_JSON}")).get("attributes") or {}
            except (OSError, ValueError, AttributeError):
                continue  # not ours to tell: kept
            if attributes.get(WRITING_KEY) is True or isinstance(attributes.get(ATTRS_KEY), dict):
                left.append(path)
    for path in left:
        log.warning("removing %s, which a replacement of %s stopped half-way left", path, url)
        try:
            fs.rm(path, recursive=True)
        except OSError as e:
            log.warning("could not remove %s (%s): delete it yourself", path, e)


# The numpy kinds of fixed-size samples: bool, signed and unsigned integers, floats. Fixed-width
# bytes and strings, complex, dates and void are refused: the reader and the proxies take none.
FIXED_KINDS = "biuf"


def fixed_size(dtype: np.dtype) -> bool:
    """Whether samples of `dtype` are stored as fixed-size samples: of FIXED_KINDS, of at most 8
    bytes (numpy's float128, the platform's long double, is not a dtype zarr stores)."""
    return dtype.kind in FIXED_KINDS and dtype.itemsize <= 8


# Without class names, the classes are named "0".."C-1" from the largest label, up to this many, or
# as many as there are samples: a label past both is more likely a sample id than a class.
UNNAMED_CLASSES = 1 << 16


def label_strings(labels: np.ndarray, where: str, first: int = 0) -> np.ndarray:
    """String labels as an array of str: bytes (an "S" array, as HDF5 files hold text) decoded as
    UTF-8, where astype(str) takes them for ASCII; one that is not UTF-8 refused naming its row
    (rows `first`, ... of `where`)."""
    if labels.dtype.kind != "S":
        return labels.astype(str)
    try:
        return np.char.decode(labels, "utf-8")
    except UnicodeDecodeError:
        flat = labels.reshape(-1)
        row = next(i for i, name in enumerate(flat) if not _utf8(name))
        raise DatasetError(
            f"{where} holds a label that is not UTF-8 text, {bytes(flat[row])!r}, at row {first + row}"
        ) from None


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def array_name_problem(name: str) -> str | None:
    """Why `name` cannot name an array (a folder of the store), or None."""
    if not isinstance(name, str) or name in ("", ".", "..", ZARR_JSON) or "/" in name or "\\" in name:
        return "cannot name a folder of the store (empty, '.', '..', 'zarr.json', or holding '/' or '\\')"
    return None


def _first(pieces: list[np.ndarray], n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The first `n` samples of the pending `pieces`, joined (a shard), and the pieces left: only
    the shard is copied (joining every piece kept all of them alive, a batch past the shard too)."""
    taken, left, count = [], [], 0
    for piece in pieces:
        if count < n:
            taken.append(piece[: n - count])
            if len(piece) > n - count:
                left.append(piece[n - count :])
            count += len(taken[-1])
        else:
            left.append(piece)
    return np.concatenate(taken), left


def _little_copy(values: Any) -> np.ndarray:
    """A copy of `values`, little-endian: one copy, byte-swapped or not."""
    values = np.asarray(values)
    return values.astype(values.dtype.newbyteorder("<"))


def _check_whole(fs: fsspec.AbstractFileSystem, target: str, sizes: Mapping[str, int], url: str) -> None:
    """That the store at `target` holds every object written, of the size written, and no other:
    listed in one request a thousand objects (the listing also gives s3fs the sizes that copying
    them asks, one HEAD an object otherwise)."""
    fs.invalidate_cache(target)
    stored = {path.removeprefix(f"{target}/"): info["size"] for path, info in fs.find(target, detail=True).items()}
    for key in sorted(set(sizes) | set(stored)):
        if stored.get(key) != sizes.get(key):
            raise IntegrityError(
                f"the new store for {url!r}, written at {target!r}, is not whole: {key!r} holds {stored.get(key)} "
                f"bytes, {sizes.get(key)} were written; {url!r} is left as it was"
            )


def _replace(
    fs: fsspec.AbstractFileSystem,
    root: str,
    suffix: str,
    sizes: Mapping[str, int],
    url: str,
    stopped: str | None,
) -> None:
    """Put the whole store at `root + suffix`, whose objects are `sizes`' keys, in place of the
    dataset at `root`, and remove the old one, and the store at `root + stopped` that a replacement
    stopped before this one left (None: none)."""
    target = root + suffix
    name = url.rstrip("/")
    local = isinstance(fs, LocalFileSystem)
    if local:  # folders are renamed, never copied (fsspec's mv copies and deletes where rename fails)
        replaced = f".replaced-{uuid.uuid4().hex[:8]}"  # REPLACED_BESIDE
        try:
            os.rename(root, root + replaced)
            try:
                os.rename(target, root)
            except OSError:
                os.rename(root + replaced, root)  # the old one back in its place
                raise
        except OSError as e:  # a mount point (EBUSY), another device: the old dataset stays as it was
            raise OSError(
                e.errno,
                f"cannot replace {url!r}: its folder cannot be renamed ({e.strerror}; a mount point?). The old "
                f"dataset there is as it was, and the new one is whole at {name + suffix!r}: move it where you "
                "want it, or write to a folder inside the mount",
            ) from e
        left = [f"the old dataset at {name + replaced!r}"]
    else:
        _copy_over(fs, root, suffix, sizes, url)
        left = [
            f"the old dataset's objects under {url!r} that the new one has not",
            f"the new store at {name + suffix!r}",
        ]
    if stopped is not None:
        left.append(f"the store a replacement stopped half-way left at {name + stopped!r}")
    try:  # the new dataset is in place: what fails now leaves only junk, which the note names
        if local:
            beside = [root + stopped] if stopped is not None and fs.exists(root + stopped) else []
            fs.rm([root + replaced, *beside], recursive=True)
        else:
            fs.invalidate_cache(root)
            stale = [path for path in fs.find(root) if path.removeprefix(f"{root}/") not in sizes]
            beside = fs.find(root + stopped) if stopped is not None else []  # none where deleted since
            fs.rm(stale + [f"{target}/{key}" for key in sizes] + beside)
    except BaseException as e:
        e.add_note(
            f"{url!r} was replaced: the new dataset there is whole. Deleting what the replacement left failed, "
            f"so some may remain (delete it yourself): {'; '.join(left)}"
        )
        raise


def _copy_over(fs: fsspec.AbstractFileSystem, root: str, suffix: str, sizes: Mapping[str, int], url: str) -> None:
    """Copy the whole store at `root + suffix`, whose objects are `sizes`' keys, over the dataset
    at `root` on object storage."""
    # Object storage has no rename: a move is a copy and a delete an object. Each new object is
    # copied once and no old one at all, in an order that leaves, wherever it stops, the old
    # dataset whole at `root` or the new one whole at `target`, and never a mix that opens:
    # 1. the new store is whole at `target` (`_check_whole`: listed, every object at its size);
    # 2. root's zarr.json becomes a bare group naming `target`: the old manifest, which would vouch
    #    for shards about to be overwritten, goes first, and open_dataset then refuses root saying
    #    where the new dataset is whole;
    # 3. every new object but the group's zarr.json is copied over root (old ones of its key replaced);
    # 4. the group's zarr.json, with the manifest, is copied last: the new dataset is whole at root;
    # 5. only then (`_replace`) are the old objects left (shards past the new length, arrays gone),
    #    `target`, and the store a replacement stopped before this one left deleted.
    target = root + suffix
    try:
        pointer = {"zarr_format": 3, "node_type": "group", "attributes": {REPLACEMENT_KEY: suffix}}
        fs.pipe_file(f"{root}/{ZARR_JSON}", json.dumps(pointer).encode())
        keys = sorted(sizes, key=lambda key: key == ZARR_JSON)  # the group's document last
        fs.copy([f"{target}/{key}" for key in keys[:-1]], [f"{root}/{key}" for key in keys[:-1]])
        fs.copy([f"{target}/{ZARR_JSON}"], [f"{root}/{ZARR_JSON}"])
    except BaseException as e:
        e.add_note(
            f"replacing {url!r} stopped half-way: the new dataset is whole at {url.rstrip('/') + suffix!r}; "
            f"{url!r} is the old one, whole, where it opens, or else a zarr group naming the new one, which "
            "overwrite=True replaces"
        )
        raise


def _check_replaceable(fs: fsspec.AbstractFileSystem, root: str, url: str, *, folder: bool) -> str | None:
    """Refuse to overwrite what is not nearstore's (a dataset, what a killed write left, or a
    replacement stopped half-way): overwrite replaces a dataset, it never deletes a user's other
    files, another zarr group's either. Return the suffix of the store beside root that a
    replacement stopped half-way left, where root's group names one."""
    try:
        document = json.loads(fs.cat_file(f"{root}/{ZARR_JSON}"))
    except (OSError, ValueError):
        document = None
    if not isinstance(document, dict) or document.get("node_type") != "group":
        what = "a folder that is not a zarr group" if folder else "a file"
        raise FileExistsError(
            f"{url!r} is {what}, not a dataset: overwrite replaces only a dataset or an empty folder; "
            "write elsewhere, or remove it yourself"
        )
    attributes = document.get("attributes") or {}
    if not isinstance(attributes, dict) or not (
        isinstance(attributes.get(ATTRS_KEY), dict)
        or attributes.get(WRITING_KEY) is True
        or isinstance(attributes.get(REPLACEMENT_KEY), str)
    ):
        raise FileExistsError(
            f"{url!r} is a zarr group but not a nearstore dataset: overwrite replaces only a dataset or an empty "
            "folder; write elsewhere, or remove it yourself"
        )
    stopped = attributes.get(REPLACEMENT_KEY)
    # only a name a replacement gives: an attribute written by anyone else deletes nothing else
    # the only store a root's replacement pointer may have deleted, whatever it names
    return stopped if isinstance(stopped, str) and WRITING_BESIDE.fullmatch(stopped) else None


@dataclass(frozen=True)
class _Written:
    """What a write uploaded: the group's and arrays' zarr.json documents, and every object's size
    in bytes by its key under the store's root."""

    group_json: dict[str, Any]
    array_json: dict[str, dict[str, Any]]
    sizes: dict[str, int]


def _write(
    fs: fsspec.AbstractFileSystem,
    root: str,
    batches: Iterable[Mapping[str, np.ndarray]],
    label_array: str | None,
    class_names: Iterable[str] | None,
    num_samples: int | None,
    shard_samples: int,
    chunk_samples: int | None,
    zstd_level: int,
    progress: bool,
    url: str,
) -> _Written:
    """Write the store at `root` of `fs`; `url` names it in messages."""
    index = _ClassIndex(label_array, class_names)
    writer = _ShardWriter(fs, root, shard_samples, chunk_samples, zstd_level, label_array, index)
    # bare but for a mark: a killed write leaves a zarr group that open_dataset refuses and overwrite replaces
    writer.group.attrs[WRITING_KEY] = True
    writer.put_group()
    with tqdm(total=num_samples, unit="sample", desc=f"writing {url}", disable=not progress) as bar, encoded_bytes():
        for batch in batches:
            writer.append(batch)
            bar.update(len(next(iter(batch.values()))))
        writer.close()

    if writer.num_samples == 0:
        raise DatasetError(f"no samples were given to write to {url!r}")
    if num_samples is not None and writer.num_samples != num_samples:
        raise DatasetError(f"expected {num_samples} samples for {url!r}, got {writer.num_samples}")
    if label_array is not None:
        if index.named:
            class_names = index.names
        elif class_names is None:
            if writer.max_label >= max(UNNAMED_CLASSES, writer.num_samples):
                raise DatasetError(
                    f"label {writer.max_label} of sample {writer.max_label_sample} would make {writer.max_label + 1} "
                    f"classes of {writer.num_samples} samples for {url!r} (ids taken for labels?); where there are "
                    "that many classes, name them (class_names, --class-names)"
                )
            class_names = [str(c) for c in range(writer.max_label + 1)]
        class_names = index.names if index.fixed else list(class_names)  # given: read once, as strings
        if len(class_names) <= writer.max_label:
            raise DatasetError(f"{len(class_names)} class names for {url!r}, whose labels go up to {writer.max_label}")
    manifest = Manifest(
        fingerprint((name, writer.content[name]) for name in writer.names),
        {name: tuple(n) for name, n in writer.nbytes.items()},
        {name: tuple(d) for name, d in writer.digests.items()},
        {name: array_layout(writer.arrays[name], writer.documents[name]) for name in writer.names},
        {name: np.concatenate(sums).astype("<u4").tobytes() for name, sums in writer.sums.items()},
    )
    del writer.group.attrs[WRITING_KEY]
    writer.group.attrs[ATTRS_KEY] = {
        "format_version": FORMAT_VERSION,
        "num_samples": writer.num_samples,
        "sample_arrays": list(writer.names),
        "label_array": label_array,
        "class_names": list(class_names or ()),
        **manifest.to_attrs(),
    }
    writer.put_group()  # last: the attributes make the store a dataset
    array_json = {name: json.loads(writer.staged[f"{name}/{ZARR_JSON}"].to_bytes()) for name in writer.names}
    return _Written(json.loads(writer.staged[ZARR_JSON].to_bytes()), array_json, dict(writer.sizes))


def _zstd_saves(samples: np.ndarray, level: int) -> bool:
    """Whether zstd, applied to each sample alone as the inner chunks store them, saves enough
    (on JPEG or PNG bytes it never does: they are compressed already)."""
    codec = numcodecs.Zstd(level=level)
    if samples.dtype == object:
        rows = [np.frombuffer(sample, dtype=np.uint8) for sample in samples]
    else:
        rows = [np.ascontiguousarray(sample) for sample in samples]
    packed = sum(len(codec.encode(row)) for row in rows)
    return packed < (1 - _MIN_COMPRESSION_SAVING) * sum(row.nbytes for row in rows)


def _bytes_array(blobs: list[bytes]) -> np.ndarray:
    """A 1-D object array of `blobs` (np.asarray would pad them to fixed-width strings)."""
    out = np.empty(len(blobs), dtype=object)
    out[:] = blobs
    return out


class _ClassIndex:
    """String labels turned into class ids: their index among the class names given, or, without
    names, in the order the labels first appear."""

    def __init__(self, label_array: str | None, class_names: Iterable[str] | None) -> None:
        self.label_array = label_array
        self.fixed = class_names is not None
        if isinstance(class_names, str | bytes):  # its letters are no class names
            raise ParameterError(f"class_names must be a sequence of names, got the string {class_names!r}")
        # bytes as HDF5 files hold text, decoded as their labels are: str(b"cat") is "b'cat'"
        self.names = [] if class_names is None else label_strings(np.asarray(list(class_names)), "class_names").tolist()
        self.ids = {name: i for i, name in enumerate(self.names)}
        if len(self.ids) < len(self.names):  # a string label would map to the last of its twins
            twin = next(name for i, name in enumerate(self.names) if self.ids[name] != i)
            raise ParameterError(
                f"class name {twin!r} is given twice (ids {self.names.index(twin)} and {self.ids[twin]})"
            )
        self.named: bool | None = None  # whether the labels are strings (None: no batch yet)

    def codes(self, labels: np.ndarray, first: int) -> np.ndarray:
        """A batch's labels (samples `first`, ...) as 1-D class ids; integers pass as they are."""
        if labels.ndim == 2 and labels.shape[1] == 1:  # a column vector, as many tools save labels
            labels = labels[:, 0]
        strings = labels.dtype.kind in "US" or (
            labels.dtype == object and len(labels) > 0 and all(isinstance(v, str) for v in labels)
        )
        if labels.dtype == object and len(labels) and all(is_integer(v) for v in labels):
            big = next((i for i, v in enumerate(labels) if not -(2**63) <= v < 2**63), None)
            if big is not None:  # astype raised a bare OverflowError
                raise DatasetError(
                    f"label array {self.label_array!r}: sample {first + big} is {labels[big]}, past int64's range"
                )
            labels = labels.astype(np.int64)  # pandas' object columns of ints
        elif labels.dtype == object and not strings and len(labels):  # was blamed on sample 0, "expected bytes"
            odd, value = next((i, v) for i, v in enumerate(labels) if not isinstance(v, str))
            raise DatasetError(
                f"label array {self.label_array!r}: sample {first + odd} is {reprlib.repr(value)}, not a class name "
                "(labels are integers, or strings naming classes)"
            )
        if self.named is not None and strings != self.named and len(labels):
            raise DatasetError(
                f"label array {self.label_array!r}: samples from {first} are "
                f"{'strings' if strings else labels.dtype}, those before were {'strings' if self.named else 'not'}"
            )
        if not len(labels):  # an empty batch (an empty row group, say) holds no class
            return labels if labels.dtype.kind in "iu" else np.zeros(0, dtype=np.int64)
        self.named = strings
        if not strings:
            return labels
        text = label_strings(labels, f"label array {self.label_array!r}", first)
        names, where, inverse = np.unique(text, return_index=True, return_inverse=True)
        codes = np.empty(len(names), dtype=np.int64)
        for j in np.argsort(where, kind="stable"):  # new names in the order they first appear
            name = str(names[j])
            if name not in self.ids:
                if self.fixed:
                    raise DatasetError(
                        f"label array {self.label_array!r}: sample {first + int(where[j])} has the label {name!r}, "
                        f"which is not among the {len(self.names)} class names given"
                    )
                self.ids[name] = len(self.names)
                self.names.append(name)
            codes[j] = self.ids[name]
        return codes[inverse.reshape(-1)]


class _ShardWriter:
    """Buffers samples until a whole shard is ready, then encodes it in memory and uploads it once.

    The arrays are made in a group in memory: their zarr.json documents are uploaded by `close`,
    each once with its array's final length (resizing the store's array after every shard cost a
    request a shard on object storage)."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        shard_samples: int,
        chunk_samples: int | None,
        zstd_level: int,
        label_array: str | None,
        index: _ClassIndex,
    ):
        self.fs, self.root = fs, root
        self.staged: dict[str, Buffer] = {}  # the in-memory group's objects: its arrays' zarr.json
        self.group = zarr.open_group(MemoryStore(self.staged), mode="w")
        self.shard_samples, self.chunk_samples, self.zstd_level = shard_samples, chunk_samples, zstd_level
        self.label_array, self.index = label_array, index
        self.names: tuple[str, ...] = ()
        self.templates: dict[str, np.ndarray] = {}  # each array's dtype and sample shape, as no samples
        self.arrays: dict[str, zarr.Array] = {}  # made at the first shard
        self.ragged: dict[str, RaggedLayout] = {}  # the arrays of ragged numeric samples
        # the compressor each array's inner chunks get (None: checksum only): shards are encoded
        # here (`encode_shard`), as zarr would encode them
        self.compressors: dict[str, numcodecs.abc.Codec | None] = {}
        self.documents: dict[str, dict[str, Any]] = {}  # each array's zarr.json, which names its shards' keys
        self.sharding: dict[str, Sharding] = {}  # and how its shards are laid out, as the reader decodes them
        self.pending: dict[str, list[np.ndarray]] = {}
        self.num_pending = 0
        self.num_samples = 0
        self.max_label = self.max_label_sample = -1
        # The manifest, shard by shard: each object's size, its samples' digest and its inner
        # chunks' crc32c; and each array's digest of all its samples, for the fingerprint.
        self.nbytes: dict[str, list[int]] = {}
        self.digests: dict[str, list[str]] = {}
        self.sums: dict[str, list[np.ndarray]] = {}
        self.content: dict[str, hashlib.blake2b] = {}
        self.sizes: dict[str, int] = {}  # every object uploaded, by its key under root

    def put_group(self) -> None:
        """Upload the group's zarr.json as it stands in memory."""
        self._put(ZARR_JSON, self.staged[ZARR_JSON].to_bytes())

    def append(self, batch: Mapping[str, np.ndarray]) -> None:
        # stored little-endian whatever order they come in (zarr reads them back so): the digests,
        # the manifest's layouts and the reader then see one dtype
        if not isinstance(batch, Mapping):
            raise ParameterError(
                f"a batch must map array names to arrays, as {{'x': inputs, 'y': labels}}; got a {type(batch).__name__}"
            )
        # copied: a generator may refill one buffer for every batch, and the pieces wait for their shard
        batch = {name: _little_copy(v) for name, v in batch.items()}
        for name, values in batch.items():
            if values.ndim == 0:
                raise DatasetError(f"array {name!r} needs a sample axis, got a scalar ({values.dtype})")
        if not self.names and batch and not any(len(values) for values in batch.values()):
            return  # the layout (ragged or not, chunks, compression) is told by samples, not by none
        if self.label_array in batch:
            batch[self.label_array] = self.index.codes(batch[self.label_array], self.num_samples + self.num_pending)
        if not self.names:
            self._describe(batch)
        self._check(batch)
        for name, values in batch.items():
            if name in self.ragged:
                values = _bytes_array([self.ragged[name].encode(sample) for sample in values])
            self.pending[name].append(values)
        self.num_pending += len(batch[self.names[0]])
        while self.num_pending >= self.shard_samples:
            self._flush(self.shard_samples)

    def close(self) -> None:
        """Upload the last shard, then each array's zarr.json, naming all the samples written."""
        if self.num_pending:
            self._flush(self.num_pending)
        for name in self.names:
            self._put(f"{name}/{ZARR_JSON}", self.staged[f"{name}/{ZARR_JSON}"].to_bytes())

    def _describe(self, batch: Mapping[str, np.ndarray]) -> None:
        """Take the arrays' names, dtypes, sample shapes and ragged layouts from the first batch
        that holds samples; later batches are checked against them (`_check`)."""
        if not batch:
            raise DatasetError("a batch must hold at least one array")
        if self.label_array is not None and self.label_array not in batch:
            raise DatasetError(f"label array {self.label_array!r} is not among the arrays {sorted(batch)}")
        if set(batch) == {self.label_array}:  # written, then no loader could take it
            raise DatasetError(
                f"the batches hold only the label array {self.label_array!r}: a dataset needs an input array beside "
                "it (label_array=None stores the labels as the input)"
            )
        self.names = tuple(batch)
        for name, values in batch.items():
            problem = array_name_problem(name)
            if problem is not None:
                raise DatasetError(f"array {name!r} {problem}")
            encoded = values.dtype == object
            if not encoded and not fixed_size(values.dtype):
                raise DatasetError(
                    f"array {name!r} holds {values.dtype} samples; fixed-size samples are booleans, integers or "
                    "floats of up to 8 bytes (bytes or strings of any length: a 1-D object array of bytes, stored "
                    "as encoded samples)"
                )
            if not encoded and 0 in values.shape[1:]:
                raise DatasetError(f"array {name!r} has samples of shape {values.shape[1:]}, which hold nothing")
            if encoded and values.ndim == 1 and len(values) and isinstance(values[0], np.ndarray):
                self.ragged[name] = RaggedLayout.of(values[0], f"array {name!r}: sample 0")
            if encoded:
                self._check_encoded(name, values, 0)
            self.templates[name] = values[:0]
            self.pending[name] = []

    def _create(self) -> None:
        """Make the arrays at the first shard: chunks and compression are decided on its first
        samples, not on a first batch that may hold one."""
        for name, template in self.templates.items():
            first, _ = _first(self.pending[name], min(_COMPRESSION_SAMPLES, self.num_pending))
            encoded = template.dtype == object
            sample_shape = template.shape[1:]
            compress = _zstd_saves(first, self.zstd_level)
            ragged = {ATTRS_KEY: {"ragged": self.ragged[name].to_attrs()}} if name in self.ragged else None
            self.arrays[name] = self.group.create_array(
                name,
                shape=(0, *sample_shape),
                dtype=VariableLengthBytes() if encoded else template.dtype,
                chunks=(1 if encoded else self._chunk_samples(first), *sample_shape),
                shards=(self.shard_samples, *sample_shape),
                # the checksum last: it covers the bytes as stored, and is checked before zstd decodes
                compressors=[ZstdCodec(level=self.zstd_level), Crc32cCodec()] if compress else [Crc32cCodec()],
                fill_value=b"" if encoded else 0,
                # every shard object exists, so a missing one is damage, not a shard of fill values
                config={"write_empty_chunks": True},
                attributes=ragged,
            )
            self.documents[name] = self.arrays[name].metadata.to_dict()
            self.sharding[name] = Sharding.parse(self.documents[name], self.arrays[name].dtype, f"array {name!r}")
            self.compressors[name] = numcodecs.Zstd(level=self.zstd_level) if compress else None
            _check_shards(self.documents[name], self.arrays[name].dtype, compress, name)
            self.nbytes[name], self.digests[name], self.sums[name], self.content[name] = [], [], [], new_digest()

    def _chunk_samples(self, values: np.ndarray) -> int:
        """Samples an inner chunk of these fixed-size samples holds: as asked, or the most that
        fit in CHUNK_BYTES, a divisor of the shard."""
        if self.chunk_samples is not None:
            return self.chunk_samples
        fit = max(1, CHUNK_BYTES // max(1, values[:1].nbytes))
        return max(d for d in range(1, min(fit, self.shard_samples) + 1) if self.shard_samples % d == 0)

    def _check(self, batch: Mapping[str, np.ndarray]) -> None:
        if tuple(batch) != self.names:
            raise DatasetError(f"batch arrays {tuple(batch)} differ from the first batch's {self.names}")
        lengths = {name: len(v) for name, v in batch.items()}
        if len(set(lengths.values())) != 1:
            raise DatasetError(f"arrays in one batch must have the same number of samples, got {lengths}")
        for name, values in batch.items():
            array = self.templates[name]
            if array.dtype == object and values.dtype == object:
                self._check_encoded(name, values, self.num_samples + self.num_pending)
            elif values.shape[1:] != array.shape[1:] or values.dtype != array.dtype:
                raise DatasetError(
                    f"array {name!r}: batch has samples of shape {values.shape[1:]} {values.dtype}, "
                    f"the dataset has {array.shape[1:]} {array.dtype}"
                )
        if self.label_array is not None:
            labels = batch[self.label_array]
            if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
                raise DatasetError(
                    f"label array {self.label_array!r} must be integers or strings of shape (n,) or (n, 1), "
                    f"got {labels.dtype} {labels.shape}"
                )
            if len(labels) and labels.min() < 0:
                raise DatasetError(f"label array {self.label_array!r} has a negative label {labels.min()}")
            if len(labels) and int(labels.max()) > self.max_label:
                self.max_label = int(labels.max())
                self.max_label_sample = self.num_samples + self.num_pending + int(labels.argmax())

    def _check_encoded(self, name: str, values: np.ndarray, first: int) -> None:
        """An array of encoded samples is 1-D and holds bytes, or ragged arrays of the layout of
        its first sample; refuse naming the first sample that does not (a str, say, would be
        stored as something else than what was given)."""
        if values.ndim != 1:
            raise DatasetError(
                f"array {name!r} of encoded samples must be 1-D (one bytes object a sample), got {values.shape}"
            )
        layout = self.ragged.get(name)
        if layout is not None:
            for i, sample in enumerate(values):
                if not layout.fits(sample):
                    what = (
                        f"a {sample.dtype} array of shape {sample.shape}"
                        if isinstance(sample, np.ndarray)
                        else f"a {type(sample).__name__}"
                    )
                    shape = "".join(f", {n}" for n in layout.row_shape)
                    raise DatasetError(
                        f"array {name!r}: sample {first + i} is {what}; the array holds ragged {layout.dtype} "
                        f"samples of shape (length{shape})"
                    )
            return
        for i, sample in enumerate(values):
            if not isinstance(sample, bytes):
                raise DatasetError(
                    f"array {name!r}: sample {first + i} is a {type(sample).__name__}, expected bytes "
                    "(an object array holds encoded samples, each one bytes object)"
                )

    def _flush(self, n: int) -> None:
        start, stop = self.num_samples, self.num_samples + n
        shard_index = start // self.shard_samples
        if not self.arrays:
            self._create()
        for name, array in self.arrays.items():
            array.resize((stop, *array.shape[1:]))  # in memory (`close` uploads its zarr.json), so cheap
            values, self.pending[name] = _first(self.pending[name], n)
            shard, sums = self._encode(name, values)
            self._put(shard_key(name, self.documents[name], shard_index), shard)
            self.nbytes[name].append(len(shard))
            self.sums[name].append(sums)
            shard_digest = new_digest()
            digest_samples(values, shard_digest, self.content[name])
            self.digests[name].append(shard_digest.hexdigest())
        self.num_pending -= n
        self.num_samples = stop

    def _encode(self, name: str, values: np.ndarray) -> tuple[bytes, np.ndarray]:
        """The bytes of the shard object of array `name` that holds `values` (a last shard may be
        partial), built in memory as zarr would encode it, and its chunks' crc32c: the manifest's
        size and chunk checksums come from them, not from a read back."""
        chunk_samples = self.sharding[name].chunk_shape[0]
        payloads = vlen_payloads(values) if values.dtype == object else fixed_payloads(values, chunk_samples)
        return encode_shard(payloads, self.shard_samples // chunk_samples, self.compressors[name])

    def _put(self, key: str, body: bytes) -> None:
        """Upload `body` to `key` under root in one request (a local store: into a folder made if new)."""
        path = f"{self.root}/{key}"
        with naming_file(path):
            try:
                self.fs.pipe_file(path, body)
            except FileNotFoundError:
                # on object storage, a missing bucket: named, not made (as makedirs would)
                if not isinstance(self.fs, LocalFileSystem):
                    raise
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)  # its folder is new (x/c/3/ of a 2-D x)
                self.fs.pipe_file(path, body)
        self.sizes[key] = len(body)


def _check_shards(document: Mapping[str, Any], dtype: np.dtype, compressed: bool, name: str) -> None:
    """That zarr described array `name` as `encode_shard` writes its shards (a zarr release that
    changed its defaults would otherwise leave shards its metadata does not describe): inner chunks
    of whole samples (one, encoded), in `dtype`'s bytes, little-endian, or vlen-bytes; then zstd
    where `compressed`; each chunk's crc32c and the index's, the index at the end."""
    sharding = Sharding.parse(document, dtype, f"array {name!r}")
    chunks, index = sharding.chunks, sharding.index
    laid_out = (chunks.checksummed, index.checksummed, sharding.index_at_start)
    kinds = [type(codec) for codec in chunks.compressors]
    encoded = dtype.kind == "O"
    whole = sharding.chunk_shape == (1,) if encoded else sharding.chunk_shape[1:] == sharding.shard_shape[1:]
    stored = chunks.stored_dtype is None if encoded else chunks.stored_dtype == dtype.newbyteorder("<")
    if laid_out != (True, True, False) or not (whole and stored) or kinds != ([Zstd] if compressed else []):
        raise RuntimeError(f"array {name!r}: zarr describes its shards otherwise than nearstore writes: {document}")
