"""What a re-selection round costs against one full-data training epoch, side by side.

    python bench/round_cost.py [--budgets 0.05 0.1 0.25 0.5] [--repeats 3] [--out bench/results] [--tiny]

MNIST-1D (50,000 samples, the store bench/selection_quality.py writes), the demo's CNN: two
full-data epochs through the StreamingLoader (torch backend, batch 128, Adam) give the proxy (what
`loader.update_proxy` hands over). Then, twice, under glibc's default malloc policy and after
`keep_freed_memory()`: a timed full-data epoch (on a copy of the model), each method's round at
each budget `--repeats` times (the median is reported), and another timed epoch. The methods: the
default re-selection (`default_reselect(keep)`, GRAFT on a pool of twice the budget that holds the
round it replaces, here a class-balanced random one of the same size; above a third of the data a
pool of 1.5x in windows of 64), GRAFT on a pool of twice the budget in windows of 128 at every
budget, CREST, CREST with its coreset step; and round 0, `Graft()` over every sample with the
model-free proxy on a store opened afresh (`nearstore select`'s default: windows of 64 above a
third of the data), the same in windows of 128 at every budget, and the previous round 0.
With freed memory kept, the default re-selection also runs on the same store served by nginx on
127.0.0.1 (HTTP with Range), its pool read as it is (`Coalescing()`: every hole under 64 KiB
read through, here whole shards), with every hole under 4 KiB read through, and with none (a
range a sample); and asked for with `reselect_ahead`, the trainer's wait for it: an epoch of the
subset with the round running beside it, less the same epoch alone (its faults and reads not
counted). Prints seconds, the ratio round / full epoch
(the mean of the two timed epochs; the target is < 0.1), the page faults of a round and what it
read (requests, MB).

Last, the architecture nearstore is built for, on this machine's cores: the round runs beside the
data, on a core of its own, while the trainer trains on another. A nearstore server
(`NearStoreServer` on 127.0.0.1, freed memory kept, the demo's CNN as the model of pushed
weights) in a process of its own pinned to one core, the trainer in this process pinned to
another, torch on one thread in each; the trainer reads the server through a StreamingLoader and
pushes the trained model (`update_proxy`). Per budget, after an untimed round at it: `reselect`
through the server (the trainer waits for the round; what the server read), and `reselect_ahead`'s
wait as above, each `--repeats` times; the ratio's denominator is the trainer's full-data epoch on
its one core (the mean of one before and one after the budget's rounds), so both sides have a
core each.

Then encoded images (`images()`): the shapes (10,000 generated JPEGs of 48-160 px) and 2,000
photo-like JPEGs of 300-500 px (`synthetic.write_photos`), the demo's 2D CNN trained for an epoch
as the proxy (32 x 32 centre crops): the default re-selection and round 0 at each budget, round 0
also with its thumbnails decoded whole (not `ImageTransform.draft`), against a full-data epoch of
the same images through the loader's default backend (DALI's CPU decoder where it is installed,
as a user's epoch; until 2026-12-07 the torch backend's PIL, 1.5x slower). Writes round_cost.json
and round_cost.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # nginx's fixture lives with the tests

from servers import Nginx  # noqa: E402

from loaders import StreamingLoader  # noqa: E402
from nearstore import (  # noqa: E402
    Coalescing,
    Dataset,
    ModelProxy,
    RandomFeatureProxy,
    keep_freed_memory,
    open_dataset,
    random_select,
)
from nearstore.app.converters import ensure_dataset, ensure_mnist1d  # noqa: E402
from nearstore.app.demo import IMAGES_RECIPE, TEST_IMAGES, TRAIN_IMAGES  # noqa: E402
from nearstore.app.encoded_converters import imagefolder_images  # noqa: E402
from nearstore.app.synthetic import ensure_shapes, write_photos  # noqa: E402
from nearstore.app.training import LEARNING_RATE, image_cnn, mnist1d_cnn, train_epoch  # noqa: E402
from nearstore.selection import DEFAULT_METHOD, default_reselect, make_selector  # noqa: E402
from nearstore.serving import NearStoreServer  # noqa: E402

# Round 0, before there is a model: what `nearstore select` and a server run, the default GRAFT with
# the model-free proxy fitted beside it, on a store opened afresh (labels and shard indexes unread),
# beside the previous round 0 (raw gradients, windows of 512). Later rounds get the trained
# model and the round they replace: (method, options), or None for `default_reselect(keep)`.
FIRST_ROUND = "graft-round-0"
MODEL_FREE = {
    FIRST_ROUND: (DEFAULT_METHOD, {}),
    "graft-round-0-w128": ("graft", {"window": 128}),  # the default up to a third of the data
    "graft-raw-w512": ("graft", {"window": 512, "norm_power": 1.0}),
}
METHODS = {
    **MODEL_FREE,
    "reselect": None,
    "graft-pool-2x-w128": ("graft", {"pool": 2.0, "window": 128}),  # the default up to a third
    "crest": ("crest", {}),
    "crest-coreset": ("crest", {"coreset": True}),
}


# The default re-selection over HTTP with its pool read as it is (a request worth 64 KiB: whole
# shards here), with a request worth 4 KiB, and worth nothing (a range a sample).
HTTP_READS = {
    "reselect http": Coalescing(),
    "reselect http, 4 KiB": Coalescing(1 << 12),
    "reselect http, ranges": Coalescing(0),
}

MODEL = "nearstore.app.training:mnist1d_cnn"  # the server's model of the pushed weights


def timed_epoch(model: nn.Module, loader: StreamingLoader) -> float:
    """Seconds of the loader's next epoch, trained on a copy of `model` (the proxy stays as it is).
    Its next, not a fixed one: a round asked for with `reselect_ahead` is taken after the epoch
    that follows the call, which an epoch number set back would never end."""
    trained = copy.deepcopy(model)
    started = time.perf_counter()
    train_epoch(trained, torch.optim.Adam(trained.parameters(), lr=LEARNING_RATE), loader, loader.epoch)
    return time.perf_counter() - started


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_round(
    name: str,
    spec: tuple[str, dict] | None,
    dataset: Dataset,
    keep: float,
    proxy: ModelProxy,
    repeats: int,
    **extra: object,
) -> dict:
    """The round of `spec` (method, options; None: `default_reselect(keep)`; `extra` options on
    top), reported as `name`, on `dataset` at `keep`, `repeats` times: seconds, page faults and the
    selection's reads (bytes, requests) of each, and the median."""
    method, options = spec or default_reselect(keep)
    options = {**options, **extra}
    runs = []
    for repeat in range(repeats):
        if name in MODEL_FREE:
            on, scorer, previous = open_dataset(dataset.url, storage_options=dataset.storage_options), None, None
        else:
            on, scorer = dataset, proxy
            previous = random_select(dataset, keep, seed=repeat, class_balanced=True).ids
        started, before = time.perf_counter(), faults()
        io = make_selector(method, **options).select(on, keep, proxy=scorer, seed=repeat, previous=previous).io
        runs.append((time.perf_counter() - started, faults() - before, io["bytes"], io["requests"]))
    seconds, faulted, read, requests = (list(column) for column in zip(*runs))
    row = {"method": name, "keep": keep, "seconds": seconds, "median": float(np.median(seconds))}
    return {**row, "page_faults": faulted, "bytes": read, "requests": requests}


