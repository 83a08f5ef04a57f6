"""Seconds, bytes, requests and dollars of 3 epochs over object storage 20 ms and 100 MB/s away:
StreamingLoader against MosaicML Streaming and LitData on the same data and the same selection.

    python bench/io_savings.py [--latency 0.02] [--bandwidth 100e6] [--epochs 3]
        [--mnist1d 10000] [--images 1024] [--out bench/results] [--tiny] [--report io_savings.json]

moto's S3 runs on 127.0.0.1 in a process of its own behind `tests/faults.py`'s SlowLink: each
answer's first byte `--latency` s after moto's, every body through one token bucket of
`--bandwidth` bytes/s shared by all connections (tests/slow_link.py). Every loader reads through
the link, and the link counts what crossed it: requests by kind and bytes, per epoch. Two sets,
each stored three ways with the same number of samples a shard: MNIST-1D (float32 (40,) + label,
small samples) and photo-like JPEGs (`synthetic.write_photos`, ~46 kB each, decoded by every
loader with the same `ImageTransform`). For a random selection of 10%, 25% and 100% (the same ids
for all), 3 epochs of one round, each loader made once before its first epoch (that is counted in
epoch 1):

- StreamingLoader, its defaults (s3fs, the sample cache, `Coalescing()`: a request worth 64 KiB),
  with `cache=False`, and with exact ranges (`Coalescing(0)`: only the selected samples' bytes,
  a request a run of adjacent ones);
- StreamingLoader reading through obstore's fsspec store registered for s3:// in place of s3fs
  (object store's client, which merges ranges less than 1 MiB apart and fetches them
  concurrently); obstore 0.12's store refuses an open-ended range and raises the first error of a
  `cat_ranges`, both of which the reader needs, so `obstore_filesystem` adds them;
- MosaicML Streaming: `StreamingDataset(remote="s3://...", local=<its own cache dir>)` over MDS
  shards (`MDSWriter`), the endpoint from S3_ENDPOINT_URL; the selection is read by id
  (`dataset[i]` in the epoch's shuffled order, batches of the same size: what a DataLoader with a
  `SubsetRandomSampler` and no workers does); each shard holding a selected sample is downloaded
  whole into its cache on first use and read there after;
- LitData: `StreamingDataset("s3://...", cache_dir=<its own>, storage_options=endpoint + keys,
  shuffle=True)` over chunks written by `litdata.optimize`, iterated in its own order, the samples
  outside the selection dropped (each sample carries its id). It downloads every chunk whole (its
  by-id access, `dataset[i]`, reads two ranges a sample instead, measured at 402 requests for 200
  MNIST-1D samples, 27 s an epoch: not its streaming path, not run here). LitData's obstore client
  does not allow plain HTTP: the bench adds `allow_http` to its client options
  (`litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS`), the one setting a plain-HTTP
  S3-compatible endpoint needs.

Peers decode images in a pool of 2 threads with PIL (`ImageTransform.decode`); StreamingLoader
decodes in DALI's CPU pipeline with 2 threads. Neither peer imports torchvision on these paths:
MosaicML Streaming is entered past its two `__init__` files (bench/loader.py's `import_streaming`),
LitData imports it lazily and only for image serializers this bench does not use.

The stand-in is Python on this machine's cores: moto and the link spend about 5 ms of CPU a
request (230 ranged GETs: 1.2-1.3 s of the child's CPU), which real S3 spends on its own machines,
and which competes with the loaders' decoding here. Each epoch records that CPU (/proc of the
child), and the ratios are printed again on the seconds less it.

Dollars from S3's public prices (us-east-1, Standard): GET and HEAD $0.0004 per 1,000 requests,
LIST and PUT $0.005 per 1,000, data transfer out to the internet $0.09 per GB (in-region: $0).
Prints per-epoch rows and ratios ours / best peer; writes io_savings.json and io_savings.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]  # the slow link lives with the tests

from loader import import_streaming  # noqa: E402
from slow_link import KEYS, LinkedS3  # noqa: E402

from loaders import StoreSource, StreamingLoader  # noqa: E402
from nearstore import Coalescing, Selection, open_dataset, random_select, write_dataset  # noqa: E402
from nearstore.app.converters import mnist1d_batches  # noqa: E402
from nearstore.app.encoded_converters import imagefolder_files, imagefolder_images  # noqa: E402
from nearstore.app.synthetic import write_photos  # noqa: E402
from nearstore.storage import DEFAULT_READS  # noqa: E402
from nearstore.storage.images import ImageTransform  # noqa: E402

KEEPS = (0.1, 0.25, 1.0)
EXACT = "StreamingLoader, exact ranges"  # Coalescing(0): only the selected samples' bytes, a request a run
# S3 Standard, us-east-1: $ per request by kind, $ per GB (2^30 bytes) out to the internet.
PRICE_PER_REQUEST = {"GET": 0.0004e-3, "HEAD": 0.0004e-3, "LIST": 0.005e-3, "PUT": 0.005e-3, "POST": 0.005e-3}
PRICE_PER_GB_OUT = 0.09


@dataclass
class StoredSet:
    """One data set stored three ways in the bucket."""

    name: str
    num_samples: int
    batch_size: int
    shard_samples: int
    encoded: bool
    zarr: str  # s3:// URLs; None: that peer is not installed
    mds: str | None
    litdata: str | None
    stored_bytes: dict[str, int]


def epochs_through(link: LinkedS3, epochs: int, make: Callable[[], Any], epoch: Callable[[Any, int], int]) -> list:
    """Per epoch: seconds, samples delivered, what crossed the link (epoch 1 with `make`), and
    the CPU seconds the S3 stand-in spent serving it (`server_cpu_seconds`)."""
    gc.collect()
    link.take()
    rows, started, served = [], time.perf_counter(), link.cpu_seconds()
    state = make()
    for e in range(epochs):
        samples = epoch(state, e)
        seconds = time.perf_counter() - started
        crossed = link.take()
        server = link.cpu_seconds()
        rows.append({"seconds": seconds, "samples": samples, **crossed, "server_cpu_seconds": server - served})
        started, served = time.perf_counter(), server
    del state
    return rows


def drain(batches: Iterator) -> int:
    return sum(len(batch[1]) for batch in batches)


# Our loader, over s3fs or obstore.
def ours(
    data: StoredSet, ids: np.ndarray, options: dict, reads: Coalescing = DEFAULT_READS, **kwargs: Any
) -> tuple[Callable, Callable]:
    def make() -> StreamingLoader:
        source = StoreSource(data.zarr, storage_options=options, reads=reads)
        return StreamingLoader(source, ids, batch_size=data.batch_size, device="cpu", **kwargs)

    def epoch(loader: StreamingLoader, e: int) -> int:
        loader.set_epoch(e)
        return drain(iter(loader))

    return make, epoch


def obstore_options(endpoint: str) -> dict:
    """obstore's FsspecStore options for moto through the link."""
    config = {"endpoint": endpoint, "access_key_id": KEYS["key"], "secret_access_key": KEYS["secret"]}
    return {"config": {**config, "region": "us-east-1"}, "client_options": {"allow_http": True}}


