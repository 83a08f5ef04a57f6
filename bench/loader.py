"""Samples/s of StreamingLoader against torch's DataLoader and the streaming formats, same data.

    python bench/loader.py [--samples 8192] [--images 2048] [--keep 0.25] [--repeats 7] [--out bench/results] [--tiny]

Fixed-size samples (float32 (40,), uint8 (3, 32, 32)), the same samples in each format, the same
transform, on full data and on a `keep` selection (the same ids for every competitor):
- StreamingLoader, DALI backend (CPU pipeline here) and torch backend (the default for fixed-size
  samples), each with its sample cache (after the first epoch an epoch reads nothing), and the
  torch backend with `cache=False` (every epoch read from the store, as the first);
- the fast references, all in the main process: a DataLoader over the arrays as .npy files opened
  with np.memmap, one fancy index a batch (`__getitems__`: what the page cache gives for free);
  LitData chunks and MosaicML MDS shards of as many samples as our shards, on full data each one's
  own shuffled iteration, on the selection by id (`dataset[i]`) through a SubsetRandomSampler, and
  LitData's own iteration with the unselected samples dropped too (its `dataset[i]` is slow).
  LitData is installed by hand (pyproject.toml's bench extra says how);
  these rows are timed interleaved: one untimed epoch each, then `--repeats` rounds of one epoch
  of each in turn, medians (the machine's load drifts alike for all);
- DataLoader over a map-style dataset reading `zarr_array[i]` per sample, num_workers 0 and 2
  (with the same ids through SubsetRandomSampler for the selection), and one whose dataset reads a
  whole batch with one zarr orthogonal selection (`__getitems__`), what an informed zarr user
  would write: 10-30 s an epoch, timed once after a warm-up epoch;
- and what integrity costs: each StreamingLoader backend (cache off) over the store and over a
  copy without checksums or manifest (format 1, `unchecked_copy`), epochs interleaved, the ratio
  of the medians ("checked / unchecked") the price of verifying every sample's crc32c and every
  range's length.
torch runs on `--torch-threads` threads (1) for every row: on 2 shared cores its pool of 2 waits
on a descheduled thread (the transform of a uint8 batch: 0.45 ms idle, 8-20 ms loaded).

Encoded images: the same JPEGs (generated photo-sized: smooth colour fields plus noise, quality 90)
as an ImageFolder, a nearstore store, WebDataset tar shards and MosaicML MDS shards; every
competitor yields float32 (batch, 3, 224, 224) with the same augmentation (`ImageTransform`:
random resized crop, flip, normalize), `--image-repeats` rounds (3) of every competitor in turn,
each made, warmed up for an epoch and timed for one, the medians:
- StreamingLoader, DALI backend (`decoders.image_random_crop` in its CPU pipeline) and torch
  backend (PIL in a pool of `num_threads` threads), 2 threads for the 2 workers of the peers;
- an ImageFolder + DataLoader, 0 and 2 workers. torchvision's wheel does not import beside the CPU
  torch here, so `PhotoFolder` is torchvision's ImageFolder rewritten (the same file walk, a file
  read and decoded by PIL per sample) with `ImageTransform.decode` as the per-sample transform: the
  decode and augmentation are the same code as the torch backend's, so the rows compare the
  loading machinery. Selection: SubsetRandomSampler over the same ids;
- WebDataset (tar shards of .jpg + .cls, shard and sample shuffling, batched in the workers), 0
  and 2 workers. It can only stream: for the selection it reads every shard and drops the
  samples not selected;
- MosaicML Streaming: MDS shards (image: bytes, label: int) read by a StreamingDataset from a
  local folder, 0 and 2 workers; full data through its own shuffled iteration, the selection
  through its random access (`dataset[i]`) under a SubsetRandomSampler. Its package imports
  torchvision and transformers from `streaming/__init__.py` and `streaming/base/__init__.py` (for
  its vision and text datasets and its DataLoader's batch types), neither of which imports here, and
  its requirements would replace the CPU torch with a CUDA build (about 3 GB): it is installed with
  `pip install --no-deps mosaicml-streaming brotli python-snappy cramjam zstd "xxhash<4" catalogue`
  and `import_streaming` loads `streaming.base.dataset` and the MDS writer past those two
  `__init__` files.
A peer that is not installed is printed as such and skipped. Bytes read per epoch are recorded
for each: ours from `io_stats()`, the ImageFolder's as the files it opened, WebDataset's as every
tar byte, MDS's as the sample records it reads (with the bytes of the shards it touches: what it
would download from a remote).

The process keeps freed memory for reuse (`keep_freed_memory`, as a training script should), for
every competitor alike. Prints samples/s and ratios (ours / theirs); writes loader.json and loader.png.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, SubsetRandomSampler, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import StreamingLoader  # noqa: E402
from nearstore import Dataset, keep_freed_memory, open_dataset, random_select, write_dataset  # noqa: E402
from nearstore.app.encoded_converters import imagefolder_files, imagefolder_images  # noqa: E402
from nearstore.app.synthetic import PHOTO_CLASSES, PHOTO_SIDES, write_photos  # noqa: E402
from nearstore.storage.dataset import ATTRS_KEY, UncheckedStoreWarning  # noqa: E402
from nearstore.storage.images import ImageTransform  # noqa: E402

OURS = ("StreamingLoader (DALI)", "StreamingLoader (torch)")
UNCACHED = "StreamingLoader (torch, cache=False)"


def transform(x: torch.Tensor) -> torch.Tensor:
    return x.float() * 2 + 1


class ZarrSamples(torch.utils.data.Dataset):
    """What a user writes without nearstore: one zarr read per sample."""

    def __init__(self, url: str):
        group = open_dataset(url).group
        self.x, self.y = group["x"], group["y"]

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return torch.from_numpy(np.asarray(self.x[i])), int(self.y[i])


class ZarrBatches(ZarrSamples):
    """One zarr orthogonal selection per batch (DataLoader calls __getitems__ with the batch)."""

    def __getitems__(self, ids: list[int]):
        order = np.argsort(ids)
        sorted_ids = np.asarray(ids)[order]
        x = self.x.get_orthogonal_selection((sorted_ids,))
        y = self.y.get_orthogonal_selection((sorted_ids,))
        back = np.argsort(order)
        return [(torch.from_numpy(x[back]), torch.from_numpy(y[back]))]


def collate_batch(items):
    return items[0]


def unchecked_copy(dataset: Dataset, url: str) -> Dataset:
    """The same samples, shards and codecs but for the crc32c, in a format-1 store (no checksums,
    no manifest): what the reader read before integrity checks."""
    group = zarr.open_group(url, mode="w")
    for name, array in dataset.arrays.items():
        copy = group.create_array(
            name,
            shape=array.shape,
            dtype=array.dtype,
            chunks=array.chunks,
            shards=array.shards,
            compressors=[c for c in array.compressors if c.to_dict()["name"] != "crc32c"],
            fill_value=array.fill_value,
        )
        copy[:] = array[:]
    attrs = {k: v for k, v in dataset.group.attrs[ATTRS_KEY].items() if k not in ("fingerprint", "shards")}
    group.attrs[ATTRS_KEY] = {**attrs, "format_version": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedStoreWarning)
        return open_dataset(url)


def ours(
    store: Dataset, ids: np.ndarray | None, batch_size: int, cache: bool = True
) -> dict[str, Callable[[], Iterable]]:
    """Our loader over `store`, each backend, as makers of an iterable over an epoch."""
    return {
        name: lambda backend=backend: StreamingLoader(
            store, ids, batch_size=batch_size, backend=backend, device="cpu", cache=cache
        )
        for name, backend in zip(OURS, ("dali", "torch"))
    }


def uncached(store: Dataset, ids: np.ndarray | None, batch_size: int) -> dict[str, Callable[[], Iterable]]:
    """The torch backend without its cache: every epoch read from the store, as the first one."""
    return {UNCACHED: ours(store, ids, batch_size, cache=False)[OURS[1]]}


class MemmapBatches(torch.utils.data.Dataset):
    """The fast reference: the arrays as .npy files opened with np.memmap (the page cache holds
    them), one fancy index a batch (DataLoader calls __getitems__ with the batch's ids)."""

    def __init__(self, root: Path):
        self.x, self.y = (np.load(root / f"{name}.npy", mmap_mode="r") for name in ("x", "y"))

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, ids: list[int]):
        return [(torch.from_numpy(self.x[ids]), torch.from_numpy(self.y[ids]))]


