"""CRAIG: per window of one class's samples, the facility-location medoids of their gradients,
weighted by cluster size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nearstore.selection.selectors.base import WindowedSelector, check_window
from nearstore.selection.windows import Pick, Window, factored_medoids


@dataclass(frozen=True)
class Craig(WindowedSelector):
    """CRAIG: per window of one class's samples, the k medoids of their gradient embeddings by
    facility location (lazy greedy), each weighted by the size of its cluster.

    Weights are cluster sizes × k / w, so they average 1: a weighted loss keeps its scale, and the
    weighted subset's gradient approximates the window's full gradient.

    The windows hold the gradients' factors (C + H + 1 floats a sample), and the medoids come from
    the distances their Gram matrix gives (`facility_location_of_factors`): no C · (H + 1) gradient
    is formed (at 1,000 classes of a few samples each, whole gradients held for every class's last
    window took 4 GB; a window of 1,024 at 1,000 classes and H = 256 is 1 GB).
    """

    method: ClassVar[str] = "craig"
    factored: ClassVar[bool] = True  # a window's gradients are formed when it is decided
    window: int = 1024

    def __post_init__(self) -> None:
        check_window(self.window)

    def window_for(self, keep: float) -> int:
        return self.window

    def pick(self, windows: list[Window]) -> list[Pick]:
        return factored_medoids(windows)
