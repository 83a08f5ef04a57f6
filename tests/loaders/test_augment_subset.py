"""Augmenting a subset only (`StreamingLoader(augment=...)`): the transforms reach the samples named
and no other, in the DALI graph as in torch, the same rows either way; resumption stays exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from images import image_store
from resume import assert_resumes_at_every_batch

from loaders import StreamingLoader
from nearstore import DatasetError, ParameterError, SampleIdError, random_select, write_dataset
from nearstore.storage.images import ImageTransform

pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, types  # noqa: E402

MARK = 10_000.0  # added by the transforms: the id store's x[i, 0] = i < 2,500, so x[:, 0] >= MARK is augmented


def torch_mark(x: torch.Tensor) -> torch.Tensor:
    """Each sample marked and moved by its own random draw in [0, 0.25)."""
    return x + MARK + torch.empty(len(x), 1).uniform_(0.0, 0.25)


def dali_mark(x):
    return x + MARK + fn.random.uniform(range=[0.0, 0.25])


TRANSFORMS = {"torch": {"transform": torch_mark}, "dali": {"dali_transform": dali_mark}}


def rows(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(ids, augmented) of a batch of the id store: which sample each row is, and whether it was marked."""
    first = x[:, 0].numpy()
    marked = first >= MARK
    return np.where(marked, np.floor(first - MARK), first.round()).astype(np.int64), marked


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_only_the_named_samples_are_augmented(id_store, id_data, backend):
    selection = np.arange(0, 1000)
    augment = np.arange(500, 2500, 3)  # partly outside the selection: those are never visited
    loader = StreamingLoader(
        id_store, selection, batch_size=64, augment=augment, backend=backend, device="cpu", **TRANSFORMS[backend]
    )
    for _ in range(2):  # epochs
        seen, marked = [], []
        for x, y in loader:
            ids, augmented = rows(x)
            np.testing.assert_array_equal(y.numpy(), id_data["y"][ids])
            plain = torch.from_numpy(id_data["x"][ids[~augmented]])
            assert torch.equal(x[torch.from_numpy(~augmented)], plain)  # untouched, bit for bit
            seen += ids.tolist()
            marked += ids[augmented].tolist()
        assert sorted(seen) == selection.tolist()
        assert sorted(marked) == np.intersect1d(augment, selection).tolist()
    expected = len(np.intersect1d(augment, selection))
    stats = loader.io_stats()
    assert stats["augmented_samples"] == 2 * expected
    assert [e["augmented_samples"] for e in stats["per_epoch"]] == [expected, expected]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_new_augment_set_takes_over_from_the_next_epoch(id_store, backend):
    def make(**augment) -> StreamingLoader:
        return StreamingLoader(
            id_store, np.arange(600), batch_size=50, backend=backend, device="cpu", **augment, **TRANSFORMS[backend]
        )

    def augmented(loader: StreamingLoader) -> list[int]:  # the samples an epoch augmented
        return sorted(i for ids, marked in (rows(x) for x, _ in loader) for i in ids[marked])

    loader = make(augment=np.arange(0, 600, 2))
    assert augmented(loader) == list(range(0, 600, 2))
    subset = random_select(id_store, 0.1, seed=4)
    loader.set_augment(subset)
    assert augmented(loader) == subset.ids[subset.ids < 600].tolist()
    with pytest.raises(SampleIdError, match="augmented sample id 2500 out of range"):
        loader.set_augment([2500])
    with pytest.raises(ParameterError, match="set_augment needs a loader made with augment="):
        make().set_augment([1, 2])


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_without_augment_every_sample_is_transformed_as_before(id_store, backend):
    add = {"torch": {"transform": lambda x: x + MARK}, "dali": {"dali_transform": lambda x: x + MARK}}[backend]

    def epoch(**augment) -> list[torch.Tensor]:
        loader = StreamingLoader(id_store, np.arange(700), batch_size=128, seed=1, backend=backend, **add, **augment)
        batches = [x for x, _ in loader]
        assert loader.io_stats()["augmented_samples"] == 700
        return batches

    default, every = epoch(), epoch(augment=np.arange(id_store.num_samples))
    assert all((x[:, 0] >= MARK).all() for x in default)
    assert len(default) == len(every) and all(torch.equal(a, b) for a, b in zip(default, every))


