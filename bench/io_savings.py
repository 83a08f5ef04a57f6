"""Bytes, requests and seconds of read-time selection from object storage, as the servers count them.

    python bench/io_savings.py [--samples 4096] [--out bench/results] [--tiny]

Servers on 127.0.0.1, started here and stopped after: moto's S3 (slow, ~300 requests/s: count
bytes and requests with it, not speed) and nginx (HTTP with Range). For keep rates 10/25/50/100%
of a random selection, one epoch of shuffled batches through:
- nearstore: StreamingLoader reading storage itself (cached shard indexes, coalesced ranges);
- server: StreamingLoader("grpc://...") through a NearStoreServer beside the storage (started per
  keep, so its index reads count); requests and bytes are the server's storage reads, and
  `shipped` what crossed Flight to the trainer;
- plain zarr, `array.get_orthogonal_selection(ids)` for the same batches;
- the full data: every shard object read whole, once (what an epoch over everything costs).
Prints ratios (ours / full, ours / zarr); writes io_savings.json and io_savings.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import fsspec
import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the counting servers live with the tests

from servers import Nginx, S3Server  # noqa: E402

from loaders import StreamingLoader  # noqa: E402
from nearstore import Dataset, Selection, open_dataset, random_select, write_dataset  # noqa: E402
from nearstore.serving import NearStoreServer  # noqa: E402

KEEPS = (0.1, 0.25, 0.5, 1.0)
BATCH = 256


def shard_gets(books, prefix: str) -> tuple[int, int]:
    """(requests, bytes) the server answered for shard objects under prefix (not metadata)."""
    served = [s for s in books.gets(prefix) if "/c/" in s.path]
    return len(served), sum(s.bytes for s in served)


def epoch_nearstore(dataset: Dataset, selection: Selection) -> None:
    for _ in StreamingLoader(
        dataset.url, selection, batch_size=BATCH, storage_options=dataset.storage_options, device="cpu"
    ):
        pass


def epoch_server(dataset: Dataset, selection: Selection) -> dict[str, int]:
    server = NearStoreServer(dataset, selection=selection)
    try:
        loader = StreamingLoader(server.url, batch_size=BATCH, device="cpu")
        for _ in loader:
            pass
        return {"shipped": loader.stats.bytes, "shipped_requests": loader.stats.requests}
    finally:
        server.shutdown()


def epoch_zarr(dataset: Dataset, batches: list[np.ndarray]) -> None:
    group = zarr.open_group(dataset.url, mode="r", storage_options=dataset.storage_options or None)
    for batch in batches:
        for name in ("x", "y"):
            group[name].get_orthogonal_selection((np.sort(batch),))


def epoch_full(dataset: Dataset) -> None:
    fs, root = dataset.filesystem()
    fs.cat([dataset.shard_path(name, shard, root) for name in ("x", "y") for shard in range(dataset.num_shards)])


def measure(dataset: Dataset, books, prefix: str, keeps: tuple[float, ...]) -> dict:
    rows = {}
    for keep in keeps:
        selection = random_select(dataset, keep, seed=0)
        order = np.random.default_rng(1).permutation(selection.ids)
        batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
        row = {}
        for name, run in (
            ("nearstore", partial(epoch_nearstore, dataset, selection)),
            ("server", partial(epoch_server, dataset, selection)),
            ("zarr", partial(epoch_zarr, dataset, batches)),
            ("full data", partial(epoch_full, dataset)),
        ):
            before = shard_gets(books(), prefix)
            started = time.perf_counter()
            extra = run() or {}
            seconds = time.perf_counter() - started
            after = shard_gets(books(), prefix)
            row[name] = {"requests": after[0] - before[0], "bytes": after[1] - before[1], "seconds": seconds, **extra}
        rows[f"{keep:.0%}"] = row
    return rows


def report(results: dict) -> None:
    print(
        f"{'store':<6} {'keep':>5} {'path':<10} {'requests':>9} {'MB':>8} {'s':>7}   "
        f"{'bytes/full':>10} {'req/full':>8} {'bytes/zarr':>10} {'req/zarr':>8} {'s/zarr':>7} {'shipped MB':>10}"
    )
    for server, rows in results.items():
        for keep, row in rows.items():
            full, plain = row["full data"], row["zarr"]
            for name, r in row.items():
                ratios, ours = "", r
                if name in ("nearstore", "server"):
                    ratios = (
                        f"{ours['bytes'] / full['bytes']:>10.3f} {ours['requests'] / full['requests']:>8.1f} "
                        f"{ours['bytes'] / plain['bytes']:>10.3f} {ours['requests'] / plain['requests']:>8.3f} "
                        f"{ours['seconds'] / plain['seconds']:>7.3f}"
                    )
                if "shipped" in r:
                    ratios += f" {r['shipped'] / 1e6:>10.2f}"
                print(
                    f"{server:<6} {keep:>5} {name:<10} {r['requests']:>9} {r['bytes'] / 1e6:>8.2f} "
                    f"{r['seconds']:>7.2f}   {ratios}"
                )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for server, rows in results.items():
        keeps = [float(k.rstrip("%")) for k in rows]
        for name, style in (("nearstore", "-o"), ("server", "-^"), ("zarr", "--s")):
            axes[0].plot(
                keeps,
                [r[name]["bytes"] / r["full data"]["bytes"] for r in rows.values()],
                style,
                label=f"{name}, {server}",
            )
            axes[1].plot(keeps, [r[name]["requests"] for r in rows.values()], style, label=f"{name}, {server}")
        axes[1].plot(keeps, [r["full data"]["requests"] for r in rows.values()], ":", label=f"full data, {server}")
    axes[0].set(xlabel="keep (%)", ylabel="bytes / full data", title="bytes fetched for one epoch")
    axes[1].set(xlabel="keep (%)", ylabel="requests", yscale="log", title="requests for one epoch")
    axes[0].axline((0, 0), slope=0.01, color="grey", linewidth=0.8, label="selected share")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 1,024 samples, keep 25%%")
    args = parser.parse_args()
    keeps = (0.25,) if args.tiny else KEEPS
    args.samples = 1024 if args.tiny else args.samples
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {
        "x": rng.integers(0, 256, size=(args.samples, 3, 32, 32), dtype=np.uint8),
        "y": rng.integers(1, 10, args.samples),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        s3 = S3Server().start()
        try:
            fsspec.filesystem("s3", **s3.storage_options).mkdir("bench")
            dataset = write_dataset("s3://bench/ds.zarr", [data], shard_samples=512, storage_options=s3.storage_options)
            results["s3"] = measure(dataset, lambda: s3.books, "/bench/ds.zarr", keeps)
        finally:
            s3.stop()
        (tmp / "www").mkdir()
        (tmp / "nginx").mkdir()
        write_dataset(str(tmp / "www" / "ds.zarr"), [data], shard_samples=512)
        nginx = Nginx(tmp / "www", tmp / "nginx").wait_ready()
        try:
            results["http"] = measure(open_dataset(f"{nginx.url}/ds.zarr"), nginx.books, "/ds.zarr", keeps)
        finally:
            nginx.stop()
    report(results)
    meta = {
        "samples": args.samples,
        "sample": "uint8 (3, 32, 32) + int64 label",
        "shard_samples": 512,
        "batch_size": BATCH,
    }
    (args.out / "io_savings.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, args.out / "io_savings.png")
    print(f"wrote {args.out / 'io_savings.json'} and {args.out / 'io_savings.png'}")


if __name__ == "__main__":
    main()
