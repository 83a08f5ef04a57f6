"""Samples/s of StreamingLoader against torch's DataLoader over zarr, same store, same transform.

    python bench/loader.py [--samples 8192] [--keep 0.25] [--out bench/results] [--tiny]

Competitors, one epoch each after a warm-up epoch, on full data and on a `keep` selection:
- StreamingLoader, DALI backend (CPU pipeline here) and plain-torch backend;
- DataLoader over a map-style dataset reading `zarr_array[i]` per sample, num_workers 0 and 2
  (with the same ids through SubsetRandomSampler for the selection);
- DataLoader whose dataset reads a whole batch with one zarr orthogonal selection
  (`__getitems__`), what an informed zarr user would write.
Prints samples/s and ratios (ours / theirs); writes loader.json and loader.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, SubsetRandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import StreamingLoader  # noqa: E402
from nearstore import open_dataset, random_select, write_dataset  # noqa: E402


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


def competitors(dataset, url: str, ids: np.ndarray | None, batch_size: int) -> dict[str, Callable[[], Iterable]]:
    """Each competitor as a maker of an iterable over one epoch's (x, y) batches."""
    sampler = SubsetRandomSampler(ids.tolist()) if ids is not None else None
    torch_loader = {"batch_size": batch_size, "shuffle": sampler is None, "sampler": sampler}
    return {
        "StreamingLoader (DALI)": lambda: StreamingLoader(
            dataset, ids, batch_size=batch_size, backend="dali", device="cpu"
        ),
        "StreamingLoader (torch)": lambda: StreamingLoader(
            dataset, ids, batch_size=batch_size, backend="torch", device="cpu"
        ),
        "DataLoader zarr[i], 0 workers": lambda: DataLoader(ZarrSamples(url), num_workers=0, **torch_loader),
        "DataLoader zarr[i], 2 workers": lambda: DataLoader(ZarrSamples(url), num_workers=2, **torch_loader),
        "DataLoader zarr batch, 0 workers": lambda: DataLoader(
            ZarrBatches(url), num_workers=0, collate_fn=collate_batch, **torch_loader
        ),
    }


def epoch_rate(loader: Iterable, epochs: int = 1) -> float:
    """Samples/s over `epochs` timed epochs, after one untimed warm-up epoch."""
    sum(1 for _ in loader)
    started, samples = time.perf_counter(), 0
    for _ in range(epochs):
        for x, _ in loader:
            samples += len(transform(x))
    return samples / (time.perf_counter() - started)


def run(samples: int, keep: float, batch_size: int, sample_shape: tuple[int, ...], dtype: str, workdir: Path) -> dict:
    rng = np.random.default_rng(0)
    url = str(workdir / f"bench-{samples}-{'x'.join(map(str, sample_shape))}-{dtype}.zarr")
    sizes = [min(4096, samples - start) for start in range(0, samples, 4096)]
    batches = (
        {"x": (rng.normal(size=(n, *sample_shape)) * 40).astype(dtype), "y": rng.integers(0, 10, n)} for n in sizes
    )
    dataset = write_dataset(url, batches, overwrite=True)
    selection = random_select(dataset, keep, seed=0)
    rows = {}
    for subset, ids in (("full", None), (f"keep {keep:.0%}", selection.ids)):
        rates = {}
        for name, make in competitors(dataset, url, ids, batch_size).items():
            rates[name] = epoch_rate(make())
            print(f"  {subset:<9} {name:<34} {rates[name]:>10,.0f} samples/s", flush=True)
        rows[subset] = {"samples": dataset.num_samples if ids is None else len(ids), "samples_per_second": rates}
    return {
        "store": url,
        "sample_shape": list(sample_shape),
        "dtype": dtype,
        "stored_bytes": dataset.stored_nbytes(),
        "results": rows,
    }


def report(results: list[dict]) -> None:
    print()
    for result in results:
        print(f"sample {result['dtype']} {tuple(result['sample_shape'])}:")
        for subset, row in result["results"].items():
            rates = row["samples_per_second"]
            ours = rates["StreamingLoader (DALI)"]
            for name, rate in rates.items():
                if not name.startswith("StreamingLoader"):
                    print(f"  {subset:<9} StreamingLoader (DALI) / {name:<34} {ours / rate:>6.2f}x")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        subsets = list(result["results"])
        names = list(result["results"][subsets[0]]["samples_per_second"])
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            values = [result["results"][s]["samples_per_second"][name] for s in subsets]
            ax.bar(np.arange(len(subsets)) + k * width, values, width, label=name)
        ax.set_xticks(np.arange(len(subsets)) + 0.4 - width / 2, subsets)
        ax.set_yscale("log")  # the competitors differ by orders of magnitude
        ax.set_ylabel("samples / s (log)")
        ax.set_title(f"{result['dtype']} samples of shape {tuple(result['sample_shape'])}")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 256 samples in batches of 64")
    args = parser.parse_args()
    if args.tiny:
        args.samples, args.batch_size = 256, 64
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for shape, dtype in (((40,), "float32"), ((3, 32, 32), "uint8")):
            print(f"{dtype} samples of shape {shape}, {args.samples} samples:", flush=True)
            results.append(run(args.samples, args.keep, args.batch_size, shape, dtype, Path(workdir)))
    report(results)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "batch_size": args.batch_size,
        "torch": torch.__version__,
    }
    (args.out / "loader.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, args.out / "loader.png")
    print(f"wrote {args.out / 'loader.json'} and {args.out / 'loader.png'}")


if __name__ == "__main__":
    main()