def report(title: str, rows: list[dict], epoch_seconds: float | None = None) -> None:
    """Print `rows`, each's median over `epoch_seconds`, or over its own "full_epoch_seconds"."""
    print(title)
    width = max(26, *(len(row["method"]) for row in rows))
    print(f"{'method':<{width}} {'keep':>5} {'round s':>8} {'/ epoch':>8} {'faults':>8} {'requests':>9} {'MB':>6}")
    for row in rows:
        row["per_epoch"] = row["median"] / row.get("full_epoch_seconds", epoch_seconds)
        print(
            f"{row['method']:<{width}} {row['keep']:>5.0%} {row['median']:>8.2f} {row['per_epoch']:>8.3f} "
            f"{int(np.median(row['page_faults'])):>8} {int(np.median(row['requests'])):>9} "
            f"{np.median(row['bytes']) / 1e6:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 4,096 samples, 10%%, one repeat")
    args = parser.parse_args()
    if not all(0 < keep <= 1 for keep in args.budgets):
        parser.error(f"--budgets are fractions of the data in (0, 1], got {args.budgets}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.tiny:
        args.budgets, args.repeats = [0.1], 1
    args.out.mkdir(parents=True, exist_ok=True)
    samples = 4096 if args.tiny else 50_000
    store = ensure_mnist1d(str(args.out / "data" / f"mnist1d-train-{samples}.zarr"), samples, 0)
    torch.manual_seed(0)
    model = mnist1d_cnn()
    loader = StreamingLoader(store, batch_size=128, backend="torch", device="cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)  # as the demo trains
    for number in range(2):
        train_epoch(model, optimizer, loader, number)
    proxy = ModelProxy(model)
    rows, epochs = [], {}
    for allocator in ("default", "kept"):
        if allocator == "kept":
            keep_freed_memory()
        first = timed_epoch(model, loader)
        block = [
            {"allocator": allocator, **timed_round(name, spec, store, keep, proxy, args.repeats)}
            for name, spec in METHODS.items()
            for keep in args.budgets
        ]
        if allocator == "kept":
            block += over_http(store, proxy, args.budgets, args.repeats)
            block += ahead(store, model, args.budgets, args.repeats)
        # The machine's speed drifts (it is shared): the rounds are set against the mean of an epoch
        # timed before them and one after.
        last = timed_epoch(model, loader)
        epochs[allocator] = {"before": first, "after": last}
        title = f"malloc {allocator}: full-data epoch {first:.2f} s before the rounds, {last:.2f} s after"
        report(title, block, (first + last) / 2)
        rows += block
    own = on_own_cores(store, model, loader, args.budgets, args.repeats)
    if own:
        title = "server on one core, trainer on another (torch threads 1 each): / the trainer's full-data epoch there"
        report(title, own)
        rows += own
    shape_samples = 512 if args.tiny else 10_000
    shapes = ensure_shapes(str(args.out / "data" / f"shapes-train-{shape_samples}.zarr"), shape_samples, 0)
    pictures = images("shapes", shapes, args.budgets, args.repeats)
    pictures += images("photos", photos(args.out, 64 if args.tiny else 2_000), args.budgets, args.repeats)
    report("encoded images (decoded at 32 x 32): / a full-data epoch of them", pictures)
    rows += pictures
    result = {"full_epoch_seconds": epochs, "threads": torch.get_num_threads(), "rows": rows}
    (args.out / "round_cost.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "round_cost.png")
    print(f"wrote {args.out / 'round_cost.json'} and {args.out / 'round_cost.png'}")


def images(name: str, store: Dataset, budgets: list[float], repeats: int) -> list[dict]:
    """The default re-selection and round 0 over the encoded images of `store`, rows named
    "`name`: ...": the demo's 2D CNN trained for an epoch on 32 x 32 random crops decoded in the
    loader (its default backend, DALI where installed; batches of 32, the demo's recipe) as the
    proxy, decoding 32 x 32 centre crops as a loader's `update_proxy` has it; round 0 also with its
    thumbnails decoded whole, not scaled (`RandomFeatureProxy.images` without `draft`). Each row
    against the mean of a full-data epoch of the images timed before the rounds and one after."""
    torch.manual_seed(0)
    model = image_cnn()
    loader = StreamingLoader(store, batch_size=IMAGES_RECIPE["batch_size"], device="cpu", images=TRAIN_IMAGES)
    train_epoch(model, torch.optim.Adam(model.parameters(), lr=IMAGES_RECIPE["lr"]), loader, 0)
    proxy = ModelProxy(model, images=TEST_IMAGES)
    before = timed_epoch(model, loader)
    specs = {"reselect": None, FIRST_ROUND: MODEL_FREE[FIRST_ROUND]}
    rows = [timed_round(m, spec, store, keep, proxy, repeats) for m, spec in specs.items() for keep in budgets]
    thumbnails = RandomFeatureProxy.images
    RandomFeatureProxy.images = replace(thumbnails, draft=False)
    try:
        whole = [timed_round(FIRST_ROUND, MODEL_FREE[FIRST_ROUND], store, keep, None, repeats) for keep in budgets]
    finally:
        RandomFeatureProxy.images = thumbnails
    rows += [{**row, "method": f"{FIRST_ROUND}, whole decodes"} for row in whole]
    full = (before + timed_epoch(model, loader)) / 2
    named = [{**row, "method": f"{name}: {row['method']}"} for row in rows]
    return [{**row, "allocator": "kept", "full_epoch_seconds": full} for row in named]


def photos(out: Path, samples: int) -> Dataset:
    """A store of `samples` photo-like JPEGs of 300-500 px (`write_photos`, 8 classes), made once."""
    url = str(out / "data" / f"photos-{samples}.zarr")

    def write() -> Dataset:
        with tempfile.TemporaryDirectory() as workdir:
            return imagefolder_images(write_photos(Path(workdir) / "photos", samples)).write(url, overwrite=True)

    return ensure_dataset(url, samples, write)


def ahead(store: Dataset, model: nn.Module, budgets: list[float], repeats: int) -> list[dict]:
    """What the default re-selection asked for with `reselect_ahead` costs the trainer: an epoch of
    the subset during which the round runs in this process (the epoch's end waits for it) against
    the same epoch alone, each after an untimed epoch that fills the cache with the subset."""
    rows = []
    for keep in budgets:
        loader = StreamingLoader(
            store,
            random_select(store, keep, seed=0, class_balanced=True),
            batch_size=128,
            backend="torch",
            device="cpu",
        )
        loader.update_proxy(model)
        rows.append(seconds_row("reselect ahead: the wait", keep, waits_for_ahead(model, loader, repeats)))
    return rows


def waits_for_ahead(model: nn.Module, loader: StreamingLoader, repeats: int) -> list[float]:
    """`repeats` times: an untimed epoch (the cache takes the subset in), the same epoch timed alone,
    then `reselect_ahead` and the next epoch, during which the round runs and whose end waits for
    it: that epoch's seconds less the one alone."""
    waits = []
    for _ in range(repeats):
        timed_epoch(model, loader)
        alone = timed_epoch(model, loader)
        loader.reselect_ahead()  # taken as the next epoch ends
        waits.append(timed_epoch(model, loader) - alone)
    return waits


def seconds_row(name: str, keep: float, seconds: list[float], reads: list[dict] | None = None) -> dict:
    """A row of `seconds` timed on the trainer's side, with the rounds' `reads` (Selection.io) if
    known; page faults are not counted (they are another process's, or the epoch's)."""
    reads = reads or [{"bytes": 0, "requests": 0}]
    row = {"allocator": "kept", "method": name, "keep": keep, "seconds": seconds, "median": float(np.median(seconds))}
    return {**row, "page_faults": [0], "bytes": [r["bytes"] for r in reads], "requests": [r["requests"] for r in reads]}


def on_own_cores(
    store: Dataset, model: nn.Module, loader: StreamingLoader, budgets: list[float], repeats: int
) -> list[dict]:
    """The default re-selection run by a server in a process pinned to one core, the trainer (this
    process, `loader` its full-data epochs) pinned to another, torch on one thread in each: per
    budget, `reselect` through the server and `reselect_ahead`'s wait, each row's
    "full_epoch_seconds" the trainer's full-data epoch on its core. None on fewer than 2 cores."""
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        print(f"server on its own core: skipped, this process may run on {len(cores)} core only")
        return []
    server_core, trainer_core = sorted(cores)[:2]
    context = multiprocessing.get_context("spawn")  # forking a process that holds torch's threads is unsafe
    answers, stop = context.Queue(), context.Event()
    server = context.Process(target=serve_on_core, args=(store.url, budgets[0], server_core, answers, stop))
    server.start()
    threads = torch.get_num_threads()
    rows = []
    try:
        url = answers.get(timeout=600)
        if isinstance(url, dict):
            raise RuntimeError(f"the server on core {server_core} failed:\n{url['error']}")
        pin({trainer_core})
        torch.set_num_threads(1)
        remote = StreamingLoader(url, batch_size=128, backend="torch", device="cpu")
        remote.update_proxy(model)
        for keep in budgets:
            remote.reselect(keep)  # untimed: the server's round before the first timed one is of this size
            before = timed_epoch(model, loader)
            blocking, reads = [], []
            for _ in range(repeats):
                started = time.perf_counter()
                reads.append(remote.reselect(keep).io)
                blocking.append(time.perf_counter() - started)
            waits = waits_for_ahead(model, remote, repeats)
            full = (before + timed_epoch(model, loader)) / 2
            for row in (
                seconds_row("server on its own core: reselect", keep, blocking, reads),
                seconds_row("server on its own core: reselect ahead, the wait", keep, waits),
            ):
                rows.append(
                    {**row, "full_epoch_seconds": full, "cores": {"server": server_core, "trainer": trainer_core}}
                )
    finally:
        pin(cores)
        torch.set_num_threads(threads)
        stop.set()
        server.join(timeout=60)
    return rows


def serve_on_core(url: str, keep: float, core: int, answers: Any, stop: Any) -> None:
    """A server process: pinned to `core`, torch on one thread, freed memory kept (as `nearstore
    serve` keeps it); serves the store at `url` on 127.0.0.1, round 0 a class-balanced random
    selection of `keep`, its URL (or {"error": traceback}) put on `answers`, until `stop` is set."""
    try:
        pin({core})
        torch.set_num_threads(1)
        keep_freed_memory()
        dataset = open_dataset(url)
        server = NearStoreServer(
            dataset, selection=random_select(dataset, keep, seed=0, class_balanced=True), model=MODEL
        )
    except Exception:
        answers.put({"error": traceback.format_exc()})
        return
    threading.Thread(target=server.serve, daemon=True).start()
    answers.put(server.url)
    stop.wait()
    server.shutdown()


def pin(cores: set[int]) -> None:
    """Every thread of this process onto `cores`: a thread's affinity is its own (new threads take
    their creator's), and torch's, gRPC's and the loaders' threads already run."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def over_http(store: Dataset, proxy: ModelProxy, budgets: list[float], repeats: int) -> list[dict]:
    """The default re-selection round on the same store served by nginx on 127.0.0.1, its pool read
    in each of the ways of HTTP_READS."""
    with tempfile.TemporaryDirectory() as workdir:
        nginx = Nginx(Path(store.url).resolve().parent, Path(workdir)).wait_ready()
        try:
            remote = open_dataset(f"{nginx.url}/{Path(store.url).name}")
            return [
                {"allocator": "kept", **timed_round(name, None, remote, keep, proxy, repeats, pool_reads=reads)}
                for name, reads in HTTP_READS.items()
                for keep in budgets
            ]
        finally:
            nginx.stop()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a series a (method, allocator): a legend of 27 of them inside the axes hid the data, so it
    # stands to the right, in two columns where it is long
    fig, ax = plt.subplots(figsize=(11, 5))
    series = list(dict.fromkeys((r["allocator"], r["method"]) for r in rows))
    for allocator, name in series:
        mine = [r for r in rows if r["method"] == name and r["allocator"] == allocator]
        ax.plot(
            [100 * r["keep"] for r in mine],
            [r["per_epoch"] for r in mine],
            "-" if allocator == "default" else ":",
            marker="o",
            label=name if allocator == "kept" else f"{name}, malloc {allocator}",
        )
    ax.axhline(0.1, color="grey", linestyle="--", label="target: 10% of an epoch")
    ax.set(xscale="log", xlabel="keep (%)", ylabel="round / full-data epoch", title="selection round cost")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=1 if len(series) < 14 else 2)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
