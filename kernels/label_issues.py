"""Confident learning (Northcutt, Jiang & Chuang 2021): which given labels a model's predicted
probabilities contradict with confidence, with per-class thresholds so that a class the model is
unsure of is judged by its own standard.

    t_j = mean of p_i[j] over the samples i labelled j          (a class's self-confidence)
    c_i = argmax { p_i[j] : p_i[j] ≥ t_j }  (none where no class reaches its threshold)
    sample i is a label issue when c_i exists and c_i ≠ y_i     (the confident joint's off-diagonal)

`ConfidentJoint` keeps the thresholds' sums over a stream, so samples can be judged as they pass
against every sample seen so far; `label_issues` judges a batch. A class the model does not tell
apart from the others (t_j not `separation` times the mean p_i[j] over the samples not labelled j)
can be left out as a confident class: a model that gives every sample the same p(j | x) has
nothing to say about which samples are j. With `alpha`, so can a class whose gap is not significant
(a one-sided z-test of the two means at level alpha / C, Bonferroni over the classes): the
out-of-sample probabilities of a model that knows nothing scatter, and with few samples a class
(100 classes of pure-noise labels, 41 samples each) some classes clear any fixed ratio by chance.
"""

from __future__ import annotations

import torch

from kernels.floats import all_finite


def label_issues(probs: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The confident class c_i of each sample where it differs from its label, else -1; shape (n,).

    probs: (n, C) predicted probabilities; labels: (n,) int64 in [0, C); thresholds: (C,), t_j
    (inf for a class without an estimate: it is never a confident class).
    """
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or thresholds.shape != probs.shape[1:]:
        raise ValueError(
            f"probs (n, C), labels (n,) and thresholds (C,) must agree, got {tuple(probs.shape)}, "
            f"{tuple(labels.shape)}, {tuple(thresholds.shape)}"
        )
    _check(probs, labels)
    reached = probs >= thresholds.to(probs)
    confident = torch.where(reached, probs, torch.full_like(probs, -1.0)).argmax(1)
    some = reached.any(1)
    return torch.where(some & (confident != labels), confident, torch.full_like(confident, -1))


class ConfidentJoint:
    """Per-class self-confidence thresholds t_j over a stream of (probs, labels) batches."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        zeros = lambda: torch.zeros(num_classes, dtype=torch.float64)  # noqa: E731
        self.sums, self.squares, self.counts = zeros(), zeros(), zeros()  # Σ p_i[y_i], Σ p_i[y_i]², n_j
        self.totals, self.total_squares = zeros(), zeros()  # Σ p_i[j], Σ p_i[j]² over every sample
        self.seen = 0

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the batch's p_i[y_i] (and squares) to its classes' sums, and every p_i to the totals."""
        if probs.ndim != 2 or probs.shape[1] != len(self.counts) or labels.shape != probs.shape[:1]:
            raise ValueError(
                f"probs (n, {len(self.counts)}) and labels (n,) must agree, got {tuple(probs.shape)}, "
                f"{tuple(labels.shape)}"
            )
        _check(probs, labels)
        own, labels = probs.gather(1, labels[:, None])[:, 0].double().cpu(), labels.cpu()
        self.sums.index_add_(0, labels, own)
        self.squares.index_add_(0, labels, own.square())
        self.counts.index_add_(0, labels, torch.ones_like(own))
        # one reduction at a time: at most one (n, C) float64 copy alive (C may be in the tens of thousands)
        self.totals += probs.sum(0, dtype=torch.float64).cpu()
        self.total_squares += torch.linalg.vector_norm(probs, dim=0, dtype=torch.float64).square().cpu()
        self.seen += len(labels)

    def thresholds(self, separation: float = 0.0, alpha: float | None = None) -> torch.Tensor:
        """t_j for every class seen so far; inf for the others, and for those whose t_j is under
        `separation` times the mean p_i[j] of the samples not labelled j (where there are some), or,
        with `alpha`, exceeds it by less than the z-test at level alpha / C asks."""
        t = torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), torch.inf)
        others = self.seen - self.counts
        rest = (self.totals - self.sums) / others.clamp_min(1)
        apart = t >= separation * rest
        if alpha is not None:
            own_var = (self.squares / self.counts.clamp_min(1) - t.square()).clamp_min(0)
            rest_var = ((self.total_squares - self.squares) / others.clamp_min(1) - rest.square()).clamp_min(0)
            error = (own_var / self.counts.clamp_min(1) + rest_var / others.clamp_min(1)).sqrt()
            z = torch.special.ndtri(torch.tensor(1 - alpha / len(t), dtype=torch.float64))
            apart &= t - rest >= z * error
        return torch.where((others > 0) & ~apart, torch.inf, t)


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    """Refuse NaN or inf probabilities (one would make its class's threshold NaN, never reached
    again), labels that are not class indices, and labels outside [0, C)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if not all_finite(probs):
        raise ValueError("probs contain NaN or inf")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]):
        raise ValueError(f"labels must be in [0, {probs.shape[1]}), got {int(labels.min())}..{int(labels.max())}")
