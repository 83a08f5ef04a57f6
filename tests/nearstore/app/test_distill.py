"""Dataset distillation by gradient matching and its progressive form: the distance it minimises,
that it does minimise it, the stages' shapes and their round trip as nearstore datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nearstore import DatasetError, ParameterError, open_dataset
from nearstore.app.distill import distill, match_distance, write_stages


def blobs(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return (rng.normal(size=(n, 8)) + 2 * np.eye(3, 8)[y]).astype(np.float32), y.astype(np.int64)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_match_distance_is_one_minus_cosine_summed_over_output_rows():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    bias_a, bias_b = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0])
    assert float(match_distance([a, bias_a], [b, bias_b])) == pytest.approx((1 - 1) + (1 - 0) + (1 - (-1)))
    assert float(match_distance([a], [a])) == pytest.approx(0.0, abs=1e-6)


def mean_distance(sx: np.ndarray, sy: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """The matching distance of a synthetic set over 20 fresh networks (seeded)."""
    torch.manual_seed(123)
    total = 0.0
    for _ in range(20):
        net = mlp()

        def grad(a: np.ndarray, b: np.ndarray, net: nn.Module = net) -> tuple[torch.Tensor, ...]:
            loss = nn.functional.cross_entropy(net(torch.from_numpy(a)), torch.from_numpy(b))
            return torch.autograd.grad(loss, list(net.parameters()))

        for c in range(3):
            total += float(match_distance(grad(sx[sy == c], sy[sy == c]), grad(x[y == c], y[y == c])))
    return total / 20


def test_distillation_brings_the_synthetic_gradients_closer_to_the_real_ones():
    x, y = blobs()
    ((sx, sy),) = distill(x, y, mlp, per_class=2, outer=30, seed=1)
    assert sx.shape == (6, 8) and np.bincount(sy).tolist() == [2, 2, 2]
    ((start, _),) = distill(x, y, mlp, per_class=2, outer=1, inner=1, learning_rate=0.0, seed=1)  # real picks, unmoved
    assert mean_distance(sx, sy, x, y) < 0.9 * mean_distance(start, sy, x, y)  # 30 steps: 18% closer


def test_progressive_stages_are_sets_of_their_own_written_as_datasets(tmp_path):
    x, y = blobs()
    stages = distill(x, y, mlp, per_class=2, stages=3, outer=3, seed=0)
    assert len(stages) == 3 and all(sx.shape == (6, 8) for sx, _ in stages)
    assert not np.allclose(stages[0][0], stages[1][0])
    written = write_stages(stages, tmp_path)
    again = open_dataset(str(tmp_path / "stage-2.zarr"))
    np.testing.assert_array_equal(again.group["x"][:], stages[2][0])
    assert [d.num_samples for d in written] == [6, 6, 6]


@pytest.mark.parametrize("option", ["per_class", "stages", "outer", "inner"])
@pytest.mark.parametrize("value", [0, 2.5, True])
def test_bad_distillation_options_are_refused_by_name(option, value):
    x, y = blobs(30)
    with pytest.raises(ParameterError, match=f"{option} must be an integer >= 1, got {value}"):
        distill(x, y, mlp, **{"per_class": 1, option: value})


def test_bad_real_samples_are_refused_by_name():
    x, y = blobs(30)
    with pytest.raises(ParameterError, match="per_class=11 real samples start each class's .* class 0 has 10"):
        distill(x, y, mlp, per_class=11)
    x[7, 3] = np.nan  # one NaN made its class's whole synthetic set NaN
    with pytest.raises(DatasetError, match="sample 7 of x holds NaN or inf"):
        distill(x, y, mlp, per_class=1, outer=1)
    with pytest.raises(ParameterError, match="x and y must hold the same samples, got 30 and 29"):
        distill(x, y[1:], mlp, per_class=1)
