"""Last-layer gradient embeddings: per-example gradients of cross-entropy in closed form."""

from __future__ import annotations

import torch

from kernels.floats import all_finite, flush_subnormal

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def last_layer_gradients(
    logits: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor,
    *,
    bias: bool = True,
) -> torch.Tensor:
    """Per-example gradient of softmax cross-entropy w.r.t. a last linear layer z = W h + b.

        g_i = (softmax(z_i) − onehot(y_i)) ⊗ [h_i, 1]

    logits (n, C), labels (n,) in [0, C), features h (n, H). Returns (n, C·(H+1)), laid out as
    torch.cat([W.grad, b.grad[:, None]], 1).flatten() for example i alone; with bias=False,
    (n, C·H) laid out as W.grad.flatten().
    """
    return gradients_of_factors(*last_layer_factors(logits, labels, features, bias=bias))


def gradients_of_factors(residual: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The gradients g_i = r_i ⊗ x_i of their factors (`last_layer_factors`) r (n, C) and x (n, H),
    flattened: (n, C·H), as last_layer_gradients lays them out. Of A factor pairs a sample, r
    (n, A, C) and x (n, A, H), their mean, a sum of A rank-one terms:

        ḡ_i = (1/A) Σ_a r_ia ⊗ x_ia

    summed in draw order from each pair's flushed g_ia, as a mean of last_layer_gradients' would be.
    """
    if residual.ndim == 3:
        draws = residual.shape[1]
        total = gradients_of_factors(residual[:, 0], inputs[:, 0])
        for a in range(1, draws):  # one draw's gradients beside the sum, not A of them
            total += gradients_of_factors(residual[:, a], inputs[:, a])
        return total.div_(draws)
    # softmax underflows to subnormals for confident classes: flushed, they cost nothing downstream.
    return flush_subnormal((residual[:, :, None] * inputs[:, None, :]).flatten(1))


def last_layer_factors(
    logits: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor,
    *,
    bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of last_layer_gradients, g_i = r_i ⊗ x_i: the output residuals
    r = softmax(z) − onehot(y) (n, C) and the layer's inputs x = [h, 1] (n, H+1) (h with bias=False).

    Inner products of gradients need only the factors: g_i · g_j = (r_i · r_j)(x_i · x_j), so a
    Gram matrix costs n²(C + H) instead of n²·C·H, and the n × C·H gradients are never formed.
    """
    for name, matrix in (("logits", logits), ("features", features)):
        if matrix.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(matrix.shape)}")
        if not matrix.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating point tensor, got {matrix.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    n, classes = logits.shape
    if labels.shape[0] != n or features.shape[0] != n:
        raise ValueError(
            f"logits, labels and features must have the same number of rows, "
            f"got {n}, {labels.shape[0]} and {features.shape[0]}"
        )
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.numel():
        raise ValueError(f"labels must be in [0, {classes}), got {bad[0].item()}")
    for name, matrix in (("logits", logits), ("features", features)):
        if not all_finite(matrix):
            raise ValueError(f"{name} contain NaN or inf")

    dtype = torch.promote_types(logits.dtype, features.dtype)
    onehot = torch.nn.functional.one_hot(labels.to(logits.device, torch.int64), classes).to(dtype)
    residual = torch.softmax(logits.to(dtype), dim=1) - onehot
    features = features.to(dtype)
    if bias:
        features = torch.cat([features, features.new_ones(n, 1)], dim=1)
    return residual, features