def test_no_transform_counts_no_augmented_samples(id_store):
    loader = StreamingLoader(id_store, np.arange(300), batch_size=100, backend="torch")
    assert sum(len(x) for x, _ in loader) == 300 and loader.io_stats()["augmented_samples"] == 0


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_is_exact_with_augment(id_store, backend):
    add = {"torch": {"transform": lambda x: x + MARK}, "dali": {"dali_transform": lambda x: x + MARK}}[backend]
    selection, augment = random_select(id_store, 0.2, seed=1), np.arange(0, 2500, 2)

    def make() -> StreamingLoader:
        return StreamingLoader(
            id_store, selection, batch_size=64, augment=augment, seed=3, backend=backend, device="cpu", **add
        )

    # the resume helper reads x[:, 0] as the id: an augmented sample reads as id + MARK, so the
    # batches compared say which rows were augmented too
    assert_resumes_at_every_batch(make, epochs=2)


def test_a_set_augment_subset_is_resumed_from_the_state(id_store):
    def make(**augment) -> StreamingLoader:
        return StreamingLoader(id_store, np.arange(800), batch_size=100, seed=2, transform=torch_mark, **augment)

    loader = make(augment=np.arange(0, 800, 2))
    loader.set_augment(np.arange(1, 800, 5))
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    rest = [rows(x) for x, _ in batches]
    resumed = make(augment=np.arange(0, 800, 2))  # made as the first was: the state says which set
    resumed.load_state_dict(state)
    again = [rows(x) for x, _ in resumed]
    assert len(again) == len(rest) == 7
    for (ids, marked), (ids_again, marked_again) in zip(rest, again):
        np.testing.assert_array_equal(ids, ids_again)
        np.testing.assert_array_equal(marked, marked_again)
        assert np.all(ids[marked] % 5 == 1) and marked.sum() == np.sum(ids % 5 == 1)
    with pytest.raises(ParameterError, match="state_dict augments a subset .* this loader every sample"):
        make().load_state_dict(state)
    before = make(augment=[3])
    with pytest.raises(SampleIdError, match="augmented sample id 800 is named twice in state_dict's augment"):
        before.load_state_dict({**state, "augment": np.array([1, 800, 800])})
    np.testing.assert_array_equal(before.augment, [3])  # a refused state changes nothing
    assert before.epoch == 0 and before.batches_done == 0


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_encoded_images_augment_only_the_named_samples(tmp_path, backend):
    store = image_store(str(tmp_path / "images.zarr"))[0]
    images = ImageTransform(size=16, train=False)
    add = {"torch": {"transform": lambda x: x + 100}, "dali": {"dali_transform": lambda x: x + 100}}[backend]
    augment = np.arange(1, store.num_samples, 4)

    def epoch(**options) -> torch.Tensor:
        loader = StreamingLoader(store, batch_size=50, shuffle=False, images=images, backend=backend, **options)
        return torch.cat([x for x, _ in loader])

    plain, augmented = epoch(), epoch(augment=augment, **add)
    changed = (augmented != plain).flatten(1).any(1).numpy()
    np.testing.assert_array_equal(np.flatnonzero(changed), augment)
    assert torch.allclose(augmented[changed], plain[changed] + 100)


