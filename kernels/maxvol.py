"""GRAFT's Fast MaxVol: the rows of a tall matrix that span the largest volume."""

from __future__ import annotations

import torch

from kernels.subnormals import flush_subnormal


def _greedy_rows(a: torch.Tensor, k: int, rank_tol: float) -> tuple[list[int], int]:
    """First k pivots of Businger–Golub pivoted QR on the rows of a, and how many are independent.

    Step t takes the row with the largest residual ‖a_i − Q_tᵀ Q_t a_i‖ off the span Q_t of the rows
    taken so far. Left-looking: only the pivot's residual is formed (Gram–Schmidt twice keeps Q
    orthonormal); the other residual norms are downdated by (a_i · q_t)², one matvec a step.
    Once no residual exceeds rank_tol the rest are the lowest unselected indices.
    """
    n, r = a.shape
    basis = a.new_zeros(k, r)
    norms = (a * a).sum(1)
    taken = torch.zeros(n, dtype=torch.bool, device=a.device)
    picked: list[int] = []
    exact = False  # whether norms were recomputed since the last pivot
    while len(picked) < k:
        t = len(picked)
        best = int(norms.masked_fill(taken, -1).argmax())  # first of equals: the lowest index
        q = basis[:t]
        v = a[best] - q.T @ (q @ a[best])
        v = v - q.T @ (q @ v)
        size = float(v.norm())
        if size <= rank_tol:
            if not exact:
                # Downdating cancels once norms shrink by ~1e8; recompute before calling the rest dependent.
                norms = ((a - (a @ q.T) @ q) ** 2).sum(1)
                exact = True
                continue
            fill = (~taken).nonzero().flatten()[: k - t].tolist()
            return picked + fill, t
        basis[t] = v / size
        norms.sub_((a @ basis[t]) ** 2).clamp_(min=0)
        taken[best] = True
        picked.append(best)
        exact = False
    return picked, k


def maxvol(features: torch.Tensor, k: int | None = None, *, tol: float = 1.05, max_swaps: int = 100) -> torch.Tensor:
    """Indices of k rows S of features A (n, r) whose submatrix A_S has near-maximal volume, shape (k,).

        vol(A_S) = sqrt(det(A_S A_Sᵀ))                            (= |det A_S| when k = r)

    Rows are first taken greedily (pivoted QR on the rows: each step the row farthest from the span
    of those taken), which is within a factor k! of the largest volume (Çivril & Magdon-Ismail 2009).
    For k = r (the default, k=None) the classic MaxVol swaps follow (Goreinov et al. 2010):

        B = A A_S⁻¹;  while max |B_ij| > tol:  S_j ← i  (|det A_S| grows by the factor |B_ij|)

    with B kept by a rank-one update. At convergence A_S is tol-dominant, so by Hadamard's
    inequality |det A_S| ≥ max_T |det A_T| / (tol^r r^{r/2}). After max_swaps swaps the current S
    is returned, never worse than the greedy one. k < r stops after the greedy rows.

    Rank deficiency: the values of features are taken as exact. Once every remaining row lies in
    the span of those taken (residual norm ≤ max row norm · max(n, r) · eps(float64), roundoff)
    the volume is 0 whatever is added, so the rest of S are the lowest indices not yet taken, and
    no swaps are made. S always has k distinct indices, the greedy ones in pivot order. Computed
    in float64 on features' device: O(n r k) for the greedy rows, O(n r) a swap.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"features must have shape (n, r) with n, r >= 1, got {tuple(features.shape)}")
    if not features.dtype.is_floating_point:
        raise TypeError(f"features must be a floating point tensor, got {features.dtype}")
    n, r = features.shape
    if k is None:
        if n < r:
            raise ValueError(f"features must have n >= r rows when k is None, got shape {tuple(features.shape)}")
        k = r
    if k < 1 or k > min(n, r):
        raise ValueError(f"k must be in [1, min(n, r)] = [1, {min(n, r)}] for features of shape {(n, r)}, got {k}")
    if not tol >= 1:  # also rejects NaN
        raise ValueError(f"tol must be >= 1, got {tol}")
    if max_swaps < 0:
        raise ValueError(f"max_swaps must be >= 0, got {max_swaps}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf")

    a = features.double()
    # The selection is scale-free; a power of 2 scales exactly, and keeps the squared norms from underflowing.
    a = flush_subnormal(torch.ldexp(a, -torch.frexp(a.abs().max()).exponent))
    rank_tol = float(a.norm(dim=1).max()) * max(n, r) * torch.finfo(a.dtype).eps
    rows, rank = _greedy_rows(a, k, rank_tol)
    if k == r and rank == r:
        rows = _swap(a, rows, tol, max_swaps)
    return torch.tensor(rows, dtype=torch.int64, device=features.device)


def _swap(a: torch.Tensor, rows: list[int], tol: float, max_swaps: int) -> list[int]:
    """MaxVol swaps from the square, non-singular A_S; see maxvol."""
    n, r = a.shape
    coeffs = torch.linalg.solve(a[rows], a, left=False)  # B = A A_S⁻¹: row i of A in the basis of rows S
    for _ in range(max_swaps):
        flat = int(coeffs.abs().argmax())
        i, j = divmod(flat, r)
        pivot = float(coeffs[i, j])
        if abs(pivot) <= tol or i in rows:  # a row of S has |B| = 1: above tol only by roundoff
            break
        # A_S' = (I + e_j (b_i − e_j)ᵀ) A_S, so by Sherman–Morrison B' = B − B[:, j] (b_i − e_j)ᵀ / B_ij.
        row = coeffs[i].clone()
        row[j] -= 1
        coeffs.sub_(torch.outer(coeffs[:, j] / pivot, row))
        rows[j] = i
    return rows
