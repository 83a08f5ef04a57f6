from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import FrequentDirections, last_layer_gradients
from kernels.floats import all_finite, flush_subnormal


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


@settings(max_examples=80, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]),
    bad=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
    where=st.integers(0, 2**16),
    seed=st.integers(0, 2**16),
)
def test_all_finite_is_isfinite_all(shape, dtype, bad, where, seed):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1e4).to(dtype)
    if bad is not None and x.numel():
        x.view(-1)[where % x.numel()] = bad
    assert all_finite(x) == bool(torch.isfinite(x).all())
    assert all_finite(x) == (bad is None or not x.numel())


def test_all_finite_of_integers_and_of_a_large_batch():
    assert all_finite(torch.arange(5)) and all_finite(torch.tensor([True, False]))
    grams = torch.zeros(64, 256, 256)
    assert all_finite(grams)
    grams[63, 255, 255] = float("nan")
    assert not all_finite(grams)
