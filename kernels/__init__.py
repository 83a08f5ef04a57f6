"""Numerical core of nearstore: pure functions and small sketches over torch tensors, CPU or GPU."""

from __future__ import annotations

from kernels.agreement import agreement_scores, sketch_basis
from kernels.frequent_directions import FrequentDirections
from kernels.gradients import last_layer_gradients
from kernels.topk import StreamingTopK

__all__ = [
    "FrequentDirections",
    "StreamingTopK",
    "agreement_scores",
    "last_layer_gradients",
    "sketch_basis",
]
