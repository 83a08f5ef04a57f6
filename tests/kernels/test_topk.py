from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import StreamingTopK

# Few distinct values, so ties (and ±inf) are common and the tie-break is exercised.
SCORES = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5, float("inf"), float("-inf")]), st.floats(-10, 10))


def brute_force(scores: list[float], ids: list[int], k: int) -> tuple[list[float], list[int]]:
    best = sorted(zip(scores, ids), key=lambda pair: (-pair[0], pair[1]))[:k]
    return [s for s, _ in best], [i for _, i in best]


def run_stream(scores: list[float], ids: list[int], k: int, cuts: list[int], device: str = "cpu") -> StreamingTopK:
    topk = StreamingTopK(k)
    bounds = [0, *sorted(cuts), len(scores)]
    for start, stop in zip(bounds, bounds[1:]):
        topk.push(
            torch.tensor(scores[start:stop], dtype=torch.float64, device=device),
            torch.tensor(ids[start:stop], dtype=torch.int64, device=device),
        )
    return topk


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_matches_brute_force_sort_for_any_batching(data: st.DataObject) -> None:
    scores = data.draw(st.lists(SCORES, max_size=60))
    ids = data.draw(st.lists(st.integers(-(2**40), 2**40), min_size=len(scores), max_size=len(scores), unique=True))
    k = data.draw(st.integers(0, len(scores) + 3))
    cuts = data.draw(st.lists(st.integers(0, len(scores)), max_size=8))

    got_scores, got_ids = run_stream(scores, ids, k, cuts).result()

    want_scores, want_ids = brute_force(scores, ids, k)
    assert got_scores.tolist() == want_scores
    assert got_ids.tolist() == want_ids


def test_result_is_independent_of_push_order(device: str) -> None:
    rng = random.Random(0)
    scores = [float(rng.randint(0, 20)) for _ in range(500)]  # many ties
    ids = list(range(500))
    reference = run_stream(scores, ids, 37, [100, 250], device).result()
    for _ in range(5):
        order = rng.sample(range(500), 500)
        cuts = rng.sample(range(500), rng.randint(0, 20))
        got = run_stream([scores[i] for i in order], [ids[i] for i in order], 37, cuts, device).result()
        assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])
    assert reference[0].device.type == device


def test_empty_and_zero_k() -> None:
    scores, ids = StreamingTopK(5).result()
    assert scores.shape == (0,) and ids.shape == (0,) and ids.dtype == torch.int64
    topk = StreamingTopK(0)
    topk.push(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    assert topk.result()[1].numel() == 0


def test_keeps_the_score_dtype_and_returns_copies() -> None:
    topk = StreamingTopK(2)
    topk.push(torch.tensor([0.25, 3.0, 1.0], dtype=torch.float64), torch.tensor([4, 5, 6]))
    scores, ids = topk.result()
    assert scores.dtype == torch.float64 and scores.tolist() == [3.0, 1.0] and ids.tolist() == [5, 6]
    scores[0] = -1
    assert topk.result()[0][0] == 3.0


def test_errors() -> None:
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        StreamingTopK(-1)
    topk = StreamingTopK(3)
    with pytest.raises(ValueError, match="scores contain NaN"):
        topk.push(torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"1-D of one length, got \(2,\) and \(3,\)"):
        topk.push(torch.tensor([1.0, 2.0]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"got \(1, 2\) and \(2,\)"):
        topk.push(torch.tensor([[1.0, 2.0]]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="ids must be int64, got torch.int32"):
        topk.push(torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32))
    with pytest.raises(TypeError, match="scores must be a floating point tensor"):
        topk.push(torch.tensor([1]), torch.tensor([0]))
    assert topk.result()[0].numel() == 0


def test_a_batch_of_another_dtype_is_refused_not_cast():
    # cast to the first batch's float32, 2.0000001 (id 2) tied 2.0 (id 1): the order of batches chose
    top = StreamingTopK(1)
    top.push(torch.tensor([2.0]), torch.tensor([1]))
    with pytest.raises(TypeError, match="scores must all be of one dtype: torch.float32 first, then torch.float64"):
        top.push(torch.tensor([2.0000001], dtype=torch.float64), torch.tensor([2]))
