"""Contrastive self-supervised learning on subsets: SAS against random subsets of the same size.

    python bench/ssl_selection.py [--seeds 0 1 2] [--keeps 0.8 0.6 0.4] [--epochs 30] [--out bench/results] [--tiny]

MNIST-1D (`--samples` generated training signals, a separate clean test split; labels unused
until the probe), SimCLR on CPU: a small 1-D CNN encoder (its 64-d output the representation) and
a linear projection to 32, NT-Xent at temperature 0.2, Adam (3e-3), batches of 256 pairs of views from
`StreamingLoader(views=2)` with MNIST-1D's augmentations (`nearstore.selection.augment`'s
"signal": shift, gain, noise). Every run trains the same number of epochs on its subset (fewer
steps on smaller ones, as the SAS paper compares), then a linear probe (logistic regression on
the frozen representation of every training sample, labels now used) is scored on the test split.
Subsets at each keep (the share not excluded): random; SAS with the model-free proxy (random
features, no training); SAS with a proxy encoder, the same SimCLR trained `--proxy-epochs` on all
the data (its cost is printed: the paper's proxy is a smaller, shorter run). Also all data.
Prints probe accuracy (mean ± std over seeds, and paired differences against random), writes
ssl_selection.json and ssl_selection.png.
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

from loaders import StreamingLoader  # noqa: E402
from nearstore import ModelProxy, Selection, open_dataset, random_select, write_dataset  # noqa: E402
from nearstore.app.converters import mnist1d_batches  # noqa: E402
from nearstore.selection import Sas  # noqa: E402
from nearstore.selection.augment import shifted_signals  # noqa: E402

TEMPERATURE = 0.2
LEARNING_RATE = 3e-3
BATCH = 256


def encoder() -> nn.Module:
    """MNIST-1D's contrastive model: a 1-D CNN to a 64-d representation (what the last Linear
    reads: ModelProxy's h), then a linear projection to 32."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 10, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
    )


