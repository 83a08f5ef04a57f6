"""Data-parallel ranks: what W ranks read, and what their shares do to accuracy.

    python bench/ranks.py [--samples 32768] [--epochs 10] [--seeds 0 1 2] [--out bench/results] [--tiny]

Bytes: a store of float32 (40,) samples of 160 bytes and their labels (the writer's default
chunks); W = 1, 2, 4, 8 ranks, each rank's StreamingLoader opening the store itself (as a process
of its own does) with its own sample cache, the ranks iterated in turn in this process for two
epochs, of all data and of a random 25% selection: the bytes they read in all, against one rank's
first epoch, under the default "shards" shuffle (each rank a span of whole shards, the same every
epoch of a selection) and under a global one (each rank every W-th sample of one order, as torch's
DistributedSampler shares it).

Accuracy: MNIST-1D (`--samples` training samples, 4,000 test), the demo's CNN trained for
`--epochs` epochs by DistributedDataParallel's arithmetic in one process: each step takes batch k
of each of 4 ranks (64 samples a rank), runs the model on each (batch norm per rank, as DDP's
replicas do) and averages their losses, so the gradient is DDP's; against one process taking
batches of 256. On the store as generated (classes interleaved) and on the same samples stored
class by class (each span then holds a few classes: the case a rank's fixed shards could hurt).
Prints accuracies and ratios (ours / theirs); writes ranks.json and ranks.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import StreamingLoader  # noqa: E402
from nearstore import random_select, write_dataset  # noqa: E402
from nearstore.app.converters import mnist1d_batches  # noqa: E402
from nearstore.app.training import LEARNING_RATE, accuracy, mnist1d_cnn  # noqa: E402

WORLD_SIZES = (1, 2, 4, 8)
SHUFFLES = ("shards", "global")
RANKS, RANK_BATCH = 4, 64  # the accuracy runs: 4 ranks of 64, against one process of 256
RUNS = {"1 process": (1, "shards"), "4 ranks, shards": (RANKS, "shards"), "4 ranks, global": (RANKS, "global")}


def ranks_bytes(url: str, selection, world_size: int, shuffle: str) -> tuple[int, int]:
    """Bytes `world_size` ranks read in all in a first epoch and a second."""
    epochs = np.zeros(2, dtype=np.int64)
    for rank in range(world_size):
        loader = StreamingLoader(
            url,
            selection,
            batch_size=256,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            backend="torch",
            device="cpu",
        )
        for _ in range(2):
            sum(1 for _ in loader)
        epochs += [epoch["bytes"] for epoch in loader.io_stats()["per_epoch"]]
    return int(epochs[0]), int(epochs[1])


def trained(url: str, test_url: str, world_size: int, shuffle: str, seed: int, epochs: int) -> float:
    """Test accuracy after `epochs` epochs of DDP's arithmetic over `world_size` ranks."""
    torch.manual_seed(seed)
    model = mnist1d_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    batch = RANK_BATCH * RANKS // world_size
    ranks = [
        StreamingLoader(
            url,
            batch_size=batch,
            shuffle=shuffle,
            seed=seed,
            rank=r,
            world_size=world_size,
            backend="torch",
            device="cpu",
        )
        for r in range(world_size)
    ]
    for epoch in range(epochs):
        model.train()
        for loader in ranks:
            loader.set_epoch(epoch)
        for step in zip(*ranks, strict=True):  # every rank's batch k: one step of DDP
            optimizer.zero_grad()
            for x, y in step:  # each replica's forward (its own batch norm statistics), gradients averaged
                (nn.functional.cross_entropy(model(x), y) / world_size).backward()
            optimizer.step()
    test = StreamingLoader(test_url, batch_size=1024, shuffle=False, backend="torch", device="cpu")
    return accuracy(model, test)


