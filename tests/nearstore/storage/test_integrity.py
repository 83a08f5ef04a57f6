"""Damage is refused by name, never read as data: every way a shard object can be lost, cut or
changed, on a store whose samples name their own ids (so a wrong sample would show)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import fsspec
import numpy as np
import pytest
from conftest import SHARD_SAMPLES, as_format_1, flip, id_encoded, shard_file

from nearstore import SelectiveReader, open_dataset, write_dataset
from nearstore.errors import DatasetError, IntegrityError, ParameterError
from nearstore.storage import ChunkCache
from nearstore.storage.dataset import UncheckedStoreWarning
from nearstore.storage.integrity import verify_dataset


@pytest.fixture
def store(tmp_path, id_store_url):
    """A private copy of the id store, free to damage."""
    url = str(tmp_path / "ids.zarr")
    shutil.copytree(id_store_url, url)
    return url


def read(url: str, ids, arrays=("x",)):
    return SelectiveReader(open_dataset(url), list(arrays)).read(np.asarray(ids))


SHARD_1 = np.arange(SHARD_SAMPLES, 2 * SHARD_SAMPLES)


def test_a_whole_store_reads_back_and_verifies(store):
    ds = open_dataset(store)
    assert verify_dataset(ds, progress=False) == []
    np.testing.assert_array_equal(SelectiveReader(ds).read(np.arange(2500))["x"], id_encoded()["x"])


def cut(f: Path, keep: slice) -> None:
    f.write_bytes(f.read_bytes()[keep])


LOST_OR_CUT = {
    "deleted": (Path.unlink, "is missing"),
    "empty": (lambda f: cut(f, slice(0)), "cut short"),
    "cut to 1000 bytes": (lambda f: cut(f, slice(1000)), "cut short"),  # samples 300, 301 lie past it
}
INDEX_DAMAGE = {  # the index is at the end; a reader that has it cached reads the samples right
    "64 bytes cut": (lambda f: cut(f, slice(-64)), "cut short"),
    "index flipped": (lambda f: flip(f, -10), "damaged index"),
}


@pytest.mark.parametrize(
    "damage, cached",
    [(d, c) for d in LOST_OR_CUT for c in (False, True)] + [(d, False) for d in INDEX_DAMAGE],
)
def test_a_lost_or_cut_shard_is_an_integrity_error_naming_it(store, damage, cached):
    damage, problem = {**LOST_OR_CUT, **INDEX_DAMAGE}[damage]
    ds = open_dataset(store)
    reader = SelectiveReader(ds, ["x", "y"])
    ids = np.array([3, 300, 301, 700])  # shards 0, 1, 2
    if cached:
        reader.read(ids)
    damage(shard_file(store, "x", 1))
    with pytest.raises(IntegrityError, match=problem) as raised:
        reader.read(ids)
    message = str(raised.value)
    assert store in message and "array 'x'" in message and "x/c/1/0" in message
    assert raised.value.ids == (300, 301)
    # the other shards still read, and right
    np.testing.assert_array_equal(reader.read([3, 700])["x"], id_encoded()["x"][[3, 700]])


def test_a_damaged_object_is_remembered_and_refused_at_once_after(store):
    ds = open_dataset(store)
    cut(shard_file(store, "x", 1), slice(1000))
    first = SelectiveReader(ds, ["x"])
    with pytest.raises(IntegrityError, match="cut short"):
        first.read([300])
    assert first.stats.retries == 3  # asked again before it was called damage
    later = SelectiveReader(ds, ["x"])  # another reader of the opened dataset: no request at all
    with pytest.raises(IntegrityError, match="cut short") as raised:
        later.read([257, 3])
    assert later.stats.requests == 0 and raised.value.ids == (257,)


def test_a_flipped_byte_names_the_one_sample_it_damaged(store):
    flip(shard_file(store, "x", 1), 7 * 36 + 5)  # inside sample 256 + 7's payload (36 stored bytes a sample)
    with pytest.raises(IntegrityError, match="1 damaged samples .crc32c") as raised:
        read(store, SHARD_1)
    assert raised.value.ids == (SHARD_SAMPLES + 7,)
    np.testing.assert_array_equal(read(store, [SHARD_SAMPLES + 6])["x"], id_encoded()["x"][[SHARD_SAMPLES + 6]])


def test_a_cache_keeps_no_chunk_of_a_read_that_failed_its_checks(store):
    shard = shard_file(store, "x", 1)
    whole = shard.read_bytes()
    flip(shard, 7 * 36 + 5)  # inside sample 256 + 7's payload
    cache = ChunkCache(1 << 20)
    reader = SelectiveReader(open_dataset(store), ["x"], cache=cache)
    with pytest.raises(IntegrityError, match="1 damaged samples .crc32c") as raised:
        reader.read(SHARD_1)
    assert raised.value.ids == (SHARD_SAMPLES + 7,) and cache.nbytes == 0
    shard.write_bytes(whole)  # damaged on the way, say: whole where it is stored
    before = reader.stats.snapshot()
    np.testing.assert_array_equal(reader.read(SHARD_1)["x"], id_encoded()["x"][SHARD_1])
    assert (reader.stats.snapshot() - before).bytes == SHARD_SAMPLES * 36  # read again, from storage
    flip(shard, 7 * 36 + 5)
    before = reader.stats.snapshot()
    np.testing.assert_array_equal(reader.read(SHARD_1)["x"], id_encoded()["x"][SHARD_1])  # what was checked
    assert (reader.stats.snapshot() - before).requests == 0


def test_a_cached_chunk_is_checked_again_as_it_is_served(store):
    cache = ChunkCache(1 << 20)
    reader = SelectiveReader(open_dataset(store), ["x"], cache=cache)
    reader.read([SHARD_SAMPLES + 7])
    key = (str(shard_file(store, "x", 1)), 7 * 36, 36)  # where its bytes are stored
    (held,) = cache.get([key])
    damaged = bytearray(held)
    damaged[5] ^= 0x10  # gone bad in memory
    cache.put([(key, bytes(damaged))])
    with pytest.raises(IntegrityError, match="1 damaged samples .crc32c") as raised:
        reader.read([3, SHARD_SAMPLES + 7])
    assert raised.value.ids == (SHARD_SAMPLES + 7,)


def test_a_flipped_byte_in_a_chunk_of_samples_names_the_ids_read_from_it(tmp_path):
    url = str(tmp_path / "chunked.zarr")
    data = id_encoded(600)
    dataset = write_dataset(url, [data], shard_samples=200, chunk_samples=8)
    flip(shard_file(url, "x", 1), 3 * (8 * 32 + 4) + 5)  # inside the 4th chunk: samples 224-231
    with pytest.raises(IntegrityError, match="1 damaged inner chunks of 8 samples .crc32c") as raised:
        SelectiveReader(dataset, ["x"]).read(np.array([225, 229, 100, 232]))
    assert raised.value.ids == (225, 229)
    np.testing.assert_array_equal(
        SelectiveReader(open_dataset(url), ["x"]).read(np.array([232, 223]))["x"], data["x"][[232, 223]]
    )


def test_damage_in_compressed_and_encoded_samples_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    images = np.empty(300, dtype=object)
    images[:] = [rng.bytes(int(n)) for n in rng.integers(50, 500, 300)]
    x = np.repeat(rng.integers(0, 3, size=(300, 4, 1), dtype=np.uint8), 32, axis=2)  # compresses: zstd
    url = str(tmp_path / "mixed.zarr")
    ds = write_dataset(url, [{"x": x, "image": images}], label_array=None, shard_samples=100)
    assert [c.to_dict()["name"] for c in ds.arrays["x"].compressors] == ["zstd", "crc32c"]
    for name in ("x", "image"):
        flip(shard_file(url, name, 2), 20)
        with pytest.raises(IntegrityError, match=f"array '{name}'.*damaged sample"):
            SelectiveReader(open_dataset(url), [name]).read(np.arange(200, 300))


def test_a_shard_swapped_for_another_whole_one_is_found_by_verify(store):
    # Shards 0 and 1 have the same size and valid checksums: only their samples' digest differs.
    shutil.copyfile(shard_file(store, "x", 0), shard_file(store, "x", 1))
    shard_file(store, "y", 5).unlink()
    cut(shard_file(store, "y", 7), slice(-64))
    with shard_file(store, "y", 8).open("ab") as f:  # zarr would read the bytes at the end as its index
        f.write(b"junk")
    damages = verify_dataset(open_dataset(store), progress=False)
    assert [(d.array, d.shard) for d in damages] == [("x", 1), ("y", 5), ("y", 7), ("y", 8)]
    assert "other samples than were written" in damages[0].problem and "is missing" in damages[1].problem
    assert damages[1].path.endswith("y/c/5") and "cut short" in damages[2].problem
    assert re.match(r"is longer than written: (\d+) bytes, the manifest records (?!\1)\d+", damages[3].problem)


def test_verify_lists_objects_it_cannot_read_and_checks_the_others(store):
    # A symlink loop in a shard's place (or a permission denied): verify stopped there, with an
    # OSError, and said nothing of the damage after it
    for shard in (2, 6):
        path = shard_file(store, "x", shard)
        path.unlink()
        path.symlink_to(path)
    flip(shard_file(store, "x", 8), 100)
    damages = verify_dataset(open_dataset(store), progress=False)
    assert [(d.array, d.shard) for d in damages] == [("x", 2), ("x", 6), ("x", 8)]
    assert all(d.problem.startswith("cannot be read: ") and "symbolic links" in d.problem for d in damages[:2])
    assert "damaged" in damages[2].problem


def edit_shards(url: str, edit: Callable[[dict], object]) -> None:
    """Edit what the manifest records of the store's shards ({array: {"nbytes", ...}}) in place."""
    root = Path(url) / "zarr.json"
    group = json.loads(root.read_text())
    edit(group["attributes"]["nearstore"]["shards"])
    root.write_text(json.dumps(group))


