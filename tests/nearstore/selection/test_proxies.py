"""The proxies: the model-free one fitted beside the data, and the trainer's model, against autograd."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nearstore import ModelProxy, ParameterError, RandomFeatureProxy, sage_select, write_dataset
from nearstore.selection.proxies import sample_folds


@pytest.fixture(scope="module")
def blobs():
    """150 samples of 3 Gaussian classes: (x, y)."""
    rng = np.random.default_rng(0)
    y = np.arange(150) % 3
    return (rng.normal(size=(150, 6)) + 2 * np.eye(3, 6)[y]).astype(np.float32), y


def test_proxy_learns_and_rejects_bad_input(blobs):
    x, y = blobs
    proxy = RandomFeatureProxy(3, width=64, folds=1).fit(x, y)  # one head, judging what it saw
    assert (proxy.logits(x).argmax(1).numpy() == y).mean() > 0.9
    assert (RandomFeatureProxy(3, width=64).fit(x, y).logits(x).argmax(1).numpy() == y).mean() > 0.75  # held out
    assert proxy.embed(x[:5], y[:5]).shape == (5, proxy.embedding_dim) == (5, 3 * 65)
    residual, inputs = proxy.gradient_factors(x[:5], y[:5])
    torch.testing.assert_close(torch.einsum("nc,nh->nch", residual, inputs).flatten(1), proxy.embed(x[:5], y[:5]))
    expected = torch.softmax(proxy.logits(x), 1)[torch.arange(len(y)), torch.from_numpy(y)]
    torch.testing.assert_close(proxy.confidence(x, y), expected)
    assert expected.mean() > 0.7  # the fitted head is confident on what it separates
    with pytest.raises(RuntimeError, match="not fitted"):
        RandomFeatureProxy(3).embed(x, y)
    with pytest.raises(ValueError, match=r"fitted on samples of shape \(6,\), got \(5,\)"):
        proxy.embed(x[:, :5], y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        proxy.embed(x[:2], np.array([0, 3]))
    with pytest.raises(ValueError, match="folds must be >= 1, got 0"):
        RandomFeatureProxy(3, folds=0)


def test_seeds_apart_only_above_bit_32_draw_other_features(blobs):
    """torch's generator takes a seed's low 32 bits: the proxy's seed, in [0, 2**64), all of them."""
    x, y = blobs
    embeddings = [
        RandomFeatureProxy(3, width=16, seed=seed).fit(x, y).embed(x, y) for seed in (1, 1 + 2**32, 1 + 2**63)
    ]
    assert not any(torch.equal(a, b) for i, a in enumerate(embeddings) for b in embeddings[i + 1 :])


def test_a_warm_up_of_one_sample_fits_finite_heads(blobs):
    """One sample's spread is no NaN (a store whose every image but one is damaged)."""
    x, y = blobs
    proxy = RandomFeatureProxy(3, width=16, folds=1).fit(x[:1], y[:1])
    assert torch.isfinite(proxy.logits(x)).all()


@pytest.mark.parametrize("scale", [1e-8, 1e6])
def test_the_model_free_proxy_knows_as_much_of_data_at_any_scale(blobs, scale):
    # a spread floored at 1e-6 itself squashed values near 1e-8 (SI units): a mean p(y | x) of
    # 0.44 where the same data gave 0.81, and GRAFT drew its windows at random
    x, y = blobs
    one = RandomFeatureProxy(3, width=16, folds=1).fit(x, y).confidence(x, y)
    scaled = (x * scale).astype(np.float32)
    other = RandomFeatureProxy(3, width=16, folds=1).fit(scaled, y).confidence(scaled, y)
    torch.testing.assert_close(other, one, atol=1e-3, rtol=1e-3)
    constant = RandomFeatureProxy(3, width=16, folds=1).fit(np.full_like(x, 1e-9), y)
    assert torch.isfinite(constant.logits(x)).all()


