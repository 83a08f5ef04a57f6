"""One near-storage server feeding several trainers at once: samples/s per trainer and in all, what
a selection round running meanwhile costs the others' reads, and the bytes each trainer is served.

    python bench/server_trainers.py [--samples 262144] [--keep 0.25] [--epochs 2] [--trainers 1 2 4]
        [--batch-size 256] [--cache] [--read-cache-bytes 268435456] [--out bench/results] [--tiny]

A local store of `--samples` float32 (40,) samples (MNIST-1D's size) with 10 classes, generated as
bench/scale.py's, in shards of 1,024, is served by one `NearStoreServer` on 127.0.0.1 in this
process (round 0 a random `--keep` selection). Each trainer is a process of its own (spawned once:
closer to real trainers than threads, each with its own GIL and gRPC client), iterating a
`StreamingLoader` over `FlightSource` (torch backend, batches of `--batch-size`, `cache=False` so
that every epoch is read from the server; `--cache` for the default) for `--epochs` epochs of the
server's current round. A run's trainers make their loaders first, then start together; before
the first, an untimed run of every trainer for an epoch, with a round. torch runs on one thread
everywhere.

Runs, for each count N of `--trainers` (1 is always run):
- plain, N and N − 1 trainers read. Per trainer samples/s (its samples over its own seconds), the
  aggregate (every trainer's samples over the seconds from the first start to the last end), the
  aggregate over one trainer's; and the cores the server's process and the trainers' took (their
  CPU seconds over the run's);
- with a round: trainer 0 calls `reselect` (the default round: GRAFT on a fresh pool, run by the
  server, its default proxy) as the other N − 1 start reading, and reads its epochs of the new round
  once it has it. The readers' samples/s while the round runs (the batches each received inside the
  round's window, over the part of the window it was reading) over their samples/s in the plain
  run of N − 1 (the same readers, no round); and the round's seconds over N = 1's (the round alone).

Bytes served: each trainer's `io_stats()` (bytes and samples of its epochs), which must be exactly
its epochs × its round's selection × a sample's row on the wire (id, x, y), and the server's own
count of what it shipped, which must be their sum (the script fails if either is off); with what
the server read from storage for them, and in the untimed first run. The server keeps the chunks it
read for every trainer within `--read-cache-bytes` (0: none, each batch read from storage): a
store that fits is read in the first run, and not again.

A round takes none of the server's locks that reads wait on (do_get reads outside them), so what
it costs the readers is the cores and the server process's GIL it takes. On a 2-core machine the
server, its round and every trainer share the two cores (and other jobs share the machine): the
aggregate cannot pass what the server's process makes of them. Prints ratios; writes
server_trainers.json and server_trainers.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import FlightSource, StreamingLoader  # noqa: E402
from nearstore import Dataset, random_select, write_dataset  # noqa: E402
from nearstore.serving import NearStoreServer  # noqa: E402
from nearstore.serving.server import READ_CACHE_BYTES  # noqa: E402


def write_store(path: str, samples: int) -> Dataset:
    """float32 (40,) samples whose 10 classes differ in mean (bench/scale.py's)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, samples)
    x = (rng.normal(size=(samples, 40)) + y[:, None] * 0.1).astype(np.float32)
    return write_dataset(path, [{"x": x, "y": y}])


def row_bytes(dataset: Dataset) -> int:
    """Bytes of one sample in a record batch the server ships: its id (int64) and every array."""
    return 8 + sum(a.dtype.itemsize * int(np.prod(a.shape[1:])) for a in dataset.arrays.values())


@contextmanager
def serving(dataset: Dataset, keep: float, read_cache_bytes: int) -> Iterator[NearStoreServer]:
    """A server on 127.0.0.1, round 0 a random selection, its reader built by one read. One for
    the whole bench: of 60 servers made and shut down in turn on this shared machine, one refused
    every connection (gRPC's pick of a free port with SO_REUSEPORT on is racy, grpc/grpc#10755)."""
    server = NearStoreServer(dataset, selection=random_select(dataset, keep, seed=0), read_cache_bytes=read_cache_bytes)
    threading.Thread(target=server.serve, daemon=True).start()
    try:
        source = FlightSource(server.url)
        source.read(server.current.ids[:256], arrays=list(dataset.sample_arrays), round=0)
        source.close()
        yield server
    finally:
        server.shutdown()


def trainer(url: str, epochs: int, batch_size: int, select: bool, cache: bool, ready: Any, go: Any) -> dict[str, Any]:
    """One trainer: a loader over the server, `ready` said once it is made, then (at `go`) a round
    asked for if `select`, and `epochs` epochs read. Times are time.monotonic(), one clock for
    every process of this machine."""
    loader = StreamingLoader(url, batch_size=batch_size, backend="torch", device="cpu", cache=cache)
    ready.put(os.getpid())
    go.get()
    started, cpu = time.monotonic(), time.process_time()
    window = None
    if select:
        loader.reselect()
        window = (started, time.monotonic())
    stamps = []  # (when a batch arrived, its samples)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        stamps += [(time.monotonic(), len(x)) for x, _ in loader]
    ended, cpu = time.monotonic(), time.process_time() - cpu
    per_epoch = loader.io_stats()["per_epoch"]
    return {
        "started": started,
        "ended": ended,
        "cpu_seconds": cpu,
        "round": loader.round,
        "round_window": window,
        "selected": len(loader.ids),
        "samples": sum(e["samples"] for e in per_epoch),
        "bytes": sum(e["bytes"] for e in per_epoch),
        "epoch_seconds": [e["seconds"] for e in per_epoch],
        "stamps": stamps,
    }


def trainer_process(inbox: Any, outbox: Any) -> None:
    """A trainer's process: runs each job from `inbox` (None ends it), its result to `outbox`; a
    job that fails sends its traceback and ends the process."""
    torch.set_num_threads(1)
    for job in iter(inbox.get, None):
        try:
            outbox.put(trainer(**job, ready=outbox, go=inbox))
        except Exception:
            outbox.put({"error": traceback.format_exc()})
            return


class Trainers:
    """Trainer processes, spawned once (forking a process that serves gRPC is unsafe)."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.inboxes = [context.Queue() for _ in range(count)]
        self.outboxes = [context.Queue() for _ in range(count)]
        self.processes = [
            context.Process(target=trainer_process, args=(i, o), daemon=True)
            for i, o in zip(self.inboxes, self.outboxes)
        ]
        for process in self.processes:
            process.start()

    def run(
        self, url: str, trainers: int, epochs: int, batch_size: int, with_round: bool, cache: bool
    ) -> list[dict[str, Any]]:
        """`trainers` of them read `epochs` from `url`, trainer 0 asking for a round first if
        `with_round`; all start once every loader is made."""
        for k in range(trainers):
            job = {
                "url": url,
                "epochs": epochs,
                "batch_size": batch_size,
                "select": with_round and k == 0,
                "cache": cache,
            }
            self.inboxes[k].put(job)
        for k in range(trainers):
            self._answer(k)  # its loader is made
        for k in range(trainers):
            self.inboxes[k].put("go")
        return [self._answer(k) for k in range(trainers)]

    def _answer(self, k: int) -> Any:
        answer = self.outboxes[k].get(timeout=600)
        if isinstance(answer, dict) and "error" in answer:
            raise RuntimeError(f"trainer {k} failed:\n{answer['error']}")
        return answer

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for process in self.processes:
            process.join(timeout=30)


def measure(
    trainers: Trainers, server: NearStoreServer, count: int, with_round: bool, args: argparse.Namespace
) -> dict[str, Any]:
    """One run of `count` trainers (trainer 0 asking for a round if `with_round`) of `server`'s
    current round: what it shipped and read meanwhile, and each trainer's batches."""
    shipped, storage, cpu = server.shipped.snapshot(), server.storage_reads.snapshot(), time.process_time()
    results = trainers.run(server.url, count, args.epochs, args.batch_size, with_round, args.cache)
    shipped, storage = server.shipped.snapshot() - shipped, server.storage_reads.snapshot() - storage
    cpu = time.process_time() - cpu  # this process's: the server's (the rest of it waits on the trainers)
    row_size = row_bytes(server.dataset)
    for k, r in enumerate(results):
        expected = (1 if args.cache else args.epochs) * r["selected"]  # the cache reads a round once
        if r["samples"] != expected or r["bytes"] != expected * row_size:
            raise SystemExit(
                f"trainer {k} of {count} was served {r['samples']} samples, {r['bytes']} bytes; its "
                f"{args.epochs} epochs of round {r['round']} ({r['selected']} samples) take {expected}, "
                f"{expected * row_size} bytes"
            )
    served = sum(r["bytes"] for r in results)
    if shipped.bytes != served:
        raise SystemExit(f"the server shipped {shipped.bytes} bytes, its {count} trainers got {served}")
    first, last = min(r["started"] for r in results), max(r["ended"] for r in results)
    row = {
        "trainers": count,
        "round": with_round,
        "seconds": last - first,
        "server_cpu_seconds": cpu,
        "trainer_cpu_seconds": [r["cpu_seconds"] for r in results],
        "aggregate": sum(r["samples"] for r in results) / (last - first),
        "per_trainer": [r["samples"] / (r["ended"] - r["started"]) for r in results],
        "bytes": [r["bytes"] for r in results],
        "samples": [r["samples"] for r in results],
        "selected": [r["selected"] for r in results],
        "rounds": [r["round"] for r in results],
        "epoch_seconds": [r["epoch_seconds"] for r in results],
        "shipped": shipped.as_dict(),
        "storage_reads": storage.as_dict(),
        # each trainer's batches: seconds since the first start, samples (for the plot)
        "timeline": [[(t - first, n) for t, n in r["stamps"]] for r in results],
    }
    if with_round:
        begin, end = results[0]["round_window"]
        row["round_seconds"] = end - begin
        row["round_window"] = (begin - first, end - first)
        row["readers_during_round"] = [during(r, begin, end) for r in results[1:]]
    return row


def during(result: dict[str, Any], begin: float, end: float) -> float | None:
    """A reader's samples/s over the part of [begin, end] it was reading (None: it read none of it)."""
    start, stop = max(begin, result["started"]), min(end, result["ended"])
    if stop <= start:
        return None
    return sum(n for t, n in result["stamps"] if start < t <= stop) / (stop - start)


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """aggregate(N) / aggregate(1); the N − 1 readers' samples/s while trainer 0's round runs over
    theirs in the plain run of N − 1 (the same readers without a round); a round's seconds over its
    seconds alone (N = 1)."""
    plain = {r["trainers"]: r for r in rows if not r["round"]}
    rounds = {r["trainers"]: r for r in rows if r["round"]}
    readers = {
        n: float(np.mean(during)) / float(np.mean(plain[n - 1]["per_trainer"]))
        for n, r in rounds.items()
        if (during := [rate for rate in r["readers_during_round"] if rate is not None])
    }
    return {
        "aggregate_over_one": {n: r["aggregate"] / plain[1]["aggregate"] for n, r in plain.items()},
        "readers_during_round_over_plain": readers,
        "round_over_alone": {n: r["round_seconds"] / rounds[1]["round_seconds"] for n, r in rounds.items()},
    }


def report(rows: list[dict[str, Any]], ratio: dict[str, dict[int, float]], args: argparse.Namespace) -> None:
    print(f"\n{'trainers':>8} {'samples/s, all':>15} {'/ 1 trainer':>12} {'cores: server':>14} {'trainers':>9}   each")
    for row in (r for r in rows if not r["round"]):
        n, seconds = row["trainers"], row["seconds"]
        each = ", ".join(f"{rate:,.0f}" for rate in row["per_trainer"])
        server, trainers = row["server_cpu_seconds"] / seconds, sum(row["trainer_cpu_seconds"]) / seconds
        print(
            f"{n:>8} {row['aggregate']:>15,.0f} {ratio['aggregate_over_one'][n]:>12.2f} {server:>14.2f}"
            f" {trainers:>9.2f}   {each}"
        )
    print("\ntrainer 0 asks for a round as the others start reading (readers: the other N − 1):")
    print(
        f"{'trainers':>8} {'round s':>8} {'/ alone':>8} {'samples/s, all':>15}   readers during the round / plain N − 1"
    )
    for row in (r for r in rows if r["round"]):
        n = row["trainers"]
        during = ", ".join(f"{rate:,.0f}" for rate in row["readers_during_round"] if rate is not None)
        versus = f"{during} samples/s each: {ratio['readers_during_round_over_plain'][n]:.2f}" if during else "-"
        alone = ratio["round_over_alone"][n]
        print(f"{n:>8} {row['round_seconds']:>8.2f} {alone:>8.2f} {row['aggregate']:>15,.0f}   {versus}")
    epochs = "1 read (the cache)" if args.cache else f"{args.epochs} epochs"
    print(f"\nbytes served (each trainer: exactly {epochs} × its selection × a row; the server's, their sum):")
    for row in rows:
        kind = "with a round" if row["round"] else "plain"
        each = ", ".join(f"{b / 1e6:.2f}" for b in row["bytes"])
        storage = row["storage_reads"]["bytes"]
        print(
            f"  {row['trainers']} trainers, {kind}: {each} MB (rounds {row['rounds']}); shipped "
            f"{row['shipped']['bytes'] / 1e6:.2f} MB in {row['shipped']['requests']} requests; read from "
            f"storage {storage / 1e6:.2f} MB ({storage / row['shipped']['bytes']:.1f}x shipped)"
        )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for with_round, label in ((False, "plain"), (True, "trainer 0 asks for a round")):
        chosen = [r for r in rows if r["round"] == with_round]
        left.plot([r["trainers"] for r in chosen], [r["aggregate"] for r in chosen], "o-", label=label)
    left.set(xlabel="trainers", ylabel="aggregate samples/s", title="one server, N trainer processes")
    left.set_xticks(sorted({r["trainers"] for r in rows}))
    left.set_ylim(bottom=0)
    left.legend()
    busiest = max((r for r in rows if r["round"]), key=lambda r: r["trainers"])
    for k, timeline in enumerate(busiest["timeline"]):
        if timeline:
            times, samples = zip(*timeline)
            right.plot(times, np.cumsum(samples), label=f"trainer {k}{' (asks for the round)' * (k == 0)}")
    right.axvspan(*busiest["round_window"], color="grey", alpha=0.2, label="the round")
    right.set(xlabel="seconds", ylabel="samples received", title=f"{busiest['trainers']} trainers, with a round")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=262_144)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--trainers", type=int, nargs="+", default=[1, 2, 4], help="trainer counts to run")
    parser.add_argument(
        "--cache",
        action="store_true",
        help="the loaders' sample cache on: a round's samples read once, not every epoch",
    )
    parser.add_argument(
        "--read-cache-bytes", type=int, default=READ_CACHE_BYTES, help="the server's read cache (0: none)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--tiny", action="store_true", help="a smoke run: 8,192 samples, batches of 64, 1 and 2 trainers"
    )
    args = parser.parse_args()
    if args.tiny:
        args.samples, args.batch_size, args.trainers = 8192, 64, [1, 2]
    args.trainers = sorted({1, *args.trainers})  # the ratios are over one trainer's figures
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the server's rounds too: the trainers share the cores
    trainers = Trainers(max(args.trainers))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = write_store(f"{tmp}/trainers.zarr", args.samples)
            with serving(store, args.keep, args.read_cache_bytes) as server:
                # untimed: every process's first loader and epoch, the server's first round
                before = server.storage_reads.snapshot()
                trainers.run(server.url, max(args.trainers), 1, args.batch_size, True, args.cache)
                warmup = (server.storage_reads.snapshot() - before).as_dict()
                # the plain runs of N − 1 too: the readers beside a round, without it
                plain = sorted({*args.trainers, *(n - 1 for n in args.trainers if n > 1)})
                for with_round, counts in ((False, plain), (True, args.trainers)):
                    for count in counts:
                        print(f"{count} trainer{'s' * (count > 1)}{', with a round' * with_round}", flush=True)
                        rows.append(measure(trainers, server, count, with_round, args))
    finally:
        trainers.close()
    ratio = ratios(rows)
    report(rows, ratio, args)
    stored = server.stored_bytes
    print(
        f"the untimed first run read {warmup['bytes'] / 1e6:.2f} MB from storage, "
        f"{warmup['bytes'] / sum(stored.values()):.2f}x the store's; the server's read cache (chunks held "
        f"for every trainer): {server.read_cache.as_dict() if server.read_cache else 'none'}"
    )
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "trainers": "processes"}
    settings = {k: getattr(args, k) for k in ("samples", "keep", "epochs", "batch_size", "cache", "read_cache_bytes")}
    out = {"meta": meta, **settings, "ratios": ratio, "warmup_storage_reads": warmup, "rows": rows}
    (args.out / "server_trainers.json").write_text(json.dumps(out, indent=2))
    plot(rows, args.out / "server_trainers.png")
    print(f"wrote {args.out / 'server_trainers.json'} and {args.out / 'server_trainers.png'}")


if __name__ == "__main__":
    main()
