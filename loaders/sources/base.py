"""`Source`: what a `StreamingLoader` reads from, one contract for every kind (as fsspec's
filesystems and zarr's stores are): samples by id, the dataset's identity and bytes, what the
storage side read, selection rounds, and the proxy that scores the next one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nearstore import IOStats, Selection
from nearstore.storage.images import ImageTransform


class Source(ABC):
    """Samples of one dataset, read by id, and its selection rounds.

    url: where it is. identity: `Dataset.identity()` of the dataset. sample_arrays, label_array:
    its arrays. shard_samples: samples a shard (sample i lies in shard i // shard_samples).
    stats: what this source delivered to this trainer (bytes, requests, samples).
    """

    url: str
    identity: dict[str, Any]
    sample_arrays: tuple[str, ...]
    label_array: str | None
    shard_samples: int
    stats: IOStats

    @property
    def num_samples(self) -> int:
        return int(self.identity["num_samples"])

    def __len__(self) -> int:
        """Samples in the dataset, all of them (as a torch Dataset's len, for code that asks
        `len(loader.dataset)`): not the selection a loader visits (`len(loader.ids)`), nor its
        batches (`len(loader)`, of this rank's share of an epoch)."""
        return self.num_samples

    @abstractmethod
    def read(
        self, ids: Sequence[int] | np.ndarray, *, arrays: Sequence[str], round: int | str
    ) -> dict[str, np.ndarray]:
        """{array: samples} of `arrays` for `ids` (rows in the order of ids), which round `round`
        holds (or, round ALL_SAMPLES, any: a full-data warm epoch)."""

    @abstractmethod
    def stored_bytes(self, arrays: Sequence[str]) -> int:
        """Bytes of these arrays in storage: what reading every sample of them costs."""

    @abstractmethod
    def storage_reads(self) -> dict[str, int]:
        """What the storage side has read for samples so far (bytes, requests, samples): this
        trainer's reads, or a server's for every trainer it serves."""

    @abstractmethod
    def selection(self, round: int | None = None) -> Selection | None:
        """Selection round `round` (None: the current one) where the source holds rounds (a
        server), raising if it no longer does; None where it holds none (a store)."""

    @abstractmethod
    def select(
        self,
        previous: np.ndarray,
        round: int,
        *,
        keep: float,
        method: str,
        options: dict[str, Any],
        seed: int,
        carried: Mapping[str, np.ndarray] | None = None,
        request: str | None = None,
    ) -> Selection:
        """The round after round `round`, whose ids were `previous` and which handed on `carried`
        (its `Selection.carry`): `method` with `options`, scored by the latest pushed proxy. A
        server goes on from the round it holds, whatever the trainer passes. `request`: an id
        every rank of one job sends for the same round, which a server then runs once and answers
        each of them with (None: a round of this caller's own)."""

    @abstractmethod
    def update_proxy(
        self, model: torch.nn.Module, images: ImageTransform | None = None, head: str | None = None
    ) -> None:
        """Score the next round with the trainer's model (NeSSA's feedback), on encoded images
        decoded by `images` (the loader's transform at evaluation; None: `ModelProxy`'s default),
        its logits read from its module named `head` (None: the last nn.Linear it runs)."""

    def expect(self, ids: np.ndarray, arrays: Sequence[str]) -> None:  # noqa: B027 (a server reads for itself)
        """The samples `ids` of `arrays` the next reads will ask for (an epoch's, this rank's): a
        source may read ahead what it keeps of them, a few shards a request."""

    def close(self) -> None:  # noqa: B027 (a store holds nothing to let go of)
        """Let go of connections."""
