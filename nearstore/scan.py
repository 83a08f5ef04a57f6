"""The storage-side scan: stream shards → proxy → gradient embeddings → FD sketch (pass 1) →
agreement scores → top-k (pass 2). Memory O(ℓ·D) per sketch whatever the number of samples."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from kernels import FrequentDirections, StreamingTopK, agreement_scores, residual_scores, sketch_basis
from nearstore.dataset import Dataset
from nearstore.proxy import Proxy, RandomFeatureProxy
from nearstore.reader import SelectiveReader
from nearstore.selection import Selection

Batch = tuple[np.ndarray, dict[str, np.ndarray]]
# (ids, {group: rows}, gradient embeddings, or their two factors where asked for)
Embedded = tuple[np.ndarray, dict[int, np.ndarray], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def sage_select(
    dataset: Dataset,
    keep: float,
    *,
    ell: int = 64,
    class_balanced: bool = True,
    score: Literal["agreement", "residual"] = "agreement",
    proxy: Proxy | None = None,
    input_array: str | None = None,
    warmup_samples: int = 4096,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    client: Any | None = None,
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
    client: a dask.distributed Client: both passes run as maps over shard partitions on its
        workers, pass 1's sketches merged in a tree (see `nearstore.dask_scan`).
    """
    _check_keep(keep)
    if score not in ("agreement", "residual"):
        raise ValueError(f"score must be 'agreement' or 'residual', got {score!r}")
    started = time.perf_counter()
    scan = Scan.open(dataset, "SAGE", proxy, input_array, warmup_samples, seed, device)
    warmup = scan.reader.stats.snapshot()  # the default proxy's warm-up shards, which pass 1 reuses
    shards = range(scan.reader.num_shards)
    if client is None:
        first = _sage_pass1(scan, shards, ell, class_balanced, device, progress)
    else:
        from nearstore.dask_scan import distributed_pass1

        first = distributed_pass1(client, dataset, scan, ell, class_balanced, device)
    num_classes = len(first.sketches)
    bases = [sketch_basis(s.sketch()) for s in first.sketches]
    consensus = [(first.sums[c] / max(1, first.counts[c])).float() for c in range(num_classes)]
    total_k = [max(1, round(keep * n)) if n else 0 for n in first.counts]
    rule = _SageRule(bases, consensus, total_k, score, class_balanced)
    if client is None:
        results = _sage_pass2(scan, shards, rule, progress)
        reads = scan.reader.stats.snapshot().as_dict()
    else:
        from nearstore.dask_scan import distributed_pass2

        results, second = distributed_pass2(client, dataset, scan, rule)
        reads = {k: first.io[k] + second[k] + warmup.as_dict()[k] for k in first.io}
    scores = torch.cat([s for s, _ in results]).numpy()
    chosen = torch.cat([i for _, i in results]).numpy()
    order = np.argsort(chosen)
    return Selection(
        dataset=dataset.identity(),
        ids=chosen[order],
        weights=np.ones(len(chosen), dtype=np.float32),
        scores=scores[order],
        method="sage",
        params={
            "keep": keep,
            "ell": ell,
            "class_balanced": class_balanced,
            "score": score,
            "seed": seed,
            "proxy": type(scan.proxy).__name__,
            "input_array": scan.input_array,
            "distributed": client is not None,
        },
        io={
            "bytes": reads["bytes"],
            "requests": reads["requests"],
            "first_pass_bytes": warmup.bytes + first.io["bytes"],
            "seconds": time.perf_counter() - started,
            "passes": 2,
        },
    )


@dataclass
class SagePass1:
    """Pass 1 over some shards: a sketch, a gradient sum and a count per group, and the reads.
    Passes over disjoint shards merge (sketches by FD's merge) into the pass over all of them."""

    sketches: list[FrequentDirections]
    sums: torch.Tensor
    counts: np.ndarray
    io: dict[str, int]

    def merge(self, other: SagePass1) -> SagePass1:
        for mine, theirs in zip(self.sketches, other.sketches, strict=True):
            mine.merge(theirs)
        self.sums += other.sums
        self.counts += other.counts
        self.io = {k: self.io[k] + other.io[k] for k in self.io}
        return self


@dataclass
class _SageRule:
    """What pass 2 needs from pass 1: each group's sketch basis, consensus and budget."""

    bases: list[torch.Tensor]
    consensus: list[torch.Tensor]
    total_k: list[int]
    score: str
    class_balanced: bool


