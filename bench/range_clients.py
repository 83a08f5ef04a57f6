"""Byte-range clients side by side: is obstore faster than fsspec for the reader's ranges?

    python bench/range_clients.py [--samples 4096] [--keep 0.5] [--out bench/results] [--tiny]

nginx on 127.0.0.1 serves a store of uint8 (3, 32, 32) samples in shards of 512. For `keep` of
the samples, in id order, the same byte ranges are fetched by:
- fsspec's HTTP filesystem, `cat_ranges`, one request a range (what the reader sends when no
  two ranges are worth merging);
- obstore's `get_ranges` per shard object (object_store merges ranges less than 1 MiB apart on
  its own, so it sends fewer, larger requests);
- SelectiveReader with its default coalescing budget (5% extra bytes) and with the budget opened
  to 150%, which merges like obstore does.
Requests and bytes are nginx's own counts. Prints seconds, requests, MB and ratios; writes
range_clients.json. Needs `pip install obstore` for its row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the counting nginx lives with the tests

from servers import Nginx  # noqa: E402

from nearstore import Coalescing, SelectiveReader, open_dataset, write_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 1,024 samples, one repeat")
    args = parser.parse_args()
    if args.tiny:
        args.samples, args.repeats = 1024, 1
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "www").mkdir()
        (tmp / "nginx").mkdir()
        x = rng.integers(0, 256, size=(args.samples, 3, 32, 32), dtype=np.uint8)
        write_dataset(str(tmp / "www" / "ds.zarr"), [{"x": x}], label_array=None, shard_samples=512)
        nginx = Nginx(tmp / "www", tmp / "nginx").wait_ready()
        try:
            results = measure(nginx, args, rng)
        finally:
            nginx.stop()
    base = results["fsspec cat_ranges"]["seconds"]
    print(f"{'client':<32} {'requests':>8} {'MB':>7} {'s':>7} {'s / fsspec':>10}")
    for name, r in results.items():
        print(
            f"{name:<32} {r['requests']:>8} {r['bytes'] / 1e6:>7.2f} {r['seconds']:>7.3f} {r['seconds'] / base:>10.3f}"
        )
    meta = {"samples": args.samples, "keep": args.keep, "sample": "uint8 (3, 32, 32)", "shard_samples": 512}
    (args.out / "range_clients.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out / 'range_clients.json'}")


def measure(nginx: Nginx, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, dict]:
    url = f"{nginx.url}/ds.zarr"
    dataset = open_dataset(url)
    ids = np.sort(rng.choice(args.samples, round(args.keep * args.samples), replace=False))
    indexed = SelectiveReader(dataset, ["x"])
    for shard in range(indexed.num_shards):
        indexed.read_shard(shard)  # every shard index in hand: the ranges below are exact
    layout, index = indexed.layouts["x"], indexed._index["x"]
    shards, chunks = np.divmod(ids, layout.chunks_per_shard)
    starts = index[shards, chunks, 0].astype(np.int64)
    ends = starts + index[shards, chunks, 1].astype(np.int64)
    paths = [layout.shard_path(int(s)) for s in shards]

    runs = {"fsspec cat_ranges": lambda: fsspec.filesystem("http").cat_ranges(paths, starts.tolist(), ends.tolist())}
    try:
        import obstore
        from obstore.store import HTTPStore

        store = HTTPStore.from_url(url, client_options={"allow_http": True})
        relative = [p.split("/ds.zarr/", 1)[1] for p in paths]

        def with_obstore() -> None:
            for shard in np.unique(shards):
                rows = np.flatnonzero(shards == shard)
                obstore.get_ranges(store, relative[rows[0]], starts=starts[rows].tolist(), ends=ends[rows].tolist())

        runs["obstore get_ranges"] = with_obstore
    except ImportError:
        print("obstore is not installed: its row is left out")
    for request_bytes in (0, 1 << 12, 1 << 16):
        runs[f"SelectiveReader request_bytes={request_bytes}"] = _reader_run(dataset, ids, request_bytes)

    results = {}
    for name, run in runs.items():
        best = None
        for _ in range(args.repeats):
            before = nginx.books().gets("/ds.zarr/x/c")
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
            served = nginx.books().gets("/ds.zarr/x/c")[len(before) :]
            row = {"seconds": seconds, "requests": len(served), "bytes": sum(s.bytes for s in served)}
            best = row if best is None or seconds < best["seconds"] else best
        results[name] = best
    return results


def _reader_run(dataset, ids: np.ndarray, request_bytes: int):
    """A reader whose shard indexes are cached already (as in any epoch after the first)."""
    reader = SelectiveReader(dataset, ["x"], reads=Coalescing(request_bytes))
    reader.read(np.arange(0, dataset.num_samples, reader.layouts["x"].shard_samples))  # one sample a shard
    return lambda: reader.read(ids)


if __name__ == "__main__":
    main()
