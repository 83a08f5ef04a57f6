"""Streaming k-means: centroids updated batch by batch (Sculley's mini-batch k-means, seeded by
k-means++ on the first batch), mergeable by a weighted k-means over two sketches' centroids, so
partitions of a dataset cluster apart and reduce in a tree. Memory O(k·d) whatever the stream."""

from __future__ import annotations

import math

import torch

from kernels.floats import all_finite
from kernels.seeds import seeded_generator


class StreamingKMeans:
    """k centroids of a stream of points (n, d): `update` each batch, `assign` points to their
    nearest centroid; `merge` another's clusters. `counts` holds the points each centroid has
    absorbed (its weight in a merge)."""

    def __init__(self, k: int, dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        if k < 1 or dim < 1:
            raise ValueError(f"k and dim must be >= 1, got k={k}, dim={dim}")
        self.k, self.dim, self.seed = k, dim, seed
        self.centroids = torch.zeros(0, dim, dtype=dtype)
        self.counts = torch.zeros(0, dtype=torch.float64)

    def update(self, points: torch.Tensor, passes: int = 1) -> None:
        """Absorb a batch: each point moves its nearest centroid towards it by 1 / (that centroid's
        count), `passes` times over the batch; the first batch seeds the centroids (k-means++)."""
        points = self._check(points)
        if not len(points):
            return
        if len(self.centroids) < self.k:
            self._seed(points)
        for _ in range(passes):
            nearest = self.assign(points)
            sums = torch.zeros_like(self.centroids).index_add_(0, nearest, points)
            added = torch.bincount(nearest, minlength=len(self.centroids)).to(torch.float64)
            moved = added > 0
            self.counts += added
            # c ← c + (mean of its new points − c) · added / count: the running mean of everything it absorbed
            rate = (added[moved] / self.counts[moved]).to(points.dtype)[:, None]
            means = sums[moved] / added[moved].to(points.dtype)[:, None]
            self.centroids[moved] += rate * (means - self.centroids[moved])

    def assign(self, points: torch.Tensor) -> torch.Tensor:
        """Each point's nearest centroid (n,)."""
        points = self._check(points)
        if not len(self.centroids):
            raise ValueError("no centroids yet: update() with a batch of points first")
        return torch.cdist(points, self.centroids).argmin(1)

    def merge(self, other: StreamingKMeans) -> StreamingKMeans:
        """This sketch with `other`'s clusters: k centroids of the union of both sets, weighted by
        their counts (Lloyd's iterations from a weighted k-means++ seeding)."""
        if (other.k, other.dim) != (self.k, self.dim):
            raise ValueError(f"cannot merge k-means of k={other.k}, dim={other.dim} into k={self.k}, dim={self.dim}")
        centroids = torch.cat([self.centroids, other.centroids.to(self.centroids.dtype)])
        counts = torch.cat([self.counts, other.counts])
        merged = StreamingKMeans(self.k, self.dim, seed=self.seed, dtype=self.centroids.dtype)
        merged.centroids, merged.counts = weighted_kmeans(centroids, counts, self.k, seed=self.seed)
        return merged

    def _seed(self, points: torch.Tensor) -> None:
        have = len(self.centroids)
        extra = kmeans_plus_plus(points, self.k - have, torch.ones(len(points), dtype=torch.float64), self.seed)
        self.centroids = torch.cat([self.centroids, points[extra]])
        self.counts = torch.cat([self.counts, torch.zeros(len(extra), dtype=torch.float64)])

    def _check(self, points: torch.Tensor) -> torch.Tensor:
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ValueError(f"points must be (n, {self.dim}), got {tuple(points.shape)}")
        if not all_finite(points):
            raise ValueError("points hold NaN or inf")
        return points.to(self.centroids.dtype)


def kmeans_plus_plus(points: torch.Tensor, k: int, weights: torch.Tensor, seed: int) -> torch.Tensor:
    """Row indices of up to k distinct seeds by greedy weighted k-means++ (as scikit-learn's): each
    step draws 2 + ⌊ln k⌋ candidates by D² sampling and keeps the one that leaves the least
    weighted squared distance, in draw order."""
    generator = seeded_generator(seed)
    weights = weights.to(torch.float64)
    trials = 2 + int(math.log(max(k, 1)))
    chosen: list[int] = []
    closest = torch.full((len(points),), float("inf"), dtype=torch.float64)
    for _ in range(min(k, len(points))):
        odds = weights * (closest if chosen else torch.ones_like(closest))
        odds[chosen] = 0
        if not odds.sum() > 0:  # every point left coincides with a seed: take the first unseeded
            free = torch.ones(len(points), dtype=torch.bool)
            free[chosen] = False
            if not free.any():
                break
            candidates = free.nonzero()[:1, 0]
        else:
            candidates = torch.multinomial(odds, min(trials, int((odds > 0).sum())), generator=generator)
        distances = torch.cdist(points[candidates].to(torch.float64), points.to(torch.float64)).square()
        left = torch.minimum(closest[None, :], distances)
        best = int((left * weights).sum(1).argmin())
        chosen.append(int(candidates[best]))
        closest = left[best]
    return torch.tensor(chosen, dtype=torch.long)


def weighted_kmeans(
    points: torch.Tensor, weights: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """k centroids of weighted points by Lloyd's iterations from a weighted k-means++ seeding, and
    the weight each holds; a centroid that loses every point stays where it was, weight 0. No
    points: no centroids (two sketches that saw nothing merge into one)."""
    if not len(points):
        return points[:0].clone(), torch.zeros(0, dtype=torch.float64)
    centroids = points[kmeans_plus_plus(points, k, weights, seed)].clone()
    held = torch.zeros(len(centroids), dtype=torch.float64)
    for _ in range(iterations):
        nearest = torch.cdist(points, centroids).argmin(1)
        held = torch.zeros(len(centroids), dtype=torch.float64).index_add_(0, nearest, weights.to(torch.float64))
        sums = torch.zeros(len(centroids), points.shape[1], dtype=torch.float64)
        sums.index_add_(0, nearest, points.to(torch.float64) * weights.to(torch.float64)[:, None])
        moved = held > 0
        updated = centroids.clone()
        updated[moved] = (sums[moved] / held[moved, None]).to(points.dtype)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids, held
