"""Ragged numeric samples in the format: written as given, read back exactly (by us and by zarr),
their layout in the array's attributes, bad samples and damaged layouts named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from nearstore import DatasetError, SelectiveReader, open_dataset, write_dataset
from nearstore.storage.ragged import RaggedBatch, RaggedLayout


def ragged(samples: list[np.ndarray]) -> np.ndarray:
    """An object array of arrays (np.asarray would stack or refuse them)."""
    array = np.empty(len(samples), dtype=object)
    array[:] = samples
    return array


def token_samples(n: int, seed: int = 0) -> list[np.ndarray]:
    """n token sequences of 0..60 int32 ids, one empty."""
    rng = np.random.default_rng(seed)
    samples = [rng.integers(-5, 50_000, rng.integers(0, 60)).astype(np.int32) for _ in range(n)]
    samples[2] = np.zeros(0, np.int32)
    return samples


def signal_samples(n: int, seed: int = 0) -> list[np.ndarray]:
    """n two-channel float32 signals of 1..90 rows, big-endian (stored little-endian all the same)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(rng.integers(1, 90), 2)).astype(">f4") for _ in range(n)]


@pytest.fixture
def store(tmp_path):
    tokens, signals = token_samples(700), signal_samples(700)
    url = str(tmp_path / "ragged.zarr")
    batches = [
        {
            "tokens": ragged(tokens[i : i + 300]),
            "signal": ragged(signals[i : i + 300]),
            "y": np.arange(i, i + 300)[: 700 - i] % 3,
        }
        for i in (0, 300, 600)
    ]
    return write_dataset(url, batches, shard_samples=128), tokens, signals


def test_ragged_samples_read_back_exactly_in_any_order(store):
    dataset, tokens, signals = store
    ids = np.random.default_rng(1).permutation(700)[:250]
    read = SelectiveReader(dataset, ["tokens", "signal"]).read(ids)
    for name, written in (("tokens", tokens), ("signal", signals)):
        layout = dataset.ragged(name)
        for got, i in zip(layout.decode_all(read[name], ids), ids):
            assert got.dtype == written[i].dtype.newbyteorder("<") and got.shape == written[i].shape
            np.testing.assert_array_equal(got, written[i])
    assert dataset.ragged("y") is None


def test_the_layout_is_in_the_attributes_and_in_the_identity(store):
    dataset, tokens, signals = store
    assert dataset.identity()["arrays"]["signal"] == {
        "shape": [700],
        "dtype": "object",
        "ragged": {"dtype": "<f4", "row_shape": [2]},
    }
    assert dataset.identity()["arrays"]["y"] == {"shape": [700], "dtype": "int64"}
    array = zarr.open_group(dataset.url, mode="r")["tokens"]  # what any zarr user sees, and how to read it
    layout = array.attrs["nearstore"]["ragged"]
    assert layout == {"dtype": "<i4", "row_shape": []}
    for i in (0, 2, 699):
        np.testing.assert_array_equal(np.frombuffer(array[i : i + 1][0], layout["dtype"]), tokens[i])


def test_packed_batches_give_every_row_and_where_each_sample_starts(store):
    dataset, _, signals = store
    ids = np.array([5, 2, 5, 640])
    packed = dataset.ragged("signal").pack(SelectiveReader(dataset, ["signal"]).read(ids)["signal"], ids)
    assert isinstance(packed, RaggedBatch) and len(packed) == 4
    np.testing.assert_array_equal(packed.offsets, np.cumsum([0] + [len(signals[i]) for i in ids]))
    np.testing.assert_array_equal(packed.values, np.concatenate([signals[i] for i in ids]))
    assert packed.values.flags.writeable
    again = RaggedBatch.of([signals[i] for i in ids])
    np.testing.assert_array_equal(again.offsets, packed.offsets)


def test_bytes_that_are_not_whole_rows_are_named():
    layout = RaggedLayout(np.dtype("<f4"), (2,))
    with pytest.raises(DatasetError, match="sample 17: 12 bytes are not whole rows"):
        layout.pack(ragged([b"\0" * 8, b"\0" * 12]), [16, 17])


@pytest.mark.parametrize(
    "second, message",
    [
        (np.zeros(3, np.float32), "sample 1 is a float32 array of shape \\(3,\\); the array holds ragged int32"),
        (np.zeros((3, 2), np.int32), "sample 1 is a int32 array of shape \\(3, 2\\)"),
        (np.int32(4), "sample 1 is a int32"),
        (b"bytes", "sample 1 is a bytes"),
    ],
)
def test_samples_unlike_the_first_are_named(tmp_path, second, message):
    with pytest.raises(DatasetError, match=f"array 'tokens': {message}"):
        write_dataset(
            str(tmp_path / "r.zarr"), [{"tokens": ragged([np.arange(3, dtype=np.int32), second])}], label_array=None
        )
    assert not (tmp_path / "r.zarr").exists()  # a write that fails leaves nothing


def test_a_later_batch_names_the_samples_place(tmp_path):
    batches = [{"t": ragged([np.arange(2.0)] * 5)}, {"t": ragged([np.arange(3.0), np.arange(3, dtype=np.int8)])}]
    with pytest.raises(DatasetError, match="sample 6 is a int8 array"):
        write_dataset(str(tmp_path / "r.zarr"), batches, label_array=None)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"dtype": "<f4"}, "its ragged layout .* is damaged"),
        ({"dtype": "no such dtype", "row_shape": []}, "its ragged layout .* is damaged"),
        ({"dtype": "<U4", "row_shape": []}, "its ragged layout .* is not rows of numbers"),
        ({"dtype": "<f4", "row_shape": [0]}, "its ragged layout .* is not rows of numbers"),
    ],
)
def test_a_damaged_layout_is_refused_at_open_by_array(store, layout, message):
    dataset, _, _ = store
    path = Path(dataset.url) / "signal" / "zarr.json"
    document = json.loads(path.read_text())
    document["attributes"]["nearstore"]["ragged"] = layout
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match=f"array 'signal': {message}"):
        open_dataset(dataset.url)


def test_a_layout_on_fixed_size_samples_is_refused(store):
    dataset, _, _ = store
    path = Path(dataset.url) / "y" / "zarr.json"
    document = json.loads(path.read_text())
    document.setdefault("attributes", {})["nearstore"] = {"ragged": {"dtype": "<i8", "row_shape": []}}
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match="array 'y' records a ragged layout but holds int64 samples"):
        open_dataset(dataset.url)
