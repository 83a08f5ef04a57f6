"""Planning a selection: pure, seeded functions of sizes, labels and seeds, no I/O. What a selector
reads and decides follows from them: each class's budget, the windows a class's samples are cut
into and each window's share of the budget, the pools a round scores, the random draws."""

from __future__ import annotations

import math

import numpy as np

from nearstore.errors import ParameterError
from nearstore.storage.dataset import check_ids


def check_keep(keep: float) -> None:
    if not 0 < keep <= 1:
        raise ParameterError(f"keep must be in (0, 1], got {keep}")


def class_budget(size: int, keep: float) -> int:
    """What a class of `size` samples keeps: round(keep · size), at least one sample."""
    return max(1, round(keep * size))


def share(total: float, of: int, start: int, end: int) -> int:
    """The budget of items [start, end) of `of` items when all of them keep `total`: the difference
    of the rounded running totals, round(total · end / of) − round(total · start / of), so that
    consecutive parts add up to round(total) exactly."""
    return round(total * end / of) - round(total * start / of)


def window_bounds(size: int, window: int) -> list[tuple[int, int]]:
    """The windows [start, end) that `size` consecutive samples are cut into: `window` samples
    each, the last 1 to `window` (never empty)."""
    if window < 1:
        raise ParameterError(f"window must be >= 1, got {window}")
    return [(start, min(start + window, size)) for start in range(0, size, window)]


def class_pools(
    labels: np.ndarray,
    keep: float,
    pool: float,
    seed: int,
    *,
    whole: bool = False,
    previous: np.ndarray | None = None,
    where: str = "the dataset",
) -> tuple[dict[int, int], dict[int, np.ndarray]]:
    """Each class's budget (`class_budget`) and pool: min(n_c, ⌈pool × budget⌉) of its samples,
    sorted (whole: every sample of the class), the class's `previous` ids first (a random share of
    them where they alone overfill the pool), then random others. `where` names the dataset."""
    if pool < 1:
        raise ParameterError(f"pool must be >= 1 (a multiple of the budget), got {pool}")
    carried = np.zeros(len(labels), dtype=bool)
    if previous is not None:
        previous = np.asarray(previous)
        check_ids(previous, len(labels), where, what="previous id")
        carried[previous] = True
    rng = np.random.default_rng(seed)
    budgets, pools = {}, {}
    for c in np.unique(labels).tolist():
        members = np.flatnonzero(labels == c)
        budgets[c] = class_budget(len(members), keep)
        size = len(members) if whole else min(len(members), math.ceil(pool * budgets[c]))
        kept, others = members[carried[members]], members[~carried[members]]
        if len(kept) > size:
            kept = rng.choice(kept, size, replace=False)
        pools[c] = np.sort(np.concatenate([kept, rng.choice(others, size - len(kept), replace=False)]))
    return budgets, pools


def uniform_draw(num_samples: int, keep: float, seed: int) -> np.ndarray:
    """round(keep · N) sample ids (at least one), uniformly at random, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_samples, class_budget(num_samples, keep), replace=False))


def class_balanced_draw(labels: np.ndarray, keep: float, seed: int) -> np.ndarray:
    """`class_budget` samples of each class, uniformly at random within it, sorted."""
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(members, class_budget(len(members), keep), replace=False)
        for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    return np.sort(np.concatenate(picks))
