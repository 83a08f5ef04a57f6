"""Converters from what users have, and the label noise and long tails studied in the benches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import as_format_1, id_encoded
from hypothesis import given
from hypothesis import strategies as st

from nearstore import DatasetError, ParameterError, SelectiveReader, open_dataset, write_dataset
from nearstore.app.converters import (
    digits_batches,
    long_tail,
    mnist1d_batches,
    nearstore_batches,
    noisy_labels,
    npy_arrays,
    npz_arrays,
)
from nearstore.storage.integrity import verify_dataset


def test_a_store_written_before_checksums_is_rewritten_whole_into_the_current_format(tmp_path, id_store_url):
    old = str(tmp_path / "old.zarr")
    write_dataset(old, [id_encoded()], shard_samples=300, class_names=tuple("abcde"))
    as_format_1(old)
    batches, source = nearstore_batches(old)
    new = write_dataset(
        str(tmp_path / "new.zarr"), batches, label_array=source.label_array, class_names=source.class_names
    )
    assert new.manifest is not None and verify_dataset(new, progress=False) == []
    assert new.class_names == tuple("abcde") and new.num_samples == source.num_samples
    assert new.identity()["fingerprint"] == open_dataset(id_store_url).identity()["fingerprint"]  # same samples
    for name, values in id_encoded().items():
        np.testing.assert_array_equal(SelectiveReader(new).read(np.arange(2500))[name], values)


def test_npy_and_npz_sources_stream_in_batches(tmp_path):
    x = np.random.default_rng(0).normal(size=(1000, 3)).astype(np.float32)
    y = np.arange(1000) % 7
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    for batches in (
        npy_arrays(tmp_path / "x.npy", tmp_path / "y.npy", batch=300).batches(),
        npz_arrays(tmp_path / "d.npz", batch=300).batches(),
    ):
        chunks = list(batches)
        assert [len(c["x"]) for c in chunks] == [300, 300, 300, 100]
        np.testing.assert_array_equal(np.concatenate([c["x"] for c in chunks]), x)
        np.testing.assert_array_equal(np.concatenate([c["y"] for c in chunks]), y)


def test_source_errors_name_the_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 2)))
    np.save(tmp_path / "y.npy", np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="x.npy has 5 samples but .*y.npy has 4"):
        npy_arrays(tmp_path / "x.npy", tmp_path / "y.npy")
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        npy_arrays(tmp_path / "nope.npy")
    np.savez(tmp_path / "d.npz", a=np.zeros(3))
    with pytest.raises(DatasetError, match=r"no array 'x'; it has \['a'\]$"):
        npz_arrays(tmp_path / "d.npz")
    np.savez(tmp_path / "u.npz", x=np.zeros(3))  # no labels: the message says how to convert it so
    with pytest.raises(
        DatasetError, match=r"no array 'y'; it has \['x'\] \(unlabelled data: --y-key '', or y_key=None\)"
    ):
        npz_arrays(tmp_path / "u.npz")


def test_labels_neither_integers_nor_strings_of_a_sample_each_are_refused_naming_their_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 2), dtype=np.float32))
    np.save(tmp_path / "y.npy", np.arange(10) / 2)  # floats: a regression target, or whole numbers saved so
    np.save(tmp_path / "pairs.npy", np.zeros((10, 2), dtype=np.int64))
    np.savez(tmp_path / "a.npz", x=np.zeros((10, 2)), y=np.arange(10.0))
    # refused when the files are opened, before a batch is asked for: nothing can have been written yet
    with pytest.raises(DatasetError, match=r"label array 'y' from \S*y.npy holds float64 values of shape \(10,\)"):
        npy_arrays(tmp_path / "x.npy", tmp_path / "y.npy")
    with pytest.raises(DatasetError, match=r"'y' from \S*pairs.npy holds int64 values of shape \(10, 2\)"):
        npy_arrays(tmp_path / "x.npy", tmp_path / "pairs.npy")
    with pytest.raises(DatasetError, match=r"label array 'y' from \S*a.npz:y holds float64 values"):
        npz_arrays(tmp_path / "a.npz")
    assert len(list(npz_arrays(tmp_path / "a.npz", y_key=None).batches())) == 1  # unlabelled, its floats are no labels


def test_a_negative_label_is_refused_naming_its_file_row_and_value(tmp_path):
    y = np.arange(10)
    y[[6, 8]] = -3, -1
    np.save(tmp_path / "x.npy", np.zeros((10, 2), dtype=np.float32))
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "column.npy", y[:, None])  # (n, 1), as many tools save labels
    np.savez(tmp_path / "a.npz", x=np.zeros((10, 2)), y=y)
    # refused when the files are opened, before a batch is asked for: nothing can have been written yet
    with pytest.raises(DatasetError, match=r"label array 'y' from \S*y.npy holds a negative label, -3, at row 6"):
        npy_arrays(tmp_path / "x.npy", tmp_path / "y.npy")
    with pytest.raises(DatasetError, match=r"from \S*column.npy holds a negative label, -3, at row 6"):
        npy_arrays(tmp_path / "x.npy", tmp_path / "column.npy")
    with pytest.raises(DatasetError, match=r"label array 'y' from \S*a.npz:y holds a negative label, -3, at row 6"):
        npz_arrays(tmp_path / "a.npz")
    assert len(list(npz_arrays(tmp_path / "a.npz", y_key=None).batches())) == 1  # unlabelled: y is not read as labels


def test_labels_as_utf8_bytes_are_class_names_and_other_bytes_are_refused_naming_their_row(tmp_path):
    x = np.zeros((4, 2), dtype=np.float32)
    # bytes, as HDF5 files hold text: UTF-8, not ASCII
    np.savez(tmp_path / "a.npz", x=x, y=np.array(["émeu".encode(), b"cat", b"cat", "émeu".encode()]))
    arrays = npz_arrays(tmp_path / "a.npz")
    assert arrays.class_names == ("cat", "émeu")
    dataset = write_dataset(str(tmp_path / "a.zarr"), arrays.batches(), class_names=arrays.class_names)
    assert dataset.class_names == ("cat", "émeu")
    np.testing.assert_array_equal(dataset.labels[:], [1, 0, 0, 1])
    np.savez(tmp_path / "b.npz", x=x, y=np.array([b"cat", b"cat", "émeu".encode("latin-1"), b"cat"]))
    with pytest.raises(
        DatasetError, match=r"'y' from \S*b.npz:y holds a label that is not UTF-8 text, b'\\xe9meu', at row 2"
    ):
        npz_arrays(tmp_path / "b.npz")
    with pytest.raises(
        DatasetError, match=r"label array 'y' holds a label that is not UTF-8 text, b'\\xe9meu', at row 6"
    ):
        write_dataset(
            str(tmp_path / "b.zarr"),
            [{"x": x, "y": np.array([b"cat"] * 4)}, {"x": x, "y": np.load(tmp_path / "b.npz")["y"]}],
        )


def test_mnist1d_is_deterministic_balanced_and_leaves_numpy_global_state(tmp_path):
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = list(mnist1d_batches(250, seed=3, batch=100))
    assert np.random.rand() == expected_next
    again = list(mnist1d_batches(250, seed=3, batch=100))
    other = list(mnist1d_batches(250, seed=4, batch=100))
    x = np.concatenate([b["x"] for b in first])
    assert x.shape == (250, 40) and x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_array_equal(x, np.concatenate([b["x"] for b in again]))
    assert not np.array_equal(x, np.concatenate([b["x"] for b in other]))
    assert np.bincount(first[0]["y"], minlength=10).tolist() == [10] * 10


def test_digits_source_has_the_sklearn_digits():
    (batch,) = list(digits_batches())
    assert batch["x"].shape == (1797, 8, 8) and batch["x"].dtype == np.uint8
    assert set(np.unique(batch["y"])) == set(range(10))


@given(
    n=st.integers(10, 2000),
    rate=st.floats(0, 1),
    seed=st.integers(0, 2**31),
    kind=st.sampled_from(["symmetric", "pair"]),
)
def test_noisy_labels_corrupt_about_their_rate_reproducibly(n, rate, seed, kind):
    labels = np.arange(n) % 10
    noisy = noisy_labels(labels, kind, rate, seed=seed)
    np.testing.assert_array_equal(noisy, noisy_labels(labels, kind, rate, seed=seed))
    assert noisy.min() >= 0 and noisy.max() < 10
    changed = noisy != labels
    if kind == "pair":
        np.testing.assert_array_equal(noisy[changed], (labels[changed] + 1) % 10)
    # symmetric noise may draw the same class again: about rate · 9 / 10 of the labels change
    expected = rate * (0.9 if kind == "symmetric" else 1.0)
    # within 4 standard deviations of the binomial count, and 2 flips' slack where the count is
    # too small for the normal approximation (one flip among 363 at a rate of 6e-5 is a 2% event)
    assert abs(changed.sum() - n * expected) <= 4 * np.sqrt(n * expected * (1 - expected)) + 2


def test_a_long_tail_keeps_a_falling_share_of_each_class():
    labels = np.repeat(np.arange(10), 1000)
    kept = long_tail(labels, 100)
    counts = np.bincount(labels[kept], minlength=10)
    assert counts[0] == 1000 and counts[-1] == 10 and np.all(np.diff(counts) < 0)
    assert np.all(np.diff(kept) > 0) and len(long_tail(labels, 1)) == len(labels)


def test_bad_noise_is_named():
    with pytest.raises(ParameterError, match="label noise rate must be in \\[0, 1\\], got 1.5"):
        noisy_labels(np.arange(10), "symmetric", 1.5)
    with pytest.raises(ParameterError, match="label noise must be one of"):
        noisy_labels(np.arange(10), "asymmetric", 0.1)
    with pytest.raises(ParameterError, match="imbalance ratio must be >= 1, got 0.5"):
        long_tail(np.arange(10), 0.5)


def test_a_file_that_is_no_numpy_array_is_refused_naming_it(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"not numpy\n")
    (tmp_path / "junk.npz").write_bytes(b"not numpy\n")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match=r"junk.npy is neither an .npy file nor an .npz archive"):
        npy_arrays(tmp_path / "junk.npy")
    with pytest.raises(DatasetError, match=r"junk.npz is neither"):
        npz_arrays(tmp_path / "junk.npz")
    with pytest.raises(DatasetError, match=r"objects.npy cannot be read as numeric arrays"):
        npy_arrays(tmp_path / "objects.npy")


def test_an_array_of_values_not_stored_is_refused_naming_its_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2), dtype=np.complex64))
    np.save(tmp_path / "dates.npy", np.zeros(4, dtype="datetime64[s]"))
    np.save(tmp_path / "names.npy", np.array(["cat", "dog", "cat", "dog"]))
    np.save(tmp_path / "ok.npy", np.zeros((4, 2)))
    np.savez(tmp_path / "d.npz", images=np.array(["a", "b"]), y=np.arange(2))
    with pytest.raises(DatasetError, match=r"array 'x' from \S*x.npy holds complex64 values, which are not stored"):
        npy_arrays(tmp_path / "x.npy")
    with pytest.raises(DatasetError, match=r"array 'y' from \S*dates.npy holds datetime64\[s\] values"):
        npy_arrays(tmp_path / "ok.npy", tmp_path / "dates.npy")
    named = npy_arrays(tmp_path / "ok.npy", tmp_path / "names.npy")  # labels may be class names
    assert list(next(named.batches())["y"]) == ["cat", "dog"] * 2 and named.class_names == ("cat", "dog")
    with pytest.raises(DatasetError, match=r"array 'x' from \S*names.npy holds <U3 values"):
        npy_arrays(tmp_path / "names.npy", tmp_path / "names.npy")
    with pytest.raises(DatasetError, match=r"array 'x' from \S*d.npz:images holds <U1 values"):
        npz_arrays(tmp_path / "d.npz", x_key="images")
