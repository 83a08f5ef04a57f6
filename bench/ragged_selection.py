"""Selection on ragged samples: variable-length token sequences, the default selection against random.

    python bench/ragged_selection.py [--samples 12000] [--test 4000] [--keeps 0.1 0.25] [--seeds 0 1 2]
                                     [--epochs 15] [--every 3] [--cases clean sym20] [--out bench/results] [--tiny]

A generated classification set of token sequences (`token_sequences`): 10 classes over a vocabulary
of 200 tokens, lengths 20-200. Every sequence is a walk of one Markov chain shared by all classes
(each token followed by one of 8 successors), over which motifs of 4 tokens are written, about
one per 30 tokens (Poisson; a short sequence may hold none), each token of a motif replaced by a
random one a quarter of the time: 8 motifs of its class's own and 3 of the next class's, so
neighbouring classes overlap and the set is not separable (all data: ~79% on test; a random 10%:
~60%, chosen so, on random subsets alone, before any selection was run). Written with
`write_dataset` as a ragged int32 array x and int64 labels; the test split (another seed) stays
clean. A small model reads the loader's jagged nested tensors (`TokenClassifier`: an embedding,
a convolution over 3 tokens, masked max and mean pooling over `to_padded_tensor`, an MLP), Adam
3e-3, batches of 128 from `StreamingLoader(backend="torch")`, `--epochs` on every subset (equal
epochs). Runs at each keep and seed: random; random drawn afresh every `--every` epochs (the bar
for a re-selecting path, which trains on more distinct samples); the default selection once
before training (`make_selector(DEFAULT_METHOD)`, its model-free proxy summarising each sequence
by `ragged_features`: tokens hashed into 256 bins and log(1 + L)); the default path, re-selected
every `--every` epochs with the trainer's model (`update_proxy`, `reselect(keep)`, as
bench/selection_quality.py's graft-dynamic); and all data, the ceiling. Case sym20: 20% of the
training labels replaced by a uniformly random class (`noisy_labels`). Also measured: what the
model-free proxy knows, the test accuracy of its heads fitted on 4,096 training samples. Round 0
alone with a part of the default taken away (`--methods`): "default, unmuted" (no suspects
muted), "default, directions" (MaxVol on gradient directions, `norm_power=0`), "default, picked"
(MaxVol's picks for classes of any budget, `draw_below=0`: the default until 2026-12-05, evening),
and "unsuspected, drawn" (as many samples a class as the default picks, drawn at random from those
its proxy does not suspect).
Prints mean ± std test accuracy over seeds, the paired gain over random (mean ± std, seeds
ahead), the share of wrong labels selected (the mean over rounds), the share of the training set
trained on over all rounds ("distinct") and seconds; writes ragged_selection.json and .png.
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

from ssl_selection import plot, report, summarize  # noqa: E402  (the tables and plots of the benches)

from loaders import StreamingLoader  # noqa: E402
from nearstore import Dataset, RandomFeatureProxy, Selection, open_dataset, write_dataset  # noqa: E402
from nearstore.app.converters import noisy_labels  # noqa: E402
from nearstore.app.training import accuracy, fit  # noqa: E402
from nearstore.selection import DEFAULT_METHOD, make_selector  # noqa: E402
from nearstore.storage import read_labels  # noqa: E402

CLASSES, VOCABULARY, MOTIF, SUCCESSORS = 10, 200, 4, 8
OWN_MOTIFS, SHARED_MOTIFS = 8, 3  # the motifs a class owns, and how many of the next class's it writes too
LENGTHS = (20, 200)
TOKENS_PER_MOTIF = 30  # a motif every 30 tokens on average: a sequence of 20 holds none half of the time
MUTATION = 0.25  # the share of a written motif's tokens replaced by random ones
BATCH = 128
WARMUP = 4096  # samples the model-free proxy's heads are fitted on (GRAFT's warm-up)
CASES = {"clean": 0.0, "sym20": 0.2}
# Round 0 alone, the default's parts taken away (`--methods`): what loses at 10% (docs/benchmarks.md)
ONCE = {
    "default, unmuted": {"mute_suspects": False},
    "default, directions": {"norm_power": 0.0},
    "default, picked": {"draw_below": 0},  # MaxVol for classes of any budget (the default until 2026-12-05)
}


def token_sequences(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n sequences (a 1-D object array of int32 arrays) and their classes (int64, balanced); the
    chain and the motifs are fixed (seed 0), the samples drawn by `seed`."""
    structure = np.random.default_rng(0)
    successors = structure.integers(0, VOCABULARY, (VOCABULARY, SUCCESSORS))
    motifs = structure.integers(0, VOCABULARY, (CLASSES, OWN_MOTIFS, MOTIF))
    # class c writes its own motifs and the first SHARED_MOTIFS of class c + 1's
    owned = [np.concatenate([motifs[c], motifs[(c + 1) % CLASSES, :SHARED_MOTIFS]]) for c in range(CLASSES)]
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % CLASSES).astype(np.int64)
    lengths = rng.integers(LENGTHS[0], LENGTHS[1] + 1, n)
    walks = np.empty((n, LENGTHS[1]), dtype=np.int32)  # every chain walked to the longest length at once
    walks[:, 0] = rng.integers(0, VOCABULARY, n)
    for t in range(1, LENGTHS[1]):
        walks[:, t] = successors[walks[:, t - 1], rng.integers(0, SUCCESSORS, n)]
    x = np.empty(n, dtype=object)
    for i, (label, length) in enumerate(zip(y, lengths)):
        tokens = walks[i, :length].copy()
        for _ in range(rng.poisson(length / TOKENS_PER_MOTIF)):
            at = rng.integers(0, length - MOTIF + 1)
            motif = owned[label][rng.integers(0, len(owned[label]))].copy()
            mutated = rng.random(MOTIF) < MUTATION
            motif[mutated] = rng.integers(0, VOCABULARY, int(mutated.sum()))
            tokens[at : at + MOTIF] = motif
        x[i] = tokens
    return x, y


