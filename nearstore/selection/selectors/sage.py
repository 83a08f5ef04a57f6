"""SAGE: a Frequent Directions sketch of the gradients (pass 1), then each sample's agreement with
its class's consensus inside the sketch (pass 2), top scores kept. Memory O(ℓ·D) per sketch
whatever the number of samples; both passes run on an executor (in process, or on Dask)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal

import numpy as np
import torch

from kernels import (
    FrequentDirections,
    StreamingTopK,
    agreement_scores,
    consensus_direction,
    residual_scores,
    sketch_basis,
)
from nearstore.checks import check_flag, check_range
from nearstore.errors import DatasetError, ParameterError
from nearstore.selection.executors import Executor, LocalExecutor
from nearstore.selection.plan import check_keep, check_seed
from nearstore.selection.proxies import Proxy
from nearstore.selection.record import Selection
from nearstore.selection.selectors.base import SelectCall, Selector
from nearstore.selection.stages import WARMUP_SAMPLES, Scan, never
from nearstore.storage import Dataset, open_dataset

SCORES = ("agreement", "residual")
# What pass 1's sketches may take in all (each worker holds them all under Dask).
SKETCH_BYTES = 8 << 30


def check_ell(ell: int) -> None:
    """ell >= 2 (1 keeps no row: FD shrinks every direction by the largest); no upper bound here:
    sage_pass1 sizes the sketch at most by the embedding, which it then knows."""
    check_range("ell", ell, 2, math.inf, integer=True, open_high=True)


def sage_select(
    dataset: Dataset | str,
    keep: float,
    *,
    ell: int = 64,
    class_balanced: bool = True,
    score: Literal["agreement", "residual"] = "agreement",
    proxy: Proxy | None = None,
    input_array: str | None = None,
    warmup_samples: int = WARMUP_SAMPLES,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    executor: Executor | None = None,
    cancelled: Callable[[], bool] = never,
) -> Selection:
    """Select round(keep · N) samples by SAGE agreement, in two streaming passes over the shards.

    Pass 1 feeds each sample's gradient embedding g_i to a Frequent Directions sketch B (one per
    class when class_balanced) and sums the consensus ḡ; pass 2 scores cos(V g_i, V ḡ), V the
    sketch's row space, and keeps the top scores (per class: max(1, round(keep · n_c))).
    score: "agreement" (the paper's: typical, consensus-aligned samples) or "residual", the
        diversity-aware variant: the share of g_i outside the sketch, ‖g_i − VᵀV g_i‖ / ‖g_i‖
        (samples in directions the sketch keeps least of).
    proxy: a fitted proxy; by default a RandomFeatureProxy fitted on `warmup_samples` samples
        from randomly chosen shards, which pass 1 then reuses instead of reading them again.
    executor: where the passes run (`nearstore.selection.executors`): in this process by default,
        or `DaskExecutor(client)`: maps over shard partitions, pass 1's sketches merged in a tree.
    cancelled: whether nobody waits for the round any more (`Scan.open`).
    dataset: a Dataset, or a URL `open_dataset` opens.
    """
    if isinstance(dataset, str):
        dataset = open_dataset(dataset)
    check_keep(keep)
    check_seed(seed)
    check_ell(ell)
    keep, seed = float(keep), int(seed)  # numpy's scalars pass the checks; torch's generators take Python's
    _check_score(score)
    executor = executor or LocalExecutor()
    started = time.perf_counter()
    scan = Scan.open(dataset, "SAGE", proxy, seed, device, input_array, warmup_samples, cancelled=cancelled)
    _check_sketch_memory(scan.proxy, ell, class_balanced)
    warmup = scan.reader.stats.snapshot()  # the default proxy's warm-up shards, which pass 1 reuses
    first, first_reads = executor.map_reduce(
        scan, sage_pass1, SagePass1.merge, ell=ell, class_balanced=class_balanced, device=str(device), progress=progress
    )
    num_classes = len(first.sketches)
    bases = [sketch_basis(s.sketch()) for s in first.sketches]
    consensus = [(first.sums[c] / max(1, first.counts[c])).float() for c in range(num_classes)]
    if score == "agreement":
        _check_consensus(dataset, bases, consensus, first.counts, class_balanced)
    total_k = [max(1, round(keep * n)) if n else 0 for n in first.counts]
    rule = SageRule(bases, consensus, total_k, score, class_balanced)
    merge = partial(merge_tops, total_k)
    tops, second_reads = executor.map_reduce(scan, sage_pass2, merge, rule=rule, progress=progress)
    scores = torch.cat([s for s, _ in tops]).numpy()
    chosen = torch.cat([i for _, i in tops]).numpy()
    return Selection.of(
        dataset,
        chosen,
        scores=scores,
        method="sage",
        params={
            "keep": keep,
            "ell": ell,
            "class_balanced": class_balanced,
            "score": score,
            "seed": seed,
            "proxy": type(scan.proxy).__name__,
            "input_array": scan.input_array,
            "executor": executor.name,
        },
        io={
            "bytes": warmup.bytes + first_reads["bytes"] + second_reads["bytes"],
            "requests": warmup.requests + first_reads["requests"] + second_reads["requests"],
            "first_pass_bytes": warmup.bytes + first_reads["bytes"],
            "seconds": time.perf_counter() - started,
            "passes": 2,
        },
    )


@dataclass
class SagePass1:
    """Pass 1 over some shards: a sketch, a gradient sum and a count per group. Passes over
    disjoint shards merge (sketches by FD's merge) into the pass over all of them."""

    sketches: list[FrequentDirections]
    sums: torch.Tensor
    counts: np.ndarray

    def merge(self, other: SagePass1) -> SagePass1:
        for mine, theirs in zip(self.sketches, other.sketches, strict=True):
            mine.merge(theirs)
        self.sums += other.sums
        self.counts += other.counts
        return self


@dataclass
class SageRule:
    """What pass 2 needs from pass 1: each group's sketch basis, consensus and budget."""

    bases: list[torch.Tensor]
    consensus: list[torch.Tensor]
    total_k: list[int]
    score: str
    class_balanced: bool


Tops = list[tuple[torch.Tensor, torch.Tensor]]  # each group's top (scores, ids)


def sage_pass1(
    scan: Scan, shards: list[int], *, ell: int, class_balanced: bool, device: str, progress: bool = False
) -> SagePass1:
    """Pass 1 over `shards`: each group's sketch, gradient sum and count."""
    num_classes = scan.proxy.num_classes if class_balanced else 1
    dim = scan.proxy.embedding_dim
    # Past dim + 1 rows a sketch is exact already (FD shrinks by the ℓ-th eigenvalue of a buffer of
    # rank <= dim, 0 once ℓ > dim): a larger ell would cost 2ℓ·dim floats a group for nothing.
    rows = min(ell, dim + 1)
    sketches = [FrequentDirections(rows, dim, device=device) for _ in range(num_classes)]
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    counts = np.zeros(num_classes, dtype=np.int64)
    for _, groups, embeddings in scan.embeddings(progress, "SAGE pass 1/2", class_balanced, shards):
        for group, rows in groups.items():
            members = embeddings[rows]
            sketches[group].update(members)
            sums[group] += members.sum(0, dtype=torch.float64)
            counts[group] += len(rows)
    return SagePass1(sketches, sums, counts)


def sage_pass2(scan: Scan, shards: list[int], *, rule: SageRule, progress: bool = False) -> Tops:
    """Pass 2 over `shards`: each group's top (scores, ids)."""
    tops = [StreamingTopK(k) for k in rule.total_k]
    for ids, groups, embeddings in scan.embeddings(progress, "SAGE pass 2/2", rule.class_balanced, shards):
        for group, rows in groups.items():
            if rule.score == "agreement":
                scores = agreement_scores(embeddings[rows], rule.bases[group], rule.consensus[group])
            else:
                scores = residual_scores(embeddings[rows], rule.bases[group])
            tops[group].push(scores.cpu(), torch.from_numpy(ids[rows]))
    return [top.result() for top in tops]


def merge_tops(total_k: list[int], a: Tops, b: Tops) -> Tops:
    """Each group's top total_k[group] of two passes' tops (StreamingTopK's order does not depend
    on the order of the merges)."""
    merged = []
    for k, (scores_a, ids_a), (scores_b, ids_b) in zip(total_k, a, b, strict=True):
        top = StreamingTopK(k)
        top.push(scores_a, ids_a)
        top.push(scores_b, ids_b)
        merged.append(top.result())
    return merged


def _check_sketch_memory(proxy: Proxy, ell: int, class_balanced: bool) -> None:
    """Refuse, before a pass, sketches that would not fit SKETCH_BYTES: one a class of 2ℓ rows of
    the gradient's C · (d + 1) floats grows as C² (1,000 classes at ℓ = 64: 131 GB)."""
    groups, dim = (proxy.num_classes if class_balanced else 1), proxy.embedding_dim
    needed = groups * 2 * min(ell, dim + 1) * dim * 4
    if needed > SKETCH_BYTES:
        raise ParameterError(
            f"SAGE's sketches would take {needed / 2**30:.1f} GiB ({groups} of 2 x {min(ell, dim + 1)} rows of {dim} "
            f"floats), over {SKETCH_BYTES / 2**30:.0f} GiB: pass a smaller ell, class_balanced=False (one sketch), "
            "or use graft, whose memory does not grow with the classes"
        )


def _check_consensus(
    dataset: Dataset, bases: list[torch.Tensor], consensus: list[torch.Tensor], counts: np.ndarray, by_class: bool
) -> None:
    """Refuse a group whose mean gradient has no direction in its sketch (its samples' gradients
    cancel out, as identical inputs under balanced labels do): agreement with it means nothing."""
    for group, (basis, centre) in enumerate(zip(bases, consensus)):
        if counts[group] and consensus_direction(basis.to(centre), centre) is None:
            what = f"class {group}" if by_class else "the pooled samples"
            raise DatasetError(
                f"SAGE on {dataset.url!r}: the mean gradient of {what} has no direction in its sketch (its "
                "samples' gradients cancel out), so agreement with it ranks nothing; try score='residual' or graft"
            )


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ParameterError(f"score must be 'agreement' or 'residual', got {score!r}")


@dataclass(frozen=True)
class Sage(Selector):
    """SAGE: FD sketch of gradients (pass 1), then the top scores (pass 2): agreement with the
    consensus, or the share outside the sketch (score="residual", diversity-aware); see sage_select."""

    method: ClassVar[str] = "sage"
    ell: int = 64
    class_balanced: bool = True
    score: str = "agreement"

    def __post_init__(self) -> None:
        check_ell(self.ell)
        check_flag("class_balanced", self.class_balanced)
        _check_score(self.score)

    def run(self, dataset: Dataset, keep: float, call: SelectCall) -> Selection:
        return sage_select(
            dataset,
            keep,
            ell=self.ell,
            class_balanced=self.class_balanced,
            score=self.score,
            proxy=call.proxy,
            seed=call.seed,
            device=call.device,
            progress=call.progress,
            executor=call.executor,
            cancelled=call.cancelled,
        )
