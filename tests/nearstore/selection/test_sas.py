"""SAS beside the data, on samples without labels: latent classes by streaming k-means, then per
class the samples whose augmentations are most like the others'; and the augmentations it uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loaders import StreamingLoader
from nearstore import DatasetError, ModelProxy, ParameterError, random_select, write_dataset
from nearstore.selection import ClipCov, Sas, make_selector
from nearstore.selection.augment import augmentation, cropped_images, shifted_signals

TYPICAL, OUTLIERS = 1800, 200


def bumps(n: int, rng: np.random.Generator) -> np.ndarray:
    """Signals of 40 points, each a bump at one of 3 places (its latent class) with a little noise."""
    where = rng.integers(3, size=n) * 12 + 8
    t = np.arange(40)
    return (np.exp(-0.5 * ((t[None, :] - where[:, None]) / 2.0) ** 2) + 0.05 * rng.normal(size=(n, 40))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """2,000 unlabelled signals: 1,800 bumps of 3 kinds, then 200 outliers of loud noise, shuffled
    (`outlier[i]` says which)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([bumps(TYPICAL, rng), 3 * rng.normal(size=(OUTLIERS, 40)).astype(np.float32)])
    order = rng.permutation(len(x))
    outlier = np.arange(len(x))[order] >= TYPICAL
    url = str(tmp_path_factory.mktemp("sas") / "bumps.zarr")
    return write_dataset(url, [{"x": x[order]}], label_array=None, shard_samples=256), outlier


