"""Augmenting a subset only: AugmentAware's subsets against random ones of the same size (issue 16).

    python bench/augmentation_subsets.py [--samples 10000] [--seeds 0 1 2] [--keeps 0.1 0.3 0.5]
                                         [--epochs 20] [--out bench/results] [--tiny]

MNIST-1D (`--samples` generated training signals, a separate clean test split), its labels clean
and with 20% symmetric noise (selection_quality's `sym20`), the demo's 1-D CNN (`mnist1d_cnn`,
`fit`: Adam, batches of 128), every run the same number of epochs. The augmentation is MNIST-1D's
own (`nearstore.selection.augment`'s "signal": a circular shift, a gain, noise), drawn afresh every
epoch by the loader's `transform`. Rows:
- none: all data, nothing augmented; all: all data, every sample augmented;
- random / augaware at each keep: all data trained on, only a subset augmented
  (`StreamingLoader(augment=subset)`): a class-balanced random draw, or AugmentAware's picks
  (model-free proxy, one selection before training, its seconds counted in the run's);
- random only / augaware only at 50%: the paper's "train on and augment only the subset"
  (`selection=subset` and the transform), AugmentAware's weighted by its clusters' sizes (CRAIG's
  weights, as the paper trains its coresets), and unweighted (which of the two its result owes to).
Prints test accuracy (mean ± std over seeds), the gain over the random subset of the same keep and
mode seed by seed (same initialisation, shuffles and augmentation draws), the samples augmented
(the augmentation's cost), the seconds spent in the augmentation and the run's wall seconds
(training, and the selection where there is one), with ratios to augmenting all; writes
augmentation_subsets.json and augmentation_subsets.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selection_quality import check_arguments, corrupted, paired_gain, seed_std  # noqa: E402  (the noisy split, written once)

from loaders import StreamingLoader  # noqa: E402
from nearstore import AugmentAware, Dataset, Selection, random_select  # noqa: E402
from nearstore.app.converters import ensure_mnist1d  # noqa: E402
from nearstore.app.training import accuracy, fit, mnist1d_cnn  # noqa: E402
from nearstore.selection.augment import shifted_signals  # noqa: E402

BATCH = 128
CASES = ("clean", "sym20")
ONLY = 0.5  # the keep of the "train on and augment only the subset" rows, as the paper's label-noise claim


class Augmentation:
    """MNIST-1D's augmentation as a loader transform, its draws seeded; `seconds` spent in it."""

    def __init__(self, seed: int) -> None:
        self.rng, self.seconds = np.random.default_rng([seed, 7]), 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = torch.from_numpy(shifted_signals(x.numpy(), self.rng))
        self.seconds += time.perf_counter() - started
        return out


def train(store: Dataset, test, seed: int, epochs: int, augment: str | Selection, only: bool, weighted: bool) -> dict:
    """One run: all data trained on, augmented as `augment` says ("none", "all", or only a subset's
    samples); with `only`, the subset alone trained on (and augmented), its loss weighted by the
    selection's weights where `weighted`. Returns the test accuracy, the seconds (the subset's
    selection included), the samples augmented and the seconds spent augmenting."""
    torch.manual_seed(seed)
    model = mnist1d_cnn()
    subset = augment if isinstance(augment, Selection) else None
    transform = None if augment == "none" else Augmentation(seed)
    loader = StreamingLoader(
        store,
        subset if only else None,
        batch_size=BATCH,
        seed=seed,
        weights=weighted,
        transform=transform,
        augment=None if only else subset,  # training on the subset alone, all of it is augmented
        backend="torch",
        device="cpu",
    )
    started = time.perf_counter()
    fit(model, loader, epochs, weighted=weighted)
    seconds = time.perf_counter() - started + (subset.io["seconds"] if subset is not None else 0.0)
    return {
        "accuracy": accuracy(model, [test]),
        "seconds": seconds,
        "augmented": loader.io_stats()["augmented_samples"],
        "augment_seconds": transform.seconds if transform is not None else 0.0,
    }


