"""Selectors: the rule that turns streamed gradient embeddings into a `Selection`.

Every selector runs beside the data on what the scan streams (shards → proxy → gradient
embeddings) and returns a `Selection` with weights. SAGE scores in two passes against a sketch;
the windowed selectors (GRAFT, CRAIG) decide per window of one class's samples, so their memory is
one window per class whatever N is; CREST reads a random pool per class and draws from the samples
of it the proxy has not learned yet; GRAFT with `pool` windows such a pool instead of every sample.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from kernels import facility_location, maxvol, pivoted_cholesky
from nearstore.dataset import Dataset
from nearstore.proxy import Proxy
from nearstore.reader import SelectiveReader
from nearstore.scan import (
    Batch,
    Scan,
    _check_finite,
    _check_keep,
    _check_proxy,
    _embed,
    _input_array,
    _scan_io,
    random_select,
    read_labels,
    sage_select,
)
from nearstore.selection import Selection

# How pools are read (SelectiveReader's coalescing): only to be scored, beside the data, so every
# hole under 64 KiB (about what a request costs in transfer) is bridged, whatever the bytes add up
# to; training reads bridge 5% at most. Small samples' pools are then read in whole shards: a 10%
# round over HTTP on 127.0.0.1 made 51 requests in 0.21 s, not 7,519 in 3.2 s, for 5x the bytes.
POOL_READS: dict[str, Any] = {"gap_bytes": 1 << 16, "max_overhead": math.inf}
# Above this share of the data, GRAFT's default windows hold 64 samples, not 128, and re-selection
# pools 1.5x the budget, not 2x: a pool of twice the budget would be over two thirds of the data,
# and MaxVol would keep 64 of every 128 (bench/round_cost.py: such rounds cost 0.11-0.14 of an epoch).
LARGE_BUDGET = 1 / 3
# A window to decide: its samples' embeddings (or their two factors), and how many to keep.
Window = tuple[tuple[torch.Tensor, ...], int]
# A window's choice: rows of the window, their weights and scores.
Pick = tuple[np.ndarray, np.ndarray, np.ndarray]


class Selector(ABC):
    """A selection method with its parameters; `select` runs it over a dataset."""

    method: ClassVar[str]

    @abstractmethod
    def select(
        self,
        dataset: Dataset,
        keep: float,
        *,
        proxy: Proxy | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: bool = False,
        previous: np.ndarray | None = None,
    ) -> Selection:
        """Select about round(keep · N) samples of `dataset`.

        proxy: what embeds samples (the trainer's model as a `ModelProxy`, for re-selection);
            default a RandomFeatureProxy fitted on warm-up shards.
        previous: the ids of the round this one replaces, if any. GRAFT on a pool puts them in
            its pool (`pool_previous`); the other selectors do not use them.
        """

    def params(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Random(Selector):
    """Uniformly random samples (per class when class_balanced): the baseline to beat."""

    method: ClassVar[str] = "random"
    class_balanced: bool = False

    def select(self, dataset, keep, *, proxy=None, seed=0, device="cpu", progress=False, previous=None) -> Selection:
        return random_select(dataset, keep, seed=seed, class_balanced=self.class_balanced)


@dataclass(frozen=True)
class Sage(Selector):
    """SAGE: FD sketch of gradients (pass 1), then the top scores (pass 2): agreement with the
    consensus, or the share outside the sketch (score="residual", diversity-aware); see sage_select."""

    method: ClassVar[str] = "sage"
    ell: int = 64
    class_balanced: bool = True
    score: str = "agreement"

    def select(self, dataset, keep, *, proxy=None, seed=0, device="cpu", progress=False, previous=None) -> Selection:
        return sage_select(
            dataset,
            keep,
            ell=self.ell,
            class_balanced=self.class_balanced,
            score=self.score,
            proxy=proxy,
            seed=seed,
            device=device,
            progress=progress,
        )


@dataclass(frozen=True)
class Graft(Selector):
    """GRAFT: per window of one class's samples, Fast MaxVol on the window's low-rank gradients.

    From the window's Gram matrix K = G Gᵀ (w × w, taken from the gradients' two factors, so the
    w × D gradients are never formed), greedy pivoting picks the k gradients farthest from each
    other's span, and MaxVol swaps on the rank-k features they give (K ≈ L Lᵀ) refine them to a
    tol-dominant set (kernels.maxvol): a diverse subset covering the window's dominant gradient
    subspace. With `tolerance`, k is the smallest size (up to the budget) whose greedy picks
    approximate the window's mean gradient ḡ: ‖ḡ − P_S ḡ‖ ≤ tolerance · ‖ḡ‖, P_S the projection
    on the picked gradients' span. Windows are decided as one batch, as many at a time as hold
    `GRAM_ENTRIES_AT_ONCE` Gram entries (16 MB in float32: 256 windows of 128).

    window: samples a window holds; None: 128, or 64 where the budget is over LARGE_BUDGET of the
        data. There MaxVol would keep 64 of every 128, and a round cost 0.11-0.14 of a full-data
        epoch on MNIST-1D (bench/round_cost.py); in windows of 64, 0.085-0.093.
    pool: only a random pool of pool × the budget per class is read and windowed (None: every
        sample): what re-selection rounds run (`default_reselect`), which keeps a round cheap and
        mixes chance into what MaxVol would otherwise fix on (the hardest, largest gradients).
    pool_previous: a re-selection round's pool holds the last round's picks (`previous`), the
        rest drawn fresh, so MaxVol keeps those still informative under the new proxy.
    norm_power: each gradient enters MaxVol as g · ‖g‖^(norm_power − 1): 1 is GRAFT's raw
        gradients, whose volume favours the largest (the most confidently wrong samples); 0.5
        tempers that; 0 weighs directions alone.
    The defaults (and default_reselect's up to a third of the data) are what beat random by the
    widest margin on MNIST-1D (bench/selection_quality.py); MaxVol on raw gradients, as the paper
    has it, is norm_power=1.
    """

    method: ClassVar[str] = "graft"
    # Fewer, larger batches: MaxVol's steps are ~20 small tensor ops each, whose overhead a batch
    # shares (256 windows of 128 at once: a round 10% faster than 64).
    GRAM_ENTRIES_AT_ONCE: ClassVar[int] = 1 << 22
    window: int | None = None
    tolerance: float | None = None
    pool: float | None = None
    pool_previous: bool = True
    norm_power: float = 0.5

    def select(self, dataset, keep, *, proxy=None, seed=0, device="cpu", progress=False, previous=None) -> Selection:
        if not self.norm_power >= 0:
            raise ValueError(f"norm_power must be >= 0, got {self.norm_power}")
        window = self.window if self.window is not None else 64 if keep > LARGE_BUDGET else 128
        return _windowed(
            self,
            dataset,
            keep,
            self._pick,
            proxy,
            seed,
            device,
            progress,
            window,
            self.pool,
            previous=previous if self.pool is not None and self.pool_previous else None,  # what the pool holds
            factored=True,
            at_once=max(1, self.GRAM_ENTRIES_AT_ONCE // window**2),
        )

    def _pick(self, windows: list[Window]) -> list[Pick]:
        residual, inputs = _stack(windows)
        budgets = [k for _, k in windows]
        if max(budgets) > residual.shape[2] * inputs.shape[2]:
            raise ValueError(
                f"GRAFT: a window's budget of {max(budgets)} samples exceeds the rank its gradients "
                f"of {residual.shape[2] * inputs.shape[2]} dimensions can have; use a smaller window or a proxy with "
                "a wider embedding"
            )
        if self.norm_power != 1:  # ‖r ⊗ x‖ = ‖r‖ ‖x‖; zero gradients (and padding rows) stay zero
            norms = residual.norm(dim=2) * inputs.norm(dim=2)
            residual = residual * torch.where(norms > 0, norms.pow(self.norm_power - 1), 0)[..., None]
        gram = _gram(residual, inputs)
        if self.tolerance is not None:
            budgets = self._sizes(gram, residual, inputs, [len(f[0]) for f, _ in windows], budgets)
        return [
            (rows.cpu().numpy(), np.ones(len(rows), dtype=np.float32), np.full(len(rows), np.nan, dtype=np.float32))
            for rows in maxvol(gram, budgets)
        ]

    def _sizes(
        self, gram: torch.Tensor, residual: torch.Tensor, inputs: torch.Tensor, sizes: list[int], budgets: list[int]
    ) -> list[int]:
        """GRAFT's subset size per window: the fewest greedy picks, up to its budget, whose span
        holds the window's mean gradient within `tolerance` (relative); the budget when none do."""
        rows, factor, rank = pivoted_cholesky(gram, max(budgets))
        residual, inputs = residual.double(), inputs.double()
        # ḡ = Σ r_i ⊗ x_i / w as a C × H matrix M: g_i · ḡ = r_iᵀ M x_i, ‖ḡ‖² = ‖M‖²_F.
        mean = residual.mT @ inputs / torch.tensor(sizes, dtype=residual.dtype)[:, None, None]
        products = ((residual @ mean) * inputs).sum(2)
        every = torch.arange(len(sizes))[:, None]
        square = factor[every, rows].double()  # lower triangular: the pivots' own coordinates
        independent = torch.arange(rows.shape[1])[None] < rank[:, None]
        square = square + torch.diag_embed((~independent).double())  # past the rank: a unit diagonal
        # the mean's coordinates in the pivots' orthonormal basis, the dependent ones 0
        coords = torch.linalg.solve_triangular(square, products[every, rows][..., None], upper=False)[..., 0]
        coords = coords.masked_fill(~independent, 0)
        norm = mean.square().sum((1, 2))[:, None]
        good = (norm - coords.square().cumsum(1)).clamp_min(0) <= self.tolerance**2 * norm
        return [int(ok[:k].int().argmax()) + 1 if ok[:k].any() else k for ok, k in zip(good, budgets)]


def _stack(windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors r_i, x_i of windows of gradients r_i ⊗ x_i, stacked and padded with zero rows
    to the largest window: (b, w, C), (b, w, H)."""
    w = max(len(factors[0]) for factors, _ in windows)

    def padded(part: int) -> torch.Tensor:
        first = windows[0][0][part]
        out = first.new_zeros(len(windows), w, first.shape[1])
        for row, (factors, _) in enumerate(windows):
            out[row, : len(factors[part])] = factors[part]
        return out

    return padded(0), padded(1)


def _gram(residual: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Their Gram matrices, g_i · g_j = (r_i · r_j)(x_i · x_j): (R Rᵀ) ∘ (X Xᵀ), (b, w, w), in the
    factors' precision (float32: 2x faster than float64, and the kernel resolves ranks to it)."""
    return (residual @ residual.mT) * (inputs @ inputs.mT)


@dataclass(frozen=True)
class Craig(Selector):
    """CRAIG: per window of one class's samples, the k medoids of their gradient embeddings by
    facility location (lazy greedy), each weighted by the size of its cluster.

    Weights are cluster sizes × k / w, so they average 1: a weighted loss keeps its scale, and the
    weighted subset's gradient approximates the window's full gradient.
    """

    method: ClassVar[str] = "craig"
    window: int = 1024

    def select(self, dataset, keep, *, proxy=None, seed=0, device="cpu", progress=False, previous=None) -> Selection:
        return _windowed(self, dataset, keep, self._pick, proxy, seed, device, progress, self.window)

    def _pick(self, windows: list[Window]) -> list[Pick]:
        return [(*_medoids(embeddings, k), np.full(k, np.nan, dtype=np.float32)) for (embeddings,), k in windows]


@dataclass(frozen=True)
class Crest(Selector):
    """CREST as the storage side can run it: per class, a random pool of `pool` × k_c samples is
    read and embedded by the proxy; those it already classifies with p(y | x) > `confidence` are
    learned and left out, and k_c samples are drawn from the rest (topped up with the least
    confident learned ones when too few remain): uniformly, or with `coreset` as CREST's
    coresets, the facility-location medoids of the unlearned samples' loss gradients at the
    logits (softmax − onehot, as CRAIG and CREST use for deep models), per window of
    `CORESET_WINDOW`, weighted by cluster size (mean 1). Without a proxy (a first round, before
    the trainer has pushed its model) nothing is learned yet: the draw is class-balanced random
    and reads only the labels. Only the pools are read, so a round costs pool × keep of a full scan.
    """

    method: ClassVar[str] = "crest"
    CORESET_WINDOW: ClassVar[int] = 512
    pool: float = 2.0
    confidence: float = 0.9
    coreset: bool = False

    def select(self, dataset, keep, *, proxy=None, seed=0, device="cpu", progress=False, previous=None) -> Selection:
        _check_keep(keep)
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        started = time.perf_counter()
        labels, budgets, pools, labels_reader = _class_pools(dataset, keep, self.pool, seed, whole=proxy is None)
        rng = np.random.default_rng([seed, 1])
        confidences, gradients, readers = {}, {}, [labels_reader]
        if proxy is not None:
            _check_proxy(dataset, proxy)
            input_array = _input_array(dataset)
            reader, batches = _pool_batches(
                dataset, input_array, dataset.label_array, labels, pools, progress, "CREST pool"
            )
            probability = np.empty(dataset.num_samples, dtype=np.float32)
            at_logits = np.empty((dataset.num_samples if self.coreset else 0, proxy.num_classes), dtype=np.float32)
            for ids, batch in batches:
                x = batch[input_array]
                _check_finite(x, ids, input_array)
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
                    rows, weight = _coresets(torch.from_numpy(gradients[c][unlearned]), budgets[c], self.CORESET_WINDOW)
                    chosen = unlearned[rows]
                elif len(unlearned) >= budgets[c]:
                    chosen = rng.choice(unlearned, budgets[c], replace=False)
                else:  # too few left to learn: the least confident of the learned fill the budget
                    learned = np.argsort(confidences[c], kind="stable")[len(unlearned) :]
                    chosen = np.concatenate([unlearned, learned[: budgets[c] - len(unlearned)]])
            picks.append(pool[chosen])
            weights.append(weight)
            scores.append(confidences[c][chosen] if c in confidences else np.full(len(chosen), np.nan))
        ids = np.concatenate(picks)
        order = np.argsort(ids)
        return Selection(
            dataset=dataset.identity(),
            ids=ids[order],
            weights=np.concatenate(weights)[order],
            scores=np.concatenate(scores)[order],
            method=self.method,
            params={"keep": keep, "seed": seed, "proxy": type(proxy).__name__ if proxy else None, **self.params()},
            io=_scan_io(started, readers),
        )


def _coresets(points: torch.Tensor, k: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """k facility-location medoids of points (n, d), per window of at most `window` of them with
    budgets that add up to k (differences of rounded running totals), and their weights, cluster
    sizes × k_w / n_w (mean 1 per window)."""
    rows, weights = [], []
    for start in range(0, len(points), window):
        end = min(start + window, len(points))
        budget = round(k * end / len(points)) - round(k * start / len(points))
        if budget:
            medoids, weight = _medoids(points[start:end], budget)
            rows.append(start + medoids)
            weights.append(weight)
    return np.concatenate(rows), np.concatenate(weights)


def _medoids(points: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """CRAIG's k facility-location medoids of points and their weights, cluster sizes × k / n (mean 1)."""
    rows, sizes = facility_location(points, k)
    return rows.cpu().numpy(), (sizes.double() * k / len(points)).float().cpu().numpy()


def _windowed(
    selector: Selector,
    dataset: Dataset,
    keep: float,
    pick: Callable[[list[Window]], list[Pick]],
    proxy: Proxy | None,
    seed: int,
    device: torch.device | str,
    progress: bool,
    window: int,
    pool: float | None = None,
    *,
    previous: np.ndarray | None = None,
    factored: bool = False,
    at_once: int = 1,
) -> Selection:
    """Stream gradient embeddings once (their two factors with `factored`); per class, cut them
    into windows of `window` samples and keep what `pick` chooses of each, deciding `at_once`
    windows together. A class keeps round(keep · n_c) samples in all (at least one): window
    budgets are the differences of the rounded running totals, so they add up exactly.
    With `pool`, only a pool of pool × its budget per class is read and windowed: the `previous`
    ids of the class, the rest drawn at random."""
    _check_keep(keep)
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    started = time.perf_counter()
    scan = Scan.open(dataset, selector.method, proxy, None, 4096, seed, device)
    readers = [scan.reader]
    if pool is None:
        stream = scan.embeddings(progress, f"{selector.method} pass 1/1", factored=factored, batch_samples=8192)
        share: Callable[[int], float] = lambda group: keep  # noqa: E731
    else:
        labels, budgets, pools, labels_reader = _class_pools(dataset, keep, pool, seed, previous=previous)
        inputs, batches = _pool_batches(dataset, scan.input_array, scan.labels, labels, pools, progress, "pool")
        readers += [labels_reader, inputs]
        stream = _embed(batches, scan.proxy, scan.input_array, scan.labels, True, factored)
        share = lambda group: budgets[group] / len(pools[group])  # noqa: E731
    pending: dict[int, tuple[np.ndarray, tuple[torch.Tensor, ...]]] = {}  # a class's samples not windowed yet
    seen: dict[int, int] = {}
    kept: dict[int, int] = {}
    ready: list[tuple[np.ndarray, Window]] = []
    chosen: list[Pick] = []

    def cut(group: int, ids: np.ndarray, parts: tuple[torch.Tensor, ...], last: bool) -> None:
        """The group's next window, these samples, with its budget, onto `ready`."""
        before, after = seen.get(group, 0), seen.get(group, 0) + len(ids)
        k = round(share(group) * after) - round(share(group) * before)
        if last and not kept.get(group) and not k:
            k = 1  # a class too small for its budget keeps one sample rather than vanish
        if k >= len(ids):  # the window keeps every sample: nothing to decide
            chosen.append((ids, np.ones(len(ids), dtype=np.float32), np.full(len(ids), np.nan, dtype=np.float32)))
        elif k:
            ready.append((ids, (parts, k)))
        seen[group], kept[group] = after, kept.get(group, 0) + k

    def decide() -> None:
        for (ids, _), (rows, weights, scores) in zip(ready, pick([w for _, w in ready])):
            chosen.append((ids[rows], weights, scores))
        ready.clear()

    for ids, groups, embeddings in stream:
        parts = embeddings if factored else (embeddings,)
        for group, rows in groups.items():
            group_ids, group_parts = ids[rows], tuple(p[rows] for p in parts)
            if group in pending:  # one copy per class and batch; the windows below are views
                before_ids, before_parts = pending[group]
                group_ids = np.concatenate([before_ids, group_ids])
                group_parts = tuple(torch.cat(pair) for pair in zip(before_parts, group_parts))
            # A full window waits for the next sample of its class: the last window is never empty.
            end = (len(group_ids) - 1) // window * window
            for start in range(0, end, window):
                cut(
                    group,
                    group_ids[start : start + window],
                    tuple(p[start : start + window] for p in group_parts),
                    False,
                )
                if len(ready) >= at_once:
                    decide()
            pending[group] = group_ids[end:], tuple(p[end:] for p in group_parts)
    for group, (group_ids, group_parts) in pending.items():
        cut(group, group_ids, group_parts, last=True)
    if ready:
        decide()

    ids = np.concatenate([c[0] for c in chosen]) if chosen else np.zeros(0, dtype=np.int64)
    order = np.argsort(ids)
    return Selection(
        dataset=dataset.identity(),
        ids=ids[order],
        weights=np.concatenate([c[1] for c in chosen])[order],
        scores=np.concatenate([c[2] for c in chosen])[order],
        method=selector.method,
        params={
            "keep": keep,
            "seed": seed,
            "proxy": type(scan.proxy).__name__,
            "previous": None if previous is None else len(previous),
            **selector.params(),
            "window": window,
        },
        io=_scan_io(started, readers),
    )


def _class_pools(
    dataset: Dataset,
    keep: float,
    pool: float,
    seed: int,
    *,
    whole: bool = False,
    previous: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[int, int], dict[int, np.ndarray], SelectiveReader]:
    """Every label (`read_labels`), each class's budget max(1, round(keep · n_c)), and a pool of
    min(n_c, ⌈pool × budget⌉) of its samples, sorted (whole: every sample of the class): the
    class's `previous` ids (a random share of them if they alone overfill it), then random others."""
    if pool < 1:
        raise ValueError(f"pool must be >= 1 (a multiple of the budget), got {pool}")
    labels, reader = read_labels(dataset, "a class-balanced pool")
    carried = np.zeros(len(labels), dtype=bool)
    if previous is not None:
        previous = np.asarray(previous)
        if previous.size and (previous.min() < 0 or previous.max() >= len(labels)):
            raise ValueError(
                f"previous ids must lie in [0, {len(labels)}) (the samples of {dataset.url!r}), "
                f"got [{previous.min()}, {previous.max()}]"
            )
        carried[previous] = True
    rng = np.random.default_rng(seed)
    budgets, pools = {}, {}
    for c in np.unique(labels).tolist():
        members = np.flatnonzero(labels == c)
        budgets[c] = max(1, round(keep * len(members)))  # a class keeps at least one sample
        size = len(members) if whole else min(len(members), math.ceil(pool * budgets[c]))
        kept, others = members[carried[members]], members[~carried[members]]
        if len(kept) > size:
            kept = rng.choice(kept, size, replace=False)
        pools[c] = np.sort(np.concatenate([kept, rng.choice(others, size - len(kept), replace=False)]))
    return labels, budgets, pools, reader


def _pool_batches(
    dataset: Dataset,
    input_array: str,
    label_array: str,
    labels: np.ndarray,
    pools: dict[int, np.ndarray],
    progress: bool,
    desc: str,
) -> tuple[SelectiveReader, Iterator[Batch]]:
    """The reader of the pools' inputs (coalescing as POOL_READS), and every pooled sample, in id
    order, in chunks of 4,096: its input read by it, its label taken from those already in hand."""
    reader = SelectiveReader(dataset, [input_array], **POOL_READS)
    ids = np.sort(np.concatenate(list(pools.values())))

    def batches() -> Iterator[Batch]:
        for start in tqdm(range(0, len(ids), 4096), desc=desc, unit="chunk", disable=not progress):
            chunk = ids[start : start + 4096]
            yield chunk, {input_array: reader.read(chunk)[input_array], label_array: labels[chunk]}

    return reader, batches()


SELECTORS: dict[str, type[Selector]] = {cls.method: cls for cls in (Random, Sage, Graft, Craig, Crest)}
# What `nearstore select` and a server's first round run: GRAFT over every sample, with the
# model-free proxy, tempered gradients, windows of 128 (64 above LARGE_BUDGET). Later rounds:
# `default_reselect`.
DEFAULT_METHOD = "graft"


def default_reselect(keep: float) -> tuple[str, dict[str, Any]]:
    """What `StreamingLoader.reselect` and a server's later rounds run at `keep`, with the trainer's
    model: GRAFT on a pool of twice the budget per class that holds the round it replaces. At 10%
    of MNIST-1D, every 3 epochs, this beat random by +2.6 sigma over 30 seeds and the untempered
    path with fresh pools by 1.0 point a seed over 25; a round 0 on a pool lost 1.2.
    Above LARGE_BUDGET, a pool of 1.5x the budget (in windows of 64, as `Graft` has them there):
    at 50% a pool of twice the budget is every sample and its round, in windows of 128, cost 0.13
    of a full-data epoch, this one 0.09; the whole path, round 0 in windows of 64 too, gave up 0.14
    points a seed for it (98.30% against 98.44% over 5 seeds; random 97.62%). Measured by
    bench/selection_quality.py and bench/round_cost.py."""
    return "graft", {"pool": 1.5 if keep > LARGE_BUDGET else 2.0}


def make_selector(method: str, **options: Any) -> Selector:
    """The selector named `method` with its options, e.g. make_selector("craig", window=512)."""
    if method not in SELECTORS:
        raise ValueError(f"method must be one of {sorted(SELECTORS)}, got {method!r}")
    try:
        return SELECTORS[method](**options)
    except TypeError as e:
        raise ValueError(f"bad options for {method!r}: {e}") from e
