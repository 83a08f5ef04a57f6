"""CRAIG: per window of one class's samples, the facility-location medoids of their gradients,
weighted by cluster size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from nearstore.selection.selectors.base import WindowedSelector, check_window
from nearstore.selection.windows import Pick, Window, medoids


@dataclass(frozen=True)
class Craig(WindowedSelector):
    """CRAIG: per window of one class's samples, the k medoids of their gradient embeddings by
    facility location (lazy greedy), each weighted by the size of its cluster.

    Weights are cluster sizes × k / w, so they average 1: a weighted loss keeps its scale, and the
    weighted subset's gradient approximates the window's full gradient.
    """

    method: ClassVar[str] = "craig"
    window: int = 1024

    def __post_init__(self) -> None:
        check_window(self.window)

    def window_for(self, keep: float) -> int:
        return self.window

    def pick(self, windows: list[Window]) -> list[Pick]:
        return [(*medoids(embeddings, k), np.full(k, np.nan, dtype=np.float32)) for (embeddings,), k in windows]