class ObstoreAsS3:
    """obstore's fsspec store registered for s3:// while inside (`obstore_filesystem`), s3fs again after."""

    def __enter__(self) -> None:
        fsspec.register_implementation("s3", obstore_filesystem(), clobber=True)

    def __exit__(self, *exc) -> None:
        import s3fs

        fsspec.register_implementation("s3", s3fs.S3FileSystem, clobber=True)


def obstore_filesystem() -> type:
    """obstore's fsspec store for s3:// with the two things the reader asks of fsspec's
    `cat_ranges` that obstore 0.12's lacks: a range to the end of an object (end None: obstore
    raises TypeError) and errors in place of bytes (on_error="return": obstore raises the first),
    a missing object as FileNotFoundError (obstore's NotFoundError is none)."""
    import asyncio

    from obstore.exceptions import NotFoundError
    from obstore.fsspec import FsspecStore

    class ObstoreS3(FsspecStore):
        protocol = "s3"

        async def _cat_ranges(self, paths, starts, ends, max_gap=None, batch_size=None, on_error="return", **kwargs):
            n = len(paths)
            starts = [starts] * n if isinstance(starts, int) else list(starts)
            ends = [ends] * n if isinstance(ends, int) or ends is None else list(ends)
            by_path: dict[str, list[int]] = {}
            for k, path in enumerate(paths):
                by_path.setdefault(path, []).append(k)

            async def of_object(path: str, members: list[int]) -> list:
                ranged = [k for k in members if ends[k] is not None and (starts[k] or 0) >= 0]
                whole = [k for k in members if k not in set(ranged)]
                blobs = await FsspecStore._cat_ranges(
                    self, [path] * len(ranged), [starts[k] or 0 for k in ranged], [ends[k] for k in ranged]
                )
                if whole:
                    data = await self._cat_file(path)
                    blobs += [data[slice(starts[k], ends[k])] for k in whole]
                return list(zip(ranged + whole, blobs))

            out: list = [b""] * n
            answers = await asyncio.gather(*(of_object(p, m) for p, m in by_path.items()), return_exceptions=True)
            for (path, members), answer in zip(by_path.items(), answers):
                if isinstance(answer, BaseException):
                    error = FileNotFoundError(path) if isinstance(answer, NotFoundError) else OSError(str(answer))
                    if on_error != "return":
                        raise error from answer
                    for k in members:
                        out[k] = error
                else:
                    for k, blob in answer:
                        out[k] = blob
            return out

    return ObstoreS3


