from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import maxvol, pivoted_cholesky
from kernels.maxvol import _swap

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def volume(a: np.ndarray, rows: list[int]) -> float:
    """sqrt(det(A_S A_Sᵀ)), which is |det A_S| for a square A_S."""
    sub = a[rows]
    if sub.shape[0] == sub.shape[1]:
        return abs(np.linalg.det(sub))
    return math.sqrt(max(np.linalg.det(sub @ sub.T), 0.0))


def largest_volume(a: np.ndarray, k: int) -> float:
    """Brute force over every k-subset of rows."""
    subs = a[np.array(list(itertools.combinations(range(len(a)), k)))]
    if k == a.shape[1]:
        return float(np.abs(np.linalg.det(subs)).max())
    return math.sqrt(max(float(np.linalg.det(subs @ subs.transpose(0, 2, 1)).max()), 0.0))


def gram(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a @ a.T)


def mv(a: np.ndarray, k: int | None = None, **kwargs) -> list[int]:
    """maxvol of the rows of features a, through their Gram matrix; k defaults to a's width."""
    k = a.shape[1] if k is None else k
    return assert_valid(maxvol(gram(a), k, **kwargs), len(a), k)


def dominance(a: np.ndarray, rows: list[int]) -> float:
    """max |B_ij| for B = A A_S⁻¹."""
    return float(np.abs(np.linalg.solve(a[rows].T, a.T)).max())


def assert_valid(rows: torch.Tensor, n: int, k: int) -> list[int]:
    assert rows.dtype == torch.int64 and rows.shape == (k,)
    rows = rows.tolist()
    assert len(set(rows)) == k and all(0 <= i < n for i in rows)
    return rows


def gaussian(n: int, r: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, r))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, min(n, 4)))),
    tol=st.floats(1.05, 2.0),
    row_scales=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_dominant_and_within_hadamard_bound_of_brute_force(
    shape: tuple[int, int], tol: float, row_scales: bool, seed: int
) -> None:
    # Greedy starts within r! = 24 of the best and each swap multiplies |det| by > tol >= 1.05,
    # so the default 100 swaps always converge here (log 24 / log 1.05 < 66).
    n, r = shape
    a = gaussian(n, r, seed)
    if row_scales:  # rows of very different norms, which greedy alone handles worst
        a *= np.exp(2 * np.random.default_rng(seed + 1).standard_normal((n, 1)))
    rows = mv(a, tol=tol)
    # Converged: every row of A is a combination of the rows of A_S with coefficients of at most tol,
    # hence for any T, |det A_T| = |det B_T| |det A_S| <= (tol √r)^r |det A_S| (Hadamard). The
    # Gram matrix squares A's condition number: B is computed to ~1e-8 here, not to eps.
    assert dominance(a, rows) <= tol * (1 + 1e-6)
    assert volume(a, rows) >= largest_volume(a, r) / (tol**r * r ** (r / 2)) * (1 - 1e-6)


def test_usually_the_largest_volume() -> None:
    # Measured over 200 seeds: 86 % exactly the maximum, 95 % within 0.9 of it.
    ratios = [volume(a, mv(a)) / largest_volume(a, 4) for a in (gaussian(12, 4, seed) for seed in range(20))]
    assert sum(ratio >= 0.9 for ratio in ratios) >= 17
    assert sum(ratio >= 1 - 1e-12 for ratio in ratios) >= 14


@pytest.mark.parametrize("seed", range(5))
def test_greedy_rows_are_lapack_pivoted_qr(seed: int) -> None:
    # Businger–Golub pivoting of Aᵀ (LAPACK geqp3) takes the rows the greedy phase takes, in order;
    # from a float32 Gram matrix too, computed in float32, on these well-separated rows.
    a = gaussian(60, 8, seed)
    _, pivots = scipy.linalg.qr(a.T, mode="r", pivoting=True)
    for k in range(1, 9):
        assert pivoted_cholesky(gram(a), k).rows.tolist() == pivots[:k].tolist()
    single = pivoted_cholesky(gram(a).float(), 8)
    assert single.rows.tolist() == pivots[:8].tolist() and single.factor.dtype == torch.float32
    assert mv(a, max_swaps=0) == pivots[:8].tolist()


