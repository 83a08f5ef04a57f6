"""GRAFT's Fast MaxVol: the rows of a matrix that span the largest volume, from its Gram matrix.

Both functions take the Gram matrix K = A Aᵀ of the rows, alone (n, n) or as a batch (b, n, n),
never A itself: a window of gradient embeddings is tall in D (thousands) but has a Gram matrix of
only w × w, which the last-layer gradients give cheaply in factored form. A batch runs every
window's step at once, so the Python loop is k steps, not k steps per window.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from kernels.floats import all_finite


class Pivots(NamedTuple):
    rows: torch.Tensor  # (..., k) pivot order
    factor: torch.Tensor  # (..., n, k) in the precision computed, K ≈ L Lᵀ, zero columns past the rank
    rank: torch.Tensor  # (...,) how many pivots are independent


def pivoted_cholesky(gram: torch.Tensor, k: int) -> Pivots:
    """The first k pivots of greedy (Businger–Golub) pivoting on the rows of A, from K = A Aᵀ.

    Step t takes the row with the largest residual off the span of the rows taken so far, the
    residuals' squares being the diagonal of K − L Lᵀ (downdated by the new column of L each
    step). The same rows, in the same order, as LAPACK's pivoted QR of Aᵀ; L (n, k) holds every
    row's coordinates in the orthonormal basis of the pivots' span, so K ≈ L Lᵀ is the rank-k
    (Nyström) approximation the pivots give, and L's pivot rows are lower triangular.

    Rank: values are taken as exact, within what a Gram matrix in gram's dtype resolves: once no
    residual exceeds n · eps(gram's dtype) of the largest diagonal entry (in float64, row parts
    below ~1e-7 of the largest row are lost in K's rounding; in float32, below ~3e-4), the rest
    of the pivots are the lowest indices not yet taken, with zero columns in L. Computed in
    gram's precision (float32 for float32 and narrower, else float64; the downdates' rounding,
    ~k · eps, stays under that rank threshold) on gram's device, O(n k²) a matrix: each step reads
    the columns of L so far, so float32 halves the cost where K holds no more precision anyway.
    """
    g = _checked(gram, k)
    batched = g.ndim == 3
    g = g if batched else g[None]
    b, n, _ = g.shape
    # The pivots are scale-free; a power of 4 scales K exactly (and L by its root, exactly) to a
    # largest entry in (1/4, 1], where neither the squares of L nor small entries leave the dtype's
    # range. Only the rows taken are scaled, as they are taken: K itself is not copied.
    peak = g.diagonal(dim1=1, dim2=2).amax(1).clamp_min(torch.finfo(g.dtype).tiny)
    root = torch.ldexp(torch.ones_like(peak), (torch.frexp(peak).exponent + 1) // 2)
    scale = (1 / (root * root))[:, None]
    residual = g.diagonal(dim1=1, dim2=2) * scale
    rank_tol = residual.amax(1) * n * torch.finfo(gram.dtype).eps
    columns = g.new_zeros(b, k, n)  # Lᵀ: its first t rows are contiguous
    rows = torch.empty(b, k, dtype=torch.int64, device=g.device)
    rank = torch.zeros(b, dtype=torch.int64, device=g.device)
    # The members still pivoting (`live`) and their state. A member whose rank is spent takes its
    # lowest free indices from then on, which needs no arithmetic: once a quarter of the live
    # members are spent, they leave (the state is copied without them), so the steps after read
    # only the columns that still grow. Windows of gradients run out of rank at very different steps.
    live = torch.arange(b, device=g.device)
    work, taken = columns, torch.zeros(b, n, dtype=torch.bool, device=g.device)
    independent = torch.zeros(b, dtype=torch.int64, device=g.device)
    for t in range(k):
        free = residual.masked_fill(taken, -1)
        top, best = free.max(1)  # first of equals: the lowest index
        at = torch.arange(len(live), device=g.device)
        spent = top <= rank_tol
        dependent = int(spent.sum())
        if 4 * dependent >= len(live):
            out = live[spent]
            columns[out], rank[out] = work[spent], independent[spent]
            # the lowest free indices, in order: a stable sort puts the untaken first
            rows[out, t:] = torch.sort(taken[spent].to(torch.uint8), dim=1, stable=True).indices[:, : k - t]
            stay = ~spent
            live, work, taken, independent = live[stay], work[stay], taken[stay], independent[stay]
            residual, rank_tol, scale, top, best = residual[stay], rank_tol[stay], scale[stay], top[stay], best[stay]
            if not len(live):
                break
            at, spent, dependent = at[: len(live)], spent[stay], 0
        if dependent:  # the lowest free index
            best = torch.where(spent, (~taken).int().argmax(1), best)
        done = work[:, :t]
        column = g[live, best] * scale - torch.bmm(done[at, :, best][:, None], done)[:, 0]
        # the downdated residual, as LAPACK's pstrf: in a Gram matrix rounded off PSD, recomputing it
        # can cancel to 0 where the residual does not, and dividing by that blows L up
        # (a spent member's is not its new pivot's: its column is zeroed below)
        pivot = top.clamp_min(torch.finfo(g.dtype).tiny).sqrt()
        column = column / pivot[:, None]
        if dependent:
            column = torch.where(spent[:, None], 0.0, column)
        work[:, t] = column
        residual = (residual - column * column).clamp_min(0)
        taken[at, best] = True
        rows[live, t] = best
        independent += ~spent
    rank[live] = independent
    if work is not columns:
        columns[live] = work
    factor = columns.mT * root[:, None, None]
    if not batched:
        return Pivots(rows[0], factor[0], rank[0])
    return Pivots(rows, factor, rank)


def maxvol(
    gram: torch.Tensor, k: int | Sequence[int], *, tol: float = 1.05, max_swaps: int = 100
) -> torch.Tensor | list[torch.Tensor]:
    """Indices of k rows S of A whose submatrix has near-maximal volume, from K = A Aᵀ: shape (k,)
    for gram (n, n), (b, k) for a batch (b, n, n), or for a batch with one k per matrix, a list of
    b index tensors. Rows of zeros (padding a smaller matrix to the batch's n) are never taken
    while k is at most the rank of the others; past it, the rest are the lowest free rows, zero
    rows among them (a caller that must not take them fills the rest itself, as GRAFT does).

        vol(A_S) = sqrt(det(A_S A_Sᵀ)) = sqrt(det K_SS)

    Rows are first taken greedily (pivoted_cholesky), within a factor k! of the largest volume
    (Çivril & Magdon-Ismail 2009). The classic MaxVol swaps follow (Goreinov et al. 2010) on the
    rank-k features L the greedy rows give (K ≈ L Lᵀ):

        B = L L_S⁻¹;  while max |B_ij| > tol:  S_j ← i  (|det L_S| grows by the factor |B_ij|)

    with B kept by a rank-one update. For k = rank A, L is A in an orthonormal basis and this is
    MaxVol on A: at convergence L_S is tol-dominant, so by Hadamard's inequality
    vol(A_S) ≥ max_T vol(A_T) / (tol^k k^{k/2}). For k < rank A it is MaxVol on the low-rank
    features, as GRAFT runs it; as L is a projection of A, vol(A_S) ≥ |det L_S| and each swap
    still multiplies a lower bound of the true volume by more than tol. After max_swaps swaps the
    current S is returned, never worse than the greedy one. No swaps where the rank is below k.
    S always has k distinct indices. The greedy phase runs once, to the largest k (its first k
    rows are those a smaller k takes); the swaps once per distinct k.
    """
    if not tol >= 1:  # also rejects NaN
        raise ValueError(f"tol must be >= 1, got {tol}")
    if max_swaps < 0:
        raise ValueError(f"max_swaps must be >= 0, got {max_swaps}")
    if isinstance(k, numbers.Integral):
        rows, factor, rank = pivoted_cholesky(gram, k)
        if gram.ndim == 2:
            return _swap(factor[None], rows[None], rank[None] == k, tol, max_swaps)[0]
        return _swap(factor, rows, rank == k, tol, max_swaps)
    ks = torch.as_tensor(k)
    if gram.ndim != 3 or ks.shape != gram.shape[:1] or (ks < 1).any():
        raise ValueError(
            f"k must be one int, or one >= 1 for each of a batch's matrices; got {list(k)} for gram "
            f"of shape {tuple(gram.shape)}"
        )
    rows, factor, rank = pivoted_cholesky(gram, int(ks.max()))
    chosen: list[torch.Tensor] = [rows[0]] * len(ks)
    for size in ks.unique().tolist():
        members = (ks == size).nonzero().flatten()
        swapped = _swap(factor[members, :, :size], rows[members, :size], rank[members] >= size, tol, max_swaps)
        for i, picked in zip(members.tolist(), swapped):
            chosen[i] = picked
    return chosen


def _swap(factor: torch.Tensor, rows: torch.Tensor, full: torch.Tensor, tol: float, max_swaps: int) -> torch.Tensor:
    """MaxVol swaps of each batch member with a non-singular L_S (`full`) that is lower triangular,
    as the greedy pivots' rows are; see maxvol. Only those members are computed, in float64: a
    member of lower rank keeps its greedy rows, and B's entries are compared with tol to ~1e-9."""
    rows = rows.clone()
    if not full.any() or not max_swaps:
        return rows
    members = full.nonzero().flatten()
    factor, picked = factor[members].double(), rows[members]
    b, n, k = factor.shape
    every = torch.arange(b, device=factor.device)
    # B = L L_S⁻¹: row i of L in the basis of the rows S. A triangular solve, not an LU: torch
    # 2.13's batched LU on CPU fails ("pivots ... must be >= 1") from k = 256 on 2 threads. Solved
    # from the left, L_Sᵀ Bᵀ = Lᵀ: its solve from the right (left=False) is ~5x slower on CPU.
    square = factor[every[:, None], picked]
    coeffs = torch.linalg.solve_triangular(square.mT, factor.mT, upper=True).mT.contiguous()
    chosen = torch.zeros(b, n, dtype=torch.bool, device=factor.device)
    chosen[every[:, None], picked] = True
    for _ in range(max_swaps):
        flat = coeffs.abs().flatten(1).argmax(1)
        i, j = flat // k, flat % k
        pivot = coeffs[every, i, j]
        # A row of S has |B| = 1: above tol only by roundoff.
        active = (pivot.abs() > tol) & ~chosen[every, i]
        if not active.any():
            break
        # L_S' = (I + e_j (b_i − e_j)ᵀ) L_S, so by Sherman–Morrison B' = B − B[:, j] (b_i − e_j)ᵀ / B_ij.
        row = coeffs[every, i].clone()
        row[every, j] -= 1
        step = (coeffs[every, :, j] / pivot[:, None])[:, :, None] * row[:, None, :]
        coeffs -= torch.where(active[:, None, None], step, 0.0)
        chosen[every[active], picked[every, j][active]] = False
        chosen[every[active], i[active]] = True
        picked[every[active], j[active]] = i[active]
    rows[members] = picked
    return rows


def _checked(gram: torch.Tensor, k: int) -> torch.Tensor:
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.ndim not in (2, 3) or gram.shape[-1] != gram.shape[-2] or gram.shape[-1] < 1 or gram.numel() == 0:
        raise ValueError(f"gram must have shape (n, n) or (b, n, n) with n, b >= 1, got {tuple(gram.shape)}")
    if not gram.dtype.is_floating_point:
        raise TypeError(f"gram must be a floating point tensor, got {gram.dtype}")
    n = gram.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}] for a gram matrix of {n} rows, got {k}")
    if not all_finite(gram):
        raise ValueError("gram contains NaN or inf")
    g = gram.double() if gram.dtype == torch.float64 else gram.float()
    if (g.diagonal(dim1=-2, dim2=-1) < 0).any():
        raise ValueError("gram must have a non-negative diagonal (a Gram matrix A Aᵀ)")
    return g