# The peers: batches of decoded samples, as a DataLoader with no workers would hand them over.
class Collate:
    """Samples (dicts of x, y) into a batch (x, y) of tensors; images decoded in 2 threads."""

    def __init__(self, encoded: bool) -> None:
        self.images = ImageTransform() if encoded else None
        self.pool = ThreadPoolExecutor(2) if encoded else None

    def __call__(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is not None:
            x = np.stack(list(self.pool.map(self.images.decode, [s["x"] for s in samples])))
        else:
            x = np.stack([s["x"] for s in samples])
        return torch.from_numpy(x), torch.tensor([int(s["y"]) for s in samples])


def mosaicml(data: StoredSet, ids: np.ndarray, cache_dir: Path, collate: Collate) -> tuple[Callable, Callable]:
    StreamingDataset, _ = import_streaming()

    def make():
        return StreamingDataset(remote=data.mds, local=str(cache_dir), batch_size=data.batch_size)

    def epoch(dataset, e: int) -> int:
        order = np.random.default_rng(e).permutation(ids)
        batches = (
            collate([dataset[int(i)] for i in order[k : k + data.batch_size]])
            for k in range(0, len(order), data.batch_size)
        )
        return drain(batches)

    return make, epoch


def litdata_peer(
    data: StoredSet, ids: np.ndarray, cache_dir: Path, collate: Collate, endpoint: str
) -> tuple[Callable, Callable]:
    import litdata

    selected = np.zeros(data.num_samples, dtype=bool)
    selected[ids] = True
    options = {"endpoint_url": endpoint, "aws_access_key_id": KEYS["key"], "aws_secret_access_key": KEYS["secret"]}

    def make():
        return litdata.StreamingDataset(data.litdata, cache_dir=str(cache_dir), storage_options=options, shuffle=True)

    def epoch(dataset, e: int) -> int:
        dataset.set_epoch(e + 1)

        def batches() -> Iterator:
            batch = []
            for sample in dataset:
                if selected[sample["id"]]:
                    batch.append(sample)
                    if len(batch) == data.batch_size:
                        yield collate(batch)
                        batch = []
            if batch:
                yield collate(batch)

        return drain(batches())

    return make, epoch


def allow_http_for_litdata() -> bool:
    """LitData's obstore client refuses plain http://: allow it (see the module docstring). False
    where LitData is not installed."""
    try:
        from litdata.streaming import downloader
    except ImportError:
        return False
    downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}
    return True


