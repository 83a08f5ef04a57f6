"""ClipCov for contrastive training on pairs, CLIP-style (Joshi, Jain & Mirzasoleiman, 2024),
beside the data: the subset whose image–caption cross-covariance best preserves the data's
generalises as the data does. The cross-covariance is sketched by Frequent Directions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from kernels import FrequentDirections, StreamingKMeans, cross_covariance_greedy
from nearstore.checks import check_range
from nearstore.errors import DatasetError, ParameterError
from nearstore.selection.plan import check_keep, check_seed
from nearstore.selection.proxies import RandomFeatureProxy
from nearstore.selection.record import Selection
from nearstore.selection.selectors.base import SelectCall, Selector, check_window
from nearstore.selection.selectors.sas import DEFAULT_CLUSTERS, latent_classes
from nearstore.selection.stages import Scan, check_finite, decoded, model_errors_named, scan_io, shard_batches
from nearstore.selection.windows import ClassWindows, Pick, Window, WindowedPart, decide
from nearstore.storage import Dataset


@dataclass(frozen=True)
class ClipCov(Selector):
    """ClipCov: each pair (x, its `paired_array`, e.g. a caption's token ids) embedded on both
    sides, unit-norm, then centred: v_i by the proxy (the trainer's x-side encoder, or random
    features), t_i by random features of the paired array (fitted on warm-up shards, no labels).
    Pass 1 sketches the stacked rows [v; t] by Frequent Directions (`ell` rows) beside their sums,
    so the sketch's cross block less the means' product estimates the data's cross-covariance
    C = (1/N) Σ (v − v̄)(t − t̄)ᵀ, and finds `clusters` latent classes of v by streaming k-means;
    all of it merges, so partitions sketch apart on Dask. Pass 2 cuts the pairs of each class (the
    labels where the data has them, else the latent classes, as the paper's zero-shot ones: each
    keeps its share) into windows and keeps `keep` of each by greedy towards a mean
    cross-covariance of `sharpen` × C (`kernels.cross_covariance_greedy`): at 1 the subset
    reproduces C, mismatched pairs included; past 1 it keeps first the pairs that agree with the
    data's correlation (v_iᵀ C t_i, the pair's score under the linear contrastive model the data
    fits), as ClipCov's code weighs a pair's own alignment beside its cross terms, then spreads
    over the rest of C. Weights 1; scores v_iᵀ C t_i.
    """

    method: ClassVar[str] = "clipcov"
    paired_array: str | None = None
    clusters: int = DEFAULT_CLUSTERS
    ell: int = 64
    sharpen: float = 8.0
    window: int = 1024

    def __post_init__(self) -> None:
        if self.paired_array is not None and not isinstance(self.paired_array, str):
            raise ParameterError(f"paired_array must be an array name, got {self.paired_array!r}")
        check_range("clusters", self.clusters, 1, 1 << 16, integer=True)
        check_range("ell", self.ell, 2, 4096, integer=True)  # ell = 1 keeps no row: the target ignored the data
        check_range("sharpen", self.sharpen, 0, 16)
        check_window(self.window)

    def run(self, dataset: Dataset, keep: float, call: SelectCall) -> Selection:
        check_keep(keep)
        check_seed(call.seed)
        started = time.perf_counter()
        paired = self._paired_array(dataset)
        extra = [paired] + ([dataset.label_array] if dataset.label_array else [])
        scan = Scan.open(
            dataset,
            self.method,
            call.proxy,
            call.seed,
            call.device,
            labelled=False,
            also=extra,
            cancelled=call.cancelled,
        )
        captions = _caption_proxy(scan, paired, call.seed, call.device)
        options = dict(paired=paired, captions=captions, progress=call.progress)
        # unlabelled: latent classes stand for classes, each keeping one at least
        clusters = (
            self.clusters if dataset.label_array else latent_classes(self.method, self.clusters, keep, dataset, False)
        )
        sketches, first = call.executor.map_reduce(
            scan, clipcov_sketch, PairSketch.merge, ell=self.ell, clusters=clusters, seed=call.seed, **options
        )
        pairs, n = sketches.pairs, max(1, sketches.pairs.rows_seen)
        width = pairs.dim - captions.width
        mean = sketches.sums / n
        # centred: both sides' features share a large mean (random ReLU features are positive),
        # which alone would rank each side's typicality, not how well a pair agrees
        target = self.sharpen * (
            (pairs.sketch().T @ pairs.sketch())[:width, width:] / n - torch.outer(mean[:width], mean[width:])
        )
        latent = None if dataset.label_array else sketches.latent
        part, second = call.executor.map_reduce(
            scan,
            clipcov_pass,
            WindowedPart.merge,
            window=self.window,
            target=target,
            means=(mean[:width], mean[width:]),
            latent=latent,
            keep=keep,
            seed=call.seed,
            **options,
        )
        io = call.io(scan_io(started, [scan.reader], passes=2), first, second)
        params = call.params(keep, scan.proxy, {**self.params(), "paired_array": paired, "clusters": clusters})
        return part.selection(dataset, self.method, params, io)

    def _paired_array(self, dataset: Dataset) -> str:
        others = [n for n in dataset.sample_arrays if n not in (dataset.input_array, dataset.label_array)]
        if self.paired_array is None and len(others) == 1:
            return others[0]
        if self.paired_array in others:
            return self.paired_array
        raise DatasetError(
            f"clipcov selects pairs: paired_array must name the other side of the samples of {dataset.url!r},"
            f" one of {others} (its input array is {dataset.input_array!r}), got {self.paired_array!r}"
        )


def _caption_proxy(scan: Scan, paired: str, seed: int, device: Any) -> RandomFeatureProxy:
    """Random features of the paired array, fitted on the scan's warm-up shards (or the first)."""
    if scan.warm:
        batches = list(scan.warm.values())
    else:  # a proxy was given: the first shard
        r = scan.reader.shard_range(0)
        batches = [(np.arange(r.start, r.stop), scan.reader.read_shard(0))]
    ids = np.concatenate([ids for ids, _ in batches])
    values = np.concatenate([batch[paired] for _, batch in batches])
    captions = _as_samples(scan.reader.dataset, paired, values, ids)
    check_finite(captions, ids, paired)
    return RandomFeatureProxy(2, seed=seed + 1, device=device).fit(captions, None)


