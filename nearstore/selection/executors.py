"""Where a scan's passes run: in this process ("local"), or as maps over partitions of consecutive
shards on a dask.distributed cluster beside the storage ("dask"). A pass is a task over a `Scan`
and a list of shards whose results merge (Frequent Directions sketches, top-k) into the pass over
all shards; an executor runs it and reports what its tasks read.

On Dask, workers open the dataset from its URL themselves, so only the URL, the fitted proxy and
what a task needs travel; partial results come back as their tasks finish (while the others still
run) and merge pairwise here, in a tree fixed by the partitions' order. A round nobody waits for
any more (the scan's `cancelled`) has its tasks not yet done cancelled from here.
"""

from __future__ import annotations

import os
import queue
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError
from typing import Any, Protocol, TypeVar

import fsspec
import numpy as np
import torch

from nearstore.checks import check_integer
from nearstore.errors import DatasetError, NearstoreError, ParameterError, RoundCancelled, restated
from nearstore.selection.stages import Scan, stop_if_cancelled
from nearstore.storage import SelectiveReader, open_dataset
from nearstore.storage.dataset import sample_identity

T = TypeVar("T")
Task = Callable[..., T]  # task(scan, shards, **arguments) -> a result that merges
Reads = dict[str, int]  # {"bytes": ..., "requests": ...}
# How often a driver waiting on its tasks asks whether anyone still waits for the round.
CANCEL_CHECK_SECONDS = 0.1
# How long a round on a cluster with no workers waits for one to join before it is refused.
WORKERS_SECONDS = 30.0


class Executor(Protocol):
    """Runs a pass over every shard of a scan's dataset."""

    name: str

    def recorded(self) -> dict[str, Any]:
        """What a Selection's params record of where its scan ran (nothing in this process)."""
        ...

    def map_reduce(self, scan: Scan, task: Task, merge: Callable[[T, T], T], **arguments: Any) -> tuple[T, Reads]:
        """merge(task(scan, part, **arguments) for the parts of all shards), and what the tasks read."""
        ...


class LocalExecutor:
    """One task over every shard, in this process, on the scan's own reader (so the shards its
    default proxy was fitted on are not read again)."""

    name = "local"

    def recorded(self) -> dict[str, Any]:
        return {}

    def map_reduce(self, scan: Scan, task: Task, merge: Callable[[T, T], T], **arguments: Any) -> tuple[T, Reads]:
        before = scan.reader.stats.snapshot()
        result = task(scan, list(range(scan.reader.num_shards)), **arguments)
        reads = scan.reader.stats.snapshot() - before
        return result, {"bytes": reads.bytes, "requests": reads.requests}


