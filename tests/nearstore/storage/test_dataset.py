from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from nearstore import DatasetError, ParameterError, SelectiveReader, open_dataset, verify_dataset, write_dataset


def test_store_is_sharded_zarr_with_one_sample_per_inner_chunk(id_store, id_data):
    group = zarr.open_group(id_store.url, mode="r")
    x = group["x"]
    assert x.shards == (256, 8) and x.chunks == (1, 8)
    np.testing.assert_array_equal(x[:], id_data["x"])
    np.testing.assert_array_equal(group["y"][:], id_data["y"])
    attrs = group.attrs["nearstore"]
    assert attrs["format_version"] == 2 and attrs["num_samples"] == 2500
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
    compressors = {name: [c.to_dict()["name"] for c in ds.arrays[name].compressors] for name in batch}
    # every inner chunk ends in its checksum, compressed or not
    assert compressors == {"noise": ["crc32c"], "y": ["crc32c"], "image": ["zstd", "crc32c"]}
    for name, values in batch.items():
        np.testing.assert_array_equal(ds.arrays[name][:], values)


def test_compression_and_chunks_do_not_hang_on_the_first_batch_s_size(tmp_path):
    # One sample a batch: zstd is decided on the first shard's first samples, as for one batch of
    # them, not on the first sample alone (here noise: the store was left uncompressed, 13x the bytes).
    rng = np.random.default_rng(0)
    image = np.repeat(rng.integers(0, 3, size=(200, 8, 1), dtype=np.uint8), 32, axis=2)
    image[0] = rng.integers(0, 256, size=(8, 32), dtype=np.uint8)
    whole = write_dataset(str(tmp_path / "whole.zarr"), [{"x": image}], label_array=None, shard_samples=100)
    one_each = ({"x": image[i : i + 1]} for i in range(200))
    singles = write_dataset(str(tmp_path / "singles.zarr"), one_each, label_array=None, shard_samples=100)
    for ds in (whole, singles):
        assert [c.to_dict()["name"] for c in ds.arrays["x"].compressors] == ["zstd", "crc32c"]
        np.testing.assert_array_equal(ds.arrays["x"][:], image)
    assert singles.arrays["x"].chunks == whole.arrays["x"].chunks
    assert singles.manifest.nbytes == whole.manifest.nbytes


