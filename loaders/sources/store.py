"""`StoreSource`: a dataset read straight from its store (a path, s3://, http://, any fsspec URL),
only the selected samples' byte ranges; its selection rounds run here, in the trainer's process."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from loaders.sources.base import Source
from nearstore import Coalescing, Dataset, IOStats, ModelProxy, ParameterError, Selection, SelectiveReader, open_dataset
from nearstore.selection.executors import Executor, check_executor
from nearstore.selection.proxies import detached_copy, nonfinite_weight
from nearstore.selection.selectors import next_round
from nearstore.selection.stages import vet
from nearstore.storage import DEFAULT_READS, small_arrays
from nearstore.storage.images import PROXY_IMAGES, ImageTransform


class StoreSource(Source):
    """Samples of the dataset at `url` (or an opened `Dataset`), read by byte range.

    reads: how the reader plans byte ranges (`Coalescing`: what a request is worth in bytes).
    executor: where selection rounds (`StreamingLoader.reselect`) run: in process by default, on the
    opened dataset, which keeps the labels and shard indexes they read; or on a Dask cluster beside
    the storage, `DaskExecutor(client)` (`nearstore.selection.executors`).
    """

    def __init__(
        self,
        url: str | Dataset,
        *,
        storage_options: Mapping[str, Any] | None = None,
        reads: Coalescing = DEFAULT_READS,
        executor: Executor | None = None,
    ) -> None:
        opened = not isinstance(url, Dataset)
        self.dataset = open_dataset(url, storage_options=storage_options) if opened else url
        self.url = self.dataset.url
        self.identity = self.dataset.identity()
        self.sample_arrays, self.label_array = self.dataset.sample_arrays, self.dataset.label_array
        self.shard_samples = self.dataset.shard_samples
        self.reads, self.executor = reads, check_executor(executor)
        self.stats = IOStats()
        if opened:  # its metadata documents, read here: a request each
            self.stats.add(bytes=self.dataset.open_stats.bytes, requests=self.dataset.open_stats.requests)
        self._readers: dict[tuple[str, ...], SelectiveReader] = {}
        self._stored: dict[tuple[str, ...], int] = {}
        self._proxy: ModelProxy | None = None

    def read(
        self, ids: Sequence[int] | np.ndarray, *, arrays: Sequence[str], round: int | str
    ) -> dict[str, np.ndarray]:
        return self._reader(tuple(arrays)).read(ids)

    def expect(self, ids: np.ndarray, arrays: Sequence[str]) -> None:
        self._reader(tuple(arrays)).keep_ahead(ids)

    def _reader(self, names: tuple[str, ...]) -> SelectiveReader:
        if names not in self._readers:  # readers share the dataset's shard indexes and one count
            self._readers[names] = SelectiveReader(
                self.dataset, names, reads=self.reads, stats=self.stats, keep=small_arrays(self.dataset, names)
            )
        return self._readers[names]

    def stored_bytes(self, arrays: Sequence[str]) -> int:
        names = tuple(arrays)
        if names not in self._stored:  # a size request per shard object: asked once, the store is read-only
            self._stored[names] = self.dataset.stored_nbytes(names)
        return self._stored[names]

    def storage_reads(self) -> dict[str, int]:
        return self.stats.snapshot().as_dict()

    def selection(self, round: int | None = None) -> Selection | None:
        return None

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
        return next_round(
            self.dataset,
            round + 1,
            keep=keep,
            method=method,
            options=options,
            seed=seed,
            previous=previous,
            carried=carried,
            proxy=self._proxy,
            executor=self.executor,
        )

    def update_proxy(
        self, model: torch.nn.Module, images: ImageTransform | None = None, head: str | None = None
    ) -> None:
        """Checked here, on the first samples, as a server checks a push: a model that cannot run on
        them or scores fewer classes than the dataset has is refused now, the proxy kept unchanged."""
        try:
            copied = detached_copy(model).cpu()
        except (TypeError, RuntimeError, NotImplementedError) as e:  # a lock held, a tensor on 'meta'
            raise ParameterError(
                f"{type(model).__name__} cannot be copied to score beside training ({type(e).__name__}: {e}): "
                "update_proxy scores a copy of the model; push one that holds only its modules and tensors"
            ) from e
        bad = nonfinite_weight(copied)
        if bad is not None:  # as a server refuses the push
            raise ParameterError(f"proxy weights {bad!r} hold NaN or inf")
        proxy = ModelProxy(copied, images=images if images is not None else PROXY_IMAGES, head=head)
        vet(proxy, self._reader((self.dataset.input_array,)), self.dataset.input_array)
        self._proxy = proxy