@pytest.mark.parametrize(("dtype", "unit", "offset"), [(np.float64, 1e-6, 1000.0), (np.int64, 1e6, 10**15)])
def test_the_model_free_proxy_knows_as_much_of_data_far_from_zero(blobs, dtype, unit, offset):
    # float64 samples 1000 + 1e-6 s were cast to float32 (one value) before standardizing, and a
    # spread floored at 1e-6 of their magnitude squashed what was left: 0 suspects where the same
    # data about 0 had 99
    x, y = blobs
    near = (x * unit).astype(dtype)
    far = near + dtype(offset)
    assert len(np.unique(far.astype(np.float32), axis=0)) < len(far) // 10  # float32 would lose it
    one = RandomFeatureProxy(3, width=16, folds=1).fit(near, y).confidence(near, y)
    other = RandomFeatureProxy(3, width=16, folds=1).fit(far, y).confidence(far, y)
    torch.testing.assert_close(other, one, atol=1e-3, rtol=1e-3)


def test_the_model_free_proxy_sees_float64_images_far_from_zero():
    # images of 1000 + 1e-6 s were narrowed to float32 before each was standardized: one feature row
    rng = np.random.default_rng(0)
    y = np.arange(64) % 2
    near = rng.normal(size=(64, 3, 8, 8)) * 1e-6 + y[:, None, None, None] * 1e-6
    proxy = RandomFeatureProxy(2, width=16, folds=1).fit(near, y)
    far = RandomFeatureProxy(2, width=16, folds=1).fit(near + 1000.0, y)
    assert len(np.unique(far.features(near + 1000.0).numpy().round(4), axis=0)) == 64
    torch.testing.assert_close(far.features(near + 1000.0), proxy.features(near), atol=1e-3, rtol=1e-3)


def test_cross_fitted_heads_judge_the_warm_up_out_of_sample(blobs):
    """A head fitted on a wrong label believes it; the head of the other fold does not."""
    x, y = blobs
    wrong = y.copy()
    flipped = np.random.default_rng(1).choice(len(y), 30, replace=False)
    wrong[flipped] = (wrong[flipped] + 1) % 3
    in_sample = RandomFeatureProxy(3, width=64, folds=1).fit(x, wrong).confidence(x, wrong).numpy()
    held_out = RandomFeatureProxy(3, width=64).fit(x, wrong).confidence(x, wrong).numpy()
    clean = np.setdiff1d(np.arange(len(y)), flipped)
    assert held_out[flipped].mean() < 0.5 * in_sample[flipped].mean()
    assert held_out[flipped].mean() < 0.5 * held_out[clean].mean()


def test_the_warm_up_held_out_gives_each_class_its_recall_and_median_confidence(blobs):
    """What round 0 trusts the model-free proxy by: per class, how often the head that did not see
    a warm-up sample gives its label the top probability, and the median of that probability; a
    class the warm-up misses has neither, and labels the inputs say nothing of are near chance."""
    x, y = blobs
    proxy = RandomFeatureProxy(4, width=64).fit(x, y)  # class 3 is in no sample
    confidence, top = proxy.confidence(x, y).numpy(), proxy.logits(x).argmax(1).numpy()
    for c in range(3):
        assert proxy.held_out_recall[c] == pytest.approx((top[y == c] == c).mean())
        assert proxy.median_confidence[c] == pytest.approx(np.sort(confidence[y == c])[(np.sum(y == c) - 1) // 2])
    assert np.isnan(proxy.held_out_recall[3]) and np.isnan(proxy.median_confidence[3])
    assert proxy.held_out_recall[:3].min() > 0.7
    noise = np.random.default_rng(2).integers(0, 3, len(y))
    assert RandomFeatureProxy(3, width=64).fit(x, noise).held_out_recall.mean() < 0.5
    assert RandomFeatureProxy(3).fit(x, None).held_out_recall is None  # fitted without labels


def test_sample_folds_are_a_function_of_the_bytes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 40)).astype(np.float32)
    folds = sample_folds(x, 2)
    assert abs(folds.mean() - 0.5) < 0.03  # balanced
    np.testing.assert_array_equal(sample_folds(x[::-1], 2), folds[::-1])  # not where, what
    np.testing.assert_array_equal(sample_folds(np.concatenate([x[:5], x[:5]]), 2), np.tile(folds[:5], 2))  # copies
    images = rng.integers(0, 256, size=(200, 3, 128, 128), dtype=np.uint8)  # more words than multipliers
    other = images.copy()
    other[:, 2, 127, 127] ^= 1  # the last byte alone decides
    assert 0.4 < sample_folds(images, 2).mean() < 0.6
    assert (sample_folds(images, 2) != sample_folds(other, 2)).mean() > 0.3
    assert set(sample_folds(x, 3).tolist()) == {0, 1, 2}