def test_writer_streams_one_shard_at_a_time(tmp_path):
    url = str(tmp_path / "stream.zarr")
    shard = 128

    def stored() -> set[str]:
        return {str(p.relative_to(url)) for p in Path(url).rglob("*") if p.is_file()}

    def shards(n: int) -> set[str]:  # the shard objects of x (samples of shape (3,)) and y, 0 to n-1
        return {f"x/c/{i}/0" for i in range(n)} | {f"y/c/{i}" for i in range(n)}

    def batches():
        for k in range(10):
            # Every whole shard of what was yielded is stored as its shard object already; the
            # arrays' zarr.json come once, at the end, so no object is rewritten shard after shard.
            assert stored() == {"zarr.json"} | shards(k * 100 // shard)
            yield {"x": np.full((100, 3), k, dtype=np.float32), "y": np.full(100, k % 2)}

    ds = write_dataset(url, batches(), shard_samples=shard)
    assert ds.num_samples == 1000
    assert stored() == {"zarr.json", "x/zarr.json", "y/zarr.json"} | shards(8)
    np.testing.assert_array_equal(ds.arrays["x"][:, 0], np.repeat(np.arange(10), 100))


@pytest.mark.parametrize("chunk_samples", [None, 1])
def test_fixed_size_shards_are_the_bytes_zarr_itself_writes(tmp_path, fingerprint, chunk_samples):
    # The writer encodes a shard in memory and uploads it; zarr writing the same array to the store
    # (as the writer once did) must give the same objects, byte for byte, and the same zarr.json.
    rng = np.random.default_rng(0)
    n = 700  # shards of 256: the last one partial
    data = {
        "noise": rng.normal(size=(n, 5)).astype(np.float32),  # incompressible: stored raw
        "image": np.repeat(rng.integers(0, 3, size=(n, 4, 1), dtype=np.uint8), 8, axis=2),  # zstd
        "flag": rng.random(n) < 0.5,
        "half": rng.normal(size=(n, 3)).astype(">f2"),  # big-endian, stored little-endian
        "y": rng.integers(0, 10, n),
    }
    url = str(tmp_path / "written.zarr")
    batches = ({k: v[i : i + 300] for k, v in data.items()} for i in range(0, n, 300))
    dataset = write_dataset(url, batches, shard_samples=256, chunk_samples=chunk_samples)
    for name, values in data.items():
        written = zarr.open_array(f"{url}/{name}", mode="r")
        compressors = [ZstdCodec(level=3), Crc32cCodec()] if name == "image" else [Crc32cCodec()]
        by_zarr = zarr.create_array(
            str(tmp_path / "by_zarr" / name),
            shape=values.shape,
            dtype=values.dtype.newbyteorder("<"),
            chunks=written.chunks,
            shards=(256, *values.shape[1:]),
            compressors=compressors,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        by_zarr[:] = values
        objects = fingerprint(f"{url}/{name}")
        assert len(objects) == 3 + 1  # the shards, and zarr.json (the writer uploads it once, at the end)
        assert objects == fingerprint(tmp_path / "by_zarr" / name), name
        np.testing.assert_array_equal(written[:], values)
    read = SelectiveReader(dataset).read(np.arange(n))
    for name, values in data.items():
        np.testing.assert_array_equal(read[name], values)
    assert verify_dataset(dataset, progress=False) == []


def test_small_samples_share_inner_chunks_and_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(3000, 40)).astype(np.float32),  # 160 bytes: 16 to a 4 KiB chunk
        "image": rng.integers(0, 256, size=(3000, 3, 32, 32), dtype=np.uint8),  # 3 KiB: alone
        "y": rng.integers(0, 10, 3000),  # 8 bytes: 512 to a chunk
    }
    chunked = write_dataset(str(tmp_path / "chunked.zarr"), [batch])
    assert [chunked.arrays[name].chunks[0] for name in batch] == [16, 1, 512]
    single = write_dataset(str(tmp_path / "single.zarr"), [batch], chunk_samples=1)
    # a sample's 16-byte index entry and 4-byte checksum, spread over its chunk
    assert chunked.stored_nbytes(["x"]) < single.stored_nbytes(["x"]) - 3000 * 18
    ids = rng.permutation(3000)[:400]
    for dataset in (chunked, single):
        read = SelectiveReader(dataset).read(np.concatenate([ids, ids[:7], [2999, 0]]))
        for name, values in batch.items():
            np.testing.assert_array_equal(read[name], values[np.concatenate([ids, ids[:7], [2999, 0]])])
    assert chunked.identity()["fingerprint"] == single.identity()["fingerprint"]  # the same samples


@pytest.mark.parametrize(
    ("chunk_samples", "message"),
    [
        (0, "chunk_samples must be an integer >= 1, got 0"),
        (2.5, "chunk_samples must be an integer >= 1, got 2.5"),
        (3, r"chunk_samples must be a divisor of shard_samples \(1024\), got 3"),
        (2048, r"chunk_samples must be a divisor of shard_samples \(1024\), got 2048"),
    ],
)
def test_chunk_samples_must_divide_the_shard(tmp_path, chunk_samples, message):
    with pytest.raises(ValueError, match=message):
        write_dataset(
            str(tmp_path / "c.zarr"), [{"x": np.zeros((4, 2))}], label_array=None, chunk_samples=chunk_samples
        )
    assert not (tmp_path / "c.zarr").exists()


