"""Augmentation-aware subsets (Liu & Mirzasoleiman, 2022): the samples that, augmented, carry the
fully augmented data's gradient, to augment (or train on) in place of all of it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from nearstore.checks import check_range
from nearstore.selection.augment import check_augmentation
from nearstore.selection.plan import check_keep, check_seed
from nearstore.selection.record import Selection
from nearstore.selection.selectors.base import SelectCall, Selector, check_window
from nearstore.selection.stages import Embedded, Scan, augmented_views, model_errors_named, scan_io
from nearstore.selection.windows import (
    ClassWindows,
    Pick,
    Window,
    WindowedPart,
    class_counts_before_shards,
    decide,
    factored_medoids,
    seen_before,
    sizes_of,
)
from nearstore.storage import Dataset, read_labels


@dataclass(frozen=True)
class AugmentAware(Selector):
    """Per window of one class's samples, CRAIG's weighted facility-location medoids of the
    samples' expected gradients under augmentation.

    Each sample i is augmented `augmentations` times (`augment`, `nearstore.selection.augment`)
    and scored by the proxy's last-layer gradient of each copy, g_ia = (p(x_ia) − onehot(y_i)) ⊗
    [h(x_ia), 1]; ḡ_i = (1/A) Σ_a g_ia is the alignment of its augmented Jacobian with its
    residuals, and Σ_i ḡ_i the window's under full augmentation. The k medoids S of the ḡ,

        S = argmax_|S|=k Σ_i max_{j∈S} (C − ‖ḡ_i − ḡ_j‖)   (`kernels.facility_location`),

    weighted by their clusters' sizes γ_j (× k / w, mean 1), bound the error of the augmented
    subset's gradient, ‖Σ_i ḡ_i − Σ_{j∈S} γ_j ḡ_j‖ ≤ Σ_i min_{j∈S} ‖ḡ_i − ḡ_j‖, as CRAIG's bound the
    plain one's. Weights as CRAIG's; scores NaN. A shard's augmentations are drawn from (seed, its
    first id). Reads every shard once; the proxy scores `augmentations` copies of each sample.

    The windows hold each sample's A factor pairs (r_ia, [h(x_ia), 1]: A · (C + H + 1) floats),
    and the medoids come from their Gram matrix (`facility_location_of_factors`): no ḡ (C · (H + 1))
    is formed (at 1,000 classes of 3 samples each, whole ḡ held for every class's last window took
    400 MB at H = 32, 3 GB at 256).

    window: samples a window holds. augmentations: draws per sample. augment: "signal", "image",
        "none" or "auto" (by the samples' shape), as SAS's.
    """

    method: ClassVar[str] = "augaware"
    # What the windowed decisions ask of a method (`windows.Windowed`): factors, no muting.
    factored: ClassVar[bool] = True
    draw_uninformed: ClassVar[bool] = False
    mute_suspects: ClassVar[bool] = False
    window: int = 1024
    augmentations: int = 4
    augment: str = "auto"

    def __post_init__(self) -> None:
        check_window(self.window)
        check_range("augmentations", self.augmentations, 1, 64, integer=True)
        check_augmentation(self.augment)

    def run(self, dataset: Dataset, keep: float, call: SelectCall) -> Selection:
        check_keep(keep)
        check_seed(call.seed)
        started = time.perf_counter()
        scan = Scan.open(dataset, self.method, call.proxy, call.seed, call.device, cancelled=call.cancelled)
        before, readers = None, [scan.reader]
        if call.executor.name != "local":  # the labels first: each partition's budgets go on from those before it
            labels, labels_reader = read_labels(dataset, "budgets by class")
            readers.append(labels_reader)
            before = class_counts_before_shards(labels, dataset.shard_samples, scan.proxy.num_classes)
        options = dict(selector=self, keep=keep, before=before, seed=call.seed, progress=call.progress)
        part, reads = call.executor.map_reduce(scan, augmented_pass, WindowedPart.merge, **options)
        io = call.io(scan_io(started, readers), reads)
        return part.selection(dataset, self.method, call.params(keep, scan.proxy, self.params()), io)

    def pick(self, windows: list[Window]) -> list[Pick]:
        return factored_medoids(windows)

    def window_for(self, keep: float) -> int:
        return self.window

    def at_once(self, window: int) -> int:
        return 1


def augmented_factors(
    scan: Scan, shards: list[int], *, augmentations: int, augment: str, seed: int, progress: bool
) -> Iterator[Embedded]:
    """(ids, {class: rows}, (r, x)) of every sample of `shards`: the factors of the proxy's
    last-layer gradients of its A augmented copies (`augmented_views`), residuals r (n, A, C) and
    inputs x (n, A, H + 1), of mean gradient ḡ_i = (1/A) Σ_a r_ia ⊗ x_ia (`gradients_of_factors`)."""
    views_of = augmented_views(
        scan, shards, augmentations=augmentations, augment=augment, seed=seed, progress=progress, desc="augaware"
    )
    for ids, batch, views in views_of:
        y = batch[scan.labels]
        with model_errors_named(scan.proxy, scan.input_array, views[0], ids):
            residuals, inputs = zip(*(scan.proxy.gradient_factors(view, y) for view in views))
        yield (
            ids,
            {int(c): np.flatnonzero(y == c) for c in np.unique(y)},
            (torch.stack(residuals, 1), torch.stack(inputs, 1)),
        )


def augmented_pass(
    scan: Scan,
    shards: list[int],
    *,
    selector: AugmentAware,
    keep: float,
    before: np.ndarray | None,
    seed: int,
    progress: bool,
) -> WindowedPart:
    """The pass over `shards`: the factors of every sample's augmented gradients, each class's
    samples in windows, `keep` of each window kept as the weighted medoids of their mean; before:
    `class_counts_before_shards` (None: from the first shard)."""
    stream = augmented_factors(
        scan, shards, augmentations=selector.augmentations, augment=selector.augment, seed=seed, progress=progress
    )
    windows = ClassWindows(selector.window, lambda group: (keep, 1), seen_before(before, shards), sizes_of(before))
    return decide(stream, windows, selector, scan.proxy.num_classes, seed, cancelled=scan.cancelled)
