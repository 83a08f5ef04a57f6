"""The unsupervised selectors' kernels against their definitions: streaming k-means against exact
Lloyd (sklearn) on separable clusters, and its merge; SAS's and ClipCov's greedy against
brute-force greedy of their objectives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from kernels.augmentation_similarity import expected_similarity, sas_greedy
from kernels.cross_covariance import cross_covariance_greedy
from kernels.kmeans import StreamingKMeans, weighted_kmeans

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(n: int, k: int, dim: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10, size=(k, dim))
    labels = rng.integers(k, size=n)
    return torch.from_numpy(centres[labels] + rng.normal(size=(n, dim))).float(), labels


def inertia(points: torch.Tensor, centroids: torch.Tensor) -> float:
    return float(torch.cdist(points, centroids).min(1).values.square().sum())


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labellings of the same points into the same clusters, whatever the cluster numbers."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_streaming_kmeans_finds_separable_clusters_as_lloyd_does():
    points, labels = blobs(3000, 5, 4, seed=0)
    sketch = StreamingKMeans(5, 4, seed=1)
    for batch in points.split(256):
        sketch.update(batch)
    exact = KMeans(5, n_init=10, random_state=0).fit(points.numpy())
    assert same_partition(sketch.assign(points).numpy(), labels)
    assert inertia(points, sketch.centroids) <= 1.05 * exact.inertia_
    assert sketch.counts.sum() == len(points)


def test_merged_sketches_cluster_the_union_as_one_sketch_does():
    points, labels = blobs(4000, 6, 3, seed=2)
    halves = [StreamingKMeans(6, 3, seed=s) for s in (0, 1)]
    for half, part in zip(halves, points.split(2000)):
        for batch in part.split(500):
            half.update(batch)
    merged = halves[0].merge(halves[1])
    assert same_partition(merged.assign(points).numpy(), labels)
    assert merged.counts.sum() == len(points)
    exact = KMeans(6, n_init=10, random_state=0).fit(points.numpy())
    assert inertia(points, merged.centroids) <= 1.05 * exact.inertia_


def test_sketches_that_saw_nothing_merge():
    empty = StreamingKMeans(3, 2).merge(StreamingKMeans(3, 2))  # argmin over no centroid raised
    assert empty.centroids.shape == (0, 2) and empty.counts.sum() == 0
    points, _ = blobs(300, 3, 2, seed=4)
    seen = StreamingKMeans(3, 2)
    seen.update(points)
    merged = empty.merge(seen)
    assert merged.counts.sum() == 300 and len(merged.centroids) == 3


def test_expected_similarity_is_scale_free():
    # the views' norms overflowed (every μ 0 at 1e20) or lost their unit length (1e-22)
    views = torch.from_numpy(np.random.default_rng(5).normal(size=(4, 3, 6))).float()
    for scale in (1e20, 1e-22):
        torch.testing.assert_close(expected_similarity(views * scale), expected_similarity(views), atol=1e-5, rtol=1e-4)


def test_weighted_kmeans_weighs_points_as_their_copies():
    points = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    centroids, held = weighted_kmeans(points, torch.tensor([3.0, 1.0, 1.0, 1.0]), 2)
    assert sorted(centroids[:, 0].tolist()) == pytest.approx([0.25, 10.5])
    assert sorted(held.tolist()) == [2.0, 4.0]


def test_bad_kmeans_inputs_are_refused():
    sketch = StreamingKMeans(2, 3)
    with pytest.raises(ValueError, match=r"points must be \(n, 3\)"):
        sketch.update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="no centroids yet"):
        sketch.assign(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        sketch.update(torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match="cannot merge"):
        sketch.merge(StreamingKMeans(3, 3))


def brute_force_sas(means: np.ndarray, k: int) -> list[int]:
    """SAS's greedy straight from its objective: each step the lowest row of largest
    F(S ∪ {i}) − F(S), F(S) = Σ_{i∈S} Σ_j max(s_ij, 0) − Σ_{i<j, both in S} s_ij."""

    def objective(chosen: list[int]) -> float:
        s = means @ means.T
        cover = sum(np.maximum(s[i], 0).sum() for i in chosen)
        return cover - sum(s[a, b] for n, a in enumerate(chosen) for b in chosen[:n])

    chosen: list[int] = []
    for _ in range(k):
        gains = [(objective(chosen + [i]) - objective(chosen), -i) for i in range(len(means)) if i not in chosen]
        chosen.append(-max(gains)[1])
    return chosen


@pytest.mark.parametrize("seed", range(5))
def test_sas_greedy_takes_what_the_brute_force_greedy_takes(seed):
    rng = np.random.default_rng(seed)
    views = rng.normal(size=(12, 3, 4)) + rng.normal(size=(12, 1, 4))  # samples with correlated views
    means = expected_similarity(torch.from_numpy(views)).numpy()
    order = sas_greedy(torch.from_numpy(means), 8).tolist()
    assert order == brute_force_sas(means, 8)


def test_expected_similarity_is_the_mean_pairwise_cosine_of_two_samples_views():
    rng = np.random.default_rng(3)
    views = torch.from_numpy(rng.normal(size=(2, 5, 6)))
    mu = expected_similarity(views)
    unit = views / views.norm(dim=2, keepdim=True)
    pairwise = (unit[0] @ unit[1].T).mean()
    assert float(mu[0] @ mu[1]) == pytest.approx(float(pairwise))


def test_the_most_typical_sample_of_a_class_comes_first_and_an_outlier_late():
    # a cluster around e0, one outlier, and a second copy of the most central sample
    rng = np.random.default_rng(4)
    points = np.array([1.0, 0.0, 0.0]) + 0.1 * rng.normal(size=(20, 3))
    points[5] = points.mean(0)
    points = np.vstack([points, [[0.0, 0.0, 1.0]], points[5:6]])
    means = torch.from_numpy(points / np.linalg.norm(points, axis=1, keepdims=True))
    order = sas_greedy(means, len(means)).tolist()
    # the copy costs one similarity, against a sum over the class: SAS takes typical samples first,
    # an outlier only once the class's own gains are spent on the picks like them
    assert order[:2] == [5, 21] and order.index(20) > len(order) // 2
    assert sorted(order) == list(range(len(means)))
    with pytest.raises(ValueError, match=r"k must be in \[0, 22\]"):
        sas_greedy(means, 23)


def brute_force_clipcov(first: np.ndarray, second: np.ndarray, target: np.ndarray, k: int) -> list[int]:
    """Greedy straight from the objective: each step the lowest row whose pair brings
    ‖(1/k) Σ_S first_i second_iᵀ − target‖_F lowest."""
    chosen: list[int] = []
    for _ in range(k):
        costs = []
        for i in range(len(first)):
            if i in chosen:
                continue
            mean = sum(np.outer(first[j], second[j]) for j in chosen + [i]) / k
            costs.append((np.square(mean - target).sum(), i))
        chosen.append(min(costs)[1])
    return chosen


@pytest.mark.parametrize("seed", range(5))
def test_clipcov_greedy_takes_what_the_brute_force_greedy_takes(seed):
    rng = np.random.default_rng(seed)
    first, second = rng.normal(size=(10, 3)), rng.normal(size=(10, 4))
    target = np.einsum("ni,nj->ij", first, second) / 10
    order = cross_covariance_greedy(*(torch.from_numpy(a) for a in (first, second, target)), 6).tolist()
    assert order == brute_force_clipcov(first, second, target, 6)


def test_clipcov_aiming_past_the_mean_leaves_mismatched_pairs_out():
    # 40 pairs whose second half is the first's class code, 8 whose second half is another class's
    rng = np.random.default_rng(0)
    classes = rng.integers(4, size=48)
    first = np.eye(4)[classes] + 0.1 * rng.normal(size=(48, 4))
    second = np.eye(4)[np.where(np.arange(48) < 40, classes, (classes + 1) % 4)] + 0.1 * rng.normal(size=(48, 4))
    unit = [torch.from_numpy(a / np.linalg.norm(a, axis=1, keepdims=True)) for a in (first, second)]
    target = unit[0].T @ unit[1] / 48
    # aimed at the data's mean, the subset reproduces its share of mismatched pairs (8 of 48) ...
    assert 2 <= sum(i >= 40 for i in cross_covariance_greedy(*unit, target, 20).tolist()) <= 4
    # ... aimed at twice it (ClipCov's weight on a pair's own alignment), it takes none
    assert sum(i >= 40 for i in cross_covariance_greedy(*unit, 2 * target, 20).tolist()) == 0
    with pytest.raises(ValueError, match=r"target must be \(4, 4\)"):
        cross_covariance_greedy(*unit, target[:2], 3)


def test_expected_similarity_refuses_integer_and_nan_views():
    with pytest.raises(TypeError, match="views must be a floating point tensor"):
        expected_similarity(torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="views hold NaN or inf"):
        expected_similarity(torch.full((2, 3, 4), float("nan")))


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float16, 20.0), (torch.float32, 1e9)])
def test_cross_covariance_greedy_picks_alike_where_float32_products_overflow(dtype, scale):
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(12, 4)), rng.normal(size=(12, 3))
    target = (first[:, :, None] * second[:, None, :]).mean(0)

    def picks(s: float, kind: torch.dtype) -> list[int]:
        a, b = (torch.from_numpy(v * s).to(kind) for v in (first, second))
        return cross_covariance_greedy(a, b, torch.from_numpy(target * s * s).to(kind), 3).tolist()

    assert picks(scale / np.abs(first).max(), dtype) == picks(scale / np.abs(first).max(), torch.float64)
