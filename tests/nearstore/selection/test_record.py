from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nearstore import (
    DatasetError,
    NearstoreError,
    ParameterError,
    SampleIdError,
    Selection,
    SelectiveReader,
    open_dataset,
    random_select,
    write_dataset,
)
from nearstore.selection.record import Suspects, in_sorted, write_whole


def make(dataset, ids, **kwargs) -> Selection:
    n = len(ids)
    return Selection(
        dataset=dataset.identity(),
        ids=ids,
        weights=kwargs.pop("weights", np.ones(n)),
        scores=kwargs.pop("scores", np.linspace(0, 1, n)),
        method="test",
        **kwargs,
    )


def test_round_trip_through_bytes_and_files(id_store, tmp_path):
    selection = make(
        id_store,
        np.array([1, 5, 2000]),
        weights=np.array([1.0, 2.5, 0.5]),
        params={"keep": 0.1, "ell": 8},
        round=3,
        io={"bytes": 123, "seconds": 0.5},
    )
    again = Selection.from_bytes(selection.to_bytes())
    for loaded in (again, (selection.save(tmp_path / "s.npz"), Selection.load(tmp_path / "s.npz"))[1]):
        np.testing.assert_array_equal(loaded.ids, selection.ids)
        np.testing.assert_array_equal(loaded.weights, selection.weights)
        np.testing.assert_array_equal(loaded.scores, selection.scores)
        assert (loaded.method, loaded.params, loaded.round, loaded.io) == (
            "test",
            {"keep": 0.1, "ell": 8},
            3,
            {"bytes": 123, "seconds": 0.5},
        )
        assert loaded.dataset == id_store.identity()
    assert len(selection.to_bytes()) < 2000  # small: ids, weights, scores and a JSON header
    assert selection.keep == pytest.approx(3 / 2500)


@pytest.mark.parametrize(
    ("ids", "kwargs", "message"),
    [
        (np.array([5, 1]), {}, "sorted and unique"),
        (np.array([1, 1]), {}, "sorted and unique"),
        (np.array([2500]), {}, r"sample id 2500 out of range \[0, 2500\)"),
        (np.array([1, 2]), {"weights": np.array([1.0, -1.0])}, "finite and >= 0"),
        (np.array([1, 2]), {"weights": np.array([1.0, np.nan])}, "finite and >= 0"),
        (np.array([1, 2]), {"scores": np.zeros(3)}, "one length"),
        (np.array([1, 2]), {"scores": np.array([0.0, 1e39])}, "scores must fit float32.*1e\\+39"),
        (np.array([1, 2]), {"weights": np.array([1.0, -1e300])}, "weights must fit float32"),
        (np.array([1, 2]), {"weights": np.array([1 + 5j, 1])}, "weights must be real numbers, got complex128"),
        # what a saved file or a resumed loader's state refuses, refused before the loader trains on it
        (np.array([1]), {"round": -1}, "round must be an integer >= 0, got -1"),
        (np.array([1]), {"round": 1.5}, "round must be an integer >= 0, got 1.5"),
        (np.array([1]), {"round": True}, "round must be an integer >= 0, got True"),
        (np.array([1]), {"params": None}, "params must be a dict, got None"),
        (np.array([1]), {"io": {"bytes": 1.5e6}}, r"io\['bytes'\] \(the scan's bytes read\) must be an integer >= 0"),
        (np.array([1]), {"io": {"requests": None}}, r"io\['requests'\] .* got None"),
        (np.array([2**63 + 5], dtype=np.uint64), {}, r"sample id 9223372036854775813 in .* past any dataset.s samples"),
    ],
)
def test_invalid_selections_are_refused(id_store, ids, kwargs, message):
    with pytest.raises(NearstoreError, match=message):
        make(id_store, ids, **kwargs)


def test_selection_refuses_another_dataset_but_not_another_url(id_store, tmp_path):
    selection = make(id_store, np.array([1, 2]))
    selection.check_dataset(open_dataset(f"file://{id_store.url}"))
    other = write_dataset(
        str(tmp_path / "other.zarr"), [{"x": np.zeros((2500, 3), np.float32), "y": np.zeros(2500, int)}]
    )
    with pytest.raises(ValueError, match="selection was made for"):
        selection.check_dataset(other)


