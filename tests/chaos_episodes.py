"""Chaos episodes: a loader's epoch (or an epoch resumed half-way) under faults drawn at random,
and the tally of what it delivered against what it should have. tests/test_chaos.py runs a few of
each kind; bench/chaos.py runs hundreds. Stores are `id_encoded`, so a wrong sample shows."""

from __future__ import annotations

import resource
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.flight as flight
import torch
from conftest import id_encoded
from faults import FaultyProxy, KillWorkerOnce
from servers import HOST, free_port, nearstore_serve

from loaders import StoreSource, StreamingLoader
from nearstore import Dataset, RandomFeatureProxy, RequestError, Selection, random_select, sage_select
from nearstore.selection.executors import DaskExecutor
from nearstore.serving import NearStoreServer
from nearstore.storage.ranges import Coalescing

NAME = "chaos"  # the served dataset's name


@dataclass
class Tally:
    """Episodes against what they should have delivered: every selected sample once, as stored.
    lost: selected and never delivered; repeated: delivered again; wrong: a row that is not its
    id's sample, or a sample not selected. faults: injected, by kind; retries: ranges asked again;
    unexplained: faults a client was told of without their cause (an internal error)."""

    episodes: int = 0
    samples: int = 0
    lost: int = 0
    repeated: int = 0
    wrong: int = 0
    retries: int = 0
    unexplained: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    def __iadd__(self, other: Tally) -> Tally:
        for name in ("episodes", "samples", "lost", "repeated", "wrong", "retries", "unexplained"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.faults += other.faults
        return self

    @property
    def exact(self) -> bool:
        return self.lost == self.repeated == self.wrong == 0


def tally(batches: Iterable[tuple[torch.Tensor, ...]], expected: np.ndarray, num_samples: int) -> Tally:
    """One episode's tally of the (x, y) batches delivered, against the ids `expected`."""
    batches = list(batches)
    x = np.concatenate([b[0].numpy() for b in batches]) if batches else np.zeros((0, 8), np.float32)
    y = np.concatenate([b[1].numpy() for b in batches]) if batches else np.zeros(0, np.int64)
    ids = np.rint(x[:, 0]).astype(np.int64)
    truth = id_encoded(num_samples)
    known = (ids >= 0) & (ids < num_samples) & np.isin(ids, expected)
    at = np.where(known, ids, 0)
    right = known & (x == truth["x"][at]).all(axis=1) & (y == truth["y"][at])
    counts = Counter(ids[right].tolist())
    return Tally(
        episodes=1,
        samples=len(expected),
        lost=len(expected) - len(counts),
        repeated=sum(counts.values()) - len(counts),
        wrong=int((~right).sum()),
    )


def s3_episode(proxy: FaultyProxy, storage: dict, url: str, num_samples: int, rng: np.random.Generator) -> Tally:
    """One epoch of a random selection of the id-encoded S3 store at `url`, read with `storage`
    options through `proxy`, which faults 1-8% of its GETs at random; with a random batch size,
    order and coalescing, and half the time stopped at a random batch and resumed from its
    state_dict on a fresh loader."""
    ids = np.sort(rng.choice(num_samples, int(rng.integers(num_samples // 10, num_samples // 2)), replace=False))
    options = {
        "batch_size": int(rng.integers(16, 129)),
        "shuffle": bool(rng.integers(2)),
        "seed": int(rng.integers(2**31)),
        "backend": "torch",
        "device": "cpu",
        "prefetch": 1,
    }
    reads = Coalescing(int(rng.choice([0, 1 << 10, 1 << 16, 1 << 22])))

    def make() -> StreamingLoader:
        return StreamingLoader(StoreSource(url, storage_options=storage, reads=reads), ids, **options)

    loader = make()
    stop = int(rng.integers(len(loader) + 1)) if rng.integers(2) else None
    before = Counter(proxy.injected)
    proxy.faulting(rng.uniform(0.01, 0.08), int(rng.integers(2**31)))
    try:
        delivered, retries = _epoch(loader, make, stop)
    finally:
        proxy.faulting(0.0, 0)
    result = tally(delivered, ids, num_samples)
    result.faults, result.retries = Counter(proxy.injected) - before, retries
    return result


def proxy_options(proxy: FaultyProxy, upstream: dict) -> dict:
    """s3fs's options to read through `proxy` from the S3 of options `upstream`: botocore's own
    retries, with a read timeout shorter than the proxy's stalls."""
    timeout = proxy.stall_seconds / 4
    return {
        **upstream,
        "endpoint_url": proxy.endpoint,
        "config_kwargs": {"read_timeout": timeout, "connect_timeout": timeout},
    }


def _epoch(
    loader: StreamingLoader, make: Callable[[], StreamingLoader], stop: int | None
) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """An epoch's batches, stopped after `stop` batches and resumed on a fresh loader if given;
    and the ranges the readers asked again."""
    if stop is None:
        return list(loader), loader.stats.retries
    epoch = iter(loader)
    head = [next(epoch) for _ in range(stop)]
    state = loader.state_dict()
    epoch.close()
    resumed = make()
    resumed.load_state_dict(state)
    return head + list(resumed), loader.stats.retries + resumed.stats.retries


def shard_object(path: str) -> bool:
    """A zarr shard object (…/x/c/3/0), not metadata: the reader's own reads."""
    return "/c/" in path


def server_episode(url: str, num_samples: int, state_dir: Path, rng: np.random.Generator) -> Tally:
    """A loader (on_disconnect="reconnect") reads an epoch from a `nearstore serve` process that is
    SIGKILLed at a random batch and restarted on its state dir; half the time the epoch is of a
    second round, made first, which the restart must restore from the state dir."""
    port, keep = free_port(), f"{rng.uniform(0.05, 0.4):.3f}"

    def serve() -> subprocess.Popen:
        return nearstore_serve(
            url, port, "--name", NAME, "--state-dir", str(state_dir), "--method", "random", "--keep", keep
        )

    process = serve()
    try:
        loader = _remote(port, rng)
        if rng.integers(2):
            loader.reselect(rng.uniform(0.05, 0.4), method="random", seed=int(rng.integers(2**31)))
        expected, kill_at = loader.ids.copy(), int(rng.integers(len(loader)))
        delivered = []
        for k, batch in enumerate(loader):
            if k == kill_at:
                process.kill()
                process.wait()
                process = serve()
            delivered.append(batch)
    finally:
        process.kill()
        process.wait()
    result = tally(delivered, expected, num_samples)
    result.faults["server killed"] += 1
    return result


def disk_full_episode(url: str, num_samples: int, state_dir: Path, rng: np.random.Generator) -> Tally:
    """The disk under a `nearstore serve` process's state dir fills up while it holds two rounds and
    a trainer iterates the older: a third round asked for must be refused, saying its state could
    not be kept, and the trainer finish its epoch on its round; a restart holds the same rounds.
    The full disk is the process's RLIMIT_FSIZE: a write stops after 0-511 bytes and fails (EFBIG
    where a disk says ENOSPC: the same OSError from the same write), with no root for a tmpfs."""
    port = free_port()
    process = nearstore_serve(url, port, "--name", NAME, "--state-dir", str(state_dir), "--method", "random")
    try:
        trainer, other = _remote(port, rng), _remote(port, rng)
        other.reselect(0.2, method="random", seed=1)
        held = [trainer.source.selection(r).ids for r in (0, 1)]
        epoch = iter(trainer)
        delivered = [next(epoch) for _ in range(int(rng.integers(len(trainer))))]
        limit = int(rng.integers(0, 512))
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, limit))
        try:
            other.reselect(0.3, method="random", seed=2)
            refused = "nothing: the round was taken"
        except (flight.FlightError, OSError, RequestError) as e:  # its answer when its state cannot be kept
            refused = str(e)
        try:
            delivered += list(epoch)
        except RequestError:  # the round it iterates is gone
            pass
        result = tally(delivered, held[0], num_samples)
        process.kill()
        process.wait()
        process = nearstore_serve(url, port, "--name", NAME, "--state-dir", str(state_dir))
        kept = [_remote(port, rng).source.selection(r).ids for r in (0, 1)]
    finally:
        process.kill()
        process.wait()
    result.faults["disk full"] += 1
    result.unexplained += "state" not in refused  # the refusal must say the state could not be kept
    result.lost += sum(len(a) for a, b in zip(held, kept) if not np.array_equal(a, b))  # a held round gone
    return result


def concurrent_selects_episode(dataset: Dataset, rng: np.random.Generator) -> Tally:
    """Two trainers of one server ask for a new round at once: each is answered a round of its own,
    and each then iterates its round exactly."""
    server = NearStoreServer(dataset, name=NAME, selection=random_select(dataset, 0.2, seed=int(rng.integers(99))))
    try:
        trainers = [_remote(server.port, rng) for _ in range(2)]
        rounds: dict[int, Selection] = {}
        barrier = threading.Barrier(2)

        def select(k: int) -> None:
            barrier.wait()
            rounds[k] = trainers[k].reselect(rng.uniform(0.05, 0.4), method="random", seed=k)

        threads = [threading.Thread(target=select, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result = Tally()
        for trainer, selection in zip(trainers, (rounds[0], rounds[1])):
            result += tally(list(trainer), selection.ids, dataset.num_samples)
        result.episodes = 1
        result.wrong += rounds[0].round == rounds[1].round  # two trainers told the same round
    finally:
        server.shutdown()
    result.faults["concurrent selects"] += 1
    return result


def dask_episode(client, dataset: Dataset, marker: Path, rng: np.random.Generator) -> Tally:
    """A Dask worker is killed as it starts a task of a random pass of a SAGE scan run on `client`'s
    cluster (`marker`: a file that must not exist yet): the selection must equal the scan's in
    process. The sketch is exact (ell over the embedding's dimensions), so the two are equal."""
    data = id_encoded(dataset.num_samples)
    proxy = RandomFeatureProxy(int(data["y"].max()) + 1, width=8, seed=int(rng.integers(99))).fit(data["x"], data["y"])
    keep, ell = float(rng.uniform(0.05, 0.5)), 64  # 5 classes × (8 + 1) dimensions < 64
    prefix = ("sage_pass1", "sage_pass2")[rng.integers(2)]
    client.register_plugin(KillWorkerOnce(prefix, str(marker)), name="chaos-kill")
    try:
        there = sage_select(dataset, keep, ell=ell, proxy=proxy, executor=DaskExecutor(client)).ids
    finally:
        client.unregister_worker_plugin("chaos-kill")
    here = sage_select(dataset, keep, ell=ell, proxy=proxy).ids
    result = Tally(episodes=1, samples=len(here), lost=len(np.setdiff1d(here, there)))
    result.wrong = len(np.setdiff1d(there, here))
    result.faults["dask worker killed"] += marker.exists()  # 0 would be an episode without its fault
    return result


def _remote(port: int, rng: np.random.Generator) -> StreamingLoader:
    """A loader of the served dataset, with a random batch size and order."""
    return StreamingLoader(
        f"grpc://{HOST}:{port}/{NAME}",
        batch_size=int(rng.integers(16, 129)),
        shuffle=bool(rng.integers(2)),
        seed=int(rng.integers(2**31)),
        backend="torch",
        device="cpu",
        prefetch=1,
    )
