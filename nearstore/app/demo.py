"""`nearstore demo`: the whole path, against random and full-data training, on MNIST-1D or on
generated images.

Generates the data into a local store (MNIST-1D's signals, or `--data images`: rendered shapes as
JPEGs of varying size, decoded in the loader's pipeline), selects `keep` of it beside the data
with the default selector (GRAFT), trains a small CNN from the StreamingLoader, re-selecting every
few epochs with the model in training as the proxy (`update_proxy`, `reselect`), and trains the
same model on a random subset of the same size and on all data. Prints one table (accuracy, time,
bytes) and writes it as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loaders import StreamingLoader
from nearstore import Dataset, ParameterError, Selection, make_selector, random_select
from nearstore.app.converters import ensure_mnist1d
from nearstore.app.synthetic import ensure_shapes
from nearstore.app.training import BATCH_SIZE, LEARNING_RATE, accuracy, fit, image_cnn, mnist1d_cnn, rounds_every
from nearstore.checks import check_integer
from nearstore.selection import DEFAULT_METHOD
from nearstore.serving import NearStoreServer
from nearstore.storage.images import ImageTransform

DATA = ("mnist1d", "images")
# The shapes are 48-160 px: trained on at 32 x 32, crops of half the image or more keep the shape.
TRAIN_IMAGES = ImageTransform(size=32, crop_area=(0.5, 1.0))
TEST_IMAGES = ImageTransform(size=32, train=False)
# Batch size and Adam's rate for the shapes: at the demo's 128 and 3e-3 a subset of 1,000-2,500 of
# them often never started learning (docs/benchmarks.md#selection-on-images).
IMAGES_RECIPE = {"batch_size": 32, "lr": 1e-3}


@dataclass
class RunResult:
    run: str
    samples: int
    test_accuracy: float
    train_seconds: float
    rounds: int
    selection_seconds: float
    scan_bytes: int
    shipped_bytes: int
    cache_hits: float  # of the samples the epochs visited, the share the loader's cache served
    io_saving: float


@dataclass
class DemoData:
    """What the demo trains on: stores, the model, and the loaders' options for each side."""

    train: Dataset
    test: Dataset
    model: Callable[[], torch.nn.Module]
    train_options: dict[str, Any] = field(default_factory=dict)
    test_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE


def demo_data(data: str, workdir: Path, num_samples: int, test_samples: int, seed: int) -> DemoData:
    """The stores of `data` ("mnist1d" or "images") in `workdir`, generated where missing: named by
    their size and seed (a store of another seed's samples was taken for this one's)."""
    if data == "mnist1d":
        train = ensure_mnist1d(str(workdir / f"mnist1d-train-{num_samples}-seed{seed}.zarr"), num_samples, seed)
        test = ensure_mnist1d(str(workdir / f"mnist1d-test-{test_samples}-seed{seed}.zarr"), test_samples, seed + 1)
        return DemoData(train, test, mnist1d_cnn)
    if data == "images":
        train = ensure_shapes(str(workdir / f"shapes-train-{num_samples}-seed{seed}.zarr"), num_samples, seed)
        test = ensure_shapes(str(workdir / f"shapes-test-{test_samples}-seed{seed}.zarr"), test_samples, seed + 1)
        return DemoData(train, test, image_cnn, {"images": TRAIN_IMAGES}, {"images": TEST_IMAGES}, **IMAGES_RECIPE)
    raise ParameterError(f"data must be one of {DATA}, got {data!r}")


