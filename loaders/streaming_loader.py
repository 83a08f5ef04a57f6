"""`StreamingLoader`: the one class a trainer meets. A drop-in for torch's DataLoader that reads
only the selected samples from a `Source` and hands them out of a DALI pipeline."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import reprlib
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from loaders.cache import CacheLost, SampleCache
from loaders.dali_pipeline import DaliTransform, dali_available, dali_epoch, dali_refusal
from loaders.order import SHUFFLE_BLOCK, EpochOrder, Shuffle, Uneven, share_size, state_count, state_entry
from loaders.sources import Source, StoreSource, open_source
from nearstore import (
    Dataset,
    DatasetError,
    IntegrityError,
    IOStats,
    ParameterError,
    SampleError,
    SampleIdError,
    Selection,
)
from nearstore.checks import check_flag, check_integer, is_integer
from nearstore.selection import default_reselect
from nearstore.selection.plan import check_keep
from nearstore.selection.proxies import nested, unwrapped
from nearstore.selection.record import check_carry, in_sorted, sample_ids
from nearstore.serving.protocol import ALL_SAMPLES
from nearstore.storage.dataset import sample_identity
from nearstore.storage.images import ImageTransform, OnError, check_on_error, damaged
from nearstore.storage.ragged import RaggedBatch, RaggedLayout

Backend = Literal["auto", "dali", "torch"]
# What finds the sample DALI's decoder refused: PIL decoding it as small as it can.
PROBE = ImageTransform(size=8, train=False)
# A batch to read: ids, their weights, the round they are in, the seed of its augmentations.
Batch = tuple[np.ndarray, np.ndarray, int | str, tuple[int, ...]]
# A round as the loader iterates it: ids, weights, its number, what it carries to the next.
Chosen = tuple[np.ndarray, np.ndarray, int, dict[str, np.ndarray]]
# A state's version: 3 since its order records the ranks it was cut for (`spans`), which a release
# reading 2 would ignore, resuming another order; 2 still loads (its order one for every rank).
STATE_VERSION = 3
READS_VERSIONS = (2, 3)
log = logging.getLogger("nearstore")


def _after_fork() -> None:
    """In a child process forked from one whose loaders had started threads: those threads are
    not in the child, so a batch given to their pools waited forever; the child starts its own.
    A round the parent was selecting ahead is not in the child either: waiting for it raises."""
    for loader in list(_LOADERS):
        loader._pool = loader._decoders = loader._selecting = None
        if loader._ahead is not None and isinstance(loader._ahead[0], Future) and not loader._ahead[0].done():
            lost: Future[Selection] = Future()
            lost.set_exception(
                RuntimeError(
                    "the round asked ahead was being selected in the parent process when "
                    "this one forked; ask for it again here (reselect_ahead)"
                )
            )
            loader._ahead = (lost, loader._ahead[1])


_LOADERS: weakref.WeakSet[StreamingLoader] = weakref.WeakSet()  # this process's, for `_after_fork`
os.register_at_fork(after_in_child=_after_fork)


class StreamingLoader:
    """Iterate batches of the selected samples of a nearstore dataset, as torch tensors.

    Use it where a `torch.utils.data.DataLoader` was::

        loader = StreamingLoader("data/mnist1d.zarr", selection, batch_size=128)
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for x, y in loader:
                ...

    source: a dataset URL (local path, s3://, http://, any fsspec URL), an opened `Dataset`, a
        near-storage server, grpc://host:port/name (`nearstore serve`), a list of such URLs of
        servers that each serve some of one dataset's shards (`ServerGroup`), or any `Source`.
    selection: a `Selection` (checked against the dataset), a sequence of sample ids (integers,
        each once, in any order: an epoch visits them in its own order), or None for every sample
        (through a server: None for the server's current selection).
    batch_size, drop_last: as DataLoader's. Without drop_last the last batch may be smaller;
        every selected sample appears exactly once per epoch.
    shuffle, seed: the order each epoch visits the selection in, a function of (seed, epoch), so
        an epoch's batches are reproducible whatever ran before: "shards" (the default), the shards
        in a random order in blocks of about `shuffle_block` samples, each block shuffled (a batch
        reads from a few shards; a selection smaller than a block is one permutation); True or
        "global", one permutation of the whole selection; False, in order. `set_epoch` picks the
        epoch; otherwise each full pass over the loader advances it by one.
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
    paired_arrays: other sample arrays of each sample, yielded after x in this order (before y):
        several modalities of one sample, e.g. a signal and its caption's token ids, (x, tokens, y).
        Fixed-size ones as tensors, ragged ones as nested tensors (torch backend); the transforms,
        images and views apply to x alone. Encoded ones are not built (refused).
    images: how encoded images (an input array of JPEG, PNG, ... bytes) become x, float32
        (batch, 3, size, size): `ImageTransform()` by default for such an array (224 × 224, random
        crop and flip, ImageNet's normalization); `ImageTransform(train=False)` to evaluate.
        DALI decodes in its graph (nvJPEG on a CUDA device); the torch backend with PIL.
    on_error: what a damaged sample does: a stored one that fails its integrity checks (shard
        object missing, cut short, checksum wrong: IntegrityError) or an encoded one its decoder
        refuses (cut short, not an image: SampleError). "raise" the error, which names the sample
        ids, array and shard; or "skip" them, leaving the batch shorter, logged and listed (once)
        in io_stats()["skipped_samples"].
    num_threads: threads that decode images (DALI's, or PIL's in the torch backend).
    dali_transform: DataNode -> DataNode applied to x inside the DALI graph (on the GPU when
        the device is CUDA), after `images`. transform: applied to the x tensor of every batch.
    augment: the samples `transform` and `dali_transform` apply to (a `Selection`, checked against
        the dataset, or sample ids); every other sample's x passes untouched, so the transforms
        must keep x's shape and dtype. None: every sample. Augmentation then costs the subset only
        (Liu & Mirzasoleiman's augmentation-aware subsets, `AugmentAware`); training on and
        augmenting a subset alone is `selection=subset` with the transform. Not with `views` above
        1, ragged inputs or random-cropping `images` (they would augment every sample).
    views: for contrastive learning, batches hold that many views of x, each its own application
        of the random augmentations (`dali_transform`'s in the graph, else `transform`'s), in
        place of x: (x1, x2, y) for 2. Images are decoded once for all views (with
        `ImageTransform`'s crop, if train): crop per view in the transform.
    backend: "dali", "torch" (the same batches without DALI), or "auto": DALI (where installed) for
        encoded images or a `dali_transform`, else torch, the faster for fixed-size samples.
    device: where batches land; default CUDA when available, else CPU.
    prefetch: batches read ahead of the trainer in a background thread.
    cache: keep the samples read beside the trainer (`SampleCache`: 1 GiB of memory by default;
        a directory to spill to is the SampleCache's), so that within a selection round each is
        read once: a sample the cache lacks brings with it every sample of its shard this epoch
        visits (one planned read a shard, not one a batch), and later epochs read nothing.
        False: read each batch's samples every epoch.
    storage_options: for a URL, the options of its source: fsspec's for a store, FlightSource's
        (token, on_disconnect) for a server.
    """

    def __init__(
        self,
        source: str | Sequence[str] | Dataset | Source,
        selection: Selection | Sequence[int] | np.ndarray | None = None,
        *,
        batch_size: int = 64,
        shuffle: Shuffle = "shards",
        shuffle_block: int = SHUFFLE_BLOCK,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        uneven: Uneven = "pad",
        warm_start_epochs: int = 0,
        weights: bool = False,
        input_array: str | None = None,
        paired_arrays: Sequence[str] = (),
        images: ImageTransform | None = None,
        on_error: OnError = "raise",
        num_threads: int = 2,
        dali_transform: DaliTransform | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        augment: Selection | Sequence[int] | np.ndarray | None = None,
        views: int = 1,
        backend: Backend = "auto",
        device: torch.device | str | None = None,
        prefetch: int = 2,
        cache: bool | SampleCache = True,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        # Every argument checked before anything is opened or read: a wrong one fails here, by name.
        servers = isinstance(source, list | tuple) and all(isinstance(url, str) for url in source)
        if not (servers or isinstance(source, (str, os.PathLike, Dataset, Source))):
            raise ParameterError(
                f"source must be a URL, a list of server URLs, a Dataset or a Source, got {reprlib.repr(source)}"
            )
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise ParameterError(f"storage_options must be a mapping, got {reprlib.repr(storage_options)}")
        if images is not None and not isinstance(images, ImageTransform):
            raise ParameterError(f"images must be an ImageTransform, got {reprlib.repr(images)}")
        for name, function in (("dali_transform", dali_transform), ("transform", transform)):
            if function is not None and not callable(function):
                raise ParameterError(f"{name} must be a function, got {reprlib.repr(function)}")
        self.prefetch = check_integer("prefetch", prefetch, 1)
        self.views = check_integer("views", views, 1)
        if self.views > 1 and transform is None and dali_transform is None:
            raise ParameterError(f"views={views} needs a random transform (or dali_transform): else they are one x")
        self.num_threads = check_integer("num_threads", num_threads, 1)
        self.on_error, self.with_weights = check_on_error(on_error), check_flag("weights", weights)
        self.device = _device(device)
        if not isinstance(cache, (bool, SampleCache)):
            raise ParameterError(f"cache must be True, False or a SampleCache, got {reprlib.repr(cache)}")
        self.cache = SampleCache() if cache is True else cache or None
        self._own_cache = cache is True  # close() empties it: nobody else holds it
        if backend not in ("auto", "dali", "torch"):
            raise ParameterError(f"backend must be 'auto', 'dali' or 'torch', got {backend!r}")
        if backend == "dali" and not dali_available():
            raise RuntimeError("backend='dali' but DALI is not installed (pip install nvidia-dali-cuda130)")
        if dali_transform is not None and (backend == "torch" or not dali_available()):
            raise ParameterError("dali_transform needs the DALI backend; pass a torch `transform` instead")
        rank, world_size = _rank_and_world_size(rank, world_size)
        self.order = EpochOrder(
            batch_size, shuffle, shuffle_block, seed, drop_last, rank, world_size, uneven, warm_start_epochs
        )

        self.source = open_source(source, storage_options=storage_options)
        self._own_source = self.source is not source  # opened here (not a Source handed in): closed by close()
        self._last_storage = IOStats().as_dict()  # what a source says it read, before it is asked
        self.url, self.num_samples = self.source.url, self.source.num_samples
        self.input_array = input_array or next(
            (n for n in self.source.sample_arrays if n != self.source.label_array), None
        )
        if self.input_array not in self.source.sample_arrays:
            raise DatasetError(f"input_array {self.input_array!r} is not a sample array of {self.url!r}")
        self.paired_arrays = _paired(paired_arrays, self.input_array, self.source, self.url)
        labels = [self.source.label_array] if self.source.label_array else []
        self.arrays = [self.input_array, *self.paired_arrays, *labels]
        # each ragged array's layout, by its place in a batch
        self.ragged = {k: layout for k, name in enumerate(self.arrays) if (layout := _ragged(self.source, name))}
        described = self.source.identity["arrays"][self.input_array]
        where = f"array {self.input_array!r} of {self.url!r}"
        encoded = described["dtype"] == "object" and 0 not in self.ragged
        if images is not None and not encoded:
            kind = "ragged numeric" if 0 in self.ragged else "fixed-size"
            raise ParameterError(f"images= decodes encoded images, and {where} holds {kind} ones")
        self.images = images if images is not None or not encoded else ImageTransform()
        # "auto": DALI where it does work, decoding images or running a dali_transform in its graph;
        # fixed-size samples go straight to torch, faster on the CPU and on a GPU (docs/benchmarks.md)
        use_dali = dali_available() and (self.images is not None or dali_transform is not None)
        self.backend = backend if backend != "auto" else "dali" if use_dali else "torch"
        if self.ragged and self.backend == "dali":
            where = f"array {self.arrays[min(self.ragged)]!r} of {self.url!r}"
            raise ParameterError(
                f"{where} holds ragged samples, which the torch backend yields (as nested tensors); "
                "a DALI pipeline of them is not built: pass backend='torch' and a torch `transform`"
            )
        carried = "biufO" + ("c" if self.backend == "torch" else "")  # numbers a batch carries; O: encoded
        for name in self.arrays:  # DALI's "stoi" and torch's conversion named no array
            dtype = np.dtype(self.source.identity["arrays"][name]["dtype"])
            if dtype.kind not in carried:
                hint = "; the torch backend carries complex ones" if dtype.kind == "c" else ""
                raise ParameterError(
                    f"array {name!r} of {self.url!r} holds {dtype} samples, which the {self.backend} backend cannot "
                    f"carry in a batch (booleans, integers, floats{hint})"
                )
        self.skipped: set[int] = set()  # damaged samples left out (on_error="skip"), over all epochs
        self._refused: set[int] = set()  # of them, those DALI's decoder refused (no check finds them)
        if self.cache is not None:
            if self.cache.spill_directory is not None and isinstance(self.source, StoreSource):
                self.source.dataset.check_outside(self.cache.spill_directory, "the sample cache's directory")
            self.cache.bind(self.source.identity, self.arrays, owner=self)
        self._sample_bytes = _sample_nbytes(self.source, self.arrays)
        self._visiting = np.empty(0, dtype=np.int64)  # this rank's samples of the epoch, sorted
        self.scan_io = {"bytes": 0, "requests": 0}
        # A round selected while an epoch is iterated, which the next epoch iterates; one selected
        # ahead (`reselect_ahead`), running or done, and the epochs completed when it was asked
        # for (it is iterated once one more is: whatever `set_epoch` numbers them); and
        # whether an epoch is being iterated, by which iterator (a newer one over this loader
        # replaces it: the two would share one place).
        self._pending: Chosen | None = None
        self._ahead: tuple[Future[Selection] | Chosen, int] | None = None
        # the keep each round in play was asked for, by its number: the default of the next round's
        # (a class's floor of one sample makes a round's share more than it asked for, and asking
        # that share again grew the subset round after round: 5% to 35% in five)
        self._asked: dict[int | str, float] = {}
        self._selecting: ThreadPoolExecutor | None = None
        self._in_epoch, self._iterator = False, 0
        self._unended: Callable[[], None] | None = None  # ends an epoch whose last batch was delivered
        if selection is None:
            self._use(self.source.selection())
        else:
            self._use(selection, round=self._served_round(selection))
        self.augment = self._augment_ids(augment, transform is not None or dali_transform is not None)
        self.augmented_samples = 0  # samples (views) the transforms were applied to, over all epochs

        self.dali_transform, self.transform = dali_transform, transform
        self._epochs: list[dict[str, Any]] = []
        self._io_before = IOStats()  # what the processes before a loaded state received (their totals)
        self._pool: ThreadPoolExecutor | None = None
        self._decoders: ThreadPoolExecutor | None = None
        self._closed = False
        _LOADERS.add(self)
        # The encoded batches last handed to DALI, (ids, bytes): where to look for the sample its
        # decoder refused (its error names none). DALI holds a few batches ahead of its outputs.
        self._handed: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=prefetch + 4)

    # Where the loader is: its order's place.
    @property
    def epoch(self) -> int:
        return self.order.epoch

    @property
    def epochs_completed(self) -> int:
        return self.order.epochs_completed

    @property
    def batches_done(self) -> int:
        """Batches of the epoch being iterated that the trainer holds."""
        return self.order.batches_done

    @property
    def batch_roles(self) -> tuple[str, ...]:
        """What each element of a batch is, in order: "x" (one a view), "paired" (one a paired
        array), "y" (the labels, where the source has them), "weights" (with weights=True)."""
        labels = ("y",) if self.source.label_array else ()
        return ("x",) * self.views + ("paired",) * len(self.paired_arrays) + labels + ("weights",) * self.with_weights

    # What code written for a DataLoader asks of one.
    @property
    def dataset(self) -> Source:
        """The `Source` the samples are read from, as DataLoader's `dataset` is what it draws them
        from: every kind of source has one (a server has no `Dataset` here); its len (`num_samples`)
        is the dataset's size, of which an epoch visits the selection (`len(loader.ids)`)."""
        return self.source

    @property
    def batch_size(self) -> int:
        """Samples a batch (the last one fewer, without drop_last)."""
        return self.order.batch_size

    @property
    def drop_last(self) -> bool:
        """Whether an epoch's last batch, short of batch_size, is left out."""
        return self.order.drop_last

    @property
    def num_workers(self) -> int:
        """0, as DataLoader's without worker processes: batches are read in a thread of this process
        (`prefetch` ahead) and images decoded in `num_threads` more."""
        return 0

    @property
    def stats(self) -> IOStats:
        """What this loader received from its source (bytes, requests, samples)."""
        return self.source.stats

    @property
    def epoch_batches(self) -> int:
        """Batches in this rank's share of the current epoch, all of them (those a loaded state
        already delivered too: what `batches_done` counts up to)."""
        return self.order.num_batches(self.epoch, self._epoch_size(self.epoch))

    def __len__(self) -> int:
        """Batches the next iteration yields: this rank's share of the current epoch, less those a
        loaded state already delivered (a progress bar or a scheduler over a resumed epoch counts
        what is left of it); while an epoch is iterated, its own; after a break, of a round
        selected meanwhile, which the next iteration takes."""
        if self._mid_epoch():  # the epoch iterated, the loaded place: their round
            return self.epoch_batches - self.order.resumes_at(self.epoch)
        epoch, completed = self.epoch, self.epochs_completed
        if self._unended is not None:  # the next iteration ends the one delivered first
            epoch, completed = epoch + 1, completed + 1
        return self.order.num_batches(epoch, self._epoch_size(epoch, self._due_ids(completed)))

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows (as DistributedSampler's).
        Setting the epoch a resumed state is in keeps its place; another epoch starts afresh."""
        self._end_delivered()
        self.order.set_epoch(epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions into the epoch's samples (the selection, or all of them while warming up), in
        the order epoch `epoch` visits them on this rank."""
        epoch = check_integer("epoch", epoch, 0)
        return self.order.positions(epoch, self._epoch_ids(epoch)[0] // self.source.shard_samples)

    def update_proxy(self, model: torch.nn.Module, head: str | None = None) -> None:
        """Score the next selection round with the trainer's model (NeSSA's feedback): its
        weights are pushed to the server, or copied for a round in this process. Encoded images
        are decoded for it as this loader shows them at evaluation: `images` with train=False
        (its size, centre crop and normalization, in place of a random crop and flip).
        head: the name of its classifier, an nn.Linear (`dict(model.named_modules())`'s key, e.g.
        "classifier"), where the last one it runs is not (a second head, a projection after it)."""
        if not isinstance(model, torch.nn.Module):
            raise ParameterError(f"update_proxy takes the trainer's torch.nn.Module, got {reprlib.repr(model)}")
        # DDP's, DataParallel's or torch.compile's: a server's model has no "module." in its keys,
        # and `head` may name the layer in the wrapper's terms or the model's
        inner = unwrapped(model)
        layer = None
        if head is not None:
            layer = dict(model.named_modules()).get(head) or dict(inner.named_modules()).get(head)
            if not isinstance(layer, torch.nn.Linear):
                raise ParameterError(f"head must name an nn.Linear of {type(model).__name__}, got {head!r}")
            head = next(n for n, m in inner.named_modules() if m is layer)
        model = inner
        if self._ahead is not None and isinstance(self._ahead[0], Future):
            wait([self._ahead[0]])  # the round selected ahead scores with the proxy it was promised
        self.source.update_proxy(model, replace(self.images, train=False) if self.images is not None else None, head)

    def set_augment(self, augment: Selection | Sequence[int] | np.ndarray) -> None:
        """Augment these samples in place of the ones `augment=` named, from the next batch read on
        (those read ahead, up to `prefetch` and DALI's queue, keep the old set): a new round's
        subset, e.g. `AugmentAware().select(dataset, 0.3, proxy=ModelProxy(model))`. Checked as `augment=` is;
        the loader must have been made with one (its batches then carry which samples to augment)."""
        if self.augment is None:
            raise ParameterError("set_augment needs a loader made with augment=: its batches carry no flags")
        self.augment = self._augment_ids(augment, True)

    def reselect(
        self,
        keep: float | None = None,
        *,
        method: str | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> Selection:
        """Run a new selection round with the latest proxy (`update_proxy`), on the server or here
        beside the store; the next epoch iterates it (one being iterated finishes its own round,
        and a state taken meanwhile resumes both). Its scan I/O joins `io_stats()`.

        method, options: a selector of `nearstore.selection.selectors` and its parameters; by
            default `default_reselect(keep)`, GRAFT on a fresh pool of twice the budget per class
            (1.5x above a third of the data). Every selector is given the current selection as
            `previous`, and what it handed on (`Selection.carry`, kept in `state_dict`: AdaCore's
            running curvature, round 0's suspects that GRAFT's later rounds recheck).
        keep: default what the latest round was asked for (plain ids: their share); seed: default
            the round number.
        """
        self._end_delivered()
        selection = self.source.select(**self._next_round(keep, method, seed, options))
        self._ahead = None  # a round selected ahead and not iterated yet is this one's previous
        mid_epoch = self._mid_epoch()
        self._use(selection, later=mid_epoch)
        if not mid_epoch:
            self.order.forget_place()  # a new round never resumes a place in the old one
        return selection

    def reselect_ahead(
        self,
        keep: float | None = None,
        *,
        method: str | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> Future[Selection]:
        """`reselect` in a background thread, so training goes on while the round runs: the epoch
        being iterated (between epochs, the next one) keeps the current selection, and the epoch
        after it iterates the new round, waiting for it, if need be, as the epoch before ends
        (epochs counted as completed, however `set_epoch` numbers them): the same epoch however
        long the round takes, so a run repeats. The round scores with the
        proxy of the last `update_proxy` (a later one waits for the round). Where the round runs
        beside the data (a server, a Dask cluster), what training pays for it is that wait and
        the CPU the two share. Returns the round's future; its error is raised where it is
        iterated (or by `state_dict`, which waits for it), and the current selection stays.
        """
        self._end_delivered()  # counted before the round's epoch is
        round = self._next_round(keep, method, seed, options)  # checked here, in the caller's thread
        if self._selecting is None:
            self._selecting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nearstore-select")
        future = self._selecting.submit(self.source.select, **round)
        self._ahead = (future, self.epochs_completed)
        return future

    def close(self) -> None:
        """Let go now of what the loader holds: its threads (after the batch being read, where an
        epoch was left half-way), its connection to a server (one it opened), and its SampleCache:
        one it made is emptied, one handed to it another loader may then take (`del loader` does
        the same once nothing refers to it, which a read in flight still does). A closed loader
        iterates no more."""
        if self._closed:
            return
        self._closed = True
        for pool in (self._pool, self._decoders, self._selecting):
            if pool is not None:  # a round being selected ahead is not waited for
                pool.shutdown(wait=pool is not self._selecting, cancel_futures=True)
        self._pool = self._decoders = self._selecting = None
        if self.cache is not None:
            self.cache.unbind(self)
            if self._own_cache:
                self.cache.release()
        if self._own_source:
            self.source.close()

    def _storage_reads(self) -> dict[str, int]:
        """What the storage side read for samples (`Source.storage_reads`); once the loader closed
        a server connection it opened, what the server said last (at an epoch's start or end)."""
        if not (self._closed and self._own_source and not isinstance(self.source, StoreSource)):
            self._last_storage = self.source.storage_reads()
        return self._last_storage

    def __enter__(self) -> StreamingLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise TypeError(
            "a StreamingLoader cannot be pickled or sent to another process: make one in each process (rank= "
            "and world_size= for ranks); it needs no DataLoader workers (it reads and decodes in threads)"
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self._closed:
            raise RuntimeError(f"this StreamingLoader of {self.url!r} was closed: make another")
        self._end_delivered()
        started, before = time.perf_counter(), self.stats.snapshot()
        storage_before = self._storage_reads()
        hits_before = self.cache.stats.hits if self.cache is not None else 0
        epoch = self.epoch
        if not self.order.resuming(epoch):  # not resuming the old round
            self._take_due()
        ids, weights, round = self._epoch_ids(epoch)
        self._check_ranks_agree(round, ids, weights)  # the round this epoch iterates, a due one taken
        first = self.order.start()  # > 0 right after load_state_dict mid-epoch
        self._iterator += 1
        self._in_epoch, iterator = True, self._iterator
        shards = ids // self.source.shard_samples
        positions = self.order.positions(epoch, shards)
        self.source.expect(ids[positions], self.arrays)  # its labels read ahead, a few shards a request
        if self.cache is not None:  # ids are sorted and each once: a mask sorts them (np.unique took 5 s at 1M)
            visiting = np.zeros(len(ids), dtype=bool)
            visiting[positions] = True
            self._visiting = ids[visiting]
            self.cache.retain(self._visiting)
        seed = (self.order.seed, epoch)

        def batches_from(first: int) -> Iterator[tuple[np.ndarray, ...]]:
            """The epoch's batches from batch `first` on, read ahead."""
            batches = self.order.batches(epoch, shards, first, positions=positions)
            return self._prefetched((ids[p], weights[p], round, (*seed, first + k)) for k, p in enumerate(batches))

        if self.backend == "dali":
            # DALI sizes its pipeline by the largest batch: never past the epoch's samples
            tensors = self._through_dali(batches_from, first, seed, min(self.order.batch_size, max(1, len(ids))))
        else:
            tensors = (tuple(_tensor(a, self.device) for a in batch) for batch in batches_from(first))
        transformed = self.transform is not None or self.dali_transform is not None
        augmented_before = self.augmented_samples
        total, ended = self.order.num_batches(epoch, len(ids)), False

        def end() -> None:
            """The epoch delivered its last batch: counted, and a round due is taken. When the loop
            asks for a batch past it, or, where it stopped at len(loader) batches (zip, islice,
            steps an epoch), when the next iteration starts: such an epoch ended all the same."""
            nonlocal ended
            ended, self._unended = True, None
            read = self.stats.snapshot() - before
            storage = self._storage_reads()
            self._epochs.append(
                {
                    "epoch": epoch,
                    **read.as_dict(),
                    "seconds": time.perf_counter() - started,
                    # the source's counts go on across a server's restart (`FlightSource.storage_reads`)
                    "storage": {k: storage[k] - storage_before[k] for k in ("bytes", "requests")},
                    "cache_hits": self.cache.stats.hits - hits_before if self.cache is not None else 0,
                    "augmented_samples": self.augmented_samples - augmented_before,
                    "full_bytes": self._share_bytes(),
                }
            )
            log.info(
                "epoch %d: %d samples, %.2f MB in %d requests from %s (full data: %.2f MB), %.1f s",
                epoch,
                read.samples,
                read.bytes / 1e6,
                read.requests,
                self.url,
                self._full_bytes() / 1e6,
                self._epochs[-1]["seconds"],
            )
            self._in_epoch = False
            if self.order.epoch == epoch and self.order.batches_done == total:
                self.order.finish()
            else:  # the trainer chose the next epoch (set_epoch) before this one was seen to end
                self.order.epochs_completed += 1
            self._take_due()

        try:
            for batch in tensors:
                if iterator != self._iterator:
                    raise RuntimeError(
                        f"a newer iterator over this loader ({self.url!r}) took its place in epoch {epoch}: "
                        "iterate one at a time (the place they share is what state_dict saves)"
                    )
                if not batch or not len(batch[0]):  # its every sample skipped as damaged (on_error="skip")
                    if self.order.world_size > 1:
                        raise IntegrityError(
                            f"batch {self.order.batches_done} of epoch {epoch} on rank {self.order.rank} of "
                            f"{self.url!r} held only damaged samples: left out, this rank would take one step "
                            "fewer than the others (an empty batch's mean loss is NaN); `nearstore verify` names "
                            "the damaged shards: repair them, or select without their samples"
                        )
                    self.order.batches_done += 1
                    continue
                if self.augment is not None:
                    *batch, flags = batch
                    if self.transform is not None:
                        batch[0] = _on_flagged(self.transform, batch[0], flags)
                    self.augmented_samples += int(flags.sum())
                else:
                    views = self.views if self.dali_transform is not None else 1  # made in the graph: one each
                    if self.transform is not None:
                        inputs = batch[:views] if views == self.views else [batch[0]] * self.views
                        batch = (*(self.transform(x) for x in inputs), *batch[views:])
                    self.augmented_samples += len(batch[0]) * self.views if transformed else 0
                # counted as delivered once the trainer holds it: not where a transform raised
                self.order.batches_done += 1
                if self.order.batches_done == total:  # the last: its epoch ends when the loop moves on
                    self._unended = end
                yield tuple(batch)
        finally:  # ended, or left (a break): a round selected from now on is taken at once
            if iterator == self._iterator:
                self._in_epoch = False
                if not ended and self._unended is None:
                    self.order.left()
        if iterator == self._iterator and not ended:  # its last batches all skipped as damaged
            end()

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is, as a StatefulDataLoader's: its order's place (the epoch, the
        batches of it already delivered), the selection round being iterated and the samples
        augmented (`set_augment`'s, or augment='s). A loader over
        the same data, built with the same batch_size, shuffle and seed, resumes from it with
        `load_state_dict`, on any number of ranks (docs/loader.md, Resume)."""
        self._end_delivered()  # a state taken after an epoch's last batch is the next epoch's
        ahead = None
        if self._ahead is not None:
            ahead = {**_round_state(self._ahead_chosen()), "completed": self._ahead[1]}
        return _checkpointable(
            {
                "version": STATE_VERSION,
                "dataset": self.source.identity,
                # the shard size fixes a shuffle="shards" order: resumed only over shards of the same size
                "order": {**self.order.state_dict(), "shard_samples": self.source.shard_samples},
                "selection": {
                    "round": self.round,
                    "ids": self.ids,
                    "weights": self.sample_weights,
                    "scan_io": self.scan_io,
                    "carry": self.carry,
                },
                # a round selected during the epoch being iterated, which the next epoch iterates
                "next": None if self._pending is None else _round_state(self._pending),
                # a round selected ahead, iterated once more epochs than "completed" are completed
                "ahead": ahead,
                # the keep the rounds in play were asked for (`_asked`), by round number
                "keeps": {str(r): k for r, k in self._asked.items() if r in self._rounds_in_play()},
                # the samples the transforms apply to (`augment=`, `set_augment`); None: every sample
                "augment": self.augment,
                # what this rank received before, so that io_stats() counts the whole run
                "io": {
                    **self._received().as_dict(),
                    "augmented_samples": self.augmented_samples,
                    "per_epoch": self._epochs,
                },
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume where `state_dict()` was taken: the next iteration delivers exactly the batches
        of that epoch not delivered yet, in the same order, then carries on epoch by epoch.

        A state that does not fit this loader, or is no loader's state (a key missing, a value of
        another type, ids repeated, unsorted or out of range), is refused by name (a DatasetError;
        a SampleIdError for its ids) before anything is taken from it: a refused state changes nothing.
        """
        self._checked_state(state)()

    def _checked_state(self, state: Mapping[str, Any]) -> Callable[[], None]:
        """`state` checked as `load_state_dict` checks it; what loads it, which cannot fail (a
        mixture checks all its loaders' states before it loads any)."""
        if not isinstance(state, Mapping):
            raise DatasetError(f"state_dict must be a mapping (what state_dict() returns), got {type(state).__name__}")
        if state.get("version") not in READS_VERSIONS:
            raise DatasetError(f"state_dict version {state.get('version')!r} is not one of {READS_VERSIONS}")
        dataset, order, chosen = (
            state_entry(state, key, "state_dict", Mapping) for key in ("dataset", "order", "selection")
        )
        ours, theirs = sample_identity(self.source.identity), sample_identity(dataset)
        if ours != theirs:  # the same URL too, where the store was written anew: name what differs
            raise DatasetError(
                f"state_dict is from dataset {dataset.get('url')!r} ({theirs}), not {self.url!r} ({ours})"
            )
        where = "state_dict's selection"
        round = state_count(chosen, "round", where)
        ids, weights = _selected(
            self.num_samples, where, state_entry(chosen, "ids", where), state_entry(chosen, "weights", where)
        )
        scan_io = state_entry(chosen, "scan_io", where, Mapping)
        scan_io = {key: state_count(scan_io, key, f"{where}'s scan_io") for key in ("bytes", "requests")}
        carry = check_carry(chosen.get("carry", {}), where)  # states written before carries hold none
        pending = self._state_pending(state.get("next"))  # states written before it hold none
        ahead = self._state_ahead(state.get("ahead"))
        augment = self._state_augment(state.get("augment"))
        received, augmented, epochs = _state_io(state.get("io"))  # states written before it hold none
        asked = _state_keeps(state.get("keeps", {}))  # states written before it hold none
        self.order.check(order, lambda epoch: self._epoch_size(epoch, ids))
        if ahead is not None and ahead[1] > state_count(order, "epochs_completed", "state_dict's order"):
            raise DatasetError(
                f"state_dict's round selected ahead was asked for after {ahead[1]} epochs, of "
                f"{order['epochs_completed']} completed"
            )
        shard_samples = order.get("shard_samples", self.source.shard_samples)
        if self.order.shuffle == "shards" and shard_samples != self.source.shard_samples:
            raise DatasetError(
                f"state_dict was taken over shards of {shard_samples!r} samples; {self.url!r} has shards of "
                f"{self.source.shard_samples}, and shuffle='shards' visits them in another order"
            )
        # a server's: raises where it no longer holds that round; one of that number holding other
        # samples is another round (a server restarted without its state numbers them afresh)
        held = self.source.selection(round)
        if held is not None and not in_sorted(ids, held.ids).all():
            raise DatasetError(
                f"state_dict's selection round {round} is not the round {round} {self.url!r} holds now (another "
                "of that number: the server was restarted without its --state-dir?)"
            )

        def load() -> None:
            self.ids, self.sample_weights, self.round, self.scan_io, self.carry = ids, weights, round, scan_io, carry
            self.augment, self._pending, self._ahead, self._in_epoch = augment, pending, ahead, False
            self._io_before, self.augmented_samples = received - self.stats.snapshot(), augmented
            self._epochs, self._asked = epochs, asked
            self._unended = None  # the loaded place is the one to go on from
            self.order.load_state_dict(order)

        return load

    def io_stats(self) -> dict[str, Any]:
        """What crossed the boundary: for the trainer (in total and per completed epoch), for
        the scans that made the selections, what the storage side read for samples (this
        trainer's reads, or a server's for all its trainers; per epoch `storage`), and what
        reading all data every epoch would cost.

        io_saving = 1 − (scan + trainer bytes) / (full-data bytes × epochs completed), all of this
        rank's: its share of the full data (1/world_size of it), its reads and the scans it counted;
        with the epochs and reads before a loaded state.
        """
        stats = self._received()
        full = sum(epoch["full_bytes"] for epoch in self._epochs) or self._share_bytes()
        cache = self.cache.as_dict() if self.cache is not None else None
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
            "skipped_samples": sorted(self.skipped),
            "augmented_samples": self.augmented_samples,
            "io_saving": 1 - (stats.bytes + self.scan_io.get("bytes", 0)) / full if full else 0.0,
            "storage_reads": self._storage_reads(),
            "cache": cache,
        }

    def _end_delivered(self) -> None:
        """End the epoch whose last batch was delivered, where the loop stopped at it (len(loader)
        steps) without asking past it: before anything that counts epochs or changes rounds."""
        if self._unended is not None:
            self._unended()

    def _mid_epoch(self) -> bool:
        """Whether an epoch is under way: iterated, or a loaded state's place in it, which the next
        iteration resumes (a round selected now waits for it to end)."""
        return self._in_epoch or self.order.resuming(self.epoch)

    def _ahead_due(self, completed: int) -> bool:
        """Whether the round selected ahead is iterated once `completed` epochs are."""
        return self._ahead is not None and completed > self._ahead[1]

    def _due_ids(self, completed: int) -> np.ndarray | None:
        """The ids the next epoch iterates once `completed` epochs are: a round selected ahead and
        due by then (waited for; one that failed raises at that iteration), else one selected
        during the last epoch; None: the current selection."""
        if self._ahead_due(completed):
            held = self._ahead[0]
            if not isinstance(held, Future):
                return held[0]
            if held.exception() is None:
                return held.result().ids
        return self._pending[0] if self._pending is not None else None

    def _use(
        self, selection: Selection | Sequence[int] | np.ndarray | None, later: bool = False, round: int = 0
    ) -> None:
        """Iterate `selection` from the next epoch on (`later`: once the epoch being iterated
        ends); its scan's I/O joins scan_io. Plain ids (or None: every sample) are of `round`."""
        if isinstance(selection, Selection):
            self._pending = self._accepted(selection)
        else:
            ids = np.arange(self.num_samples) if selection is None else selection
            self._pending = (*_selected(self.num_samples, repr(self.url), ids), round, {})
        if not later:
            self._take_pending()

    def _served_round(self, selection: Selection | Sequence[int] | np.ndarray) -> int:
        """The round `selection` is of: its own, or for plain ids a server's current round (0 from
        a store, which holds none). Ids a server does not hold in that round are refused now, by
        name: it would refuse them at the first batch (it ships its rounds' samples only)."""
        if isinstance(selection, Selection):
            round, held = selection.round, self.source.selection(selection.round)
        else:  # a subset of what the server serves now: a server started on a saved round 3 holds no 0
            held = self.source.selection()  # None: a store, which reads any sample
            round = 0 if held is None else held.round
        if held is None:
            return round
        ids = selection.ids if isinstance(selection, Selection) else np.asarray(selection)
        missing = np.setdiff1d(ids, held.ids)
        if len(missing):
            raise ParameterError(
                f"{self.url!r} ships the samples of its own rounds: {len(missing)} of the {len(ids)} ids given "
                f"(sample {int(missing[0])} first) are not in its round {round}; give no selection (its current "
                "round), or one it selected"
            )
        return round

    def _accepted(self, selection: Selection) -> Chosen:
        """A round of this dataset, as the loader iterates it; its scan's I/O joins scan_io."""
        selection.check_dataset(self.source.identity)
        self.scan_io = {k: self.scan_io[k] + selection.io.get(k, 0) for k in self.scan_io}
        keep = selection.params.get("keep")
        if _a_keep(keep):
            self._asked[selection.round] = float(keep)
        return selection.ids, selection.weights, selection.round, selection.carry

    def _take_pending(self) -> None:
        """Iterate the round selected during the last epoch from now on."""
        self.ids, self.sample_weights, self.round, self.carry = self._pending
        self._pending = None

    def _take_due(self) -> None:
        """Iterate from now on the round selected during the last epoch, then the one selected
        ahead if an epoch was completed since it was asked for (waiting for it)."""
        if self._pending is not None:
            self._take_pending()
        if self._ahead_due(self.epochs_completed):
            self.ids, self.sample_weights, self.round, self.carry = self._ahead_chosen()
            self._ahead = None

    def _next_round(self, keep: float | None, method: str | None, seed: int | None, options: dict) -> dict[str, Any]:
        """`Source.select`'s arguments for the round after the latest (one selected ahead, waited
        for; else one pending; else the current), checked: keep, by default what the latest was
        asked for (where it was a Selection; else its share);
        seed, by default the round's number; method, by default `default_reselect(keep)`."""
        if self._ahead is not None:
            latest = self._ahead_chosen()
        else:
            latest = self._pending or (self.ids, self.sample_weights, self.round, self.carry)
        ids, _, round, carry = latest
        keep = keep if keep is not None else self._asked.get(round, len(ids) / self.num_samples)
        check_keep(keep)
        seed = check_integer("seed", seed if seed is not None else round + 1, 0)
        if method is None:
            method, defaults = default_reselect(keep)
            options = {**defaults, **options}
        request = None
        if self._checks_ranks():  # the same id from every rank of the job: a server runs their round once
            previous = hashlib.sha256(ids.tobytes()).hexdigest()
            asked = json.dumps([round, previous, keep, method, options, seed], default=str)
            request = "ranks-" + hashlib.sha256(asked.encode()).hexdigest()[:32]
        return {
            "previous": ids,
            "round": round,
            "keep": keep,
            "method": method,
            "options": options,
            "seed": seed,
            "carried": carry,
            "request": request,
        }

    def _ahead_chosen(self) -> Chosen:
        """The round selected ahead, waited for (once done, its scan's I/O joins scan_io); a round
        that failed is dropped, its error raised."""
        held, after = self._ahead
        if isinstance(held, Future):
            try:
                held = self._accepted(held.result())
            except BaseException:
                self._ahead = None
                raise
            self._ahead = (held, after)
        return held

    def _rounds_in_play(self) -> set[int | str]:
        """The numbers of the current round, the pending one and the one selected ahead (done)."""
        rounds = {self.round} | ({self._pending[2]} if self._pending is not None else set())
        if self._ahead is not None and not isinstance(self._ahead[0], Future):
            rounds.add(self._ahead[0][2])
        return rounds

    def _state_pending(self, pending: Any, where: str = "state_dict's next round") -> Chosen | None:
        """A state's round to iterate after the one it resumes (None: none), checked as its selection is."""
        if pending is None:
            return None
        if not isinstance(pending, Mapping):
            raise DatasetError(f"{where} must be a mapping, got {reprlib.repr(pending)}")
        ids, weights = _selected(
            self.num_samples, where, state_entry(pending, "ids", where), state_entry(pending, "weights", where)
        )
        return ids, weights, state_count(pending, "round", where), check_carry(pending.get("carry", {}), where)

    def _state_ahead(self, ahead: Any) -> tuple[Chosen, int] | None:
        """A state's round selected ahead and the epochs completed when it was asked for (None: none)."""
        where = "state_dict's round selected ahead"
        chosen = self._state_pending(ahead, where)
        return None if chosen is None else (chosen, state_count(ahead, "completed", where))

    def _checks_ranks(self) -> bool:
        """Whether this loader is one of several ranks of torch.distributed's default group."""
        if self.order.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return False
        return (self.order.rank, self.order.world_size) == (dist.get_rank(), dist.get_world_size())

    def _check_ranks_agree(self, round: int | str, ids: np.ndarray, weights: np.ndarray) -> None:
        """Under torch.distributed, refuse to start an epoch whose ranks iterate different rounds
        (`round`, `ids`, `weights`): their shares would overlap and miss samples, or weigh them
        otherwise. Only where this loader's
        ranks are the default group's: a loader of some ranks (rank= and world_size= of a group
        of their own) cannot ask the others, which would wait for them."""
        if not self._checks_ranks():
            return
        mine = (round, hashlib.sha256(ids.tobytes() + weights.tobytes()).hexdigest()[:16], len(ids))
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for rank, theirs in enumerate(everyone):
            if theirs != mine:
                raise DatasetError(
                    f"rank {self.order.rank} iterates selection round {mine[0]} ({mine[2]} samples, digest "
                    f"{mine[1]}) but rank {rank} has round {theirs[0]} ({theirs[2]} samples, digest {theirs[1]})"
                )

    def _augment_ids(
        self, augment: Selection | Sequence[int] | np.ndarray | None, transformed: bool
    ) -> np.ndarray | None:
        """The sorted ids of `augment`, checked as a selection's; None for None. Refused where the
        transforms cannot apply to some samples alone."""
        if augment is None:
            return None
        if not transformed:
            raise ParameterError("augment= names the samples `transform` or `dali_transform` applies to; got neither")
        if self.views > 1:
            raise ParameterError(
                f"augment= with views={self.views}: each view is the transform of x, so every sample is augmented"
            )
        if 0 in self.ragged:
            raise ParameterError(
                f"augment= with the ragged samples of array {self.input_array!r} of {self.url!r} is not built: "
                "transform every sample, or none"
            )
        if self.images is not None and self.images.train:
            raise ParameterError(
                "augment= augments only its samples, but images=ImageTransform(train=True) crops and flips every "
                "sample: decode with ImageTransform(train=False) and crop in `transform` or `dali_transform`"
            )
        if isinstance(augment, Selection):
            augment.check_dataset(self.source.identity)
            return augment.ids
        return _selected(self.num_samples, f"augment of {self.url!r}", augment, what="augmented sample id")[0]

    def _state_augment(self, augment: Any) -> np.ndarray | None:
        """The augmented ids a state holds, checked; the loader's own where the state holds none
        (written by a loader without `augment=`, or before states kept them)."""
        if augment is None:
            return self.augment
        if self.augment is None:
            raise ParameterError(
                "state_dict augments a subset (its loader was made with augment=), this loader every sample: "
                "make it with augment= to resume"
            )
        return _selected(self.num_samples, "state_dict's augment", augment, what="augmented sample id")[0]

    def _epoch_size(self, epoch: int, ids: np.ndarray | None = None) -> int:
        """How many samples epoch `epoch` visits: all while warming up, else the selection (`ids`:
        another one than the loader's, as a state's)."""
        return self.num_samples if self.order.warming(epoch) else len(self.ids if ids is None else ids)

    def _epoch_ids(self, epoch: int) -> tuple[np.ndarray, np.ndarray, int | str]:
        """The samples epoch `epoch` visits, their weights, and the round they are in."""
        if self.order.warming(epoch):
            return np.arange(self.num_samples), np.ones(self.num_samples, dtype=np.float32), ALL_SAMPLES
        return self.ids, self.sample_weights, self.round

    def _full_bytes(self) -> int:
        return self.source.stored_bytes(self.arrays)

    def _share_bytes(self) -> int:
        """This rank's share of reading every sample once: what an epoch over all data reads here."""
        n = self.num_samples
        return round(self._full_bytes() * share_size(n, self.order.world_size, self.order.uneven) / max(1, n))

    def _received(self) -> IOStats:
        """What this rank received over the run: in this process, and before a loaded state."""
        return self.stats.snapshot() + self._io_before

    def _prefetched(self, batches: Iterable[Batch]) -> Iterator[tuple[np.ndarray, ...]]:
        """Read batches in a background thread, `prefetch` ahead, yielding them in order; in this
        thread when the cache holds the epoch's fixed-size samples in memory (a batch is then one
        gather, which costs less than handing it over between threads)."""
        if self.images is None and self.cache is not None and self.cache.in_memory(self._visiting):
            if self._pool is not None:  # the cache is not thread-safe: the reader finishes an abandoned epoch's batch
                self._pool.submit(lambda: None).result()
            for batch in batches:
                self._check_open()
                yield self._read_batch(*batch)
            return
        if self._pool is None:
            # One reader thread for the loader's life: an epoch abandoned half-way may be
            # finalized in any thread, where starting or joining threads can deadlock.
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nearstore-read")
        batches = iter(batches)
        pending = deque(self._pool.submit(self._read_batch, *b) for b in _take(batches, self.prefetch))
        try:
            while pending:
                self._check_open()  # its pool shut, the batches read ahead cancelled
                batch = pending.popleft().result()
                pending.extend(self._pool.submit(self._read_batch, *b) for b in _take(batches, 1))
                yield batch
        finally:
            for future in pending:
                future.cancel()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this StreamingLoader of {self.url!r} was closed mid-epoch")

    def _read_batch(
        self, ids: np.ndarray, weights: np.ndarray, round: int | str, seed: tuple[int, ...]
    ) -> tuple[np.ndarray | RaggedBatch, ...]:
        ids, weights, arrays = self._read(ids, weights, round)
        if self.source.label_array:
            ids, weights, arrays = self._class_ids(ids, weights, arrays)
        if self.images is not None:
            ids, arrays, weights = self._decoded(ids, arrays, weights, seed)
        batch: list[np.ndarray | RaggedBatch] = [arrays[name] for name in self.arrays]
        for k, layout in self.ragged.items():
            batch[k] = layout.pack(batch[k], ids)
        if self.with_weights:
            batch.append(weights)
        if self.augment is not None:  # last: which samples the transforms apply to, taken off before the trainer
            batch.append(in_sorted(ids, self.augment))
        return tuple(batch)

    def _read(
        self, ids: np.ndarray, weights: np.ndarray, round: int | str
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The batch's arrays, from the cache where it holds them; with on_error="skip", without
        the samples an IntegrityError names."""
        if self.cache is None:
            read, arrays = self._fetch(ids, round)
            return ids[read], weights[read], arrays
        try:
            return self._read_through_cache(ids, weights, round)
        except CacheLost:  # its disk tier failed: dropped, so the samples it held are read again
            return self._read_through_cache(ids, weights, round)

    def _read_through_cache(
        self, ids: np.ndarray, weights: np.ndarray, round: int | str
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        kept = self.cache.holds(ids)
        self.cache.stats.misses += int(np.count_nonzero(~kept))
        if kept.all():
            return ids, weights, self.cache.get(ids)
        missing = np.unique(ids[~kept])
        before = self.stats.snapshot().bytes
        try:  # the shard mates too: a read a shard (bytes and requests planned together), once a round
            fetched = self._with_shard_mates(missing)
            _, arrays = self._fetch(fetched, round, skip=False)
        except IntegrityError:  # damage near: read only the batch's, so the error or skip is exactly theirs
            read, arrays = self._fetch(missing, round)
            fetched = missing[read]
        self.cache.put(fetched, arrays, (self.stats.snapshot().bytes - before) / max(1, len(fetched)), missing)
        present = kept | np.isin(ids, fetched)
        ids, weights, kept = ids[present], weights[present], kept[present]
        from_cache = self.cache.get(ids[kept]) if kept.any() else {}
        rows = np.searchsorted(fetched, ids[~kept])
        out = {}
        for name, values in arrays.items():
            out[name] = np.empty((len(ids), *values.shape[1:]), dtype=values.dtype)
            out[name][~kept] = values[rows]
            if kept.any():
                out[name][kept] = from_cache[name]
        return ids, weights, out

    def _with_shard_mates(self, missing: np.ndarray) -> np.ndarray:
        """`missing` and the samples of their shards this rank visits this epoch that the cache
        lacks and has room for beside them (by their mean size where sizes vary), sorted; only
        `missing` once the cache is full."""
        if self.cache is None or self.cache.full:
            return missing
        size = self.source.shard_samples
        shards = np.unique(missing // size)
        starts = np.searchsorted(self._visiting, shards * size)
        ends = np.searchsorted(self._visiting, (shards + 1) * size)
        mates = np.concatenate([self._visiting[a:b] for a, b in zip(starts.tolist(), ends.tolist())])
        mates = mates[~self.cache.holds(mates)]
        # in id order, the batch's own among them, as `put` keeps them: one past its room is read for nothing
        mates = mates[: self.cache.room_for(self._sample_bytes or self._mean_sample_bytes())]
        return np.union1d(missing, mates)

    def _mean_sample_bytes(self) -> int:
        """A sample's bytes where they vary (encoded, ragged), estimated: the mean of those the cache
        keeps, or before it keeps any, of the dataset's as stored (encoded images are stored as they
        are). Samples zstd shrank are underestimated: a read past the room by at most the
        compression ratio times the room, once (the cache is then full)."""
        if self.cache.samples:
            return math.ceil(sum(self.cache.nbytes()) / self.cache.samples)
        return math.ceil(self._full_bytes() / max(1, self.num_samples))

    def _fetch(
        self, ids: np.ndarray, round: int | str, *, skip: bool = True
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Which of `ids` were read (a mask), and their arrays from the source: with on_error="skip"
        (and `skip`) all but the samples an IntegrityError names (read again without them, until
        the rest reads whole)."""
        read = np.ones(len(ids), dtype=bool)
        while True:
            try:
                return read, self.source.read(ids[read], arrays=self.arrays, round=round)
            except IntegrityError as e:
                damaged_here = read & np.isin(ids, e.ids)
                if self.on_error == "raise" or not skip or not damaged_here.any():
                    raise
                log.warning("skipped %d samples: %s", int(damaged_here.sum()), e)
                self.skipped.update(e.ids)
                read &= ~damaged_here

    def _decoded(
        self, ids: np.ndarray, arrays: dict[str, np.ndarray], weights: np.ndarray, seed: tuple[int, ...]
    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """A batch of encoded inputs checked and, for the torch backend, decoded (DALI decodes in
        its graph); damaged samples raised or dropped by `on_error`."""
        blobs = arrays[self.input_array]
        if self.backend == "torch":
            if self._decoders is None:
                self._decoders = ThreadPoolExecutor(self.num_threads, thread_name_prefix="nearstore-decode")
            inputs, failed = self.images.decode_batch(blobs, seed=seed, executor=self._decoders)
        else:
            if self._refused:  # refused by DALI's decoder before: skipped and listed already
                ids, weights, arrays = _kept(~np.isin(ids, list(self._refused)), ids, weights, arrays)
                blobs = arrays[self.input_array]
            failed = {i: why for i, blob in enumerate(blobs) if (why := damaged(blob)) is not None}
            reaching = np.array([i not in failed for i in range(len(ids))], dtype=bool)
            if reaching.any():  # what DALI's decoder will see: batches wholly damaged would push those out
                self._handed.append((ids[reaching], blobs[reaching]))
        if failed:
            where = [
                f"sample {int(ids[i])} of array {self.input_array!r} ({self._shard_of(ids[i])}): {why}"
                for i, why in failed.items()
            ]
            if self.on_error == "raise":
                raise SampleError(
                    f"{where[0]}" + (f"; and {len(where) - 1} more in the batch" if len(where) > 1 else "")
                )
            for line in where:
                log.warning("skipped %s", line)
            self.skipped.update(int(ids[i]) for i in failed)
            ids, weights, arrays = _kept(~np.isin(np.arange(len(ids)), list(failed)), ids, weights, arrays)
        if self.backend == "torch":
            arrays[self.input_array] = inputs
        return ids, arrays, weights

    def _through_dali(
        self,
        batches_from: Callable[[int], Iterator[tuple[np.ndarray, ...]]],
        first: int,
        seed: tuple[int, int],
        largest: int,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """The epoch's batches from batch `first` on through DALI, none of more than `largest`
        samples. A pipeline whose decoder refused
        a sample cannot go on: with on_error="skip" the sample is skipped and a fresh pipeline
        takes the epoch up at the first batch not delivered (its augmentations drawn anew)."""
        while True:
            self._handed.clear()
            try:
                yield from dali_epoch(
                    batches_from(first),
                    num_outputs=len(self.arrays) + self.with_weights + (self.augment is not None),
                    batch_size=largest,
                    device=self.device,
                    dali_transform=self.dali_transform,
                    views=self.views,
                    augmented=self.augment is not None,
                    images=self.images,
                    num_threads=self.num_threads,
                    seed=int(np.random.default_rng([*seed, first]).integers(2**31)),
                    explain=self._refused_by_dali if self.images is not None else None,
                )
                return
            except SampleError as e:
                if self.on_error == "raise" or not e.ids:
                    raise
                log.warning("skipped %s", e)
                self.skipped.update(e.ids)
                self._refused.update(e.ids)
                first = self.order.batches_done

    def _class_ids(
        self, ids: np.ndarray, weights: np.ndarray, arrays: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The batch with its labels as torch's losses take them, (batch,) int64, stored uint8 or
        int16 or (n, 1) alike. A label that is no class id int64 holds (in a store zarr wrote:
        negative, or uint64 past 2**63, which a cast wraps) is a damaged sample: raised or dropped
        by `on_error`."""
        name = self.source.label_array
        labels = arrays[name].reshape(len(ids))
        bad = labels < 0 if labels.dtype.kind == "i" else labels > np.iinfo(np.int64).max
        if bad.any():
            named = ", ".join(f"sample {i}: {v}" for i, v in zip(ids[bad][:3].tolist(), labels[bad][:3].tolist()))
            error = f"label array {name!r} of {self.url!r} holds labels that are no class id, an integer in [0, 2**63)"
            error += f" ({named})"
            if self.on_error == "raise":
                raise SampleError(error, ids=tuple(ids[bad].tolist()))
            log.warning("skipped %s", error)
            self.skipped.update(ids[bad].tolist())
            ids, weights, arrays = _kept(~bad, ids, weights, {**arrays, name: labels})
            labels = arrays[name]
        return ids, weights, {**arrays, name: labels.astype(np.int64, copy=False)}

    def _refused_by_dali(self, error: RuntimeError) -> Exception:
        """A SampleError naming the sample DALI's decoder refused, found by decoding the batches
        handed to it with PIL, else one at a time with DALI's CPU decoder (`dali_refusal`); DALI's
        own error where both decode them all."""
        # a copy: the reader thread may still append; a batch the last pipeline was handed comes again
        handed = [(s, blob) for ids, blobs in list(self._handed) for s, blob in zip(ids.tolist(), blobs)]
        handed = [(s, blob) for s, blob in handed if s not in self._refused]
        for sample, blob in handed:
            try:
                PROBE.decode(blob)
            except (OSError, ValueError, SyntaxError) as e:
                return self._refusal(sample, f", and so does PIL ({type(e).__name__}: {e})")
        refused = dali_refusal(handed)
        if refused is not None:
            sample, reason = refused
            return self._refusal(sample, f" ({reason}); PIL decodes it: backend='torch' reads it")
        return error

    def _refusal(self, sample: int, why: str) -> SampleError:
        where = f"sample {sample} of array {self.input_array!r} ({self._shard_of(sample)})"
        return SampleError(f"{where}: DALI's decoder refused it{why}", ids=(sample,))

    def _shard_of(self, sample: int) -> str:
        return f"shard {int(sample) // self.source.shard_samples} of {self.url!r}"


def _kept(
    keep: np.ndarray, ids: np.ndarray, weights: np.ndarray, arrays: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A batch's samples `keep` (a mask) flags: their ids, weights and rows of every array."""
    return ids[keep], weights[keep], {name: values[keep] for name, values in arrays.items()}


def _selected(
    num_samples: int, where: str, ids: Any, weights: Any = None, *, what: str = "selected sample id"
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids to iterate, integers in range, sorted and each named once, and their weights.
    Plain ids (no weights) come in any order and are sorted; ids with weights (a state's) must
    come sorted. Weights: one number per id, finite, >= 0 (default 1). what: the ids, for errors."""
    ids = sample_ids(ids, where, num_samples=num_samples, what=what)
    if weights is None:
        ids, weights = np.sort(ids), np.ones(len(ids))
    step = np.diff(ids)
    if np.any(step <= 0):
        i = int(np.argmax(step <= 0))
        if step[i] == 0:
            raise SampleIdError(f"{what} {ids[i]} is named twice in {where}: each must be once")
        raise SampleIdError(f"{what}s in {where} must be sorted, got {ids[i]} before {ids[i + 1]}")
    weights = np.asarray(weights)
    if weights.shape != ids.shape or weights.dtype.kind not in "iuf" or not np.all(np.isfinite(weights)):
        raise DatasetError(
            f"selection weights in {where} must be {len(ids)} finite numbers, got {reprlib.repr(weights)}"
        )
    if np.any(weights < 0):
        raise DatasetError(f"selection weights in {where} must be >= 0, got {weights.min()}")
    return ids, weights.astype(np.float32)


def _round_state(chosen: Chosen) -> dict[str, Any]:
    """A round's entry in state_dict."""
    ids, weights, round, carry = chosen
    return {"round": round, "ids": ids, "weights": weights, "carry": carry}


def _state_io(io: Any) -> tuple[IOStats, int, list[dict[str, Any]]]:
    """A state's "io": what the rank received before it, the samples it augmented and its
    completed epochs' figures; none for a state written before states held them."""
    if io is None:
        return IOStats(), 0, []
    where = "state_dict's io"
    if not isinstance(io, Mapping):
        raise DatasetError(f"{where} must be a mapping, got {reprlib.repr(io)}")
    received = IOStats(*(state_count(io, key, where) for key in ("bytes", "requests", "samples", "retries")))
    epochs = state_entry(io, "per_epoch", where, list)
    for i, epoch in enumerate(epochs):
        if not isinstance(epoch, Mapping):
            raise DatasetError(f"{where}['per_epoch'][{i}] must be a mapping, got {reprlib.repr(epoch)}")
        state_count(epoch, "full_bytes", f"{where}['per_epoch'][{i}]")
    return received, state_count(io, "augmented_samples", where), [dict(epoch) for epoch in epochs]


def _a_keep(value: Any) -> bool:
    """Whether `value` is a share of the samples, a number in (0, 1] (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1


def _state_keeps(keeps: Any) -> dict[int | str, float]:
    """A state's keeps asked for by round number, checked: numbers in (0, 1]."""
    where = "state_dict's keeps"
    if not isinstance(keeps, Mapping):
        raise DatasetError(f"{where} must be a mapping of round numbers to keeps, got {reprlib.repr(keeps)}")
    checked: dict[int | str, float] = {}
    for round, keep in keeps.items():
        if not _a_keep(keep):
            raise DatasetError(f"{where}[{round!r}] must be a number in (0, 1], got {reprlib.repr(keep)}")
        checked[int(round) if str(round).isdigit() else round] = float(keep)
    return checked


def _checkpointable(value: Any) -> Any:
    """A copy of a state whose numpy arrays are torch tensors (strings: lists) and numpy scalars
    Python's: what a plain torch.load (weights_only, its default since torch 2.6) loads back."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy()) if value.dtype.kind in "biuf" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {key: _checkpointable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_checkpointable(item) for item in value)
    return value


def _on_flagged(
    transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, flags: torch.Tensor
) -> torch.Tensor:
    """x with `transform` applied to the rows `flags` marks, called on those rows alone (the
    augmentation costs only them); the other rows as they are."""
    if not flags.any():
        return x
    flags = flags.to(x.device)
    rows = x[flags]
    changed = transform(rows)
    if not isinstance(changed, torch.Tensor) or changed.shape != rows.shape or changed.dtype != rows.dtype:
        got = f"{tuple(changed.shape)} {changed.dtype}" if isinstance(changed, torch.Tensor) else type(changed).__name__
        raise ParameterError(
            f"with augment=, transform must keep x's shape and dtype: got {got} from {tuple(rows.shape)} {rows.dtype}"
        )
    out = x.clone()
    out[flags] = changed
    return out


def _tensor(array: np.ndarray | RaggedBatch, device: torch.device) -> torch.Tensor:
    """A batch's array on `device`; ragged samples as a jagged nested tensor (`nested`)."""
    if not isinstance(array, RaggedBatch):
        return torch.from_numpy(array).to(device)
    if not len(array):  # every sample of the batch skipped as damaged: nothing to nest
        return torch.from_numpy(array.values).to(device)
    return nested(array, device)


def _paired(names: Any, input_array: str, source: Source, url: str) -> tuple[str, ...]:
    """The paired arrays asked for, each a sample array of the source named once, not x or y, and
    none of encoded bytes."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ParameterError(f"paired_arrays must be a sequence of array names, got {reprlib.repr(names)}")
    for name in names:
        if name not in source.sample_arrays or name in (input_array, source.label_array):
            raise DatasetError(
                f"paired array {name!r} is not a sample array of {url!r} other than x and y "
                f"({[n for n in source.sample_arrays if n not in (input_array, source.label_array)]})"
            )
        described = source.identity["arrays"][name]
        if described["dtype"] == "object" and "ragged" not in described:
            raise ParameterError(f"paired array {name!r} of {url!r} holds encoded bytes: pairing those is not built")
    if len(set(names)) != len(names):
        raise ParameterError(f"paired_arrays names an array twice: {list(names)}")
    return tuple(names)


def _sample_nbytes(source: Source, arrays: Sequence[str]) -> int | None:
    """Bytes a sample of `arrays` takes in memory; None where they vary (encoded or ragged samples)."""
    described = [source.identity["arrays"][name] for name in arrays]
    if any(d["dtype"] == "object" for d in described):
        return None
    return sum(np.dtype(d["dtype"]).itemsize * math.prod(d["shape"][1:]) for d in described)


def _ragged(source: Source, name: str) -> RaggedLayout | None:
    described = source.identity["arrays"][name]
    where = f"array {name!r} of {source.url!r}"
    return RaggedLayout.from_attrs(described["ragged"], where) if "ragged" in described else None


def _rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None and not initialized and is_integer(world_size) and world_size > 1:
        # as DistributedSampler refuses it: every process would take rank 0's share
        raise ParameterError(f"world_size={world_size} needs rank= (torch.distributed is not initialized)")
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    return rank, world_size


def _take(iterator: Iterator[Batch], n: int) -> list[Batch]:
    return [b for _, b in zip(range(n), iterator)]


def _device(device: torch.device | str | None) -> torch.device:
    """Where batches land: `device`, or by default CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as e:  # torch's refusal lists its signatures, not the value
        raise ParameterError(f"device must be a torch.device or its name ('cpu', 'cuda:0'), got {device!r}") from e
    if chosen.type == "cuda":  # refused here, not at the first batch
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count or (chosen.index or 0) >= count:
            raise ParameterError(f"device {device!r}: this machine has {count} CUDA device(s) torch can use")
    return chosen