def stores(tmp: str, samples: int) -> dict[str, str]:
    """MNIST-1D as generated (classes interleaved) and the same samples stored class by class."""
    data = {k: np.concatenate([b[k] for b in mnist1d_batches(samples, seed=0)]) for k in ("x", "y")}
    by_class = np.argsort(data["y"], kind="stable")
    urls = {"interleaved": f"{tmp}/interleaved.zarr", "by class": f"{tmp}/by-class.zarr"}
    write_dataset(urls["interleaved"], [data])
    write_dataset(urls["by class"], [{k: v[by_class] for k, v in data.items()}])
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32_768, help="training samples (the bytes' store too)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 4,096 samples, 1 epoch, 1 seed")
    args = parser.parse_args()
    if args.tiny:
        args.samples, args.epochs, args.seeds = 4096, 1, [0]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, args.samples)
        x = (rng.normal(size=(args.samples, 40)) + y[:, None] * 0.1).astype(np.float32)
        dataset = write_dataset(f"{tmp}/bytes.zarr", [{"x": x, "y": y}])
        selections = {"all": None, "25%": random_select(dataset, 0.25, seed=0)}
        reads = {
            name: {s: {w: ranks_bytes(dataset.url, sel, w, s) for w in WORLD_SIZES} for s in SHUFFLES}
            for name, sel in selections.items()
        }
        urls = stores(tmp, args.samples)
        test_url = f"{tmp}/test.zarr"
        write_dataset(test_url, mnist1d_batches(4000, seed=1))
        accuracies = {
            layout: {
                run: [trained(url, test_url, w, shuffle, seed, args.epochs) for seed in args.seeds]
                for run, (w, shuffle) in RUNS.items()
            }
            for layout, url in urls.items()
        }
    print("bytes W ranks read in all / one rank's first epoch (first epoch, second)")
    print(f"{'data':<5} {'W':>2} {'shards':>13} {'global':>13} {'ours / global':>13}")
    for name, by_shuffle in reads.items():
        one = by_shuffle["shards"][1][0]
        for w in WORLD_SIZES:
            (ours, ours_later), (theirs, theirs_later) = by_shuffle["shards"][w], by_shuffle["global"][w]
            print(
                f"{name:<5} {w:>2} {ours / one:>6.2f}, {ours_later / one:>4.2f} {theirs / one:>6.2f}, "
                f"{theirs_later / one:>4.2f} {ours / theirs:>13.2f}"
            )
    print(f"\ntest accuracy, {args.epochs} epochs, seeds {args.seeds} (ours: 4 ranks, shards)")
    for layout, runs in accuracies.items():
        ours = np.mean(runs["4 ranks, shards"])
        for run, values in runs.items():
            print(
                f"{layout:<12} {run:<17} {100 * np.mean(values):6.2f} ± {100 * np.std(values):4.2f}%"
                f"   ours / this: {ours / np.mean(values):.4f}"
            )
    result = {
        "samples": args.samples,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "rows": [
            {"data": name, "shuffle": s, "world_size": w, "first_epoch_bytes": b[0], "second_epoch_bytes": b[1]}
            for name, by_shuffle in reads.items()
            for s, by_world in by_shuffle.items()
            for w, b in by_world.items()
        ],
        "accuracy": accuracies,
    }
    (args.out / "ranks.json").write_text(json.dumps(result, indent=2))
    plot(reads, accuracies, args.out / "ranks.png")
    print(f"wrote {args.out / 'ranks.json'} and {args.out / 'ranks.png'}")


def plot(reads: dict, accuracies: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reading, trained_) = plt.subplots(1, 2, figsize=(11, 4))
    for name, by_shuffle in reads.items():
        one = by_shuffle["shards"][1][0]
        for shuffle, by_world in by_shuffle.items():
            for epoch, style in ((0, "-o"), (1, ":x")):
                values = [by_world[w][epoch] / one for w in WORLD_SIZES]
                reading.plot(WORLD_SIZES, values, style, label=f"{name}, {shuffle}, epoch {epoch + 1}")
    reading.set(xlabel="ranks", ylabel="bytes read / one rank's first epoch", title="what W ranks read")
    reading.legend(fontsize=7)
    layouts = list(accuracies)
    for k, run in enumerate(RUNS):
        means = [100 * np.mean(accuracies[layout][run]) for layout in layouts]
        errors = [100 * np.std(accuracies[layout][run]) for layout in layouts]
        trained_.bar(np.arange(len(layouts)) + 0.27 * k, means, width=0.27, yerr=errors, label=run)
    trained_.set_xticks(np.arange(len(layouts)) + 0.27, layouts)
    trained_.set(ylabel="test accuracy, %", title="MNIST-1D, DDP's arithmetic", ylim=(50, 100))
    trained_.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