class DaskExecutor:
    """Tasks over `partitions` partitions of consecutive shards (at most one per shard; None: one
    a worker thread of the cluster when a pass starts) on the cluster of `client`, a
    dask.distributed Client; each partial result fetched to this
    process as its task finishes, then all merged pairwise in a fixed tree (the same merges
    whatever order the tasks finish in). Merging here rather than on the cluster keeps the
    transfers off the critical path: a tree on the cluster moves partial results between workers
    after the last task ends, then the merged one here (docs/benchmarks.md, "Scale"). Partial
    results are small (the kept ids, sketches, top-k), and one task a thread opens the dataset
    and unpacks the proxy once.

    shards_of: {worker address: the shard ids beside it} (the storage node it runs on): each
    partition then runs on the worker that holds its shards and on no other (a task reads only
    shards of its own node; a worker lost means its tasks wait for it). Every shard must be
    named once. Without it, Dask places the tasks. `placed` records the last pass's tasks' keys and
    their shards, and `result_bytes` the bytes of arrays in the partial results fetched, all passes.
    Where the scan's `cancelled` says nobody waits for the round, the tasks not done are cancelled
    (one already running finishes on its worker, its result dropped) and RoundCancelled raised.

    Windows end where partitions do, so the picks of a windowed selector depend on them: a round's
    Selection records the partitions its last pass ran in (params["partitions"]; not with
    `shards_of`, whose map and the workers' threads cut them), and giving `partitions` that count
    makes the same picks on any cluster."""

    name = "dask"

    def __init__(
        self, client: Any, shards_of: Mapping[str, Sequence[int]] | None = None, partitions: int | None = None
    ) -> None:
        self.client = client
        self.shards_of = None if shards_of is None else {str(w): [int(s) for s in v] for w, v in shards_of.items()}
        if partitions is not None:
            partitions = check_integer("partitions", partitions, 1)
            if shards_of is not None:
                raise ParameterError("partitions= and shards_of= both cut the shards: give one")
        self.partitions = partitions
        self.placed: dict[str, list[int]] = {}
        self.result_bytes = 0

    def recorded(self) -> dict[str, Any]:
        # with shards_of, the cuts follow each worker's runs and threads: no count makes them again
        return {"executor": self.name, **({"partitions": len(self.placed)} if self.shards_of is None else {})}

    def map_reduce(self, scan: Scan, task: Task, merge: Callable[[T, T], T], **arguments: Any) -> tuple[T, Reads]:
        name = getattr(task, "__name__", "task")  # the task's name in the cluster's books
        partitions = self._parts(scan.reader.num_shards)
        dataset = scan.reader.dataset
        shipped = {
            "proxy": scan.proxy,
            "input_array": scan.input_array,
            "labels": scan.labels,
            "arrays": list(scan.reader.layouts),
        }
        token = uuid.uuid4().hex[:8]
        futures, self.placed = [], {}  # the last pass's only: a server's executor runs pass after pass
        for k, (worker, shards) in enumerate(partitions):
            key = f"{name}-{token}-{k}"
            self.placed[key] = shards
            futures.append(
                self.client.submit(
                    _on_worker,
                    shards,
                    key=key,
                    task=task,
                    url=worker_url(dataset.url),
                    storage_options=dataset.storage_options,
                    identity=sample_identity(dataset.identity()),
                    scan=shipped,
                    arguments=arguments,
                    pure=False,
                    **({} if worker is None else {"workers": [worker], "allow_other_workers": False}),
                )
            )
        done: queue.SimpleQueue = queue.SimpleQueue()
        for future in futures:
            future.add_done_callback(done.put)
        position = {future.key: k for k, future in enumerate(futures)}
        tree, fetched = _MergeTree(len(futures), merge), set()
        try:
            while len(fetched) < len(futures):  # each fetched and merged while the other tasks run
                stop_if_cancelled(scan.cancelled, f"{name}'s tasks over {dataset.url!r} were done")
                try:
                    future = done.get(timeout=CANCEL_CHECK_SECONDS)
                except queue.Empty:
                    continue
                try:
                    part = future.result()
                except CancelledError as e:  # distributed's, where the scheduler went away: no traceback of it
                    raise ConnectionError(
                        f"the Dask scheduler {_address(self.client)} was lost while {name} ran over "
                        f"{dataset.url!r}: {e}"
                    ) from e
                fetched.add(future.key)
                future.release()  # the worker frees it: the part is this process's alone to merge
                self.result_bytes += payload_bytes(part[0])
                tree.add(position[future.key], part)
        except RoundCancelled:
            self.client.cancel([future for future in futures if future.key not in fetched])
            raise
        return tree.root

    def _parts(self, num_shards: int) -> list[tuple[str | None, list[int]]]:
        """(worker or None, consecutive shards) of each task."""
        threads = self.client.nthreads()
        if not threads:  # a task planned for no worker waits for ever, saying nothing
            try:
                self.client.wait_for_workers(1, timeout=WORKERS_SECONDS)
            except TimeoutError as e:
                raise ConnectionError(
                    f"the Dask scheduler {_address(self.client)} has no workers: none joined within "
                    f"{WORKERS_SECONDS:.0f} s"
                ) from e
            threads = self.client.nthreads()

        if self.shards_of is None:
            slots = self.partitions or max(1, sum(threads.values()))
            return [(None, p.tolist()) for p in np.array_split(np.arange(num_shards), min(slots, num_shards))]
        owner = np.full(num_shards, -1)
        workers = list(self.shards_of)
        for w, worker in enumerate(workers):
            if worker not in threads:
                raise ParameterError(
                    f"shards_of names worker {worker!r}, which is not in the cluster {sorted(threads)}"
                )
            for shard in self.shards_of[worker]:
                if not 0 <= shard < num_shards:
                    raise ParameterError(f"shards_of gives worker {worker!r} shard {shard}, outside [0, {num_shards})")
                if owner[shard] >= 0:
                    raise ParameterError(f"shards_of gives shard {shard} to {workers[owner[shard]]!r} and {worker!r}")
                owner[shard] = w
        if (owner < 0).any():
            raise ParameterError(f"shards_of gives shard {int(np.flatnonzero(owner < 0)[0])} to no worker")
        parts = []
        for run in np.split(np.arange(num_shards), np.flatnonzero(np.diff(owner)) + 1):  # runs of one owner
            worker = workers[owner[run[0]]]
            pieces = min(len(run), threads[worker])
            parts += [(worker, piece.tolist()) for piece in np.array_split(run, pieces)]
        return parts


EXECUTORS: dict[str, Callable[..., Executor]] = {"local": LocalExecutor, "dask": DaskExecutor}