# The data, stored three ways.
def samples_of(name: str, num_samples: int, workdir: Path) -> tuple[list, np.ndarray, Callable[[], Iterator]]:
    """(x per sample, labels, batches for write_dataset) of a set."""
    if name == "mnist1d":
        parts = list(mnist1d_batches(num_samples))
        x = np.concatenate([p["x"] for p in parts])
        y = np.concatenate([p["y"] for p in parts])
        return list(x), y, lambda: iter(parts)
    root = write_photos(workdir / "photos", num_samples)
    files, _ = imagefolder_files(root)
    x = [Path(path).read_bytes() for path, _ in files]
    y = np.array([label for _, label in files], dtype=np.int64)
    return x, y, lambda: imagefolder_images(root).batches()


def litdata_item(sample: tuple[int, Any, int]) -> dict:
    """A sample as LitData stores it (a module function: litdata.optimize's worker calls it)."""
    i, x, y = sample
    return {"id": i, "x": x, "y": y}


def store(
    name: str, num_samples: int, shard_samples: int, batch_size: int, s3: LinkedS3, workdir: Path, litdata: bool
) -> StoredSet:
    x, y, batches = samples_of(name, num_samples, workdir)
    encoded = name != "mnist1d"
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.storage_options)
    write_dataset(f"s3://bench/{name}.zarr", batches(), shard_samples=shard_samples, storage_options=s3.storage_options)
    formats = {"zarr": True, "mds": import_streaming() is not None, "litdata": litdata}
    if formats["mds"]:
        write_mds(x, y, encoded, shard_samples, workdir / f"{name}.mds")
        fs.put(str(workdir / f"{name}.mds"), f"bench/{name}.mds", recursive=True)
    if formats["litdata"]:
        write_litdata(x, y, shard_samples, workdir / f"{name}.litdata")
        fs.put(str(workdir / f"{name}.litdata"), f"bench/{name}.litdata", recursive=True)
    stored = {f: sum(fs.du(f"bench/{name}.{f}", total=False).values()) for f, made in formats.items() if made}
    url = {f: f"s3://bench/{name}.{f}" if made else None for f, made in formats.items()}
    return StoredSet(
        name, num_samples, batch_size, shard_samples, encoded, url["zarr"], url["mds"], url["litdata"], stored
    )


def write_mds(x: list, y: np.ndarray, encoded: bool, shard_samples: int, mds_dir: Path) -> None:
    _, MDSWriter = import_streaming()
    num_samples = len(x)
    nbytes = sum(len(b) for b in x) if encoded else sum(a.nbytes for a in x)
    columns = {"x": "bytes" if encoded else f"ndarray:float32:{x[0].shape[0]}", "y": "int"}
    # MDS shards close at size_limit bytes: set so that they hold shard_samples samples, as ours
    with MDSWriter(out=str(mds_dir), columns=columns, size_limit=int(nbytes / num_samples * shard_samples * 1.02)) as w:
        for xi, yi in zip(x, y):
            w.write({"x": xi, "y": int(yi)})


def write_litdata(x: list, y: np.ndarray, shard_samples: int, lit_dir: Path) -> None:
    import litdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        litdata.optimize(
            fn=litdata_item,
            inputs=[(i, xi, int(yi)) for i, (xi, yi) in enumerate(zip(x, y))],
            output_dir=str(lit_dir),
            chunk_size=shard_samples,
            num_workers=1,
            verbose=False,
        )