def without_chunk_sums(url: str) -> None:
    """Make the store at `url` look written before the manifest recorded every inner chunk's crc32c."""
    edit_shards(url, lambda shards: [recorded.pop("crc32c") for recorded in shards.values()])


@pytest.mark.parametrize("array, chunk_samples", [("x", 1), ("x", 8), ("tag", None)])
def test_a_shard_swapped_for_another_of_its_size_is_refused_when_read_in_part(tmp_path, array, chunk_samples):
    data = id_encoded(1000)
    data["tag"] = np.array([f"{i:06d}".encode() for i in range(1000)], dtype=object)  # encoded, of one length
    url = str(tmp_path / "swapped.zarr")
    write_dataset(url, [data], shard_samples=128, chunk_samples=chunk_samples)
    # as `x/c/3` copied over `x/c/5`: the same size, every chunk's own crc32c holds
    shutil.copyfile(shard_file(url, array, 3), shard_file(url, array, 5))
    reader = SelectiveReader(open_dataset(url), [array])
    swapped = re.escape(f"array '{array}': shard object '{shard_file(url, array, 5)}' (samples 640..767)")
    with pytest.raises(IntegrityError, match=f"{swapped} holds other samples than were written") as raised:
        reader.read(np.array([10, 643, 700, 900]))
    assert raised.value.ids == (643, 700)
    requests = reader.stats.requests
    with pytest.raises(IntegrityError, match=f"{swapped} holds other samples"):  # remembered: refused unasked
        reader.read([760])
    assert reader.stats.requests == requests
    assert reader.read(np.array([10, 900]))[array].tolist() == data[array][[10, 900]].tolist()


