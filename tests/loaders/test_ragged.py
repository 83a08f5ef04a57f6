"""Ragged numeric samples through the loader (jagged nested tensors, resumed exactly, with or
without the cache) and through selection: the model-free proxy's summaries of them, and the
trainer's model handed them as the loader yields them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loaders import StreamingLoader
from nearstore import DatasetError, Graft, ParameterError, RandomFeatureProxy, write_dataset
from nearstore.selection.proxies import RAGGED_BINS, RAGGED_POINTS, ragged_features
from nearstore.storage.images import ImageTransform

CLASSES, N = 4, 1200


def ragged(samples: list[np.ndarray]) -> np.ndarray:
    array = np.empty(len(samples), dtype=object)
    array[:] = samples
    return array


def tokens_of(label: int, rng: np.random.Generator) -> np.ndarray:
    """A sequence of 3..40 token ids, most from its class's own 50 (100 c .. 100 c + 49)."""
    ids = rng.integers(0, 50, rng.integers(3, 40)) + 100 * label
    noise = rng.random(len(ids)) < 0.3
    ids[noise] = rng.integers(0, 100 * CLASSES, noise.sum())
    return ids.astype(np.int32)


def signal_of(label: int, rng: np.random.Generator) -> np.ndarray:
    """A (L, 2) float32 signal, L in 10..90: a sine of the class's frequency, and noise."""
    t = np.linspace(0, 1, rng.integers(10, 90))
    return np.stack([np.sin(2 * np.pi * (label + 1) * t), 0.3 * rng.normal(size=len(t))], 1).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, N)
    batch = {
        "tokens": ragged([tokens_of(c, rng) for c in y]),
        "signal": ragged([signal_of(c, rng) for c in y]),
        "y": y,
    }
    url = str(tmp_path_factory.mktemp("ragged") / "ragged.zarr")
    return write_dataset(url, [batch], shard_samples=128), batch


def as_lists(batches) -> list[tuple[list[list[int]], list[int]]]:
    return [([t.tolist() for t in x.unbind()], y.tolist()) for x, y in batches]


@pytest.mark.parametrize("cache", [True, False])
def test_batches_are_the_stored_samples_and_resume_exactly(store, cache):
    dataset, written = store
    ids = np.arange(0, N, 2)
    loader = StreamingLoader(dataset, ids, batch_size=50, input_array="tokens", cache=cache, seed=3, device="cpu")
    loader.set_epoch(1)
    whole = as_lists(loader)
    by_label = {}
    for xs, ys in whole:
        for x, y in zip(xs, ys):
            by_label.setdefault(y, []).append(x)
    expected = {}
    for i in ids:
        expected.setdefault(int(written["y"][i]), []).append(written["tokens"][i].tolist())
    assert {c: sorted(v) for c, v in by_label.items()} == {c: sorted(v) for c, v in expected.items()}

    loader.set_epoch(1)
    iterator = iter(loader)
    for _ in range(4):
        next(iterator)
    state = loader.state_dict()
    resumed = StreamingLoader(dataset, ids, batch_size=50, input_array="tokens", cache=cache, seed=3, device="cpu")
    resumed.load_state_dict(state)
    assert as_lists(resumed) == whole[4:]


def test_rows_keep_their_shape_and_dtype(store):
    dataset, written = store
    loader = StreamingLoader(dataset, [7, 3, 900], batch_size=3, input_array="signal", shuffle=False, device="cpu")
    ((x, y),) = list(loader)
    assert x.is_nested and x.dtype == torch.float32 and x.shape[0] == 3 and x.shape[2] == 2
    for got, i in zip(x.unbind(), [3, 7, 900]):
        np.testing.assert_array_equal(got.numpy(), written["signal"][i])
    assert x.to_padded_tensor(0.0).shape == (3, max(len(written["signal"][i]) for i in (3, 7, 900)), 2)


def test_dali_and_image_options_are_refused_by_array(store):
    dataset, _ = store
    with pytest.raises(ParameterError, match="array 'tokens' of .* holds ragged samples.*backend='torch'"):
        StreamingLoader(dataset, input_array="tokens", backend="dali")
    with pytest.raises(ParameterError, match="array 'signal' of .* holds ragged numeric ones"):
        StreamingLoader(dataset, input_array="signal", images=ImageTransform())