def run_set(data: StoredSet, s3: LinkedS3, keeps: tuple[float, ...], epochs: int, workdir: Path) -> dict:
    dataset = open_dataset(data.zarr, storage_options=s3.storage_options)
    os.environ.update(  # MosaicML Streaming's S3 client reads these
        S3_ENDPOINT_URL=s3.link_endpoint,
        AWS_ACCESS_KEY_ID=KEYS["key"],
        AWS_SECRET_ACCESS_KEY=KEYS["secret"],
        AWS_DEFAULT_REGION="us-east-1",
    )
    collate = Collate(data.encoded)

    def loaders(ids: np.ndarray, caches: Path) -> dict[str, tuple[Callable, Callable]]:
        runs = {"StreamingLoader": ours(data, ids, s3.link_options)}
        runs["StreamingLoader, cache=False"] = ours(data, ids, s3.link_options, cache=False)
        runs[EXACT] = ours(data, ids, s3.link_options, reads=Coalescing(0))
        runs["StreamingLoader on obstore"] = ours(data, ids, obstore_options(s3.link_endpoint))
        if data.mds:
            runs["MosaicML Streaming"] = mosaicml(data, ids, caches / "mds", collate)
        if data.litdata:
            runs["LitData"] = litdata_peer(data, ids, caches / "litdata", collate, s3.link_endpoint)
        return runs

    # One untimed epoch of each on a few samples first: the first loader of a kind in the process
    # pays for clients, pools and imports (seen: 1.5 s against 0.5 for the same reads).
    for name, (make, epoch) in loaders(np.arange(data.batch_size), workdir / f"warm-up-{data.name}").items():
        with ObstoreAsS3() if "obstore" in name else contextlib.nullcontext():
            epochs_through(s3, 1, make, epoch)
    rows = {}
    for keep in keeps:
        selection: Selection = random_select(dataset, keep, seed=0)
        ids = np.sort(selection.ids)
        runs = loaders(ids, workdir / f"caches-{data.name}-{keep}")
        row: dict[str, Any] = {}
        if not data.mds:
            row["MosaicML Streaming"] = "not run: mosaicml-streaming is not installed (bench/loader.py says how)"
        if not data.litdata:
            row["LitData"] = (
                "not run: litdata is not installed (pip install --no-deps litdata lightning-utilities tifffile)"
            )
        for name, (make, epoch) in runs.items():
            print(f"  {data.name} {keep:.0%} {name}", flush=True)
            try:
                if "obstore" in name:
                    with ObstoreAsS3():
                        row[name] = epochs_through(s3, epochs, make, epoch)
                else:
                    row[name] = epochs_through(s3, epochs, make, epoch)
            except Exception as e:  # a peer that fails keeps its row, with why
                row[name] = f"not run: {type(e).__name__}: {e}"
                print(f"    {row[name]}", flush=True)
                continue
            delivered = {r["samples"] for r in row[name]}
            if delivered != {len(ids)}:
                raise RuntimeError(f"{name} delivered {delivered} samples an epoch, not {len(ids)}")
        rows[f"{keep:.0%}"] = {"samples": len(ids), "loaders": row}
    return rows


# Figures.
def dollars(epochs: list[dict]) -> tuple[float, float]:
    """($ of requests, $ of transfer out to the internet) over the epochs."""
    requests = sum(PRICE_PER_REQUEST.get(kind, 0.0004e-3) * n for e in epochs for kind, n in e["requests"].items())
    transfer = sum(sum(e["bytes"].values()) for e in epochs) / 2**30 * PRICE_PER_GB_OUT
    return requests, transfer


def totals(epochs: list[dict]) -> dict[str, Any]:
    requests, transfer = dollars(epochs)
    return {
        "seconds": [e["seconds"] for e in epochs],
        # real S3 spends none of this machine's CPU: the seconds less what the stand-in spent here
        "seconds_less_server": [e["seconds"] - e.get("server_cpu_seconds", 0.0) for e in epochs],
        "requests": [sum(e["requests"].values()) for e in epochs],
        "bytes": sum(sum(e["bytes"].values()) for e in epochs),
        "dollars_in_region": requests,
        "dollars_to_internet": requests + transfer,
    }


