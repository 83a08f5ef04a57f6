"""Does selection teach more per sample than a random subset of the same size? Measured.

    python bench/selection_quality.py [--datasets mnist1d digits shapes] [--budgets 0.05 0.1 0.25 0.5]
                                      [--seeds 0 1 2] [--methods ...] [--epochs 15] [--out bench/results] [--tiny]

Every run trains the same model from the StreamingLoader (torch backend) for the same number of
epochs; the seed sets the model's initialisation, the shuffles and the selector's randomness.
Datasets: MNIST-1D (50,000 signals, a 1D CNN), sklearn's digits (1,400 of 8 x 8, an MLP, in
batches of 16), shapes (10,000 generated JPEGs of 48-160 px, decoded and augmented at 32 x 32 in
the loader, the demo's 2D CNN, in batches of 32 at a rate of 1e-3; its proxy sees 32 x 32
thumbnails) and classes100 (30,000 generated samples of 100 classes, Gaussian mixtures in 64
dimensions, an MLP: the rules at many classes). The rest train with Adam at 3e-3 in batches of 128.
- full: all samples, the ceiling; random, random-balanced: uniform subsets (per class); random-warm:
  2 full-data epochs first (the loader's warm_start_epochs), then a uniform subset;
- sage, graft, craig, adacore: one selection before training, by the model-free proxy beside the
  data (craig and adacore weighted by their clusters' sizes, craig-unweighted and augaware, AugmentAware's
  medoids of gradients under the loader's kind of augmentation, not; adacore-dynamic too: AdaCore every
  round, later rounds on a pool of twice the budget with the trainer's model, the curvature's
  running average handed on; adacore-dynamic-fresh: each round its own curvature);
  graft is the default (`Graft()`: every sample, windows of 128 (64 above a third of the data),
  gradient norms tempered to ‖g‖^0.25, suspected label errors muted, a class under 128 samples drawn from the
  unsuspected, MaxVol among each class's typical half where the proxy is trusted), graft-unmuted
  without muting, graft-raw-w512 the round 0 of 2026-11 (raw gradients, windows of 512), graft-picked
  with MaxVol's picks for every class (`draw_below=0`), graft-drawn with every class drawn,
  graft-untrusting without the typical half (`typical=False`);
- graft-dynamic (the default path), crest-dynamic, random-dynamic: a new round every `--every`
  epochs; the first two push the trainer's model as the proxy (`update_proxy`) and the round runs
  `reselect` (its default, `default_reselect`: GRAFT on a fresh pool of twice the budget, 1.5x in
  windows of 64 above a third of the data) or CREST (crest-coreset-dynamic: with its coreset step,
  weighted). Round 0, with no model yet: graft-dynamic starts from what `nearstore select` and a
  server run (`Graft()` with the model-free proxy); the CREST runs from class-balanced random,
  random-dynamic from uniform, random-balanced-dynamic (the bar under label noise) from a
  class-balanced draw, drawn afresh every round. graft-dynamic-unmuted, -carried and -2026-12-03
  take the parts the default path gained on 2026-12-04 away (see DYNAMIC), and
  graft-dynamic-proportional its class budgets growing as n_c^0.25 (`budget_power=1`: in proportion),
  graft-dynamic-sqrt-budgets them growing as √n_c (`budget_power=0.5`, the default until stop 46),
  graft-dynamic-picked-start its round 0's draw for small classes (`draw_below=0`),
  graft-dynamic-half-tempered-start its round 0's
  further tempering (`norm_power=0.5`, as later rounds), graft-dynamic-untrusting-start its round 0's
  typical half (`typical=False`), graft-dynamic-typical-start that half forced on (`typical=True`),
  graft-dynamic-unrechecked its later rounds' recheck of round 0's suspects (`recheck_suspects=False`);
  the other graft-dynamic
  variants are the ablations of the 2026-12-03 path. graft-dynamic-warm trains on all data for 2
  epochs, then selects with the warmed-up model and every `--every` epochs after.
  Re-selection time and scan bytes are counted, and so are the warm epochs' samples.
- --cases: the training split with label noise or a long tail (CASES); the test split stays clean
  and balanced. Beside accuracy: balanced accuracy (the mean of the classes' accuracies, the same
  here) and natural accuracy (the classes' accuracies weighed by the training split's class shares:
  what a test set as long-tailed as the training split would measure), the mean accuracy of the
  rarer half of the classes (fewest training samples; "rare") and every class's (the JSON's
  per_class_accuracy_mean).
`--dask` also runs every subset method with its every round on a LocalCluster of 2 workers on
127.0.0.1 (runs named METHOD@dask; not the random ones, which read only labels): windows end where
its partitions of shards do, so its picks are not the ones made in process; their quality is.
`--equal-steps` also trains every subset method asked for for as many optimizer steps as the full
run (epochs / keep). Reports mean ± std test accuracy over seeds, wall seconds (selection included),
seconds to a target accuracy, bytes read (scans + samples shipped), selection seconds per round
against one full-data epoch, and the gain over random seed by seed (same initialisation and
shuffles): mean ± std in points, and on how many seeds it is ahead. Writes selection_quality.json
and selection_quality.png.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import StoreSource, StreamingLoader  # noqa: E402
from nearstore import Dataset, Selection, open_dataset, write_dataset  # noqa: E402
from nearstore.app.converters import digits_batches, ensure_mnist1d, long_tail, noisy_labels  # noqa: E402
from nearstore.app.demo import IMAGES_RECIPE, TEST_IMAGES, TRAIN_IMAGES  # noqa: E402
from nearstore.app.synthetic import ensure_shapes  # noqa: E402
from nearstore.app.training import BATCH_SIZE, LEARNING_RATE, accuracy, fit, image_cnn, mnist1d_cnn  # noqa: E402
from nearstore.selection import DEFAULT_METHOD, DaskExecutor, default_reselect, local_cluster, make_selector  # noqa: E402

# The previous round 0: windows of 512, MaxVol on the raw gradients (over every sample).
RAW_W512 = {"window": 512, "norm_power": 1.0}
# What GRAFT did before it judged labels (until 2026-12-04): no suspects muted, classes kept in
# proportion, and re-selection pools that hold the round they replace. The ablations measured then
# keep it, so their names mean what the tables of that time say (but for the model-free proxy, now
# cross-fitted, which no option reaches).
NO_DRAW = {"draw_uninformed": False}
UNMUTED = {"mute_suspects": False, "budget_power": 1.0, **NO_DRAW}
CARRIED = {**UNMUTED, "pool_previous": True}
STATIC = {
    "random": ("random", {}),
    "random-balanced": ("random", {"class_balanced": True}),
    "random-warm": ("random", {}),
    "sage": ("sage", {}),
    "sage-residual": ("sage", {"score": "residual"}),
    "graft": (DEFAULT_METHOD, {}),
    "graft-unmuted": ("graft", UNMUTED),
    "graft-directions": ("graft", {"norm_power": 0.0}),  # MaxVol on gradient directions alone
    # Round 0 with MaxVol's picks for classes of any budget (the default until 2026-12-05, evening),
    # and with every class's samples drawn from those the proxy does not suspect.
    "graft-picked": ("graft", {"draw_below": 0}),
    # Round 0's MaxVol over every sample of a class, whatever the model-free proxy knows (no typical half).
    "graft-untrusting": ("graft", {"typical": False}),
    "graft-drawn": ("graft", {"draw_below": 1 << 62}),
    "graft-raw-w512": ("graft", {**RAW_W512, **UNMUTED}),
    "craig": ("craig", {}),
    "craig-unweighted": ("craig", {}),  # CRAIG's medoids trained without their cluster weights
    "augaware": ("augaware", {}),  # AugmentAware's medoids of gradients under augmentation, unweighted
    "adacore": ("adacore", {}),
}
# Re-selected every `--every` epochs with the trainer's model: (round 0, later rounds); later rounds
# None for the loader's default (`default_reselect(keep)`), or ("default", options on top of it).
# Round 0 has no model yet; CREST without a proxy draws class-balanced random.
BALANCED_START = ("crest", {})
DEFAULT = (DEFAULT_METHOD, {})
POOL = {"pool": 2.0}  # the default's pool up to a third of the data, where its parts were measured
DYNAMIC = {
    "graft-dynamic": (DEFAULT, None),
    # the same rounds asked an epoch early (`reselect_ahead`), scored by the model as it was then,
    # each running while that epoch trains
    "graft-dynamic-ahead": (DEFAULT, None),
    # What each part of the default path is worth under label noise: no suspects muted; pools that
    # hold the round they replace; both (the default path of 2026-12-03); round 0 class-balanced.
    "graft-dynamic-unmuted": (("graft", UNMUTED), ("default", UNMUTED)),
    "graft-dynamic-carried": (DEFAULT, ("default", {"pool_previous": True})),
    "graft-dynamic-proportional": ((DEFAULT_METHOD, {"budget_power": 1.0}), ("default", {"budget_power": 1.0})),
    # Class budgets growing as √n_c in every round (the default until 2026-12-07, stop 46: n_c^0.25).
    "graft-dynamic-sqrt-budgets": ((DEFAULT_METHOD, {"budget_power": 0.5}), ("default", {"budget_power": 0.5})),
    "graft-dynamic-2026-12-03": (("graft", UNMUTED), ("default", CARRIED)),
    "graft-dynamic-balanced-start": (BALANCED_START, None),
    # Round 0's MaxVol over every sample whatever the model-free proxy knows (the default until
    # 2026-12-06, stop 44: no typical half where that proxy is trusted).
    "graft-dynamic-untrusting-start": ((DEFAULT_METHOD, {"typical": False}), None),
    # ... and with the typical half whatever the proxy knows (`typical=True`).
    "graft-dynamic-typical-start": ((DEFAULT_METHOD, {"typical": True}), None),
    # Later rounds judging labels alone, not rechecking round 0's suspects (the default until
    # 2026-12-06, stop 45: `recheck_suspects=False`).
    "graft-dynamic-unrechecked": (DEFAULT, ("default", {"recheck_suspects": False})),
    # MaxVol's picks whatever the proxy knows (the default until 2026-12-05: no draw when it knows nothing).
    "graft-dynamic-no-draw": ((DEFAULT_METHOD, NO_DRAW), ("default", NO_DRAW)),
    # Round 0's MaxVol picks for classes of any budget (the default until 2026-12-05, evening: no
    # draw for classes under DRAW_BELOW samples), later rounds the default.
    "graft-dynamic-picked-start": ((DEFAULT_METHOD, {"draw_below": 0}), None),
    # Round 0 on gradient directions alone (norm_power=0), later rounds the default.
    "graft-dynamic-directions-start": ((DEFAULT_METHOD, {"norm_power": 0.0}), None),
    # Round 0 tempered as later rounds are (norm_power=0.5, the default until 2026-12-06, stop 40).
    "graft-dynamic-half-tempered-start": ((DEFAULT_METHOD, {"norm_power": 0.5}), None),
    # The default of 2026-12-03 at every budget: pools of twice the budget in windows of 128.
    "graft-dynamic-pool-2x": (("graft", {"window": 128, **UNMUTED}), ("graft", {**POOL, "window": 128, **CARRIED})),
    # What each part of the 2026-12-03 path was worth: MaxVol on raw gradients; pools drawn afresh;
    # a round 0 on a pool too; all but the last, with windows of 512 in round 0 (the default path
    # until 2026-12); round 0 class-balanced random (where digits lose).
    "graft-dynamic-untempered": (
        ("graft", {"norm_power": 1.0, **UNMUTED}),
        ("graft", {**POOL, "norm_power": 1.0, **CARRIED}),
    ),
    "graft-dynamic-fresh-pools": (("graft", UNMUTED), ("graft", {**POOL, **UNMUTED})),
    "graft-dynamic-pooled-start": (("graft", {**POOL, **UNMUTED}), ("default", CARRIED)),
    "graft-dynamic-old-default": (
        ("graft", {**RAW_W512, **UNMUTED}),
        ("graft", {**POOL, "norm_power": 1.0, **UNMUTED}),
    ),
    "graft-dynamic-2026-12-03-balanced-start": (BALANCED_START, ("default", CARRIED)),
    "graft-dynamic-warm": (BALANCED_START, None),  # round 0 is never trained on
    "crest-dynamic": (BALANCED_START, ("crest", {})),
    # AdaCore every round, round 0 with the model-free proxy, later rounds on a pool of twice the
    # budget; the curvature's running average handed from round to round (`average`, 0.9), or not.
    "adacore-dynamic": (("adacore", {}), ("adacore", POOL)),
    "adacore-dynamic-fresh": (("adacore", {"average": 0.0}), ("adacore", {**POOL, "average": 0.0})),
    "crest-coreset-dynamic": (BALANCED_START, ("crest", {"coreset": True})),
    "random-dynamic": (("random", {}), ("random", {})),
    # The bar under label noise: a class-balanced random subset drawn afresh every round.
    "random-balanced-dynamic": (("random", {"class_balanced": True}), ("random", {"class_balanced": True})),
}
# `--dask`: the same method with its every round on a LocalCluster of 2 single-threaded workers.
# Windows end where partitions do, so the picks differ from the same method's in process.
ON_DASK = "@dask"
# Full-data epochs before the first round, which then runs with the warmed-up model (GRAFT's "warm").
WARM_START_EPOCHS = {"graft-dynamic-warm": 2, "random-warm": 2}
METHODS = ["full", *STATIC, *DYNAMIC]
# The training recipe by dataset, where it is not Adam at LEARNING_RATE in batches of BATCH_SIZE. Digits'
# 1,400 samples in batches of 128 gave a 10% subset 2 steps an epoch, 30 in 15 epochs: it ended far
# from fitted (random 72.6%, all data ~95%) and its accuracy measured the optimizer's spread (5-11
# points); in 16s random reaches 91.9 ± 1.2%. Shapes' 10% took 8 steps an epoch in 128s (in 32s all
# data fits better: 97.6% against 91.4%), and at 3e-3 a subset's run often never started learning.
RECIPES = {"digits": {"batch_size": 16}, "shapes": IMAGES_RECIPE}
# What the training split suffers (the test split stays clean and balanced): (label noise, its
# rate, the long tail's imbalance ratio n_max / n_min). Symmetric noise replaces a label by a
# uniformly random class (which may be the same one); pair noise turns class c into c + 1.
CASES = {
    "clean": (None, 0.0, 1),
    "sym20": ("symmetric", 0.2, 1),
    "sym40": ("symmetric", 0.4, 1),
    "pair20": ("pair", 0.2, 1),
    "lt10": (None, 0.0, 10),
    "lt100": (None, 0.0, 100),
    "lt10-sym20": ("symmetric", 0.2, 10),
}


@dataclass
class Run:
    dataset: str
    method: str
    keep: float
    seed: int
    epochs: int
    accuracy: float
    curve: list[float]
    seconds: float
    epoch_seconds: list[float]
    clock: list[float]
    selection_seconds: list[float]
    scan_bytes: int
    shipped_bytes: int
    distinct_samples: int
    steps: int
    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE
    balanced_accuracy: float = math.nan  # the mean of the classes' test accuracies
    natural_accuracy: float = math.nan  # the classes' test accuracies weighed as the training split has them
    per_class: list[float] | None = None
    class_shares: list[float] | None = None  # of the training split, class by class
    noisy_share: float = math.nan  # of the samples each round selected, the share with a wrong label
    noisy_shares: list[float] | None = None  # round by round
    # the command's settings a run was made with (None: logged before they were recorded), which a
    # report keeps apart: a --tiny smoke run in the same log pulled the target down
    every: int | None = None
    threads: int | None = None
    tiny: bool | None = None


class Pixels(nn.Module):
    """The digits' preprocessing inside the model, so its proxy sees what training sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().flatten(1) / 16


