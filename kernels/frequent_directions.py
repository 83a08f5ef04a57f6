"""Frequent Directions (Liberty 2013): a deterministic, mergeable sketch of AᵀA in O(ℓ·dim) memory."""

from __future__ import annotations

import torch

from kernels.floats import all_finite, flush_subnormal


def _shrink(rows: torch.Tensor, ell: int) -> torch.Tensor:
    """Shrink m >= ℓ rows B to the ℓ − 1 rows of diag(sqrt(max(λ − δ, 0) / λ)) Uᵀ B, largest first.

    B Bᵀ = U diag(λ) Uᵀ and δ = λ_ℓ, the ℓ-th largest eigenvalue. Along each eigendirection BᵀB
    loses min(λ_i, δ): at most δ in spectral norm and at least ℓ·δ in squared Frobenius norm,
    which is what the Frequent Directions bound is made of.
    """
    # eigh of the (m × m) Gram matrix beats an SVD of the wide B (2-3x on CPU, see bench/kernels.py).
    # It is tiny, so float64 costs nothing, and an orthonormal U is what keeps AᵀA − BᵀB ⪰ 0.
    # Rows scaled by a power of two (exact) to a largest entry of about 1 first: the scale factors
    # below are scale-free, and a float32 Gram of rows near 1e-25 or 1e19 under- or overflows (a
    # float64 one past 1e154 or under 1e-154: the peak in the rows' own range, float64's too).
    wide = torch.promote_types(rows.dtype, torch.float32)
    peak = rows.abs().amax().to(wide).clamp_min(torch.finfo(wide).tiny)
    unit = rows * torch.ldexp(torch.ones((), dtype=rows.dtype), -torch.frexp(peak).exponent)
    eigvals, eigvecs = torch.linalg.eigh((unit @ unit.T).double())
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)  # eigh sorts ascending
    delta = eigvals[ell - 1].clamp_min(0)  # a negative δ would be roundoff, and would grow rows
    lam, vecs = eigvals[: ell - 1], eigvecs[:, : ell - 1]
    # Where λ <= δ the numerator is 0, so directions at or below δ (and λ ≈ 0) become zero rows.
    scale = ((lam - delta).clamp_min(0) / lam.clamp_min(torch.finfo(lam.dtype).tiny)).sqrt()
    return flush_subnormal((scale[:, None] * vecs.T).to(rows.dtype) @ rows)


class FrequentDirections:
    """Frequent Directions sketch B (ℓ × dim) of a stream of rows A (n × dim).

    Rows fill a buffer of 2ℓ rows; when it is full the buffer is shrunk: with B Bᵀ = U diag(λ) Uᵀ
    and δ = λ_ℓ, B ← diag(sqrt(max(λ − δ, 0) / λ)) Uᵀ B, which leaves at most ℓ − 1 non-zero rows.
    Guarantee, for every k < ℓ (A_k the best rank-k approximation of A):

        0 ⪯ AᵀA − BᵀB   and   ‖AᵀA − BᵀB‖₂ ≤ ‖A − A_k‖²_F / (ℓ − k).

    Sketches merge (stack and shrink), and the merged sketch satisfies the same bound for the
    stacked stream, so shards and nodes reduce in any tree. Attributes are plain tensors and
    ints, so a sketch pickles.
    """

    def __init__(
        self,
        ell: int,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if ell < 1:
            raise ValueError(f"ell must be >= 1, got {ell}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
        self._ell = ell
        self._dim = dim
        self._buffer = torch.zeros(2 * ell, dim, device=device, dtype=dtype)
        self._filled = 0  # occupied rows, always at the top of the buffer
        self._rows_seen = 0

    @property
    def ell(self) -> int:
        return self._ell

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def rows_seen(self) -> int:
        """Rows fed so far, those of merged sketches included."""
        return self._rows_seen

    def update(self, rows: torch.Tensor) -> None:
        """Feed rows (n, dim), any n; they are moved to the sketch's device and dtype."""
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"rows must be a torch.Tensor, got {type(rows).__name__}")
        if rows.ndim != 2 or rows.shape[1] != self._dim:
            raise ValueError(f"rows must have shape (n, {self._dim}), got {tuple(rows.shape)}")
        rows = rows.to(device=self._buffer.device, dtype=self._buffer.dtype)
        # Checked after the cast: values that overflow the sketch's dtype are as bad as inf.
        if not all_finite(rows):
            raise ValueError("rows contain NaN or inf")
        self._append(flush_subnormal(rows))
        self._rows_seen += rows.shape[0]

    def merge(self, other: FrequentDirections) -> FrequentDirections:
        """Fold other's rows into this sketch, in place; returns self."""
        if not isinstance(other, FrequentDirections):
            raise TypeError(f"other must be a FrequentDirections, got {type(other).__name__}")
        if (other.ell, other.dim) != (self._ell, self._dim):
            raise ValueError(f"other must have ell={self._ell}, dim={self._dim}, got ell={other.ell}, dim={other.dim}")
        # A copy, because other may be self and shrinking rewrites the buffer in place.
        rows = other._buffer[: other._filled].to(self._buffer, copy=True)
        self._append(rows)
        self._rows_seen += other.rows_seen
        return self

    def sketch(self) -> torch.Tensor:
        """The sketch B, shape (ell, dim), zero rows at the bottom; the sketch itself is unchanged."""
        rows = self._buffer[: self._filled]
        if self._filled > self._ell:
            rows = _shrink(rows, self._ell)
        out = self._buffer.new_zeros(self._ell, self._dim)
        out[: rows.shape[0]] = rows
        return out

    def to(self, device: torch.device | str) -> FrequentDirections:
        """Move the sketch to device, in place; returns self."""
        self._buffer = self._buffer.to(device)
        return self

    def _append(self, rows: torch.Tensor) -> None:
        start = 0
        while start < rows.shape[0]:
            if self._filled == self._buffer.shape[0]:
                kept = _shrink(self._buffer, self._ell)
                self._buffer.zero_()
                self._buffer[: kept.shape[0]] = kept
                self._filled = kept.shape[0]
            take = min(self._buffer.shape[0] - self._filled, rows.shape[0] - start)
            self._buffer[self._filled : self._filled + take] = rows[start : start + take]
            self._filled += take
            start += take
