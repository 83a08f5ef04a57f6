"""`StreamingLoader`: the one class a trainer meets. A drop-in for torch's DataLoader that reads
only the selected samples, by byte range, and hands them out of a DALI pipeline."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch

from loaders.dali_pipeline import DaliTransform, dali_available, dali_epoch
from nearstore import Dataset, Selection, SelectiveReader, open_dataset
from nearstore.ranges import DEFAULT_GAP_BYTES, DEFAULT_MAX_OVERHEAD

Backend = Literal["auto", "dali", "torch"]
log = logging.getLogger("nearstore")


class StreamingLoader:
    """Iterate batches of the selected samples of a nearstore dataset, as torch tensors.

    Use it where a `torch.utils.data.DataLoader` was::

        loader = StreamingLoader("data/mnist1d.zarr", selection, batch_size=128)
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for x, y in loader:
                ...

    source: a dataset URL (local path, s3://, http://, any fsspec URL) or an opened `Dataset`.
    selection: a `Selection` (checked against the dataset), a sequence of sample ids, or None
        for every sample.
    batch_size, drop_last: as DataLoader's. Without drop_last the last batch may be smaller;
        every selected sample appears exactly once per epoch.
    shuffle, seed: each epoch visits the selection in the order permutation(seed, epoch), so
        an epoch's batches are reproducible whatever ran before. `set_epoch` picks the epoch;
        otherwise each full pass over the loader advances it by one.
    weights: also yield each sample's selection weight, batches are then (x, y, w).
    input_array: the array yielded as x (default: the first sample array other than labels).
    dali_transform: DataNode -> DataNode applied to x inside the DALI graph (on the GPU when
        the device is CUDA). transform: applied to the x tensor of every batch afterwards.
    backend: "dali", "torch" (the same batches without DALI), or "auto" (DALI where installed).
    device: where batches land; default CUDA when available, else CPU.
    prefetch: batches read ahead of the trainer in a background thread.
    gap_bytes, max_overhead: byte-range coalescing knobs of the reader (`coalesce_ranges`).
    """

    def __init__(
        self,
        source: str | Dataset,
        selection: Selection | Sequence[int] | np.ndarray | None = None,
        *,
        batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        weights: bool = False,
        input_array: str | None = None,
        dali_transform: DaliTransform | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        backend: Backend = "auto",
        device: torch.device | str | None = None,
        prefetch: int = 2,
        storage_options: Mapping[str, Any] | None = None,
        gap_bytes: int = DEFAULT_GAP_BYTES,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if backend not in ("auto", "dali", "torch"):
            raise ValueError(f"backend must be 'auto', 'dali' or 'torch', got {backend!r}")
        if backend == "dali" and not dali_available():
            raise RuntimeError("backend='dali' but DALI is not installed (pip install nvidia-dali-cuda130)")
        self.backend = "dali" if backend == "dali" or (backend == "auto" and dali_available()) else "torch"
        if dali_transform is not None and self.backend != "dali":
            raise ValueError("dali_transform needs the DALI backend; pass a torch `transform` instead")

        self.dataset = source if isinstance(source, Dataset) else open_dataset(source, storage_options=storage_options)
        self.ids, self.sample_weights = _selected(self.dataset, selection)
        self.input_array = input_array or next(
            (n for n in self.dataset.sample_arrays if n != self.dataset.label_array), None
        )
        if self.input_array not in self.dataset.arrays:
            raise ValueError(f"input_array {self.input_array!r} is not a sample array of {self.dataset.url!r}")
        arrays = [self.input_array] + ([self.dataset.label_array] if self.dataset.label_array else [])
        self.reader = SelectiveReader(self.dataset, arrays, gap_bytes=gap_bytes, max_overhead=max_overhead)

        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.with_weights = weights
        self.dali_transform, self.transform = dali_transform, transform
        self.device = torch.device(device) if device is not None else _default_device()
        self.prefetch = prefetch
        self.epoch = 0
        self.epochs_completed = 0
        self._full_epoch_bytes: int | None = None
        self._epochs: list[dict[str, Any]] = []
        self.scan_io = selection.io if isinstance(selection, Selection) else {}
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.ids)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows (as DistributedSampler's)."""
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions into the selection, in the order epoch `epoch` visits them."""
        n = len(self.ids)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        started, before = time.perf_counter(), self.reader.stats.snapshot()
        order = self.epoch_order(self.epoch)
        num_batches = len(self)
        batches = self._prefetched(order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(num_batches))
        if self.backend == "dali":
            num_outputs = 1 + bool(self.dataset.label_array) + self.with_weights
            tensors = dali_epoch(
                batches,
                num_batches=num_batches,
                num_outputs=num_outputs,
                batch_size=self.batch_size,
                device=self.device,
                dali_transform=self.dali_transform,
            )
        else:
            tensors = (tuple(torch.from_numpy(a).to(self.device) for a in batch) for batch in batches)
        for batch in tensors:
            if self.transform is not None:
                batch = (self.transform(batch[0]), *batch[1:])
            yield batch
        read = self.reader.stats.snapshot() - before
        self._epochs.append({"epoch": self.epoch, **read.as_dict(), "seconds": time.perf_counter() - started})
        log.info(
            "epoch %d: %d samples, %.2f MB in %d requests read for the trainer (full data: %.2f MB), %.1f s",
            self.epoch,
            read.samples,
            read.bytes / 1e6,
            read.requests,
            self._full_bytes() / 1e6,
            self._epochs[-1]["seconds"],
        )
        self.epochs_completed += 1
        self.epoch += 1

    def io_stats(self) -> dict[str, Any]:
        """What crossed the storage boundary: for the trainer (in total and per completed epoch),
        for the scan that made the selection, and what reading all data every epoch would cost.

        io_saving = 1 − (scan + trainer bytes) / (full-data bytes × epochs completed).
        """
        stats = self.reader.stats.snapshot()
        full = self._full_bytes() * max(1, self.epochs_completed)
        return {
            "bytes_read": stats.bytes,
            "requests": stats.requests,
            "samples_read": stats.samples,
            "epochs_completed": self.epochs_completed,
            "per_epoch": list(self._epochs),
            "selected_samples": len(self.ids),
            "scan_bytes": self.scan_io.get("bytes", 0),
            "scan_requests": self.scan_io.get("requests", 0),
            "full_epoch_bytes": self._full_bytes(),
            "io_saving": 1 - (stats.bytes + self.scan_io.get("bytes", 0)) / full if full else 0.0,
        }

    def _full_bytes(self) -> int:
        if self._full_epoch_bytes is None:
            self._full_epoch_bytes = self.dataset.stored_nbytes(self.reader.layouts)
        return self._full_epoch_bytes

    def _prefetched(self, positions: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, ...]]:
        """Read batches in a background thread, `prefetch` ahead, yielding them in order."""
        if self._pool is None:
            # One reader thread for the loader's life: an epoch abandoned half-way may be
            # finalized in any thread, where starting or joining threads can deadlock.
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nearstore-read")
        positions = iter(positions)
        pending = deque(self._pool.submit(self._read_batch, p) for p in _take(positions, self.prefetch))
        try:
            while pending:
                batch = pending.popleft().result()
                pending.extend(self._pool.submit(self._read_batch, p) for p in _take(positions, 1))
                yield batch
        finally:
            for future in pending:
                future.cancel()

    def _read_batch(self, positions: np.ndarray) -> tuple[np.ndarray, ...]:
        arrays = self.reader.read(self.ids[positions])
        batch = [arrays[self.input_array]]
        if self.dataset.label_array:
            batch.append(arrays[self.dataset.label_array])
        if self.with_weights:
            batch.append(self.sample_weights[positions])
        return tuple(batch)


def _selected(
    dataset: Dataset, selection: Selection | Sequence[int] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    if selection is None:
        ids = np.arange(dataset.num_samples, dtype=np.int64)
        return ids, np.ones(len(ids), dtype=np.float32)
    if isinstance(selection, Selection):
        selection.check_dataset(dataset)
        return selection.ids, selection.weights
    ids = np.asarray(selection)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"selection must be a Selection or 1-D integer ids, got {ids.dtype} {ids.shape}")
    bad = ids[(ids < 0) | (ids >= dataset.num_samples)]
    if bad.size:
        raise IndexError(f"selected sample id {int(bad[0])} out of range [0, {dataset.num_samples}) in {dataset.url!r}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("selected sample ids must be unique")
    return ids.astype(np.int64), np.ones(len(ids), dtype=np.float32)


def _take(iterator: Iterator[np.ndarray], n: int) -> list[np.ndarray]:
    return [p for _, p in zip(range(n), iterator)]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