def _as_samples(dataset: Dataset, name: str, values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ragged = dataset.ragged(name)
    return values if ragged is None else ragged.decode_all(values, ids)


def _pairs(
    scan: Scan, shards: list[int], paired: str, captions: RandomFeatureProxy, progress: bool, desc: str
) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]]:
    """(ids, labels or zeros, v, t) of every pair of `shards`, both sides unit-norm."""
    dataset = scan.reader.dataset
    shards_read = shard_batches(scan.reader, scan.warm, progress, desc, shards, cancelled=scan.cancelled)
    for ids, batch in decoded(shards_read, scan.input_array, scan.proxy.images, dataset.ragged(scan.input_array)):
        x = batch[scan.input_array]
        check_finite(x, ids, scan.input_array)
        with model_errors_named(scan.proxy, scan.input_array, x, ids):
            v = torch.nn.functional.normalize(scan.proxy.features(x).float(), dim=1)
        other = _as_samples(dataset, paired, batch[paired], ids)
        check_finite(other, ids, paired)
        t = torch.nn.functional.normalize(captions.features(other), dim=1)
        labels = batch[dataset.label_array] if dataset.label_array else np.zeros(len(ids), dtype=np.int64)
        yield ids, labels, v, t


@dataclass
class PairSketch:
    """Pass 1's result over some shards: the Frequent Directions sketch of the stacked pairs
    [v; t], and the latent classes of v (streaming k-means). Both merge, so partitions reduce in a tree."""

    pairs: FrequentDirections
    sums: torch.Tensor  # of the stacked pairs, for their mean
    latent: StreamingKMeans

    @staticmethod
    def merge(a: PairSketch, b: PairSketch) -> PairSketch:
        return PairSketch(a.pairs.merge(b.pairs), a.sums + b.sums, a.latent.merge(b.latent))


def clipcov_sketch(
    scan: Scan,
    shards: list[int],
    *,
    ell: int,
    clusters: int,
    seed: int,
    paired: str,
    captions: RandomFeatureProxy,
    progress: bool,
) -> PairSketch:
    """Pass 1 over `shards`: the sketch of the stacked pairs [v; t], and v's latent classes."""
    sketch = None
    for _, _, v, t in _pairs(scan, shards, paired, captions, progress, "clipcov pass 1/2"):
        if sketch is None:
            dim = v.shape[1] + t.shape[1]
            sketch = PairSketch(
                FrequentDirections(ell, dim), torch.zeros(dim), StreamingKMeans(clusters, v.shape[1], seed=seed)
            )
        stacked = torch.cat([v, t], 1)
        sketch.pairs.update(stacked)
        sketch.sums += stacked.sum(0)
        sketch.latent.update(v)
    return sketch


def clipcov_pass(
    scan: Scan,
    shards: list[int],
    *,
    window: int,
    target: torch.Tensor,
    means: tuple[torch.Tensor, torch.Tensor],
    latent: StreamingKMeans | None,
    keep: float,
    seed: int,
    paired: str,
    captions: RandomFeatureProxy,
    progress: bool,
) -> WindowedPart:
    """Pass 2 over `shards`: the pairs of each class (the labels', else the `latent` classes') in
    windows, `keep` of each kept by the greedy towards `target`."""

    def stream() -> Iterator[tuple[np.ndarray, dict[int, np.ndarray], tuple[torch.Tensor, torch.Tensor]]]:
        for ids, labels, v, t in _pairs(scan, shards, paired, captions, progress, "clipcov pass 2/2"):
            groups = labels if latent is None else latent.assign(v).numpy()
            yield ids, {int(c): np.flatnonzero(groups == c) for c in np.unique(groups)}, (v - means[0], t - means[1])

    windows = ClassWindows(window, lambda group: (keep, 1))
    classes = max(2, scan.reader.dataset.num_classes)
    return decide(stream(), windows, TowardsTarget(target), classes, seed, cancelled=scan.cancelled)


@dataclass(frozen=True)
class TowardsTarget:
    """Pass 2's decisions (`windows.Windowed`): each window's pairs (v, t) greedily towards a mean
    cross-covariance `target`."""

    target: torch.Tensor
    method: ClassVar[str] = "clipcov"
    factored: ClassVar[bool] = True  # a window's parts are (v, t)
    mute_suspects: ClassVar[bool] = False
    draw_uninformed: ClassVar[bool] = False

    def pick(self, windows: list[Window]) -> list[Pick]:
        picks = []
        for (v, t), k in windows:
            order = cross_covariance_greedy(v, t, self.target, k)
            score = ((v[order] @ self.target) * t[order]).sum(1)
            picks.append((order.cpu().numpy(), np.ones(k, dtype=np.float32), score.cpu().numpy()))
        return picks

    def at_once(self, window: int) -> int:
        return 1