def _sage_pass1(
    scan: Scan, shards: Iterable[int], ell: int, class_balanced: bool, device: torch.device | str, progress: bool
) -> SagePass1:
    before = scan.reader.stats.snapshot()
    num_classes = scan.proxy.num_classes if class_balanced else 1
    dim = scan.proxy.embedding_dim
    sketches = [FrequentDirections(ell, dim, device=device) for _ in range(num_classes)]
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    counts = np.zeros(num_classes, dtype=np.int64)
    for _, groups, embeddings in scan.embeddings(progress, "SAGE pass 1/2", class_balanced, shards):
        for group, rows in groups.items():
            members = embeddings[rows]
            sketches[group].update(members)
            sums[group] += members.sum(0, dtype=torch.float64)
            counts[group] += len(rows)
    reads = (scan.reader.stats.snapshot() - before).as_dict()
    return SagePass1(sketches, sums, counts, {"bytes": reads["bytes"], "requests": reads["requests"]})


def _sage_pass2(
    scan: Scan, shards: Iterable[int], rule: _SageRule, progress: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each group's top (scores, ids) over the shards."""
    tops = [StreamingTopK(k) for k in rule.total_k]
    for ids, groups, embeddings in scan.embeddings(progress, "SAGE pass 2/2", rule.class_balanced, shards):
        for group, rows in groups.items():
            if rule.score == "agreement":
                scores = agreement_scores(embeddings[rows], rule.bases[group], rule.consensus[group])
            else:
                scores = residual_scores(embeddings[rows], rule.bases[group])
            tops[group].push(scores.cpu(), torch.from_numpy(ids[rows]))
    return [top.result() for top in tops]


def random_select(dataset: Dataset, keep: float, *, seed: int = 0, class_balanced: bool = False) -> Selection:
    """A uniformly random round(keep · N) samples (per class when class_balanced): the baseline."""
    _check_keep(keep)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    if not class_balanced:
        ids = np.sort(rng.choice(dataset.num_samples, max(1, round(keep * dataset.num_samples)), replace=False))
        io = {"bytes": 0, "requests": 0, "seconds": time.perf_counter() - started, "passes": 0}
    else:
        y, reader = read_labels(dataset, "class-balanced selection")
        picks = [
            rng.choice(members, max(1, round(keep * len(members))), replace=False)
            for members in (np.flatnonzero(y == c) for c in np.unique(y))
        ]
        ids = np.sort(np.concatenate(picks))
        io = _scan_io(started, [reader])
    return Selection(
        dataset=dataset.identity(),
        ids=ids,
        weights=np.ones(len(ids), dtype=np.float32),
        scores=np.full(len(ids), np.nan, dtype=np.float32),
        method="random",
        params={"keep": keep, "seed": seed, "class_balanced": class_balanced},
        io=io,
    )


def read_labels(dataset: Dataset, who: str) -> tuple[np.ndarray, SelectiveReader]:
    """Every label of the dataset, (N,), with the reader that read them: read whole on first use,
    then kept with the opened dataset (the store is read-only), so later rounds read nothing."""
    name = _label_array(dataset, who)
    reader = SelectiveReader(dataset, [name])

    def read() -> np.ndarray:
        labels = np.concatenate([batch[name] for _, batch in _shards(reader, {}, False, "")])
        labels.flags.writeable = False  # shared by every later round: none may change it
        return labels

    return dataset._kept(("labels", name), read), reader


@dataclass
class Scan:
    """What every streaming selection starts from: a reader of the input and label arrays and a
    fitted proxy (with the warm-up shards it was fitted on, not to be read again)."""

    reader: SelectiveReader
    proxy: Proxy
    input_array: str
    labels: str
    warm: dict[int, dict[str, np.ndarray]]

    @classmethod
    def open(
        cls,
        dataset: Dataset,
        who: str,
        proxy: Proxy | None,
        input_array: str | None,
        warmup_samples: int,
        seed: int,
        device: torch.device | str,
    ) -> Scan:
        labels = _label_array(dataset, f"{who} scores per-example gradients, which")
        input_array = input_array or _input_array(dataset)
        reader = SelectiveReader(dataset, [input_array, labels])
        warm: dict[int, dict[str, np.ndarray]] = {}
        if proxy is None:
            proxy, warm = _fit_default_proxy(reader, input_array, labels, warmup_samples, seed, device)
        else:
            _check_proxy(dataset, proxy)
        return cls(reader, proxy, input_array, labels, warm)

    def embeddings(
        self,
        progress: bool,
        desc: str,
        class_balanced: bool = True,
        shards: Iterable[int] | None = None,
        factored: bool = False,
        batch_samples: int = 0,
    ) -> Iterator[Embedded]:
        """Every shard (or those given) once: (ids, {group: rows}, gradient embeddings), or the
        embeddings' two factors (Proxy.gradient_factors) with `factored`; consecutive shards
        embedded together up to `batch_samples` (0: one shard at a time)."""
        batches = _shards(self.reader, self.warm, progress, desc, shards)
        if batch_samples:
            batches = _rebatch(batches, batch_samples)
        return _embed(batches, self.proxy, self.input_array, self.labels, class_balanced, factored)


def _shards(
    reader: SelectiveReader,
    warm: dict[int, dict[str, np.ndarray]],
    progress: bool,
    desc: str,
    shards: Iterable[int] | None = None,
) -> Iterator[Batch]:
    """Stage 1: every shard (or those given) once, in order; shards in `warm` are not read again."""
    shards = list(range(reader.num_shards) if shards is None else shards)
    for shard in tqdm(shards, desc=desc, unit="shard", disable=not progress):
        r = reader.shard_range(shard)
        yield np.arange(r.start, r.stop), warm.pop(shard, None) or reader.read_shard(shard)


def _rebatch(batches: Iterable[Batch], samples: int) -> Iterator[Batch]:
    """Consecutive batches joined until each holds at least `samples` (the last may hold fewer):
    fewer, larger calls for the stages after."""
    held: list[Batch] = []
    for batch in batches:
        held.append(batch)
        if sum(len(ids) for ids, _ in held) >= samples:
            yield _join(held)
            held = []
    if held:
        yield _join(held)


def _join(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    ids = np.concatenate([ids for ids, _ in batches])
    return ids, {name: np.concatenate([b[name] for _, b in batches]) for name in batches[0][1]}


def _embed(
    batches: Iterable[Batch], proxy: Proxy, input_array: str, labels: str, class_balanced: bool, factored: bool = False
) -> Iterator[Embedded]:
    """Stage 2: gradient embeddings of a batch, with the rows of each group (class, or all)."""
    for ids, batch in batches:
        x, y = batch[input_array], batch[labels]
        _check_finite(x, ids, input_array)
        embeddings = proxy.gradient_factors(x, y) if factored else proxy.embed(x, y)
        if class_balanced:
            groups = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
        else:
            groups = {0: np.arange(len(ids))}
        yield ids, groups, embeddings


def _fit_default_proxy(
    reader: SelectiveReader, input_array: str, labels: str, warmup_samples: int, seed: int, device: torch.device | str
) -> tuple[RandomFeatureProxy, dict[int, dict[str, np.ndarray]]]:
    """Fit a RandomFeatureProxy on random whole shards; return them so pass 1 need not re-read."""
    dataset = reader.dataset
    order = np.random.default_rng(seed).permutation(reader.num_shards)
    warm: dict[int, dict[str, np.ndarray]] = {}
    taken = 0
    for shard in order:
        if taken >= warmup_samples:
            break
        r = reader.shard_range(int(shard))
        warm[int(shard)] = batch = reader.read_shard(int(shard))
        _check_finite(batch[input_array], np.arange(r.start, r.stop), input_array)
        taken += len(r)
    x = np.concatenate([b[input_array] for b in warm.values()])
    y = np.concatenate([b[labels] for b in warm.values()])
    num_classes = max(dataset.num_classes, int(y.max()) + 1)
    return RandomFeatureProxy(num_classes, seed=seed, device=device).fit(x, y), warm


def _check_finite(x: np.ndarray, ids: np.ndarray, name: str) -> None:
    if not np.issubdtype(x.dtype, np.floating):
        return
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise ValueError(f"sample {int(ids[bad][0])} of array {name!r} contains NaN or inf; the proxy cannot score it")


def _check_proxy(dataset: Dataset, proxy: Proxy) -> None:
    if dataset.num_classes and proxy.num_classes < dataset.num_classes:
        raise ValueError(f"the proxy scores {proxy.num_classes} classes, {dataset.url!r} has {dataset.num_classes}")


def _check_keep(keep: float) -> None:
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")


def _label_array(dataset: Dataset, who: str) -> str:
    if dataset.label_array is None:
        raise ValueError(f"{who} needs labels, and {dataset.url!r} has no label array")
    return dataset.label_array


def _input_array(dataset: Dataset) -> str:
    inputs = [n for n in dataset.sample_arrays if n != dataset.label_array]
    if not inputs:
        raise ValueError(f"{dataset.url!r} has no input array besides the labels")
    return inputs[0]


def _scan_io(started: float, readers: list[SelectiveReader], passes: int = 1) -> dict[str, float | int]:
    """What a selection read, over all its readers, and how long it took."""
    stats = [r.stats.snapshot() for r in readers]
    return {
        "bytes": sum(s.bytes for s in stats),
        "requests": sum(s.requests for s in stats),
        "seconds": time.perf_counter() - started,
        "passes": passes,
    }
