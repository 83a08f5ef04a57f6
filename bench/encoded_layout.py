"""How to store encoded samples (JPEG bytes of any length) in Zarr v3: measured, then chosen.

    python bench/encoded_layout.py [--samples 2048] [--keep 0.25] [--out bench/results] [--tiny]

Two layouts of the same photo-like JPEGs (`nearstore.app.synthetic.write_photos`, 300-500 px a
side), both sharded, both opened by zarr-python as they are:
- vlen (ours): zarr's variable-length bytes dtype, one sample an inner chunk, so the shard index
  gives every sample's byte range: a selection reads exactly its samples (+ 8 bytes each) and the
  shard indexes.
- heap: every sample's bytes one after the other in a uint8 array (inner chunks of C bytes), and
  an int64 offsets array; only standard dtypes, but a sample is a run of chunks, and a selection
  reads every chunk its samples touch (the offsets too).
For a random `keep` selection it prints the bytes each layout reads (what a reader that fetches
whole touched chunks, merged as our reader merges ranges, must read) and the store's size, with
the ratio heap / vlen, and times our reader on the vlen store. Writes encoded_layout.json and .png.

Writes, side by side: samples/s of `write_dataset` (which encodes an encoded array's shards itself)
against zarr-python writing the same layout (`array[:] = samples`: zarr encodes each inner chunk in
its event loop), for the JPEGs and for 16,384 token sequences of 20-200 int32 (one sample a chunk
both, and the codecs write_dataset chose: zstd where it saves, then a crc32c).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.dtype import VariableLengthBytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nearstore import SelectiveReader, random_select, write_dataset  # noqa: E402
from nearstore.app.synthetic import write_photos  # noqa: E402
from nearstore.storage.dataset import encoded_bytes  # noqa: E402

HEAP_CHUNKS = (4 << 10, 16 << 10, 64 << 10)
TOKEN_SEQUENCES = 16_384


def write_rates(root: str, name: str, samples: np.ndarray) -> dict[str, float]:
    """Samples/s writing `samples` (an object array) by write_dataset and by zarr-python itself."""
    started = time.perf_counter()
    written = write_dataset(f"{root}/{name}-ours.zarr", [{"x": samples}], label_array=None, progress=False)
    ours = len(samples) / (time.perf_counter() - started)
    compressors = zarr.open_array(f"{written.url}/x", mode="r").compressors  # the same codecs for zarr
    blobs = np.empty(len(samples), dtype=object)  # zarr stores bytes: ragged arrays as theirs
    blobs[:] = [sample.tobytes() if isinstance(sample, np.ndarray) else sample for sample in samples]
    started = time.perf_counter()
    group = zarr.open_group(f"{root}/{name}-zarr.zarr", mode="w")
    array = group.create_array(
        "x", shape=(len(blobs),), dtype=VariableLengthBytes(), chunks=(1,), shards=(1024,),
        compressors=compressors, fill_value=b"", config={"write_empty_chunks": True},
    )  # fmt: skip
    array[:] = blobs
    theirs = len(samples) / (time.perf_counter() - started)
    return {"ours": ours, "zarr": theirs}


def heap_bytes_read(lengths: np.ndarray, ids: np.ndarray, chunk: int) -> tuple[int, int]:
    """Bytes and chunks a heap of inner chunks of `chunk` bytes gives up for samples `ids`: every
    chunk a selected sample touches, whole, and the offsets of the selected samples (8 bytes each,
    read as whole chunks of 1,024 offsets)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    first, last = offsets[ids] // chunk, (offsets[ids + 1] - 1) // chunk
    touched = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)]))
    offset_chunks = np.unique(np.concatenate([ids, ids + 1]) // 1024)
    return int(len(touched) * chunk + len(offset_chunks) * 8 * 1024), int(len(touched))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tiny", action="store_true", help="a few samples, to check the bench runs")
    args = parser.parse_args()
    samples = 64 if args.tiny else args.samples
    with tempfile.TemporaryDirectory() as tmp:
        blobs = [path.read_bytes() for path in sorted(write_photos(f"{tmp}/photos", samples).rglob("*.jpg"))]
        lengths = np.array([len(b) for b in blobs])
        images = np.empty(samples, dtype=object)
        images[:] = blobs
        dataset = write_dataset(f"{tmp}/vlen.zarr", [{"image": images, "y": np.arange(samples) % 4}])
        heap = zarr.open_group(f"{tmp}/heap.zarr", mode="w")
        data = heap.create_array(
            "heap", shape=(int(lengths.sum()),), dtype="uint8", chunks=(4 << 10,), shards=(64 << 20,)
        )
        data[:] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        with encoded_bytes():
            assert list(zarr.open_group(f"{tmp}/vlen.zarr", mode="r")["image"][:8]) == blobs[:8]  # zarr reads ours
        ids = np.sort(random_select(dataset, args.keep, seed=0).ids)
        reader = SelectiveReader(dataset, ["image"])
        started = time.perf_counter()
        got = reader.read(ids)["image"]
        seconds = time.perf_counter() - started
        assert all(got[k] == blobs[i] for k, i in enumerate(ids))
        store = dataset.stored_nbytes(["image"])
        wanted = int(lengths[ids].sum())
        rows = {"vlen": {"bytes_read": reader.stats.bytes, "requests": reader.stats.requests, "read_seconds": seconds}}
        rng = np.random.default_rng(0)
        tokens = np.empty(64 if args.tiny else TOKEN_SEQUENCES, dtype=object)
        tokens[:] = [rng.integers(0, 50_000, rng.integers(20, 201)).astype(np.int32) for _ in tokens]
        writes = {"JPEGs": write_rates(tmp, "jpegs", images), "token sequences": write_rates(tmp, "tokens", tokens)}
        for chunk in HEAP_CHUNKS:
            read, chunks = heap_bytes_read(lengths, ids, chunk)
            rows[f"heap {chunk >> 10} KiB"] = {"bytes_read": read, "chunks": chunks}
    print(
        f"{samples} JPEGs, mean {lengths.mean() / 1e3:.1f} kB; store {store / 1e6:.2f} MB; "
        f"{len(ids)} selected ({args.keep:.0%}), {wanted / 1e6:.2f} MB of samples"
    )
    vlen = rows["vlen"]["bytes_read"]
    for name, row in rows.items():
        row["of_store"] = row["bytes_read"] / store
        row["over_wanted"] = row["bytes_read"] / wanted
        print(
            f"{name:<14} read {row['bytes_read'] / 1e6:8.2f} MB = {row['of_store']:.3f} of the store, "
            f"{row['over_wanted']:.3f}x the samples' bytes, heap / vlen {row['bytes_read'] / vlen:.2f}"
        )
    for name, rate in writes.items():
        print(
            f"writing {name}: write_dataset {rate['ours']:,.0f} samples/s, zarr-python {rate['zarr']:,.0f}, "
            f"ours / zarr {rate['ours'] / rate['zarr']:.1f}x"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"samples": samples, "keep": args.keep, "store_bytes": store, "wanted_bytes": wanted, "rows": rows}
    result["writes"] = writes
    (out / "encoded_layout.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "encoded_layout.png")
    print(f"wrote {out / 'encoded_layout.json'}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(names, [result["rows"][n]["of_store"] for n in names])
    ax.axhline(result["keep"], color="k", lw=0.8, ls="--", label="the selection's share")
    ax.set_ylabel("bytes read / store")
    ax.set_title(f"{result['keep']:.0%} of {result['samples']} JPEGs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
