"""Encoded images through the loader: DALI's decoder (CPU here) and the torch backend's PIL give
the same tensors up to the resize filters; damaged images are raised or skipped, never silent;
the scan selects on decoded images and leaves damaged ones out."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from images import NUM_IMAGES, image_store, photo
from PIL import Image

from loaders import StreamingLoader
from nearstore import Graft, ModelProxy, ParameterError, SampleError, sage_select, write_dataset
from nearstore.storage.dali_images import DaliDecoder
from nearstore.storage.images import ImageTransform


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return image_store(str(tmp_path_factory.mktemp("images") / "images.zarr"))[0]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """The same images but 70 cut short (a JPEG, shard 1) and 130 not an image (shard 2)."""
    whole = photo(71)
    url = str(tmp_path_factory.mktemp("images") / "broken.zarr")
    return image_store(url, {71: whole[: len(whole) // 2], 130: b"<html>not found</html>"})[0]


def epoch(loader: StreamingLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_both_backends_decode_the_same_tensors(store):
    images = ImageTransform(size=32, train=False)
    dali_x, dali_y = epoch(StreamingLoader(store, batch_size=50, shuffle=False, images=images, backend="dali"))
    torch_x, torch_y = epoch(StreamingLoader(store, batch_size=50, shuffle=False, images=images, backend="torch"))
    assert dali_x.shape == torch_x.shape == (NUM_IMAGES, 3, 32, 32) and dali_x.dtype == torch.float32
    assert torch.equal(dali_y, torch_y)
    # the decoders agree exactly (both libjpeg-turbo, both zlib); the resize filters do not quite:
    # on average a fifth of one level in 255, at most a few levels at sharp edges (docs/loader.md)
    levels = (dali_x - torch_x).abs() * torch.tensor(images.std)[:, None, None]
    assert levels.mean() < 0.5 and levels.max() < 16


def test_the_scan_decodes_the_pixels_a_dali_epoch_evaluates(store):
    images = ImageTransform(size=16, train=False)
    loaded, _ = epoch(StreamingLoader(store, batch_size=50, shuffle=False, images=images, backend="dali"))
    blobs = [photo(i) for i in range(NUM_IMAGES)]
    np.testing.assert_array_equal(DaliDecoder(images, threads=2).decode_batch(blobs)[0], loaded.numpy())


def test_sideways_photographs_and_16_bit_pngs_decode_alike_in_both_backends(tmp_path):
    # A JPEG whose EXIF says "turn 90° clockwise" (as phones store portraits) and a 16-bit grey PNG:
    # DALI turns the one and scales the other to 8 bits; PIL alone did neither (the PNG clipped white).
    rng = np.random.default_rng(0)
    blocks = np.ones((10, 10, 1), np.uint8)
    pixels = np.kron(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), blocks)  # 60 x 80, landscape
    grey = np.kron(rng.integers(0, 1 << 16, (6, 8)), blocks[..., 0]).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways, grey16, upright = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(sideways, "JPEG", quality=95, exif=exif)
    Image.fromarray(grey).save(grey16, "PNG")
    Image.fromarray(np.rot90(pixels, -1).copy()).save(upright, "PNG")  # how a viewer shows it
    blobs = np.empty(2, dtype=object)
    blobs[:] = [sideways.getvalue(), grey16.getvalue()]
    store = write_dataset(str(tmp_path / "odd.zarr"), [{"image": blobs, "y": np.arange(2)}])
    images = ImageTransform(size=32, train=False)
    dali_x, _ = epoch(StreamingLoader(store, batch_size=2, shuffle=False, images=images, backend="dali"))
    torch_x, _ = epoch(StreamingLoader(store, batch_size=2, shuffle=False, images=images, backend="torch"))
    std, mean = torch.tensor(images.std)[:, None, None], torch.tensor(images.mean)[:, None, None]
    assert ((dali_x - torch_x).abs() * std).mean((1, 2, 3)).max() < 1.5
    turned = torch.from_numpy(images.decode(upright.getvalue()))
    assert ((torch_x[0] - turned).abs() * std).mean() < 10  # JPEG's loss, ~4 levels; unturned ~75
    grey_levels = torch_x[1] * std + mean
    assert abs(float(grey_levels.mean()) - float(np.round(grey / 257)[4:-4, 4:-4].mean())) < 10


def test_training_batches_are_augmented_and_the_torch_ones_resume_exactly(store):
    def make():
        return StreamingLoader(store, batch_size=32, images=ImageTransform(size=24), backend="torch", seed=5)

    reference = [x for x, _ in make()]
    assert reference[0].shape == (32, 3, 24, 24) and torch.isfinite(reference[0]).all()
    interrupted = make()
    iterator = iter(interrupted)
    next(iterator), next(iterator)
    state = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(rest) == len(reference) - 2 and all(torch.equal(a, b) for a, b in zip(rest, reference[2:]))
    again = make()
    again.set_epoch(1)  # another epoch, other crops and flips
    assert not torch.equal(next(iter(again))[0], reference[0])
    dali = StreamingLoader(store, batch_size=32, images=ImageTransform(size=24), backend="dali", seed=5)
    assert next(iter(dali))[0].shape == (32, 3, 24, 24)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_damaged_image_is_raised_by_id_and_shard(broken, backend):
    loader = StreamingLoader(broken, [3, 71, 4], batch_size=8, images=ImageTransform(size=16), backend=backend)
    with pytest.raises(SampleError, match=r"sample 71 of array 'image' \(shard 1 of .*broken.zarr'\): JPEG without"):
        list(loader)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_skipped_images_leave_their_batch_and_are_listed(broken, backend):
    loader = StreamingLoader(
        broken, batch_size=32, images=ImageTransform(size=16), backend=backend, on_error="skip", shuffle=False
    )
    x, y = epoch(loader)
    assert len(x) == len(y) == NUM_IMAGES - 2
    expected = np.delete(np.arange(NUM_IMAGES) % 4, [71, 130])
    assert y.tolist() == expected.tolist()  # the labels of the samples that remained, in order
    epoch(loader)  # skipped again, listed once
    assert loader.io_stats()["skipped_samples"] == [71, 130]


def test_images_are_only_for_encoded_samples(id_store):
    with pytest.raises(ParameterError, match="array 'x' of .* holds fixed-size ones"):
        StreamingLoader(id_store, images=ImageTransform())
    with pytest.raises(ParameterError, match="on_error must be one of"):
        StreamingLoader(id_store, on_error="ignore")


def test_the_scan_selects_on_decoded_images_and_leaves_damaged_ones_out(broken, caplog):
    selection = Graft().select(broken, 0.5, seed=0)
    assert len(selection.ids) == NUM_IMAGES // 2
    assert 71 not in selection.ids and 130 not in selection.ids
    assert "left out of selection: sample 130 of array 'image'" in caplog.text
    loader = StreamingLoader(broken, selection, batch_size=40, backend="torch", images=ImageTransform(size=16))
    assert sum(len(y) for _, y in loader) == len(selection.ids)


class HeadFirst(torch.nn.Module):
    """A classifier registered before its body: the last registered Linear is not its head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(8, 4)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_scan_finds_the_models_head_past_a_damaged_first_image(tmp_path):
    # the scan runs the model on the first sample that decodes to find its head (the first is cut short)
    whole = photo(0)
    store, _ = image_store(str(tmp_path / "first.zarr"), {0: whole[: len(whole) // 2]})
    torch.manual_seed(0)
    proxy = ModelProxy(HeadFirst(), images=ImageTransform(size=16, train=False))
    selection = Graft().select(store, 0.5, seed=0, proxy=proxy)
    assert proxy.num_classes == 4 and 0 not in selection.ids
    assert len(selection.ids) == NUM_IMAGES // 2


def test_a_misfit_model_is_refused_at_its_push_where_none_of_the_first_images_decodes(tmp_path):
    # the push runs the model on the first image that decodes; where none of the first 8 does, on a
    # blank image of the loader's size
    store, _ = image_store(str(tmp_path / "first.zarr"), {i: b"<html>not found</html>" for i in range(8)})
    loader = StreamingLoader(store, images=ImageTransform(size=16), backend="torch", device="cpu")
    torch.manual_seed(0)
    with pytest.raises(ParameterError, match=r"Sequential cannot run on samples of 3 x 16 x 16"):
        loader.update_proxy(flat(8))
    loader.update_proxy(flat(16))
    assert not set(range(8)) & set(loader.reselect(0.5, method="sage", seed=0).ids.tolist())


def flat(side: int) -> torch.nn.Module:
    """A classifier of the 4 photo labels that takes images of side x side alone (Flatten, Linear)."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, 4))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_the_trainers_model_scores_images_as_the_loader_shows_them_at_evaluation(store, backend):
    # the pushed model was scored on 32 x 32 decodes whatever the loader's size: a model of 16 x 16
    # inputs failed at reselect ("mat1 and mat2 shapes cannot be multiplied"), a CNN of 224 scored garbage
    torch.manual_seed(0)
    images = ImageTransform(size=16, resize=20, mean=(10, 20, 30), std=(60, 70, 80))
    loader = StreamingLoader(store, images=images, backend=backend, device="cpu")
    model = flat(16)
    loader.update_proxy(model)
    chosen = loader.reselect(0.5, method="sage", seed=4)
    assert len(chosen) == NUM_IMAGES // 2 and chosen.params["proxy"] == "ModelProxy"
    # the loader's view at evaluation: its size, resize and normalization, the centre crop
    evaluation = ImageTransform(size=16, train=False, resize=20, mean=(10, 20, 30), std=(60, 70, 80))
    expected = sage_select(store, 0.5, seed=4, proxy=ModelProxy(model, images=evaluation))
    np.testing.assert_array_equal(chosen.ids, expected.ids)


def test_a_loader_made_without_images_scores_at_its_default_size_and_a_misfit_model_is_told_why(store):
    torch.manual_seed(0)
    default = StreamingLoader(store, backend="torch", device="cpu")  # ImageTransform(): 224 x 224
    default.update_proxy(flat(224))
    assert len(default.reselect(0.25)) == NUM_IMAGES // 4
    small = StreamingLoader(store, images=ImageTransform(size=16), backend="torch", device="cpu")
    with pytest.raises(  # at the push, not at the next round
        ParameterError,
        match=r"Sequential cannot run on samples of 3 x 16 x 16 .*mat1 and mat2.*"
        r"give the loader images=ImageTransform\(size=the model's input size\)",
    ):
        small.update_proxy(flat(8))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_an_image_whole_outside_but_garbled_inside_is_named_too(tmp_path, backend):
    whole = photo(71)
    garbled = whole[:200] + bytes(len(whole) - 400) + whole[-200:]  # passes the damage check
    store, _ = image_store(str(tmp_path / "garbled.zarr"), {71: garbled})
    loader = StreamingLoader(store, np.arange(64, 80), batch_size=4, images=ImageTransform(size=16), backend=backend)
    with pytest.raises(SampleError, match=r"sample 71 of array 'image' \(shard 1 of .*\): .*refused"):
        list(loader)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_an_image_its_decoder_refuses_is_skipped_and_the_epoch_goes_on(tmp_path, backend):
    whole = photo(71)
    garbled = whole[:200] + bytes(len(whole) - 400) + whole[-200:]  # passes the damage check
    store, _ = image_store(str(tmp_path / "garbled.zarr"), {71: garbled})
    ids = np.arange(40, 104)  # labels i % 4: 16 of each, less sample 71's (3)
    loader = StreamingLoader(
        store, ids, batch_size=4, images=ImageTransform(size=16), backend=backend, on_error="skip", seed=2
    )
    for _ in range(2):  # the first epoch finds it (DALI: a fresh pipeline goes on), the second leaves it out
        labels = torch.cat([y for _, y in loader])
        assert torch.bincount(labels).tolist() == [16, 16, 16, 15]
        assert loader.io_stats()["skipped_samples"] == [71]


def test_a_refused_image_followed_by_batches_wholly_damaged_is_still_found_and_skipped(tmp_path):
    # batches left out whole before DALI pushed the one it refused out of the batches handed to it
    whole = photo(71)
    cut = {i: photo(i)[: len(photo(i)) // 2] for i in range(72, 80)}
    store, _ = image_store(
        str(tmp_path / "runs.zarr"), {71: whole[:200] + bytes(len(whole) - 400) + whole[-200:], **cut}
    )
    ids = np.arange(64, 96)
    loader = StreamingLoader(
        store, ids, batch_size=1, images=ImageTransform(size=16), backend="dali", on_error="skip", shuffle=False
    )
    assert len(torch.cat([y for _, y in loader])) == 32 - 9
    assert loader.io_stats()["skipped_samples"] == list(range(71, 80))


def test_an_image_only_dalis_decoder_refuses_is_named_and_the_torch_backend_reads_it(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(out, format="TIFF")  # a 1-bit TIFF: PIL decodes it, DALI not
    store, _ = image_store(str(tmp_path / "bilevel.zarr"), {71: out.getvalue()})
    ids = np.arange(64, 80)
    dali = StreamingLoader(store, ids, batch_size=4, images=ImageTransform(size=16), backend="dali", shuffle=False)
    with pytest.raises(SampleError, match=r"sample 71 .*: DALI's decoder refused it \(.*\); PIL decodes it"):
        list(dali)
    torch_backend = StreamingLoader(store, ids, batch_size=4, images=ImageTransform(size=16), backend="torch")
    assert len(torch.cat([y for _, y in torch_backend])) == 16