def test_unknown_version_is_refused(id_store):
    data = make(id_store, np.array([1]), version=7).to_bytes()
    with pytest.raises(ValueError, match="version"):
        Selection.from_bytes(data)


def test_suspects_travel_with_the_selection_and_version_1_files_still_read(id_store, tmp_path):
    suspects = Suspects(ids=[40, 7], labels=[2, 0], quality=[0.1, 0.05])
    selection = dataclasses.replace(make(id_store, np.array([1, 2])), suspects=suspects)
    loaded = Selection.from_bytes(selection.to_bytes())
    assert loaded.suspects.ids.tolist() == [7, 40] and loaded.suspects.labels.tolist() == [0, 2]  # sorted by id
    np.testing.assert_allclose(loaded.suspects.quality, [0.05, 0.1])
    assert Selection.from_bytes(make(id_store, np.array([3])).to_bytes()).suspects is None
    old = np.load(io.BytesIO(make(id_store, np.array([3])).to_bytes()))
    meta = {**json.loads(str(old["meta"])), "version": 1}
    buffer = io.BytesIO()
    np.savez(buffer, ids=old["ids"], weights=old["weights"], scores=old["scores"], meta=json.dumps(meta))
    assert Selection.from_bytes(buffer.getvalue()).ids.tolist() == [3]
    with pytest.raises(SampleIdError, match="out of range"):
        dataclasses.replace(selection, suspects=Suspects(ids=[2500], labels=[0], quality=[0.1]))


def test_a_carry_travels_with_the_selection_and_a_bad_one_is_refused(id_store, tmp_path):
    carry = {"curvature": np.arange(6, dtype=np.float32).reshape(2, 3), "proxy": np.array("ModelProxy")}
    selection = make(id_store, np.array([1, 2]), carry=carry)
    selection.save(tmp_path / "s.npz")
    for loaded in (Selection.from_bytes(selection.to_bytes()), Selection.load(tmp_path / "s.npz")):
        assert sorted(loaded.carry) == ["curvature", "proxy"] and str(loaded.carry["proxy"]) == "ModelProxy"
        np.testing.assert_array_equal(loaded.carry["curvature"], carry["curvature"])
    assert Selection.from_bytes(make(id_store, np.array([3])).to_bytes()).carry == {}
    with pytest.raises(DatasetError, match="carry of .* names an array 'not a name'"):
        make(id_store, np.array([1]), carry={"not a name": np.zeros(2)})
    with pytest.raises(DatasetError, match="carry of .* holds 'state' of dtype object"):
        make(id_store, np.array([1]), carry={"state": np.array([{}, None], dtype=object)})
    with pytest.raises(DatasetError, match="carry of .* must be a mapping"):
        make(id_store, np.array([1]), carry=[np.zeros(2)])


def test_a_numpy_round_is_taken_as_an_int(id_store, tmp_path):
    selection = make(id_store, np.array([1]), round=np.int64(4), io={"bytes": np.int64(7), "requests": 1})
    assert type(selection.round) is int and Selection.from_bytes(selection.to_bytes()).round == 4


def test_suspects_are_refused_where_they_would_be_changed(id_store):
    with pytest.raises(DatasetError, match="suspects' labels must be integers .*float64"):
        Suspects(ids=[4], labels=[1.7], quality=[0.5])
    with pytest.raises(SampleIdError, match="suspects name sample 4 more than once"):
        Suspects(ids=[4, 9, 4], labels=[1, 2, 2], quality=[0.1, 0.2, 0.3])
    with pytest.raises(DatasetError, match="quality must fit float32"):
        Suspects(ids=[4], labels=[1], quality=[1e300])


def test_ids_that_are_not_integers_are_refused_not_truncated(id_store):
    # Integral floats too: ids that went through floats went through something that did not keep them.
    for ids in (np.array([1.0, 2.0]), np.array([1.5, 2.5]), np.array([True, False])):
        with pytest.raises(SampleIdError, match=f"sample ids in a selection of .* must be integers, got {ids.dtype}"):
            make(id_store, ids)
    with pytest.raises(SampleIdError, match="must be integers, got float64"):
        Selection.of(id_store, np.array([3.7, 1.2]), method="test", params={}, io={})
    with pytest.raises(SampleIdError, match="suspects must be integers"):
        Suspects(ids=[0.5], labels=[0], quality=[0.1])
    assert make(id_store, np.array([], dtype=np.float64)).ids.dtype == np.int64  # empty: no id to doubt


