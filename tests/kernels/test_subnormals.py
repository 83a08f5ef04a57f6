from __future__ import annotations

import torch

from kernels import FrequentDirections, last_layer_gradients
from kernels.subnormals import flush_subnormal


def is_subnormal(x: torch.Tensor) -> torch.Tensor:
    return (x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)


def test_flush_keeps_normal_values_and_zeroes_subnormals():
    x = torch.tensor([1e-40, -1e-42, 1e-37, -2.0, 0.0], dtype=torch.float32)
    assert is_subnormal(x).sum() == 2
    assert flush_subnormal(x).tolist() == [0.0, 0.0, torch.tensor(1e-37).item(), -2.0, 0.0]


def test_confident_logits_give_no_subnormal_gradients():
    # softmax(100 apart) underflows to ~e^-100, a subnormal float32 before the flush
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 100.0]])
    g = last_layer_gradients(logits, torch.tensor([0, 2]), torch.ones(2, 4))
    assert not is_subnormal(g).any()
    assert torch.equal(g[0, :5], torch.zeros(5))


def test_sketches_never_hold_subnormals():
    rows = torch.randn(500, 16) * torch.logspace(0, -30, 16)  # columns down to 1e-30: squares underflow
    rows[::7, 3] = 1e-41
    fd = FrequentDirections(4, 16)
    fd.update(rows)
    assert not is_subnormal(fd.sketch()).any()
    assert not is_subnormal(fd._buffer).any()