def test_a_store_written_before_the_chunk_record_reads_and_verifies_as_before(store):
    ids = np.random.default_rng(0).integers(0, 2500, 300)
    recorded = read(store, ids, ("x", "y"))
    without_chunk_sums(store)
    dataset = open_dataset(store)
    assert dataset.manifest.chunk_sums is None
    for name, values in SelectiveReader(dataset).read(ids).items():
        np.testing.assert_array_equal(values, recorded[name])
        np.testing.assert_array_equal(values, id_encoded()[name][ids])
    assert verify_dataset(dataset, progress=False) == []


def test_verify_reads_every_object_afresh_whatever_the_dataset_read_before(store):
    # the shard indexes and digests that earlier reads kept with the opened dataset are what was
    # stored then: a shard damaged since was reported whole
    dataset = open_dataset(store)
    SelectiveReader(dataset, ["x"]).read(np.arange(2500))
    flip(shard_file(store, "x", 1), -10)  # its index
    assert [(d.array, d.shard) for d in verify_dataset(dataset, progress=False)] == [("x", 1)]


def test_verify_compares_every_inner_chunk_with_the_record(store):
    def change(shards: dict) -> None:  # the record of sample 300 (shard 1) of y, its samples' digest left whole
        sums = bytearray(base64.b64decode(shards["y"]["crc32c"]))
        sums[4 * 300] ^= 1
        shards["y"]["crc32c"] = base64.b64encode(sums).decode()

    edit_shards(store, change)
    damages = verify_dataset(open_dataset(store), progress=False)
    assert [(d.array, d.shard) for d in damages] == [("y", 1)]
    assert "holds other samples than were written: 1 samples whose crc32c" in damages[0].problem