class MeanOfRows(torch.nn.Module):
    """A nested batch (B, j, D) to the mean of each sample's rows, (B, D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([sample.mean(0) for sample in x.unbind()])


class Counted(torch.nn.Module):
    """Global-average-pooled images (3 channels, any size) to 4 classes; records its batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 4)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return self.head(x.mean((2, 3)))


def test_model_proxy_runs_large_inputs_in_chunks_bounded_by_their_bytes(monkeypatch):
    # a chunk of 2,048 images of 224 x 224 held 31 GB of the demo CNN's activations
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 3, 64, 64)).astype(np.float32), rng.integers(0, 4, 40)
    torch.manual_seed(0)
    model = Counted()
    whole = ModelProxy(model).gradient_factors(x, y)
    assert model.batches == [40]  # 1.9 MB: one chunk
    monkeypatch.setattr("nearstore.selection.proxies.CHUNK_INPUT_BYTES", 8 * 3 * 64 * 64 * 4)
    model.batches.clear()
    chunked = ModelProxy(model).gradient_factors(x, y)
    assert model.batches == [8] * 5  # 8 images a chunk, whatever batch_size allows
    for part, expected in zip(chunked, whole):
        torch.testing.assert_close(part, expected)
    model.batches.clear()
    ModelProxy(model).gradient_factors(x[:0], y[:0])  # nothing to score: an empty run, as whole
    assert model.batches == [0]