def _archive_with(selection: Selection, *, header: bool = True, **changes) -> bytes:
    """`selection`'s file with arrays or header fields replaced (None: left out), or no header."""
    with np.load(io.BytesIO(selection.to_bytes())) as f:
        arrays = {name: f[name] for name in f.files}
    meta = json.loads(str(arrays.pop("meta")))
    for name, value in changes.items():
        target = arrays if name in arrays or isinstance(value, np.ndarray) else meta
        if value is None:
            target.pop(name)
        else:
            target[name] = value
    if header:
        arrays["meta"] = json.dumps(meta)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_a_damaged_or_foreign_file_is_refused_naming_it(id_store, tmp_path):
    selection = make(id_store, np.arange(0, 2500, 3))
    whole = selection.to_bytes()
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF  # inside a compressed member
    encrypted = bytearray(whole)
    encrypted[whole.index(b"PK\x01\x02") + 8] |= 0x1  # a member's flags, in its central directory entry
    cases = {
        "junk": (np.random.default_rng(0).bytes(300), "not an .npz archive, or cut short"),
        "text": (b"hello\n", "not an .npz archive, or cut short"),
        "truncated": (whole[: len(whole) // 2], "not an .npz archive, or cut short"),
        "flipped": (bytes(flipped), "is damaged"),
        "encrypted": (bytes(encrypted), "is damaged: RuntimeError"),  # was zipfile's bare RuntimeError
        "no-header": (_archive_with(selection, header=False), r"header \('meta', a JSON object\) is missing"),
        "no-ids": (_archive_with(selection, ids=None), "array 'ids' of numbers missing"),
        "text-ids": (_archive_with(selection, ids=np.array(["a"])), "array 'ids' of numbers missing"),
        "no-method": (_archive_with(selection, method=None), "header field 'method' is None, not str"),
        "odd-dataset": (_archive_with(selection, dataset=[1]), r"header field 'dataset' is \[1\], not dict"),
        "bool-round": (_archive_with(selection, round=True), "header field 'round' is True, not int"),
        "float-ids": (_archive_with(selection, ids=np.array([1.0, 2.0])), "must be integers, got float64"),
        "unsorted": (_archive_with(selection, ids=np.array([2, 1]), weights=np.ones(2), scores=np.ones(2)), "sorted"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(data)
        with pytest.raises(NearstoreError, match=f"selection file '.*{name}.npz'.*{message}"):
            Selection.load(path)


# Fuzzing: whatever bytes a file holds, Selection.load is a refusal naming the file (DatasetError,
# SampleIdError) or a valid selection, which then writes back and reads again to itself.
FUZZ = settings(max_examples=150, deadline=None)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
columns = hnp.arrays(
    hnp.scalar_dtypes() | hnp.unicode_string_dtypes(),
    hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4),
)


@pytest.fixture(scope="module")
def valid(id_store_url) -> Selection:
    return make(open_dataset(id_store_url), np.array([3, 70, 900]), params={"keep": 0.1}, round=2)


@pytest.fixture(scope="module")
def file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "round.npz"


def _loads_or_refuses(data: bytes, file) -> None:
    file.write_bytes(data)
    try:
        selection = Selection.load(file)
    except (DatasetError, SampleIdError) as e:
        assert f"selection file {str(file)!r}" in str(e)
        return
    again = Selection.from_bytes(selection.to_bytes())
    assert np.all(np.diff(selection.ids) > 0) and np.all(selection.weights >= 0)
    for name in ("ids", "weights", "scores"):
        np.testing.assert_array_equal(getattr(again, name), getattr(selection, name))
    assert (again.method, again.params, again.round, again.dataset) == (
        selection.method,
        selection.params,
        selection.round,
        selection.dataset,
    )


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes_load_or_are_refused(file, data):
    _loads_or_refuses(data, file)


@FUZZ
@given(st.data())
def test_fuzz_a_damaged_file_loads_or_is_refused(valid, file, data):
    whole = bytearray(valid.to_bytes())
    for at, value in data.draw(st.lists(st.tuples(st.integers(0, len(whole) - 1), st.integers(0, 255)), max_size=4)):
        whole[at] = value
    _loads_or_refuses(bytes(whole[: data.draw(st.integers(0, len(whole)))]), file)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["version", "dataset", "method", "params", "round", "io"]), json_values)
    | st.dictionaries(st.sampled_from(["ids", "weights", "scores", "suspect_ids"]), columns, max_size=2)
)
def test_fuzz_a_file_with_odd_fields_loads_or_is_refused(valid, file, changes):
    _loads_or_refuses(_archive_with(valid, **changes), file)


