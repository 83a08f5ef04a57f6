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
    Selector,
    check_pool,
    check_window,
)
from nearstore.selection.stages import check_finite, check_proxy, decoded, log, pool_batches, scan_io
from nearstore.selection.windows import coresets
from nearstore.storage import DEFAULT_READS, Coalescing, read_labels


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
    pool × keep of a full scan.
    """

    method: ClassVar[str] = "crest"
    pool: float = 2.0
    confidence: float = 0.9
    coreset: bool = False
    coreset_window: int = 512
    pool_reads: Coalescing = DEFAULT_READS

    def __post_init__(self) -> None:
        check_pool(self.pool)
        check_range("confidence", self.confidence, 0, 1, open_low=True, open_high=True)
        check_flag("coreset", self.coreset)
        check_window(self.coreset_window, "coreset_window")
        object.__setattr__(self, "pool_reads", Coalescing.of(self.pool_reads, "pool_reads"))

    def select(
        self, dataset, keep, *, proxy=None, seed=0, device="cpu", progress=False, previous=None, executor=None
    ) -> Selection:
        check_keep(keep)
        check_seed(seed)
        if executor is not None and executor.name != "local":
            log.info("CREST runs in this process, not on the %s executor: it reads a pool only", executor.name)
        started = time.perf_counter()
        labels, labels_reader = read_labels(dataset, "a class-balanced pool")
        budgets, pools = class_pools(labels, keep, self.pool, seed, whole=proxy is None)
        rng = np.random.default_rng([seed, 1])
        confidences, gradients, readers = {}, {}, [labels_reader]
        if proxy is not None:
            check_proxy(dataset, proxy)
            input_array = dataset.input_array
            reader, batches = pool_batches(
                dataset, input_array, dataset.label_array, pools, progress, "CREST pool", self.pool_reads
            )
            batches = decoded(batches, input_array, proxy.images, dataset.ragged(input_array))
            # a damaged image left out by `decoded` stays "learned" (p = 1), so it is never chosen
            probability = np.ones(dataset.num_samples, dtype=np.float32)
            at_logits = np.empty((dataset.num_samples if self.coreset else 0, proxy.num_classes), dtype=np.float32)
            for ids, batch in batches:
                x = batch[input_array]
                check_finite(x, ids, input_array)
                if self.coreset:  # softmax − onehot: p(y | x) is 1 + its entry y
                    at_logits[ids] = proxy.gradient_factors(x, labels[ids])[0].cpu().numpy()
                    probability[ids] = 1 + at_logits[ids, labels[ids]]
                else:
                    probability[ids] = proxy.confidence(x, labels[ids]).cpu().numpy()
            confidences = {c: probability[pool] for c, pool in pools.items()}
            gradients = {c: at_logits[pool] for c, pool in pools.items()} if self.coreset else {}
            readers.append(reader)
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
            params={"keep": keep, "seed": seed, "proxy": type(proxy).__name__ if proxy else None, **self.params()},
            io=scan_io(started, readers),
        )
