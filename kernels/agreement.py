"""SAGE agreement scores: how well each gradient agrees with the consensus inside the sketch subspace."""

from __future__ import annotations

import torch

from kernels.floats import all_finite, rows_scaled


def sketch_basis(sketch: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Top right singular vectors of the sketch as orthonormal rows V, shape (r, dim), r <= k.

    sketch = U diag(σ) V. Directions with σ <= σ_max · max(sketch.shape) · eps(dtype) are
    noise or zero padding and are dropped, so r can be below k (0 for an all-zero sketch);
    k=None keeps every non-zero direction.
    """
    if sketch.ndim != 2 or sketch.shape[0] < 1 or sketch.shape[1] < 1:
        raise ValueError(f"sketch must have shape (ell, dim) with ell, dim >= 1, got {tuple(sketch.shape)}")
    if not sketch.dtype.is_floating_point:
        raise TypeError(f"sketch must be a floating point tensor, got {sketch.dtype}")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")
    if not all_finite(sketch):
        raise ValueError("sketch contains NaN or inf")
    # The sketch is small (ℓ × dim): float64 keeps the directions near the rank cut-off clean.
    _, sigma, vh = torch.linalg.svd(sketch.double(), full_matrices=False)
    tol = sigma[0] * max(sketch.shape) * torch.finfo(sketch.dtype).eps
    rank = int((sigma > tol).sum())
    if k is not None:
        rank = min(rank, k)
    return vh[:rank].to(sketch.dtype)


def agreement_scores(embeddings: torch.Tensor, basis: torch.Tensor, consensus: torch.Tensor) -> torch.Tensor:
    """SAGE agreement of each embedding with the consensus direction, in [-1, 1], shape (n,).

        score_i = ⟨V g_i, V ḡ⟩ / (‖V g_i‖ ‖V ḡ‖)

    embeddings g (n, D); basis V (r, D) with orthonormal rows (see sketch_basis); consensus ḡ (D,),
    e.g. the mean gradient. A row with no component in the subspace (V g_i = 0) scores 0.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape (n, D), got {tuple(embeddings.shape)}")
    if not embeddings.dtype.is_floating_point:
        raise TypeError(f"embeddings must be a floating point tensor, got {embeddings.dtype}")
    width = embeddings.shape[1]
    if basis.ndim != 2 or basis.shape[1] != width:
        raise ValueError(f"basis must have shape (r, {width}), got {tuple(basis.shape)}")
    if consensus.shape != (width,):
        raise ValueError(f"consensus must have shape ({width},), got {tuple(consensus.shape)}")
    for name, tensor in (("embeddings", embeddings), ("basis", basis), ("consensus", consensus)):
        if not all_finite(tensor):
            raise ValueError(f"{name} contains NaN or inf")

    basis = basis.to(embeddings)
    direction = consensus_direction(basis, rows_scaled(consensus.to(embeddings)[None])[0])
    if direction is None:
        raise ValueError("consensus has no component in the sketch subspace")
    projected = rows_scaled(embeddings) @ basis.T
    tiny = torch.finfo(projected.dtype).tiny
    # A zero row stays zero after the clamped division, hence scores 0 rather than NaN.
    unit = projected / projected.norm(dim=1, keepdim=True).clamp_min(tiny)
    return (unit @ direction).clamp(-1, 1)


def consensus_direction(basis: torch.Tensor, consensus: torch.Tensor) -> torch.Tensor | None:
    """V ḡ / ‖V ḡ‖, the consensus's direction in the sketch's subspace (r,); None where it has
    none: below the roundoff of a width-D dot product the direction of V ḡ is noise."""
    centre = basis @ consensus
    centre_norm = centre.norm()
    if centre_norm <= torch.finfo(centre.dtype).eps * consensus.shape[0] ** 0.5 * consensus.norm():
        return None
    return centre / centre_norm


def residual_scores(embeddings: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Share of each embedding outside the sketch subspace, in [0, 1], shape (n,).

        score_i = ‖g_i − Vᵀ V g_i‖ / ‖g_i‖

    High for gradients the sketch represents badly (rare directions): the diversity-aware
    counterpart of agreement. A zero row scores 0.
    """
    if embeddings.ndim != 2 or basis.ndim != 2 or basis.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"embeddings (n, D) and basis (r, D) must share D, got {tuple(embeddings.shape)} and {tuple(basis.shape)}"
        )
    if not embeddings.dtype.is_floating_point:
        raise TypeError(f"embeddings must be a floating point tensor, got {embeddings.dtype}")
    if not all_finite(embeddings):
        raise ValueError("embeddings contains NaN or inf")
    basis, embeddings = basis.to(embeddings), rows_scaled(embeddings)
    outside = embeddings - (embeddings @ basis.T) @ basis
    norms = embeddings.norm(dim=1)
    return (outside.norm(dim=1) / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(0, 1)
