"""Byte-range clients side by side on one selection: fsspec, obstore, zarr itself, SelectiveReader.

    python bench/range_clients.py [--samples 4096] [--keep 0.5] [--repeats 5] [--out bench/results] [--tiny]

nginx on 127.0.0.1 serves a store of uint8 (3, 32, 32) samples in shards of 512. For `keep` of
the samples, in id order, the same samples are fetched by:
- fsspec's HTTP filesystem, `cat_ranges`, one request a sample's range;
- obstore's `get_ranges` per shard object (object_store merges ranges under 1 MiB apart on its
  own, so it sends fewer, larger requests);
- zarr itself, `get_orthogonal_selection` on the opened array (whichever zarr is installed: up to
  3.2 a request an inner chunk; from 3.3 nearby ranges of a shard merged and fetched concurrently),
  which reads each touched shard's index again on every call;
- SelectiveReader with a request worth 0, 4 KiB, 64 KiB (the default) and 1 MiB (the hole zarr 3.3+
  reads through), its shard indexes known (any epoch after the first); and with the default and no
  index known yet (a first read, as every read of zarr's is).
Requests and bytes are nginx's own counts of shard objects (any method); seconds are the median of
`repeats`. Runs without torch. Writes range_clients.json. Needs `pip install obstore` for its row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import fsspec
import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the counting nginx lives with the tests

from servers import Nginx  # noqa: E402

from nearstore import Coalescing, SelectiveReader, open_dataset, write_dataset  # noqa: E402

SHARD_SAMPLES = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
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
        write_dataset(str(tmp / "www" / "ds.zarr"), [{"x": x}], label_array=None, shard_samples=SHARD_SAMPLES)
        nginx = Nginx(tmp / "www", tmp / "nginx").wait_ready()
        try:
            results = measure(nginx, args, rng)
        finally:
            nginx.stop()
    base = results["fsspec cat_ranges"]["seconds"]
    print(f"Python {sys.version.split()[0]}, zarr {zarr.__version__}; keep {args.keep} of {args.samples} samples")
    print(f"{'client':<44} {'requests':>8} {'MB':>7} {'s':>7} {'s / fsspec':>10}")
    for name, r in results.items():
        print(
            f"{name:<44} {r['requests']:>8} {r['bytes'] / 1e6:>7.2f} {r['seconds']:>7.3f} {r['seconds'] / base:>10.3f}"
        )
    meta = {
        "samples": args.samples,
        "keep": args.keep,
        "sample": "uint8 (3, 32, 32)",
        "shard_samples": SHARD_SAMPLES,
        "python": sys.version.split()[0],
        "zarr": zarr.__version__,
        "seconds": f"median of {args.repeats}",
    }
    (args.out / "range_clients.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out / 'range_clients.json'}")


def measure(nginx: Nginx, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, dict]:
    url = f"{nginx.url}/ds.zarr"
    ids = np.sort(rng.choice(args.samples, round(args.keep * args.samples), replace=False))
    paths, starts, ends = _sample_ranges(open_dataset(url), ids)
    http = fsspec.filesystem("http")
    # name -> what makes the read to time (untimed: opening, the indexes a reader is to know already)
    runs = {"fsspec cat_ranges": lambda: partial(http.cat_ranges, paths, starts.tolist(), ends.tolist())}
    try:
        import obstore
        from obstore.store import HTTPStore

        store = HTTPStore.from_url(url, client_options={"allow_http": True})
        relative = np.array([p.split("/ds.zarr/", 1)[1] for p in paths])

        def with_obstore() -> None:
            for path in np.unique(relative):
                rows = relative == path
                obstore.get_ranges(store, str(path), starts=starts[rows].tolist(), ends=ends[rows].tolist())

        runs["obstore get_ranges"] = lambda: with_obstore
    except ImportError:
        print("obstore is not installed: its row is left out")
    array = zarr.open_group(url, mode="r", zarr_format=3, use_consolidated=False)["x"]
    runs[f"zarr {zarr.__version__} get_orthogonal_selection"] = lambda: partial(array.get_orthogonal_selection, (ids,))
    for request_bytes in (0, 1 << 12, 1 << 16, 1 << 20):  # 1 MiB: the gap zarr 3.3+ bridges within a shard
        reader = SelectiveReader(open_dataset(url), ["x"], reads=Coalescing(request_bytes))
        reader.read(np.arange(0, args.samples, SHARD_SAMPLES))  # one sample a shard: every index known
        runs[f"SelectiveReader request_bytes={request_bytes}"] = lambda reader=reader: partial(reader.read, ids)
    runs["SelectiveReader, no index known yet"] = lambda: partial(SelectiveReader(open_dataset(url), ["x"]).read, ids)

    results = {}
    for name, make in runs.items():
        seconds = []
        for _ in range(args.repeats):
            read = make()
            before = len(_shard_requests(nginx))
            started = time.perf_counter()
            read()
            seconds.append(time.perf_counter() - started)
            served = _shard_requests(nginx)[before:]
        results[name] = {
            "seconds": statistics.median(seconds),
            "requests": len(served),
            "bytes": sum(s.bytes for s in served),
        }
    return results


def _shard_requests(nginx: Nginx) -> list:
    return [s for s in nginx.books().served if s.path.startswith("/ds.zarr/x/c/")]


def _sample_ranges(dataset, ids: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each sample's shard object and byte range, read off the shard indexes by their documented
    layout (a little-endian uint64 offset and length a chunk, then the index's crc32c)."""
    fs, root = dataset.filesystem()
    shards, chunks = np.divmod(ids, SHARD_SAMPLES)
    index_nbytes = SHARD_SAMPLES * 16 + 4  # (offset, nbytes) a chunk, then a crc32c
    starts, ends, paths = np.empty(len(ids), np.int64), np.empty(len(ids), np.int64), []
    for shard in np.unique(shards):
        path = dataset.shard_path("x", int(shard), root)
        index = np.frombuffer(fs.cat_file(path, start=-index_nbytes)[:-4], dtype="<u8").reshape(-1, 2)
        rows = np.flatnonzero(shards == shard)
        starts[rows] = index[chunks[rows], 0]
        ends[rows] = starts[rows] + index[chunks[rows], 1]
        paths += [path] * len(rows)
    return paths, starts, ends


if __name__ == "__main__":
    main()
