"""CREST as the storage side can run it: a random pool per class, the samples the proxy has not
learned yet, drawn uniformly or as coresets of their gradients at the logits."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from nearstore.checks import check_flag, check_range
from nearstore.selection.plan import check_keep, check_seed, class_pools
from nearstore.selection.record import Selection
from nearstore.selection.selectors.base import (
    SelectCall,
    Selector,
    check_pool,
    check_window,
)
from nearstore.selection.stages import Scan, check_finite, decoded, model_errors_named, pool_batches, scan_io
from nearstore.selection.windows import coresets
from nearstore.storage import DEFAULT_READS, Coalescing, Dataset, read_labels


@dataclass(frozen=True)
class Crest(Selector):
    """CREST as the storage side can run it: per class, a random pool of `pool` × k_c samples is
    read and embedded by the proxy; those it already classifies with p(y | x) > `confidence` are
    learned and left out, and k_c samples are drawn from the rest (topped up with the least
    confident learned ones when too few remain): uniformly, or with `coreset` as CREST's
    coresets, the facility-location medoids of the unlearned samples' loss gradients at the
    logits (softmax − onehot, as CRAIG and CREST use for deep models), per window of
    `coreset_window`, weighted by cluster size (mean 1). Without a proxy (a first round, before
    the trainer has pushed its model) nothing is learned yet: the draw is class-balanced random
    and reads only the labels. Only the pools are read (coalesced as `pool_reads`), so a round costs
    pool × keep of a full scan; on a Dask executor each partition of consecutive shards reads and
    scores its own pooled samples (`score_pools`), the draw then made here.
    """

    method: ClassVar[str] = "crest"
    pool: float = 2.0
    confidence: float = 0.9
    coreset: bool = False
    coreset_window: int = 512
    pool_reads: Coalescing = DEFAULT_READS

    def __post_init__(self) -> None:
        check_pool(self.pool, optional=False)
        check_range("confidence", self.confidence, 0, 1, open_low=True, open_high=True)
        check_flag("coreset", self.coreset)
        check_window(self.coreset_window, "coreset_window")
        object.__setattr__(self, "pool_reads", Coalescing.of(self.pool_reads, "pool_reads"))

    def run(self, dataset: Dataset, keep: float, call: SelectCall) -> Selection:
        check_keep(keep)
        check_seed(call.seed)
        started = time.perf_counter()
        labels, labels_reader = read_labels(dataset, "a class-balanced pool")
        budgets, pools = class_pools(labels, keep, self.pool, call.seed, whole=call.proxy is None)
        rng = np.random.default_rng([call.seed, 1])
        confidences, gradients, io = {}, {}, scan_io(started, [labels_reader])
        if call.proxy is not None:
            scan = Scan.open(dataset, self.method, call.proxy, call.seed, call.device, cancelled=call.cancelled)
            arguments = dict(pools=pools, coreset=self.coreset, reads=self.pool_reads, progress=call.progress)
            scored, worker_reads = call.executor.map_reduce(scan, score_pools, PoolScores.merge, **arguments)
            # a damaged image left out by `decoded` stays "learned" (p = 1), so it is never chosen
            probability = np.ones(dataset.num_samples, dtype=np.float32)
            probability[scored.ids] = scored.probability
            confidences = {c: probability[pool] for c, pool in pools.items()}
            if self.coreset:
                at_logits = np.zeros((dataset.num_samples, call.proxy.num_classes), dtype=np.float32)
                at_logits[scored.ids] = scored.at_logits
                gradients = {c: at_logits[pool] for c, pool in pools.items()}
            io = scan_io(started, [labels_reader, scan.reader])
            if call.executor.name == "local":  # the scan's own reader: counted above
                worker_reads = {"bytes": 0, "requests": 0}
            io.update({k: io[k] + worker_reads[k] + scored.reads[k] for k in ("bytes", "requests")})
        picks, weights, scores = [], [], []
        for c, pool in pools.items():
            weight = np.ones(budgets[c], dtype=np.float32)
            if c not in confidences:
                chosen = rng.choice(len(pool), budgets[c], replace=False)
            else:
                unlearned = np.flatnonzero(confidences[c] <= self.confidence)
                if len(unlearned) > budgets[c] and self.coreset:
                    rows, weight = coresets(torch.from_numpy(gradients[c][unlearned]), budgets[c], self.coreset_window)
                    chosen = unlearned[rows]
                elif len(unlearned) >= budgets[c]:
                    chosen = rng.choice(unlearned, budgets[c], replace=False)
                else:  # too few left to learn: the least confident of the learned fill the budget
                    learned = np.argsort(confidences[c], kind="stable")[len(unlearned) :]
                    chosen = np.concatenate([unlearned, learned[: budgets[c] - len(unlearned)]])
            picks.append(pool[chosen])
            weights.append(weight)
            scores.append(confidences[c][chosen] if c in confidences else np.full(len(chosen), np.nan))
        return Selection.of(
            dataset,
            np.concatenate(picks),
            weights=np.concatenate(weights),
            scores=np.concatenate(scores),
            method=self.method,
            params={
                "keep": keep,
                "seed": call.seed,
                "proxy": type(call.proxy).__name__ if call.proxy else None,
                **self.params(),
            },
            io=io,
        )


@dataclass
class PoolScores:
    """The proxy's view of the pooled samples of some shards: their ids, p(y | x) each and, for
    coresets, their loss gradients at the logits; what reading them read. Parts over disjoint
    shards merge by concatenation."""

    ids: np.ndarray
    probability: np.ndarray
    at_logits: np.ndarray
    reads: dict[str, int]

    @staticmethod
    def merge(a: PoolScores, b: PoolScores) -> PoolScores:
        return PoolScores(
            np.concatenate([a.ids, b.ids]),
            np.concatenate([a.probability, b.probability]),
            np.concatenate([a.at_logits, b.at_logits]),
            {k: a.reads[k] + b.reads[k] for k in a.reads},
        )


def score_pools(
    scan: Scan, shards: list[int], *, pools: dict[int, np.ndarray], coreset: bool, reads: Coalescing, progress: bool
) -> PoolScores:
    """The pass over the pooled samples (`pools`: {class: sorted ids}) that lie in `shards`
    (consecutive): read (coalescing as `reads`), decoded and scored by the scan's proxy."""
    dataset, proxy = scan.reader.dataset, scan.proxy
    first, end = shards[0] * dataset.shard_samples, (shards[-1] + 1) * dataset.shard_samples
    mine = {c: members[(members >= first) & (members < end)] for c, members in pools.items()}
    mine = {c: m for c, m in mine.items() if len(m)}
    reader, batches = pool_batches(
        dataset, scan.input_array, scan.labels, mine, progress, "CREST pool", reads, scan.cancelled
    )
    batches = decoded(batches, scan.input_array, proxy.images, dataset.ragged(scan.input_array))
    ids, probability, at_logits = [], [], []
    for batch_ids, batch in batches:
        x, y = batch[scan.input_array], batch[scan.labels]  # y: the class of the sample's pool, its label
        check_finite(x, batch_ids, scan.input_array)
        with model_errors_named(proxy, scan.input_array, x, batch_ids):
            if coreset:  # softmax − onehot: p(y | x) is 1 + its entry y
                gradient = proxy.gradient_factors(x, y)[0].cpu().numpy()
                at_logits.append(gradient)
                probability.append(1 + gradient[np.arange(len(y)), y])
            else:
                probability.append(proxy.confidence(x, y).cpu().numpy())
        ids.append(batch_ids)
    read = reader.stats.snapshot()
    width = proxy.num_classes if coreset else 0
    return PoolScores(
        np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64),
        np.concatenate(probability).astype(np.float32) if ids else np.zeros(0, dtype=np.float32),
        np.concatenate(at_logits) if at_logits else np.zeros((0, width), dtype=np.float32),
        {"bytes": read.bytes, "requests": read.requests},
    )
