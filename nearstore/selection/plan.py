"""Planning a selection: pure, seeded functions of sizes, labels and seeds, no I/O. What a selector
reads and decides follows from them: each class's budget, the windows a class's samples are cut
into and each window's share of the budget, the pools a round scores, the random draws."""

from __future__ import annotations

import math
import numbers

import numpy as np

from nearstore.checks import check_range
from nearstore.errors import ParameterError
from nearstore.selection.record import sample_ids

SEEDS = 1 << 64  # torch's Generator takes seeds below 2^64, numpy's any integer >= 0


def check_seed(seed: int) -> None:
    """A round's seed: an integer that numpy's and torch's generators both take."""
    check_range("seed", seed, 0, SEEDS, integer=True, open_high=True)


def check_keep(keep: float) -> None:
    """keep is a fraction of the samples, in (0, 1]: a number, not a bool or a string."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
        raise ParameterError(f"keep must be in (0, 1], got {keep!r}")


def class_budget(size: int, keep: float) -> int:
    """What a class of `size` samples keeps: round(keep · size), at least one sample."""
    return max(1, round(keep * size))


def class_sizes(labels: np.ndarray) -> dict[int, int]:
    """Each class's number of samples, {class: n_c}, for the classes that have any."""
    classes, sizes = np.unique(labels, return_counts=True)
    return dict(zip(classes.tolist(), sizes.tolist()))


def class_budgets(sizes: dict[int, int], keep: float, power: float = 1.0) -> dict[int, int]:
    """Each class's budget when all keep round(keep · N) together. power 1: proportional, each
    class `class_budget`. Below 1, a class's budget grows as n_c^power, capped at n_c (what a
    capped class cannot take goes to the others), rounded by largest remainder, at least one each:
    the long tail gets more than its share (0.5: square-root sampling; 0: equal budgets)."""
    if not 0 <= power <= 1:
        raise ParameterError(f"power must be in [0, 1], got {power}")
    if power == 1:
        return {c: class_budget(n, keep) for c, n in sizes.items()}
    total = class_budget(sum(sizes.values()), keep)
    raw, free = {}, dict(sizes)
    while free:  # water-filling: classes whose share reaches their size take all of it
        scale = (total - sum(raw.values())) / sum(n**power for n in free.values())
        full = {c: n for c, n in free.items() if scale * n**power >= n}
        if not full:
            raw.update({c: scale * n**power for c, n in free.items()})
            break
        raw.update(full)
        free = {c: n for c, n in free.items() if c not in full}
    budgets = {c: math.floor(r) for c, r in raw.items()}
    for c in sorted(raw, key=lambda c: budgets[c] - raw[c])[: total - sum(budgets.values())]:
        budgets[c] += 1
    return {c: max(1, budgets[c]) for c in sizes}  # in the order of `sizes`


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
    power: float = 1.0,
) -> tuple[dict[int, int], dict[int, np.ndarray]]:
    """Each class's budget (`class_budgets` with `power`) and pool: min(n_c, ⌈pool × budget⌉) of its samples,
    sorted (whole: every sample of the class), the class's `previous` ids first (a random share of
    them where they alone overfill the pool), then random others. `where` names the dataset."""
    if pool < 1:
        raise ParameterError(f"pool must be >= 1 (a multiple of the budget), got {pool}")
    carried = np.zeros(len(labels), dtype=bool)
    if previous is not None:
        carried[sample_ids(previous, where, num_samples=len(labels), what="previous id")] = True
    rng = np.random.default_rng(seed)
    budgets = class_budgets(class_sizes(labels), keep, power)
    pools = {}
    for c in budgets:
        members = np.flatnonzero(labels == c)
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