def test_whole_shards_are_hashed_where_no_chunk_is_recorded_and_by_verify(store):
    # each inner chunk's crc32c in the manifest finds a replaced shard by itself, so reads do not
    # hash a whole shard's samples again (5% of a round 0 over photo-like JPEGs); verify does, and
    # reads of a store written before the chunk record do
    edit_shards(store, lambda shards: shards["y"]["digests"].__setitem__(1, shards["y"]["digests"][2]))
    np.testing.assert_array_equal(
        SelectiveReader(open_dataset(store), ["y"]).read_shard(1)["y"], id_encoded()["y"][256:512]
    )
    damages = verify_dataset(open_dataset(store), progress=False)
    assert [(d.array, d.shard) for d in damages] == [("y", 1)] and "digest does not" in damages[0].problem
    without_chunk_sums(store)
    with pytest.raises(IntegrityError, match="array 'y'.*samples' digest does not"):
        SelectiveReader(open_dataset(store), ["y"]).read_shard(1)


def test_a_damaged_chunk_record_is_refused_at_open(store):
    cut = base64.b64encode(bytes(4 * 2499)).decode()
    edit_shards(store, lambda shards: shards["x"].update(crc32c=cut))
    with pytest.raises(
        DatasetError, match="records 9996 bytes of crc32c for array 'x', whose 2500 inner chunks take 10000"
    ):
        open_dataset(store)
    edit_shards(store, lambda shards: shards["x"].update(crc32c="not base64!"))
    with pytest.raises(DatasetError, match="manifest in its attributes is damaged"):
        open_dataset(store)


def test_a_shard_swapped_for_another_whole_one_in_an_older_store_is_refused_when_read_whole(store):
    shutil.copyfile(shard_file(store, "x", 0), shard_file(store, "x", 1))
    without_chunk_sums(store)  # no record of each chunk: only the shard's digest can tell
    dataset = open_dataset(store)
    part = SelectiveReader(dataset, ["x"]).read(np.arange(256, 300))  # a part of it cannot tell
    np.testing.assert_array_equal(part["x"], id_encoded()["x"][:44])
    with pytest.raises(IntegrityError, match=r"x/c/1/0' \(samples 256..511\) holds other samples than were written"):
        SelectiveReader(dataset, ["x"]).read(np.arange(200, 600))
    with pytest.raises(IntegrityError, match="holds other samples"):  # remembered: read alone, it fails at once
        SelectiveReader(dataset, ["x"]).read([300])
    assert SelectiveReader(dataset, ["x"]).read(np.arange(512, 768))["x"].shape == (256, 8)


def test_metadata_edited_to_read_the_bytes_otherwise_is_refused_at_open(store):
    document = Path(store) / "y" / "zarr.json"
    written = document.read_text()
    document.write_text(written.replace('"int64"', '"float64"', 1))  # same size: every checksum holds
    with pytest.raises(DatasetError, match="array 'y' was written as .*'int64'.*now says .*'float64'"):
        open_dataset(store)
    document.write_text(written)
    root = Path(store) / "zarr.json"
    group = json.loads(root.read_text())
    attrs = group["attributes"]["nearstore"]
    root.write_text(json.dumps({**group, "attributes": {"nearstore": {**attrs, "format_version": 1}}}))
    with pytest.raises(DatasetError, match="says format_version 1 but holds a format-2 manifest"):
        open_dataset(store)
    older = {k: v for k, v in attrs.items() if k != "layouts"}  # written before layouts were recorded
    root.write_text(json.dumps({**group, "attributes": {"nearstore": older}}))
    assert verify_dataset(open_dataset(store), progress=False) == []