class TokenClassifier(nn.Module):
    """Token ids (a jagged nested tensor (B, j), as the loader yields them) to class logits: an
    embedding, a convolution over 3 tokens, max and mean over each sequence's own positions (the
    padding masked out), an MLP whose last Linear ModelProxy scores by."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY + 1, width, padding_idx=VOCABULARY)  # the last id pads
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.hidden = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        padded = tokens.to_padded_tensor(VOCABULARY).long()
        inside = (torch.arange(padded.shape[1]) < tokens.offsets().diff()[:, None])[..., None]
        h = torch.relu(self.conv(self.embed(padded).transpose(1, 2))).transpose(1, 2)
        pooled = torch.cat([h.masked_fill(~inside, -torch.inf).amax(1), (h * inside).sum(1) / inside.sum(1)], 1)
        return self.head(torch.relu(self.hidden(pooled)))


def train(store: Dataset, test: StreamingLoader, method: str, keep: float, seed: int, args, wrong: np.ndarray) -> dict:
    """One run: its test accuracy, seconds (selection included), the wrong labels' share of what
    each round selected and the share of the training set it trained on over all rounds."""
    store = open_dataset(store.url)  # each run reads its labels and shard indexes afresh, as a job would
    torch.manual_seed(seed)
    model = TokenClassifier()
    started = time.perf_counter()
    if method in ("random", "random fresh"):
        selection = make_selector("random").select(store, keep, seed=seed)
    elif method in ONCE:
        selection = make_selector(DEFAULT_METHOD, **ONCE[method]).select(store, keep, seed=seed)
    elif method == "unsuspected, drawn":
        selection = unsuspected_draw(store, make_selector(DEFAULT_METHOD).select(store, keep, seed=seed), seed)
    elif method != "all data":
        selection = make_selector(DEFAULT_METHOD).select(store, keep, seed=seed)
    loader = StreamingLoader(
        store, None if method == "all data" else selection, batch_size=BATCH, seed=seed, backend="torch", device="cpu"
    )
    rounds_seconds = time.perf_counter() - started
    shares, seen = [float(wrong[loader.ids].mean())], set(loader.ids.tolist())

    def rounds(epoch: int) -> bool:
        if method not in ("default path", "random fresh") or not epoch or epoch % args.every:
            return False
        if method == "default path":
            loader.update_proxy(model)
            loader.reselect(keep, seed=seed * 1000 + epoch)
        else:  # the bar a re-selecting path must clear: as many fresh samples, drawn at random
            loader.reselect(keep, method="random", seed=seed * 1000 + epoch)
        shares.append(float(wrong[loader.ids].mean()))
        seen.update(loader.ids.tolist())
        return True

    trained = fit(model, loader, args.epochs, rounds=rounds)
    return {
        "seed": seed,
        "method": method,
        "keep": keep if method != "all data" else 1.0,
        "accuracy": accuracy(model, test),
        "seconds": time.perf_counter() - started,
        "select_seconds": rounds_seconds + sum(trained.round_seconds.values()),
        "wrong_selected": float(np.mean(shares)),
        "distinct": len(seen) / store.num_samples,
    }


def unsuspected_draw(store: Dataset, selection: Selection, seed: int) -> np.ndarray:
    """As many samples of each class as `selection` holds, drawn at random from those its model-free
    proxy did not suspect: round 0 without MaxVol's picks (what the default does for a window whose
    proxy knows nothing of the labels)."""
    labels, _ = read_labels(store, "the unsuspected draw")
    rng = np.random.default_rng(seed)
    clear = np.ones(store.num_samples, dtype=bool)
    clear[selection.suspects.ids] = False
    picked = [
        rng.choice(np.flatnonzero(clear & (labels == c)), np.sum(labels[selection.ids] == c), replace=False)
        for c in np.unique(labels)
    ]
    return np.sort(np.concatenate(picked))


def proxy_accuracy(x: np.ndarray, y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of the model-free proxy's heads, fitted on the first WARMUP samples."""
    proxy = RandomFeatureProxy(CLASSES).fit(x[:WARMUP], y[:WARMUP])
    return float((proxy.logits(test_x).argmax(1).numpy() == test_y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12_000)
    parser.add_argument("--test", type=int, default=4000)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--every", type=int, default=3, help="the default path: epochs between rounds")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["all data", "random", "random fresh", "default", "default path"],
        choices=["all data", "random", "random fresh", "default", "default path", *ONCE, "unsuspected, drawn"],
        help="the runs to make",
    )
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 1,024 samples, one seed, 2 epochs")
    args = parser.parse_args()
    if args.tiny:
        args.samples, args.test, args.seeds, args.keeps, args.epochs, args.every = 1024, 512, [0], [0.25], 2, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    x, y = token_sequences(args.samples, seed=1)
    test_x, test_y = token_sequences(args.test, seed=2)
    runs, proxies = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(f"{tmp}/test.zarr", [{"x": test_x, "y": test_y}])
        test = StreamingLoader(f"{tmp}/test.zarr", batch_size=1024, shuffle=False, backend="torch", device="cpu")
        for case in args.cases:
            labels = noisy_labels(y, "symmetric", CASES[case], seed=0) if CASES[case] else y
            wrong = labels != y
            url = f"{tmp}/train-{case}.zarr"
            store = write_dataset(url, [{"x": x, "y": labels}])
            proxies[case] = proxy_accuracy(x, labels, test_x, test_y)
            print(f"{case}: {wrong.mean():.1%} wrong labels; model-free proxy's heads: {proxies[case]:.1%} on test")
            plan = [("all data", 1.0)] if "all data" in args.methods else []
            plan += [(m, k) for k in args.keeps for m in args.methods if m != "all data"]
            for method, keep in plan:
                for seed in args.seeds:
                    run = {"case": case, **train(store, test, method, keep, seed, args, wrong)}
                    runs.append(run)
                    print(
                        f"  {case} {method:>12} keep {keep:.0%} seed {seed}: {run['accuracy']:.2%}, "
                        f"{run['wrong_selected']:.1%} wrong selected, {run['seconds']:.1f} s "
                        f"({run['select_seconds']:.1f} s selecting)",
                        flush=True,
                    )
    rows = {}
    for case in args.cases:
        print(f"\n{case} (model-free proxy's heads on test: {proxies[case]:.1%})")
        mine = [r for r in runs if r["case"] == case]
        rows[case] = summarize(mine, extra=("wrong_selected", "distinct", "seconds", "select_seconds"))
        report(rows[case], "test accuracy", extra=("wrong_selected", "distinct"))
        for r in rows[case]:
            seconds = f"{r['seconds']:.1f} s a run, {r['select_seconds']:.1f} s selecting"
            print(f"  {r['keep']:>4.0%} {r['method']:>12}: {seconds}")
    result = {"args": vars(args), "proxy_accuracy": proxies, "runs": runs, "rows": rows}
    (out / "ragged_selection.json").write_text(json.dumps(result, indent=1))
    for case in args.cases:  # ragged_selection.png for the first case, ragged_selection-CASE.png for the others
        name = "ragged_selection.png" if case == args.cases[0] else f"ragged_selection-{case}.png"
        plot(rows[case], out / name, "test accuracy", f"token sequences ({case}), {args.epochs} epochs")


if __name__ == "__main__":
    main()