def encoder() -> torch.nn.Module:
    """A trained encoder's stand-in: its hidden units the three bumps (matched filters) and a few
    random directions, then a projection."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        t = torch.arange(40.0)
        model[0].weight[:3] = torch.stack([torch.exp(-0.5 * ((t - c) / 2.0) ** 2) for c in (8, 20, 32)])
        model[0].weight[3:] *= 0.1
        model[0].bias.zero_()
    return model


@pytest.mark.parametrize(("labels", "clusters"), [((0, 499), None), ((0, 40_000), None), ((0, 1), 400)])
def test_sas_keeps_about_its_budget_however_many_latent_classes_are_asked_for(tmp_path, labels, clusters):
    # A latent class keeps one sample however small its share: one a label id (500 of them, or
    # 40,001 past what a labelled proxy scores) or 400 asked for kept 500 of 1,000 at keep 0.1.
    rng = np.random.default_rng(0)
    y = np.asarray(labels)[rng.integers(0, 2, 1000)]
    dataset = write_dataset(str(tmp_path / "sparse.zarr"), [{"x": bumps(1000, rng), "y": y}], shard_samples=256)
    chosen = Sas(clusters=clusters).select(dataset, 0.1, seed=0)
    assert 100 <= len(chosen) <= 125 and chosen.params["clusters"] == 25  # at most one per 4 of the budget


@pytest.mark.parametrize("proxy", ["model-free", "encoder"])
def test_sas_keeps_typical_samples_over_outliers_per_latent_class(unlabelled, proxy):
    dataset, outlier = unlabelled
    chosen = Sas(clusters=3).select(
        dataset, 0.5, seed=1, proxy=None if proxy == "model-free" else ModelProxy(encoder())
    )
    assert abs(len(chosen) - 1000) <= 3 and len(np.unique(chosen.ids)) == len(chosen)
    assert chosen.method == "sas" and chosen.params["clusters"] == 3 and np.all(chosen.weights == 1)
    random = random_select(dataset, 0.5, seed=1)
    # random keeps about half the outliers; SAS, whose pick is the typical, far fewer
    assert outlier[chosen.ids].sum() < 0.5 * outlier[random.ids].sum()
    assert np.isfinite(chosen.scores).all() and chosen.io["passes"] == 2 and chosen.io["bytes"] > 0


def test_sas_is_seeded(unlabelled):
    dataset, _ = unlabelled
    first, again = (Sas(clusters=3).select(dataset, 0.3, seed=4) for _ in range(2))
    np.testing.assert_array_equal(first.ids, again.ids)


def test_a_trainer_reselects_with_sas_through_its_loader(unlabelled):
    dataset, _ = unlabelled
    noise = lambda x: x + 0.1 * torch.randn_like(x)  # noqa: E731
    loader = StreamingLoader(dataset, batch_size=100, views=2, transform=noise, backend="torch", device="cpu")
    x1, x2 = next(iter(loader))  # no labels: the views alone
    assert x1.shape == x2.shape == (100, 40)
    loader.update_proxy(encoder())  # the trainer's encoder, pushed back
    chosen = loader.reselect(0.25, method="sas", clusters=3)
    assert chosen.params["proxy"] == "ModelProxy"
    seen = torch.cat([x1 for x1, _ in loader])
    assert len(seen) == len(chosen) == len(loader.ids)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"clusters": 0}, "clusters"),
        ({"augmentations": 0}, "augmentations"),
        ({"augment": "rotate"}, "augment must be one of"),
        ({"window": 1}, "window"),
    ],
)
def test_bad_sas_options_are_refused_by_name(options, message):
    with pytest.raises(ParameterError, match=message):
        make_selector("sas", **options)


def test_signal_augmentations_shift_scale_and_add_noise_within_bounds():
    rng = np.random.default_rng(0)
    x = np.zeros((500, 40), dtype=np.float32)
    x[:, 20] = 1.0  # a spike: where it lands is the shift, its height the gain
    varied = shifted_signals(x, rng)
    peaks = varied.argmax(1)
    assert set(np.unique(peaks - 20)) == set(range(-4, 5))  # every shift up to L // 10 drawn
    gains = varied.max(1)
    assert 0.6 < gains.min() and gains.max() < 1.4 and abs(np.median(gains) - 1) < 0.1  # noise of 0.2 spread on top
    assert varied.shape == x.shape and varied.dtype == np.float32


def test_image_augmentations_flip_and_crop_to_the_same_size():
    rng = np.random.default_rng(0)
    image = np.zeros((400, 3, 16, 16), dtype=np.float32)
    image[:, :, 8, 2] = 1.0  # a dot near the left edge: a flip moves it right
    varied = cropped_images(image, rng)
    assert varied.shape == image.shape
    columns = varied[:, 0, :, :].max(1).argmax(1)
    flipped = columns > 8
    assert 0.35 < flipped.mean() < 0.65  # flipped about half the time
    assert np.abs(columns[~flipped] - 2).max() <= 2  # crops move it by at most 16 // 8 pixels


def test_an_augmentation_for_other_samples_is_refused_by_name():
    with pytest.raises(ParameterError, match="augment='image' takes a batch of images"):
        augmentation("image", np.zeros((4, 40)))
    assert augmentation("auto", np.zeros((4, 3, 8, 8))) is cropped_images
    for name in ("auto", "image"):  # CIFAR's .npy layout: a flip would reverse the colours
        with pytest.raises(ParameterError, match=r"samples of shape \(8, 8, 3\) look channels-last"):
            augmentation(name, np.zeros((4, 8, 8, 3)))
    assert augmentation("auto", np.zeros((4, 40))) is shifted_signals


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """2,000 bumps (3 kinds) each with a caption: token 100 + its kind among 2-5 filler tokens;
    a fifth of the captions name another kind (`mismatched[i]`). Unlabelled."""
    rng = np.random.default_rng(1)
    kinds = rng.integers(3, size=2000)
    t = np.arange(40)
    x = np.exp(-0.5 * ((t[None, :] - (kinds[:, None] * 12 + 8)) / 2.0) ** 2) + 0.05 * rng.normal(size=(2000, 40))
    mismatched = rng.random(2000) < 0.2
    named = np.where(mismatched, (kinds + rng.integers(1, 3, size=2000)) % 3, kinds)
    captions = np.empty(2000, dtype=object)
    captions[:] = [
        rng.permutation(np.r_[100 + c, rng.integers(0, 50, size=rng.integers(2, 6))]).astype(np.int32) for c in named
    ]
    url = str(tmp_path_factory.mktemp("clipcov") / "pairs.zarr")
    data = {"x": x.astype(np.float32), "caption": captions}
    return write_dataset(url, [data], label_array=None, shard_samples=256), mismatched


def test_clipcov_keeps_pairs_that_agree_with_the_data_over_mismatched_ones(captioned):
    dataset, mismatched = captioned
    chosen = ClipCov().select(dataset, 0.4, seed=0)
    assert abs(len(chosen) - 800) <= 1 and chosen.params["paired_array"] == "caption"
    random = random_select(dataset, 0.4, seed=0)
    assert mismatched[chosen.ids].sum() < 0.5 * mismatched[random.ids].sum()  # random keeps its 20%
    assert chosen.io["passes"] == 2 and np.isfinite(chosen.scores).all()


@pytest.mark.parametrize(("keep", "kept", "clusters"), [(0.0005, 1, 1), (0.0025, 5, 1), (0.02, 40, 10)])
def test_clipcov_keeps_its_budget_at_small_keeps_of_unlabelled_pairs(captioned, keep, kept, clusters):
    # each latent class keeps one pair: 10 of them kept 10 at a budget of 1 or 5
    chosen = ClipCov().select(captioned[0], keep, seed=0)
    assert len(chosen) == kept and chosen.params["clusters"] == clusters


def test_clipcov_names_a_pair_whose_other_side_is_not_finite(tmp_path):
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(300, 4)).astype(np.float32)
    for bad in (5, 290):  # in the warm-up shard the proxy is fitted on, and past it
        t[bad, 1] = np.nan
        dataset = write_dataset(str(tmp_path / f"p{bad}.zarr"), [{"x": x, "t": t}], label_array=None, shard_samples=128)
        with pytest.raises(DatasetError, match=f"sample {bad} of array 't' contains NaN"):
            ClipCov().select(dataset, 0.1, seed=0)
        t[bad, 1] = 0


def test_clipcov_names_the_pairing_it_needs(captioned, unlabelled):
    dataset, _ = captioned
    with pytest.raises(DatasetError, match=r"the other side of the samples of '.*pairs.zarr', one of \['caption'\]"):
        ClipCov(paired_array="y").select(dataset, 0.1)
    with pytest.raises(DatasetError, match="one of \\[\\]"):
        ClipCov().select(unlabelled[0], 0.1)  # one array: nothing to pair
    with pytest.raises(ParameterError, match="sharpen"):
        ClipCov(sharpen=-1)
    with pytest.raises(ParameterError, match="paired_array must be an array name, got 3"):
        ClipCov(paired_array=3)


def test_a_server_of_unlabelled_pairs_runs_its_rounds_and_ships_them(captioned):
    from nearstore.serving import NearStoreServer

    dataset, mismatched = captioned
    server = NearStoreServer(dataset, keep=0.25, method="clipcov")  # round 0 by ClipCov, beside the data
    try:
        loader = StreamingLoader(server.url, batch_size=100, paired_arrays=["caption"], backend="torch", device="cpu")
        assert loader.source.label_array is None and server.current.method == "clipcov"
        seen = [int(i) for x, caption in loader for i in range(len(x))]
        assert len(seen) == len(server.current) and abs(len(seen) - 500) <= 10  # budgets rounded per latent class
        chosen = loader.reselect(0.1, method="sas", clusters=3)  # a round without labels on the server
        assert chosen.method == "sas" and len(torch.cat([x for x, _ in loader])) == len(chosen)
    finally:
        server.shutdown()