def local_cluster(workers: int = 2) -> Any:
    """A dask.distributed LocalCluster of `workers` single-threaded worker processes on 127.0.0.1
    (its dashboard on a free loopback port), to close after use (a context manager): a round on
    this machine's cores in parallel, `DaskExecutor(Client(local_cluster()))`."""
    from distributed import LocalCluster

    workers = check_integer("workers", workers, 1)
    return LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    )


def check_executor(executor: Executor | None) -> Executor:
    """`executor`, or a LocalExecutor for None; anything without `map_reduce` (or `recorded`, or a
    `name`) refused by name."""
    if executor is None:
        return LocalExecutor()
    methods = all(callable(getattr(executor, m, None)) for m in ("map_reduce", "recorded"))
    if not methods or not isinstance(getattr(executor, "name", None), str):
        raise ParameterError(f"executor must be an Executor (LocalExecutor, DaskExecutor), got {executor!r}")
    return executor


def make_executor(name: str = "local", **options: Any) -> Executor:
    """The executor named `name`, e.g. make_executor("dask", client=Client("tcp://...:8786"))."""
    if not isinstance(name, str) or name not in EXECUTORS:
        raise ParameterError(f"executor must be one of {sorted(EXECUTORS)}, got {name!r}")
    try:
        return EXECUTORS[name](**options)
    except TypeError as e:  # an option the executor does not take
        raise ParameterError(f"executor {name!r} does not take the options {sorted(options)}: {e}") from None


def worker_url(url: str) -> str:
    """`url` as a worker is to open it: a local path made absolute (a worker's working directory is
    its own: a relative path there named another store, or none)."""
    return os.path.abspath(url) if fsspec.utils.get_protocol(url) in ("file", "local") and "://" not in url else url


def _on_worker(
    shards: list[int],
    *,
    task: Task,
    url: str,
    storage_options: dict[str, Any],
    identity: dict[str, Any],
    scan: dict[str, Any],
    arguments: dict,
) -> tuple[Any, Reads]:
    """A task on a worker: the dataset opened from its URL and checked to be the client's, the scan
    rebuilt around the shipped proxy."""
    try:
        dataset = open_dataset(url, storage_options=storage_options)
    except (NearstoreError, OSError) as e:
        said = f"a Dask worker could not open the dataset at {url!r} (workers read it at that URL): {e}"
        raise restated(e, said) from e
    if sample_identity(dataset.identity()) != identity:
        raise DatasetError(
            f"a Dask worker opened another dataset at {url!r} than the client's (its fingerprint, arrays or size "
            "differ): workers must reach the same store at the same URL"
        )
    reader = SelectiveReader(dataset, scan["arrays"])
    result = task(Scan(reader, scan["proxy"], scan["input_array"], scan["labels"], {}), shards, **arguments)
    reads = reader.stats.snapshot()
    return result, {"bytes": reads.bytes, "requests": reads.requests}


class _MergeTree:
    """Partial results 0..n-1 merged pairwise in a fixed tree as they come, whatever their order:
    (0, 1), (2, 3), ... then their merges likewise, an odd last one carried up alone. What this
    process holds at once is the results whose sibling is not in yet, not every partition's (SAGE's
    sketch sets, one a worker thread): a result a level where tasks end in partition order."""

    def __init__(self, n: int, merge: Callable[[T, T], T]) -> None:
        self.merge, self.sizes = merge, [n]
        while self.sizes[-1] > 1:
            self.sizes.append((self.sizes[-1] + 1) // 2)
        self.held: list[dict[int, tuple[T, Reads]]] = [{} for _ in self.sizes]
        self.root: tuple[T, Reads] | None = None

    def add(self, k: int, part: tuple[T, Reads]) -> None:
        level = 0
        while self.sizes[level] > 1:
            if k % 2 == 0 and k == self.sizes[level] - 1:  # an odd last one: up alone
                level, k = level + 1, k // 2
                continue
            sibling = self.held[level].pop(k ^ 1, None)
            if sibling is None:
                self.held[level][k] = part
                return
            part = _merged(self.merge, sibling, part) if k % 2 else _merged(self.merge, part, sibling)
            level, k = level + 1, k // 2
        self.root = part


def _address(client: Any) -> str:
    return str(getattr(client.scheduler, "address", None) or "(unknown address)")


def _merged(merge: Callable[[T, T], T], a: tuple[T, Reads], b: tuple[T, Reads]) -> tuple[T, Reads]:
    return merge(a[0], b[0]), {k: a[1][k] + b[1][k] for k in a[1]}


def payload_bytes(value: Any) -> int:
    """The bytes of the arrays and tensors in a partial result: what fetching it moves, less framing."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(payload_bytes(v) for v in value)
    return payload_bytes(vars(value)) if hasattr(value, "__dict__") else 0