class RaggedCounted(torch.nn.Module):
    """A nested batch (B, j, 3) to the mean of each sample's rows, then 4 classes; records each
    chunk's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 4)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(x.values()))
        return self.head(torch.stack([sample.mean(0) for sample in x.unbind()]))


def test_model_proxy_runs_ragged_samples_in_chunks_bounded_by_their_length(monkeypatch):
    # chunked by count alone, 2,048 long documents would pass the memory any fixed-size chunk may hold
    rng = np.random.default_rng(0)
    lengths = [1, 40, 3, 90, 7, 7, 200, 2, 60, 30]
    x = np.empty(len(lengths), dtype=object)
    x[:] = [rng.standard_normal((n, 3)).astype(np.float32) for n in lengths]
    y = rng.integers(0, 4, len(x))
    torch.manual_seed(0)
    model = RaggedCounted()
    whole = ModelProxy(model).gradient_factors(x, y)
    assert model.rows == [sum(lengths)]
    monkeypatch.setattr("nearstore.selection.proxies.CHUNK_INPUT_BYTES", 100 * 3 * 4)  # 100 rows
    model.rows.clear()
    chunked = ModelProxy(model).gradient_factors(x, y)
    assert model.rows == [44, 97, 7, 200, 92]  # the 200-row sample alone
    for part, expected in zip(chunked, whole):
        torch.testing.assert_close(part, expected)


class Tokens(torch.nn.Module):
    """A token model of fixed-length ids: an embedding, then a mean over positions."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 4).to(dtype)
        self.head = torch.nn.Linear(4, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return self.head(self.embed(x.long()).mean(1).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_proxy_gives_token_ids_to_an_embedding_as_stored(dtype):
    # cast to the head's float dtype, ids were refused by the embedding, or, by a model casting
    # them back itself in bfloat16, rounded to other tokens (257 -> 256)
    ids = np.array([[257, 513, 999, 3], [1, 2, 3, 4]], dtype=np.int32)
    torch.manual_seed(0)
    model = Tokens(dtype)
    z = ModelProxy(model).features(ids)
    assert all(x.dtype == torch.int32 for x in model.seen)
    assert torch.equal(model.seen[-1], torch.from_numpy(ids))
    torch.testing.assert_close(z, model.embed(torch.from_numpy(ids).long()).mean(1).float(), check_dtype=False)


def test_model_proxy_casts_inputs_to_the_dtype_of_the_first_layer_the_model_runs(blobs):
    # a bfloat16 body under a float32 head was given float32 inputs, which it refuses
    x, y = blobs
    model = torch.nn.Sequential(torch.nn.Linear(6, 12).to(torch.bfloat16), torch.nn.Tanh())
    model.append(_FloatHead())
    assert ModelProxy(model).embed(x, y).shape == (150, 3 * 13)
    uint8_images = np.random.default_rng(0).integers(0, 256, size=(4, 6), dtype=np.uint8)
    assert ModelProxy(torch.nn.Sequential(torch.nn.Linear(6, 3))).features(uint8_images).dtype == torch.float32


class _FloatHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(12, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h.float())


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
    # samples stored in another dtype reach the model in its own, as a trainer casts its batches
    for stored in (np.float32, np.float16, np.int16):
        torch.testing.assert_close(
            proxy.embed(inputs.astype(stored), y[:20]), proxy.embed(inputs.astype(stored).astype(np.float64), y[:20])
        )
    # ragged float samples too: a nested batch, cast (the mean of each sample's rows, then the model)
    ragged = np.empty(4, dtype=object)
    ragged[:] = [x[i : i + 1 + i % 3].astype(np.float32) for i in range(4)]
    means = ModelProxy(torch.nn.Sequential(MeanOfRows(), model))
    expected = proxy.embed(np.stack([r.astype(np.float64).mean(0) for r in ragged]), y[:4])
    torch.testing.assert_close(means.embed(ragged, y[:4]), expected)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) \(the model's outputs\)"):
        proxy.embed(inputs[:2], np.array([0, 5]))
    with pytest.raises(ValueError, match="has none"):
        ModelProxy(torch.nn.ReLU())
    assert model.training and all(m.training for m in model.modules())  # scored in eval mode, restored


class TupleOut(torch.nn.Module):
    """A body and a head whose forward returns (logits, features), after a softmax: what it
    returns is not read, the head's own output is."""

    def __init__(self, head_first: bool = False) -> None:
        super().__init__()
        if head_first:
            self.head = torch.nn.Linear(12, 3)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh())
        if not head_first:
            self.head = torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return torch.softmax(self.head(h), 1), h


def test_model_proxy_reads_the_head_whatever_the_model_returns_and_never_changes_the_model(blobs):
    x, y = blobs
    torch.manual_seed(0)
    wrapped = TupleOut()
    plain = torch.nn.Sequential(wrapped.body, wrapped.head)
    torch.testing.assert_close(ModelProxy(wrapped).embed(x[:20], y[:20]), ModelProxy(plain).embed(x[:20], y[:20]))
    # half precision scores as float32 (a confident model's p - onehot(y) rounds to 0 in bfloat16)
    half = ModelProxy(copy.deepcopy(plain).bfloat16())
    factors = half.gradient_factors(x[:20], y[:20])
    assert all(f.dtype == torch.float32 for f in factors)
    rounded = ModelProxy(copy.deepcopy(plain).bfloat16().float()).gradient_factors(x[:20], y[:20])
    torch.testing.assert_close(factors[0], rounded[0], atol=0.02, rtol=0.05)
    ModelProxy(plain, device="meta")  # another device: a copy goes there, not the trainer's model
    assert plain[1].weight.device.type == "cpu"


def test_model_proxy_finds_the_head_the_model_runs_last_wherever_it_is_registered(blobs, tmp_path):
    x, y = blobs
    torch.manual_seed(0)
    last = TupleOut()
    first = TupleOut(head_first=True)  # registered before its body: modules() lists the body's Linear last
    first.load_state_dict(last.state_dict())
    expected = ModelProxy(last).embed(x[:20], y[:20])
    scored = ModelProxy(first)
    torch.testing.assert_close(scored.embed(x[:20], y[:20]), expected)
    assert scored.num_classes == 3 and scored.embedding_dim == 3 * 13
    assert ModelProxy(first).probe(x[:1]).embedding_dim == 3 * 13  # before anything is scored
    # a scan probes on the dataset's first sample before it checks the classes and sizes the sketches
    dataset = write_dataset(str(tmp_path / "blobs.zarr"), [{"x": x, "y": y}], shard_samples=32)
    chosen = sage_select(dataset, 0.2, seed=1, proxy=ModelProxy(first))
    np.testing.assert_array_equal(chosen.ids, sage_select(dataset, 0.2, seed=1, proxy=ModelProxy(last)).ids)
    # sizes read before the model ran are the last registered Linear's, and stay: a run finding another refuses
    early = ModelProxy(first)
    assert early.num_classes == 12
    with pytest.raises(
        ValueError, match=r"runs, 'head' \(Linear 12 -> 3\), is not its head 'body.0' \(Linear 6 -> 12\)"
    ):
        early.embed(x[:4], y[:4])


class TwoHeads(torch.nn.Module):
    """A body, its classifier and an auxiliary head on the same features, both returned."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh())
        self.classifier, self.aux = torch.nn.Linear(12, 3), torch.nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.classifier(h), self.aux(h)


class AfterTheLinear(torch.nn.Module):
    """A last Linear whose outputs another layer with weights reads: `after` of them."""

    def __init__(self, after: torch.nn.Module) -> None:
        super().__init__()
        self.linear, self.after = torch.nn.Linear(6, 6), after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.linear(x).unflatten(1, (1, 6))).flatten(1)


def test_model_proxy_refuses_a_last_linear_that_may_not_be_the_head_unless_named(blobs):
    x, y = blobs
    torch.manual_seed(0)
    two = TwoHeads()
    with pytest.raises(
        ValueError, match=r"TwoHeads runs 'classifier' \(Linear 12 -> 3\), 'aux' \(Linear 12 -> 4\) last"
    ):
        ModelProxy(two).embed(x[:4], y[:4])  # the auxiliary head, run last, would be scored as the classifier
    named = ModelProxy(two, head=two.classifier)
    expected = ModelProxy(torch.nn.Sequential(two.body, two.classifier)).embed(x[:20], y[:20])
    torch.testing.assert_close(named.embed(x[:20], y[:20]), expected)
    assert named.num_classes == 3
    elsewhere = ModelProxy(two, device="meta", head=two.classifier)  # the copy's own classifier
    assert elsewhere.head is elsewhere.model.classifier and two.classifier.weight.device.type == "cpu"
    with pytest.raises(ValueError, match=r"head must be one of the nn.Linear layers of TwoHeads"):
        ModelProxy(two, head=torch.nn.Linear(12, 3))
    for after, name in ((torch.nn.Conv1d(1, 3, 6), "Conv1d"), (torch.nn.LayerNorm(6), "LayerNorm")):
        model = AfterTheLinear(after)  # a convolutional classifier; a normalization of the logits
        with pytest.raises(
            ValueError, match=rf"'after' \({name}\) has weights and runs after 'linear' \(Linear 6 -> 6\)"
        ):
            ModelProxy(model).embed(x[:4], y[:4])


class FunctionalHead(torch.nn.Module):
    """Its classifier F.linear on parameters of its own: no hook sees it run."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU())
        self.weight, self.bias = torch.nn.Parameter(torch.randn(3, 12)), torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.body(x), self.weight, self.bias)