def test_the_model_free_summaries_are_exact_on_small_cases():
    ramp = (2.0 + 0.5 * np.arange(9, dtype=np.float32))[:, None]  # one channel, 9 rows
    empty, single = np.zeros((0, 1), np.float32), np.full((1, 1), 4.0, np.float32)
    features = ragged_features(ragged([ramp, empty, single]))
    assert features.shape == (3, RAGGED_POINTS + 1)
    np.testing.assert_allclose(features[0, :-1], np.linspace(2.0, 6.0, RAGGED_POINTS), rtol=1e-6)
    np.testing.assert_array_equal(features[1], np.zeros(RAGGED_POINTS + 1))
    np.testing.assert_array_equal(features[2, :-1], np.full(RAGGED_POINTS, 4.0))
    np.testing.assert_allclose(features[:, -1], np.log1p([9, 0, 1]), rtol=1e-6)

    tokens = np.array([5, 9, 9, 70_000, -3], np.int32)
    bags = ragged_features(ragged([tokens, tokens[::-1].copy(), tokens[:1]]))
    assert bags.shape == (3, RAGGED_BINS + 1)
    np.testing.assert_array_equal(bags[0], bags[1])  # a bag: the order does not matter
    np.testing.assert_allclose(bags[:, :-1].sum(1), 1.0, rtol=1e-6)
    assert bags[2, :-1].max() == 1.0 and np.count_nonzero(bags[0, :-1]) <= 4  # 9 twice: one bin holds 0.4
    assert bags[0, :-1].max() >= 0.4 - 1e-6


@pytest.mark.parametrize("array", ["tokens", "signal"])
def test_the_model_free_proxy_tells_the_classes_apart_from_the_summaries(store, array):
    dataset, written = store
    half = N // 2
    proxy = RandomFeatureProxy(CLASSES, folds=1).fit(written[array][:half], written["y"][:half])
    predicted = proxy.logits(written[array][half:]).argmax(1).numpy()
    assert np.mean(predicted == written["y"][half:]) > 0.8  # chance: 0.25


def test_selection_runs_on_ragged_samples_with_either_proxy(store):
    dataset, written = store
    selection = Graft().select(dataset, 0.25)  # on the first input array: the tokens
    assert len(selection.ids) == round(0.25 * N)
    assert np.all(np.bincount(written["y"][selection.ids], minlength=CLASSES) > 0.15 * 0.25 * N)

    seen: list[torch.Tensor] = []

    class Bag(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.EmbeddingBag(100 * CLASSES, 8)
            self.head = torch.nn.Linear(8, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return self.head(self.embed(x.values().long(), x.offsets()[:-1]))

    loader = StreamingLoader(dataset, selection, batch_size=64, input_array="tokens", device="cpu")
    model = Bag()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    seen.clear()
    loader.update_proxy(model)
    loader.reselect(0.1)
    assert len(loader.ids) == round(0.1 * N)
    # the scan handed the model the samples as the loader yields them: nested, stored dtype and rows
    assert seen and all(x.is_nested and x.dtype == torch.int32 for x in seen)
    assert sum(len(x) for x in seen) >= len(loader.ids)
    stored = {tuple(t.tolist()) for t in written["tokens"]}
    assert all(tuple(t.tolist()) in stored for t in seen[0].unbind()[:20])


@pytest.mark.parametrize("first_empty", [True, False])
def test_a_model_is_probed_on_a_batch_where_the_first_sample_is_empty(tmp_path, first_empty):
    # a convolution over an empty sequence alone fails; in a batch it is padded to the longest, as
    # the model trains on it: update_proxy refused a model that trains. Where the first sample is
    # not empty, it alone is read (8 were, for images that may not decode)
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, 50, rng.integers(4, 12)) for _ in range(100)]
    if first_empty:
        tokens[0] = np.zeros(0, np.int64)
    dataset = write_dataset(str(tmp_path / "t.zarr"), [{"tokens": ragged(tokens), "y": np.arange(100) % 2}])

    class Conv(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.conv = torch.nn.Embedding(50, 4), torch.nn.Conv1d(4, 4, 3)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            padded = torch.nested.to_padded_tensor(x, 0) if x.is_nested else x
            return self.head(self.conv(self.embed(padded).transpose(1, 2)).amax(2))

    loader = StreamingLoader(dataset, batch_size=10, device="cpu", backend="torch")
    read = loader.stats.snapshot()
    loader.update_proxy(Conv())
    assert (loader.stats.snapshot() - read).samples == (1 + 8 if first_empty else 1)  # then the first 8
    loader.reselect(0.5)
    assert len(loader.ids) == 50


def test_ragged_integer_ids_of_any_size_are_selected(tmp_path):
    # 64-bit hashed ids were refused as 'a value past 1e18' though the proxy only hashes them
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    vocab = rng.integers(2**62, 2**63 - 1, size=(2, 30), dtype=np.int64)
    docs = [rng.choice(vocab[c], rng.integers(3, 20)) for c in y]
    dataset = write_dataset(str(tmp_path / "h.zarr"), [{"x": ragged(docs), "y": y}], shard_samples=64)
    assert len(Graft().select(dataset, 0.3).ids) == 60


def test_nan_in_a_ragged_sample_is_named(tmp_path):
    rng = np.random.default_rng(0)
    samples = [signal_of(i % CLASSES, rng) for i in range(300)]
    samples[211][5, 1] = np.nan
    dataset = write_dataset(str(tmp_path / "nan.zarr"), [{"signal": ragged(samples), "y": np.arange(300) % CLASSES}])
    with pytest.raises(DatasetError, match="sample 211 of array 'signal' contains NaN"):
        Graft().select(dataset, 0.5)
