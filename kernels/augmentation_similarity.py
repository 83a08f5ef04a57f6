"""SAS's pick (Joshi & Mirzasoleiman, 2023): within a latent class, the samples whose augmentations
are most similar to the other samples' in expectation, less their similarity to those already
picked."""

from __future__ import annotations

import torch

from kernels.floats import all_finite, rows_scaled


def expected_similarity(views: torch.Tensor) -> torch.Tensor:
    """μ_i, the mean over a sample's augmented views (n, a, d) of their unit-norm embeddings, (n, d):
    <μ_i, μ_j> is the expected cosine similarity of an augmentation of i to one of j."""
    if views.ndim != 3:
        raise ValueError(f"views must be (samples, augmentations, dim), got {tuple(views.shape)}")
    if not views.is_floating_point():
        raise TypeError(f"views must be a floating point tensor (embeddings), got {views.dtype}")
    if not all_finite(views):
        raise ValueError("views hold NaN or inf")
    views = rows_scaled(views.flatten(0, 1)).view_as(views)  # first: norms of rows near 1e20 overflowed
    tiny = torch.finfo(views.dtype).tiny
    return (views / views.norm(dim=2, keepdim=True).clamp_min(tiny)).mean(1)


def sas_greedy(means: torch.Tensor, k: int) -> torch.Tensor:
    """k rows of `means` (n, d) in the order SAS's greedy takes them: with s_ij = <μ_i, μ_j>, each
    step takes the row of largest gain Σ_j max(s_ij, 0) − Σ_{j picked} s_ij (over every row j,
    itself included), the lowest row among equal gains. (n, n) memory: call it on a window."""
    if means.ndim != 2:
        raise ValueError(f"means must be (n, d), got {tuple(means.shape)}")
    if not 0 <= k <= len(means):
        raise ValueError(f"k must be in [0, {len(means)}], got {k}")
    if not all_finite(means):
        raise ValueError("means hold NaN or inf")
    similarity = means @ means.T
    gains = similarity.clamp(min=0).sum(1)
    picked = torch.zeros(len(means), dtype=torch.bool, device=means.device)
    order = torch.empty(k, dtype=torch.long, device=means.device)
    for step in range(k):
        row = int(torch.where(picked, -torch.inf, gains).argmax())
        order[step] = row
        picked[row] = True
        gains -= similarity[row]
    return order
