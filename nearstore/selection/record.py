"""`Selection`: which samples to train on, with what weight, chosen how, at what I/O cost."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from nearstore.errors import DatasetError, SampleIdError
from nearstore.storage.dataset import Dataset, check_ids, sample_identity

SELECTION_VERSION = 2  # 2: suspected label errors; version 1 files read too
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Suspects:
    """Samples whose given label the proxy contradicts with confidence (confident learning,
    `kernels.label_issues`): their ids (sorted), the class the proxy is confident of instead, and
    the label's quality p(given label | x) under the proxy, lower the more suspect."""

    ids: np.ndarray
    labels: np.ndarray
    quality: np.ndarray

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        labels = np.asarray(self.labels, dtype=np.int64)
        quality = np.asarray(self.quality, dtype=np.float32)
        if ids.ndim != 1 or labels.shape != ids.shape or quality.shape != ids.shape:
            raise DatasetError(
                f"suspects' ids, labels and quality must be 1-D of one length, got {ids.shape}, "
                f"{labels.shape}, {quality.shape}"
            )
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
    version: int = SELECTION_VERSION

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids, dtype=np.int64)
        n = len(ids)
        weights = np.asarray(self.weights, dtype=np.float32)
        scores = np.asarray(self.scores, dtype=np.float32)
        if ids.ndim != 1 or weights.shape != (n,) or scores.shape != (n,):
            raise DatasetError(
                f"ids, weights and scores must be 1-D of one length, got {ids.shape}, {weights.shape}, {scores.shape}"
            )
        if n and (np.any(np.diff(ids) <= 0)):
            raise SampleIdError("selection ids must be sorted and unique")
        check_ids(ids, int(self.dataset.get("num_samples", 0)), f"a selection of {self.dataset.get('url')!r}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise DatasetError("selection weights must be finite and >= 0")
        if self.suspects is not None:
            check_ids(self.suspects.ids, int(self.dataset.get("num_samples", 0)), "a selection's suspects")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "scores", scores)

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
    ) -> Selection:
        """A selector's picks of `dataset`, in any order, as a record sorted by id; weights 1 and
        scores NaN where the method gives none."""
        ids = np.asarray(ids, dtype=np.int64)
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
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays, meta=json.dumps(meta))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Selection:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("version") not in READABLE_VERSIONS:
                raise DatasetError(
                    f"selection format version {meta.get('version')!r}; this nearstore reads {READABLE_VERSIONS}"
                )
            suspects = None
            if "suspect_ids" in f:
                suspects = Suspects(f["suspect_ids"], f["suspect_labels"], f["suspect_quality"])
            meta["version"] = SELECTION_VERSION
            return cls(ids=f["ids"], weights=f["weights"], scores=f["scores"], suspects=suspects, **meta)

    def save(self, url: str | Path) -> None:
        """Write to a local path or any fsspec URL (never inside the source dataset)."""
        with fsspec.open(str(url), "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def load(cls, url: str | Path) -> Selection:
        with fsspec.open(str(url), "rb") as f:
            return cls.from_bytes(f.read())
