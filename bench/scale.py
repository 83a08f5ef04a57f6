"""Scale-out, measured: the SAGE scan and the default selector's round 0 (GRAFT) in process and on
1 and 2 Dask workers, projected to 10M and 100M samples; the loader per rank.

    python bench/scale.py [--samples 32768] [--repeats 3] [--out bench/results] [--tiny]

Scan: one selection at 10% (SAGE with ℓ = 32; `Graft()`, the default), the default proxy, of a local
store of float32 (40,) samples with 10 classes, in shards of 1,024: in process, then on a
LocalCluster (127.0.0.1) of 1 and of 2 single-threaded worker processes, each the median of
`--repeats` runs after a warm-up. The cluster's time includes shipping the proxy and merging.
Projection from per-task cost (Amdahl): the 1-worker run's tasks' compute time T_tasks (Dask's task
stream) spreads over w workers, the rest of its wall time T_rest (proxy fit, reading the labels,
scheduling, shipping, merges) does not: T(w) = T_rest + T_tasks / w; the 2-worker run checks it. To
N samples: T_tasks and the labels' read (timed alone: the only serial part that grows with N) scale
with N, the rest stays. Loader: samples/s of one rank's share for world sizes 1 and 2 (torch
backend, batch 256), each rank iterated in turn in this process. Prints ratios; writes scale.json
and scale.png. On a 2-core machine the 2-worker figure cannot show more than 2x, and it shares the
cores with the scheduler and this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import StreamingLoader  # noqa: E402
from nearstore import Graft, Sage, open_dataset, write_dataset  # noqa: E402
from nearstore.selection import DaskExecutor, local_cluster  # noqa: E402
from nearstore.storage import read_labels  # noqa: E402

METHODS = {"sage": Sage(ell=32), "graft (the default)": Graft()}
PROJECTED_SAMPLES = (10_000_000, 100_000_000)
PROJECTED_WORKERS = (8, 32, 128, 256)


def median_scan_seconds(dataset, selector, repeats: int, client=None) -> tuple[float, float]:
    """The median wall seconds of `repeats` selections, and the median compute seconds of their
    Dask tasks (0 in process)."""
    runs = [scan_seconds(dataset, selector, client) for _ in range(repeats)]
    return float(np.median([wall for wall, _ in runs])), float(np.median([tasks for _, tasks in runs]))


def scan_seconds(dataset, selector, client=None) -> tuple[float, float]:
    """Wall seconds of one selection, and the compute seconds of its Dask tasks (0 in process)."""
    started = time.perf_counter()
    if client is None:
        selector.select(dataset, 0.1)
        return time.perf_counter() - started, 0.0
    from distributed import get_task_stream

    with get_task_stream(client) as stream:
        selector.select(dataset, 0.1, executor=DaskExecutor(client))
    wall = time.perf_counter() - started
    return wall, sum(s["stop"] - s["start"] for t in stream.data for s in t["startstops"] if s["action"] == "compute")


def labels_seconds(url: str) -> float:
    """Seconds to read every label of a store opened afresh: the serial part that grows with N."""
    started = time.perf_counter()
    read_labels(open_dataset(url), "timing")
    return time.perf_counter() - started


def loader_rate(dataset, rank: int, world_size: int) -> float:
    loader = StreamingLoader(dataset, batch_size=256, rank=rank, world_size=world_size, backend="torch", device="cpu")
    started = time.perf_counter()
    samples = sum(len(x) for x, _ in loader)
    return samples / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32_768)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--repeats", type=int, default=3, help="runs a figure is the median of")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 4,096 samples")
    args = parser.parse_args()
    args.samples = 4096 if args.tiny else args.samples
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # one core a worker, and the same for the in-process run
    from distributed import Client

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        y = rng.integers(0, 10, args.samples)
        x = (rng.normal(size=(args.samples, 40)) + y[:, None] * 0.1).astype(np.float32)
        dataset = write_dataset(f"{tmp}/scale.zarr", [{"x": x, "y": y}])
        scan = {
            m: {"in process": median_scan_seconds(dataset, selector, args.repeats)[0]}
            for m, selector in METHODS.items()
        }
        task_seconds: dict[str, dict[str, float]] = {m: {} for m in METHODS}
        for workers in (1, 2):
            with (
                local_cluster(workers) as cluster,
                Client(cluster) as client,
            ):
                name = f"{workers} worker{'s' * (workers > 1)}"
                for method, selector in METHODS.items():
                    scan_seconds(dataset, selector, client)  # warm the workers (imports)
                    scan[method][name], task_seconds[method][name] = median_scan_seconds(
                        dataset, selector, args.repeats, client
                    )
        labels = float(np.median([labels_seconds(dataset.url) for _ in range(3)]))
        loader_rate(dataset, 0, 1)  # warm-up
        ranks = {f"world {world}": [loader_rate(dataset, rank, world) for rank in range(world)] for world in (1, 2)}
    result = {"samples": args.samples, "repeats": args.repeats, "labels_seconds": labels, "loader": ranks}
    result["methods"] = {}
    for method in METHODS:
        rates = {name: args.samples / seconds for name, seconds in scan[method].items()}
        tasks = task_seconds[method]["1 worker"]
        rest = scan[method]["1 worker"] - tasks
        projected = {w: args.samples / (rest + tasks / w) for w in (1, 2, 4, 8, 16)}
        at_scale = {  # seconds of a round at n samples on w workers
            n: {w: rest - labels + (labels + tasks / w) * n / args.samples for w in PROJECTED_WORKERS}
            for n in PROJECTED_SAMPLES
        }
        print(f"{method}\n{'scan':<12} {'s':>7} {'samples/s':>10} {'/ in process':>12}")
        for name, seconds in scan[method].items():
            print(f"{name:<12} {seconds:>7.2f} {rates[name]:>10.0f} {rates[name] / rates['in process']:>12.2f}")
        print(f"2 workers / 1 worker: {rates['2 workers'] / rates['1 worker']:.2f}x")
        print(f"1 worker: tasks {tasks:.2f} s of compute, the rest {rest:.2f} s (of it the labels {labels:.2f} s)")
        print("projected samples/s: " + ", ".join(f"{w} workers {r:.0f}" for w, r in projected.items()))
        print(f"2 workers measured / projected: {rates['2 workers'] / projected[2]:.2f}")
        for n, by_workers in at_scale.items():
            print(f"a round of {n:,} samples: " + ", ".join(f"{w} workers {t:,.0f} s" for w, t in by_workers.items()))
        result["methods"][method] = {
            "scan_seconds": scan[method],
            "scan_rates": rates,
            "task_seconds": task_seconds[method],
            "projected": projected,
            "at_scale_seconds": at_scale,
        }
    for name, per_rank in ranks.items():
        print(f"loader {name}: " + ", ".join(f"rank {r}: {rate:,.0f} samples/s" for r, rate in enumerate(per_rank)))
    (args.out / "scale.json").write_text(json.dumps(result, indent=2))
    plot({m: {n: args.samples / t for n, t in scan[m].items()} for m in METHODS}, ranks, args.out / "scale.png")
    print(f"wrote {args.out / 'scale.json'} and {args.out / 'scale.png'}")


def plot(rates: dict[str, dict[str, float]], ranks: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(next(iter(rates.values())))
    for k, (method, by_name) in enumerate(rates.items()):
        left.bar(np.arange(len(names)) + 0.4 * k, [by_name[n] for n in names], width=0.4, label=method)
    left.set_xticks(np.arange(len(names)) + 0.2, names)
    left.set(ylabel="samples/s", title="selection round 0, 10%")
    left.legend()
    labels = [f"{name}, rank {r}" for name, per in ranks.items() for r in range(len(per))]
    right.bar(labels, [rate for per in ranks.values() for rate in per])
    right.set(ylabel="samples/s", title="loader, per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
