"""AdaCore: per window of one class's samples, CRAIG's weighted facility location on gradients
preconditioned by the last layer's curvature (Pooladzandi et al., 2022)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from nearstore.checks import check_range
from nearstore.errors import DatasetError
from nearstore.selection.proxies import Proxy, RandomFeatureProxy
from nearstore.selection.selectors.base import WindowedSelector, check_pool, check_window
from nearstore.selection.windows import Pick, Window, medoids

MAX_DAMPING = 1e6  # of the curvature, times its mean: past it the picks are CRAIG's


@dataclass(frozen=True)
class AdaCore(WindowedSelector):
    """AdaCore: per window of one class's samples, the k medoids by facility location of the
    gradients preconditioned by the curvature of the loss, each weighted by its cluster's size.

    For softmax cross-entropy the Hessian with respect to the logits is diag(p) − ppᵀ, so that
    of the last layer z = W [h, 1] has the diagonal p_c (1 − p_c) x_j² for weight (c, j), x = [h, 1]
    (`curvature`). Each sample's gradient g = (p − onehot(y)) ⊗ x is divided by the window's mean
    curvature, damped by `damping` times its mean: g̃ = g / (H̄ + damping · mean(H̄)), a step of
    Newton's method for the diagonal; CRAIG's medoids of g̃ approximate the window's
    preconditioned gradient, weights cluster sizes × k / w (mean 1).

    As the paper keeps an exponential average of the curvature over training, a round hands the
    next its running average A (`Selection.carry["curvature"]`, kept by the loader or the server
    with the round): a window is preconditioned by average · A + (1 − average) · its own H̄, and
    the round hands on average · A + (1 − average) · its mean H̄ over every sample it scored. A
    round scored by another kind of proxy (the model-free one of round 0, then the trainer's
    model) starts the average afresh: its features are other ones.

    window: samples a window holds. damping: of the curvature, times its mean (at most
        MAX_DAMPING = 1e6, where the curvature no longer counts: CRAIG's picks). average: the
        running average's weight of the rounds before (0: each round its own curvature). pool:
        read and window only a random pool of pool × the budget per class (as GRAFT's
        re-selection rounds do); None: every sample.
    """

    method: ClassVar[str] = "adacore"
    factored: ClassVar[bool] = True  # the curvature needs p, which the residuals give with x
    window: int = 1024
    damping: float = 0.1
    average: float = 0.9
    pool: float | None = None
    # A round's state, not the method's options (`resumed`): the kind of proxy scoring it, and the
    # running average of the curvature the round before handed on, (C, H + 1), where it is of that kind.
    _proxy: ClassVar[str] = RandomFeatureProxy.__name__
    _prior: ClassVar[np.ndarray | None] = None

    def __post_init__(self) -> None:
        check_window(self.window)
        # past MAX_DAMPING the curvature is drowned (AdaCore is CRAIG), and past float32's range the
        # denominator overflows, every preconditioned gradient 0
        check_range("damping", self.damping, 0, MAX_DAMPING, open_low=True)
        check_range("average", self.average, 0, 1, open_high=True)
        check_pool(self.pool)

    def scan_options(self, previous: np.ndarray | None) -> dict[str, Any]:
        return {"pool": self.pool}

    def window_for(self, keep: float) -> int:
        return self.window

    def resumed(self, carried: Mapping[str, np.ndarray] | None, proxy: Proxy | None) -> AdaCore:
        resumed, kind = copy.copy(self), type(proxy).__name__ if proxy is not None else RandomFeatureProxy.__name__
        object.__setattr__(resumed, "_proxy", kind)
        carried = carried or {}
        if "curvature" in carried and str(carried.get("proxy")) == kind and self.average > 0:
            prior = np.asarray(carried["curvature"], dtype=np.float32)
            if prior.ndim != 2 or not np.all(np.isfinite(prior)) or np.any(prior < 0):
                raise DatasetError(
                    f"adacore: the curvature handed on by the round before is not a (classes, features) array "
                    f"of finite values >= 0 (shape {prior.shape}): not a selection of adacore's"
                )
            object.__setattr__(resumed, "_prior", prior)
        return resumed

    def tally(self, parts: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        residual, inputs = parts
        summed = curvature(residual, inputs) * len(residual)
        return {"curvature": summed.double().cpu().numpy(), "samples": np.array(len(residual))}

    def carry(self, totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not totals.get("samples"):
            return {}
        mean = totals["curvature"] / totals["samples"]
        prior = self._prior_of_shape(mean.shape)
        average = mean if prior is None else self.average * prior + (1 - self.average) * mean
        return {"curvature": average.astype(np.float32), "proxy": np.array(self._proxy)}

    def pick(self, windows: list[Window]) -> list[Pick]:
        picks = []
        for (residual, inputs), k in windows:
            diagonal = curvature(residual, inputs)
            prior = self._prior_of_shape(tuple(diagonal.shape))
            if prior is not None:
                diagonal = self.average * torch.from_numpy(prior).to(diagonal) + (1 - self.average) * diagonal
            rows, weights = medoids(preconditioned(residual, inputs, diagonal, self.damping), k)
            picks.append((rows, weights, np.full(k, np.nan, dtype=np.float32)))
        return picks

    def _prior_of_shape(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """The running average handed on, where it is of this round's features (else None: afresh)."""
        return self._prior if self._prior is not None and self._prior.shape == tuple(shape) else None


def curvature(residual: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The mean over samples of the diagonal of the last layer's Hessian, (C, H + 1), from the
    gradients' factors r = p − onehot(y) (n, C) and x (n, H + 1): p_c (1 − p_c) x_j², p being r
    where r ≥ 0 and r + 1 at the label (the one entry below 0, unless p_y = 1)."""
    p = torch.where(residual >= 0, residual, residual + 1)
    return (p * (1 - p)).mT @ inputs.square() / len(residual)


def preconditioned(
    residual: torch.Tensor, inputs: torch.Tensor, diagonal: torch.Tensor, damping: float
) -> torch.Tensor:
    """Each sample's gradient r ⊗ x divided by the curvature's diagonal (C, H + 1), damped by
    `damping` times its mean, flattened: (n, C · (H + 1)). A model certain of every sample it saw
    (p = 0 or 1 exactly in float32) has no curvature at all: its gradients are taken as they are."""
    mean = diagonal.mean()
    if not mean > 0:
        return (residual[:, :, None] * inputs[:, None, :]).flatten(1)
    return (residual[:, :, None] * inputs[:, None, :] / (diagonal + damping * mean)).flatten(1)
