"""AdaCore: the last layer's curvature against autograd's Hessian, the preconditioned medoids
against brute force, the selection's budgets and weights, the curvature's running average across
rounds, bad options and bad carries named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import last_layer_factors
from nearstore import AdaCore, Craig, DatasetError, ModelProxy, ParameterError, RandomFeatureProxy, write_dataset
from nearstore.selection.selectors.adacore import curvature, preconditioned
from nearstore.selection.windows import medoids


def factors(n: int = 9, classes: int = 4, hidden: int = 3, seed: int = 0):
    """(residuals, inputs [h, 1], labels, W) of a random last layer, in float64."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=generator, dtype=torch.float64)
    weights = torch.randn(classes, hidden + 1, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=generator)
    logits = h @ weights[:, :-1].T + weights[:, -1]
    residual, inputs = last_layer_factors(logits, labels, h)
    return residual, inputs, labels, weights


def test_the_curvature_is_the_diagonal_of_the_last_layers_hessian():
    residual, inputs, labels, weights = factors()
    classes, width = weights.shape

    def loss(flat: torch.Tensor) -> torch.Tensor:  # mean cross-entropy of z = W [h, 1]
        return torch.nn.functional.cross_entropy(inputs @ flat.reshape(classes, width).T, labels)

    hessian = torch.autograd.functional.hessian(loss, weights.flatten())
    torch.testing.assert_close(curvature(residual, inputs).flatten(), hessian.diagonal())


def test_gradients_are_divided_by_the_damped_curvature():
    residual, inputs, _, _ = factors()
    diagonal = curvature(residual, inputs)
    expected = torch.stack([torch.outer(r, x) / (diagonal + 0.5 * diagonal.mean()) for r, x in zip(residual, inputs)])
    torch.testing.assert_close(preconditioned(residual, inputs, diagonal, 0.5), expected.flatten(1))
    # a model certain of every sample has no curvature: the gradients as they are, not divided by ~0
    plain = preconditioned(residual, inputs, torch.zeros_like(diagonal), 0.5)
    torch.testing.assert_close(plain, torch.stack([torch.outer(r, x) for r, x in zip(residual, inputs)]).flatten(1))


def test_a_window_keeps_the_medoids_of_its_preconditioned_gradients():
    residual, inputs, _, _ = factors(n=40, seed=3)
    ((rows, weights, scores),) = AdaCore(damping=0.5).pick([((residual, inputs), 6)])
    expected_rows, expected_weights = medoids(preconditioned(residual, inputs, curvature(residual, inputs), 0.5), 6)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(weights, expected_weights)
    assert weights.mean() == pytest.approx(1.0) and np.isnan(scores).all()
    craig_rows, _ = medoids((residual[:, :, None] * inputs[:, None, :]).flatten(1), 6)
    assert set(rows.tolist()) != set(craig_rows.tolist())  # the curvature changes what is close


def test_a_window_after_a_round_is_preconditioned_by_the_running_average():
    residual, inputs, _, _ = factors(n=40, seed=3)
    prior = torch.rand(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    carried = {"curvature": prior.numpy(), "proxy": np.array("RandomFeatureProxy")}
    resumed = AdaCore(damping=0.5, average=0.7).resumed(carried, None)
    ((rows, weights, _),) = resumed.pick([((residual, inputs), 6)])
    blend = 0.7 * prior.float().double() + 0.3 * curvature(residual, inputs)
    expected_rows, expected_weights = medoids(preconditioned(residual, inputs, blend, 0.5), 6)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(weights, expected_weights)
    afresh = AdaCore(damping=0.5, average=0.7).pick([((residual, inputs), 6)])[0][0]
    assert set(rows.tolist()) != set(afresh.tolist())  # the average changed what is close
    # an average of other features (another shape, or another kind of proxy) is not used: afresh
    other_shape = AdaCore(damping=0.5, average=0.7).resumed({**carried, "curvature": np.ones((4, 7))}, None)
    np.testing.assert_array_equal(other_shape.pick([((residual, inputs), 6)])[0][0], afresh)
    model = ModelProxy(torch.nn.Linear(3, 4))
    other_kind = AdaCore(damping=0.5, average=0.7).resumed(carried, model)
    np.testing.assert_array_equal(other_kind.pick([((residual, inputs), 6)])[0][0], afresh)


@pytest.mark.parametrize(
    "curvature_handed_on", [np.full((2, 3), np.nan), -np.ones((2, 3)), np.ones(3)], ids=["nan", "negative", "1-d"]
)
def test_a_bad_running_average_is_refused_by_name(curvature_handed_on):
    carried = {"curvature": curvature_handed_on, "proxy": np.array("RandomFeatureProxy")}
    with pytest.raises(DatasetError, match="adacore: the curvature handed on"):
        AdaCore().resumed(carried, None)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 900)
    x = (rng.normal(size=(900, 6)) + 2 * np.eye(3, 6)[y]).astype(np.float32)
    url = str(tmp_path_factory.mktemp("adacore") / "b.zarr")
    return write_dataset(url, [{"x": x, "y": y}], shard_samples=128), x, y


