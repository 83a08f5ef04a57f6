"""Where a scan's passes run: in this process ("local"), or as maps over partitions of consecutive
shards on a dask.distributed cluster beside the storage ("dask"). A pass is a task over a `Scan`
and a list of shards whose results merge (Frequent Directions sketches, top-k) into the pass over
all shards; an executor runs it and reports what its tasks read.

On Dask, workers open the dataset from its URL themselves, so only the URL, the fitted proxy and
what a task needs travel; results merge pairwise in a tree on the cluster.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np

from nearstore.errors import ParameterError
from nearstore.selection.stages import Scan
from nearstore.storage import SelectiveReader, open_dataset

T = TypeVar("T")
Task = Callable[..., T]  # task(scan, shards, **arguments) -> a result that merges
Reads = dict[str, int]  # {"bytes": ..., "requests": ...}


class Executor(Protocol):
    """Runs a pass over every shard of a scan's dataset."""

    name: str

    def map_reduce(self, scan: Scan, task: Task, merge: Callable[[T, T], T], **arguments: Any) -> tuple[T, Reads]:
        """merge(task(scan, part, **arguments) for the parts of all shards), and what the tasks read."""
        ...


class LocalExecutor:
    """One task over every shard, in this process, on the scan's own reader (so the shards its
    default proxy was fitted on are not read again)."""

    name = "local"

    def map_reduce(self, scan: Scan, task: Task, merge: Callable[[T, T], T], **arguments: Any) -> tuple[T, Reads]:
        before = scan.reader.stats.snapshot()
        result = task(scan, list(range(scan.reader.num_shards)), **arguments)
        reads = scan.reader.stats.snapshot() - before
        return result, {"bytes": reads.bytes, "requests": reads.requests}


class DaskExecutor:
    """Tasks over two partitions of consecutive shards per worker thread (at most one per shard)
    on the cluster of `client`, a dask.distributed Client; results merged in a tree there."""

    name = "dask"

    def __init__(self, client: Any) -> None:
        self.client = client

    def map_reduce(self, scan: Scan, task: Task, merge: Callable[[T, T], T], **arguments: Any) -> tuple[T, Reads]:
        slots = max(1, 2 * sum(self.client.nthreads().values()))
        num_shards = scan.reader.num_shards
        parts = [part.tolist() for part in np.array_split(np.arange(num_shards), min(slots, num_shards))]
        dataset = scan.reader.dataset
        shipped = {"proxy": scan.proxy, "input_array": scan.input_array, "labels": scan.labels}
        futures = self.client.map(
            _on_worker,
            parts,
            key=getattr(task, "__name__", "task"),  # the task's name in the cluster's books
            task=task,
            url=dataset.url,
            storage_options=dataset.storage_options,
            scan=shipped,
            arguments=arguments,
        )
        while len(futures) > 1:
            pairs = [self.client.submit(_merged, merge, a, b) for a, b in zip(futures[::2], futures[1::2])]
            futures = pairs + ([futures[-1]] if len(futures) % 2 else [])
        return futures[0].result()


EXECUTORS: dict[str, Callable[..., Executor]] = {"local": LocalExecutor, "dask": DaskExecutor}


def make_executor(name: str = "local", **options: Any) -> Executor:
    """The executor named `name`, e.g. make_executor("dask", client=Client("tcp://...:8786"))."""
    if not isinstance(name, str) or name not in EXECUTORS:
        raise ParameterError(f"executor must be one of {sorted(EXECUTORS)}, got {name!r}")
    try:
        return EXECUTORS[name](**options)
    except TypeError as e:  # an option the executor does not take
        raise ParameterError(f"executor {name!r} does not take the options {sorted(options)}: {e}") from None


def _on_worker(
    shards: list[int], *, task: Task, url: str, storage_options: dict[str, Any], scan: dict[str, Any], arguments: dict
) -> tuple[Any, Reads]:
    """A task on a worker: the dataset opened from its URL, the scan rebuilt around the shipped proxy."""
    dataset = open_dataset(url, storage_options=storage_options)
    reader = SelectiveReader(dataset, [scan["input_array"], scan["labels"]])
    result = task(Scan(reader, scan["proxy"], scan["input_array"], scan["labels"], {}), shards, **arguments)
    reads = reader.stats.snapshot()
    return result, {"bytes": reads.bytes, "requests": reads.requests}


def _merged(merge: Callable[[T, T], T], a: tuple[T, Reads], b: tuple[T, Reads]) -> tuple[T, Reads]:
    # a copy: a worker may hand a task the very object another future still holds
    return merge(copy.deepcopy(a[0]), b[0]), {k: a[1][k] + b[1][k] for k in a[1]}
