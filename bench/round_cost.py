"""What a re-selection round costs against one full-data training epoch, side by side.

    python bench/round_cost.py [--budgets 0.05 0.1 0.25 0.5] [--repeats 3] [--out bench/results]

MNIST-1D (50,000 samples, the store bench/selection_quality.py writes), the demo's CNN: two
full-data epochs through the StreamingLoader (torch backend, batch 128, Adam), the second timed as
the full epoch; then, with that model as the proxy (what `loader.update_proxy` hands over), each
re-selection method's round at each budget, `--repeats` times (the median is reported): GRAFT on
a pool of twice the budget (the default of `reselect`), CREST, CREST with its coreset step.
Prints seconds and the ratio round / full epoch (the target is < 0.1); writes round_cost.json and
round_cost.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import StreamingLoader  # noqa: E402
from nearstore.demo import ensure_mnist1d, mnist1d_cnn  # noqa: E402
from nearstore.proxy import ModelProxy  # noqa: E402
from nearstore.selectors import DEFAULT_RESELECT, make_selector  # noqa: E402

METHODS = {
    "graft-pool": DEFAULT_RESELECT,
    "crest": ("crest", {}),
    "crest-coreset": ("crest", {"coreset": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = ensure_mnist1d(str(args.out / "data" / "mnist1d-train-50000.zarr"), 50_000, 0)
    torch.manual_seed(0)
    model = mnist1d_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = StreamingLoader(store, batch_size=128, backend="torch", device="cpu")
    for epoch in range(2):
        started = time.perf_counter()
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        epoch_seconds = time.perf_counter() - started
    print(f"full-data epoch: {epoch_seconds:.2f} s")
    proxy = ModelProxy(model)
    rows = []
    print(f"{'method':<14} {'keep':>5} {'round s':>8} {'/ epoch':>8}")
    for name, (method, options) in METHODS.items():
        for keep in args.budgets:
            seconds = []
            for repeat in range(args.repeats):
                started = time.perf_counter()
                make_selector(method, **options).select(store, keep, proxy=proxy, seed=repeat)
                seconds.append(time.perf_counter() - started)
            median = float(np.median(seconds))
            rows.append({"method": name, "keep": keep, "seconds": seconds, "median": median})
            print(f"{name:<14} {keep:>5.0%} {median:>8.2f} {median / epoch_seconds:>8.3f}")
    result = {"full_epoch_seconds": epoch_seconds, "threads": torch.get_num_threads(), "rows": rows}
    (args.out / "round_cost.json").write_text(json.dumps(result, indent=2))
    plot(rows, epoch_seconds, args.out / "round_cost.png")
    print(f"wrote {args.out / 'round_cost.json'} and {args.out / 'round_cost.png'}")


def plot(rows: list[dict], epoch_seconds: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        ax.plot([100 * r["keep"] for r in mine], [r["median"] / epoch_seconds for r in mine], marker="o", label=name)
    ax.axhline(0.1, color="grey", linestyle=":", label="target: 10% of an epoch")
    ax.set(xscale="log", xlabel="keep (%)", ylabel="round / full-data epoch", title="re-selection round cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
