"""AdaCore: per window of one class's samples, CRAIG's weighted facility location on gradients
preconditioned by the last layer's curvature (Pooladzandi et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from nearstore.checks import check_range
from nearstore.selection.selectors.base import WindowedSelector, check_pool, check_window
from nearstore.selection.windows import Pick, Window, medoids


@dataclass(frozen=True)
class AdaCore(WindowedSelector):
    """AdaCore: per window of one class's samples, the k medoids by facility location of the
    gradients preconditioned by the curvature of the loss, each weighted by its cluster's size.

    For softmax cross-entropy the Hessian with respect to the logits is diag(p) − ppᵀ, so that
    of the last layer z = W [h, 1] has the diagonal p_c (1 − p_c) x_j² for weight (c, j), x = [h, 1]
    (`curvature`). Each sample's gradient g = (p − onehot(y)) ⊗ x is divided by the window's mean
    curvature, damped by `damping` times its mean: g̃ = g / (H̄ + damping · mean(H̄)), a step of
    Newton's method for the diagonal; CRAIG's medoids of g̃ approximate the window's
    preconditioned gradient, weights cluster sizes × k / w (mean 1). The paper keeps an
    exponential average of the curvature over training; here it is estimated afresh in each
    window of each round, from the proxy's p.

    window: samples a window holds. pool: read and window only a random pool of pool × the
        budget per class (as GRAFT's re-selection rounds do); None: every sample.
    """

    method: ClassVar[str] = "adacore"
    factored: ClassVar[bool] = True  # the curvature needs p, which the residuals give with x
    window: int = 1024
    damping: float = 0.1
    pool: float | None = None

    def __post_init__(self) -> None:
        check_window(self.window)
        check_range("damping", self.damping, 0, float("inf"), open_low=True, open_high=True)
        check_pool(self.pool)

    def scan_options(self, previous: np.ndarray | None) -> dict[str, Any]:
        return {"pool": self.pool}

    def window_for(self, keep: float) -> int:
        return self.window

    def pick(self, windows: list[Window]) -> list[Pick]:
        picks = []
        for (residual, inputs), k in windows:
            rows, weights = medoids(preconditioned(residual, inputs, self.damping), k)
            picks.append((rows, weights, np.full(k, np.nan, dtype=np.float32)))
        return picks


def curvature(residual: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The mean over samples of the diagonal of the last layer's Hessian, (C, H + 1), from the
    gradients' factors r = p − onehot(y) (n, C) and x (n, H + 1): p_c (1 − p_c) x_j², p being r
    where r ≥ 0 and r + 1 at the label (the one entry below 0, unless p_y = 1)."""
    p = torch.where(residual >= 0, residual, residual + 1)
    return (p * (1 - p)).mT @ inputs.square() / len(residual)


def preconditioned(residual: torch.Tensor, inputs: torch.Tensor, damping: float) -> torch.Tensor:
    """Each sample's gradient r ⊗ x divided by the damped mean curvature, flattened: (n, C · (H + 1))."""
    diagonal = curvature(residual, inputs)
    diagonal = diagonal + damping * diagonal.mean().clamp_min(torch.finfo(diagonal.dtype).tiny)
    return (residual[:, :, None] * inputs[:, None, :] / diagonal).flatten(1)
