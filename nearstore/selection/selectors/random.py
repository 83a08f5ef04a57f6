"""Random subsets, uniform or per class: the baseline every method must beat."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from nearstore.checks import check_flag
from nearstore.selection.plan import check_keep, check_seed, class_balanced_draw, uniform_draw
from nearstore.selection.record import Selection
from nearstore.selection.selectors.base import SelectCall, Selector
from nearstore.selection.stages import scan_io
from nearstore.storage import Dataset, open_dataset, read_labels


def random_select(dataset: Dataset | str, keep: float, *, seed: int = 0, class_balanced: bool = False) -> Selection:
    """A uniformly random round(keep · N) samples (per class when class_balanced): the baseline.
    dataset: a Dataset, or a URL `open_dataset` opens."""
    check_keep(keep)
    check_seed(seed)
    if isinstance(dataset, str):
        dataset = open_dataset(dataset)
    started = time.perf_counter()
    if not class_balanced:
        ids = uniform_draw(dataset.num_samples, keep, seed)
        io = {"bytes": 0, "requests": 0, "seconds": time.perf_counter() - started, "passes": 0}
    else:
        labels, reader = read_labels(dataset, "class-balanced selection")
        ids = class_balanced_draw(labels, keep, seed)
        io = scan_io(started, [reader])
    params = {"keep": keep, "seed": seed, "class_balanced": class_balanced}
    return Selection.of(dataset, ids, method="random", params=params, io=io)


@dataclass(frozen=True)
class Random(Selector):
    """Uniformly random samples (per class when class_balanced): the baseline to beat."""

    method: ClassVar[str] = "random"
    class_balanced: bool = False

    def __post_init__(self) -> None:
        check_flag("class_balanced", self.class_balanced)

    def run(self, dataset: Dataset, keep: float, call: SelectCall) -> Selection:
        return random_select(dataset, keep, seed=call.seed, class_balanced=self.class_balanced)
