from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import facility_location, facility_location_of_factors, gradients_of_factors
from kernels.facility_location import _distances, _gains, _lazy_greedy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def distances(x: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Pairwise distances straight from the definition, in float64."""
    if metric == "euclidean":
        return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    norms = np.linalg.norm(x, axis=1)
    unit = x / np.where(norms > 0, norms, 1)[:, None]
    # Elementwise, not a matmul, so equal rows give equal distances to the last bit.
    dist = np.clip(1 - (unit[:, None, :] * unit[None, :, :]).sum(-1), 0, 2)
    dist[(x[:, None, :] == x[None, :, :]).all(-1)] = 0  # zero rows too: they are one point
    return dist


def greedy_gains(dist: np.ndarray, chosen: list[int]) -> np.ndarray:
    """Δ_j = F(S ∪ {j}) − F(S) for every j, from F(S) = Σ_i max_{j∈S} (C − d_ij) with C = max d."""
    reach = dist.max()
    best = (reach - dist[:, chosen]).max(1) if chosen else np.zeros(len(dist))
    return np.maximum(reach - dist - best[:, None], 0).sum(0)


def assert_greedy_picks(x: np.ndarray, medoids: list[int], metric: str = "euclidean", rtol: float = 1e-9) -> None:
    """Each medoid has a largest gain, up to rounding, and is the lowest index of the points equal to it."""
    x = x.astype(np.float64)
    dist = distances(x, metric)
    slack = rtol * len(x) * (dist.max() + 1)
    for step, j in enumerate(medoids):
        gains = greedy_gains(dist, medoids[:step])
        gains[medoids[:step]] = -np.inf
        assert gains[j] >= gains.max() - slack, f"step {step}: took {j}, gain {gains[j]}, best {gains.max()}"
        assert j == min(i for i in range(len(x)) if (x[i] == x[j]).all() and i not in medoids[:step])


def value(dist: np.ndarray, subset: list[int]) -> float:
    return float((dist.max() - dist[:, subset]).max(1).sum())


def cluster_sizes(dist: np.ndarray, medoids: list[int]) -> list[int]:
    """Each point to its nearest medoid; a medoid to itself, other ties to the earliest selected."""
    sizes = [0] * len(medoids)
    for i in range(len(dist)):
        if i in medoids:
            sizes[medoids.index(i)] += 1
            continue
        nearest = min(dist[i, j] for j in medoids)
        sizes[next(pos for pos, j in enumerate(medoids) if dist[i, j] == nearest)] += 1
    return sizes


def run(x: np.ndarray, k: int, **kwargs) -> tuple[list[int], list[int]]:
    medoids, weights = facility_location(torch.from_numpy(x), k, **kwargs)
    assert medoids.shape == weights.shape == (k,)
    assert medoids.dtype == weights.dtype == torch.int64
    medoids, weights = medoids.tolist(), weights.tolist()
    assert len(set(medoids)) == k and all(0 <= j < len(x) for j in medoids)
    assert sum(weights) == len(x) and min(weights) >= 1
    return medoids, weights


def clustered(n: int, d: int, seed: int, centres: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 4 * rng.standard_normal((centres, d))[rng.integers(0, centres, n)] + rng.standard_normal((n, d))


def points(n: int, d: int, seed: int, grid: bool) -> np.ndarray:
    """Gaussian points, or points of a small integer grid: duplicates, equal distances and equal gains."""
    rng = np.random.default_rng(seed)
    return rng.integers(-2, 3, (n, d)).astype(np.float64) if grid else rng.standard_normal((n, d))


def plain_greedy(dist: torch.Tensor, k: int) -> list[int]:
    """Greedy with every gain recomputed each step, in the kernel's own arithmetic (its _gains).

    Exactly equal gains, which the kernel must order by index, are common: two points nearer to
    each other than to any medoid have the same gain in exact arithmetic, rounded apart by any
    other order of summation, so only the same arithmetic can be compared bit for bit.
    """
    n = dist.shape[0]
    ones = torch.ones(n, dtype=dist.dtype)
    dmax = dist.max()
    closest = (dmax + dmax * torch.finfo(dist.dtype).eps + torch.finfo(dist.dtype).tiny).expand(n).clone()
    chosen: list[int] = []
    for _ in range(k):
        gains = _gains(dist, ones, closest, slice(None))
        gains[chosen] = -torch.inf
        if gains.max() == 0:
            break
        j = int(gains.argmax())  # the first of equal gains: the lowest index
        chosen.append(j)
        closest = torch.minimum(closest, dist[j])
    return chosen


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 4),
    grid=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    metric=st.sampled_from(["euclidean", "cosine"]),
    data=st.data(),
)
def test_lazy_greedy_takes_plain_greedy_points_in_order(
    n: int, d: int, grid: bool, seed: int, metric: str, data: st.DataObject
) -> None:
    dist = _distances(torch.from_numpy(points(n, d, seed, grid)), metric)
    k = data.draw(st.integers(1, n))
    assert _lazy_greedy(dist, torch.ones(n, dtype=dist.dtype), list(range(n)), k) == plain_greedy(dist, k)


@pytest.mark.parametrize(("n", "d", "k"), [(300, 20, 60), (500, 8, 5), (400, 3, 400), (300, 1, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lazy_greedy_matches_plain_greedy_on_larger_blocks(n: int, d: int, k: int, dtype: torch.dtype) -> None:
    # Deep heaps, many batched refreshes; clusters make gains collapse together, and d = 1 ties them.
    dist = _distances(torch.from_numpy(clustered(n, d, seed=n + d)).to(dtype), "euclidean")
    assert _lazy_greedy(dist, torch.ones(n, dtype=dtype), list(range(n)), k) == plain_greedy(dist, k)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 30),
    d=st.integers(1, 3),
    grid=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    metric=st.sampled_from(["euclidean", "cosine"]),
    data=st.data(),
)
def test_every_pick_is_greedy_by_the_definition(
    n: int, d: int, grid: bool, seed: int, metric: str, data: st.DataObject
) -> None:
    # Against distances and gains from the definition in float64, with duplicates merged or not.
    x = points(n, d, seed, grid)
    k = data.draw(st.integers(1, n))
    medoids, weights = run(x, k, metric=metric)
    assert run(x, k, metric=metric) == (medoids, weights)
    assert_greedy_picks(x, medoids, metric)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(2, 5),
    seed=st.integers(0, 2**32 - 1),
    metric=st.sampled_from(["euclidean", "cosine"]),
    data=st.data(),
)
def test_weights_are_brute_force_cluster_sizes(n: int, d: int, seed: int, metric: str, data: st.DataObject) -> None:
    # Points in general position: no point is equally near two medoids, so rounding cannot move it.
    x = np.random.default_rng(seed).standard_normal((n, d))
    k = data.draw(st.integers(1, n))
    medoids, weights = run(x, k, metric=metric)
    assert weights == cluster_sizes(distances(x, metric), medoids)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 10), d=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_within_one_minus_one_over_e_of_exhaustive_optimum(n: int, d: int, seed: int, data: st.DataObject) -> None:
    x = np.random.default_rng(seed).standard_normal((n, d))
    k = data.draw(st.integers(1, min(n, 3)))
    medoids, _ = run(x, k)
    dist = distances(x)
    optimum = max(value(dist, list(subset)) for subset in itertools.combinations(range(n), k))
    # Nemhauser, Wolsey & Fisher 1978, for monotone submodular F with F(∅) = 0.
    assert value(dist, medoids) >= (1 - 1 / math.e) * optimum * (1 - 1e-12)


def test_far_above_the_worst_case_in_practice() -> None:
    # Measured over 100 seeds of 10 clustered points, k = 3: 27 % exactly optimal, worst 0.95.
    ratios = []
    for seed in range(20):
        x = clustered(10, 2, seed, centres=3)
        dist = distances(x)
        optimum = max(value(dist, list(subset)) for subset in itertools.combinations(range(10), 3))
        ratios.append(value(dist, run(x, 3)[0]) / optimum)
    assert min(ratios) >= 0.9


def test_weights_on_a_larger_block() -> None:
    x = clustered(400, 4, seed=3)
    medoids, weights = run(x, 12)
    nearest = np.array(medoids)[distances(x)[:, medoids].argmin(1)]
    assert weights == [int((nearest == j).sum()) for j in medoids]


def test_constant_points_tie_to_the_lowest_indices() -> None:
    assert run(np.ones((6, 3)), 3) == ([0, 1, 2], [4, 1, 1])
    assert run(np.ones((6, 3)), 3, metric="cosine") == ([0, 1, 2], [4, 1, 1])
    assert run(np.zeros((3, 2)), 3, metric="cosine") == ([0, 1, 2], [1, 1, 1])
    assert run(np.ones((1, 1)), 1) == ([0], [1])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_duplicates_come_after_every_distinct_point(metric: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 4))[np.r_[np.arange(7), rng.integers(0, 7, 53)]]  # 60 points, 7 distinct
    rng.shuffle(x)
    medoids, weights = run(x, 10, metric=metric)
    assert_greedy_picks(x, medoids, metric)
    assert len({tuple(x[j]) for j in medoids[:7]}) == 7
    # Then every gain is 0, and the lowest indices left are taken: weight 1, as each owns itself.
    assert medoids[7:] == [i for i in range(60) if i not in medoids[:7]][:3]
    assert weights[7:] == [1, 1, 1]
    # The first 7 own their duplicates but for those taken after them.
    for j, weight in zip(medoids[:7], weights):
        assert weight == sum((x[i] == x[j]).all() for i in range(60) if i not in medoids[7:])


def test_accurate_in_float32_under_shift_and_scale() -> None:
    # A shared offset of 1e4 spreads: ‖x‖² − 2 x·y + ‖y‖² alone would be all rounding in float32,
    # and at 1e±30 the squares under- or overflow.
    x = clustered(300, 16, seed=11)
    for shift, scale in ((0.0, 1.0), (1e4, 1.0), (0.0, 1e-30), (-1e3, 1e30)):
        moved = ((x + shift) * scale).astype(np.float32)
        medoids, _ = run(moved, 20)
        assert_greedy_picks(moved, medoids, rtol=1e-5)


def test_cosine_ignores_row_norms() -> None:
    x = clustered(150, 6, seed=2)
    scaled = x * np.random.default_rng(0).uniform(0.1, 10, (150, 1))
    medoids, weights = run(scaled, 15, metric="cosine")
    assert_greedy_picks(x, medoids, "cosine")
    assert weights == cluster_sizes(distances(x, "cosine"), medoids)
    assert run(x * 1e160, 15, metric="cosine") == (medoids, weights)  # norms of such rows were inf: every row 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_result_on_the_features_device(device: str, dtype: torch.dtype) -> None:
    x = torch.from_numpy(clustered(200, 8, seed=4)).to(dtype)
    medoids, weights = facility_location(x.to(device), 10)
    assert medoids.device.type == weights.device.type == device
    assert medoids.dtype == weights.dtype == torch.int64
    assert len(set(medoids.tolist())) == 10 and int(weights.sum()) == 200
    assert_greedy_picks(x.double().numpy(), medoids.tolist(), rtol=1e-5)


@pytest.mark.parametrize(
    ("features", "k", "kwargs", "error", "message"),
    [
        (torch.ones(5), 1, {}, ValueError, r"features must have shape \(n, d\) with d >= 1, got \(5,\)"),
        (torch.ones(2, 3, 4), 1, {}, ValueError, r"features must have shape \(n, d\) .* got \(2, 3, 4\)"),
        (torch.ones(4, 0), 1, {}, ValueError, r"features must have shape \(n, d\) .* got \(4, 0\)"),
        (torch.ones(5, 2), 0, {}, ValueError, r"k must be in \[1, n\] = \[1, 5\], got 0"),
        (torch.ones(5, 2), -1, {}, ValueError, r"k must be in \[1, n\] = \[1, 5\], got -1"),
        (torch.ones(5, 2), 6, {}, ValueError, r"k must be in \[1, n\] = \[1, 5\], got 6"),
        (torch.ones(0, 2), 1, {}, ValueError, r"k must be in \[1, n\] = \[1, 0\], got 1"),
        (torch.ones(5, 2), 2, {"metric": "manhattan"}, ValueError, "metric must be one of .*, got 'manhattan'"),
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, {}, ValueError, "features contain NaN or inf"),
        (torch.tensor([[0.0, float("-inf")], [1.0, 1.0]]), 1, {}, ValueError, "features contain NaN or inf"),
        (torch.ones(5, 2, dtype=torch.int32), 1, {}, TypeError, "features must be a floating point tensor"),
        (np.ones((5, 2)), 1, {}, TypeError, "features must be a torch.Tensor, got ndarray"),
    ],
)
def test_errors(features: torch.Tensor, k: int, kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        facility_location(features, k, **kwargs)


def random_factors(n: int, classes: int, width: int, draws: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals that sum to 0 a sample (softmax − onehot) and inputs ending in the bias's 1, a pair
    a sample or `draws` pairs (float64)."""
    rng = np.random.default_rng(seed)
    shape = (n,) if draws is None else (n, draws)
    p = rng.dirichlet(np.ones(classes), shape)
    residual = p - np.eye(classes)[rng.integers(0, classes, shape)]
    inputs = np.concatenate([rng.standard_normal((*shape, width)), np.ones((*shape, 1))], -1)
    return torch.from_numpy(residual), torch.from_numpy(inputs)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    classes=st.integers(2, 8),
    width=st.integers(1, 6),
    draws=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_of_factors_picks_what_the_gradients_give(
    n: int, classes: int, width: int, draws: int | None, seed: int, data: st.DataObject
) -> None:
    # The gradients formed (r ⊗ x, or the mean of A of them): greedy by the definition, weights the
    # brute-force cluster sizes. (Not always facility_location's picks over them: two classes and one
    # feature leave the gradients in a plane, where gains tie up to rounding, broken either way.)
    residual, inputs = random_factors(n, classes, width, draws, seed)
    gradients = gradients_of_factors(residual, inputs).numpy()
    k = data.draw(st.integers(1, n))
    medoids, weights = facility_location_of_factors(residual, inputs, k)
    assert medoids.dtype == weights.dtype == torch.int64
    assert_greedy_picks(gradients, medoids.tolist())
    assert weights.tolist() == cluster_sizes(distances(gradients), medoids.tolist())


def test_of_factors_a_zero_residual_is_one_point_whatever_its_inputs() -> None:
    # Samples the model is sure of have gradient 0: one point, duplicates of each other, so they
    # come after every distinct point and the first of them owns the rest.
    residual, inputs = random_factors(12, 4, 3, None, seed=7)
    residual[[2, 5, 9]] = 0
    medoids, weights = facility_location_of_factors(residual.float(), inputs.float(), 12)
    medoids, weights = medoids.tolist(), weights.tolist()
    assert sorted(medoids[:10]) == [i for i in range(12) if i not in (5, 9)]  # 10 distinct points first
    assert medoids[10:] == [5, 9] and weights[10:] == [1, 1]
    assert_greedy_picks(gradients_of_factors(residual, inputs).numpy(), medoids)


def test_of_factors_at_scale_stays_finite_and_greedy() -> None:
    # Inputs of 1e18 square past float32's range in a Gram matrix; in float64, scaled, they do not.
    residual, inputs = random_factors(50, 5, 4, None, seed=3)
    for scale in (1e-18, 1e18):
        medoids, _ = facility_location_of_factors(residual.float(), (inputs * scale).float(), 8)
        assert_greedy_picks(gradients_of_factors(residual, inputs).numpy(), medoids.tolist(), rtol=1e-5)


@pytest.mark.parametrize(
    ("residual", "inputs", "k", "error", "message"),
    [
        (torch.ones(5), torch.ones(5, 2), 1, ValueError, r"residual must have shape \(n, C\) or \(n, A, C\)"),
        (torch.ones(5, 2), torch.ones(5, 0), 1, ValueError, r"inputs must have shape .* with C >= 1, got \(5, 0\)"),
        (torch.ones(5, 2), torch.ones(4, 3), 1, ValueError, r"the same samples .* got \(5, 2\) and \(4, 3\)"),
        (torch.ones(5, 2, 2), torch.ones(5, 3, 3), 1, ValueError, "the same samples"),
        (torch.ones(5, 2), torch.ones(5, 3), 6, ValueError, r"k must be in \[1, n\] = \[1, 5\], got 6"),
        (torch.tensor([[float("nan")]]), torch.ones(1, 1), 1, ValueError, "residual contain NaN or inf"),
        (torch.ones(2, 2), torch.ones(2, 2, dtype=torch.int64), 1, TypeError, "inputs must be a floating point"),
        (np.ones((2, 2)), torch.ones(2, 2), 1, TypeError, "residual must be a torch.Tensor, got ndarray"),
    ],
)
def test_of_factors_errors(residual, inputs, k: int, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        facility_location_of_factors(residual, inputs, k)