class ByIndex(torch.utils.data.Dataset):
    """A peer's streaming dataset read by id (its random access, `dataset[i]`), for a sampler."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, i: int) -> dict:
        return self.dataset[i]


class Columns:
    """(x, y) batches of a loader whose batches are {"x": ..., "y": ...} dicts."""

    def __init__(self, loader: Iterable[dict]):
        self.loader = loader

    def __iter__(self) -> Iterator:
        return ((batch["x"], batch["y"]) for batch in self.loader)


class Dropping:
    """A peer's own shuffled iteration over every sample, those outside `ids` dropped (each sample
    carries its id), the rest collated into batches of `batch_size`."""

    def __init__(self, dataset, ids: np.ndarray, batch_size: int):
        self.dataset, self.batch_size, self.epoch = dataset, batch_size, 0
        self.selected = np.zeros(len(dataset), dtype=bool)
        self.selected[ids] = True

    def __iter__(self) -> Iterator:
        self.epoch += 1
        self.dataset.set_epoch(self.epoch)
        batch = []
        for sample in self.dataset:
            if self.selected[sample["id"]]:
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self._collated(batch)
                    batch = []
        if batch:
            yield self._collated(batch)

    @staticmethod
    def _collated(batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        collated = default_collate(batch)
        return collated["x"], collated["y"]


def litdata_item(sample: tuple[int, np.ndarray, int]) -> dict:
    """A sample as LitData stores it (a module function: litdata.optimize's worker calls it)."""
    i, x, y = sample
    return {"id": i, "x": x, "y": y}


def write_peers(x: np.ndarray, y: np.ndarray, shard_samples: int, root: Path) -> dict[str, Path]:
    """The same samples as .npy files (for np.memmap), as LitData chunks (`litdata.optimize`) and as
    MDS shards (`MDSWriter`), both of `shard_samples` samples as our shards; a peer not installed
    is left out."""
    root.mkdir()
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    peers = {"memmap": root}
    if importlib.util.find_spec("litdata") is not None:
        import litdata

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            litdata.optimize(
                fn=litdata_item,
                inputs=list(zip(range(len(x)), x, y.tolist())),
                output_dir=str(root / "litdata"),
                chunk_size=shard_samples,
                num_workers=1,
                verbose=False,
                start_method=multiprocessing.get_start_method(),  # its default, spawn, would stay set for all
            )
        peers["litdata"] = root / "litdata"
    if import_streaming() is not None:
        _, MDSWriter = import_streaming()
        columns = {"x": f"ndarray:{x.dtype}:{','.join(map(str, x.shape[1:]))}", "y": "int"}
        size_limit = (x[0].nbytes + 16) * shard_samples  # a record: x, y's 8 bytes, its 4-byte offset
        with MDSWriter(out=str(root / "mds"), columns=columns, size_limit=size_limit) as writer:
            for xi, yi in zip(x, y.tolist()):
                writer.write({"x": xi, "y": yi})
        warnings.filterwarnings("ignore", module=r"streaming\.")  # its advice on predownload etc.
        peers["mds"] = root / "mds"
    return peers


def peers_of(peers: dict[str, Path], ids: np.ndarray | None, batch_size: int) -> dict[str, Callable[[], Iterable]]:
    """The fast peers as makers of an iterable over one epoch's (x, y) batches, all in the main
    process: on full data each one's own shuffled iteration; on a selection, by id through a
    SubsetRandomSampler (np.memmap a fancy index a batch, the streaming formats `dataset[i]`), and
    LitData's own iteration with the samples outside it dropped too (its `dataset[i]` is slow)."""
    sampler = SubsetRandomSampler(ids.tolist()) if ids is not None else None
    by_id = {"batch_size": batch_size, "shuffle": sampler is None, "sampler": sampler}
    made: dict[str, Callable[[], Iterable]] = {
        "DataLoader np.memmap batch": lambda: DataLoader(
            MemmapBatches(peers["memmap"]), collate_fn=collate_batch, **by_id
        )
    }
    if "litdata" in peers:
        import litdata

        def lit() -> Iterable:
            if ids is None:
                dataset = litdata.StreamingDataset(str(peers["litdata"]), shuffle=True)
                return Columns(litdata.StreamingDataLoader(dataset, batch_size=batch_size))
            return Columns(DataLoader(ByIndex(litdata.StreamingDataset(str(peers["litdata"]))), **by_id))

        made["LitData"] = lit
        if ids is not None:
            made["LitData, iteration, unselected dropped"] = lambda: Dropping(
                litdata.StreamingDataset(str(peers["litdata"]), shuffle=True), ids, batch_size
            )
    if "mds" in peers:

        def mds() -> Iterable:
            stream = mds_stream(peers["mds"], batch_size)
            if ids is None:
                return Columns(DataLoader(stream, batch_size=batch_size))
            return Columns(DataLoader(ByIndex(stream), **by_id))

        made["MDS StreamingDataset"] = mds
    return made


def zarr_loaders(url: str, ids: np.ndarray | None, batch_size: int) -> dict[str, Callable[[], Iterable]]:
    """DataLoaders over zarr, what a user writes without nearstore, as makers of an epoch's batches."""
    sampler = SubsetRandomSampler(ids.tolist()) if ids is not None else None
    torch_loader = {"batch_size": batch_size, "shuffle": sampler is None, "sampler": sampler}
    return {
        "DataLoader zarr[i], 0 workers": lambda: DataLoader(ZarrSamples(url), num_workers=0, **torch_loader),
        "DataLoader zarr[i], 2 workers": lambda: DataLoader(ZarrSamples(url), num_workers=2, **torch_loader),
        "DataLoader zarr batch, 0 workers": lambda: DataLoader(
            ZarrBatches(url), num_workers=0, collate_fn=collate_batch, **torch_loader
        ),
    }


def interleaved(makers: dict[str, Callable[[], Iterable]], repeats: int) -> dict[str, float]:
    """Samples/s of each: made, one untimed epoch each, then `repeats` rounds of one timed epoch of
    each in turn; the medians (the machine's load drifts: every competitor sees the same drift)."""
    loaders = {name: make() for name, make in makers.items()}
    for loader in loaders.values():
        sum(1 for _ in loader)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            rates[name].append(epoch_rate(loader, warm_up=False))
    return {name: float(np.median(r)) for name, r in rates.items()}


def epoch_rate(
    loader: Iterable,
    epochs: int = 1,
    consume: Callable[[torch.Tensor], torch.Tensor] = transform,
    warm_up: bool = True,
) -> float:
    """Samples/s over `epochs` timed epochs, after one untimed warm-up epoch (if `warm_up`)."""
    if warm_up:
        sum(1 for _ in loader)
    started, samples = time.perf_counter(), 0
    for _ in range(epochs):
        for x, *_ in loader:
            samples += len(consume(x))
    return samples / (time.perf_counter() - started)


def integrity_cost(
    dataset: Dataset, unchecked: Dataset, ids: np.ndarray | None, batch_size: int, repeats: int = 11
) -> dict[str, float]:
    """checked / unchecked samples/s of each of our backends without the cache (whose epochs after
    the first read nothing): medians of `repeats` interleaved epochs."""
    costs = {}
    for name in OURS:
        makers = {
            kind: ours(store, ids, batch_size, cache=False)[name]
            for kind, store in (("checked", dataset), ("plain", unchecked))
        }
        rates = interleaved(makers, repeats)
        costs[name] = rates["checked"] / rates["plain"]
    return costs


def run(
    samples: int, keep: float, batch_size: int, sample_shape: tuple[int, ...], dtype: str, workdir: Path, repeats: int
) -> dict:
    rng = np.random.default_rng(0)
    name = f"bench-{samples}-{'x'.join(map(str, sample_shape))}-{dtype}"
    url = str(workdir / f"{name}.zarr")
    x = (rng.normal(size=(samples, *sample_shape)) * 40).astype(dtype)
    y = rng.integers(0, 10, samples)
    batches = ({"x": x[k : k + 4096], "y": y[k : k + 4096]} for k in range(0, samples, 4096))
    dataset = write_dataset(url, batches, overwrite=True)
    peers = write_peers(x, y, dataset.shard_samples, workdir / name)
    unchecked = unchecked_copy(dataset, url.replace(".zarr", "-unchecked.zarr"))
    selection = random_select(dataset, keep, seed=0)
    default = StreamingLoader(dataset, batch_size=batch_size, device="cpu").backend
    rows = {}
    for subset, ids in (("full", None), (f"keep {keep:.0%}", selection.ids)):
        fast = {
            **ours(dataset, ids, batch_size),
            **uncached(dataset, ids, batch_size),
            **peers_of(peers, ids, batch_size),
        }
        rates = interleaved(fast, repeats)
        for name, make in zarr_loaders(url, ids, batch_size).items():  # 10-30 s an epoch: timed once
            rates[name] = epoch_rate(make())
        for name, rate in rates.items():
            print(f"  {subset:<9} {name:<36} {rate:>10,.0f} samples/s", flush=True)
        cost = integrity_cost(dataset, unchecked, ids, batch_size)
        for name, ratio in cost.items():
            print(f"  {subset:<9} {name}, checked / unchecked {ratio:>6.2f}x", flush=True)
        ours_name = f"StreamingLoader ({'DALI' if default == 'dali' else default})"
        rows[subset] = {
            "samples": dataset.num_samples if ids is None else len(ids),
            "samples_per_second": rates,
            "ours_over": {name: rates[ours_name] / rate for name, rate in rates.items() if name not in OURS},
            "checked_over_unchecked": cost,
        }
    return {
        "store": url,
        "sample_shape": list(sample_shape),
        "dtype": dtype,
        "default_backend": default,
        "repeats": repeats,
        "stored_bytes": dataset.stored_nbytes(),
        "results": rows,
    }


# Encoded images ------------------------------------------------------------------------------------


def augment(images: ImageTransform, blob: bytes) -> torch.Tensor:
    """The peers' per-sample transform: `ImageTransform.decode`, as the torch backend runs it."""
    return torch.from_numpy(images.decode(blob, np.random.default_rng()))


class PhotoFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder without torchvision: classes the sorted subfolders, samples their
    image files in sorted walk order, each file read and decoded by PIL per `__getitem__`."""

    def __init__(self, root: Path, images: ImageTransform):
        self.samples, _ = imagefolder_files(root)  # torchvision's walk, as the converter's
        self.images = images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with open(path, "rb") as f:
            return augment(self.images, f.read()), label


def import_webdataset() -> types.ModuleType | None:
    try:
        import webdataset
    except ImportError:
        return None
    return webdataset


def write_tar_shards(folder: PhotoFolder, out: Path, per_shard: int) -> list[str]:
    """WebDataset shards of `folder`'s files as they are, sample i keyed by its id."""
    wds = import_webdataset()
    out.mkdir()
    with wds.ShardWriter(str(out / "shard-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (path, label) in enumerate(folder.samples):
            sink.write({"__key__": f"{i:06d}", "jpg": Path(path).read_bytes(), "cls": str(label)})
    return sorted(str(path) for path in out.glob("shard-*.tar"))


def webdataset_loader(shards: list[str], images: ImageTransform, ids: np.ndarray | None, batch_size: int, workers: int):
    """The WebDataset recipe: shuffled shards, a shuffle buffer, decode, batches made in the workers;
    for a selection, every sample streamed and the unselected ones dropped."""
    wds = import_webdataset()
    pipeline = wds.WebDataset(shards, shardshuffle=len(shards), empty_check=False)
    if ids is not None:
        keep = set(ids.tolist())
        pipeline = pipeline.select(lambda sample: int(sample["__key__"]) in keep)
    pipeline = pipeline.shuffle(1000).map(lambda sample: (augment(images, sample["jpg"]), int(sample["cls"])))
    return DataLoader(pipeline.batched(batch_size), batch_size=None, num_workers=workers)


def import_streaming() -> tuple[Any, Any] | None:
    """mosaicml-streaming's (StreamingDataset, MDSWriter), or None where it is not installed.

    `streaming/__init__.py` imports torchvision and `streaming/base/__init__.py` transformers,
    which do not import beside this torch: both packages are entered as bare namespaces (their
    folders, without running their `__init__`), then the two modules needed are imported."""
    if "streaming.base.dataset" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = spec.submodule_search_locations[0]
        for name, path in (("streaming", root), ("streaming.base", os.path.join(root, "base"))):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules.setdefault(name, package)
    try:
        from streaming.base.dataset import StreamingDataset
        from streaming.base.format.mds.writer import MDSWriter
    except ImportError as e:
        print(f"  mosaicml-streaming is installed but does not import: {e}", flush=True)
        return None
    return StreamingDataset, MDSWriter


def write_mds(folder: PhotoFolder, out: Path, size_limit: int) -> None:
    _, MDSWriter = import_streaming()
    with MDSWriter(out=str(out), columns={"image": "bytes", "label": "int"}, size_limit=size_limit) as writer:
        for path, label in folder.samples:
            writer.write({"image": Path(path).read_bytes(), "label": label})


def mds_read_bytes(root: Path, ids: np.ndarray | None) -> tuple[int, int]:
    """(bytes of the sample records StreamingDataset reads for `ids`, with the 8 bytes of offsets
    it reads before each; bytes of the shards holding any of them, what it would download)."""
    shards = json.loads((root / "index.json").read_text())["shards"]
    records, touched, first = 0, 0, 0
    for shard in shards:
        path = root / shard["raw_data"]["basename"]
        count = int(shard["samples"])
        offsets = np.fromfile(path, np.uint32, count + 1, offset=4).astype(np.int64)
        local = np.arange(count) if ids is None else ids[(ids >= first) & (ids < first + count)] - first
        records += int((offsets[local + 1] - offsets[local]).sum()) + 8 * len(local)
        touched += path.stat().st_size if len(local) else 0
        first += count
    return records, touched


def mds_stream(root: Path, batch_size: int):
    """A new StreamingDataset over the MDS folder: one per DataLoader, as its shared barrier counts
    the workers of the first epoch and waits for as many ever after (a dataset iterated with 0
    workers then 2 hangs)."""
    gc.collect()  # the previous one holds the folder's shared memory until it is freed
    StreamingDataset, _ = import_streaming()
    return StreamingDataset(local=str(root), batch_size=batch_size, shuffle=True)


class MDSSamples(torch.utils.data.Dataset):
    """A StreamingDataset read by id (its random access), for a sampler over a selection."""

    def __init__(self, stream, images: ImageTransform):
        self.stream, self.images = stream, images

    def __len__(self) -> int:
        return self.stream.num_samples

    def __getitem__(self, i: int):
        sample = self.stream[i]
        return augment(self.images, sample["image"]), sample["label"]


class MDSStream(torch.utils.data.IterableDataset):
    """A StreamingDataset iterated as it means to be: its shuffle, its split over the workers."""

    def __init__(self, stream, images: ImageTransform):
        self.stream, self.images = stream, images

    def __iter__(self) -> Iterator:
        for sample in self.stream:
            yield augment(self.images, sample["image"]), sample["label"]


def image_competitors(
    dataset, folder: PhotoFolder, peers: dict[str, Any], images: ImageTransform, ids: np.ndarray | None, batch_size: int
) -> dict[str, Callable[[], Iterable]]:
    """Each competitor as a maker of an iterable over one epoch's (x, y) batches of decoded images."""
    sampler = SubsetRandomSampler(ids.tolist()) if ids is not None else None
    by_id = {"batch_size": batch_size, "shuffle": sampler is None, "sampler": sampler}

    made = {
        f"StreamingLoader ({label})": lambda backend=backend: StreamingLoader(
            dataset, ids, batch_size=batch_size, images=images, backend=backend, num_threads=2, device="cpu"
        )
        for label, backend in (("DALI", "dali"), ("torch", "torch"))
    }
    for workers in (0, 2):
        made[f"ImageFolder, {workers} workers"] = lambda w=workers: DataLoader(folder, num_workers=w, **by_id)
    if "webdataset" in peers:
        for workers in (0, 2):
            made[f"WebDataset, {workers} workers"] = lambda w=workers: webdataset_loader(
                peers["webdataset"], images, ids, batch_size, w
            )
    if "mds" in peers:
        for workers in (0, 2):
            made[f"MDS StreamingDataset, {workers} workers"] = (
                (
                    lambda w=workers: DataLoader(
                        MDSStream(mds_stream(peers["mds"], batch_size), images), batch_size=batch_size, num_workers=w
                    )
                )
                if ids is None
                else (
                    lambda w=workers: DataLoader(
                        MDSSamples(mds_stream(peers["mds"], batch_size), images), num_workers=w, **by_id
                    )
                )
            )
    return made


def against_peers(rates: dict[str, float]) -> dict[str, Any]:
    """Ours (the faster StreamingLoader backend), the best peer, and the ratios to it."""
    ours = max(OURS, key=rates.__getitem__)
    peers = {name: rate for name, rate in rates.items() if name not in OURS}
    best = max(peers, key=peers.__getitem__)
    return {
        "ours": ours,
        "best_peer": best,
        "over_best_peer": {name: rates[name] / peers[best] for name in OURS},
        "ours_over": {name: rates[ours] / rate for name, rate in peers.items()},
    }


def run_images(
    num_images: int, keep: float, batch_size: int, sides: tuple[int, int], workdir: Path, repeats: int
) -> dict:
    """Decoded, augmented 224 × 224 batches from the same JPEGs by every competitor: `repeats`
    rounds of each in turn (made, a warm-up epoch, a timed epoch, freed), the medians."""
    root, url = workdir / "photos", str(workdir / "photos.zarr")
    write_photos(root, num_images, sides=sides)
    images = ImageTransform(size=224, train=True)
    folder = PhotoFolder(root, images)
    sizes = np.array([os.path.getsize(path) for path, _ in folder.samples])
    dataset = imagefolder_images(root).write(url, overwrite=True)
    if dataset.num_samples != len(folder):  # sample i must be the same file for every competitor
        raise RuntimeError(f"{url} holds {dataset.num_samples} samples, the image folder {len(folder)}")
    selection = random_select(dataset, keep, seed=0)
    peers: dict[str, Any] = {}
    missing = []
    if import_webdataset() is not None:
        peers["webdataset"] = write_tar_shards(folder, workdir / "wds", per_shard=-(-num_images // 8))
    else:
        missing.append("webdataset")
    if import_streaming() is not None:
        write_mds(folder, workdir / "mds", size_limit=max(1 << 16, int(sizes.sum()) // 8))
        warnings.filterwarnings("ignore", module=r"streaming\.")  # its advice on predownload etc.
        peers["mds"] = workdir / "mds"
    else:
        missing.append("mosaicml-streaming")
    for name in missing:
        print(f"  {name} not installed: its rows are skipped", flush=True)
    tar_bytes = sum(os.path.getsize(path) for path in peers.get("webdataset", []))

    rows = {}
    for subset, ids in (("full", None), (f"keep {keep:.0%}", selection.ids)):
        runs: dict[str, list[float]] = {}
        read = {}
        # Rounds of every competitor in turn, so that the machine's drift reaches each alike; one
        # loader alive at a time (an MDS StreamingDataset's folder is free once it is freed).
        for _ in range(repeats):
            for name, make in image_competitors(dataset, folder, peers, images, ids, batch_size).items():
                loader = make()
                runs.setdefault(name, []).append(epoch_rate(loader, consume=lambda x: x))
                if isinstance(loader, StreamingLoader):  # its first epoch: the cache serves the later ones
                    stats = loader.io_stats()
                    read[name], full_epoch_bytes = stats["per_epoch"][0]["bytes"], stats["full_epoch_bytes"]
                del loader
        rates = {name: float(np.median(r)) for name, r in runs.items()}
        for name, rate in rates.items():
            spread = f"({min(runs[name]):,.0f}-{max(runs[name]):,.0f})" if repeats > 1 else ""
            print(f"  {subset:<9} {name:<34} {rate:>10,.0f} samples/s {spread}", flush=True)
        picked = ids if ids is not None else np.arange(num_images)
        read["ImageFolder"] = int(sizes[picked].sum())
        if "webdataset" in peers:
            read["WebDataset"] = tar_bytes
        if "mds" in peers:
            read["MDS StreamingDataset"], read["MDS shards touched"] = mds_read_bytes(workdir / "mds", ids)
        rows[subset] = {
            "samples": len(picked),
            "samples_per_second": rates,
            "runs": runs,
            **against_peers(rates),
            "bytes_read": read,
        }
    return {
        "images": num_images,
        "sides": list(sides),
        "classes": PHOTO_CLASSES,
        "jpeg_bytes": int(sizes.sum()),
        "store_bytes": full_epoch_bytes,
        "shard_samples": dataset.shard_samples,
        "transform": {"size": images.size, "crop_area": list(images.crop_area), "flip": True, "normalize": True},
        "not_installed": missing,
        "results": rows,
    }


def report(results: list[dict]) -> None:
    print()
    for result in results:
        print(f"sample {result['dtype']} {tuple(result['sample_shape'])}, default backend {result['default_backend']}:")
        for subset, row in result["results"].items():
            for name, ratio in row["ours_over"].items():
                print(f"  {subset:<9} StreamingLoader (default) / {name:<36} {ratio:>6.2f}x")
            for name, cost in row["checked_over_unchecked"].items():
                print(f"  {subset:<9} {name}, checked / unchecked {'':<13} {cost:>6.2f}x")


def report_images(result: dict) -> None:
    sides = "–".join(map(str, result["sides"]))
    print(f"\n{result['images']} JPEGs of {sides} px ({result['jpeg_bytes'] / 1e6:.1f} MB) as float32 (3, 224, 224):")
    for subset, row in result["results"].items():
        ours, best = row["ours"], row["best_peer"]
        for name in OURS:
            ratio = row["over_best_peer"][name]
            print(f"  {subset:<9} {name:<23} / best peer ({best}) {ratio:>6.2f}x")
        for name, ratio in row["ours_over"].items():
            print(f"  {subset:<9} ours ({ours}) / {name:<34} {ratio:>6.2f}x")
    store = result["store_bytes"] / 1e6
    print(f"bytes read an epoch (ours: its first; the cache serves the next), against the store's {store:.2f} MB:")
    for subset, row in result["results"].items():
        for name, read in row["bytes_read"].items():
            print(f"  {subset:<9} {name:<34} {read / 1e6:>8.2f} MB {read / result['store_bytes']:>6.3f}")


def plot(results: list[dict], image_result: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (f"{r['dtype']} samples of shape {tuple(r['sample_shape'])}", r["results"], "log") for r in results
    ]  # the competitors differ by orders of magnitude
    if image_result is not None:
        title = f"JPEGs of {'–'.join(map(str, image_result['sides']))} px → (3, 224, 224), augmented"
        panels.append((title, image_result["results"], "linear"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6), squeeze=False)
    for ax, (title, rows, scale) in zip(axes[0], panels):
        subsets = list(rows)
        names = list(dict.fromkeys(name for s in subsets for name in rows[s]["samples_per_second"]))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            values = [rows[s]["samples_per_second"].get(name, np.nan) for s in subsets]
            ax.bar(np.arange(len(subsets)) + k * width, values, width, label=name)
        ax.set_xticks(np.arange(len(subsets)) + 0.4 - width / 2, subsets)
        ax.set_yscale(scale)
        ax.set_ylabel(f"samples / s{' (log)' if scale == 'log' else ''}")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=2048, help="JPEGs for the image rows (0: none)")
    parser.add_argument("--image-batch-size", type=int, default=64)
    parser.add_argument("--image-repeats", type=int, default=3, help="rounds of the image rows (medians)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed epochs of the fast rows (medians)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch's threads for the transform (all rows)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--tiny", action="store_true", help="a smoke run: 256 samples in batches of 64, 32 small JPEGs in batches of 8"
    )
    args = parser.parse_args()
    sides = PHOTO_SIDES
    if args.tiny:
        args.samples, args.batch_size, args.repeats = 256, 64, 1
        args.images, args.image_batch_size, args.image_repeats, sides = min(args.images, 32), 8, 1, (48, 96)
    # Every competitor allocates a fresh batch (38 MB of 64 images) each step; glibc would hand it
    # back to the OS and fault it in again (DALI's rows: 10% slower without). Set for all of them,
    # their DataLoader workers included (forked, they inherit it), as a training script would.
    keep_freed_memory()
    # The transform runs in the main process for every row. On 2 cores that the loaders' threads
    # and other jobs share, torch's pool of 2 waits on a descheduled thread: x.float() * 2 + 1 of a
    # uint8 (256, 3, 32, 32) batch took 0.45 ms idle and 8-20 ms loaded, 0.66 ms on one thread.
    torch.set_num_threads(args.torch_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for shape, dtype in (((40,), "float32"), ((3, 32, 32), "uint8")):
            print(f"{dtype} samples of shape {shape}, {args.samples} samples:", flush=True)
            results.append(run(args.samples, args.keep, args.batch_size, shape, dtype, Path(workdir), args.repeats))
        image_result = None
        if args.images:
            print(f"{args.images} JPEGs of {sides[0]}–{sides[1]} px, batches of {args.image_batch_size}:", flush=True)
            image_result = run_images(
                args.images, args.keep, args.image_batch_size, sides, Path(workdir), args.image_repeats
            )
    report(results)
    if image_result is not None:
        report_images(image_result)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "batch_size": args.batch_size,
        "image_batch_size": args.image_batch_size,
        "torch": torch.__version__,
        "torch_threads": args.torch_threads,
        "repeats": args.repeats,
        "image_repeats": args.image_repeats,
        "peers": {
            name: _version(name) for name in ("webdataset", "mosaicml-streaming", "litdata", "nvidia-dali-cuda130")
        },
    }
    out = {"meta": meta, "results": results, "images": image_result}
    (args.out / "loader.json").write_text(json.dumps(out, indent=2))
    plot(results, image_result, args.out / "loader.png")
    print(f"wrote {args.out / 'loader.json'} and {args.out / 'loader.png'}")


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
