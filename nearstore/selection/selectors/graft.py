"""GRAFT: per window of one class's samples, Fast MaxVol on the window's low-rank gradients, from
their Gram matrix; with `tolerance`, the fewest picks that approximate the window's mean gradient."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from kernels import maxvol, pivoted_cholesky
from nearstore.checks import check_flag, check_range
from nearstore.selection.policy import DRAW_BELOW, MODEL_FREE_NORM_POWER, NORM_POWER, default_window
from nearstore.selection.proxies import Proxy
from nearstore.selection.selectors.base import (
    MAX_GRAM_ENTRIES,
    WindowedSelector,
    check_pool,
    check_window,
)
from nearstore.selection.windows import Pick, Window, unscored
from nearstore.storage import DEFAULT_READS, Coalescing


@dataclass(frozen=True)
class Graft(WindowedSelector):
    """GRAFT: per window of one class's samples, Fast MaxVol on the window's low-rank gradients.

    From the window's Gram matrix K = G Gᵀ (w × w, taken from the gradients' two factors, so the
    w × D gradients are never formed), greedy pivoting picks the k gradients farthest from each
    other's span, and MaxVol swaps on the rank-k features they give (K ≈ L Lᵀ) refine them to a
    tol-dominant set (kernels.maxvol): a diverse subset covering the window's dominant gradient
    subspace. With `tolerance`, k is the smallest size (up to the budget) whose greedy picks
    approximate the window's mean gradient ḡ: ‖ḡ − P_S ḡ‖ ≤ tolerance · ‖ḡ‖, P_S the projection
    on the picked gradients' span. Windows are decided as one batch, as many at a time as hold
    `gram_entries` Gram entries (16 MB in float32: 256 windows of 128).

    window: samples a window holds; None: `policy.default_window(keep)`, 128, or 64 above a
        third of the data.
    pool: only a random pool of pool × the budget per class is read and windowed (None: every
        sample): what re-selection rounds run (`default_reselect`), which keeps a round cheap and
        mixes chance into what MaxVol would otherwise fix on (the hardest, largest gradients).
        Pools are read coalesced as `pool_reads` (whole shards for small samples).
    pool_previous: a re-selection round's pool holds the last round's picks (`previous`), the
        rest drawn fresh, so MaxVol keeps those still informative under the new proxy. Off by
        default: with wrong labels in the data it carries the picks' wrong labels from round to
        round (20% noise, 10%: 71.0% with it, 92.4% without); on clean data it was worth about
        half a point a seed.
    norm_power: each gradient enters MaxVol as g · ‖g‖^(norm_power − 1): 1 is GRAFT's raw
        gradients, whose volume favours the largest (the most confidently wrong samples); 0.5
        tempers that; 0 weighs directions alone. None: `policy.NORM_POWER`, 0.5, with the trainer's
        model; `policy.MODEL_FREE_NORM_POWER`, 0.25, with the model-free proxy (round 0), whose
        largest gradients are its random features' outliers more than a class's hard samples.
    mute_suspects: samples whose label the proxy contradicts with confidence (confident learning
        with a floor that follows the proxy's confidence, odds against the given label, and only
        toward a class the proxy tells apart, `stages.suspects`) enter MaxVol with zero gradients,
        so it does not take the wrong labels its volume favours, and are reported
        (`Selection.suspects`).
    draw_uninformed: a window scored by a proxy that knows nothing of the labels yet (its mean
        top-class probability so far under 2 / C, as a trainer's model after a few steps on a
        small subset) keeps a seeded random draw of its samples that are not muted, not MaxVol's
        picks: such a proxy's gradients are its random features, and their volume favours outliers.
        (digits at 10%, 5 seeds: 82.3% against 77.6% without, a fresh class-balanced draw 82.3%;
        on MNIST-1D it fires only at 5% with a long tail.) Needs factored gradients.
    draw_below: with the model-free proxy (round 0: no `proxy` given), a class whose budget is under
        this many samples keeps a seeded draw of its samples that are not muted, not MaxVol's picks
        (`policy.DRAW_BELOW`, 128: MaxVol over that proxy takes a class's outliers, which pays only
        once a class has enough picks to cover its bulk too; 0 with `tolerance`, which sizes
        MaxVol's picks and not a draw). 0: MaxVol at every budget.
    typical: with the model-free proxy (round 0), MaxVol picks among each class's typical half:
        a sample whose p(label | x) is under its class's median on the proxy's held-out warm-up
        enters it muted (zero gradient). None: where that proxy is right on at least
        `policy.TRUSTED_PROXY` of its held-out warm-up (`windows.trust`), as MaxVol over it takes a
        class's least typical samples, which on small clean data teach a model least; True: always;
        False: never. Classes drawn (`draw_below`) and later rounds (a trainer's model) are left alone.
    recheck_suspects: round 0 hands on the model-free proxy's suspects in its `Selection.carry`, and
        a later round (given it back as `carried`, as a loader's and a server's rounds are) mutes
        those its proxy puts in the class round 0 named (`stages.confirmed`), and hands them on: a
        trainer's model a few epochs old is often right about a sample's class long before it is
        sure enough of it to judge a label alone (digits with 40% noise at 5%: its rounds kept 35%
        wrong labels, the base rate, and 23% with this, +4.1 points;
        docs/benchmarks.md#round-0s-suspects-rechecked-by-later-rounds-2026-12-06-stop-45-the-default-since).
    budget_power: a class's budget grows as n_c^budget_power (`plan.class_budgets`, the labels
        read first): 1 keeps each class in proportion, as a uniform draw would; below 1 a long
        tail's classes get more than their share at the head's expense (the same budgets where
        classes are equal in size); 0, equal budgets. 0.25: on long tails at 10%, 10 seeds, +3.1 to
        +11.9 points of (balanced) accuracy over square-root budgets (0.5), which trailed random's
        spread on digits' ratio of 100; a test set as long-tailed as the training split gives up
        to 3.4 of them back (docs/benchmarks.md#class-budgets-as-n_c025-2026-12-07-stop-46-the-default-since).
    The defaults are the default path (with default_reselect's pools), robust to wrong labels and
    long tails at a small price on clean data (docs/benchmarks.md#label-noise-and-long-tails).
    MaxVol on raw gradients over classes in proportion, as the paper has it, is norm_power=1,
    budget_power=1, mute_suspects=False.
    """

    method: ClassVar[str] = "graft"
    window: int | None = None
    tolerance: float | None = None
    pool: float | None = None
    pool_previous: bool = False
    norm_power: float | None = None
    # Fewer, larger batches: MaxVol's steps are ~20 small tensor ops each, whose overhead a batch
    # shares (256 windows of 128 at once: a round 10% faster than 64). The picks do not change.
    gram_entries: int = 1 << 22
    pool_reads: Coalescing = DEFAULT_READS
    mute_suspects: bool = True
    budget_power: float = 0.25
    draw_uninformed: bool = True
    draw_below: int | None = None
    typical: bool | None = None
    recheck_suspects: bool = True

    def __post_init__(self) -> None:
        check_window(self.window, optional=True)
        if self.tolerance is not None:  # at 1 one pick always does: ‖ḡ − P_S ḡ‖ ≤ ‖ḡ‖
            check_range("tolerance", self.tolerance, 0, 1, open_low=True)
        check_pool(self.pool)
        check_flag("pool_previous", self.pool_previous)
        # past 1, the largest gradients weigh more than GRAFT's own; ‖g‖^(p − 1) soon overflows
        if self.norm_power is not None:
            check_range("norm_power", self.norm_power, 0, 1)
        check_range("gram_entries", self.gram_entries, 1, MAX_GRAM_ENTRIES, integer=True)
        object.__setattr__(self, "pool_reads", Coalescing.of(self.pool_reads, "pool_reads"))
        check_flag("mute_suspects", self.mute_suspects)
        check_range("budget_power", self.budget_power, 0, 1)
        check_flag("draw_uninformed", self.draw_uninformed)
        if self.draw_below is None:  # a drawn class keeps its whole budget: tolerance would not apply there
            object.__setattr__(self, "draw_below", DRAW_BELOW if self.tolerance is None else 0)
        check_range("draw_below", self.draw_below, 0, integer=True)
        if self.typical is not None:
            check_flag("typical", self.typical)
        check_flag("recheck_suspects", self.recheck_suspects)

    factored: ClassVar[bool] = True  # MaxVol works on Gram matrices, which the factors give

    def scan_options(self, previous: np.ndarray | None) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "previous": previous if self.pool is not None and self.pool_previous else None,  # what the pool holds
            "pool_reads": self.pool_reads,
            "budget_power": self.budget_power,
        }

    def resumed(self, carried: Mapping[str, np.ndarray] | None, proxy: Proxy | None) -> Graft:
        """Itself with its norm_power settled by the proxy (None: the model-free one)."""
        if self.norm_power is not None:
            return self
        return replace(self, norm_power=MODEL_FREE_NORM_POWER if proxy is None else NORM_POWER)

    def window_for(self, keep: float) -> int:
        return self.window if self.window is not None else default_window(keep)

    def at_once(self, window: int) -> int:
        return max(1, self.gram_entries // window**2)

    def pick(self, windows: list[Window]) -> list[Pick]:
        residual, inputs = _stack(windows)
        budgets = [k for _, k in windows]
        if self.norm_power != 1:  # ‖r ⊗ x‖ = ‖r‖ ‖x‖; zero gradients (and padding rows) stay zero
            norms = residual.norm(dim=2) * inputs.norm(dim=2)
            residual = residual * torch.where(norms > 0, norms.pow(self.norm_power - 1), 0)[..., None]
        gram = _gram(residual, inputs)
        if self.tolerance is not None:
            budgets = self._sizes(gram, residual, inputs, [len(f[0]) for f, _ in windows], budgets)
        # A narrow model leaves MaxVol nothing to choose by past its gradients' rank, at most
        # (C − 1)(H + 1) (softmax residuals sum to 0): it picks that many, the rest fills (`_filled`).
        rank = (residual.shape[2] - 1) * inputs.shape[2]
        picks = maxvol(gram, [min(k, rank) for k in budgets])
        live = (residual != 0).any(2).cpu().numpy()
        chosen = []
        for i, (rows, (f, _), k) in enumerate(zip(picks, windows, budgets)):
            rows = rows.cpu().numpy()
            # Past the rank a window's gradients hold in floats (a few live directions), pivoting
            # takes the lowest free rows, muted ones among them: those give way to live rows
            # (a muted row is taken only where no live one is left).
            taken = live[i, rows]
            chosen.append(
                unscored(rows if len(rows) == k and taken.all() else _filled(rows[taken], live[i, : len(f[0])], k))
            )
        return chosen

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

    def padded(part: int) -> torch.Tensor:
        rows = [factors[part] for factors, _ in windows]
        if len({len(r) for r in rows}) == 1:  # full windows (all but a class's last): no zeros to write first
            return torch.stack(rows)
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)

    return padded(0), padded(1)


def _filled(rows: np.ndarray, live: np.ndarray, k: int) -> np.ndarray:
    """MaxVol's `rows` of a window and, up to `k`, the window's lowest other rows, those with a
    gradient (`live`) before muted ones, as MaxVol fills a window whose rank is spent."""
    rest = np.setdiff1d(np.arange(len(live)), rows)
    rest = np.concatenate([rest[live[rest]], rest[~live[rest]]])
    return np.concatenate([rows, rest[: k - len(rows)]])


def _gram(residual: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Their Gram matrices, g_i · g_j = (r_i · r_j)(x_i · x_j): (R Rᵀ) ∘ (X Xᵀ), (b, w, w), in the
    factors' precision (float32: 2x faster than float64, and the kernel resolves ranks to it)."""
    # in place: a batch's Gram matrices are large (16 MB), and a fresh one is faulted in afresh
    return (inputs @ inputs.mT).mul_(residual @ residual.mT)