def report(results: dict, stored: dict) -> dict:
    """Print the table and ratios; return the summary rows."""
    summary = {}
    print(
        f"\n{'set':<8} {'keep':>5} {'loader':<30} {'epoch s':>20} {'requests':>18} {'MB, all ep':>10} "
        f"{'µ$ in-region':>12} {'µ$ internet':>11}"
    )
    for set_name, rows in results.items():
        print(f"{set_name}: stored {', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in stored[set_name].items())}")
        for keep, row in rows.items():
            made = {name: totals(e) for name, e in row["loaders"].items() if isinstance(e, list)}
            for name, value in row["loaders"].items():
                if name not in made:
                    print(f"{set_name:<8} {keep:>5} {name:<30} {value}")
                    continue
                t = made[name]
                seconds = " ".join(f"{s:.2f}" for s in t["seconds"])
                requests = " ".join(str(n) for n in t["requests"])
                print(
                    f"{set_name:<8} {keep:>5} {name:<30} {seconds:>20} {requests:>18} {t['bytes'] / 1e6:>10.2f} "
                    f"{t['dollars_in_region'] * 1e6:>12.2f} {t['dollars_to_internet'] * 1e6:>11.2f}"
                )
            peers = {n: t for n, t in made.items() if not n.startswith("StreamingLoader")}
            for ours_name in ("StreamingLoader", EXACT):
                if ours_name not in made or not peers:
                    continue
                key = f"{set_name} {keep}" + ("" if ours_name == "StreamingLoader" else ", exact ranges")
                s = summary[key] = against_peers(made[ours_name], peers)
                later = "" if s["later_ratio"] is None else f", later epochs {s['later_ratio']:.2f} ({s['later_peer']})"
                print(
                    f"{'':<14} {ours_name} / best peer: bytes {s['bytes_ratio']:.3f} ({s['fewest_bytes_peer']}); "
                    f"seconds {s['seconds_ratio']:.2f} ({s['fastest_peer']}), epoch 1 {s['epoch1_ratio']:.2f} "
                    f"({s['epoch1_peer']}){later}; $ to the internet {s['dollars_ratio']:.3f}; "
                    f"requests after epoch 1: {s['requests_after_first']}"
                )
                print(
                    f"{'':<14} less the stand-in's CPU: seconds {s['seconds_less_server_ratio']:.2f} "
                    f"({s['fastest_less_server_peer']}), epoch 1 {s['epoch1_less_server_ratio']:.2f}"
                )
    return summary


def against_peers(ours_: dict, peers: dict[str, dict]) -> dict:
    """Ours against the best peer at each figure: the fewest bytes, the shortest epochs (3 epochs in
    all; epoch 1, which pays the reads; the later ones), the fewest dollars."""
    fewest = min(peers, key=lambda n: peers[n]["bytes"])
    fastest = min(peers, key=lambda n: sum(peers[n]["seconds"]))
    first = min(peers, key=lambda n: peers[n]["seconds"][0])
    later = min(peers, key=lambda n: sum(peers[n]["seconds"][1:]) or 1.0)
    cheapest = min(peers, key=lambda n: peers[n]["dollars_to_internet"])
    less = {n: t["seconds_less_server"] for n, t in peers.items()}
    fastest_less = min(less, key=lambda n: sum(less[n]))
    return {
        "seconds_less_server_ratio": sum(ours_["seconds_less_server"]) / sum(less[fastest_less]),
        "fastest_less_server_peer": fastest_less,
        "epoch1_less_server_ratio": ours_["seconds_less_server"][0] / min(t[0] for t in less.values()),
        "bytes_ratio": ours_["bytes"] / peers[fewest]["bytes"],
        "fewest_bytes_peer": fewest,
        "seconds_ratio": sum(ours_["seconds"]) / sum(peers[fastest]["seconds"]),
        "fastest_peer": fastest,
        "epoch1_ratio": ours_["seconds"][0] / peers[first]["seconds"][0],
        "epoch1_peer": first,
        "later_ratio": (sum(ours_["seconds"][1:]) / sum(peers[later]["seconds"][1:]))
        if len(ours_["seconds"]) > 1
        else None,
        "later_peer": later,
        "dollars_ratio": ours_["dollars_to_internet"] / peers[cheapest]["dollars_to_internet"],
        "requests_after_first": ours_["requests"][1:],
    }