def run_demo(
    *,
    data: str = "mnist1d",
    workdir: str | Path = "nearstore-demo",
    num_samples: int = 50_000,
    test_samples: int = 10_000,
    keep: float = 0.25,
    epochs: int = 15,
    batch_size: int | None = None,
    seed: int = 0,
    reselect_every: int = 3,
    server: bool = False,
) -> list[RunResult]:
    """Run the demo and return its table; also writes `workdir/demo.json`.

    data: "mnist1d" (signals of 40 floats) or "images" (rendered shapes, JPEGs of 48-160 px,
        decoded and augmented at 32 x 32 in the loader, a small 2D CNN, in batches of 32 at 1e-3).
    batch_size: None for the data's own (128 for MNIST-1D, 32 for images).
    reselect_every: epochs between the selected run's rounds (0: its one selection before training).
    server: select and ship the selected subset through a near-storage server on 127.0.0.1
        (`nearstore serve`'s NearStoreServer, in this process) instead of reading the store directly.
    """
    check_integer("reselect_every", reselect_every, 0)
    check_integer("epochs", epochs, 1)
    if batch_size is not None:
        check_integer("batch_size", batch_size, 1)
    check_integer("seed", seed, 0)
    # a test set and a training set with a class's budget to select: ten classes of ten at least
    check_integer("num_samples", num_samples, 100)
    check_integer("test_samples", test_samples, 10)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    chosen_data = demo_data(data, workdir, num_samples, test_samples, seed)
    batch_size = batch_size or chosen_data.batch_size
    train_set = chosen_data.train
    test = StreamingLoader(chosen_data.test, batch_size=1024, shuffle=False, **chosen_data.test_options)

    near_storage = None
    if server:  # it takes the model's pushed weights as the proxy of later rounds
        near_storage = NearStoreServer(train_set, keep=keep, seed=seed, model=chosen_data.model, progress=True)
    if near_storage is not None:
        chosen = near_storage.current
    else:
        chosen = make_selector(DEFAULT_METHOD).select(train_set, keep, seed=seed, progress=True)
    selections: dict[str, Selection | None] = {
        f"{DEFAULT_METHOD} {keep:.0%}": chosen,
        f"random {keep:.0%}": random_select(train_set, keep, seed=seed),
        "full data": None,
    }
    results = []
    try:
        for name, selection in selections.items():
            selected = selection is chosen
            source = near_storage.url if near_storage and selected else train_set
            loader = StreamingLoader(source, selection, batch_size=batch_size, seed=seed, **chosen_data.train_options)
            torch.manual_seed(seed)
            model = chosen_data.model()
            rounds = rounds_every(loader, model, reselect_every if selected else 0)
            trained = fit(model, loader, epochs, rounds=rounds, desc=name, lr=chosen_data.lr)
            io = loader.io_stats()
            results.append(
                RunResult(
                    run=name,
                    samples=len(loader.ids),
                    test_accuracy=accuracy(model, test),
                    train_seconds=sum(trained.epoch_seconds),
                    rounds=0 if selection is None else 1 + len(trained.round_seconds),
                    selection_seconds=selection.io["seconds"] + sum(trained.round_seconds.values())
                    if selection is not None
                    else 0.0,
                    scan_bytes=io["scan_bytes"],
                    shipped_bytes=io["bytes_read"],
                    cache_hits=io["cache"]["hits"] / max(1, io["cache"]["hits"] + io["cache"]["misses"]),
                    io_saving=io["io_saving"],
                )
            )
    finally:
        if near_storage is not None:
            near_storage.shutdown()

    (workdir / "demo.json").write_text(
        json.dumps(
            {
                "data": data,
                "num_samples": num_samples,
                "test_samples": test_samples,
                "keep": keep,
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": chosen_data.lr,
                "seed": seed,
                "reselect_every": reselect_every,
                "server": server,
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    return results


def format_table(results: list[RunResult]) -> str:
    header = (
        f"{'run':<12} {'samples':>8} {'accuracy':>9} {'train s':>8} {'rounds':>6} {'select s':>9} "
        f"{'scan MB':>8} {'shipped MB':>11} {'cached':>7} {'I/O saving':>11}"
    )
    rows = [
        f"{r.run:<12} {r.samples:>8} {r.test_accuracy:>9.1%} {r.train_seconds:>8.1f} {r.rounds:>6} "
        f"{r.selection_seconds:>9.1f} "
        f"{r.scan_bytes / 1e6:>8.2f} {r.shipped_bytes / 1e6:>11.2f} {r.cache_hits:>7.0%} {r.io_saving:>11.1%}"
        for r in results
    ]
    return "\n".join([header, *rows])
