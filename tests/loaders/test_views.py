"""Views for contrastive learning: batches of (x1, x2, y), each view its own draw of the random
augmentations, in the DALI graph or in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loaders import StreamingLoader
from nearstore import ParameterError

pytest.importorskip("nvidia.dali")
from nvidia.dali import fn  # noqa: E402


def torch_scale(x: torch.Tensor) -> torch.Tensor:
    """Each sample times its own random factor in [0.5, 2)."""
    return x * torch.empty(len(x), 1).uniform_(0.5, 2.0)


def dali_scale(x):
    return x * fn.random.uniform(range=[0.5, 2.0])


def undo_scale(view: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """An id store's sample i is i + (0, ..., 0.5) across its 8 features: (ids, factors) of a view
    (exact in float32 for the first 500 ids)."""
    factor = (view[:, 7] - view[:, 0]) / 0.5
    return (view[:, 0] / factor).round().long().numpy(), factor.numpy()


@pytest.mark.parametrize(
    "backend, transforms",
    [("torch", {"transform": torch_scale}), ("dali", {"dali_transform": dali_scale})],
    ids=["torch", "dali"],
)
def test_each_view_draws_its_own_augmentation_of_the_same_samples(id_store, backend, transforms):
    torch.manual_seed(0)
    loader = StreamingLoader(id_store, np.arange(500), batch_size=64, views=2, backend=backend, **transforms)
    seen = []
    for first, second, y in loader:
        ids, factors = undo_scale(first)
        second_ids, second_factors = undo_scale(second)
        np.testing.assert_array_equal(ids, second_ids)  # the same samples, in the same rows
        np.testing.assert_array_equal(ids % 5, y.numpy())
        assert np.all((factors > 0.49) & (factors < 2.01)) and np.all((second_factors > 0.49) & (second_factors < 2.01))
        assert np.mean(np.abs(factors - second_factors) > 1e-3) > 0.9  # drawn apart, not one view twice
        seen += ids.tolist()
    assert sorted(seen) == loader.ids.tolist()


def test_views_with_weights_and_a_torch_transform_after_dali(id_store):
    loader = StreamingLoader(
        id_store,
        np.arange(500),
        batch_size=50,
        views=3,
        weights=True,
        backend="dali",
        dali_transform=dali_scale,
        transform=lambda x: x + 1,  # after the graph: once on each view
    )
    first, second, third, y, w = next(iter(loader))
    ids = [undo_scale(view - 1)[0] for view in (first, second, third)]
    np.testing.assert_array_equal(ids[0], ids[1])
    np.testing.assert_array_equal(ids[0], ids[2])
    assert torch.equal(y, torch.from_numpy(ids[0] % 5)) and torch.all(w == 1)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"views": 2}, "views=2 needs a random transform"),
        ({"views": 0, "transform": torch_scale}, "views must be"),
        ({"views": 1.5, "transform": torch_scale}, "views must be"),
    ],
)
def test_bad_views_are_refused_by_name(id_store, options, message):
    with pytest.raises(ParameterError, match=message):
        StreamingLoader(id_store, **options)
