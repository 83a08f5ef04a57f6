"""Streaming top-k: the k largest scores of a stream in O(k) memory, in a deterministic order."""

from __future__ import annotations

import torch


def _ranking(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Order by score descending, then id ascending: two stable sorts, the minor key first."""
    by_id = torch.sort(ids, stable=True).indices
    return by_id[torch.sort(scores[by_id], descending=True, stable=True).indices]


class StreamingTopK:
    """Keeps the k highest (score, id) pairs pushed so far.

    Order is score descending, ties broken by smaller id, so the result does not depend on how
    the stream was batched or ordered. Memory is O(k + largest batch).
    """

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self._k = k
        self._scores = torch.empty(0)
        self._ids = torch.empty(0, dtype=torch.int64)

    @property
    def k(self) -> int:
        return self._k

    def push(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Offer a batch: scores (m,) floating point, ids (m,) int64."""
        if scores.ndim != 1 or ids.ndim != 1 or scores.shape != ids.shape:
            raise ValueError(
                f"scores and ids must be 1-D of one length, got {tuple(scores.shape)} and {tuple(ids.shape)}"
            )
        if not scores.dtype.is_floating_point:
            raise TypeError(f"scores must be a floating point tensor, got {scores.dtype}")
        if ids.dtype != torch.int64:
            raise TypeError(f"ids must be int64, got {ids.dtype}")
        if torch.isnan(scores).any():
            raise ValueError("scores contain NaN")
        if self._scores.numel() == 0:
            # Adopt the first non-empty batch's device and dtype rather than those of the empty start.
            self._scores = self._scores.to(scores)
            self._ids = self._ids.to(scores.device)
        elif scores.numel() and scores.dtype != self._scores.dtype:  # a cast would rank them by batch order
            raise TypeError(f"scores must all be of one dtype: {self._scores.dtype} first, then {scores.dtype}")
        scores = torch.cat([self._scores, scores.to(self._scores)])
        ids = torch.cat([self._ids, ids.to(self._ids.device)])
        keep = _ranking(scores, ids)[: self._k]
        self._scores, self._ids = scores[keep], ids[keep]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, ids) of the current top k (fewer if fewer were pushed), best first."""
        return self._scores.clone(), self._ids.clone()