def without_crc32c(document: dict, chain: str) -> None:
    sharding = document["codecs"][0]["configuration"]
    assert sharding[chain][-1]["name"] == "crc32c"
    sharding[chain].pop()


def test_encoded_samples_whose_metadata_lost_their_checksum_are_refused_at_open(tmp_path):
    blobs = np.empty(8, dtype=object)
    blobs[:] = [bytes([i]) * 100 for i in range(8)]
    store = write_dataset(str(tmp_path / "e.zarr"), [{"blob": blobs}], label_array=None).url
    document = Path(store) / "blob" / "zarr.json"
    edited = json.loads(document.read_text())
    without_crc32c(edited, "codecs")
    document.write_text(json.dumps(edited))
    with pytest.raises(DatasetError, match="array 'blob' stores its chunks or shard index without the crc32c"):
        open_dataset(store)


def big_endian(document: dict) -> None:
    sharding = document["codecs"][0]["configuration"]
    sharding["codecs"][0]["configuration"]["endian"] = "big"


@pytest.mark.parametrize(
    ("where", "edit", "message"),
    [
        # the bytes read as other numbers, every checksum holding: samples were byte-swapped silently
        ("x", big_endian, "the zarr.json of array 'x' says its bytes are big-endian"),
        ("y", big_endian, "the zarr.json of array 'y' says its bytes are big-endian"),
        # the inputs named as the labels: x and y swapped silently
        ("", lambda group: group["attributes"]["nearstore"].update(label_array="x"), "label array 'x' holds"),
        # a field missing or not a number: tracebacks that named no store
        (
            "",
            lambda group: group["attributes"]["nearstore"].pop("sample_arrays"),
            "the 'nearstore' attributes .* are damaged .*Key",
        ),
        (
            "",
            lambda group: group["attributes"]["nearstore"].update(num_samples="many"),
            "the 'nearstore' attribute 'num_samples' must be an integer >= 0, got 'many'",
        ),
        ("x", lambda document: document.pop("codecs"), r"the zarr.json of array 'x' is not zarr's \(KeyError"),
        # chunks or index read unchecked: encoded samples took the crc32c's 4 bytes as padding
        (
            "x",
            lambda document: without_crc32c(document, "codecs"),
            "the zarr.json of array 'x' stores .* without",
        ),
        (
            "y",
            lambda document: without_crc32c(document, "index_codecs"),
            "the zarr.json of array 'y' stores .* without",
        ),
    ],
)
def test_metadata_edited_otherwise_is_refused_at_open_by_name(store, where, edit, message):
    document = Path(store) / where / "zarr.json"
    edited = json.loads(document.read_text())
    edit(edited)
    document.write_text(json.dumps(edited))
    with pytest.raises(DatasetError, match=f"'{re.escape(store)}': {message}"):
        open_dataset(store)


def test_the_manifest_records_every_shard_objects_real_size(id_store):
    fs, root = id_store.filesystem()
    for name in id_store.sample_arrays:
        sizes = [fs.size(id_store.shard_path(name, s, root)) for s in range(id_store.num_shards)]
        assert id_store.manifest.nbytes[name] == tuple(sizes)


def test_a_twin_store_has_another_fingerprint_and_its_selection_is_refused(tmp_path, id_store):
    twin_data = id_encoded()
    twin_data["x"] = twin_data["x"][::-1].copy()  # same N, shapes, dtypes; other samples
    twin = write_dataset(str(tmp_path / "twin.zarr"), [twin_data], shard_samples=SHARD_SAMPLES)
    assert twin.identity()["fingerprint"] != id_store.identity()["fingerprint"]
    same = write_dataset(str(tmp_path / "same.zarr"), [id_encoded()], shard_samples=SHARD_SAMPLES)
    assert same.identity()["fingerprint"] == id_store.identity()["fingerprint"]  # content, not place
    pytest.importorskip("torch")  # a Selection belongs to the selection layer, which needs torch
    from nearstore import Selection

    selection = Selection.of(id_store, np.arange(10), method="test", params={}, io={})
    selection.check_dataset(same)
    with pytest.raises(DatasetError, match="twin.zarr"):
        selection.check_dataset(twin)


