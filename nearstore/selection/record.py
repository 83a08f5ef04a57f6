"""`Selection`: which samples to train on, with what weight, chosen how, at what I/O cost."""

from __future__ import annotations

import io
import json
import numbers
import os
import threading
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from nearstore.errors import DatasetError, NearstoreError, SampleIdError, naming_file, restated, storage_error
from nearstore.storage.dataset import Dataset, check_ids, check_outside, sample_identity, url_to_fs

SELECTION_VERSION = 2  # 2: suspected label errors; version 1 files read too
READABLE_VERSIONS = (1, 2)
# What a file's header must hold, and of which type (anything else is a damaged or foreign file).
META_FIELDS = {"dataset": dict, "method": str, "params": dict, "round": int, "io": dict}
CARRY_PREFIX = "carry_"  # a carried array's name in the archive


def sample_ids(ids: Any, where: str, *, num_samples: int | None = None, what: str = "sample id") -> np.ndarray:
    """`ids` as 1-D int64 sample ids (in [0, num_samples) where that is given), refused by name
    otherwise: a DatasetError for another shape, a SampleIdError for ids that name no sample.

    Ids of a float dtype are refused even when their values are integral: an id that went through
    floats went through something that did not keep ids (and float64 is exact only to 2**53).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise DatasetError(f"{what}s in {where} must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise SampleIdError(f"{what}s in {where} must be integers, got {ids.dtype} (first {ids[0]!r})")
    if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:  # not cast to a negative id
        raise SampleIdError(f"{what} {int(ids.max())} in {where} is past any dataset's samples (over 2**63 - 1)")
    ids = ids.astype(np.int64)
    if num_samples is not None:
        check_ids(ids, num_samples, where, what=what)
    return ids


def in_sorted(ids: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Which of `ids` are in `among` (sorted, unique: a selection's ids), by a binary search each:
    len(ids) · log(len(among)) work, where np.isin sorts or tabulates `among` afresh on every call
    (12 ms for a batch of 256 against 3M ids of 10M samples)."""
    if not len(among):
        return np.zeros(len(ids), dtype=bool)
    at = np.searchsorted(among, ids)
    return among[np.minimum(at, len(among) - 1)] == ids


def _check_fields(selection: Selection, where: str) -> int:
    """Refuse by name a header field a saved file or a resumed loader would refuse (META_FIELDS,
    the scan's I/O figures whole numbers): a selection the loader took once trained, then its
    file or its checkpoint did not load. Returns the round as an int (a numpy integer allowed)."""
    if not _count(selection.round):  # a numpy integer too, unlike a file's header
        raise DatasetError(f"{where}: round must be an integer >= 0, got {selection.round!r}")
    for name, kind in META_FIELDS.items():
        value = getattr(selection, name)
        if name != "round" and not isinstance(value, kind):
            raise DatasetError(f"{where}: {name} must be a {kind.__name__}, got {value!r}")
    for name in ("bytes", "requests"):
        if not _count(selection.io.get(name, 0)):
            value = selection.io[name]
            raise DatasetError(f"{where}: io[{name!r}] (the scan's {name} read) must be an integer >= 0, got {value!r}")
    return int(selection.round)


def _count(value: Any) -> bool:
    """Whether `value` is an integer >= 0 (a numpy one too; not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _float32(values: Any, name: str) -> np.ndarray:
    """`values` as the float32 a selection stores; a finite value past float32's range is refused,
    not turned into inf."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise DatasetError(f"selection {name} must be real numbers, got {values.dtype}")
    if values.dtype.kind == "f" and values.dtype.itemsize > 4:
        finite = values[np.isfinite(values)]
        if np.any(np.abs(finite) > np.finfo(np.float32).max):
            raise DatasetError(f"selection {name} must fit float32 (|value| <= 3.4e38), got {np.abs(finite).max():g}")
    return values.astype(np.float32)