def digits_mlp() -> nn.Module:
    return nn.Sequential(Pixels(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def datasets(
    names: list[str], root: Path, train_size: int = 50_000, test_size: int = 10_000
) -> dict[str, tuple[Dataset, tuple[torch.Tensor, torch.Tensor], object]]:
    """{name: (train store, in-memory test set, model factory)}; MNIST-1D of the sizes given, shapes
    of a fifth of them."""
    out = {}
    if "mnist1d" in names:
        train = ensure_mnist1d(str(root / f"mnist1d-train-{train_size}.zarr"), train_size, 0)
        test = ensure_mnist1d(str(root / f"mnist1d-test-{test_size}.zarr"), test_size, 1)
        out["mnist1d"] = (train, _in_memory(test), mnist1d_cnn)
    if "digits" in names:
        url = root / "digits.zarr"
        if not url.exists():
            batch = next(digits_batches())
            order = np.random.default_rng(0).permutation(len(batch["y"]))
            train, test = order[:1400], order[1400:]
            write_dataset(str(url), [{k: v[train] for k, v in batch.items()}], shard_samples=256)
            write_dataset(str(root / "digits-test.zarr"), [{k: v[test] for k, v in batch.items()}])
        out["digits"] = (open_dataset(str(url)), _in_memory(open_dataset(str(root / "digits-test.zarr"))), digits_mlp)
    if "shapes" in names:
        train = ensure_shapes(str(root / f"shapes-train-{train_size // 5}.zarr"), train_size // 5, 0)
        test = ensure_shapes(str(root / f"shapes-test-{test_size // 5}.zarr"), test_size // 5, 1)
        out["shapes"] = (train, _in_memory(test), image_cnn)
    if "classes100" in names:
        url, test_url = root / "classes100.zarr", root / "classes100-test.zarr"
        if not url.exists():
            write_dataset(str(url), [gaussian_classes(30_000, 1)], shard_samples=1024)
            write_dataset(str(test_url), [gaussian_classes(10_000, 2)])
        out["classes100"] = (open_dataset(str(url)), _in_memory(open_dataset(str(test_url))), classes100_mlp)
    return out


def gaussian_classes(n: int, seed: int, classes: int = 100, modes: int = 3, dim: int = 64) -> dict[str, np.ndarray]:
    """Many classes: n samples of `classes` classes in turn, shuffled, each a mixture of `modes`
    Gaussians in `dim` dimensions (the centres fixed by seed 0, the samples by `seed`)."""
    centres = np.random.default_rng(0).normal(size=(classes, modes, dim))
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    rng.shuffle(y)
    x = centres[y, rng.integers(0, modes, n)] + rng.normal(size=(n, dim)) * 0.9
    return {"x": x.astype(np.float32), "y": y}


def classes100_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 100))


def corrupted(dataset: Dataset, case: str, root: Path, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """`dataset` as `case` has it (CASES): its long tail (`long_tail`), then its labels corrupted
    (`noisy_labels`); written once under `root` with the true labels beside it. Returns the store
    and which of its labels are wrong."""
    noise, rate, ratio = CASES[case]
    url, truth = root / f"{Path(dataset.url).stem}-{case}.zarr", root / f"{Path(dataset.url).stem}-{case}.npy"
    if not truth.exists():
        name = dataset.input_array
        x, y = dataset.arrays[name][:], dataset.labels[:]
        kept = long_tail(y, ratio)
        x, y = x[kept], y[kept]
        noisy = noisy_labels(y, noise, rate, seed=seed) if noise else y
        write_dataset(str(url), [{name: x, "y": noisy}], shard_samples=dataset.shard_samples, overwrite=True)
        np.save(truth, y)
    store = open_dataset(str(url))
    return store, store.labels[:] != np.load(truth)


def _in_memory(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    loader = StreamingLoader(dataset, batch_size=dataset.num_samples, shuffle=False, **loader_options(dataset))
    x, y = next(iter(loader))
    return x, y


def loader_options(dataset: Dataset, train: bool = False) -> dict:
    """The loader's options for `dataset`: the torch backend, and encoded images decoded as the demo
    decodes them (augmented for training)."""
    images = {"images": TRAIN_IMAGES if train else TEST_IMAGES} if dataset.encoded(dataset.input_array) else {}
    return {"backend": "torch", "device": "cpu", **images}


def class_accuracies(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> list[float]:
    """Each class's test accuracy."""
    model.eval()
    with torch.no_grad():
        right = (model(test[0]).argmax(1) == test[1]).numpy()
    labels = test[1].numpy()
    return [float(right[labels == c].mean()) for c in np.unique(labels)]


@functools.cache
def cluster_executor() -> DaskExecutor:
    """A LocalCluster of 2 single-threaded worker processes on 127.0.0.1, for this run's lifetime."""
    from distributed import Client

    cluster = local_cluster()
    client = Client(cluster)
    atexit.register(cluster.close)
    atexit.register(client.close)
    return DaskExecutor(client)


def recipe_of(name: str) -> dict[str, float]:
    """The training recipe of a run's dataset ("digits", or "digits/sym20+shards64"): batch size and
    Adam's rate, the default's where the dataset has none of its own (RECIPES)."""
    return {"batch_size": BATCH_SIZE, "lr": LEARNING_RATE, **RECIPES.get(name.split("/")[0].split("+")[0], {})}


def train(name, store, test, factory, method, keep, seed, epochs, every, flipped=None, order=None, tiny=False) -> Run:
    """One run; `order`: the loader's shuffle options (default: its own)."""
    # Opened afresh: each run reads its labels and shard indexes itself, as a new job would; its
    # rounds then share them (an opened dataset keeps them).
    store = open_dataset(store.url)
    recipe = recipe_of(name)
    torch.manual_seed(seed)
    model = factory()
    executor = cluster_executor() if method.endswith(ON_DASK) else None
    base = method.removesuffix(ON_DASK)  # the method the run's rounds run
    started = time.perf_counter()
    first_round = []
    if base == "full":
        selection: Selection | None = None
    else:
        kind, options = STATIC[base] if base in STATIC else DYNAMIC[base][0]
        t = time.perf_counter()
        selection = make_selector(kind, **options).select(store, keep, seed=seed, executor=executor)
        first_round.append(time.perf_counter() - t)
    # cluster sizes weight each sample's loss
    weighted = base in ("craig", "adacore", "adacore-dynamic", "adacore-dynamic-fresh", "crest-coreset-dynamic")
    warm = WARM_START_EPOCHS.get(base, 0)
    loader = StreamingLoader(
        store if executor is None else StoreSource(store, executor=executor),
        selection,
        batch_size=recipe["batch_size"],
        seed=seed,
        **(order or {}),
        warm_start_epochs=warm,
        weights=weighted,
        **loader_options(store, train=True),
    )
    rounds_ran = [loader.ids]  # the first round's ids, then each later round (its future, ahead)
    ahead = base.endswith("-ahead")

    def rounds(epoch: int) -> bool:
        asked = epoch + 1 if ahead else epoch  # the epoch that iterates the round asked for now
        if base not in DYNAMIC or asked < max(warm, 1) or (asked - warm) % every:
            return False
        spec = DYNAMIC[base][1]  # None, or ("default", options on top of it): default_reselect(keep)
        kind, options = spec if spec is not None and spec[0] != "default" else default_reselect(keep)
        options = {**options, **(spec[1] if spec is not None and spec[0] == "default" else {})}
        if kind != "random":
            loader.update_proxy(model)
        reselect = loader.reselect_ahead if ahead else loader.reselect
        rounds_ran.append(reselect(keep, method=kind, seed=seed * 1000 + asked, **options))
        return True

    trained = fit(
        model, loader, epochs, rounds=rounds, evaluate=lambda m: accuracy(m, [test]), weighted=weighted, lr=recipe["lr"]
    )
    ran = [r.result().ids if isinstance(r, Future) else getattr(r, "ids", r) for r in rounds_ran]
    seen = set(range(store.num_samples)) if warm else set()
    seen.update(i for ids in ran for i in ids.tolist())
    noisy = [] if flipped is None else [float(flipped[ids].mean()) for ids in ran]
    # seconds of selection and training when each epoch ends (evaluation excluded)
    spent = np.cumsum([trained.round_seconds.get(e, 0.0) + s for e, s in enumerate(trained.epoch_seconds)])
    io = loader.io_stats()
    per_class = class_accuracies(model, test)
    shares = np.bincount(store.labels[:], minlength=len(per_class))[: len(per_class)] / store.num_samples
    return Run(
        dataset=name,
        method=method,
        keep=keep if method != "full" else 1.0,
        seed=seed,
        epochs=epochs,
        **recipe,
        accuracy=trained.curve[-1],
        curve=trained.curve,
        seconds=time.perf_counter() - started,
        epoch_seconds=trained.epoch_seconds,
        clock=(sum(first_round) + spent).tolist(),
        selection_seconds=first_round + list(trained.round_seconds.values()),
        scan_bytes=io["scan_bytes"],
        shipped_bytes=io["bytes_read"],
        distinct_samples=len(seen),
        steps=trained.steps,
        balanced_accuracy=float(np.mean(per_class)),
        natural_accuracy=float(np.dot(shares, per_class)),
        per_class=per_class,
        class_shares=shares.tolist(),
        noisy_share=float(np.mean(noisy)) if noisy else math.nan,
        noisy_shares=noisy or None,
        every=every,
        threads=torch.get_num_threads(),
        tiny=tiny,
    )


def seed_std(values: Sequence[float]) -> float | None:
    """The sample standard deviation over seeds (ddof 1: every ± of the benches); None for one seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def paired_gain(mine: Mapping[int, float], base: Mapping[int, float]) -> dict:
    """`mine`'s accuracy less `base`'s seed by seed (the same initialisation and shuffles), over the
    seeds both ran: {"vs_random": mean or None, "vs_random_std", "ahead": seeds ahead, "paired":
    seeds both ran}: every bench's paired comparison, under the same keys."""
    diffs = [mine[seed] - base[seed] for seed in mine if seed in base]
    return {
        "vs_random": float(np.mean(diffs)) if diffs else None,
        "vs_random_std": seed_std(diffs),
        "ahead": sum(d > 0 for d in diffs),
        "paired": len(diffs),
    }


def summarize(runs: list[Run], target: dict[str, float]) -> list[dict]:
    """Mean ± std over seeds of each (dataset, method, keep, epochs)."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.dataset, r.method, r.keep, r.epochs), []).append(r)
    full_epoch = {r.dataset: float(np.mean(r.epoch_seconds[1:] or r.epoch_seconds)) for r in runs if r.method == "full"}
    rows = []
    for (dataset, method, keep, epochs), members in groups.items():
        acc = np.array([r.accuracy for r in members])
        # per seed against random's run of the same seed (same initialisation and shuffles)
        random_by_seed = {r.seed: r.accuracy for r in groups.get((dataset, "random", keep, epochs), [])}
        to_target = [_seconds_to(r, target[dataset]) for r in members]
        rounds = [s for r in members for s in r.selection_seconds]
        # runs logged before per-class accuracies (stop 43: class shares) were kept have none
        classes = [r.per_class for r in members if r.per_class]
        shared = [r for r in members if r.per_class and r.class_shares]
        rows.append(
            {
                "dataset": dataset,
                "method": method,
                "keep": keep,
                "epochs": epochs,
                "seeds": len(members),
                "accuracy_mean": float(acc.mean()),
                "accuracy_std": seed_std(acc) or 0.0,
                "balanced_accuracy_mean": float(np.mean([r.balanced_accuracy for r in members])),
                "natural_accuracy_mean": float(np.mean([r.natural_accuracy for r in members])),
                # each class's test accuracy, averaged over the seeds, and the rarer half's (a long
                # tail's rare classes are where a subset loses first)
                "per_class_accuracy_mean": np.mean(classes, axis=0).tolist() if classes else None,
                "rare_half_accuracy_mean": float(np.mean([rare_half(r) for r in shared])) if shared else math.nan,
                "noisy_share": float(np.mean([r.noisy_share for r in members])),
                **paired_gain({r.seed: r.accuracy for r in members}, random_by_seed),
                "seconds": float(np.mean([r.seconds for r in members])),
                "seconds_to_target": None if None in to_target else float(np.mean(to_target)),
                "bytes": float(np.mean([r.scan_bytes + r.shipped_bytes for r in members])),
                "distinct_samples": float(np.mean([r.distinct_samples for r in members])),
                "selection_seconds_per_round": float(np.mean(rounds)) if rounds else 0.0,
                "round_vs_full_epoch": float(np.mean(rounds)) / full_epoch[dataset]
                if rounds and dataset in full_epoch
                else None,
            }
        )
    return rows


def rare_half(run: Run) -> float:
    """The mean test accuracy of the half of the classes with the fewest training samples."""
    rarest = np.argsort(run.class_shares, kind="stable")[: max(1, len(run.class_shares) // 2)]
    return float(np.mean(np.asarray(run.per_class)[rarest]))


def _seconds_to(run: Run, target: float) -> float | None:
    """Seconds of selection and training until the test accuracy first reaches target."""
    return next((t for t, acc in zip(run.clock, run.curve) if acc >= target), None)


def gap(row: dict, base: dict | None) -> str:
    """row's accuracy against base's, in σ = (mean − mean_base) / √(std² + std_base²)."""
    if base is None or base is row:
        return ""
    spread = math.hypot(row["accuracy_std"], base["accuracy_std"])
    if not spread:  # one seed each: no spread to measure the gap in
        return "n/a"
    return f"{(row['accuracy_mean'] - base['accuracy_mean']) / spread:+.1f}σ"


def report(rows: list[dict]) -> None:
    print(
        f"{'dataset':<17} {'method':<26} {'keep':>5} {'ep':>3} {'n':>2} {'accuracy':>15} {'vs random':>10} "
        f"{'vs fresh':>8} {'paired gain':>14} {'ahead':>6} {'balanced':>8} {'natural':>8} {'rare':>6} {'noisy':>6} "
        f"{'s':>6} {'s→target':>8} {'MB':>7} {'distinct':>8} {'round s':>7} {'/epoch':>6}"
    )
    key = {(r["dataset"], r["keep"], r["epochs"], r["method"]): r for r in rows}
    for r in sorted(rows, key=lambda r: (r["dataset"], r["keep"], r["epochs"], r["method"])):
        random = key.get((r["dataset"], r["keep"], r["epochs"], "random"))
        fresh = key.get((r["dataset"], r["keep"], r["epochs"], "random-balanced-dynamic"))
        target = f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] is not None else "-"
        paired = ahead = ""
        if r["vs_random_std"] is not None and r["method"] != "random":
            paired = f"{100 * r['vs_random']:+.2f} ± {100 * r['vs_random_std']:.2f}"
            ahead = f"{r['ahead']}/{r['paired']}"
        ratio = f"{r['round_vs_full_epoch']:.2f}" if r["round_vs_full_epoch"] is not None else "-"
        noisy = "" if math.isnan(r["noisy_share"]) else f"{r['noisy_share']:.1%}"
        print(
            f"{r['dataset']:<17} {r['method']:<26} {r['keep']:>5.0%} {r['epochs']:>3} {r['seeds']:>2} "
            f"{r['accuracy_mean']:>8.2%} ± {r['accuracy_std']:>4.2%} {gap(r, random):>10} {gap(r, fresh):>8} "
            f"{paired:>14} {ahead:>6} {r['balanced_accuracy_mean']:>8.2%} "
            f"{r['natural_accuracy_mean']:>8.2%} {r['rare_half_accuracy_mean']:>6.1%} "
            f"{noisy:>6} {r['seconds']:>6.1f} {target:>8} "
            f"{r['bytes'] / 1e6:>7.1f} {r['distinct_samples']:>8.0f} "
            f"{r['selection_seconds_per_round']:>7.2f} {ratio:>6}"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(7.5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        subsets = [r for r in rows if r["dataset"] == name and r["method"] != "full"]
        # equal epochs (the --equal-steps runs train longer); a run of `full` alone has no subsets
        epochs = min((r["epochs"] for r in subsets), default=max(r["epochs"] for r in rows if r["dataset"] == name))
        mine = [r for r in subsets if r["epochs"] == epochs]
        for number, method in enumerate(sorted({r["method"] for r in mine})):
            points = sorted((r["keep"], r["accuracy_mean"], r["accuracy_std"]) for r in mine if r["method"] == method)
            keeps, means, stds = zip(*points)
            ax.errorbar(
                [100 * k for k in keeps],
                means,
                yerr=stds,
                marker="o",
                capsize=3,
                label=method,
                linestyle=("-", "--", ":")[number // 10],  # the colour cycle has 10 colours
                linewidth=3 if method == "graft-dynamic" else 1.2,
            )
        for r in rows:
            if r["dataset"] == name and r["method"] == "full":
                ax.axhline(r["accuracy_mean"], color="grey", linestyle=":", label="full data")
        ax.set(xscale="log", xlabel="keep (%)", ylabel="test accuracy", title=f"{name}, {epochs} epochs")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_arguments(
    parser: argparse.ArgumentParser, fractions: dict[str, list[float]], counts: dict[str, int | list[int]]
) -> None:
    """Stop with parser.error naming the first flag out of range: `fractions` of the data in
    (0, 1], `counts` (one or a list) >= 1; before any run, which would fail or mislead hours in."""
    for flag, values in fractions.items():
        if not all(0 < value <= 1 for value in values):
            parser.error(f"{flag} are fractions of the data in (0, 1], got {values}")
    for flag, value in counts.items():
        if min(value if isinstance(value, list) else [value], default=1) < 1:
            parser.error(f"{flag} must be >= 1, got {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets", nargs="+", default=["mnist1d", "digits"], choices=["mnist1d", "digits", "shapes", "classes100"]
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--every", type=int, default=3, help="dynamic methods: epochs between rounds")
    parser.add_argument(
        "--cases", nargs="+", default=["clean"], choices=list(CASES), help="label noise and long tails (CASES)"
    )
    parser.add_argument(
        "--dask", action="store_true", help="also run each subset method's rounds on 2 Dask workers (METHOD@dask)"
    )
    parser.add_argument(
        "--equal-steps", action="store_true", help="also train the subset methods for the full run's steps"
    )
    parser.add_argument(
        "--shuffle-blocks",
        nargs="+",
        type=int,
        default=[],
        help="also train with shuffle='shards' in blocks of these many samples (runs named dataset+shardsN)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing: summarise every run logged in --out so far"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a smoke run of each of --datasets (MNIST-1D: 4,096 samples), 10%%, seed 0, 2 epochs, 4 methods",
    )
    args = parser.parse_args()
    counts = {"--epochs": args.epochs, "--every": args.every, "--threads": args.threads}
    check_arguments(parser, {"--budgets": args.budgets}, {**counts, "--shuffle-blocks": args.shuffle_blocks})
    if len(set(args.seeds)) != len(args.seeds):  # a seed run twice is one sample counted twice
        parser.error(f"--seeds names a seed twice: {args.seeds}")
    log = args.out / "selection_quality.runs.jsonl"
    if args.report_only and not log.exists():
        parser.error(f"--report-only: no runs logged in {args.out} yet")
    sizes = (50_000, 10_000)
    if args.tiny:
        sizes, args.budgets, args.seeds, args.epochs = (4096, 1024), [0.1], [0], 2
        args.methods = ["full", "random", "graft-dynamic", "crest-coreset-dynamic"]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stores = {} if args.report_only else datasets(args.datasets, args.out / "data", *sizes)
    runs: list[Run] = []
    shuffles = [("", {"shuffle": "global"})]
    shuffles += [(f"+shards{block}", {"shuffle": "shards", "shuffle_block": block}) for block in args.shuffle_blocks]
    variants = [
        ((base if case == "clean" else f"{base}/{case}") + suffix, clean, test, factory, case, shuffle)
        for base, (clean, test, factory) in stores.items()
        for case in args.cases
        for suffix, shuffle in shuffles
    ]
    for name, clean, test, factory, case, order in variants:
        store, flipped = (clean, None) if case == "clean" else corrupted(clean, case, args.out / "data")
        plan = [("full", 1.0, args.epochs)] if "full" in args.methods else []
        plan += [(m, k, args.epochs) for k in args.budgets for m in args.methods if m != "full"]
        if args.dask:
            plan += [(m + ON_DASK, k, e) for m, k, e in plan if m != "full" and not m.startswith("random")]
        if args.equal_steps:
            plan += [(m, k, round(args.epochs / k)) for k in args.budgets for m in args.methods if m != "full"]
        for method, keep, epochs in plan:
            for seed in args.seeds:
                run = train(
                    name, store, test, factory, method, keep, seed, epochs, args.every, flipped, order, args.tiny
                )
                runs.append(run)
                with log.open("a") as f:
                    f.write(json.dumps(asdict(run)) + "\n")
                print(f"{name} {method} keep {keep:.0%} epochs {epochs} seed {seed}: {run.accuracy:.2%}", flush=True)
    if args.report_only:
        logged = [Run(**json.loads(line)) for line in log.read_text().splitlines() if line.strip()]
        settings = {"every": args.every, "threads": args.threads, "tiny": args.tiny}
        mine = [r for r in logged if all(getattr(r, k) in (None, v) for k, v in settings.items())]
        if len(mine) < len(logged):
            print(f"left out {len(logged) - len(mine)} logged runs made with other --every, --threads or --tiny")
        if not mine:
            parser.error(f"--report-only: no run logged in {args.out} was made with {settings}")
        # a run repeated (same dataset, method, keep, epochs, seed) counts once: the latest
        runs = list({(r.dataset, r.method, r.keep, r.epochs, r.seed): r for r in mine}.values())
    # Target: 95% of the full-data accuracy (mean over seeds) in --epochs, per dataset.
    target = {}
    for name in {r.dataset for r in runs}:
        full = [r for r in runs if r.dataset == name and r.method == "full"]
        full = [r for r in full if r.epochs == args.epochs] or full
        target[name] = 0.95 * float(np.mean([r.accuracy for r in full] or [1.0]))
    rows = summarize(runs, target)
    report(rows)
    meta = {
        "epochs": args.epochs,
        "every": args.every,
        "recipes": {"default": {"batch_size": BATCH_SIZE, "lr": LEARNING_RATE}, **RECIPES},
        "threads": args.threads,
        "target": target,
    }
    (args.out / "selection_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, args.out / "selection_quality.png")
    print(f"wrote {args.out / 'selection_quality.json'} and {args.out / 'selection_quality.png'}")


if __name__ == "__main__":
    main()
