from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import gradients_of_factors, last_layer_factors, last_layer_gradients


def autograd_gradients(layer: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example gradients of cross_entropy(reduction='sum') w.r.t. the layer, one backward each."""
    rows = []
    for h, y in zip(features, labels):
        layer.zero_grad()
        F.cross_entropy(layer(h[None]), y[None], reduction="sum").backward()
        grad = layer.weight.grad
        if layer.bias is not None:
            grad = torch.cat([grad, layer.bias.grad[:, None]], dim=1)
        rows.append(grad.flatten().clone())
    return torch.stack(rows)


@pytest.mark.parametrize("bias", [True, False])
def test_matches_autograd_on_a_linear_layer(bias: bool, device: str) -> None:
    torch.manual_seed(0)
    n, hidden, classes = 12, 7, 5
    layer = torch.nn.Linear(hidden, classes, bias=bias, dtype=torch.float64, device=device)
    features = torch.randn(n, hidden, dtype=torch.float64, device=device)
    labels = torch.randint(0, classes, (n,), device=device)
    with torch.no_grad():
        logits = layer(features)

    grads = last_layer_gradients(logits, labels, features, bias=bias)

    assert grads.shape == (n, classes * (hidden + bias))
    torch.testing.assert_close(grads, autograd_gradients(layer, features, labels), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_factors_give_the_gradients_and_their_gram_matrix(bias: bool) -> None:
    torch.manual_seed(3)
    logits, features = torch.randn(15, 4, dtype=torch.float64), torch.randn(15, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (15,))
    residual, inputs = last_layer_factors(logits, labels, features, bias=bias)
    assert residual.shape == (15, 4) and inputs.shape == (15, 6 + bias)
    grads = last_layer_gradients(logits, labels, features, bias=bias)
    torch.testing.assert_close(torch.einsum("nc,nh->nch", residual, inputs).flatten(1), grads)
    assert torch.equal(gradients_of_factors(residual, inputs), grads)  # bit for bit: CRAIG forms them so
    torch.testing.assert_close((residual @ residual.T) * (inputs @ inputs.T), grads @ grads.T)


def test_factors_of_several_draws_give_their_mean_gradient() -> None:
    torch.manual_seed(4)
    draws, labels = 3, torch.randint(0, 5, (9,))
    logits, features = torch.randn(draws, 9, 5), torch.randn(draws, 9, 6)
    logits[1, :, 0] = 95.0  # one draw confident: its residuals underflow to subnormals, flushed
    pairs = [last_layer_factors(z, labels, h) for z, h in zip(logits, features)]
    residual, inputs = (torch.stack(factor, 1) for factor in zip(*pairs))  # (n, A, C), (n, A, H + 1)
    mean = gradients_of_factors(residual, inputs)
    # bit for bit the mean of each draw's gradients, summed in draw order: AugmentAware formed it so
    total = last_layer_gradients(logits[0], labels, features[0])
    for z, h in zip(logits[1:], features[1:]):
        total += last_layer_gradients(z, labels, h)
    assert mean.shape == (9, 5 * 7) and torch.equal(mean, total / draws)
    explicit = torch.einsum("nac,nah->nch", residual.double(), inputs.double()).flatten(1) / draws
    torch.testing.assert_close(mean.double(), explicit, rtol=1e-6, atol=1e-7)
    one = gradients_of_factors(residual[:, :1], inputs[:, :1])
    assert torch.equal(one, gradients_of_factors(residual[:, 0], inputs[:, 0]))  # one draw: its gradients


def test_float32_inputs_match_autograd() -> None:
    torch.manual_seed(1)
    layer = torch.nn.Linear(16, 10)
    features = torch.randn(32, 16)
    labels = torch.randint(0, 10, (32,))
    grads = last_layer_gradients(layer(features).detach(), labels, features)
    assert grads.dtype == torch.float32
    torch.testing.assert_close(grads, autograd_gradients(layer, features, labels), rtol=1e-5, atol=1e-6)


def test_class_residuals_sum_to_zero() -> None:
    # Σ_c (p_c − onehot_c) = 0, so summed over classes every gradient block vanishes.
    torch.manual_seed(2)
    logits, features = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    labels = torch.randint(0, 6, (20,))
    grads = last_layer_gradients(logits, labels, features).reshape(20, 6, 5)
    torch.testing.assert_close(grads.sum(dim=1), torch.zeros(20, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[:, :, -1].sum(dim=1), torch.zeros(20, dtype=torch.float64), rtol=0, atol=1e-12)


def test_no_rows_give_an_empty_embedding() -> None:
    grads = last_layer_gradients(torch.empty(0, 3), torch.empty(0, dtype=torch.int64), torch.empty(0, 4))
    assert grads.shape == (0, 15)


@pytest.mark.parametrize("bad", [-1, 3, 7])
def test_label_out_of_range_names_the_value(bad: int) -> None:
    labels = torch.tensor([0, bad, 1])
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 3\), got {bad}"):
        last_layer_gradients(torch.zeros(3, 3), labels, torch.zeros(3, 2))


@pytest.mark.parametrize(
    ("logits", "labels", "features", "message"),
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.int64), torch.zeros(3, 2), r"logits must be 2-D, got shape \(3,\)"),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), torch.zeros(3), r"features must be 2-D"),
        (torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.int64), torch.zeros(3, 2), r"labels must be 1-D"),
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64), torch.zeros(3, 2), r"got 3, 2 and 3"),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), torch.zeros(4, 2), r"got 3, 3 and 4"),
        (
            torch.tensor([[0.0, float("nan")]]),
            torch.zeros(1, dtype=torch.int64),
            torch.zeros(1, 2),
            "logits contain NaN or inf",
        ),
        (
            torch.zeros(1, 2),
            torch.zeros(1, dtype=torch.int64),
            torch.tensor([[float("inf"), 0.0]]),
            "features contain NaN or inf",
        ),
    ],
)
def test_value_errors(logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        last_layer_gradients(logits, labels, features)


def test_type_errors() -> None:
    with pytest.raises(TypeError, match="labels must be an integer tensor, got torch.float32"):
        last_layer_gradients(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="logits must be a floating point tensor"):
        last_layer_gradients(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 4))