def test_a_store_without_checksums_opens_with_a_warning_saying_how_to_rewrite_it(store):
    as_format_1(store)
    with pytest.warns(UncheckedStoreWarning, match="without checksums.*nearstore convert"):
        ds = open_dataset(store)
    assert ds.manifest is None and ds.identity()["fingerprint"] is None
    np.testing.assert_array_equal(SelectiveReader(ds).read([5, 2400])["x"], id_encoded()["x"][[5, 2400]])
    with pytest.raises(IntegrityError, match="nothing to verify"):
        verify_dataset(ds, progress=False)


def test_overwrite_keeps_the_old_store_until_the_new_one_is_whole(store, fingerprint):
    before = fingerprint(store)

    def failing():
        yield id_encoded(1000)
        raise RuntimeError("the source ran dry")

    with pytest.raises(RuntimeError, match="ran dry"):
        write_dataset(store, failing(), overwrite=True, shard_samples=SHARD_SAMPLES)
    assert fingerprint(store) == before
    fs = fsspec.filesystem("file")
    assert fs.ls(str(Path(store).parent)) == [store]  # nothing left beside it
    replaced = write_dataset(store, [id_encoded(600)], overwrite=True, shard_samples=SHARD_SAMPLES)
    assert replaced.num_samples == 600 and verify_dataset(replaced, progress=False) == []


@pytest.mark.parametrize("fails", [1, 2])
def test_an_overwrite_whose_folder_cannot_be_renamed_leaves_the_old_dataset_in_place(store, fingerprint, fails):
    # A mount point refuses a rename (EBUSY): fsspec's mv then copied the old dataset beside it and
    # emptied the mount, and the error named neither. The second rename failing puts the old one back.
    import errno
    import os

    before, rename, calls = fingerprint(store), os.rename, []

    def busy(src, dst):
        calls.append(src)
        if len(calls) == fails:
            raise OSError(errno.EBUSY, "Device or resource busy")
        rename(src, dst)

    with mock.patch("nearstore.storage.writer.os.rename", busy), pytest.raises(OSError, match="busy") as raised:
        write_dataset(store, [id_encoded(600)], overwrite=True, shard_samples=SHARD_SAMPLES)
    [new] = [path for path in fsspec.filesystem("file").ls(str(Path(store).parent)) if path != store]
    assert str(raised.value) == (
        f"[Errno {errno.EBUSY}] cannot replace {store!r}: its folder cannot be renamed (Device or resource busy; a "
        f"mount point?). The old dataset there is as it was, and the new one is whole at {new!r}: move it where "
        "you want it, or write to a folder inside the mount"
    )
    assert fingerprint(store) == before and open_dataset(new).num_samples == 600


def test_an_overwrite_whose_delete_of_the_old_store_fails_says_the_new_one_is_whole(store, monkeypatch):
    fs = fsspec.filesystem("file")

    def denied(path, recursive=False):
        raise PermissionError(f"deleting {path} denied")

    monkeypatch.setattr(fs, "rm", denied)  # the writer's: fsspec gives the same options one instance
    with pytest.raises(PermissionError, match="deleting .* denied") as raised:
        write_dataset(store, [id_encoded(600)], overwrite=True, shard_samples=SHARD_SAMPLES)
    [old] = [path for path in fs.ls(str(Path(store).parent)) if path != store]
    assert raised.value.__notes__ == [
        f"{store!r} was replaced: the new dataset there is whole. Deleting what the replacement left failed, so "
        f"some may remain (delete it yourself): the old dataset at {old!r}"
    ]
    replaced = open_dataset(store)
    assert replaced.num_samples == 600 and verify_dataset(replaced, progress=False) == []


def test_a_top_level_store_of_a_filesystem_with_a_root_is_replaced_as_any():
    batch = {"x": np.arange(20, dtype=np.float32).reshape(10, 2)}
    write_dataset("memory://top.zarr", [batch], label_array=None)  # memory:// paths start at '/'
    replaced = write_dataset("memory://top.zarr", [{"x": batch["x"] + 1}], label_array=None, overwrite=True)
    assert SelectiveReader(replaced).read([0])["x"].tolist() == [[1.0, 2.0]]