class PerPosition(torch.nn.Module):
    """Logits at each of 2 positions of a sample: (n, 2, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.unflatten(1, (2, 3)))


def test_model_proxy_refuses_logits_that_are_not_its_heads_output_or_not_one_row_a_sample(blobs):
    x, y = blobs
    # the hidden Linear (12 outputs) was taken for the classifier: softmax over hidden units
    with pytest.raises(ParameterError, match=r"FunctionalHead returns \(4, 3\), not the \(4, 12\) of 'body.0'"):
        ModelProxy(FunctionalHead()).embed(x[:4], y[:4])
    # an output of another kind (a dataclass) is not judged: the head found by running is taken

    class Output:
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = torch.nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> Output:
            return Output(self.classifier(x))

    assert ModelProxy(Wrapped()).embed(x[:4], y[:4]).shape == (4, 3 * 7)
    # accepted, then every round failed with 'logits must be 2-D'
    with pytest.raises(
        ParameterError, match=r"'classifier' \(Linear 3 -> 3\), the head of PerPosition, gives .*\(4, 2, 3\)"
    ):
        ModelProxy(PerPosition()).embed(x[:4], y[:4])


def test_a_model_that_fails_on_stored_samples_of_an_images_shape_is_named_with_torchs_error(tmp_path):
    # 3 x 32 x 32 as stored, not decoded: no images= would make them fit, and the message must not say so
    x = np.random.default_rng(0).normal(size=(40, 3, 32, 32)).astype(np.float32)
    dataset = write_dataset(str(tmp_path / "pixels.zarr"), [{"x": x, "y": np.arange(40) % 4}], shard_samples=16)
    misfit = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    named = (
        r"Sequential cannot run on 'x'.s samples \(of shape \(3, 32, 32\)\) \(a batch of samples 0\.\.15\): "
        "RuntimeError: mat1 and mat2"
    )
    with pytest.raises(ParameterError, match=named) as refused:
        sage_select(dataset, 0.5, seed=1, proxy=ModelProxy(misfit))
    assert "images" not in str(refused.value)


def rendered(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 3 x 24 x 24 images of a bar, upright (class 0) or lying (class 1), at a random place, in a
    random colour on a random background: what flat pixels tell apart badly."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, 24, 24), dtype=np.float32)
    labels = rng.integers(0, 2, n)
    for image, label in zip(images, labels):
        image[:] = rng.uniform(-1, 1, (3, 1, 1))
        top, left = rng.integers(2, 12, 2)
        rows, cols = (
            (slice(top, top + 10), slice(left, left + 3))
            if label == 0
            else (slice(top, top + 3), slice(left, left + 10))
        )
        image[:, rows, cols] = rng.uniform(-1, 1, (3, 1, 1))
    return images + rng.normal(0, 0.05, images.shape).astype(np.float32), labels


def test_image_features_ignore_an_image_s_brightness_and_contrast():
    x, y = rendered(200, seed=0)
    proxy = RandomFeatureProxy(2, width=64).fit(x, y)
    dimmer = 0.3 * x + 0.5  # each image the same scene, its contrast lowered and its levels raised
    torch.testing.assert_close(proxy.features(dimmer), proxy.features(x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(proxy.features(x[::-1].copy()), proxy.features(x), atol=1e-2)  # scenes do count


@pytest.mark.filterwarnings(r"ignore:std\(\)")  # the empty batch's, of no image
def test_image_features_are_the_same_computed_in_chunks(monkeypatch):
    x, y = rendered(50, seed=0)
    proxy = RandomFeatureProxy(2, width=64).fit(x, y)
    whole = proxy.features(x)
    monkeypatch.setattr("nearstore.selection.proxies.CONV_CHUNK_IMAGES", 7)  # 7 chunks, the last of 1
    torch.testing.assert_close(proxy.features(x), whole, rtol=0, atol=1e-6)
    assert proxy.features(x[:0]).shape == (0, 64)


def test_images_get_convolutional_features_that_find_shapes_anywhere():
    x, y = rendered(600, seed=0)
    proxy = RandomFeatureProxy(2, width=64).fit(x, y)
    assert proxy.features(x[:5]).shape == (5, 64) and proxy.embedding_dim == 2 * 65
    test_x, test_y = rendered(300, seed=1)
    convolutional = (proxy.logits(test_x).argmax(1).numpy() == test_y).mean()
    flat = RandomFeatureProxy(2, width=64).fit(x.reshape(600, -1), y)
    flattened = (flat.logits(test_x.reshape(300, -1)).argmax(1).numpy() == test_y).mean()
    assert convolutional > 0.8 and flattened < 0.65  # flat random features: not much above chance
    with pytest.raises(ValueError, match=r"fitted on samples of shape \(3, 24, 24\), got \(3, 20, 20\)"):
        proxy.features(x[:2, :, :20, :20])


def test_a_model_with_nonfinite_logits_or_weights_is_refused_by_name(blobs, tmp_path):
    # CREST took every NaN p(y | x) for unlearned and picked at random; update_proxy in process took
    # the weights a server's push refuses; a model's own ValueError later in a round named nothing
    from loaders import StreamingLoader
    from nearstore import Crest

    x, y = blobs
    diverged = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        diverged[0].weight[0, 0] = float("nan")
    with pytest.raises(ParameterError, match=r"Sequential gives logits holding NaN or inf \(the first at sample 0 of"):
        ModelProxy(diverged).confidence(x, y)
    store = write_dataset(str(tmp_path / "b.zarr"), [{"x": x, "y": y}], shard_samples=32)
    with pytest.raises(ParameterError, match="gives logits holding NaN or inf"):
        Crest().select(store, 0.2, proxy=ModelProxy(diverged))
    with pytest.raises(ParameterError, match=r"proxy weights '0.weight' hold NaN or inf"):
        StreamingLoader(store, batch_size=16, backend="torch").update_proxy(diverged)
    masked = torch.nn.Sequential(torch.nn.Linear(6, 3))
    masked.register_buffer("mask", torch.full((2, 2), -torch.inf).triu(1))  # a causal mask's -inf is meant
    StreamingLoader(store, batch_size=16, backend="torch").update_proxy(masked)

    class Picky(torch.nn.Module):  # fails on samples past the first shard
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(6, 3)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            if len(inputs) > 1 and inputs.abs().max() > 5:
                raise ValueError("input out of range")
            return self.head(inputs)

    far = x.copy()
    far[100] = 9.0
    picky = write_dataset(str(tmp_path / "p.zarr"), [{"x": far, "y": y}], shard_samples=32)
    with pytest.raises(ParameterError, match=r"Picky cannot run on 'x''s samples .*samples \d+\.\.\d+\): ValueError"):
        Crest().select(picky, 0.2, proxy=ModelProxy(Picky()))


def test_a_proxy_made_of_a_model_changes_nothing_of_it_and_refuses_one_not_made_yet(blobs):
    # a spectral-norm head's weight is computed when read: in train mode, a power iteration that
    # changed the trainer's model; a LazyLinear head was sized 0 wide, and materialized by the run
    x, y = blobs
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(16, 3))
    )
    before = copy.deepcopy(model.state_dict())
    ModelProxy(model).embed(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(3))
    with pytest.raises(ParameterError, match=r"Sequential has parameters not made yet \(a Lazy layer\)"):
        ModelProxy(lazy)
    assert isinstance(lazy[0], torch.nn.LazyLinear)


def test_a_model_that_changes_its_logits_after_its_head_is_refused(blobs):
    # CLIP's learned scale on the root module, after fc: p(y | x) of the unscaled output (0.28
    # where the model's own is 0.0008), so wrong gradients and suspects, silently
    x, y = blobs

    class Scaled(torch.nn.Module):
        def __init__(self, returns: str) -> None:
            super().__init__()
            self.body, self.fc, self.returns = torch.nn.Linear(6, 16), torch.nn.Linear(16, 3), returns
            self.logit_scale = torch.nn.Parameter(torch.tensor(3.0))

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            z = self.fc(torch.relu(self.body(inputs)))
            if self.returns == "scaled":
                return z * self.logit_scale.exp()
            if self.returns == "shifted":  # for stability, as some models return them
                return z - z.max(1, keepdim=True).values
            return torch.log_softmax(z, 1) if self.returns == "log_softmax" else (z, torch.softmax(z, 1))

    with pytest.raises(ParameterError, match=r"Scaled returns no \(150, 3\) that gives the p\(y \| x\) of 'fc'"):
        ModelProxy(Scaled("scaled")).embed(x, y)
    for returns in ("log_softmax", "both", "shifted"):  # the head's p(y | x), as probabilities or not: alike
        assert ModelProxy(Scaled(returns)).embed(x, y).shape == (150, 3 * 17)
