"""The scan's stages, each alone."""

from __future__ import annotations

import numpy as np
import torch

from nearstore.selection.stages import SuspectsFound, mute_suspects, rebatch


def test_rebatch_joins_consecutive_batches_in_order():
    sizes = [3, 5, 2, 7, 1]
    starts = np.cumsum([0, *sizes])
    batches = [(np.arange(a, b), {"x": np.arange(a, b) * 10.0}) for a, b in zip(starts, starts[1:])]
    joined = list(rebatch(iter(batches), 6))
    assert [len(ids) for ids, _ in joined] == [8, 9, 1]  # each at least 6 but the last
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in joined]), np.arange(18))
    for ids, batch in joined:
        np.testing.assert_array_equal(batch["x"], ids * 10.0)


def _judged(probs: np.ndarray, labels: np.ndarray, batch: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """mute_suspects over a stream of these probabilities in batches: (suspect ids, whose gradient
    was zeroed)."""
    found, zeroed = SuspectsFound(), []
    stream = []
    for start in range(0, len(labels), batch):
        y, p = labels[start : start + batch], torch.from_numpy(probs[start : start + batch])
        residual = p - torch.nn.functional.one_hot(torch.from_numpy(y), p.shape[1]).double()
        groups = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
        stream.append(
            (np.arange(start, start + len(y)), groups, (residual, torch.ones(len(y), 3, dtype=torch.float64)))
        )
    for ids, _, (residual, _) in mute_suspects(stream, probs.shape[1], found):
        zeroed.append(ids[(residual == 0).all(1).numpy()])
    return np.sort(found.suspects().ids), np.concatenate(zeroed)


def test_an_unsure_proxy_still_finds_wrong_labels():
    """A proxy right about every sample but sure of none (0.4 on the true class, 0.2 on the others),
    as one trained on wrong labels is: the floor follows its confidence down, and the wrong labels,
    and only they, are muted; a fixed floor of 1/2 would find none."""
    rng = np.random.default_rng(0)
    truth = np.arange(400) % 4
    labels = np.where(rng.random(400) < 0.2, (truth + rng.integers(1, 4, 400)) % 4, truth)
    probs = np.full((400, 4), 0.2)
    probs[np.arange(400), truth] = 0.4
    suspects, zeroed = _judged(probs, labels)
    np.testing.assert_array_equal(suspects, np.flatnonzero(labels != truth))
    np.testing.assert_array_equal(zeroed, suspects)


def test_a_sure_proxy_keeps_the_majority_floor():
    """Where the proxy is sure of most samples, another class must hold half the probability: a
    class it is unsure of (its own samples at 0.4) does not claim samples at 0.45 (the floor is
    min(1/2, 0.6 × 0.81) there)."""
    labels = np.arange(400) % 4
    probs = np.full((400, 4), 0.01)
    probs[np.arange(400), labels] = 0.97
    unsure = labels == 3
    probs[unsure] = [0.2, 0.2, 0.2, 0.4]
    hard = np.flatnonzero(labels == 0)[-10:]  # labelled 0, class 3 at 0.45 ≥ t_3 ≈ 0.4, below the floor
    probs[hard] = [0.4, 0.1, 0.05, 0.45]
    suspects, _ = _judged(probs, labels)
    assert len(suspects) == 0
    probs[hard] = [0.3, 0.1, 0.05, 0.55]  # past the majority: suspects
    np.testing.assert_array_equal(_judged(probs, labels)[0], hard)