def test_a_selection_serves_as_the_augmented_subset_and_is_checked(id_store, tmp_path):
    augment = random_select(id_store, 0.1, seed=0)
    loader = StreamingLoader(id_store, batch_size=500, augment=augment, transform=torch_mark)
    marked = [ids[augmented] for ids, augmented in (rows(x) for x, _ in loader)]
    assert sorted(np.concatenate(marked).tolist()) == augment.ids.tolist()
    arrays = {"x": np.zeros((10, 8), np.float32), "y": np.zeros(10, np.int64)}
    other = write_dataset(str(tmp_path / "other.zarr"), [arrays])
    with pytest.raises(DatasetError, match="selection was made for"):
        StreamingLoader(other, augment=augment, transform=lambda x: x)


@pytest.mark.parametrize(
    "augment, error, message",
    [
        ([3, 2500], SampleIdError, r"augmented sample id 2500 out of range \[0, 2500\) in augment of"),
        ([-1], SampleIdError, "augmented sample id -1 out of range"),
        ([5, 7, 5], SampleIdError, "augmented sample id 5 is named twice in augment of"),
        (np.array([1.0, 2.0]), SampleIdError, "augmented sample ids in augment of .* must be integers"),
        (np.array([True, False]), SampleIdError, "must be integers, got bool"),
        (np.zeros((2, 2), np.int64), DatasetError, "augmented sample ids in augment of .* must be 1-D"),
    ],
)
def test_bad_augment_ids_are_refused_by_name(id_store, augment, error, message):
    with pytest.raises(error, match=message):
        StreamingLoader(id_store, augment=augment, transform=lambda x: x)


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "augment= names the samples `transform` or `dali_transform` applies to; got neither"),
        ({"transform": torch_mark, "views": 2}, "augment= with views=2"),
    ],
)
def test_augment_where_it_cannot_hold_is_refused_by_name(id_store, options, message):
    with pytest.raises(ParameterError, match=message):
        StreamingLoader(id_store, augment=[1, 2], **options)


def test_augment_with_random_crops_or_ragged_inputs_is_refused_by_name(tmp_path):
    store = image_store(str(tmp_path / "images.zarr"))[0]
    with pytest.raises(ParameterError, match=r"images=ImageTransform\(train=True\) crops and flips every sample"):
        StreamingLoader(store, augment=[1], transform=lambda x: x, backend="torch")  # ImageTransform() by default
    signals = np.empty(20, dtype=object)
    signals[:] = [np.ones(3 + i % 5, np.float32) for i in range(20)]
    ragged = write_dataset(str(tmp_path / "ragged.zarr"), [{"signal": signals, "y": np.arange(20) % 2}])
    with pytest.raises(ParameterError, match="augment= with the ragged samples of array 'signal'"):
        StreamingLoader(ragged, augment=[1], transform=lambda x: x)


@pytest.mark.parametrize(
    "backend, transforms, flagged, message",
    [
        (
            "torch",
            {"transform": lambda x: x[:, :4]},
            [1, 3],
            r"transform must keep x's shape and dtype: got \(\d+, 4\)",
        ),
        (
            "torch",
            {"transform": lambda x: x.double()},
            [1, 3],
            "transform must keep x's shape and dtype: .*torch.float64",
        ),
        ("dali", {"dali_transform": lambda x: fn.pad(x, shape=[12])}, [1, 3], "dali_transform must keep x's shape"),
        ("dali", {"dali_transform": lambda x: fn.cast(x, dtype=types.INT32)}, [1, 3], "Found distinct types: int32"),
        # a batch whose every sample is flagged passes DALI's merge whatever the transform made of it
        ("dali", {"dali_transform": lambda x: fn.cast(x, dtype=types.INT32)}, range(50), r"\(8,\) torch.int32 from"),
        ("dali", {"dali_transform": lambda x: fn.pad(x, shape=[12])}, range(50), r"\(12,\) torch.float32 from \(8,\)"),
    ],
)
def test_a_transform_that_changes_x_is_refused_by_name(id_store, backend, transforms, flagged, message):
    loader = StreamingLoader(
        id_store, np.arange(200), batch_size=50, augment=flagged, shuffle=False, backend=backend, **transforms
    )
    with pytest.raises(ParameterError, match=message):
        list(loader)
