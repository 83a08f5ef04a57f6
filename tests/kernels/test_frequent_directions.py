from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import FrequentDirections, sketch_basis

SPECTRA = ["flat", "power_law", "low_rank_noise", "exact_low_rank"]
RANK = 5  # of the low-rank spectra; below every ell tested except 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_stream(spectrum: str, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows with a known kind of spectrum, rotated off the axes, rounded to float32 and held in float64.

    Rounding first makes the float64 reference see exactly the rows the float32 sketch sees.
    """
    rng = np.random.default_rng(seed)
    if spectrum == "flat":
        a = rng.standard_normal((n, dim))
    elif spectrum == "power_law":
        a = rng.standard_normal((n, dim)) * np.arange(1, dim + 1) ** -1.0
    elif spectrum == "low_rank_noise":
        a = 3 * rng.standard_normal((n, RANK)) @ rng.standard_normal((RANK, dim)) + 0.1 * rng.standard_normal((n, dim))
    elif spectrum == "exact_low_rank":
        a = rng.standard_normal((n, RANK)) @ rng.standard_normal((RANK, dim))
    else:
        raise ValueError(spectrum)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (a @ rotation).astype(np.float32).astype(np.float64)


def covariance_error_eigvals(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    """Eigenvalues of AᵀA − BᵀB, in float64."""
    b = b.cpu().double().numpy()
    return np.linalg.eigvalsh(a.T @ a - b.T @ b)


def fd_bounds(a: np.ndarray, ell: int) -> np.ndarray:
    """‖A − A_k‖²_F / (ℓ − k) for k = 0 .. ℓ−1."""
    sigma2 = np.linalg.eigvalsh(a.T @ a)[::-1].clip(0)  # works for n = 0 too, unlike an SVD
    return np.array([sigma2[k:].sum() / (ell - k) for k in range(ell)])


def tolerance(a: np.ndarray, dtype: torch.dtype = torch.float32) -> float:
    # Every shrink rounds the sketch to its dtype: a few eps of ‖A‖²_F, with room to spare.
    return 100 * torch.finfo(dtype).eps * float(np.sum(a**2))


def assert_fd_guarantee(a: np.ndarray, sketch: torch.Tensor, ell: int, dtype: torch.dtype = torch.float32) -> None:
    assert sketch.shape == (ell, a.shape[1])
    tol = tolerance(a, dtype)
    eig = covariance_error_eigvals(a, sketch)
    assert eig.min() >= -tol, "AᵀA − BᵀB must be PSD"
    bounds = fd_bounds(a, ell)
    for k, bound in enumerate(bounds):
        assert eig.max() <= bound + tol, f"bound fails at k={k}: {eig.max()} > {bound}"
    b = sketch.cpu().double().numpy()
    assert np.linalg.eigvalsh(b.T @ b).min() >= -tol


def sketch_of(a: np.ndarray, ell: int, batch: int, device: str = "cpu", **kwargs) -> FrequentDirections:
    fd = FrequentDirections(ell, a.shape[1], device=device, **kwargs)
    for start in range(0, len(a), batch):
        fd.update(torch.from_numpy(a[start : start + batch]))
    return fd


@pytest.mark.parametrize("ell", [4, 16, 32])
@pytest.mark.parametrize("spectrum", SPECTRA)
def test_bound_and_psd(spectrum: str, ell: int, device: str) -> None:
    a = make_stream(spectrum, n=2000, dim=64)
    fd = sketch_of(a, ell, batch=97, device=device)
    sketch = fd.sketch()
    assert sketch.device.type == device and sketch.dtype == torch.float32
    assert fd.rows_seen == 2000
    assert_fd_guarantee(a, sketch, ell)


@pytest.mark.parametrize("spectrum", ["power_law", "low_rank_noise", "exact_low_rank"])
def test_bound_is_not_vacuous(spectrum: str) -> None:
    # An all-zero sketch must fail the tightest bound, or the tests above would prove nothing.
    a = make_stream(spectrum, n=2000, dim=64)
    assert np.linalg.norm(a, 2) ** 2 > 2 * fd_bounds(a, 16).min()


@pytest.mark.parametrize("ell", [8, 16])
def test_exact_low_rank_is_recovered(ell: int) -> None:
    a = make_stream("exact_low_rank", n=3000, dim=48)
    for dtype in (torch.float32, torch.float64):
        eig = covariance_error_eigvals(a, sketch_of(a, ell, batch=256, dtype=dtype).sketch())
        assert np.abs(eig).max() <= tolerance(a, dtype)


@pytest.mark.parametrize("spectrum", ["power_law", "low_rank_noise"])
def test_projection_error_vs_exact_svd(spectrum: str) -> None:
    # Ghashami et al., Thm 3.1: ‖A − A Π_{B_k}‖²_F ≤ ℓ/(ℓ − k) · ‖A − A_k‖²_F.
    ell = 16
    a = make_stream(spectrum, n=2000, dim=64)
    sketch = sketch_of(a, ell, batch=500).sketch().double()
    sigma2 = np.linalg.svd(a, compute_uv=False) ** 2
    for k in range(1, ell):
        v = sketch_basis(sketch, k).numpy()
        assert v.shape == (k, 64)
        residual = np.sum((a - a @ v.T @ v) ** 2)
        assert residual <= ell / (ell - k) * sigma2[k:].sum() * (1 + 1e-6)


def test_batching_does_not_change_the_sketch() -> None:
    a = make_stream("power_law", n=300, dim=32)
    whole = sketch_of(a, 8, batch=len(a))
    by_row = sketch_of(a, 8, batch=1)
    uneven = FrequentDirections(8, 32)
    for chunk in np.array_split(a, [3, 50, 51, 200]):
        uneven.update(torch.from_numpy(chunk))
    for fd in (whole, by_row, uneven):
        assert fd.rows_seen == 300
        assert_fd_guarantee(a, fd.sketch(), 8)
        torch.testing.assert_close(fd.sketch(), whole.sketch(), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    ell=st.integers(1, 6),
    dim=st.integers(1, 12),
    n=st.integers(0, 120),
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.integers(0, 120), max_size=6),
)
def test_guarantee_for_any_shape_and_batching(ell: int, dim: int, n: int, seed: int, cuts: list[int]) -> None:
    a = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32).astype(np.float64)
    fd = FrequentDirections(ell, dim)
    for chunk in np.split(a, sorted(c for c in cuts if c <= n)):
        fd.update(torch.from_numpy(chunk))
    assert fd.rows_seen == n
    assert_fd_guarantee(a, fd.sketch(), ell)


def test_merge_of_two_and_of_a_tree_of_four(device: str) -> None:
    ell = 16
    a = make_stream("low_rank_noise", n=4000, dim=64, seed=1)
    parts = np.array_split(a, 4)
    leaves = [sketch_of(p, ell, batch=128, device=device) for p in parts]

    pair = sketch_of(parts[0], ell, batch=128, device=device).merge(leaves[1])
    assert pair.rows_seen == len(parts[0]) + len(parts[1])
    assert_fd_guarantee(np.concatenate(parts[:2]), pair.sketch(), ell)

    root = leaves[0].merge(leaves[1]).merge(leaves[2].merge(leaves[3]))
    assert root is leaves[0]
    assert root.rows_seen == 4000
    assert_fd_guarantee(a, root.sketch(), ell)


def test_merge_with_itself_counts_the_stream_twice() -> None:
    a = make_stream("power_law", n=500, dim=32)
    fd = sketch_of(a, 8, batch=64)
    fd.merge(fd)
    assert fd.rows_seen == 1000
    assert_fd_guarantee(np.concatenate([a, a]), fd.sketch(), 8)


def test_fewer_rows_than_ell_are_kept_exactly() -> None:
    a = make_stream("flat", n=5, dim=7)
    sketch = sketch_of(a, 8, batch=2).sketch()
    np.testing.assert_array_equal(sketch[:5].numpy(), a.astype(np.float32))
    assert not sketch[5:].any()


def test_update_with_zero_rows_is_a_no_op() -> None:
    a = make_stream("flat", n=100, dim=16)
    fd = sketch_of(a, 4, batch=30)
    before = fd.sketch()
    fd.update(torch.empty(0, 16))
    assert fd.rows_seen == 100
    torch.testing.assert_close(fd.sketch(), before, rtol=0, atol=0)
    empty = FrequentDirections(4, 16)
    empty.update(torch.empty(0, 16))
    assert empty.rows_seen == 0 and not empty.sketch().any()


def test_sketch_does_not_change_the_state() -> None:
    a = make_stream("power_law", n=400, dim=32)
    read_midway = FrequentDirections(8, 32)
    read_midway.update(torch.from_numpy(a[:203]))
    read_midway.sketch()
    read_midway.update(torch.from_numpy(a[203:]))
    torch.testing.assert_close(read_midway.sketch(), sketch_of(a, 8, batch=len(a)).sketch(), rtol=0, atol=0)


def test_rows_are_moved_to_the_sketch_dtype() -> None:
    fd = FrequentDirections(4, 3, dtype=torch.float64)
    fd.update(torch.ones(2, 3, dtype=torch.float16))
    assert fd.sketch().dtype == torch.float64


def test_to_moves_the_sketch_and_keeps_its_rows(device: str) -> None:
    a = make_stream("power_law", n=100, dim=16)
    fd = sketch_of(a, 4, batch=100)
    assert fd.to(device) is fd
    assert fd.sketch().device.type == device
    fd.update(torch.from_numpy(a))  # rows arrive on the CPU
    torch.testing.assert_close(fd.to("cpu").sketch(), sketch_of(np.concatenate([a, a]), 4, batch=100).sketch())


def test_pickle_round_trip_resumes_the_stream() -> None:
    a = make_stream("power_law", n=600, dim=32)
    fd = sketch_of(a[:350], 8, batch=50)
    clone = pickle.loads(pickle.dumps(fd))
    assert (clone.ell, clone.dim, clone.rows_seen) == (8, 32, 350)
    for sketch in (fd, clone):
        sketch.update(torch.from_numpy(a[350:]))
    torch.testing.assert_close(clone.sketch(), fd.sketch(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("ell", "dim", "message"),
    [(0, 4, "ell must be >= 1, got 0"), (4, 0, "dim must be >= 1, got 0"), (-2, 4, "ell must be >= 1, got -2")],
)
def test_constructor_errors(ell: int, dim: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FrequentDirections(ell, dim)


def test_constructor_rejects_integer_dtype() -> None:
    with pytest.raises(TypeError, match="dtype"):
        FrequentDirections(4, 4, dtype=torch.int64)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (torch.ones(8), r"rows must have shape \(n, 8\), got \(8,\)"),
        (torch.ones(3, 7), r"rows must have shape \(n, 8\), got \(3, 7\)"),
        (torch.ones(2, 3, 8), r"got \(2, 3, 8\)"),
        (torch.tensor([[0.0] * 7 + [float("nan")]]), "rows contain NaN or inf"),
        (torch.tensor([[0.0] * 7 + [float("inf")]]), "rows contain NaN or inf"),
        (torch.full((1, 8), 1e300, dtype=torch.float64), "rows contain NaN or inf"),
    ],
)
def test_update_errors(rows: torch.Tensor, message: str) -> None:
    fd = FrequentDirections(4, 8)
    with pytest.raises(ValueError, match=message):
        fd.update(rows)
    assert fd.rows_seen == 0


def test_update_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match="rows must be a torch.Tensor, got ndarray"):
        FrequentDirections(4, 8).update(np.ones((2, 8)))


@pytest.mark.parametrize(("ell", "dim"), [(8, 16), (4, 15)])
def test_merge_errors(ell: int, dim: int) -> None:
    with pytest.raises(ValueError, match=f"other must have ell=4, dim=16, got ell={ell}, dim={dim}"):
        FrequentDirections(4, 16).merge(FrequentDirections(ell, dim))
    with pytest.raises(TypeError, match="other must be a FrequentDirections"):
        FrequentDirections(4, 16).merge(torch.zeros(4, 16))


@pytest.mark.parametrize(
    ("scale", "dtype", "tolerance"),
    # a confident class's gradients; large finite rows; float64's past its square root's range,
    # which the float32 peak that scaled them could not hold
    [
        (1e-25, torch.float32, 1e-4),
        (1e19, torch.float32, 1e-4),
        (1e-200, torch.float64, 1e-12),
        (1e200, torch.float64, 1e-12),
    ],
)
def test_the_sketch_is_exact_below_its_rank_at_any_scale(scale: float, dtype: torch.dtype, tolerance: float) -> None:
    # the Gram matrix of such rows under- or overflowed: an all-zero sketch, or eigh failing
    a = make_stream("exact_low_rank", n=600, dim=32)
    sketch = sketch_of(a * scale, 8, batch=100, dtype=dtype).sketch().double().numpy() / scale
    error = np.linalg.norm(a.T @ a - sketch.T @ sketch, 2) / np.linalg.norm(a.T @ a, 2)
    assert error < tolerance
