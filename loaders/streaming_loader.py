"""`StreamingLoader`: the one class a trainer meets. A drop-in for torch's DataLoader that reads
only the selected samples, by byte range, and hands them out of a DALI pipeline."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from loaders.dali_pipeline import DaliTransform, dali_available, dali_epoch
from loaders.flight_client import FlightSource, OnDisconnect
from nearstore import Dataset, IOStats, Selection, SelectiveReader, open_dataset
from nearstore.dataset import sample_identity
from nearstore.proxy import ModelProxy
from nearstore.ranges import DEFAULT_GAP_BYTES, DEFAULT_MAX_OVERHEAD
from nearstore.selectors import default_reselect, make_selector
from nearstore.server import ALL_SAMPLES

Backend = Literal["auto", "dali", "torch"]
Batch = tuple[np.ndarray, np.ndarray, int | str]  # a batch to read: ids, their weights, the server round
STATE_VERSION = 1
# What fixes each epoch's batches: a state_dict resumes only on a loader that agrees on all of them.
_ORDER = ("batch_size", "shuffle", "seed", "drop_last", "rank", "world_size", "uneven", "warm_start_epochs")
log = logging.getLogger("nearstore")


class StreamingLoader:
    """Iterate batches of the selected samples of a nearstore dataset, as torch tensors.

    Use it where a `torch.utils.data.DataLoader` was::

        loader = StreamingLoader("data/mnist1d.zarr", selection, batch_size=128)
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for x, y in loader:
                ...

    source: a dataset URL (local path, s3://, http://, any fsspec URL), an opened `Dataset`, or
        a near-storage server, grpc://host:port/name (`nearstore serve`).
    selection: a `Selection` (checked against the dataset), a sequence of sample ids, or None
        for every sample (through a server: None for the server's current selection).
    batch_size, drop_last: as DataLoader's. Without drop_last the last batch may be smaller;
        every selected sample appears exactly once per epoch.
    shuffle, seed: each epoch visits the selection in the order permutation(seed, epoch), so
        an epoch's batches are reproducible whatever ran before. `set_epoch` picks the epoch;
        otherwise each full pass over the loader advances it by one.
    rank, world_size: this trainer's share of each epoch (as DistributedSampler's): positions
        rank, rank + world_size, ... of the epoch order, padded by wrapping around to equal
        length (uneven="pad") or cut to it (uneven="drop"). Default: torch.distributed's when it
        is initialized (each epoch then checks that every rank iterates the same selection),
        else one rank.
    warm_start_epochs: the first epochs visit every sample of the dataset (weight 1), the
        selection only after: a full-data warm start (GRAFT's "warm" runs), after which the
        trainer's model is worth pushing as the proxy for a first round (`update_proxy`,
        `reselect`). Through a server the warm epochs are shipped whole.
    weights: also yield each sample's selection weight, batches are then (x, y, w).
    input_array: the array yielded as x (default: the first sample array other than labels).
    dali_transform: DataNode -> DataNode applied to x inside the DALI graph (on the GPU when
        the device is CUDA). transform: applied to the x tensor of every batch afterwards.
    backend: "dali", "torch" (the same batches without DALI), or "auto" (DALI where installed).
    device: where batches land; default CUDA when available, else CPU.
    prefetch: batches read ahead of the trainer in a background thread.
    gap_bytes, max_overhead: byte-range coalescing knobs of the reader (`coalesce_ranges`).
    token, on_disconnect: for a server, see `FlightSource`.
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
        rank: int | None = None,
        world_size: int | None = None,
        uneven: Literal["pad", "drop"] = "pad",
        warm_start_epochs: int = 0,
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
        token: str | None = None,
        on_disconnect: OnDisconnect = "reconnect",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        rank, world_size = _rank_and_world_size(rank, world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        if warm_start_epochs < 0:
            raise ValueError(f"warm_start_epochs must be >= 0, got {warm_start_epochs}")
        if uneven not in ("pad", "drop"):
            raise ValueError(f"uneven must be 'pad' or 'drop', got {uneven!r}")
        if backend not in ("auto", "dali", "torch"):
            raise ValueError(f"backend must be 'auto', 'dali' or 'torch', got {backend!r}")
        if backend == "dali" and not dali_available():
            raise RuntimeError("backend='dali' but DALI is not installed (pip install nvidia-dali-cuda130)")
        self.backend = "dali" if backend == "dali" or (backend == "auto" and dali_available()) else "torch"
        if dali_transform is not None and self.backend != "dali":
            raise ValueError("dali_transform needs the DALI backend; pass a torch `transform` instead")

        self.server: FlightSource | None = None
        self.dataset: Dataset | None = None
        if isinstance(source, str) and source.startswith("grpc://"):
            self.server = FlightSource(source, token=token, on_disconnect=on_disconnect)
            self.url, self.num_samples = self.server.url, self.server.num_samples
            self.sample_arrays, self.label_array = self.server.sample_arrays, self.server.label_array
            selection = self.server.selection() if selection is None else selection
            if not isinstance(selection, Selection):
                raise TypeError("through a server the selection is the server's: pass None or a Selection it made")
        else:
            if not isinstance(source, Dataset):
                source = open_dataset(source, storage_options=storage_options)
            self.dataset = source
            self.url, self.num_samples = self.dataset.url, self.dataset.num_samples
            self.sample_arrays, self.label_array = self.dataset.sample_arrays, self.dataset.label_array
        self.input_array = input_array or next((n for n in self.sample_arrays if n != self.label_array), None)
        if self.input_array not in self.sample_arrays:
            raise ValueError(f"input_array {self.input_array!r} is not a sample array of {self.url!r}")
        self.reader: SelectiveReader | None = None
        if self.dataset is not None:
            arrays = [self.input_array] + ([self.label_array] if self.label_array else [])
            self.reader = SelectiveReader(self.dataset, arrays, gap_bytes=gap_bytes, max_overhead=max_overhead)
        self._use(selection)

        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size, self.uneven = rank, world_size, uneven
        self.warm_start_epochs = warm_start_epochs
        self.with_weights = weights
        self.dali_transform, self.transform = dali_transform, transform
        self.device = torch.device(device) if device is not None else _default_device()
        self.prefetch = prefetch
        self.epoch = 0
        self.epochs_completed = 0
        self.batches_done = 0  # of the epoch being iterated
        self._resume_at = 0
        self._full_epoch_bytes: int | None = None
        self._epochs: list[dict[str, Any]] = []
        self._proxy: ModelProxy | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def stats(self) -> IOStats:
        """What this loader received: from storage, or shipped by the server."""
        return self.server.stats if self.server is not None else self.reader.stats

    def __len__(self) -> int:
        """Batches in the current epoch (of this rank's share)."""
        n = self._share_size(self.epoch)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows (as DistributedSampler's).
        Setting the epoch a resumed state is in keeps its place; another epoch starts afresh."""
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions into the epoch's samples (the selection, or all of them while warming up), in
        the order epoch `epoch` visits them on this rank."""
        n = self._epoch_size(epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.world_size == 1:
            return order
        return np.resize(order, self._share_size(epoch) * self.world_size)[self.rank :: self.world_size]

    def update_proxy(self, model: torch.nn.Module) -> None:
        """Score the next selection round with the trainer's model (NeSSA's feedback): its
        weights are pushed to the server, or copied for an in-process scan."""
        if self.server is not None:
            self.server.update_proxy(model)
        else:
            self._proxy = ModelProxy(copy.deepcopy(model).cpu())

    def reselect(
        self,
        keep: float | None = None,
        *,
        method: str | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> Selection:
        """Run a new selection round with the latest proxy (`update_proxy`), on the server or here
        beside the store; the next epoch iterates it. Its scan I/O joins `io_stats()`.

        method, options: a selector of `nearstore.selectors` and its parameters; by default
            `default_reselect(keep)`, GRAFT on a pool of twice the budget per class (1.5x above a
            third of the data): the current selection's samples and fresh ones. Every selector is
            given the current selection as `previous`.
        keep: default the current selection's share; seed: default the round number.
        """
        keep = keep if keep is not None else len(self.ids) / self.num_samples
        if method is None:
            method, defaults = default_reselect(keep)
            options = {**defaults, **options}
        seed = seed if seed is not None else self.round + 1
        if self.server is not None:
            selection = self.server.select(keep=keep, method=method, seed=seed, options=options)
        else:
            selector = make_selector(method, **options)
            selection = selector.select(self.dataset, keep, proxy=self._proxy, seed=seed, previous=self.ids)
            selection = dataclasses.replace(selection, round=self.round + 1)
        self._use(selection)
        self._resume_at = 0
        return selection

    def _use(self, selection: Selection | Sequence[int] | np.ndarray | None) -> None:
        if isinstance(selection, Selection):
            selection.check_dataset(self._identity())
        self.ids, self.sample_weights = _selected(self.num_samples, self.url, selection)
        self.round = selection.round if isinstance(selection, Selection) else 0
        io = selection.io if isinstance(selection, Selection) else {}
        previous = getattr(self, "scan_io", {})
        self.scan_io = {k: previous.get(k, 0) + io.get(k, 0) for k in ("bytes", "requests")}

    def _check_ranks_agree(self) -> None:
        """Under torch.distributed, refuse to start an epoch whose ranks hold different selections:
        their shares would overlap and miss samples."""
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        mine = (self.round, hashlib.sha256(self.ids.tobytes()).hexdigest()[:16], len(self.ids))
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for rank, theirs in enumerate(everyone):
            if theirs != mine:
                raise ValueError(
                    f"rank {self.rank} iterates selection round {mine[0]} ({mine[2]} samples, digest {mine[1]}) "
                    f"but rank {rank} has round {theirs[0]} ({theirs[2]} samples, digest {theirs[1]})"
                )

    def _identity(self) -> dict[str, Any]:
        """The dataset's identity, read here or reported by the server."""
        return self.server.identity if self.server is not None else self.dataset.identity()

    def _share_size(self, epoch: int) -> int:
        n, ranks = self._epoch_size(epoch), self.world_size
        return n // ranks if self.uneven == "drop" else math.ceil(n / ranks)

    def _epoch_size(self, epoch: int) -> int:
        """How many samples epoch `epoch` visits: all while warming up, else the selection."""
        return self.num_samples if epoch < self.warm_start_epochs else len(self.ids)

    def _epoch_ids(self, epoch: int) -> tuple[np.ndarray, np.ndarray, int | str]:
        """The samples epoch `epoch` visits, their weights, and the server round they are in."""
        if epoch < self.warm_start_epochs:
            return np.arange(self.num_samples), np.ones(self.num_samples, dtype=np.float32), ALL_SAMPLES
        return self.ids, self.sample_weights, self.round

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self._check_ranks_agree()
        started, before = time.perf_counter(), self.stats.snapshot()
        storage_before = self._server_storage_reads()
        order = self.epoch_order(self.epoch)
        ids, weights, round = self._epoch_ids(self.epoch)
        first, self._resume_at = self._resume_at, 0  # > 0 right after load_state_dict mid-epoch
        self.batches_done = first
        num_batches = len(self) - first
        positions = (order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(first, first + num_batches))
        batches = self._prefetched((ids[p], weights[p], round) for p in positions)
        if self.backend == "dali":
            num_outputs = 1 + bool(self.label_array) + self.with_weights
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
            self.batches_done += 1  # counted as delivered once the trainer holds it
            yield batch
        read = self.stats.snapshot() - before
        self._epochs.append({"epoch": self.epoch, **read.as_dict(), "seconds": time.perf_counter() - started})
        if self.server is not None:  # what the server read from storage meanwhile, for every trainer it serves
            storage = self._server_storage_reads()
            self._epochs[-1]["server_storage"] = {k: storage[k] - storage_before[k] for k in ("bytes", "requests")}
        log.info(
            "epoch %d: %d samples, %.2f MB in %d requests %s (full data: %.2f MB), %.1f s",
            self.epoch,
            read.samples,
            read.bytes / 1e6,
            read.requests,
            "shipped by the server" if self.server is not None else "read from storage",
            self._full_bytes() / 1e6,
            self._epochs[-1]["seconds"],
        )
        self.epochs_completed += 1
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is, as a StatefulDataLoader's: the epoch, the batches of it already
        delivered, and the selection being iterated. A loader over the same data, built with the
        same batch_size, shuffle, seed and rank share, resumes from it with `load_state_dict`."""
        return {
            "version": STATE_VERSION,
            "dataset": self._identity(),
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "epochs_completed": self.epochs_completed,
            "round": self.round,
            "ids": self.ids.copy(),
            "weights": self.sample_weights.copy(),
            "scan_io": dict(self.scan_io),
            "order": {name: getattr(self, name) for name in _ORDER},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume where `state_dict()` was taken: the next iteration delivers exactly the batches
        of that epoch not delivered yet, in the same order, then carries on epoch by epoch."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state_dict version {state.get('version')!r} is not {STATE_VERSION}")
        if sample_identity(self._identity()) != sample_identity(state["dataset"]):
            raise ValueError(f"state_dict is from dataset {state['dataset'].get('url')!r}, not {self.url!r}")
        for name, value in state["order"].items():
            if getattr(self, name) != value:
                raise ValueError(f"state_dict was taken with {name}={value!r}; this loader has {getattr(self, name)!r}")
        if self.server is not None and state["round"] != self.round:
            self.server.selection(state["round"])  # raises if the server no longer holds that round
        self.ids = np.asarray(state["ids"], dtype=np.int64)
        self.sample_weights = np.asarray(state["weights"], dtype=np.float32)
        self.round, self.scan_io = state["round"], dict(state["scan_io"])
        self.epoch, self.epochs_completed = state["epoch"], state["epochs_completed"]
        if not 0 <= state["batches_done"] <= len(self):
            raise ValueError(f"state_dict says {state['batches_done']} batches of {len(self)} were delivered")
        self.batches_done = self._resume_at = state["batches_done"]

    def io_stats(self) -> dict[str, Any]:
        """What crossed the boundary: for the trainer (read from storage, or shipped by the
        server; in total and per completed epoch), for the scans that made the selections, and
        what reading all data every epoch would cost. Through a server, also what the server
        read from storage for samples (`server_storage_reads`, and per epoch `server_storage`).

        io_saving = 1 − (scan + trainer bytes) / (full-data bytes × epochs completed).
        """
        stats = self.stats.snapshot()
        full = self._full_bytes() * max(1, self.epochs_completed)
        return {
            "bytes_read": stats.bytes,
            "requests": stats.requests,
            "samples_read": stats.samples,
            "epochs_completed": self.epochs_completed,
            "per_epoch": list(self._epochs),
            "selected_samples": len(self.ids),
            "round": self.round,
            "scan_bytes": self.scan_io.get("bytes", 0),
            "scan_requests": self.scan_io.get("requests", 0),
            "full_epoch_bytes": self._full_bytes(),
            "io_saving": 1 - (stats.bytes + self.scan_io.get("bytes", 0)) / full if full else 0.0,
            **({"server_storage_reads": self._server_storage_reads()} if self.server is not None else {}),
        }

    def _server_storage_reads(self) -> dict[str, int]:
        """The server's storage reads for samples so far (all trainers); empty without a server."""
        return self.server.info()["storage_reads"] if self.server is not None else {}

    def _full_bytes(self) -> int:
        if self._full_epoch_bytes is None:
            if self.server is not None:
                self._full_epoch_bytes = self.server.full_epoch_bytes
            else:
                self._full_epoch_bytes = self.dataset.stored_nbytes(self.reader.layouts)
        return self._full_epoch_bytes

    def _prefetched(self, batches: Iterable[Batch]) -> Iterator[tuple[np.ndarray, ...]]:
        """Read batches in a background thread, `prefetch` ahead, yielding them in order."""
        if self._pool is None:
            # One reader thread for the loader's life: an epoch abandoned half-way may be
            # finalized in any thread, where starting or joining threads can deadlock.
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nearstore-read")
        batches = iter(batches)
        pending = deque(self._pool.submit(self._read_batch, *b) for b in _take(batches, self.prefetch))
        try:
            while pending:
                batch = pending.popleft().result()
                pending.extend(self._pool.submit(self._read_batch, *b) for b in _take(batches, 1))
                yield batch
        finally:
            for future in pending:
                future.cancel()

    def _read_batch(self, ids: np.ndarray, weights: np.ndarray, round: int | str) -> tuple[np.ndarray, ...]:
        arrays = self.server.read(ids, round=round) if self.server is not None else self.reader.read(ids)
        batch = [arrays[self.input_array]]
        if self.label_array:
            batch.append(arrays[self.label_array])
        if self.with_weights:
            batch.append(weights)
        return tuple(batch)


def _selected(
    num_samples: int, url: str, selection: Selection | Sequence[int] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    if selection is None:
        ids = np.arange(num_samples, dtype=np.int64)
        return ids, np.ones(len(ids), dtype=np.float32)
    if isinstance(selection, Selection):
        return selection.ids, selection.weights
    ids = np.asarray(selection)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"selection must be a Selection or 1-D integer ids, got {ids.dtype} {ids.shape}")
    bad = ids[(ids < 0) | (ids >= num_samples)]
    if bad.size:
        raise IndexError(f"selected sample id {int(bad[0])} out of range [0, {num_samples}) in {url!r}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("selected sample ids must be unique")
    return ids.astype(np.int64), np.ones(len(ids), dtype=np.float32)


def _rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    return rank, world_size


def _take(iterator: Iterator[Batch], n: int) -> list[Batch]:
    return [b for _, b in zip(range(n), iterator)]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