@dataclass(frozen=True)
class Suspects:
    """Samples whose given label the proxy contradicts with confidence (confident learning,
    `kernels.label_issues`): their ids (sorted), the class the proxy is confident of instead, and
    the label's quality p(given label | x) under the proxy, lower the more suspect."""

    ids: np.ndarray
    labels: np.ndarray
    quality: np.ndarray

    def __post_init__(self) -> None:
        ids = sample_ids(self.ids, "a selection's suspects")
        order = np.argsort(ids, kind="stable")
        labels = np.asarray(self.labels)
        if labels.size and labels.dtype.kind not in "iu":  # a class that went through floats is no class
            raise DatasetError(f"suspects' labels must be integers (classes), got {labels.dtype}")
        labels = labels.astype(np.int64)
        quality = _float32(self.quality, "suspects' quality")
        if ids.ndim != 1 or labels.shape != ids.shape or quality.shape != ids.shape:
            raise DatasetError(
                f"suspects' ids, labels and quality must be 1-D of one length, got {ids.shape}, "
                f"{labels.shape}, {quality.shape}"
            )
        repeated = ids[order][1:][np.diff(ids[order]) == 0]
        if len(repeated):
            raise SampleIdError(f"a selection's suspects name sample {int(repeated[0])} more than once")
        object.__setattr__(self, "ids", ids[order])
        object.__setattr__(self, "labels", labels[order])
        object.__setattr__(self, "quality", quality[order])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Selection:
    """Selected sample ids (sorted, unique) with per-sample weights and scores.

    dataset: `Dataset.identity()` of the dataset the ids index.
    weights: per-sample loss weights (1.0 unless the method weights, as CRAIG does).
    scores: the selector's score of each selected sample (NaN where it has none).
    io: figures of the scan that chose it (bytes and requests read, seconds).
    suspects: the samples it scored whose labels look wrong (None: the method does not judge).
    carry: what the method hands the round after this one, by name (AdaCore: its running average
        of the loss's curvature); empty for methods that keep nothing across rounds.
    """

    dataset: dict[str, Any]
    ids: np.ndarray
    weights: np.ndarray
    scores: np.ndarray
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    round: int = 0
    io: dict[str, Any] = field(default_factory=dict)
    suspects: Suspects | None = None
    carry: dict[str, np.ndarray] = field(default_factory=dict)
    version: int = SELECTION_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, Mapping):
            raise DatasetError(f"a selection's dataset must be a Dataset.identity() dict, got {self.dataset!r}")
        where = f"a selection of {self.dataset.get('url')!r}"
        object.__setattr__(self, "round", _check_fields(self, where))
        ids = sample_ids(self.ids, where, num_samples=int(self.dataset.get("num_samples", 0)))
        n = len(ids)
        weights, scores = _float32(self.weights, "weights"), _float32(self.scores, "scores")
        if ids.ndim != 1 or weights.shape != (n,) or scores.shape != (n,):
            raise DatasetError(
                f"ids, weights and scores must be 1-D of one length, got {ids.shape}, {weights.shape}, {scores.shape}"
            )
        if n and (np.any(np.diff(ids) <= 0)):
            raise SampleIdError("selection ids must be sorted and unique")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise DatasetError("selection weights must be finite and >= 0")
        if self.suspects is not None:
            check_ids(self.suspects.ids, int(self.dataset.get("num_samples", 0)), "a selection's suspects")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "carry", check_carry(self.carry, where))

    @classmethod
    def of(
        cls,
        dataset: Dataset,
        ids: np.ndarray,
        *,
        method: str,
        params: dict[str, Any],
        io: dict[str, Any],
        weights: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        suspects: Suspects | None = None,
        carry: Mapping[str, np.ndarray] | None = None,
    ) -> Selection:
        """A selector's picks of `dataset`, in any order, as a record sorted by id; weights 1 and
        scores NaN where the method gives none."""
        ids = np.asarray(ids)  # any dtype: the record refuses ids that are not integers
        order = np.argsort(ids)
        weights = np.ones(len(ids), dtype=np.float32) if weights is None else np.asarray(weights)
        scores = np.full(len(ids), np.nan, dtype=np.float32) if scores is None else np.asarray(scores)
        return cls(
            dataset=dataset.identity(),
            ids=ids[order],
            weights=weights[order],
            scores=scores[order],
            method=method,
            params=params,
            io=io,
            suspects=suspects,
            carry=dict(carry or {}),
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def keep(self) -> float:
        """Fraction of the dataset's samples selected."""
        return len(self) / max(1, int(self.dataset["num_samples"]))

    def check_dataset(self, dataset: Dataset | Mapping[str, Any]) -> None:
        """Raise if this selection was made for a dataset with other samples (the URL may differ).

        dataset: the dataset, or its `identity()` (as a server reports it)."""
        identity = dataset.identity() if isinstance(dataset, Dataset) else dict(dataset)
        ours, theirs = sample_identity(self.dataset), sample_identity(identity)
        if ours != theirs:
            raise DatasetError(
                f"selection was made for {self.dataset.get('url')!r} ({ours}), "
                f"not for {identity.get('url')!r} ({theirs})"
            )

    def to_bytes(self) -> bytes:
        meta = {
            "version": self.version,
            "dataset": self.dataset,
            "method": self.method,
            "params": self.params,
            "round": self.round,
            "io": self.io,
        }
        arrays = {"ids": self.ids, "weights": self.weights, "scores": self.scores}
        if self.suspects is not None:
            arrays |= {f"suspect_{k}": getattr(self.suspects, k) for k in ("ids", "labels", "quality")}
        arrays |= {f"{CARRY_PREFIX}{name}": value for name, value in self.carry.items()}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays, meta=json.dumps(meta, default=_plain))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "selection bytes") -> Selection:
        """A selection from `to_bytes()`'s archive. Anything else (not an .npz archive, cut short,
        damaged, an array or a header field missing or odd) is refused by a DatasetError naming
        `where` and what is wrong; a record that breaks its own rules, by the error it raises."""
        arrays = _archive(data, where)
        fields = _header(arrays, where)
        suspect_arrays = [f"suspect_{k}" for k in ("ids", "labels", "quality")] if "suspect_ids" in arrays else []
        for name in ("ids", "weights", "scores", *suspect_arrays):
            if name not in arrays or arrays[name].dtype.kind not in "biuf":
                found = arrays[name].dtype if name in arrays else "none"
                raise DatasetError(f"{where} is not a selection: array {name!r} of numbers missing (found {found})")
        try:
            suspects = Suspects(*(arrays[name] for name in suspect_arrays)) if suspect_arrays else None
            columns = {name: arrays[name] for name in ("ids", "weights", "scores")}
            carry = {
                name[len(CARRY_PREFIX) :]: value for name, value in arrays.items() if name.startswith(CARRY_PREFIX)
            }
            return cls(**columns, **fields, suspects=suspects, carry=carry)
        except NearstoreError as e:  # the record's own refusal, told where the record came from
            raise restated(e, f"{where}: {e}") from e

    def save(self, url: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Write to a local path or any fsspec URL (`storage_options` for its filesystem, as
        open_dataset's); never inside the source dataset (refused)."""
        if "url" in self.dataset:
            check_outside(self.dataset["url"], str(url), "the selection")
        write_whole(url, self.to_bytes(), storage_options)

    @classmethod
    def load(cls, url: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> Selection:
        """Read a saved selection; a file that is not one is refused naming it (`from_bytes`)."""
        with _opened(url, "rb", storage_options) as f:
            data = f.read()
        return cls.from_bytes(data, where=f"selection file {str(url)!r}")


@contextmanager
def _opened(url: str | Path, mode: str, storage_options: Mapping[str, Any] | None) -> Iterator[Any]:
    """fsspec's file at `url`; the storage backend's own errors as `_storage_errors` says them."""
    fs, path = url_to_fs(str(url), storage_options)
    with _storage_errors(url, "read"), fs.open(path, mode) as f:
        yield f


def write_whole(url: str | Path, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """`data` as the file at `url`, all of it or nothing: a local file is written beside it (under a
    name of this thread's) and renamed over it (a full disk leaves the one there whole, where
    writing in place left it cut), an object is one PUT; missing local folders are made. An error
    names `url`."""
    with _storage_errors(url, "write"):
        fs, path = url_to_fs(str(url), storage_options)
        if not isinstance(fs, LocalFileSystem):
            fs.pipe_file(path, data)
            return
        fs.makedirs(fs._parent(path), exist_ok=True)
        # a name of its own: ranks saving one selection to one path took each other's partial file
        partial = f"{path}.{os.getpid()}-{threading.get_ident()}.partial"
        try:
            with naming_file(str(url)):
                with open(partial, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # whole on disk before it takes the name, a crash of the machine too
                os.replace(partial, path)
        finally:
            if os.path.lexists(partial):
                os.remove(partial)


@contextmanager
def _storage_errors(url: str | Path, verb: str) -> Iterator[None]:
    """The storage backend's own errors (credentials, a missing bucket) as an OSError naming the
    URL, as open_dataset's."""
    try:
        yield
    except (NearstoreError, OSError):
        raise
    except Exception as e:
        if not storage_error(e):
            raise
        raise OSError(f"cannot {verb} {str(url)!r}: {type(e).__name__}: {e}") from e


def check_carry(carry: Any, where: str) -> dict[str, np.ndarray]:
    """A selection's carry: a mapping of names to arrays of numbers or strings, refused by name otherwise."""
    if not isinstance(carry, Mapping):
        raise DatasetError(f"the carry of {where} must be a mapping of names to arrays, got {type(carry).__name__}")
    checked = {}
    for name, value in carry.items():
        value = np.asarray(value)
        if not isinstance(name, str) or not name.isidentifier():
            raise DatasetError(f"the carry of {where} names an array {name!r}: not an identifier")
        if value.dtype.kind not in "biufU":
            raise DatasetError(f"the carry of {where} holds {name!r} of dtype {value.dtype}: not numbers or strings")
        checked[name] = value
    return checked


def _archive(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive, every member checked against its CRC; a DatasetError naming
    `where` for bytes that are not one, are cut short or damaged."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise DatasetError(f"{where} is not a selection: not an .npz archive, or cut short ({len(data)} bytes)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            damaged = archive.testzip()  # numpy reads a member without checking its CRC
        if damaged is None:
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                return {name: f[name] for name in f.files}
    # RuntimeError: zipfile's for a member flagged encrypted (one bit of its central directory entry)
    except (ValueError, OSError, EOFError, NotImplementedError, RuntimeError, zipfile.BadZipFile, zlib.error) as e:
        raise DatasetError(f"{where} is damaged: {type(e).__name__}: {e}") from e
    raise DatasetError(f"{where} is damaged: member {damaged!r} fails its CRC check")


def _header(arrays: dict[str, np.ndarray], where: str) -> dict[str, Any]:
    """The record's fields from the archive's JSON header, each there and of its type (META_FIELDS)."""
    try:
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where} is damaged: its header is not JSON ({e})") from e
    if not isinstance(meta, dict):
        found = "missing" if meta is None else f"a JSON {type(meta).__name__}"
        raise DatasetError(f"{where} is not a selection: its header ('meta', a JSON object) is {found}")
    if meta.get("version") not in READABLE_VERSIONS:
        raise DatasetError(
            f"{where}: selection format version {meta.get('version')!r}; this nearstore reads {READABLE_VERSIONS}"
        )
    for name, kind in META_FIELDS.items():
        value = meta.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DatasetError(f"{where} is not a selection: header field {name!r} is {value!r}, not {kind.__name__}")
    return {name: meta[name] for name in META_FIELDS}


def _plain(value: Any) -> Any:
    """A numpy scalar among a selection's parameters (a selector's window=np.int64(64)) as Python's."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} in a selection's record is not JSON")