def test_a_failed_write_of_a_new_store_leaves_nothing_behind(tmp_path):
    def failing():
        yield id_encoded(300)
        raise RuntimeError("the source ran dry")

    url = str(tmp_path / "new.zarr")
    with pytest.raises(RuntimeError, match="ran dry"):
        write_dataset(url, failing(), shard_samples=100)
    assert not Path(url).exists()
    assert write_dataset(url, [id_encoded(300)], shard_samples=100).num_samples == 300  # no overwrite needed


def test_fewer_class_names_than_labels_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="2 class names .* labels go up to 4"):
        write_dataset(str(tmp_path / "c.zarr"), [id_encoded(50)], class_names=["a", "b"])
    with pytest.raises(ParameterError, match=r"class name 'cat' is given twice \(ids 1 and 2\)"):
        write_dataset(str(tmp_path / "c.zarr"), [id_encoded(50)], class_names=["ant", "cat", "cat", "dog", "eel"])
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (
            np.array([b"abcde"] * 12, dtype="S5"),
            "holds |S5 samples; fixed-size samples are booleans, integers or floats",
        ),
        (np.ones((12, 2), np.complex64), "holds complex64 samples"),
        (np.zeros(12, "datetime64[s]"), r"holds datetime64\[s\] samples"),
        (np.zeros((12, 0), np.float32), r"has samples of shape \(0,\), which hold nothing"),
    ],
)
def test_samples_nothing_reads_are_refused_by_array(tmp_path, x, message):
    url = str(tmp_path / "w.zarr")
    with pytest.raises(DatasetError, match=rf"array 'x' {message}"):
        write_dataset(url, [{"x": x, "y": np.arange(12) % 3}])
    assert not Path(url).exists()


def test_big_endian_samples_are_stored_little_endian(tmp_path):
    x, y = np.arange(32, dtype=">f4").reshape(8, 4), np.arange(8, dtype=">i8") % 3
    dataset = write_dataset(str(tmp_path / "be.zarr"), [{"x": x, "y": y}])
    read = SelectiveReader(dataset).read(np.arange(8))
    assert read["x"].dtype == np.dtype("<f4") and np.array_equal(read["x"], x) and read["y"].tolist() == y.tolist()
    assert verify_dataset(open_dataset(str(tmp_path / "be.zarr")), progress=False) == []


def test_a_label_far_past_the_samples_needs_class_names(tmp_path):
    batch = {"x": np.zeros((3, 2), np.float32), "y": np.array([0, 100_000, 1])}
    url = str(tmp_path / "c.zarr")
    with pytest.raises(DatasetError, match="label 100000 of sample 1 would make 100001 classes of 3 samples"):
        write_dataset(url, [batch])
    assert not Path(url).exists()
    named = write_dataset(url, [batch], class_names=[str(c) for c in range(100_001)])
    assert len(named.class_names) == 100_001
    assert len(write_dataset(url, [{**batch, "y": np.array([0, 65_535, 1])}], overwrite=True).class_names) == 65_536


def test_reading_damage_changes_nothing_in_the_store(store, fingerprint):
    shard_file(store, "x", 3).write_bytes(b"")
    before = fingerprint(store)
    with warnings.catch_warnings(), pytest.raises(IntegrityError):
        read(store, np.arange(2500))
    assert fingerprint(store) == before


def test_an_index_whose_bytes_changed_on_the_way_is_asked_again_not_damage_for_good(store):
    # a ranged GET has no client checksum: one changed response made the opened dataset refuse the
    # shard for good (a server until restarted; skip dropped its samples every epoch)
    dataset = open_dataset(store)
    reader = SelectiveReader(dataset, ["x"])
    fetch, changed = reader._fetch, []

    def once_changed(paths, starts, ends):
        blobs, sizes = fetch(paths, starts, ends)
        if not changed:  # the first: the shard's index
            changed.append(paths)
            blobs[0] = blobs[0][:-10] + bytes([blobs[0][-10] ^ 0x10]) + blobs[0][-9:]
        return blobs, sizes

    reader._fetch = once_changed
    np.testing.assert_array_equal(reader.read(SHARD_1)["x"], id_encoded()["x"][SHARD_1])
    assert changed and reader.stats.retries == 1
    flip(shard_file(store, "x", 1), -10)  # the object itself damaged: damage still, after asking again
    with pytest.raises(IntegrityError, match="damaged index"):
        SelectiveReader(open_dataset(store), ["x"]).read(SHARD_1)