def runs_of(store: Dataset, test, case: str, seed: int, args: argparse.Namespace) -> list[dict]:
    """Every row's run for one case and seed."""
    # (row, keep, what is augmented, trained on the subset alone, weighted)
    plan: list[tuple[str, float, str | Selection, bool, bool]] = [
        ("none", 1.0, "none", False, False),
        ("all", 1.0, "all", False, False),
    ]
    for keep in args.keeps:
        random = random_select(store, keep, seed=seed, class_balanced=True)
        augaware = AugmentAware().select(store, keep, seed=seed)
        plan += [("random", keep, random, False, False), ("augaware", keep, augaware, False, False)]
        if keep == ONLY:
            plan += [
                ("random only", keep, random, True, False),
                ("augaware only", keep, augaware, True, True),
                ("augaware only, unweighted", keep, augaware, True, False),
            ]
    runs = []
    for method, keep, augment, only, weighted in plan:
        run = train(store, test, seed, args.epochs, augment, only, weighted)
        runs.append({"case": case, "method": method, "keep": keep, "seed": seed, **run})
        print(
            f"{case} seed {seed} {method:>25} {keep:>4.0%}: {run['accuracy']:.2%}, {run['augmented']} augmented, "
            f"{run['seconds']:.1f} s",
            flush=True,
        )
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """Mean ± std over seeds of each (case, method, keep); the paired gain over random's run of the
    same seed (random for augaware, random only for augaware only); cost as ratios to all's."""
    rows = []
    for case, method, keep in dict.fromkeys((r["case"], r["method"], r["keep"]) for r in runs):
        mine = {r["seed"]: r for r in runs if (r["case"], r["method"], r["keep"]) == (case, method, keep)}
        base_method = ("random only" if "only" in method else "random") if method.startswith("augaware") else None
        base = {r["seed"]: r for r in runs if (r["case"], r["method"], r["keep"]) == (case, base_method, keep)}
        full = [r for r in runs if (r["case"], r["method"]) == (case, "all")]
        accuracies = [r["accuracy"] for r in mine.values()]
        augmented, augment_seconds, seconds = (
            float(np.mean([r[k] for r in mine.values()])) for k in ("augmented", "augment_seconds", "seconds")
        )
        rows.append(
            {
                "case": case,
                "method": method,
                "keep": keep,
                "seeds": len(mine),
                "accuracy": float(np.mean(accuracies)),
                "std": seed_std(accuracies) or 0.0,
                **paired_gain(
                    {seed: r["accuracy"] for seed, r in mine.items()}, {seed: r["accuracy"] for seed, r in base.items()}
                ),
                "augmented": augmented,
                "augmented_vs_all": augmented / np.mean([r["augmented"] for r in full]) if full else None,
                "augment_seconds": augment_seconds,
                "seconds": seconds,
                "seconds_vs_all": seconds / np.mean([r["seconds"] for r in full]) if full else None,
            }
        )
    return rows


def report(rows: list[dict]) -> None:
    print(
        f"\n{'case':<6} {'method':>25} {'keep':>5} {'accuracy':>15} {'vs random':>15} {'ahead':>5} "
        f"{'augmented':>10} {'x all':>6} {'aug s':>6} {'s':>6} {'x all':>6}"
    )
    for r in rows:
        gain, ahead = "", ""
        if r["vs_random"] is not None:
            gain = f"{100 * r['vs_random']:+.2f} ± {100 * (r['vs_random_std'] or 0):.2f}"
            ahead = f"{r['ahead']}/{r['paired']}"
        keep = f"{r['keep']:.0%}" if r["method"] not in ("none", "all") else ""
        print(
            f"{r['case']:<6} {r['method']:>25} {keep:>5} {100 * r['accuracy']:>8.2f} ± {100 * r['std']:.2f} "
            f"{gain:>15} {ahead:>5} {r['augmented']:>10.0f} {r['augmented_vs_all']:>6.2f} "
            f"{r['augment_seconds']:>6.2f} {r['seconds']:>6.1f} {r['seconds_vs_all']:>6.2f}"
        )


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against the share augmented, a panel a case: random and AugmentAware subsets (the
    rest plain), none and all as lines, the "only" runs as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        mine = [r for r in rows if r["case"] == case]
        markers = {"random": "o", "augaware": "s", "random only": "x", "augaware only": "D"}
        for method, marker in {**markers, "augaware only, unweighted": "d"}.items():
            points = sorted((r["keep"], r["accuracy"], r["std"]) for r in mine if r["method"] == method)
            if points:
                keeps, means, stds = zip(*points)
                ax.errorbar([100 * k for k in keeps], means, stds, marker=marker, capsize=3, label=method)
        for method, style in (("none", ":"), ("all", "--")):
            for r in mine:
                if r["method"] == method:
                    ax.axhline(r["accuracy"], color="grey", linestyle=style, label=f"{method} augmented")
        ax.set(xlabel="share of the training set augmented (%)", ylabel="test accuracy", title=f"MNIST-1D, {case}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--test", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.3, ONLY])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 2,048 samples, one seed, 1 epoch, 50%%")
    args = parser.parse_args()
    counts = {"--samples": args.samples, "--test": args.test, "--epochs": args.epochs, "--threads": args.threads}
    check_arguments(parser, {"--keeps": args.keeps}, counts)
    if args.tiny:
        args.samples, args.test, args.seeds, args.keeps, args.epochs = 2048, 512, [0], [ONLY], 1
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.out / "data"
    clean = ensure_mnist1d(str(root / f"mnist1d-train-{args.samples}.zarr"), args.samples, 0)
    test_store = ensure_mnist1d(str(root / f"mnist1d-test-{args.test}.zarr"), args.test, 1)
    test = next(iter(StreamingLoader(test_store, batch_size=args.test, shuffle=False, backend="torch", device="cpu")))
    started = time.perf_counter()
    runs = []
    for case in args.cases:
        store = clean if case == "clean" else corrupted(clean, case, root)[0]
        for seed in args.seeds:
            runs += runs_of(store, test, case, seed, args)
    rows = summarize(runs)
    report(rows)
    print(f"\n{len(runs)} runs in {time.perf_counter() - started:.0f} s")
    meta = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "batch_size": BATCH}
    (args.out / "augmentation_subsets.json").write_text(
        json.dumps({"meta": meta, "runs": runs, "rows": rows}, indent=1)
    )
    plot(rows, args.out / "augmentation_subsets.png")
    print(f"wrote {args.out / 'augmentation_subsets.json'} and {args.out / 'augmentation_subsets.png'}")


if __name__ == "__main__":
    main()