def plot(results: dict, stored: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results)
    fig, axes = plt.subplots(2, len(sets), figsize=(6 * len(sets), 8), squeeze=False)
    for col, set_name in enumerate(sets):
        rows = results[set_name]
        keeps = list(rows)
        names = list(next(iter(rows.values()))["loaders"])
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            made = [rows[keep]["loaders"][name] for keep in keeps]
            at = np.arange(len(keeps)) + k * width
            mb = [sum(sum(e["bytes"].values()) for e in m) / 1e6 if isinstance(m, list) else 0 for m in made]
            seconds = [float(np.mean([e["seconds"] for e in m])) if isinstance(m, list) else 0 for m in made]
            axes[0, col].bar(at, mb, width, label=name)
            axes[1, col].bar(at, seconds, width, label=name)
        for ax, label in ((axes[0, col], f"MB over the epochs (store: {stored[set_name]['zarr'] / 1e6:.1f} MB)"),):
            ax.set(ylabel=label, title=f"{set_name}: bytes through the link")
        axes[1, col].set(ylabel="mean epoch s", title=f"{set_name}: epoch seconds")
        for ax in axes[:, col]:
            ax.set_xticks(np.arange(len(keeps)) + 0.4 - width / 2, keeps)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.02, help="s to each answer's first byte (default 0.02)")
    parser.add_argument("--bandwidth", type=float, default=100e6, help="bytes/s of the link (default 100e6)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mnist1d", type=int, default=10_000, help="MNIST-1D samples (0: leave the set out)")
    parser.add_argument("--images", type=int, default=1024, help="JPEG samples (0: leave the set out)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 1,024 + 64 samples, keep 25%%")
    parser.add_argument("--report", type=Path, help="print the table of an io_savings.json written before, run nothing")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        report(saved["results"], saved["meta"]["stored_bytes"])
        return
    keeps = (0.25,) if args.tiny else KEEPS
    if args.tiny:
        args.mnist1d, args.images = 1024, 64
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    for flag, value in (("--mnist1d", args.mnist1d), ("--images", args.images)):
        if value == 1 or value < 0:  # a set is at least two shards of a sample
            parser.error(f"{flag} takes 0 (leave the set out) or at least 2 samples, got {value}")
    if not args.mnist1d and not args.images:
        parser.error("--mnist1d 0 and --images 0 leave nothing to run")
    sets = {"mnist1d": (args.mnist1d, 1024, 128), "images": (args.images, 128, 64)}  # samples, a shard, a batch
    sets = {name: (n, min(shard, n // 2), batch) for name, (n, shard, batch) in sets.items() if n}
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", module=r"streaming\.")  # MosaicML's advice on predownload etc.
    litdata = allow_http_for_litdata()
    results, stored = {}, {}
    with tempfile.TemporaryDirectory() as workdir, LinkedS3(latency=args.latency, bandwidth=args.bandwidth) as s3:
        fsspec.filesystem("s3", skip_instance_cache=True, **s3.storage_options).mkdir("bench")
        for name, (num_samples, shard_samples, batch_size) in sets.items():
            print(f"{name}: writing {num_samples} samples three ways", flush=True)
            data = store(name, num_samples, shard_samples, batch_size, s3, Path(workdir), litdata)
            stored[name] = data.stored_bytes
            results[name] = run_set(data, s3, keeps, args.epochs, Path(workdir))
    summary = report(results, stored)
    meta = {
        "latency_s": args.latency,
        "bandwidth_bytes_per_s": args.bandwidth,
        "epochs": args.epochs,
        "sets": {name: {"samples": n, "shard_samples": s, "batch_size": b} for name, (n, s, b) in sets.items()},
        "stored_bytes": stored,
        "prices": {"per_request": PRICE_PER_REQUEST, "per_GB_out": PRICE_PER_GB_OUT},
    }
    out = {"meta": meta, "results": results, "summary": summary}
    (args.out / "io_savings.json").write_text(json.dumps(out, indent=2))
    plot(results, stored, args.out / "io_savings.png")
    print(f"wrote {args.out / 'io_savings.json'} and {args.out / 'io_savings.png'}")


if __name__ == "__main__":
    main()
