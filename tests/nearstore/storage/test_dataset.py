from __future__ import annotations

import numpy as np
import pytest
import zarr

from nearstore import DatasetError, open_dataset, write_dataset


def test_store_is_sharded_zarr_with_one_sample_per_inner_chunk(id_store, id_data):
    group = zarr.open_group(id_store.url, mode="r")
    x = group["x"]
    assert x.shards == (256, 8) and x.chunks == (1, 8)
    np.testing.assert_array_equal(x[:], id_data["x"])
    np.testing.assert_array_equal(group["y"][:], id_data["y"])
    attrs = group.attrs["nearstore"]
    assert attrs["format_version"] == 1 and attrs["num_samples"] == 2500
    assert attrs["sample_arrays"] == ["x", "y"] and attrs["label_array"] == "y"
    assert attrs["class_names"] == ["0", "1", "2", "3", "4"]


def test_zstd_is_used_only_where_it_saves_bytes(tmp_path):
    rng = np.random.default_rng(0)
    batch = {
        "noise": rng.normal(size=(100, 40)).astype(np.float32),  # incompressible
        "image": np.repeat(rng.integers(0, 3, size=(100, 8, 1), dtype=np.uint8), 32, axis=2),
        "y": np.arange(100) % 2,  # 8 bytes: a zstd frame alone is larger
    }
    ds = write_dataset(str(tmp_path / "c.zarr"), [batch])
    compressors = {name: ds.arrays[name].compressors for name in batch}
    assert compressors["noise"] == () and compressors["y"] == ()
    assert [c.to_dict()["name"] for c in compressors["image"]] == ["zstd"]
    for name, values in batch.items():
        np.testing.assert_array_equal(ds.arrays[name][:], values)


def test_writer_streams_one_shard_at_a_time(tmp_path):
    url = str(tmp_path / "stream.zarr")
    shard = 128

    def batches():
        for k in range(10):
            if k >= 4:
                # Everything up to the last whole shard of what was yielded is already on disk.
                written = zarr.open_array(f"{url}/x", mode="r").shape[0]
                assert written == (k * 100 // shard) * shard
            yield {"x": np.full((100, 3), k, dtype=np.float32), "y": np.full(100, k % 2)}

    ds = write_dataset(url, batches(), shard_samples=shard)
    assert ds.num_samples == 1000
    np.testing.assert_array_equal(ds.arrays["x"][:, 0], np.repeat(np.arange(10), 100))


def test_existing_store_is_not_overwritten_by_default(id_store, fingerprint):
    before = fingerprint(id_store.url)
    with pytest.raises(FileExistsError, match="already exists"):
        write_dataset(id_store.url, [{"x": np.zeros((1, 2)), "y": np.zeros(1, dtype=int)}])
    assert fingerprint(id_store.url) == before


@pytest.mark.parametrize(
    ("batches", "error", "message"),
    [
        ([{"x": np.zeros((3, 2)), "y": np.zeros(2, dtype=int)}], ValueError, "same number of samples"),
        ([{"x": np.zeros((3, 2))}], ValueError, "label array 'y' is not among"),
        ([{"x": np.zeros((3, 2)), "y": np.zeros(3)}], DatasetError, "1-D integers"),
        ([{"x": np.zeros((3, 2)), "y": -np.ones(3, dtype=int)}], ValueError, "negative label"),
        (
            [
                {"x": np.zeros((3, 2)), "y": np.zeros(3, dtype=int)},
                {"x": np.zeros((3, 4)), "y": np.zeros(3, dtype=int)},
            ],
            ValueError,
            "array 'x': batch has samples of shape",
        ),
        (
            [
                {"x": np.zeros((3, 2)), "y": np.zeros(3, dtype=int)},
                {"z": np.zeros((3, 2)), "y": np.zeros(3, dtype=int)},
            ],
            ValueError,
            "differ from the first batch",
        ),
        ([], ValueError, "no samples"),
    ],
)
def test_bad_batches_are_named(tmp_path, batches, error, message):
    with pytest.raises(error, match=message):
        write_dataset(str(tmp_path / "bad.zarr"), batches)


def test_interrupted_write_leaves_a_store_that_is_refused(tmp_path):
    url = str(tmp_path / "partial.zarr")

    def dying():
        yield {"x": np.zeros((300, 2), dtype=np.float32), "y": np.zeros(300, dtype=int)}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset(url, dying(), shard_samples=100)
    with pytest.raises(ValueError, match="not a nearstore dataset"):
        open_dataset(url)


def test_open_errors_name_the_url_and_the_problem(tmp_path, id_store):
    with pytest.raises(FileNotFoundError, match="no zarr group at .*missing.zarr"):
        open_dataset(str(tmp_path / "missing.zarr"))
    broken = str(tmp_path / "broken.zarr")
    group = zarr.open_group(broken, mode="w")
    group.create_array("x", shape=(4, 2), dtype="f4")
    group.attrs["nearstore"] = {"format_version": 1, "num_samples": 4, "sample_arrays": ["x", "y"], "label_array": "y"}
    with pytest.raises(ValueError, match="sample array 'y' is listed in the attributes but missing"):
        open_dataset(broken)
    group.attrs["nearstore"] = {"format_version": 1, "num_samples": 5, "sample_arrays": ["x"], "label_array": None}
    with pytest.raises(ValueError, match="array 'x' has 4 samples, the dataset has 5"):
        open_dataset(broken)
    group.attrs["nearstore"] = {"format_version": 99, "num_samples": 4, "sample_arrays": ["x"]}
    with pytest.raises(ValueError, match="format_version 99"):
        open_dataset(broken)


def test_identity_describes_shapes_and_dtypes(id_store):
    identity = id_store.identity()
    assert identity["num_samples"] == 2500
    assert identity["arrays"]["x"] == {"shape": [2500, 8], "dtype": "float32"}