def test_a_selection_is_never_saved_inside_its_dataset(id_store, tmp_path, fingerprint):
    selection = random_select(id_store, 0.1)
    before = fingerprint(id_store.url)
    for inside in (f"{id_store.url}/sel.npz", f"file://{id_store.url}/x/sel.npz"):
        with pytest.raises(ParameterError, match="the selection .* lies inside the dataset"):
            selection.save(inside)
    assert fingerprint(id_store.url) == before
    selection.save(tmp_path / "sel.npz")  # beside it is fine
    assert Selection.load(str(tmp_path / "sel.npz")).ids.tolist() == selection.ids.tolist()


def test_no_other_spelling_of_the_dataset_lets_a_selection_in(id_store, tmp_path, fingerprint, monkeypatch):
    # a caching layer on either side made them "other filesystems"; a dataset opened by a relative
    # path looked it up again after a chdir (shards read as missing, the store's own path let in)
    before = fingerprint(id_store.url)
    cached = random_select(open_dataset(f"simplecache::file://{id_store.url}"), 0.1)
    plain = random_select(id_store, 0.1)
    for selection, inside in ((cached, f"{id_store.url}/a.npz"), (plain, f"simplecache::file://{id_store.url}/b.npz")):
        with pytest.raises(ParameterError, match="lies inside the dataset"):
            selection.save(inside)
    parent, name = os.path.split(id_store.url)
    monkeypatch.chdir(parent)
    relative = open_dataset(name)
    monkeypatch.chdir(tmp_path)
    assert relative.url == id_store.url
    assert SelectiveReader(relative).read(np.array([3, 2000]))["x"][:, 0].tolist() == [3, 2000]
    with pytest.raises(ParameterError, match="lies inside the dataset"):
        random_select(relative, 0.1).save(f"{id_store.url}/c.npz")
    assert fingerprint(id_store.url) == before
    monkeypatch.setenv("HOME", parent)  # ~ is the home folder's, not a folder named "~" here
    assert open_dataset(f"~/{name}").url == id_store.url


@settings(max_examples=200, deadline=None)
@given(
    among=st.lists(st.integers(0, 60), max_size=40, unique=True).map(sorted),
    ids=st.lists(st.integers(-5, 70), max_size=50),
)
def test_membership_in_sorted_ids_is_isin(among, ids):
    ids, among = np.array(ids, dtype=np.int64), np.array(among, dtype=np.int64)
    np.testing.assert_array_equal(in_sorted(ids, among), np.isin(ids, among))


def test_a_failed_write_leaves_the_file_there_whole(tmp_path):
    target = tmp_path / "kept.csv"
    target.write_bytes(b"the old report")
    with pytest.raises(TypeError):  # fails mid-write, as a full disk would
        write_whole(str(target), object())
    assert target.read_bytes() == b"the old report" and [p.name for p in tmp_path.iterdir()] == ["kept.csv"]
    write_whole(str(tmp_path / "new" / "r.csv"), b"rows")  # a missing folder is made
    assert (tmp_path / "new" / "r.csv").read_bytes() == b"rows"


def test_writes_of_one_path_at_once_each_land_whole_and_a_full_disk_names_it(tmp_path, monkeypatch):
    # every rank saving the selection to one path: they shared one partial file (a rename of
    # another's, gone: FileNotFoundError; a load reading it empty); ENOSPC named no file
    target = tmp_path / "sel.npz"
    payloads = [bytes([k]) * 100_000 for k in range(4)]

    def save(k: int) -> None:
        for _ in range(25):
            write_whole(str(target), payloads[k])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(save, range(4)))  # raised nothing
    assert target.read_bytes() in payloads and [p.name for p in tmp_path.iterdir()] == ["sel.npz"]

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=re.escape(f"No space left on device: '{target}'")):
        write_whole(str(target), b"new")
    assert target.read_bytes() in payloads and [p.name for p in tmp_path.iterdir()] == ["sel.npz"]
