"""Suspected label errors against the labels we flipped, beside cleanlab on the same probabilities.

    python bench/label_errors.py [--datasets mnist1d digits shapes] [--cases sym20 sym40 pair20] [--out bench/results]
                                 [--tiny]

For each noisy case (bench/selection_quality.py's CASES: labels of the training split corrupted
on purpose, the true ones kept aside), one proxy scores every sample, and two finders judge the
labels from the same predicted probabilities:
- nearstore: `Graft(mute_suspects=True)`'s suspects, confident learning streamed beside the data
  (each class's threshold over the samples seen so far, and a floor that follows the proxy's
  confidence), what `nearstore select --report` writes;
- cleanlab: `cleanlab.filter.find_label_issues(labels, probs)` (prune by noise rate) on all of
  them at once.
Two proxies: the model-free one round 0 uses (random features and two cross-fitted softmax heads,
fitted on 4,096 warm-up samples, each judging the half it did not see: every sample is out of
sample), and the demo's CNN trained for 3 epochs on a random 10% (the model a first re-selection
round would push; the other 90% are out of its sample), alone and rechecking round 0's suspects
as a later round does (`Graft.recheck_suspects`: cleanlab's row there is the CNN's again), in
bench/selection_quality.py's recipe for the dataset (shapes: batches of 32, Adam at 1e-3, augmented
32 x 32 crops; both proxies see 32 x 32 centre crops, as the scan decodes them).
Prints precision, recall and F1 against the flips, the ratios nearstore / cleanlab, and chance
(precision = the share of flipped labels); writes label_errors.json and label_errors.png.
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

from selection_quality import CASES, corrupted, datasets, loader_options, recipe_of  # noqa: E402

from loaders import StreamingLoader  # noqa: E402
from nearstore import Dataset, Graft, ModelProxy, random_select  # noqa: E402
from nearstore.app.training import fit  # noqa: E402
from nearstore.selection import Proxy  # noqa: E402
from nearstore.selection.stages import Scan  # noqa: E402

NOISY = [case for case, (noise, _, _) in CASES.items() if noise]


def probabilities(dataset: Dataset, proxy: Proxy) -> np.ndarray:
    """p(· | x) of every sample under the proxy, (N, C): p = r + onehot(y) from its gradient factors
    (encoded images decoded as the scan decodes them for the proxy)."""
    x, y = dataset.arrays[dataset.input_array][:], dataset.labels[:]
    if dataset.encoded(dataset.input_array):
        x, failed = proxy.images.decode_batch(x)
        assert not failed, f"undecodable samples {sorted(failed)[:5]}"
    residual, _ = proxy.gradient_factors(x, y)
    return (residual + torch.nn.functional.one_hot(torch.from_numpy(y), residual.shape[1])).double().numpy()


def scores(found: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of the ids found against the flipped labels."""
    hit = flipped[found].sum()
    precision = hit / max(1, len(found))
    recall = hit / max(1, flipped.sum())
    return {
        "found": int(len(found)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(2 * precision * recall / (precision + recall)) if hit else 0.0,
    }


def judge(
    dataset: Dataset, flipped: np.ndarray, proxy: Proxy | None, carried: dict[str, np.ndarray] | None = None
) -> dict[str, dict]:
    """Both finders on one proxy (None: round 0's model-free one, fitted as Graft fits it); ours
    given what round 0 handed on (`carried`: its suspects, which a later round rechecks)."""
    from cleanlab.filter import find_label_issues

    started = time.perf_counter()
    selection = Graft(mute_suspects=True).select(dataset, 0.1, proxy=proxy, carried=carried)
    ours = scores(selection.suspects.ids, flipped) | {"seconds": time.perf_counter() - started}
    scorer = proxy if proxy is not None else Scan.open(dataset, "graft", None, 0, "cpu").proxy  # the same fit
    probs = probabilities(dataset, scorer)
    started = time.perf_counter()
    issues = find_label_issues(dataset.labels[:], probs)
    theirs = scores(np.flatnonzero(issues), flipped) | {"seconds": time.perf_counter() - started}
    return {"nearstore": ours, "cleanlab": theirs, "chance": {"precision": float(flipped.mean())}}


def trained_proxy(dataset: Dataset, name: str, factory, seed: int = 0) -> ModelProxy:
    """The demo's model after 3 epochs on a random 10%, in the dataset's recipe: what a first
    re-selection round pushes."""
    recipe = recipe_of(name)
    torch.manual_seed(seed)
    model = factory()
    subset = random_select(dataset, 0.1, seed=seed)
    loader = StreamingLoader(dataset, subset, batch_size=recipe["batch_size"], **loader_options(dataset, train=True))
    fit(model, loader, 3, lr=recipe["lr"])
    return ModelProxy(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"], choices=["mnist1d", "digits", "shapes"])
    parser.add_argument("--cases", nargs="+", default=NOISY, choices=NOISY)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch's: the CNN rows move with them"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 4,096 MNIST-1D samples, sym20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = (4096, 1024) if args.tiny else (50_000, 10_000)
    if args.tiny:
        args.datasets, args.cases = ["mnist1d"], ["sym20"]
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (clean, _, factory) in datasets(args.datasets, args.out / "data", *sizes).items():
        for case in args.cases:
            dataset, flipped = corrupted(clean, case, args.out / "data")
            key = f"{name}/{case}"
            first = Graft().select(dataset, 0.1)  # round 0: what it hands on
            cnn = trained_proxy(dataset, name, factory)
            results[key] = {
                "model-free proxy": judge(dataset, flipped, None),
                "CNN after 3 epochs on 10%": judge(dataset, flipped, cnn),
                "the CNN rechecking round 0": judge(dataset, flipped, cnn, first.carry),
            }
    report(results)
    (args.out / "label_errors.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "label_errors.png")
    print(f"wrote {args.out / 'label_errors.json'} and {args.out / 'label_errors.png'}")


def report(results: dict) -> None:
    print(f"{'case':<16} {'proxy':<26} {'finder':<10} {'found':>6} {'precision':>9} {'recall':>7} {'F1':>6} {'s':>6}")
    for case, by_proxy in results.items():
        for proxy, by_finder in by_proxy.items():
            for finder in ("nearstore", "cleanlab"):
                r = by_finder[finder]
                print(
                    f"{case:<16} {proxy:<26} {finder:<10} {r['found']:>6} {r['precision']:>9.3f} "
                    f"{r['recall']:>7.3f} {r['f1']:>6.3f} {r['seconds']:>6.2f}"
                )
            ours, theirs = by_finder["nearstore"], by_finder["cleanlab"]
            print(
                f"{case:<16} {proxy:<26} {'ours/theirs':<10} {'':>6} "
                f"{ours['precision'] / max(theirs['precision'], 1e-9):>9.2f} "
                f"{ours['recall'] / max(theirs['recall'], 1e-9):>7.2f} {ours['f1'] / max(theirs['f1'], 1e-9):>6.2f}"
                f"   (chance precision {by_finder['chance']['precision']:.3f})"
            )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{case}\n{proxy[:14]}" for case, by in results.items() for proxy in by]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(labels)), 4), sharey=True)
    for ax, metric in zip(axes, ("precision", "recall")):
        for offset, finder in enumerate(("nearstore", "cleanlab")):
            values = [by[proxy][finder][metric] for by in results.values() for proxy in by]
            ax.bar(np.arange(len(labels)) + 0.4 * offset, values, 0.4, label=finder)
        ax.set_xticks(np.arange(len(labels)) + 0.2, labels, fontsize=7)
        ax.set(title=metric, ylim=(0, 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
