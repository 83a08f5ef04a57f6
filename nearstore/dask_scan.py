"""The SAGE scan on a dask.distributed cluster beside the storage: each pass is a map over shard
partitions; pass 1's per-class sketches merge in a tree (Frequent Directions is mergeable, and
the merged sketch keeps the FD bound), pass 2's per-partition top-k merge into one.

Workers open the dataset from its URL themselves, so only the URL, the fitted proxy and the
sketch bases travel; `sage_select(..., client=client)` is the entry point.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from kernels import StreamingTopK
from nearstore.dataset import Dataset, open_dataset
from nearstore.reader import SelectiveReader
from nearstore.scan import SagePass1, Scan, _sage_pass1, _sage_pass2, _SageRule


def distributed_pass1(
    client: Any, dataset: Dataset, scan: Scan, ell: int, class_balanced: bool, device: torch.device | str
) -> SagePass1:
    """Pass 1 as a map over shard partitions, merged pairwise in a tree."""
    futures = _map_partitions(
        client, _pass1_task, dataset, scan, ell=ell, class_balanced=class_balanced, device=str(device)
    )
    while len(futures) > 1:
        pairs = [client.submit(_merge, a, b) for a, b in zip(futures[::2], futures[1::2])]
        futures = pairs + ([futures[-1]] if len(futures) % 2 else [])
    return futures[0].result()


def distributed_pass2(
    client: Any, dataset: Dataset, scan: Scan, rule: _SageRule
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, int]]:
    """Pass 2 as a map over shard partitions; each group's top-k of the partitions' top-k, and
    the partitions' reads."""
    parts = client.gather(_map_partitions(client, _pass2_task, dataset, scan, rule=rule))
    tops = [StreamingTopK(k) for k in rule.total_k]
    for part, _ in parts:
        for top, (scores, ids) in zip(tops, part, strict=True):
            top.push(scores, ids)
    return [top.result() for top in tops], {k: sum(io[k] for _, io in parts) for k in ("bytes", "requests")}


def _map_partitions(client: Any, task: Any, dataset: Dataset, scan: Scan, **arguments: Any) -> list[Any]:
    """Futures of task(shards, ...) over two partitions of consecutive shards per worker thread
    (at most one per shard); each task opens the dataset from its URL and rebuilds the scan."""
    slots = max(1, 2 * sum(client.nthreads().values()))
    num_shards = scan.reader.num_shards
    partitions = [part.tolist() for part in np.array_split(np.arange(num_shards), min(slots, num_shards))]
    shipped = {"proxy": scan.proxy, "input_array": scan.input_array, "labels": scan.labels}
    return client.map(
        task, partitions, url=dataset.url, storage_options=dataset.storage_options, scan=shipped, **arguments
    )


def _worker_scan(url: str, storage_options: dict[str, Any], scan: dict[str, Any]) -> Scan:
    dataset = open_dataset(url, storage_options=storage_options)
    reader = SelectiveReader(dataset, [scan["input_array"], scan["labels"]])
    return Scan(reader, scan["proxy"], scan["input_array"], scan["labels"], {})


def _pass1_task(shards: list[int], *, url, storage_options, scan, ell, class_balanced, device) -> SagePass1:
    return _sage_pass1(_worker_scan(url, storage_options, scan), shards, ell, class_balanced, device, False)


def _pass2_task(shards: list[int], *, url, storage_options, scan, rule) -> tuple[list, dict[str, int]]:
    worker = _worker_scan(url, storage_options, scan)
    tops = _sage_pass2(worker, shards, rule, False)
    reads = worker.reader.stats.snapshot()
    return tops, {"bytes": reads.bytes, "requests": reads.requests}


def _merge(a: SagePass1, b: SagePass1) -> SagePass1:
    # a copy: a worker may hand a task the very object another future still holds
    return copy.deepcopy(a).merge(b)