def representation(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model[:-1](x)


def nt_xent(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SimCLR's loss over a batch of n pairs: each view's partner among the other 2n − 1."""
    z = nn.functional.normalize(torch.cat([a, b]), dim=1)
    similarity = z @ z.T / TEMPERATURE
    similarity.fill_diagonal_(-torch.inf)
    n = len(a)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return nn.functional.cross_entropy(similarity, partner)


def augment(seed: int):
    rng = np.random.default_rng(seed)
    return lambda x: torch.from_numpy(shifted_signals(x.numpy(), rng))


def train(store, ids: np.ndarray | None, epochs: int, seed: int) -> tuple[nn.Module, float]:
    """SimCLR for `epochs` over the samples `ids` (None: all); the model and its seconds."""
    torch.manual_seed(seed)
    model = encoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    selection = np.arange(store.num_samples) if ids is None else ids
    loader = StreamingLoader(
        store,
        selection,
        batch_size=BATCH,
        views=2,
        transform=augment(seed),
        seed=seed,
        backend="torch",
        device="cpu",
        drop_last=True,
    )
    started = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        model.train()
        for x1, x2, _ in loader:
            loss = nt_xent(model(x1), model(x2))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), time.perf_counter() - started


def probe(model: nn.Module, train_xy, test_xy) -> float:
    """Test accuracy of a logistic regression on the frozen representation of every training sample."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features = [representation(model, torch.from_numpy(x)).numpy() for x, _ in (train_xy, test_xy)]
    scale = StandardScaler().fit(features[0])
    classifier = LogisticRegression(max_iter=2000).fit(scale.transform(features[0]), train_xy[1])
    return float(classifier.score(scale.transform(features[1]), test_xy[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--proxy-epochs", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--tiny", action="store_true", help="a smoke run: tiny data, one seed, 2 epochs (in place of the sizes given)"
    )
    args = parser.parse_args()
    counts = {
        "--samples": args.samples,
        "--test": args.test,
        "--epochs": args.epochs,
        "--proxy-epochs": args.proxy_epochs,
    }
    check_arguments(parser, {"--keeps": args.keeps}, counts)
    if args.tiny:
        args.samples, args.test, args.seeds, args.keeps, args.epochs, args.proxy_epochs = 1024, 512, [0], [0.5], 2, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        data = list(mnist1d_batches(args.samples + args.test, seed=0))
        x, y = np.concatenate([b["x"] for b in data]), np.concatenate([b["y"] for b in data])
        train_xy, test_xy = (x[: args.samples], y[: args.samples]), (x[args.samples :], y[args.samples :])
        url = str(Path(tmp) / "mnist1d.zarr")
        write_dataset(url, [{"x": train_xy[0], "y": train_xy[1]}], shard_samples=1024)
        store = open_dataset(url)
        runs = []
        for seed in args.seeds:
            proxy_model, proxy_seconds = train(store, None, args.proxy_epochs, seed + 100)
            print(f"seed {seed}: proxy encoder, {args.proxy_epochs} epochs on all data, {proxy_seconds:.1f} s")
            model, seconds = train(store, None, args.epochs, seed)
            runs.append(
                {
                    "seed": seed,
                    "method": "all data",
                    "keep": 1.0,
                    "accuracy": probe(model, train_xy, test_xy),
                    "seconds": seconds,
                    "select_seconds": 0.0,
                }
            )
            for keep in args.keeps:
                subsets: dict[str, Selection] = {
                    "random": random_select(store, keep, seed=seed),
                    "sas (model-free)": Sas().select(store, keep, seed=seed),
                    "sas (proxy encoder)": Sas().select(store, keep, seed=seed, proxy=ModelProxy(proxy_model)),
                }
                for method, selection in subsets.items():
                    model, seconds = train(store, selection.ids, args.epochs, seed)
                    accuracy = probe(model, train_xy, test_xy)
                    runs.append(
                        {
                            "seed": seed,
                            "method": method,
                            "keep": keep,
                            "accuracy": accuracy,
                            "seconds": seconds,
                            "select_seconds": selection.io["seconds"],
                            "proxy_seconds": proxy_seconds if "proxy" in method else 0.0,
                        }
                    )
                    print(
                        f"  keep {keep:.0%} {method:>20}: probe {accuracy:.2%}, {seconds:.1f} s "
                        f"(+{selection.io['seconds']:.1f} s selecting)",
                        flush=True,
                    )
    rows = summarize(runs)
    report(rows, "probe accuracy")
    (out / "ssl_selection.json").write_text(json.dumps({"args": vars(args), "runs": runs, "rows": rows}, indent=1))
    plot(rows, out / "ssl_selection.png", "linear probe accuracy", "SimCLR on MNIST-1D subsets")


def summarize(runs: list[dict], extra: tuple[str, ...] = ()) -> list[dict]:
    """Mean ± std of each (method, keep)'s accuracy over seeds, its paired difference with
    random's, and the mean of each `extra` figure of the runs. (bench/clip_selection.py's too.)"""
    rows = []
    for method, keep in dict.fromkeys((r["method"], r["keep"]) for r in runs):
        mine = {r["seed"]: r for r in runs if (r["method"], r["keep"]) == (method, keep)}
        base = {r["seed"]: r["accuracy"] for r in runs if (r["method"], r["keep"]) == ("random", keep)}
        values = [r["accuracy"] for r in mine.values()]
        rows.append(
            {
                "method": method,
                "keep": keep,
                "accuracy": float(np.mean(values)),
                "std": seed_std(values) or 0.0,  # ddof 1, as every bench's (it was 0 here: 18% narrower at 3 seeds)
                **{name: float(np.mean([r[name] for r in mine.values()])) for name in extra},
                **paired_gain({seed: r["accuracy"] for seed, r in mine.items()}, base),
                "seeds": len(values),
            }
        )
    return rows


def report(rows: list[dict], metric: str, extra: tuple[str, ...] = ()) -> None:
    """The rows as a table: `metric` (accuracy) and the `extra` shares, in %."""
    width = max(len(r["method"]) for r in rows)
    header = f"{'keep':>5} {'method':>{width}} {metric:>16}" + "".join(f" {e:>11}" for e in extra)
    print(f"\n{header} {'vs random':>20}")
    for r in rows:
        versus = (
            ""
            if r["vs_random"] is None or r["method"] == "random"
            else f"{100 * r['vs_random']:+.2f} ± {100 * (r['vs_random_std'] or 0):.2f} ({r['ahead']}/{r['paired']})"
        )
        shares = "".join(f" {100 * r[e]:>10.1f}%" for e in extra)
        accuracy = f"{100 * r['accuracy']:>9.2f} ± {100 * r['std']:.2f}"
        print(f"{r['keep']:>5.0%} {r['method']:>{width}} {accuracy}{shares} {versus:>20}")


def plot(rows: list[dict], path: Path, ylabel: str, title: str, log_keep: bool = False) -> None:
    """Accuracy against keep, a line a method (± std), all data dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["keep"] < 1):
        mine = sorted((r["keep"], r["accuracy"], r["std"]) for r in rows if r["method"] == method)
        ax.errorbar([k for k, _, _ in mine], [a for _, a, _ in mine], [s for _, _, s in mine], marker="o", label=method)
    full = [r for r in rows if r["keep"] == 1.0]
    if full:
        ax.axhline(full[0]["accuracy"], color="grey", linestyle="--", label="all data")
    if log_keep:
        ax.set_xscale("log")
    ax.set_xlabel("keep (share of the training set)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
