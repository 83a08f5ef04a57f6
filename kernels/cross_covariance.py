"""ClipCov's pick (Joshi, Jain & Mirzasoleiman, 2024): the pairs whose cross-covariance best
preserves the data's, so that contrastive image–text training on them generalises as on all."""

from __future__ import annotations

import torch

from kernels.floats import all_finite


def cross_covariance_greedy(first: torch.Tensor, second: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """k of n pairs in the order greedy takes them to bring their mean cross-covariance
    (1/k) Σ_S a_i, a_i = first_i ⊗ second_i (rows (n, d₁) and (n, d₂)), closest to `target` (d₁, d₂)
    in Frobenius norm: each step the pair of largest 2k <a_i, target> − ‖a_i‖² − 2 Σ_{j kept} <a_i, a_j>,
    where <a_i, a_j> = <first_i, first_j> <second_i, second_j> (no d₁ × d₂ matrix a pair); the
    lowest row among equal gains. (n, n) memory: call it on a window."""
    if first.ndim != 2 or second.ndim != 2 or len(first) != len(second):
        raise ValueError(
            f"first and second must be (n, d1) and (n, d2), got {tuple(first.shape)}, {tuple(second.shape)}"
        )
    if target.shape != (first.shape[1], second.shape[1]):
        raise ValueError(f"target must be ({first.shape[1]}, {second.shape[1]}), got {tuple(target.shape)}")
    if not 0 <= k <= len(first):
        raise ValueError(f"k must be in [0, {len(first)}], got {k}")
    if not (all_finite(first) and all_finite(second) and all_finite(target)):
        raise ValueError("first, second or target hold NaN or inf")
    # in float64: a pair's products square its norms twice (float16 rows of norm 20, float32 of 1e9
    # overflowed, and greedy took rows in index order)
    first, second, target = first.double(), second.double(), target.double()
    inner = (first @ first.T) * (second @ second.T)  # <a_i, a_j>
    gains = 2 * k * ((first @ target) * second).sum(1) - inner.diagonal()
    if not (all_finite(inner) and all_finite(gains)):
        raise ValueError("the pairs' inner products overflow float64: scale first, second and target down")
    picked = torch.zeros(len(first), dtype=torch.bool, device=first.device)
    order = torch.empty(k, dtype=torch.long, device=first.device)
    for step in range(k):
        row = int(torch.where(picked, -torch.inf, gains).argmax())
        order[step] = row
        picked[row] = True
        gains -= 2 * inner[row]
    return order