def test_the_factor_is_the_rows_in_the_pivots_orthonormal_basis() -> None:
    a = gaussian(40, 6, 0)
    rows, factor, rank = pivoted_cholesky(gram(a), 4)
    q = np.linalg.qr(a[rows.numpy()].T)[0]  # an orthonormal basis of the pivots' span
    np.testing.assert_allclose(np.abs(factor.numpy()), np.abs(a @ q), atol=1e-10)
    assert int(rank) == 4 and np.allclose(np.triu(factor.numpy()[rows.numpy()], 1), 0)
    # k = rank: K = L Lᵀ exactly
    full = pivoted_cholesky(gram(a), 6).factor.numpy()
    np.testing.assert_allclose(full @ full.T, a @ a.T, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.integers(2, 10).flatmap(
        lambda n: st.integers(2, min(n, 5)).flatmap(lambda r: st.tuples(st.just(n), st.just(r), st.integers(1, r - 1)))
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_fewer_rows_than_columns_within_k_factorial_of_brute_force(shape: tuple[int, int, int], seed: int) -> None:
    # Greedy volume sampling: vol >= max vol / k! (Çivril & Magdon-Ismail 2009, Thm 6); swaps on
    # the low-rank features only add to it.
    n, r, k = shape
    a = gaussian(n, r, seed)
    greedy, swapped = mv(a, k, max_swaps=0), mv(a, k)
    assert volume(a, greedy) >= largest_volume(a, k) / math.factorial(k) * (1 - 1e-9)
    assert volume(a, swapped) >= volume(a, greedy) * (1 - 1e-9)


def test_fewer_rows_than_columns_usually_near_the_largest() -> None:
    # Measured over 200 seeds of 10 × 5 with k = 3: 88 % exact, 98 % within 0.9, worst 0.81 (greedy alone).
    ratios = [volume(a, mv(a, 3)) / largest_volume(a, 3) for a in (gaussian(10, 5, seed) for seed in range(20))]
    assert sum(ratio >= 0.9 for ratio in ratios) >= 17


def test_swaps_only_ever_add_volume() -> None:
    swapped = 0
    for seed in range(40):
        a = gaussian(12, 4, seed)
        greedy, one, full = mv(a, max_swaps=0), mv(a, max_swaps=1), mv(a)
        assert volume(a, one) >= volume(a, greedy) * (1 - 1e-12)
        assert volume(a, full) >= volume(a, one) * (1 - 1e-12)
        # A swap replaces one row, in place; the first gains more than tol.
        assert sum(g != o for g, o in zip(greedy, one)) <= 1
        if one != greedy:
            swapped += 1
            assert volume(a, one) > 1.05 * volume(a, greedy)
    assert swapped >= 3  # the swap phase is exercised, not only the greedy start


@pytest.mark.parametrize("seed", range(3))
def test_swaps_from_a_poor_start(seed: int) -> None:
    # Greedy leaves little to swap (0 to 2 swaps on random inputs), so the rank-one updates of B
    # are driven here from the first r rows instead: about 10 swaps, each checked from scratch.
    a = gaussian(300, 8, seed)
    # Rotated so that the start's rows are lower triangular, as greedy pivots' rows are: volumes keep.
    a = a @ np.linalg.qr(a[:8].T)[0]
    start, full = torch.arange(8)[None], torch.tensor([True])
    volumes = []
    for max_swaps in range(100):
        rows = _swap(torch.from_numpy(a)[None], start, full, 1.05, max_swaps)[0].tolist()
        volumes.append(volume(a, rows))
        if max_swaps and volumes[-1] == volumes[-2]:
            break
    assert len(volumes) >= 6
    assert all(after > 1.05 * before for before, after in zip(volumes[:-2], volumes[1:-1]))
    assert dominance(a, rows) <= 1.05 * (1 + 1e-9)


def test_a_batch_is_each_matrix_alone() -> None:
    rng = np.random.default_rng(3)
    features = [gaussian(30, 6, seed) for seed in range(4)]
    features[1] = rng.integers(-2, 3, (30, 2)) @ rng.integers(-2, 3, (2, 6)).astype(np.float64)  # rank 2: no swaps
    features[2] = gaussian(30, 6, 9) * np.exp(3 * rng.standard_normal((30, 1)))  # several swaps
    grams = torch.stack([gram(a) for a in features])
    for k in (3, 6):
        batch = maxvol(grams, k)
        assert batch.shape == (4, k)
        assert [row.tolist() for row in batch] == [maxvol(g, k).tolist() for g in grams]
    assert pivoted_cholesky(grams, 6).rank.tolist() == [6, 2, 6, 6]


def test_one_k_per_matrix_and_zero_padding_to_a_common_size() -> None:
    rng = np.random.default_rng(4)
    features = [gaussian(30, 6, 0), gaussian(22, 6, 1), gaussian(30, 6, 2) * np.exp(rng.standard_normal((30, 1)))]
    features.append((rng.integers(-2, 3, (9, 2)) @ rng.integers(-2, 3, (2, 6))).astype(np.float64))  # rank 2
    ks = [5, 6, 6, 4]
    padded = torch.stack([torch.nn.functional.pad(gram(a), (0, 30 - len(a), 0, 30 - len(a))) for a in features])
    rows = maxvol(padded, ks)
    assert [r.tolist() for r in rows] == [maxvol(gram(a), k).tolist() for a, k in zip(features, ks)]
    assert all(max(r.tolist()) < len(a) for r, a in zip(rows, features))  # never a padding row
    with pytest.raises(ValueError, match=r"one >= 1 for each of a batch's matrices; got \[5, 6\]"):
        maxvol(padded, [5, 6])
    with pytest.raises(ValueError, match="one >= 1 for each"):
        maxvol(padded, [5, 0, 1, 1])


def test_members_leave_the_batch_as_their_rank_runs_out() -> None:
    # Ranks 1 to 8 in one batch with k = 8: members are spent at every step and leave the batch in
    # several rounds; each must still get exactly what it gets alone.
    rng = np.random.default_rng(5)
    features = [rng.standard_normal((20, r)) @ rng.standard_normal((r, 8)) for r in (3, 8, 1, 5, 8, 2, 7, 4, 6)]
    grams = torch.stack([gram(a) for a in features])
    batch = pivoted_cholesky(grams, 8)
    assert batch.rank.tolist() == [3, 8, 1, 5, 8, 2, 7, 4, 6]
    for a, rows, factor, rank in zip(features, *batch):
        rows, rank = rows.tolist(), int(rank)
        _, pivots = scipy.linalg.qr(a.T, mode="r", pivoting=True)
        assert rows[:rank] == pivots[:rank].tolist()  # pivoted QR up to the rank, then the lowest free rows
        assert rows[rank:] == [i for i in range(20) if i not in rows[:rank]][: 8 - rank]
        np.testing.assert_allclose((factor @ factor.T).numpy(), a @ a.T, atol=1e-8)  # K = L Lᵀ: k >= rank
        assert not factor[:, rank:].any()
    assert [r.tolist() for r in maxvol(grams, 8)] == [maxvol(g, 8).tolist() for g in grams]


def test_a_batch_of_large_windows_on_two_threads() -> None:
    # Regression: a batched LU solve fails on torch 2.13's CPU build from k = 256 with 2 threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        features = torch.randn(16, 512, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        rows = maxvol(features @ features.mT, 256)
    finally:
        torch.set_num_threads(threads)
    assert rows.shape == (16, 256) and all(len(set(r.tolist())) == 256 for r in rows)


def test_a_small_independent_part_under_large_rows_is_found() -> None:
    # Rank 1 of norm ~1e8 but for a part of 1e3 (1e-5 of it) in row 3: above what K resolves.
    for seed in range(20):
        rng = np.random.default_rng(seed)
        a = rng.standard_normal((12, 1)) @ rng.standard_normal((1, 4)) * 1e8
        a[3] += 1e3 * rng.standard_normal(4)
        assert 3 in mv(a, 2)


def test_parts_below_the_grams_resolution_count_as_dependent() -> None:
    # Rank 2 plus a part of 1e-9 of it: lost in K's rounding, so the rest are the lowest free rows.
    rng = np.random.default_rng(1)
    a = rng.standard_normal((30, 2)) @ rng.standard_normal((2, 4))
    a += 1e-9 * rng.standard_normal(a.shape)
    rows, _, rank = pivoted_cholesky(gram(a), 4)
    assert int(rank) == 2
    assert rows.tolist()[2:] == [i for i in range(30) if i not in rows.tolist()[:2]][:2]


def test_deterministic_and_invariant_to_scale() -> None:
    k = gram(gaussian(500, 16, 7))
    first = maxvol(k, 16)
    assert torch.equal(maxvol(k, 16), first)
    for scale in (2.0**-1000, 2.0**-20, 3.0, 2.0**1000):  # entries far under and over float64's squares
        assert torch.equal(maxvol(k * scale, 16), first)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_result_on_the_grams_device(device: str, dtype: torch.dtype) -> None:
    a = gaussian(200, 8, 3)
    rows = maxvol(gram(a).to(device=device, dtype=dtype), 8)
    assert rows.device.type == device and rows.dtype == torch.int64
    rows = assert_valid(rows.cpu(), 200, 8)
    if dtype == torch.float64:
        assert rows == mv(a)
        assert dominance(a, rows) <= 1.05 * (1 + 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_rows_fall_back_to_lowest_free_indices(dtype: torch.dtype) -> None:
    assert maxvol(torch.zeros(6, 6, dtype=dtype), 3).tolist() == [0, 1, 2]
    assert maxvol(torch.zeros(6, 6, dtype=dtype), np.int64(3)).tolist() == [0, 1, 2]  # numpy's k too
    assert maxvol(torch.full((5, 5), 3.0, dtype=dtype), 3).tolist() == [0, 1, 2]
    # Rank 1: the longest row (the first of equals), then the lowest others.
    u = torch.tensor([1.0, -3.0, 2.0, 0.5, 3.0], dtype=dtype)
    assert maxvol(torch.outer(u, u) * 6, 3).tolist() == [1, 0, 2]
    # Exactly rank 2 of 4 (small integers): two rows that span the others, then the lowest others.
    rng = np.random.default_rng(0)
    a = (rng.integers(-3, 4, (9, 2)) @ rng.integers(-3, 4, (2, 4))).astype(np.float64)
    rows = maxvol(gram(a).to(dtype), 4).tolist()
    _, pivots = scipy.linalg.qr(a.T, mode="r", pivoting=True)
    assert rows[:2] == pivots[:2].tolist()
    assert rows[2:] == [i for i in range(9) if i not in rows[:2]][:2]


def test_duplicate_rows_are_taken_once() -> None:
    base = gaussian(4, 4, 0)
    rows = mv(np.concatenate([base, base, base]))
    assert sorted(i % 4 for i in rows) == [0, 1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    r=st.integers(1, 5),
    inner=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_any_rank_gives_distinct_rows_of_full_rank(n: int, r: int, inner: int, seed: int, data: st.DataObject) -> None:
    # Small integers, exact in float32 too, so exact dependences and repeated rows are common.
    rng = np.random.default_rng(seed)
    a = (rng.integers(-2, 3, (n, inner)) @ rng.integers(-2, 3, (inner, r))).astype(np.float64)
    k = data.draw(st.integers(1, min(n, r)))
    rank = np.linalg.matrix_rank(a)
    for dtype in (torch.float32, torch.float64):
        rows = assert_valid(maxvol(gram(a).to(dtype), k), n, k)
        assert np.linalg.matrix_rank(a[rows]) == min(k, rank)
        if k == r == rank:  # greedy is within r! <= 120 of the best; 100 swaps of > 1.05 reach 131
            assert dominance(a, rows) <= 1.05 * (1 + 1e-6)


@pytest.mark.parametrize(
    ("gram_", "kwargs", "error", "message"),
    [
        (torch.ones(5), {}, ValueError, r"gram must have shape \(n, n\) or \(b, n, n\) with n, b >= 1, got \(5,\)"),
        (torch.ones(2, 3), {}, ValueError, r"got \(2, 3\)"),
        (torch.ones(2, 2, 2, 2), {}, ValueError, r"got \(2, 2, 2, 2\)"),
        (torch.ones(0, 3, 3), {}, ValueError, r"got \(0, 3, 3\)"),
        (torch.ones(3, 3), {"k": 4}, ValueError, r"k must be in \[1, n\] = \[1, 3\] .* got 4"),
        (torch.ones(3, 3), {"k": 0}, ValueError, r"k must be .* got 0"),
        (torch.ones(3, 3), {"tol": 0.99}, ValueError, "tol must be >= 1, got 0.99"),
        (torch.ones(3, 3), {"tol": float("nan")}, ValueError, "tol must be >= 1, got nan"),
        (torch.ones(3, 3), {"max_swaps": -1}, ValueError, "max_swaps must be >= 0, got -1"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), {}, ValueError, "gram contains NaN or inf"),
        (-torch.eye(2), {}, ValueError, "gram must have a non-negative diagonal"),
        (torch.ones(2, 2, dtype=torch.int64), {}, TypeError, "gram must be a floating point tensor, got torch.int64"),
        (np.ones((2, 2)), {}, TypeError, "gram must be a torch.Tensor, got ndarray"),
    ],
)
def test_errors(gram_: torch.Tensor, kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        maxvol(gram_, **{"k": 1, **kwargs})
