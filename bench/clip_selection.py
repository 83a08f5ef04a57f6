"""Contrastive training on pairs, CLIP-style, on subsets: ClipCov against random subsets.

    python bench/clip_selection.py [--seeds 0 1 2] [--keeps 0.05 0.1 0.25] [--steps 400] [--out bench/results] [--tiny]

A generated paired set: each MNIST-1D signal (`--samples`, no labels stored) with a "caption", 2-5
filler tokens (ids 0-49) and the token of its class (100 + class) in a random order; a share
`--mismatched` (30%) of the captions name another class, as web-scraped pairs do. Two small
encoders trained CLIP-style (a 1-D CNN for the signals, a mean of token embeddings for the
captions, both to 32-d, symmetric cross-entropy over cosine similarities at temperature 0.1,
Adam), batches of 128 pairs from `StreamingLoader(paired_arrays=("caption",))`. Every run takes
the same number of steps (`--steps`: equal compute; a subset is seen for more epochs). Zero-shot
classification on a clean test split: a signal's class is the caption "100 + c" closest to it.
Subsets at each keep: random; ClipCov with the model-free proxy (random features of both sides;
no training); ClipCov whose signal side is the signal tower of the same model trained
`--proxy-steps` on all pairs (`ModelProxy`; the captions' side stays random features; its cost
is printed). Also all data. Prints zero-shot accuracy (mean ± std over seeds, paired differences
against random) and the mismatched share each subset holds; writes clip_selection.json and .png.
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

from selection_quality import check_arguments  # noqa: E402
from ssl_selection import plot, report, summarize  # noqa: E402  (the tables and plots of both)

from loaders import StreamingLoader  # noqa: E402
from nearstore import ClipCov, ModelProxy, open_dataset, random_select, write_dataset  # noqa: E402
from nearstore.app.converters import mnist1d_batches  # noqa: E402

CLASS_TOKEN, VOCABULARY, TEMPERATURE, BATCH = 100, 128, 0.1, 128


def captions_of(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(len(classes), dtype=object)
    out[:] = [
        rng.permutation(np.r_[CLASS_TOKEN + c, rng.integers(0, 50, size=rng.integers(2, 6))]).astype(np.int64)
        for c in classes
    ]
    return out


class Clip(nn.Module):
    """A signal tower (1-D CNN) and a caption tower (mean of token embeddings), each to 32-d."""

    def __init__(self) -> None:
        super().__init__()
        self.signal = nn.Sequential(
            nn.Unflatten(1, (1, 40)),
            nn.Conv1d(1, 32, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 20, 64),
            nn.ReLU(),
            nn.Linear(64, 32),
        )
        self.words = nn.EmbeddingBag(VOCABULARY, 32, mode="mean")
        self.caption = nn.Linear(32, 32)

    def encode_captions(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: a jagged nested tensor of token ids, as the loader yields them."""
        return self.caption(self.words(tokens.values().long(), tokens.offsets()[:-1].long()))

    def similarity(self, signals: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        a = nn.functional.normalize(self.signal(signals), dim=1)
        b = nn.functional.normalize(captions, dim=1)
        return a @ b.T / TEMPERATURE


def train(store, ids: np.ndarray, steps: int, seed: int) -> tuple[Clip, float]:
    torch.manual_seed(seed)
    model = Clip()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = StreamingLoader(
        store,
        ids,
        batch_size=BATCH,
        paired_arrays=("caption",),
        seed=seed,
        backend="torch",
        device="cpu",
        drop_last=len(ids) > BATCH,
    )
    started, step, epoch = time.perf_counter(), 0, 0
    while step < steps:
        loader.set_epoch(epoch)
        for x, tokens in loader:
            logits = model.similarity(x, model.encode_captions(tokens))
            target = torch.arange(len(x))
            loss = (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    return model.eval(), time.perf_counter() - started


def zero_shot(model: Clip, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of each signal's closest class caption, "100 + c" alone."""
    with torch.no_grad():
        prompts = torch.nested.nested_tensor_from_jagged(torch.arange(CLASS_TOKEN, CLASS_TOKEN + 10), torch.arange(11))
        logits = model.similarity(torch.from_numpy(x), model.encode_captions(prompts))
    return float((logits.argmax(1).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--mismatched", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.05, 0.1, 0.25])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--proxy-steps", type=int, default=100)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--tiny", action="store_true", help="a smoke run: tiny data, one seed, 20 steps (in place of the sizes given)"
    )
    args = parser.parse_args()
    counts = {"--samples": args.samples, "--test": args.test, "--steps": args.steps, "--proxy-steps": args.proxy_steps}
    check_arguments(parser, {"--keeps": args.keeps}, counts)
    if not 0 <= args.mismatched < 1:
        parser.error(f"--mismatched is the share of pairs mismatched, in [0, 1), got {args.mismatched}")
    if args.tiny:
        args.samples, args.test, args.seeds, args.keeps, args.steps, args.proxy_steps = 1024, 512, [0], [0.25], 20, 5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    data = list(mnist1d_batches(args.samples + args.test, seed=0))
    x, y = np.concatenate([b["x"] for b in data]), np.concatenate([b["y"] for b in data])
    rng = np.random.default_rng(0)
    mismatched = rng.random(args.samples) < args.mismatched
    named = np.where(mismatched, (y[: args.samples] + rng.integers(1, 10, size=args.samples)) % 10, y[: args.samples])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "pairs.zarr")
        pairs = {"x": x[: args.samples], "caption": captions_of(named, rng)}
        write_dataset(url, [pairs], label_array=None, shard_samples=1024)
        store = open_dataset(url)
        test = x[args.samples :], y[args.samples :]
        for seed in args.seeds:
            warm, proxy_seconds = train(store, np.arange(args.samples), args.proxy_steps, seed + 100)
            print(f"seed {seed}: proxy, {args.proxy_steps} steps on all pairs, {proxy_seconds:.1f} s")
            model, seconds = train(store, np.arange(args.samples), args.steps, seed)
            runs.append(
                {
                    "seed": seed,
                    "method": "all data",
                    "keep": 1.0,
                    "accuracy": zero_shot(model, *test),
                    "mismatched": float(mismatched.mean()),
                    "seconds": seconds,
                    "select_seconds": 0.0,
                }
            )
            for keep in args.keeps:
                for method, selection in {
                    "random": random_select(store, keep, seed=seed),
                    "clipcov": ClipCov().select(store, keep, seed=seed),
                    "clipcov (proxy tower)": ClipCov().select(store, keep, seed=seed, proxy=ModelProxy(warm.signal)),
                }.items():
                    model, seconds = train(store, selection.ids, args.steps, seed)
                    accuracy = zero_shot(model, *test)
                    share = float(mismatched[selection.ids].mean())
                    runs.append(
                        {
                            "seed": seed,
                            "method": method,
                            "keep": keep,
                            "accuracy": accuracy,
                            "mismatched": share,
                            "seconds": seconds,
                            "select_seconds": selection.io["seconds"],
                        }
                    )
                    print(
                        f"seed {seed} keep {keep:.0%} {method:>21}: zero-shot {accuracy:.2%}, mismatched "
                        f"{share:.1%}, {seconds:.1f} s (+{selection.io['seconds']:.1f} s selecting)",
                        flush=True,
                    )
    rows = summarize(runs, extra=("mismatched",))
    report(rows, "zero-shot", extra=("mismatched",))
    (out / "clip_selection.json").write_text(json.dumps({"args": vars(args), "runs": runs, "rows": rows}, indent=1))
    plot(
        rows, out / "clip_selection.png", "zero-shot accuracy", "CLIP-style training on generated pairs", log_keep=True
    )


if __name__ == "__main__":
    main()