@pytest.mark.parametrize("pool", [None, 2.0])
def test_selection_keeps_each_class_budget_with_weights_of_mean_one(blobs, pool):
    dataset, x, y = blobs
    proxy = RandomFeatureProxy(3, width=8, seed=1).fit(x, y)
    selection = AdaCore(window=128, pool=pool).select(dataset, 0.2, proxy=proxy, seed=4)
    counts = np.bincount(y[selection.ids], minlength=3)
    np.testing.assert_array_equal(counts, np.round(0.2 * np.bincount(y, minlength=3)))
    assert len(np.unique(selection.ids)) == len(selection.ids)
    assert selection.weights.mean() == pytest.approx(1.0, abs=0.05) and selection.weights.min() > 0
    assert selection.method == "adacore" and selection.params["damping"] == 0.1
    craig = Craig(window=128).select(dataset, 0.2, proxy=proxy, seed=4)
    if pool is None:
        assert set(selection.ids.tolist()) != set(craig.ids.tolist())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"window": 1}, "window must be"),
        ({"damping": 0}, "damping must be"),
        ({"damping": float("nan")}, "damping must be"),
        (
            {"damping": 1e300},
            r"damping must be a number in \(0, 1000000.0\]",
        ),  # its denominator overflowed: every gradient 0
        ({"pool": 0.5}, "pool must be"),
        ({"average": 1.0}, "average must be"),
        ({"average": -0.1}, "average must be"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ParameterError, match=message):
        AdaCore(**options)


def test_a_round_hands_on_the_mean_curvature_of_its_samples_averaged_with_the_last(blobs):
    dataset, x, y = blobs
    proxy = RandomFeatureProxy(3, width=8, seed=1).fit(x, y)
    first = AdaCore(window=128).select(dataset, 0.2, proxy=proxy, seed=4)
    mean = curvature(*proxy.gradient_factors(x, y)).double().numpy()
    np.testing.assert_allclose(first.carry["curvature"], mean, rtol=1e-4, atol=1e-7)
    assert str(first.carry["proxy"]) == "RandomFeatureProxy"

    # the next round, scored by the same kind of proxy on other weights, blends its own mean in
    other = RandomFeatureProxy(3, width=8, seed=2).fit(x, y)
    own = curvature(*other.gradient_factors(x, y)).double().numpy()
    second = AdaCore(window=128, average=0.6).select(dataset, 0.2, proxy=other, seed=4, carried=first.carry)
    np.testing.assert_allclose(second.carry["curvature"], 0.6 * mean + 0.4 * own, rtol=1e-4, atol=1e-7)
    alone = AdaCore(window=128, average=0.6).select(dataset, 0.2, proxy=other, seed=4)
    np.testing.assert_allclose(alone.carry["curvature"], own, rtol=1e-4, atol=1e-7)
    assert not np.array_equal(second.ids, alone.ids)
    np.testing.assert_array_equal(
        AdaCore(window=128, average=0).select(dataset, 0.2, proxy=other, seed=4, carried=first.carry).ids, alone.ids
    )
