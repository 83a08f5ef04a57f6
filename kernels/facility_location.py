"""CRAIG's facility location: k medoids of a block of points by lazy greedy, weighted by cluster size."""

from __future__ import annotations

import heapq
from typing import Literal

import torch

from kernels.floats import all_finite, flush_subnormal, rows_scaled

_METRICS = ("euclidean", "cosine")
# Stale bounds re-evaluated together, in one (16, n) op: at n = 2000, k = 200 the greedy takes
# 0.12 s so, 0.61 s one at a time and 0.13 s 64 at a time (CPU, one thread).
_REFRESH = 16


def _distances(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Pairwise distances (n, n), exactly symmetric, built in place in the n × n buffer of the Gram matrix."""
    tiny = torch.finfo(x.dtype).tiny
    if metric == "euclidean":
        # Greedy picks the same points after a shift or scale of all of them. Centred and scaled,
        # ‖x‖² − 2 x·y + ‖y‖² keeps its accuracy when the points share a large offset, and stays finite.
        x = x - x.mean(0)
        x = flush_subnormal(x / x.abs().max().clamp_min(tiny))
        dist = _euclidean(x @ x.T)
    else:
        x = rows_scaled(x)  # first: a norm of rows near 1e160 is inf
        unit = flush_subnormal(x / x.norm(dim=1, keepdim=True).clamp_min(tiny))  # a zero row stays 0
        dist = (unit @ unit.T).neg_().add_(1).clamp_(0, 2)
    return _symmetric(dist)


def _euclidean(gram: torch.Tensor) -> torch.Tensor:
    """‖x_i − x_j‖ = √(‖x_i‖² − 2 x_i·x_j + ‖x_j‖²) from the Gram matrix, in its buffer."""
    sq = gram.diagonal().clone()
    return gram.mul_(-2).add_(sq[:, None]).add_(sq[None, :]).clamp_(min=0).sqrt_()


def _symmetric(dist: torch.Tensor) -> torch.Tensor:
    """dist with its upper triangle copied down, in blocks, and a zero diagonal: a matmul need not
    round x_i·x_j and x_j·x_i alike, so d(i, j) = d(j, i) exactly and symmetric configurations tie exactly."""
    n = dist.shape[0]
    for start in range(0, n, 256):
        rows = slice(start, start + 256)
        dist[rows, :start] = dist[:start, rows].T
        block = dist[rows, rows]
        block.copy_(block.triu() + block.triu(1).T)
    return dist.fill_diagonal_(0)


def _factor_gram(residual: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the gradients ḡ_i = (1/A) Σ_a r_ia ⊗ x_ia from their factors (u, A, C) and
    (u, A, H): ḡ_i·ḡ_j = (1/A²) Σ_a Σ_b (r_ia·r_jb)(x_ia·x_jb), u²A²(C + H) work, no u × C·H gradient."""
    u, draws = residual.shape[:2]
    r, x = residual.flatten(0, 1), inputs.flatten(0, 1)
    gram = (r @ r.T).mul_(x @ x.T)
    if draws > 1:
        gram = gram.view(u, draws, u, draws).sum((1, 3)).div_(draws * draws)
    return gram


def _gains(dist: torch.Tensor, counts: torch.Tensor, closest: torch.Tensor, rows: list[int] | slice) -> torch.Tensor:
    """Δ_j = Σ_u count_u · max(0, closest_u − d(u, j)) for j in rows; dist is symmetric, so row j serves."""
    # Reduced row by row, alike for every row whichever rows come along, so equal gains compare equal.
    return (closest - dist[rows]).clamp_(min=0).mul_(counts).sum(1)


def _lazy_greedy(dist: torch.Tensor, counts: torch.Tensor, first: list[int], k: int) -> list[int]:
    """Up to k distinct points in the order plain greedy takes them, stopping when every gain is 0.

    dist is over distinct points, counts their multiplicities and first their lowest indices in the
    block, by which equal gains are ordered; see facility_location.
    """
    u = dist.shape[0]
    dmax = dist.max()
    reach = dmax + dmax * torch.finfo(dist.dtype).eps + torch.finfo(dist.dtype).tiny  # C
    closest = reach.expand(u).clone()  # min over S ∪ {phantom at distance C} of d(u, s)
    # Δ_j for S = ∅, in blocks of rows so as not to need a second u × u buffer.
    gains = [g for start in range(0, u, 256) for g in _gains(dist, counts, closest, slice(start, start + 256)).tolist()]
    # Entries are (−gain, first index, point, step evaluated): the top is the largest gain, then the lowest index.
    heap = [(-gain, first[j], j, 0) for j, gain in enumerate(gains)]
    heapq.heapify(heap)
    taken: list[int] = []
    for step in range(min(k, u)):
        while heap[0][3] != step:
            stale = [heapq.heappop(heap)[2]]
            while len(stale) < _REFRESH and heap and heap[0][3] != step:
                stale.append(heapq.heappop(heap)[2])
            for j, gain in zip(stale, _gains(dist, counts, closest, stale).tolist()):
                heapq.heappush(heap, (-gain, first[j], j, step))
        # The top's gain is current and at least every other bound, so it is plain greedy's argmax.
        neg_gain, _, best, _ = heapq.heappop(heap)
        if neg_gain == 0:  # gains never grow, so from here on every point, duplicates too, ties at 0
            break
        taken.append(best)
        closest = torch.minimum(closest, dist[best])
    return taken


def facility_location(
    features: torch.Tensor, k: int, *, metric: Literal["euclidean", "cosine"] = "euclidean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """CRAIG's k medoids of features (n, d) and their weights, both shape (k,) int64.

        F(S) = Σ_i max_{j∈S} s(i, j),   s(i, j) = C − d(i, j),   C = max_{i,j} d(i, j) + ε

    d is ‖x_i − x_j‖ (metric="euclidean") or 1 − cos(x_i, x_j) (metric="cosine"; a zero row is at
    distance 1 from every non-zero one). F is monotone submodular, so greedy, S ← S ∪ {argmax_j Δ_j},

        Δ_j = F(S ∪ {j}) − F(S) = Σ_i max(0, min_{s∈S} d(i, s) − d(i, j))   (min over ∅ is C),

    is within 1 − 1/e of the optimum (Nemhauser et al. 1978); its choices do not depend on C.
    Lazy greedy: gains only shrink as S grows, so gains computed at earlier steps bound the current
    ones from above; a max-heap of them is re-evaluated from the top until the top is current.
    The medoids are those of plain greedy, in its order; equal gains go to the lowest index, so
    exact duplicates come after every distinct point, and once all gains are 0 the lowest indices
    left are taken.

    weights[j] = |{i : medoid j is nearest to x_i}|, the cluster sizes CRAIG uses as per-element
    step sizes; they sum to n. Ties: a medoid owns itself (so every weight is >= 1, duplicates
    included), any other point goes to the earliest selected of its nearest medoids.

    Memory is the u × u distance matrix of the u <= n distinct points, O(n²) (16 MB at n = 2000 in
    float32), so callers bound n, e.g. per class and window. Computed in features' dtype, at least
    float32, the distances computed in float64; time O(u² d) for the distances and O(u) for each
    gain evaluated.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.ndim != 2 or features.shape[1] < 1:
        raise ValueError(f"features must have shape (n, d) with d >= 1, got {tuple(features.shape)}")
    if not features.dtype.is_floating_point:
        raise TypeError(f"features must be a floating point tensor, got {features.dtype}")
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got {k}")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if not all_finite(features):
        raise ValueError("features contain NaN or inf")

    # Greedy over the distinct points, each weighted by its multiplicity: exact duplicates are 0 apart
    # and tie exactly, however the distances round, and cost nothing.
    points, group, counts = torch.unique(features, dim=0, return_inverse=True, return_counts=True)
    dtype = torch.promote_types(features.dtype, torch.float32)
    # In float64, then rounded: ‖x‖² − 2 x·y + ‖y‖² cancels for near points, and in float32 a matmul's
    # last bits (which differ with the number of threads) moved their distances by 1e-4 of the
    # largest, enough to change the picks of half the windows between 1 and 2 threads.
    dist = _distances(points.to(torch.float64), metric).to(dtype)
    return _medoids(dist, group, counts, k)


def facility_location_of_factors(
    residual: torch.Tensor, inputs: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """facility_location(gradients_of_factors(residual, inputs), k), Euclidean, from the gradients'
    factors alone: residuals r (n, C) and inputs x (n, H), g_i = r_i ⊗ x_i, or A pairs a sample,
    (n, A, C) and (n, A, H), ḡ_i = (1/A) Σ_a r_ia ⊗ x_ia.

    The distances come from the Gram matrix of the factors, n²(C + H) work (A²-fold for A pairs),
    where the gradients are n × C·H: at 1,000 classes and H = 256 a window of 1,024 gradients is
    1 GB, and their Gram matrix 2.7e11 multiply-adds. Duplicates are told by their factors (a
    sample whose residual is 0 has gradient 0 whatever its inputs: those are 0 apart exactly, so
    they tie as duplicates do). The Gram matrix is in float64, not centred (in float64 the
    cancellation of near points' ‖x‖² − 2 x·y + ‖y‖² is under float32's resolution of a distance).
    """
    for name, factor in (("residual", residual), ("inputs", inputs)):
        if not isinstance(factor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(factor).__name__}")
        if factor.ndim not in (2, 3) or factor.shape[-1] < 1:
            raise ValueError(f"{name} must have shape (n, C) or (n, A, C) with C >= 1, got {tuple(factor.shape)}")
        if not factor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating point tensor, got {factor.dtype}")
        if not all_finite(factor):
            raise ValueError(f"{name} contain NaN or inf")
    if residual.shape[:-1] != inputs.shape[:-1]:
        raise ValueError(
            f"residual and inputs must have the same samples (and pairs), got {tuple(residual.shape)} and "
            f"{tuple(inputs.shape)}"
        )
    n = residual.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got {k}")
    if residual.ndim == 2:
        residual, inputs = residual[:, None], inputs[:, None]
    # a zero residual's inputs do not reach its gradient: zeroed, such samples are one point
    inputs = inputs * (residual != 0).any(-1, keepdim=True)
    factors = torch.cat([residual.flatten(1), inputs.flatten(1)], 1).to(torch.float64)
    distinct, group, counts = torch.unique(factors, dim=0, return_inverse=True, return_counts=True)
    split = residual.shape[1] * residual.shape[2]
    # contiguous: a matmul of strided columns ran 100x slower in two threads
    gram = _factor_gram(
        distinct[:, :split].contiguous().view(-1, *residual.shape[1:]),
        distinct[:, split:].contiguous().view(-1, *inputs.shape[1:]),
    )
    gram /= gram.diagonal().max().clamp_min(torch.finfo(gram.dtype).tiny)  # greedy's picks do not change
    dtype = torch.promote_types(torch.promote_types(residual.dtype, inputs.dtype), torch.float32)
    return _medoids(_symmetric(_euclidean(gram)).to(dtype), group, counts, k)


def _medoids(
    dist: torch.Tensor, group: torch.Tensor, counts: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The medoids and cluster sizes of facility_location, from the distances of the distinct points,
    each point's distinct one (`group`) and their multiplicities."""
    n = len(group)
    first = torch.full_like(counts, n).scatter_reduce_(0, group, torch.arange(n, device=group.device), "amin")
    taken = _lazy_greedy(dist, counts.to(dist.dtype), first.tolist(), k)
    medoids = first[taken].tolist()
    if len(medoids) < k:  # every gain is 0: plain greedy takes the lowest indices left
        chosen = set(medoids)
        medoids += [i for i in range(n) if i not in chosen][: k - len(medoids)]
    medoids = torch.tensor(medoids, dtype=torch.int64, device=group.device)
    to_medoid = dist[group[medoids]][:, group]  # (k, n)
    to_medoid[torch.arange(k, device=dist.device), medoids] = -1
    owner = to_medoid.argmin(0)  # the first of equal minima: the earliest selected
    return medoids, torch.bincount(owner, minlength=k)
