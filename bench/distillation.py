"""Dataset distillation on MNIST-1D: progressive (PDD) against single-stage gradient matching and
random real samples of the same size.

    python bench/distillation.py [--seeds 0 1 2] [--per-class 10] [--stages 3] [--outer 40] [--tiny]

4,000 generated training signals (standardised), a clean test split of 2,000. Sets of the same
total size, `stages` × `per-class` samples a class: random real samples; one gradient-matching
set of that size (`nearstore.app.distill`, a single stage); PDD, `stages` sets of `per-class`,
stage s learnt on networks first trained on stages 1..s−1. Also the first stage alone, against
random real samples of its size. Every set is written as a nearstore dataset and trained on
through `StreamingLoader` (PDD's through a `Mixture` of its stages' loaders, stage by stage,
cumulatively: `epochs` on stage 1, `epochs` on stages 1-2, ...; the other sets `stages` ×
`epochs` on the whole), a fresh small 1-D CNN each, then scored on the test split. Prints test
accuracy (mean ± std over seeds, paired differences with random real samples of the same size)
and distillation seconds (the first stage's: a stage's share of PDD's, not timed alone); writes
distillation.json and distillation.png.
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selection_quality import check_arguments, paired_gain, seed_std  # noqa: E402

from loaders import Mixture, StreamingLoader  # noqa: E402
from nearstore.app.converters import mnist1d_batches  # noqa: E402
from nearstore.app.distill import distill, write_stages  # noqa: E402


def network() -> nn.Module:
    """A 1-D CNN without normalisation layers (gradient matching compares per-class batches)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 20, 10),
    )


def train(phases: list[list], epochs: int, seed: int) -> nn.Module:
    """A fresh network trained `epochs` on each phase in turn, a phase a list of stores mixed."""
    torch.manual_seed(seed)
    model = network()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for phase in phases:
        loaders = [StreamingLoader(store, batch_size=32, seed=seed, backend="torch", device="cpu") for store in phase]
        mixed = Mixture(loaders, seed=seed)
        for _ in range(epochs):
            for x, y in mixed:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--outer", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--tiny", action="store_true", help="a smoke run: tiny data, one seed, few steps (in place of the sizes given)"
    )
    args = parser.parse_args()
    counts = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in ("--samples", "--test", "--per-class")}
    check_arguments(parser, {}, {**counts, "--stages": args.stages, "--outer": args.outer, "--epochs": args.epochs})
    if args.tiny:
        args.samples, args.test, args.seeds, args.per_class, args.stages, args.outer, args.epochs = (
            1000,
            500,
            [0],
            2,
            2,
            2,
            2,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    data = list(mnist1d_batches(args.samples + args.test, seed=0))
    x, y = np.concatenate([b["x"] for b in data]), np.concatenate([b["y"] for b in data])
    x = ((x - x[: args.samples].mean()) / x[: args.samples].std()).astype(np.float32)
    train_x, train_y, test = x[: args.samples], y[: args.samples], (x[args.samples :], y[args.samples :])
    k, total = args.per_class, args.per_class * args.stages
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            pick = {c: rng.permutation(np.flatnonzero(train_y == c)) for c in range(10)}
            sets: dict[str, tuple[list[list], float]] = {}
            for size in (k, total):
                ids = np.concatenate([pick[c][:size] for c in range(10)])
                store = write_stages([(train_x[ids], train_y[ids])], Path(tmp) / f"random-{seed}-{size}")
                sets[f"random, {size} a class"] = ([store], 0.0)
            started = time.perf_counter()
            single = distill(train_x, train_y, network, per_class=total, outer=args.outer, seed=seed)
            sets[f"gradient matching, {total} a class"] = (
                [write_stages(single, Path(tmp) / f"single-{seed}")],
                time.perf_counter() - started,
            )
            started = time.perf_counter()
            stages = distill(train_x, train_y, network, per_class=k, stages=args.stages, outer=args.outer, seed=seed)
            seconds = time.perf_counter() - started
            written = write_stages(stages, Path(tmp) / f"pdd-{seed}")
            # not timed alone (it is distilled within PDD): a stage's share of PDD's time
            sets[f"gradient matching, {k} a class (PDD's stage 1)"] = ([written[:1]], seconds / args.stages)
            sets[f"PDD, {args.stages} stages of {k} a class"] = (
                [written[: s + 1] for s in range(args.stages)],
                seconds,
            )
            for method, (phases, distill_seconds) in sets.items():
                epochs = args.epochs if len(phases) > 1 else args.epochs * args.stages
                score = accuracy(train(phases, epochs, seed), *test)
                size = sum(store.num_samples for store in phases[-1]) // 10
                runs.append(
                    {
                        "seed": seed,
                        "method": method,
                        "per_class": size,
                        "accuracy": score,
                        "distill_seconds": distill_seconds,
                    }
                )
                print(f"seed {seed} {method:>42}: {score:.2%} ({distill_seconds:.0f} s distilling)", flush=True)
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        values = [r["accuracy"] for r in mine]
        # paired, seed by seed, with random real samples of the same size
        random = {r["seed"]: r["accuracy"] for r in runs if r["method"] == f"random, {mine[0]['per_class']} a class"}
        own = {r["seed"]: r["accuracy"] for r in mine} if not method.startswith("random") else {}
        rows.append(
            {
                "method": method,
                "per_class": mine[0]["per_class"],
                "accuracy": float(np.mean(values)),
                "std": seed_std(values) or 0.0,  # ddof 1, as every bench's
                **paired_gain(own, random),
                "seeds": len(values),
                "distill_seconds": float(np.mean([r["distill_seconds"] for r in mine])),
            }
        )
        row = rows[-1]
        paired = f" ({100 * row['vs_random']:+.2f} vs random, {row['ahead']}/{row['paired']})" if row["paired"] else ""
        print(f"{method:>42}: {100 * np.mean(values):.2f} ± {100 * (seed_std(values) or 0.0):.2f}{paired}")
    (out / "distillation.json").write_text(json.dumps({"args": vars(args), "runs": runs, "rows": rows}, indent=1))
    plot(rows, out / "distillation.png")
    print(f"wrote {out / 'distillation.json'} and {out / 'distillation.png'}")


def plot(rows: list[dict], path: Path) -> None:
    """Each set's test accuracy (± std over seeds), a bar a set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh([r["method"] for r in rows], [r["accuracy"] for r in rows], xerr=[r["std"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy")
    ax.set_title("dataset distillation on MNIST-1D, equal total size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
