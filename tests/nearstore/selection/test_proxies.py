"""The proxies: the model-free one fitted beside the data, and the trainer's model, against autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nearstore import ModelProxy, RandomFeatureProxy


@pytest.fixture(scope="module")
def blobs():
    """150 samples of 3 Gaussian classes: (x, y)."""
    rng = np.random.default_rng(0)
    y = np.arange(150) % 3
    return (rng.normal(size=(150, 6)) + 2 * np.eye(3, 6)[y]).astype(np.float32), y


def test_proxy_learns_and_rejects_bad_input(blobs):
    x, y = blobs
    proxy = RandomFeatureProxy(3, width=64).fit(x, y)
    assert (proxy.logits(x).argmax(1).numpy() == y).mean() > 0.9
    assert proxy.embed(x[:5], y[:5]).shape == (5, proxy.embedding_dim) == (5, 3 * 65)
    residual, inputs = proxy.gradient_factors(x[:5], y[:5])
    torch.testing.assert_close(torch.einsum("nc,nh->nch", residual, inputs).flatten(1), proxy.embed(x[:5], y[:5]))
    expected = torch.softmax(proxy.logits(x), 1)[torch.arange(len(y)), torch.from_numpy(y)]
    torch.testing.assert_close(proxy.confidence(x, y), expected)
    assert expected.mean() > 0.7  # the fitted head is confident on what it separates
    with pytest.raises(RuntimeError, match="not fitted"):
        RandomFeatureProxy(3).embed(x, y)
    with pytest.raises(ValueError, match="fitted on 6 input features, got 5"):
        proxy.embed(x[:, :5], y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        proxy.embed(x[:2], np.array([0, 3]))


def test_model_proxy_embeddings_are_the_last_layers_per_example_gradients(blobs):
    x, y = blobs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    model.train()
    proxy = ModelProxy(model, batch_size=7)  # chunks of 7: the hook must collect every chunk
    assert proxy.num_classes == 3 and proxy.embedding_dim == 3 * 13
    inputs = x[:20].astype(np.float64)
    embeddings = proxy.embed(inputs, y[:20])
    head = model[2]
    for i in range(20):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(inputs[i : i + 1])), torch.tensor(y[i : i + 1]))
        loss.backward()
        expected = torch.cat([head.weight.grad, head.bias.grad[:, None]], 1).flatten()
        torch.testing.assert_close(embeddings[i], expected)
    residual, features = proxy.gradient_factors(inputs, y[:20])
    torch.testing.assert_close(torch.einsum("nc,nh->nch", residual, features).flatten(1), embeddings)
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(inputs)), 1)[torch.arange(20), torch.from_numpy(y[:20])]
    torch.testing.assert_close(proxy.confidence(inputs, y[:20]), p)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) \(the model's outputs\)"):
        proxy.embed(inputs[:2], np.array([0, 5]))
    with pytest.raises(ValueError, match="has none"):
        ModelProxy(torch.nn.ReLU())
    with pytest.raises(ValueError, match="must end in its last nn.Linear"):
        ModelProxy(torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Softmax(1), torch.nn.Flatten(0))).embed(
            x[:4], y[:4]
        )