def test_string_labels_are_stored_as_class_ids_and_their_names_kept(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.array(["dog", "cat", "dog", "ant", "cat", "dog"])
    # without names: ids in the order the labels first appear, across batches (an empty one too)
    batches = [{"x": x[:3], "y": y[:3]}, {"x": x[:0], "y": y[:0]}, {"x": x[3:], "y": y[3:]}]
    seen = write_dataset(str(tmp_path / "a.zarr"), batches)
    assert seen.class_names == ("dog", "cat", "ant")
    np.testing.assert_array_equal(seen.labels[:], [0, 1, 0, 2, 1, 0])
    # with names: each label's index among them; a column vector (n, 1) as many tools save labels
    named = write_dataset(str(tmp_path / "b.zarr"), [{"x": x, "y": y[:, None]}], class_names=["ant", "cat", "dog"])
    assert named.class_names == ("ant", "cat", "dog")
    np.testing.assert_array_equal(named.labels[:], [2, 1, 2, 0, 1, 2])
    with pytest.raises(DatasetError, match="sample 3 has the label 'ant', which is not among the 2 class names"):
        write_dataset(str(tmp_path / "c.zarr"), [{"x": x, "y": y}], class_names=["cat", "dog"])
    assert not (tmp_path / "c.zarr").exists()


def test_class_names_and_labels_as_bytes_are_text_and_odd_label_arrays_are_named(tmp_path):
    # h5py hands text back as bytes: the names were stored "b'cat'", and bytes labels then refused
    x = np.zeros((3, 2), np.float32)
    names = np.array([b"cat", b"dog"])
    assert write_dataset(
        str(tmp_path / "a.zarr"), [{"x": x, "y": np.array([0, 1, 1])}], class_names=names
    ).class_names == ("cat", "dog")
    stored = write_dataset(
        str(tmp_path / "b.zarr"), [{"x": x, "y": np.array([b"dog", b"cat", b"dog"])}], class_names=names
    )
    np.testing.assert_array_equal(stored.labels[:], [1, 0, 1])
    with pytest.raises(ParameterError, match="class_names must be a sequence of names, got the string 'cat'"):
        write_dataset(str(tmp_path / "c.zarr"), [{"x": x, "y": np.array([0, 0, 0])}], class_names="cat")
    huge = np.array([0, 1, 2**64], dtype=object)  # a pandas column of Python ints: a bare OverflowError
    with pytest.raises(DatasetError, match="label array 'y': sample 2 is 18446744073709551616, past int64's range"):
        write_dataset(str(tmp_path / "d.zarr"), [{"x": x, "y": huge}])
    # labels alone: written, then refused by every loader as "input_array None"
    with pytest.raises(DatasetError, match="the batches hold only the label array 'y'"):
        write_dataset(str(tmp_path / "e.zarr"), [{"y": np.array([0, 1, 1])}])
    assert not any((tmp_path / name).exists() for name in ("c.zarr", "d.zarr", "e.zarr"))


def test_class_names_are_read_once_as_strings(tmp_path):
    x = np.zeros((3, 2), np.float32)
    named = write_dataset(str(tmp_path / "a.zarr"), [{"x": x, "y": np.array(["b", "a", "c"])}], class_names=iter("abc"))
    assert named.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(named.labels[:], [1, 0, 2])
    numbered = write_dataset(
        str(tmp_path / "b.zarr"), [{"x": x, "y": np.arange(3)}], class_names=(n for n in (7, 8, 9))
    )
    assert numbered.class_names == open_dataset(numbered.url).class_names == ("7", "8", "9")


def test_existing_store_is_not_overwritten_by_default(id_store, fingerprint):
    before = fingerprint(id_store.url)
    with pytest.raises(FileExistsError, match="already exists"):
        write_dataset(id_store.url, [{"x": np.zeros((1, 2)), "y": np.zeros(1, dtype=int)}])
    assert fingerprint(id_store.url) == before


def test_overwrite_replaces_no_zarr_group_but_nearstores(tmp_path, fingerprint):
    """A user's own zarr group (xarray's, plain zarr's) is no dataset overwrite may delete."""
    theirs = zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w", zarr_format=3)
    theirs.create_array("temperature", shape=(3,), dtype="f4")[:] = [1.0, 2.0, 3.0]
    before = fingerprint(str(tmp_path / "theirs.zarr"))
    with pytest.raises(FileExistsError, match="is a zarr group but not a nearstore dataset: overwrite replaces only"):
        write_dataset(
            str(tmp_path / "theirs.zarr"), [{"x": np.zeros((1, 2)), "y": np.zeros(1, dtype=int)}], overwrite=True
        )
    assert fingerprint(str(tmp_path / "theirs.zarr")) == before


def _ragged(samples: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(samples), dtype=object)
    out[:] = samples
    return out


@pytest.mark.parametrize(
    ("batches", "error", "message"),
    [
        ([{"x": np.zeros((3, 2)), "y": np.zeros(2, dtype=int)}], ValueError, "same number of samples"),
        ([{"x": np.zeros((3, 2))}], ValueError, "label array 'y' is not among"),
        ([{"x": np.zeros((3, 2)), "y": np.zeros(3)}], DatasetError, "integers or strings of shape"),
        ([{"x": np.zeros((3, 2)), "y": -np.ones(3, dtype=int)}], ValueError, "negative label"),
        (
            [{"x": np.zeros((2, 2)), "y": np.array(["a", "b"])}, {"x": np.zeros((2, 2)), "y": np.zeros(2, dtype=int)}],
            DatasetError,
            "label array 'y': samples from 2 are int64, those before were strings",
        ),
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
        ([{"x": np.float32(1), "y": np.int64(0)}], DatasetError, "array 'x' needs a sample axis, got a scalar"),
        # (x, y) pairs, as format.md said: an AttributeError from inside the writer
        ([(np.zeros((2, 2)), np.zeros(2, int))], ParameterError, "a batch must map array names .*; got a tuple"),
        ([{"x": np.zeros((2, 2), np.longdouble), "y": np.zeros(2, int)}], DatasetError, "holds float128 samples"),
        (
            [{"x": np.zeros((3, 2)), "y": np.array(["cat", None, "dog"], dtype=object)}],
            DatasetError,
            "label array 'y': sample 1 is None, not a class name",  # was: sample 0 is a str, expected bytes
        ),
        # ragged samples not of numbers: refused at the first batch (they were written whole, then refused)
        ([{"x": _ragged([np.zeros(3, complex)]), "y": np.zeros(1, int)}], DatasetError, "sample 0 holds complex128"),
        ([{"x": _ragged([np.zeros((3, 0))]), "y": np.zeros(1, int)}], DatasetError, r"rows of shape \(0,\)"),
    ],
)
def test_bad_batches_are_named(tmp_path, batches, error, message):
    with pytest.raises(error, match=message):
        write_dataset(str(tmp_path / "bad.zarr"), batches)


def test_a_generator_refilling_one_buffer_is_written_as_it_yielded(tmp_path):
    # the pieces waiting for their shard were the caller's arrays: each refill overwrote them all
    x, y = np.empty((4, 3), np.float32), np.empty(4, np.int64)

    def batches():
        for b in range(10):
            x[:] = np.arange(12).reshape(4, 3) + 100 * b
            y[:] = b % 3
            yield {"x": x, "y": y}

    read = SelectiveReader(write_dataset(str(tmp_path / "refilled.zarr"), batches(), shard_samples=16)).read(
        np.arange(40)
    )
    np.testing.assert_array_equal(read["x"][:4], np.arange(12).reshape(4, 3))
    np.testing.assert_array_equal(read["y"], np.repeat(np.arange(10) % 3, 4))


def test_labels_in_an_object_array_of_integers_are_integers(tmp_path):
    dataset = write_dataset(str(tmp_path / "o.zarr"), [{"x": np.zeros((3, 2)), "y": np.array([1, 2, 0], dtype=object)}])
    assert SelectiveReader(dataset).read(np.arange(3))["y"].tolist() == [1, 2, 0] and dataset.num_classes == 3


def test_empty_batches_first_tell_nothing_of_the_layout(tmp_path):
    tokens = _ragged([np.arange(n, dtype=np.int32) for n in (3, 5)])
    empty = {"x": _ragged([]), "y": np.zeros(0, np.int32)}
    dataset = write_dataset(str(tmp_path / "r.zarr"), [empty, {"x": tokens, "y": np.array(["a", "b"])}])
    assert dataset.ragged("x") is not None and dataset.class_names == ("a", "b")
    big = write_dataset(
        str(tmp_path / "f.zarr"),
        [
            {"x": np.zeros((0, 1024), np.float32), "y": np.zeros(0, int)},
            {"x": np.ones((4, 1024), np.float32), "y": np.zeros(4, int)},
        ],
    )
    assert big.arrays["x"].chunks[0] == 1  # a 4 KiB sample is a chunk of its own (format.md), as without it
    write_dataset(str(tmp_path / "n.zarr"), [{"x": np.ones((8, 2)), "y": np.zeros(8, int)}], shard_samples=np.int64(4))
    assert open_dataset(str(tmp_path / "n.zarr")).shard_samples == 4  # numpy's integers (was a JSON error at the end)


def test_a_store_whose_writer_was_killed_is_refused(tmp_path):
    # A writer killed before its last step leaves no nearstore attributes (one killed mid-way:
    # tests/nearstore/storage/test_object_storage.py; one that fails removes what it wrote:
    # tests/nearstore/storage/test_integrity.py).
    url = str(tmp_path / "partial.zarr")
    write_dataset(url, [{"x": np.zeros((300, 2), dtype=np.float32), "y": np.zeros(300, dtype=int)}], shard_samples=100)
    zarr.open_group(url, mode="r+").attrs.put({"nearstore_writing": True})  # what a killed write leaves
    with pytest.raises(ValueError, match="is a nearstore dataset whose write was interrupted"):
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
    # attributes of zarr's own writers, of another type: read letter by letter, a bare TypeError or
    # IndexError, or an empty list that opened and failed at the first read
    group.create_array("s", shape=(), dtype="f4")
    for attrs, message in (
        ({"sample_arrays": "xy"}, "attribute 'sample_arrays' must be a non-empty list of array names, got 'xy'"),
        ({"sample_arrays": []}, "attribute 'sample_arrays' must be a non-empty list of array names, got \\[\\]"),
        ({"label_array": ["y"]}, "attribute 'label_array' must be an array name, or null, got \\['y'\\]"),
        ({"num_samples": 4.5}, "attribute 'num_samples' must be an integer >= 0, got 4.5"),
        ({"sample_arrays": ["s", "x"]}, "array 's' is listed as a sample array but holds one value"),
    ):
        group.attrs["nearstore"] = {"format_version": 1, "num_samples": 4, "sample_arrays": ["x"], **attrs}
        with pytest.raises(ValueError, match=message):
            open_dataset(broken)


def test_opening_reads_the_zarr_json_documents_once_each_and_counts_them(id_store_url):
    dataset = open_dataset(id_store_url)
    documents = [Path(id_store_url, name, "zarr.json") for name in ("", "x", "y")]
    assert dataset.open_stats.as_dict() == {
        "bytes": sum(d.stat().st_size for d in documents),
        "requests": 3,
        "samples": 0,
        "retries": 0,
    }
    assert dataset.array_json["x"] == json.loads(documents[1].read_text())


def test_identity_describes_shapes_and_dtypes(id_store):
    identity = id_store.identity()
    assert identity["num_samples"] == 2500
    assert identity["arrays"]["x"] == {"shape": [2500, 8], "dtype": "float32"}


def encoded(samples: list[bytes]) -> np.ndarray:
    """An object array of bytes, as a converter builds it (np.asarray would make fixed-width 'S'
    strings and drop trailing NULs)."""
    array = np.empty(len(samples), dtype=object)
    array[:] = samples
    return array


def random_bytes(n: int, seed: int = 0) -> list[bytes]:
    """n samples of 0..3,000 random bytes, some empty, some ending in NUL."""
    rng = np.random.default_rng(seed)
    samples = [rng.integers(0, 256, rng.integers(0, 3000), dtype=np.uint8).tobytes() for _ in range(n)]
    samples[3], samples[4] = b"", b"ends in NUL\x00\x00"
    return samples


def test_encoded_samples_are_stored_as_given_and_zarr_reads_them(tmp_path):
    samples = random_bytes(700)
    url = str(tmp_path / "encoded.zarr")
    batches = [
        {"image": encoded(samples[i : i + 300]), "y": np.arange(i, min(i + 300, 700)) % 3} for i in (0, 300, 600)
    ]
    dataset = write_dataset(url, batches, shard_samples=128)
    assert dataset.encoded("image") and not dataset.encoded("y")
    assert dataset.identity()["arrays"]["image"] == {"shape": [700], "dtype": "object"}
    array = zarr.open_group(url, mode="r")["image"]  # what any zarr user sees
    assert array.shards == (128,) and array.chunks == (1,)
    assert list(array[:]) == samples
    ids = np.random.default_rng(1).permutation(700)[:200]
    assert list(SelectiveReader(dataset).read(ids)["image"]) == [samples[i] for i in ids]


def test_encoded_samples_that_compress_are_compressed(tmp_path):
    text = [f"sample {i} ".encode() * 50 for i in range(300)]  # token-like, compressible
    noise = random_bytes(300)  # JPEG-like: incompressible
    dataset = write_dataset(
        str(tmp_path / "e.zarr"), [{"text": encoded(text), "noise": encoded(noise)}], label_array=None
    )
    assert dataset.stored_nbytes(["text"]) < 0.2 * sum(map(len, text))
    assert list(zarr.open_group(dataset.url, mode="r")["text"][:]) == text  # zstd frames zarr decodes
    # stored raw: each sample's bytes, its 8-byte vlen header and 4-byte checksum (the empty one
    # too, though it is the fill value), the shard's index (16 bytes a sample of the shard, written
    # or not) and its 4-byte checksum
    assert dataset.stored_nbytes(["noise"]) == sum(map(len, noise)) + (8 + 4) * 300 + 16 * 1024 + 4


@pytest.mark.parametrize(
    "values, message",
    [
        ([b"ok", "a str"], "sample 1 is a str, expected bytes"),
        ([b"ok", np.zeros(3)], "sample 1 is a ndarray, expected bytes"),
    ],
)
def test_encoded_samples_that_are_not_bytes_are_named(tmp_path, values, message):
    with pytest.raises(DatasetError, match=f"array 'image': {message}"):
        write_dataset(str(tmp_path / "e.zarr"), [{"image": encoded(values)}], label_array=None)


def test_a_later_batch_with_a_bad_encoded_sample_names_its_place(tmp_path):
    batches = [{"image": encoded([b"a"] * 5)}, {"image": encoded([b"b", None])}]
    with pytest.raises(DatasetError, match="sample 6 is a NoneType"):
        write_dataset(str(tmp_path / "e.zarr"), batches, label_array=None)


def test_encoded_samples_need_one_bytes_object_each(tmp_path):
    two_d = np.empty((2, 2), dtype=object)
    two_d[:] = b"x"
    with pytest.raises(DatasetError, match="must be 1-D"):
        write_dataset(str(tmp_path / "e.zarr"), [{"image": two_d}], label_array=None)
    fixed_then_encoded = [{"x": np.zeros((2, 3), np.uint8)}, {"x": encoded([b"a", b"b"])}]
    with pytest.raises(DatasetError, match="array 'x'"):
        write_dataset(str(tmp_path / "f.zarr"), fixed_then_encoded, label_array=None)


def test_the_writer_refuses_to_write_shards_zarr_would_describe_otherwise(tmp_path):
    from nearstore.storage.writer import _check_shards

    dataset = write_dataset(str(tmp_path / "e.zarr"), [{"image": encoded(random_bytes(10)), "y": np.arange(10)}])
    document = json.loads(Path(dataset.url, "image", "zarr.json").read_text())
    _check_shards(document, np.dtype(object), False, "image")  # as written: the layout encode_shard writes
    document["codecs"][0]["configuration"]["index_location"] = "start"  # a zarr whose default moved
    with pytest.raises(RuntimeError, match="array 'image': zarr describes its shards otherwise"):
        _check_shards(document, np.dtype(object), False, "image")
    document = json.loads(Path(dataset.url, "image", "zarr.json").read_text())
    document["codecs"][0]["configuration"]["chunk_shape"] = [2]  # two samples an inner chunk
    with pytest.raises(RuntimeError, match="array 'image'"):
        _check_shards(document, np.dtype(object), False, "image")
    noise = np.random.default_rng(0).normal(size=(10, 4, 3)).astype("<f4")  # stored raw: zstd saves little
    fixed = write_dataset(str(tmp_path / "f.zarr"), [{"x": noise}], label_array=None)
    document = json.loads(Path(fixed.url, "x", "zarr.json").read_text())
    _check_shards(document, np.dtype("<f4"), False, "x")
    document["codecs"][0]["configuration"]["chunk_shape"][1] = 2  # a sample split across inner chunks
    with pytest.raises(RuntimeError, match="array 'x'"):
        _check_shards(document, np.dtype("<f4"), False, "x")
    document = json.loads(Path(fixed.url, "x", "zarr.json").read_text())
    document["codecs"][0]["configuration"]["codecs"][0]["configuration"]["endian"] = "big"
    with pytest.raises(RuntimeError, match="array 'x'"):  # samples' bytes in the other order
        _check_shards(document, np.dtype("<f4"), False, "x")
    with pytest.raises(RuntimeError, match="array 'image'"):  # compressed, but zarr says not
        _check_shards(json.loads(Path(dataset.url, "image", "zarr.json").read_text()), np.dtype(object), True, "image")


@pytest.mark.parametrize(
    "dtype, shape, samples",
    [
        ("<f4", (40,), 1000),  # inner chunks of 16 samples, raw; a last shard of 488
        ("|u1", (3, 8, 8), 700),  # compresses: zstd
        ("|b1", (5,), 333),
        ("<i8", (), 1500),
        ("<f2", (2, 3), 2050),  # a last inner chunk of 2 samples, padded
        ("|u1", (3, 32, 32), 100),  # one sample an inner chunk
    ],
)
def test_the_writer_encodes_every_shard_as_zarr_writes_it(tmp_path, dtype, shape, samples):
    # shards are encoded here (zarr's event loop cost 0.4 ms an inner chunk): byte for byte what
    # zarr itself writes for the same array and values
    rng = np.random.default_rng(0)
    values = (rng.integers(0, 4, (samples, *shape)) * 20).astype(dtype)
    if np.dtype(dtype).kind == "f":
        values = rng.normal(size=(samples, *shape)).astype(dtype)
    dataset = write_dataset(str(tmp_path / "ours.zarr"), [{"x": values}], label_array=None, shard_samples=512)
    ours = zarr.open_array(f"{dataset.url}/x", mode="r")
    theirs = zarr.create_array(
        zarr.storage.MemoryStore(staged := {}),
        shape=ours.shape,
        dtype=ours.dtype,
        chunks=ours.chunks,
        shards=ours.shards,
        compressors=ours.compressors,
        fill_value=ours.fill_value,
        config={"write_empty_chunks": True},
    )
    theirs[:] = values
    keys = sorted(k for k in staged if k != "zarr.json")
    assert len(keys) == -(-samples // 512)
    for key in keys:
        assert Path(dataset.url, "x", key).read_bytes() == staged[key].to_bytes(), key
    np.testing.assert_array_equal(ours[:], values)


def test_a_zarr_v2_store_is_named_as_one(tmp_path):
    # it was 'no zarr group ... it has no zarr.json', and convert took it for an image folder
    group = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    group.create_array("x", shape=(4, 2), dtype="f4")
    with pytest.raises(DatasetError, match="v2.zarr' is a Zarr v2 store"):
        open_dataset(str(tmp_path / "v2.zarr"))
    pytest.importorskip("torch")  # the command line imports the selectors
    from nearstore.app.cli import main

    assert main(["convert", str(tmp_path / "v2.zarr"), str(tmp_path / "o.zarr")]) == 2


def test_a_failed_write_removes_the_folders_it_made_on_the_way(tmp_path):
    def batches():
        yield {"x": np.zeros((4, 2)), "y": np.zeros(4, int)}
        raise RuntimeError("the source failed")

    with pytest.raises(RuntimeError, match="the source failed"):
        write_dataset(str(tmp_path / "runs" / "2026" / "train.zarr"), batches(), shard_samples=2)
    assert list(tmp_path.iterdir()) == []  # runs/2026/ stayed behind


def test_a_full_disk_is_named_with_the_file_it_stopped_and_leaves_nothing(tmp_path, monkeypatch):
    # "[Errno 28] No space left on device", naming nothing: a write's error has no file
    from fsspec.implementations.local import LocalFileSystem

    pipe = LocalFileSystem.pipe_file

    def full(self, path: str, value: bytes, **options) -> None:
        if "/c/" in path:  # a shard: the disk fills after the metadata
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        pipe(self, path, value, **options)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*ds\.zarr/x/c/0/0'"):
        write_dataset(str(tmp_path / "ds.zarr"), [{"x": np.zeros((4, 2)), "y": np.zeros(4, int)}], shard_samples=2)
    assert list(tmp_path.iterdir()) == []


def test_an_overwrite_stopped_between_its_renames_names_both_stores(tmp_path):
    # nothing at the URL, and the refusal named neither the old store moved aside nor the new one
    url = tmp_path / "ds.zarr"
    for suffix in (".replaced-0123abcd", ".writing-89abcdef"):
        write_dataset(str(url), [{"x": np.arange(4, dtype=np.float32)[:, None]}], label_array=None)
        url.rename(f"{url}{suffix}")
    with pytest.raises(FileNotFoundError, match="an overwrite stopped half-way left .*ds.zarr.replaced-0123abcd', "):
        open_dataset(str(url))
    (tmp_path / "other.zarr").mkdir()
    with pytest.raises(FileNotFoundError, match=r"it has no zarr.json$"):  # nothing beside it: said as before
        open_dataset(str(tmp_path / "other.zarr"))


def test_an_overwrite_removes_what_replacements_killed_half_way_left_beside_the_dataset(tmp_path, caplog):
    # a killed overwrite's new store (.writing-*) or old one moved aside (.replaced-*) stayed for ever,
    # whole copies of the dataset that nothing named
    url = tmp_path / "ds.zarr"

    def write(where: Path, value: float) -> None:
        write_dataset(str(where), [{"x": np.full((4, 1), value, np.float32)}], label_array=None, overwrite=True)

    write(url, 0)
    for suffix in (".writing-0123abcd", ".replaced-89abcdef"):
        write(Path(f"{url}{suffix}"), 1)
    (tmp_path / "ds.zarr.writing-deadbeef").mkdir()  # no zarr group: not known to be ours, kept
    (tmp_path / "ds.zarr.notes").write_text("mine")
    write(url, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.zarr", "ds.zarr.notes", "ds.zarr.writing-deadbeef"]
    assert "removing " in caplog.text and "ds.zarr.replaced-89abcdef" in caplog.text
    np.testing.assert_array_equal(open_dataset(str(url)).arrays["x"][:], np.full((4, 1), 2, np.float32))


def test_an_overwrite_through_a_link_replaces_the_dataset_it_points_to(tmp_path):
    # the link was renamed aside and a folder put in its place: its target kept the old samples
    (tmp_path / "disk").mkdir()
    real, link = tmp_path / "disk" / "train.zarr", tmp_path / "train.zarr"
    write_dataset(str(real), [{"x": np.zeros((40, 2), np.float32), "y": np.zeros(40, np.int64)}])
    link.symlink_to(real, target_is_directory=True)
    write_dataset(str(link), [{"x": np.ones((24, 2), np.float32), "y": np.zeros(24, np.int64)}], overwrite=True)
    assert link.is_symlink() and open_dataset(str(real)).num_samples == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "train.zarr"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["train.zarr"]
