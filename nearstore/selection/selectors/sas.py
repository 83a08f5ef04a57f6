"""SAS for contrastive self-supervised learning (Joshi & Mirzasoleiman, 2023), beside the data:
the examples that teach contrastive learning most are those whose augmentations are most similar
to other examples' in expectation. Needs no labels."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kernels import StreamingKMeans, expected_similarity, sas_greedy
from nearstore.checks import check_range
from nearstore.selection.augment import check_augmentation
from nearstore.selection.plan import check_keep, check_seed
from nearstore.selection.record import Selection
from nearstore.selection.selectors.base import SelectCall, Selector, check_window
from nearstore.selection.stages import Scan, augmented_views, log, model_errors_named, scan_io
from nearstore.selection.windows import ClassWindows, Pick, Window, WindowedPart, decide
from nearstore.storage import Dataset

DEFAULT_CLUSTERS = 10  # latent classes of a dataset without labels, unless told
# A latent class keeps one sample however small its share: at most one latent class per this many
# samples of the budget, so that the floor adds at most a quarter to it.
BUDGET_PER_CLUSTER = 4


def latent_classes(method: str, wanted: int, keep: float, dataset: Dataset, named: bool) -> int:
    """The latent classes a budget affords, `wanted` at most: each keeps at least one sample, so
    one per BUDGET_PER_CLUSTER samples of it (a warning where the user `named` the number)."""
    budget = round(keep * dataset.num_samples)
    clusters = max(1, min(wanted, budget // BUDGET_PER_CLUSTER))
    if clusters < wanted:
        (log.warning if named else log.info)(
            "%s: %d latent classes for a budget of %d samples of %s, not %d: each keeps at least one",
            method,
            clusters,
            budget,
            dataset.url,
            wanted,
        )
    return clusters


@dataclass(frozen=True)
class Sas(Selector):
    """SAS: each sample embedded by the proxy under `augmentations` random augmentations (`augment`,
    `nearstore.selection.augment`), μ the mean of their unit-norm embeddings, so that <μ_i, μ_j>
    is the expected similarity of an augmentation of i to one of j. Pass 1 finds `clusters`
    latent classes by streaming k-means of μ (mergeable: on Dask each partition clusters its
    shards, merged in a tree); pass 2 cuts each latent class into windows of `window` samples and
    keeps `keep` of each by SAS's greedy (`kernels.sas_greedy`: the largest Σ_j max(<μ_i, μ_j>, 0)
    less the similarity to those kept before). clusters: default the dataset's classes where it
    has labels (only their number is used), else 10; at most one per 4 samples of the budget (a
    latent class keeps at least one sample: 500 label ids kept 500 of 1,000 samples at keep 0.1).
    The proxy: the trainer's encoder pushed
    back (`ModelProxy`: the representation its last nn.Linear reads), or by default random
    features fitted on warm-up shards without labels. Weights 1; scores: each kept sample's mean
    expected similarity to its window.
    """

    method: ClassVar[str] = "sas"
    # What the windowed decisions ask of a method (`windows.Windowed`).
    factored: ClassVar[bool] = False
    draw_uninformed: ClassVar[bool] = False
    mute_suspects: ClassVar[bool] = False
    clusters: int | None = None
    augmentations: int = 4
    augment: str = "auto"
    window: int = 1024

    def __post_init__(self) -> None:
        if self.clusters is not None:
            check_range("clusters", self.clusters, 1, 1 << 16, integer=True)
        check_range("augmentations", self.augmentations, 1, 64, integer=True)
        check_augmentation(self.augment)
        check_window(self.window)

    def run(self, dataset: Dataset, keep: float, call: SelectCall) -> Selection:
        check_keep(keep)
        check_seed(call.seed)
        started = time.perf_counter()
        wanted = self.clusters or dataset.num_classes or DEFAULT_CLUSTERS
        clusters = latent_classes(self.method, wanted, keep, dataset, named=self.clusters is not None)
        scan = Scan.open(
            dataset, self.method, call.proxy, call.seed, call.device, labelled=False, cancelled=call.cancelled
        )
        options = dict(augmentations=self.augmentations, augment=self.augment, seed=call.seed, progress=call.progress)
        sketch, first = call.executor.map_reduce(
            scan, sas_clusters, StreamingKMeans.merge, clusters=clusters, **options
        )
        part, second = call.executor.map_reduce(
            scan, sas_pass, WindowedPart.merge, selector=self, centroids=sketch, keep=keep, **options
        )
        log.info("sas: %d latent classes of %s, sizes %s", len(sketch.centroids), dataset.url, sketch.counts.tolist())
        io = call.io(scan_io(started, [scan.reader], passes=2), first, second)
        params = call.params(keep, scan.proxy, {**self.params(), "clusters": clusters})
        return part.selection(dataset, self.method, params, io)

    def pick(self, windows: list[Window]) -> list[Pick]:
        picks = []
        for (means,), k in windows:
            order = sas_greedy(means, k)
            typical = (means @ means.T).clamp_(min=0).mean(1)
            picks.append((order.cpu().numpy(), np.ones(k, dtype=np.float32), typical[order].cpu().numpy()))
        return picks

    def window_for(self, keep: float) -> int:
        return self.window

    def at_once(self, window: int) -> int:
        return 1


def augmented_means(
    scan: Scan, shards: list[int], *, augmentations: int, augment: str, seed: int, progress: bool, desc: str
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(ids, μ) of every sample of `shards`: the mean of its augmented views' unit-norm embeddings
    (`augmented_views`: both passes, and any partition of the shards, see the same views)."""
    views_of = augmented_views(
        scan, shards, augmentations=augmentations, augment=augment, seed=seed, progress=progress, desc=desc
    )
    for ids, _, views in views_of:
        with model_errors_named(scan.proxy, scan.input_array, views[0], ids):
            features = [scan.proxy.features(v).float() for v in views]
        yield ids, expected_similarity(torch.stack(features, 1))


def sas_clusters(scan: Scan, shards: list[int], *, clusters: int, **options) -> StreamingKMeans:
    """Pass 1 over `shards`: the latent classes, streaming k-means of the samples' μ."""
    sketch = None
    for _, means in augmented_means(scan, shards, desc="sas pass 1/2", **options):
        if sketch is None:
            sketch = StreamingKMeans(clusters, means.shape[1], seed=options["seed"])
        sketch.update(means)
    return sketch


def sas_pass(
    scan: Scan, shards: list[int], *, selector: Sas, centroids: StreamingKMeans, keep: float, **options
) -> WindowedPart:
    """Pass 2 over `shards`: each sample to its latent class, each class's samples in windows,
    `keep` of each window kept by SAS's greedy."""

    def stream() -> Iterator[tuple[np.ndarray, dict[int, np.ndarray], torch.Tensor]]:
        for ids, means in augmented_means(scan, shards, desc="sas pass 2/2", **options):
            latent = centroids.assign(means).numpy()
            yield ids, {int(c): np.flatnonzero(latent == c) for c in np.unique(latent)}, means

    windows = ClassWindows(selector.window, lambda group: (keep, 1))
    return decide(stream(), windows, selector, len(centroids.centroids), options["seed"], cancelled=scan.cancelled)
