"""The reader and the loader over real object storage: moto's S3 and nginx on 127.0.0.1, with the
servers' own books as the measure of what crossed the network."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from nearstore import Coalescing, SelectiveReader, open_dataset, verify_dataset, write_dataset
from nearstore.errors import DatasetError, IntegrityError, ParameterError
from nearstore.storage.dataset import S3_CONNECTIONS

# Tests of the loader and the selectors over object storage import them where they run: both need
# torch, and the storage layer is also tested where torch is not installed (.ci/run's second stage).

N, SHARD, DIM = 3000, 256, 40
INDEX_BYTES = SHARD * 16 + 4
# raw (random floats do not compress, labels are tiny), a crc32c; the stores here are written a
# sample an inner chunk (`chunk_samples=1`), so that a sample is a range of its own
SAMPLE_BYTES = {"x": DIM * 4 + 4, "y": 8 + 4}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(N, DIM)).astype(np.float32), "y": rng.integers(1, 10, N)}


def batches(data):
    return ({k: v[i : i + 1000] for k, v in data.items()} for i in range(0, N, 1000))


@pytest.fixture(scope="module")
def s3_store(s3, data):
    fsspec.filesystem("s3", **s3.storage_options).mkdir("nearstore-test")
    return write_dataset(
        "s3://nearstore-test/ds.zarr",
        batches(data),
        shard_samples=SHARD,
        chunk_samples=1,
        storage_options=s3.storage_options,
    )


@pytest.fixture(scope="module")
def http_store(nginx, data):
    write_dataset(str(nginx.root / "ds.zarr"), batches(data), shard_samples=SHARD, chunk_samples=1)
    return open_dataset(f"{nginx.url}/ds.zarr")


@pytest.fixture(params=["s3", "http"])
def remote(request, s3, nginx, s3_store, http_store):
    """(dataset, the server's books as a function, a way to clear them), for S3 and for HTTP."""
    if request.param == "s3":
        s3.books.clear()
        return s3_store, lambda: s3.books, "/nearstore-test/ds.zarr"
    nginx.clear()
    return http_store, nginx.books, "/ds.zarr"


def test_stores_written_and_read_remotely_equal_local(remote, data):
    dataset, _, _ = remote
    assert dataset.num_samples == N and dataset.class_names == tuple(str(c) for c in range(10))
    ids = np.random.default_rng(1).integers(0, N, 300)
    out = SelectiveReader(dataset).read(ids)
    np.testing.assert_array_equal(out["x"], data["x"][ids])
    np.testing.assert_array_equal(out["y"], data["y"][ids])
    assert dataset.stored_nbytes() == N * sum(SAMPLE_BYTES.values()) + 2 * dataset.num_shards * INDEX_BYTES


def test_opening_asks_only_for_the_metadata_it_counts(remote):
    # zarr left to open a store probes for Zarr v2 and consolidated metadata: on S3 three failed
    # HEADs, three LISTs and a HEAD before each document, which nothing counted.
    dataset, books, prefix = remote
    opened = open_dataset(dataset.url, storage_options=dataset.storage_options)
    served = books().served
    assert {(s.method, s.status) for s in served} <= {("GET", 200), ("GET", 206)}  # no probe, nothing failed
    assert sorted(s.path for s in served) == sorted(f"{prefix}/{name}zarr.json" for name in ("", "x/", "y/"))
    assert (opened.open_stats.requests, opened.open_stats.bytes) == (len(served), sum(s.bytes for s in served))


def test_the_readers_books_match_the_servers(remote):
    dataset, books, prefix = remote
    reader = SelectiveReader(dataset)
    reader.read(np.random.default_rng(2).choice(N, 500, replace=False))
    served = books().gets(prefix)
    assert all(s.status == 206 for s in served)  # ranged reads only
    assert (reader.stats.requests, reader.stats.bytes) == (len(served), books().bytes(prefix))


@pytest.mark.parametrize("keep", [0.1, 0.5])
@pytest.mark.parametrize("shuffle", [False, True])
def test_read_time_selection_fetches_only_the_selected_bytes(remote, keep, shuffle):
    pytest.importorskip("torch")
    from loaders import StoreSource, StreamingLoader
    from nearstore import random_select

    dataset, books, prefix = remote
    selection = random_select(dataset, keep, seed=3)
    # Exact ranges and no cache: by default a hole shorter than a request's worth (64 KiB) is read
    # through, which for samples this small reads whole shards, and the cache reads a shard's
    # selected samples together.
    source = StoreSource(dataset.url, storage_options=dataset.storage_options, reads=Coalescing(0))
    loader = StreamingLoader(
        source, selection, batch_size=64, shuffle=shuffle, backend="dali", device="cpu", cache=False
    )
    assert sum(len(y) for _, y in loader) == len(selection)

    served = [s for s in books().gets(prefix) if "/c/" in s.path]  # shard objects; not the metadata
    shard_bytes = sum(s.bytes for s in served)
    shards_touched = len(np.unique(selection.ids // SHARD))
    # the labels are read whole, a request a shard, once (kept in memory): not a range a sample
    labels = [s for s in served if "/y/c/" in s.path]
    assert len(labels) == dataset.num_shards and sum(s.bytes for s in labels) == dataset.stored_nbytes(["y"])
    payload = len(selection) * SAMPLE_BYTES["x"]
    assert shard_bytes - dataset.stored_nbytes(["y"]) <= 1.10 * (payload + shards_touched * INDEX_BYTES)
    # the loader counts every request it caused, its metadata documents too, as the server does
    every = books().gets(prefix)
    assert (loader.io_stats()["requests"], loader.io_stats()["bytes_read"]) == (len(every), books().bytes(prefix))
    assert len(every) == len(served) + 3  # zarr.json of the group and of its two arrays
    inputs = len(served) - len(labels)
    if shuffle:
        # a shuffled batch rarely holds neighbours: at most one range a sample
        assert inputs <= shards_touched + len(selection)
    else:
        # in order, neighbours share a range: at most one per run of adjacent ids within a shard and a batch
        runs = len(np.flatnonzero(np.diff(selection.ids) != 1)) + 1 + shards_touched + len(loader)
        assert inputs <= shards_touched + runs


@pytest.mark.parametrize("keep", [0.1, 0.5])
def test_a_round_reads_a_shard_once_and_later_epochs_nothing(remote, keep):
    pytest.importorskip("torch")
    from loaders import StreamingLoader
    from nearstore import random_select

    dataset, books, prefix = remote
    selection = random_select(dataset, keep, seed=3)
    loader = StreamingLoader(
        dataset.url, selection, batch_size=64, backend="torch", device="cpu", storage_options=dataset.storage_options
    )
    expected = sorted(SelectiveReader(dataset, ["x"]).read(selection.ids)["x"][:, 0].tolist())
    served = []
    for _ in range(3):
        before = len(books().gets(prefix))
        assert sorted(i for x, _ in loader for i in x[:, 0].tolist()) == expected
        served.append([s for s in books().gets(prefix)[before:] if "/x/c/" in s.path])
    shards_touched = len(np.unique(selection.ids // SHARD))
    # a shard's index, then its selected samples in one planned read (holes under 64 KiB read through)
    assert len(served[0]) == 2 * shards_touched
    assert sum(s.bytes for s in served[0]) <= dataset.stored_nbytes(["x"])
    assert served[1:] == [[], []]  # the cache serves the round's later epochs: not a request
    assert loader.io_stats()["per_epoch"][1]["requests"] == 0


@pytest.mark.parametrize(("kind", "options"), [("Graft", {"pool": 2}), ("Crest", {})], ids=["Graft(pool=2)", "Crest()"])
def test_selection_pools_are_read_in_a_request_or_two_a_shard(remote, data, tmp_path, kind, options):
    pytest.importorskip("torch")
    import nearstore

    selector = getattr(nearstore, kind)(**options)
    dataset, books, prefix = remote
    proxy = nearstore.RandomFeatureProxy(10, width=16).fit(data["x"], data["y"])
    selection = selector.select(dataset, 0.25, proxy=proxy, seed=4)
    local = write_dataset(str(tmp_path / "local.zarr"), batches(data), shard_samples=SHARD, chunk_samples=1)
    np.testing.assert_array_equal(selection.ids, selector.select(local, 0.25, proxy=proxy, seed=4).ids)

    served = [s for s in books().gets(prefix) if "/x/c/" in s.path]  # the pool's inputs; labels are read whole
    pooled = sum(min(n, 2 * round(0.25 * n)) for n in np.bincount(data["y"]) if n)  # half of each class
    # Every hole under 64 KiB read through (a request is worth that by default): each shard's index,
    # then its pooled samples in one run, where reading only the samples would make about one a sample.
    assert len(served) <= 2 * dataset.num_shards < pooled / 20
    assert sum(s.bytes for s in served) <= dataset.stored_nbytes(["x"])


def test_zarr_alone_rereads_shard_indexes_for_every_batch(remote):
    dataset, books, prefix = remote
    dataset = open_dataset(dataset.url, storage_options=dataset.storage_options)  # no shard index known yet
    ids = np.random.default_rng(4).choice(N, N // 10, replace=False)
    batches = np.array_split(ids, 10)  # an epoch of shuffled batches, as a loader reads them
    sizes = dataset.manifest.nbytes["x"]

    def index_reads() -> int:
        """Requests so far for a shard index of x: its object's last INDEX_BYTES, as a suffix or not."""
        served = books().gets(f"{prefix}/x/c/")
        shards = [int(s.path.split("/x/c/")[1].split("/")[0]) for s in served]
        index = [(f"bytes=-{INDEX_BYTES}", f"bytes={sizes[k] - INDEX_BYTES}-{sizes[k] - 1}") for k in shards]
        return sum(s.range in ranges for s, ranges in zip(served, index))

    start = index_reads()
    reader = SelectiveReader(dataset, ["x"])
    ours = [reader.read(batch)["x"] for batch in batches]
    middle = index_reads()
    x = zarr.open_group(dataset.url, mode="r", storage_options=dataset.storage_options or None)["x"]
    theirs = [x.get_orthogonal_selection((np.sort(batch),)) for batch in batches]
    end = index_reads()
    for batch, a, b in zip(batches, ours, theirs):
        np.testing.assert_array_equal(a[np.argsort(batch)], b)
    assert middle - start == len(np.unique(ids // SHARD))  # each touched shard's index, once
    assert end - middle == sum(len(np.unique(batch // SHARD)) for batch in batches)  # again every batch


def test_s3_throttling_is_retried_with_backoff(s3, s3_store, data):
    s3.books.clear()
    s3.fail_next = 3
    out = SelectiveReader(s3_store).read([5, 6, 2900])
    np.testing.assert_array_equal(out["x"], data["x"][[5, 6, 2900]])
    assert [s.status for s in s3.books.served].count(503) == 3


def test_s3_failures_that_persist_end_in_an_error_naming_the_object(s3, s3_store):
    # Retries are the S3 client's: botocore's backoff (here: no second attempt) inside s3fs's
    # five attempts with backoff.
    options = {**s3.storage_options, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    dataset = open_dataset(s3_store.url, storage_options=options)
    s3.books.clear()
    s3.fail_next = 10**6
    try:
        with pytest.raises(OSError, match=r"reading 'nearstore-test/ds.zarr/x/c/0/0' of 's3://nearstore-test/ds.zarr'"):
            SelectiveReader(dataset, ["x"]).read([1])
    finally:
        s3.fail_next = 0
    gets = [served for served in s3.books.served if served.kind != "HEAD"]
    assert len(gets) <= 5  # and a HEAD: the object's size, which would tell one cut short
    assert [served.kind for served in s3.books.served if served not in gets] == ["HEAD"]


def test_missing_buckets_and_unreachable_endpoints_are_named(s3):
    with pytest.raises(FileNotFoundError, match="no zarr group at 's3://no-such-bucket/ds.zarr'"):
        open_dataset("s3://no-such-bucket/ds.zarr", storage_options=s3.storage_options)
    batch = {"x": np.zeros((4, 2), np.float32)}
    with pytest.raises(FileNotFoundError, match="bucket does not exist"):  # a writer makes no bucket
        write_dataset("s3://no-such-bucket/ds.zarr", [batch], label_array=None, storage_options=s3.storage_options)
    assert not fsspec.filesystem("s3", **s3.storage_options).exists("no-such-bucket")
    closed = {
        **s3.storage_options,
        "endpoint_url": "http://127.0.0.1:9",
        "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 1},
    }
    with pytest.raises(OSError, match="cannot open 's3://nearstore-test/ds.zarr'.*127.0.0.1:9"):
        open_dataset("s3://nearstore-test/ds.zarr", storage_options=closed)


def test_a_dataset_at_an_empty_buckets_root_is_written_in_place_and_a_failed_write_keeps_the_bucket(s3, data):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.mkdir("root-bucket")
    batch = {"x": data["x"][:100], "y": data["y"][:100]}

    def failing():
        yield batch
        raise RuntimeError("the source ran dry")

    with pytest.raises(RuntimeError, match="ran dry"):
        write_dataset("s3://root-bucket", failing(), storage_options=s3.storage_options)
    assert fs.exists("root-bucket") and fs.ls("root-bucket", refresh=True) == []  # emptied, never deleted
    written = write_dataset("s3://root-bucket", [batch], storage_options=s3.storage_options)
    np.testing.assert_array_equal(SelectiveReader(written).read([7])["x"], batch["x"][[7]])
    with pytest.raises(FileExistsError, match="'s3://root-bucket' is a bucket's root: a dataset there cannot be"):
        write_dataset("s3://root-bucket", [batch], storage_options=s3.storage_options, overwrite=True)
    assert open_dataset("s3://root-bucket", storage_options=s3.storage_options).num_samples == 100


@pytest.mark.parametrize("shard_samples", [SHARD, 1000])
def test_writing_to_s3_puts_each_object_once_and_reads_none_back(s3, data, shard_samples):
    # Each shard is encoded in memory: its size and chunk checksums for the manifest come from
    # those bytes, so writing costs its uploads, not as many downloads again.
    fsspec.filesystem("s3", **s3.storage_options).makedirs("nearstore-write", exist_ok=True)
    url = f"s3://nearstore-write/once-{shard_samples}.zarr"
    s3.books.clear()
    dataset = write_dataset(url, batches(data), shard_samples=shard_samples, storage_options=s3.storage_options)
    served = list(s3.books.served)
    shards = ["/" + dataset.shard_path(name, k) for name in dataset.arrays for k in range(dataset.array_shards(name))]
    # no GET or HEAD of a shard object: each is named once, by its upload
    assert sorted((s.method, s.path) for s in served if s.path in shards) == sorted(("PUT", p) for p in shards)
    # Each shard and each array's zarr.json is PUT once (not its array's zarr.json again after every
    # shard); the group's zarr.json twice: first bare (a killed write leaves a zarr group that
    # open_dataset refuses and overwrite replaces), last with the manifest, after every other object.
    group = f"/nearstore-write/once-{shard_samples}.zarr/zarr.json"
    puts = [s.path for s in served if s.method == "PUT"]
    arrays = {f"/nearstore-write/once-{shard_samples}.zarr/{name}/zarr.json": 1 for name in dataset.arrays}
    assert collections.Counter(puts) == {**dict.fromkeys(shards, 1), **arrays, group: 2}
    assert puts[0] == puts[-1] == group
    # Besides: whether anything is there, listed (s3fs lists the parent too where nothing is); no
    # GET or HEAD (zarr's probes, a read back of the documents uploaded: 3 HEADs, 3 GETs and 3 more
    # LISTs before 2026-12)
    others = collections.Counter(s.kind for s in served if s.kind != "PUT")
    assert set(others) == {"LIST"} and others["LIST"] <= 2, others
    uploaded = sum(s.received for s in served if s.method == "PUT")
    downloaded = sum(s.bytes for s in served if s.method == "GET")
    assert uploaded > dataset.stored_nbytes() and downloaded < 0.05 * uploaded
    np.testing.assert_array_equal(SelectiveReader(dataset).read(np.arange(N))["x"], data["x"])


def _objects(fs, url: str) -> dict[str, int]:
    """The objects under `url` by key, and their sizes."""
    root = url.removeprefix("s3://")
    return {path.removeprefix(f"{root}/"): info["size"] for path, info in fs.find(root, detail=True).items()}


def test_an_overwrite_on_s3_copies_each_new_object_once_and_moves_no_old_one(s3, data):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.makedirs("nearstore-overwrite", exist_ok=True)
    url = "s3://nearstore-overwrite/ds.zarr"
    write_dataset(url, batches(data), shard_samples=SHARD, storage_options=s3.storage_options)
    new = {"x": data["x"][:2000] + 1, "y": data["y"][:2000]}  # 8 shards an array where there were 12
    s3.books.clear()
    replaced = write_dataset(url, [new], shard_samples=SHARD, overwrite=True, storage_options=s3.storage_options)
    served = list(s3.books.served)
    objects = _objects(fs, url)
    assert len(objects) == 2 * 8 + 3 and "x/c/8/0" not in objects  # the old shards past the new ones deleted
    kinds = collections.Counter(s.kind for s in served)
    # Each new object uploaded once beside the old store (and the group's zarr.json bare first),
    # then copied in once, the group's last; the old root's zarr.json replaced first by a bare
    # group; no old object copied (before 2026-12: moved aside, then the new ones moved in, each a
    # copy: COPY 2n). Read: a listing of root, its zarr.json (a dataset, that overwrite may
    # replace), a listing of the new store (that it is whole), one of root for the old objects left,
    # one of root's siblings for the stores killed replacements left.
    assert kinds["COPY"] <= len(objects) and kinds["PUT"] <= len(objects) + 2, kinds
    assert kinds["GET"] <= 1 and kinds["LIST"] <= 4 and kinds["HEAD"] == 0 and kinds["DELETE"] <= 1, kinds
    copied = [s.path.removeprefix("/nearstore-overwrite/ds.zarr/") for s in served if s.kind == "COPY"]
    assert sorted(copied) == sorted(objects) and copied[-1] == "zarr.json"
    assert fs.ls("nearstore-overwrite", refresh=True) == ["nearstore-overwrite/ds.zarr"]  # nothing beside it
    np.testing.assert_array_equal(SelectiveReader(replaced).read(np.arange(2000))["x"], new["x"])


# The writes of an overwrite of the test's store by 2000 samples (8 shards an array): beside the old
# store, its 19 objects, the group's zarr.json twice; then, over the old one, a bare group's zarr.json
# and the 19 copies, the group's last.
BESIDE = 2 * 8 + 3 + 1


@pytest.mark.parametrize("denied", [0, 12, BESIDE - 1, BESIDE, BESIDE + 1, BESIDE + 10, 2 * BESIDE - 1])
def test_an_overwrite_on_s3_stopped_half_way_leaves_the_old_dataset_whole_or_the_new_one(s3, data, denied):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.makedirs("nearstore-stopped", exist_ok=True)
    url = f"s3://nearstore-stopped/{denied}.zarr"
    write_dataset(url, batches(data), shard_samples=SHARD, storage_options=s3.storage_options)
    new = {"x": data["x"][:2000] + 1, "y": data["y"][:2000]}
    s3.deny_write = denied
    with pytest.raises(PermissionError):
        write_dataset(url, [new], shard_samples=SHARD, overwrite=True, storage_options=s3.storage_options)
    assert s3.deny_write is None  # the write denied was one of this overwrite's
    beside = [f"s3://{p}" for p in fs.ls("nearstore-stopped", refresh=True) if p.startswith(url[5:] + ".")]

    def check(dataset, samples) -> None:  # never a mix: all samples the old or the new, every shard as recorded
        np.testing.assert_array_equal(SelectiveReader(dataset).read(np.arange(dataset.num_samples))["x"], samples)
        assert verify_dataset(dataset, progress=False) == []

    # beside it: nothing where the write stopped before the new store was whole, else that store, whole
    assert len(beside) == (denied >= BESIDE)
    for whole_at in beside:
        check(open_dataset(whole_at, storage_options=s3.storage_options), new["x"])
    # at the URL: the old dataset, whole, until its manifest is replaced; then a group naming the new one
    try:
        check(open_dataset(url, storage_options=s3.storage_options), data["x"])
        assert denied <= BESIDE
    except DatasetError as e:
        assert denied > BESIDE and re.search(r"the new dataset is whole at '([^']+)'", str(e))[1] == beside[0]
    written = write_dataset(url, [new], shard_samples=SHARD, overwrite=True, storage_options=s3.storage_options)
    np.testing.assert_array_equal(SelectiveReader(written).read([1999])["x"], new["x"][[1999]])
    if denied > BESIDE:  # the store beside that the URL's group named is deleted with the rest
        assert [p for p in fs.ls("nearstore-stopped", refresh=True) if p.startswith(url[5:] + ".")] == []


def test_an_overwrite_deletes_no_store_a_forged_replacement_group_names(s3, data):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.makedirs("nearstore-forged", exist_ok=True)
    url, copy = "s3://nearstore-forged/ds.zarr", "s3://nearstore-forged/ds.zarr-copy"
    small = {"x": data["x"][:300], "y": data["y"][:300]}
    write_dataset(copy, [small], shard_samples=SHARD, storage_options=s3.storage_options)
    write_dataset(url, [small], shard_samples=SHARD, storage_options=s3.storage_options)
    # names no replacement gives: the root itself, an array of the new dataset, a dataset beside it
    for named in ["", "/x", "-copy", ".writing-0123456g"]:
        pointer = {"zarr_format": 3, "node_type": "group", "attributes": {"nearstore_replacement": named}}
        fs.pipe_file(f"{url[5:]}/zarr.json", json.dumps(pointer).encode())
        written = write_dataset(url, [small], shard_samples=SHARD, overwrite=True, storage_options=s3.storage_options)
        assert verify_dataset(open_dataset(url, storage_options=s3.storage_options), progress=False) == [], named
        assert written.num_samples == 300
        assert verify_dataset(open_dataset(copy, storage_options=s3.storage_options), progress=False) == [], named


def test_an_overwrite_whose_deletes_fail_after_it_is_in_place_says_the_dataset_is_whole(s3, data, monkeypatch):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.makedirs("nearstore-undeleted", exist_ok=True)
    url = "s3://nearstore-undeleted/ds.zarr"
    write_dataset(url, batches(data), shard_samples=SHARD, storage_options=s3.storage_options)
    new = {"x": data["x"][:2000] + 1, "y": data["y"][:2000]}
    s3.deny_write = BESIDE + 1  # a replacement stopped after the URL's group named the store beside
    with pytest.raises(PermissionError):
        write_dataset(url, [new], shard_samples=SHARD, overwrite=True, storage_options=s3.storage_options)
    [stopped] = [f"s3://{p}" for p in fs.ls("nearstore-undeleted", refresh=True) if p != url[5:]]

    def denied(path, recursive=False):
        raise PermissionError(f"deleting {path} denied")

    monkeypatch.setattr(fs, "rm", denied)  # the writer's: fsspec gives the same options one instance
    with pytest.raises(PermissionError, match="deleting .* denied") as raised:
        write_dataset(url, [new], shard_samples=SHARD, overwrite=True, storage_options=s3.storage_options)
    [note] = raised.value.__notes__
    beside = {f"s3://{p}" for p in fs.ls("nearstore-undeleted", refresh=True)} - {url, stopped}
    assert note.startswith(f"{url!r} was replaced: the new dataset there is whole.")
    # what was left, by name: the old shards past the new 8 of each array, the two stores beside it
    assert len(_objects(fs, url)) == 2 * 12 + 3
    assert f"the old dataset's objects under {url!r} that the new one has not" in note and len(beside) == 1
    assert f"{beside.pop()!r}" in note and f"{stopped!r}" in note
    replaced = open_dataset(url, storage_options=s3.storage_options)
    assert verify_dataset(replaced, progress=False) == []
    np.testing.assert_array_equal(SelectiveReader(replaced).read(np.arange(2000))["x"], new["x"])


# A writer killed (no exception, no cleanup) when its source has yielded 3 batches.
KILLED_WRITER = """
import json, os, sys
import numpy as np
from nearstore import write_dataset

def batches():
    for k in range(3):
        yield {"x": np.full((1000, 4), k, np.float32), "y": np.full(1000, k)}
    os._exit(9)

write_dataset(sys.argv[1], batches(), shard_samples=256, storage_options=json.loads(sys.argv[2]))
"""


def test_a_write_to_s3_killed_mid_way_leaves_a_store_open_refuses_and_overwrite_replaces(s3, data):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.makedirs("nearstore-killed", exist_ok=True)
    url = "s3://nearstore-killed/ds.zarr"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    command = [sys.executable, "-c", KILLED_WRITER, url, json.dumps(s3.storage_options)]
    assert subprocess.run(command, env=env, timeout=120).returncode == 9
    # 3000 samples yielded: 11 whole shards of each array stored, the 12th still in memory; no
    # array's zarr.json yet (each is written once, at the end), nor the group's attributes
    left = {path.removeprefix("nearstore-killed/ds.zarr/") for path in fs.find(url, refresh=True)}
    assert left == {"zarr.json"} | {f"x/c/{i}/0" for i in range(11)} | {f"y/c/{i}" for i in range(11)}
    with pytest.raises(DatasetError, match=f"{url!r} is a nearstore dataset whose write was interrupted"):
        open_dataset(url, storage_options=s3.storage_options)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):  # refused as any store is
        write_dataset(url, batches(data), storage_options=s3.storage_options)
    written = write_dataset(url, batches(data), storage_options=s3.storage_options, overwrite=True)
    np.testing.assert_array_equal(SelectiveReader(written).read([2999])["x"], data["x"][[2999]])
    assert fs.ls("nearstore-killed", refresh=True) == ["nearstore-killed/ds.zarr"]  # nothing left beside it


def test_a_write_whose_source_fails_mid_way_leaves_no_store_and_the_source_untouched(s3, s3_store):
    # The batches are read from a dataset on the same S3; the source fails after 2 shards' worth.
    fsspec.filesystem("s3", **s3.storage_options).makedirs("nearstore-copy", exist_ok=True)
    url = "s3://nearstore-copy/ds.zarr"

    def copied():
        reader = SelectiveReader(s3_store)
        for start in (0, 300):
            yield reader.read(np.arange(start, start + 300))
        raise RuntimeError("the source ran dry")

    s3.books.clear()
    with pytest.raises(RuntimeError, match="ran dry"):
        write_dataset(url, copied(), shard_samples=SHARD, storage_options=s3.storage_options)
    assert {s.method for s in s3.books.served if s.path.startswith("/nearstore-test/")} <= {"GET", "HEAD"}
    assert any(s.method == "PUT" and "/c/" in s.path for s in s3.books.served)  # shards were stored...
    with pytest.raises(FileNotFoundError, match=f"no zarr group at {url!r}"):  # ...and removed with the rest
        open_dataset(url, storage_options=s3.storage_options)
    assert open_dataset(s3_store.url, storage_options=s3.storage_options).identity() == s3_store.identity()


def test_http_stores_are_read_only(nginx, http_store):
    nginx.clear()
    with pytest.raises(ParameterError, match="new.zarr': HTTP stores are read-only"):  # was aiohttp's 403
        write_dataset(f"{nginx.url}/new.zarr", [{"x": np.zeros((2, 2)), "y": np.zeros(2, dtype=int)}])
    assert nginx.books().served == []  # refused before any request
    SelectiveReader(http_store).read([0, 1])
    assert {s.method for s in nginx.books().served} <= {"GET", "HEAD"}
    # the objects' names are appended to the URL: a query would take them ('ds.zarr?t=1/zarr.json')
    for url in (f"{nginx.url}/ds.zarr?token=abc", f"{nginx.url}/ds.zarr#part"):
        with pytest.raises(ParameterError, match="an HTTP store's URL cannot hold a query or a fragment"):
            open_dataset(url)


def test_credentials_stay_out_of_a_datasets_repr(s3, s3_store):
    secret = "a-secret-of-32-characters-000000"
    dataset = open_dataset(s3_store.url, storage_options={**s3.storage_options, "secret": secret})
    assert secret not in repr(dataset) and "storage_options" not in repr(dataset)
    assert dataset.storage_options["secret"] == secret  # kept, for the readers


def test_a_dataset_is_written_in_an_empty_s3_folder_whose_marker_is_left_alone(s3, data):
    import boto3

    options = s3.storage_options
    client = boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="nearstore-folder")
    client.put_object(Bucket="nearstore-folder", Key="ds.zarr/", Body=b"")  # a console's "create folder"
    client.put_object(Bucket="nearstore-folder", Key="failed.zarr/", Body=b"")

    def failing():  # a source that fails after its first shard: the write is undone, the marker kept
        yield next(batches(data))
        raise RuntimeError("the source failed")

    # its cleanup removed the marker first, with all under it, then raised FileNotFoundError for the
    # shards, hiding the source's error
    with pytest.raises(RuntimeError, match="the source failed"):
        write_dataset("s3://nearstore-folder/failed.zarr", failing(), storage_options=options, shard_samples=SHARD)
    dataset = write_dataset("s3://nearstore-folder/ds.zarr", batches(data), storage_options=options)
    assert dataset.num_samples == N and verify_dataset(dataset, progress=False) == []
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="nearstore-folder")["Contents"]]
    assert "ds.zarr/" in keys and "ds.zarr/zarr.json" in keys
    assert [k for k in keys if k.startswith("failed.zarr")] == ["failed.zarr/"]


def test_a_selection_is_saved_beside_the_data_with_the_stores_options(s3, s3_store):
    pytest.importorskip("torch")
    from nearstore import Selection, random_select

    selection = random_select(s3_store, 0.1, seed=3)
    url = "s3://nearstore-test/selections/round0.npz"
    selection.save(url, storage_options=s3.storage_options)
    loaded = Selection.load(url, storage_options=s3.storage_options)
    np.testing.assert_array_equal(loaded.ids, selection.ids)


def damageable_store(where: str, name: str, s3, nginx, data) -> tuple[str, dict, fsspec.AbstractFileSystem, str]:
    """The data written as `name` to moto's S3 or under nginx's root: its URL and storage options,
    and the filesystem and path its objects lie at there, to damage behind the reader's back."""
    if where == "s3":
        fs = fsspec.filesystem("s3", **s3.storage_options)
        fs.makedirs("nearstore-damage", exist_ok=True)
        url, options, prefix = f"s3://nearstore-damage/{name}", s3.storage_options, f"nearstore-damage/{name}"
        write_dataset(url, batches(data), shard_samples=SHARD, storage_options=options)
    else:  # nginx serves the folder: its files are the objects
        fs, url, options, prefix = fsspec.filesystem("file"), f"{nginx.url}/{name}", {}, str(nginx.root / name)
        write_dataset(prefix, batches(data), shard_samples=SHARD)
    return url, options, fs, prefix


@pytest.mark.parametrize("where", ["s3", "http"])
def test_a_shard_object_deleted_mid_epoch_is_an_integrity_error_naming_it(where, s3, nginx, data):
    pytest.importorskip("torch")
    from loaders import StreamingLoader

    name = f"deleted-{where}.zarr"
    url, options, fs, prefix = damageable_store(where, name, s3, nginx, data)
    loader = StreamingLoader(  # no cache: a batch's samples read for it (a cache would hold them all by now)
        url, batch_size=256, prefetch=1, backend="torch", device="cpu", storage_options=options, cache=False
    )
    epoch = iter(loader)
    next(epoch)  # every shard's index is cached now: a shuffled batch of 256 touches all 12
    fs.rm(f"{prefix}/x/c/4/0")
    with pytest.raises(IntegrityError, match=f"array 'x': shard object .*{name}/x/c/4/0.* is missing"):
        for _ in epoch:
            pass


def test_s3_reads_keep_as_many_connections_as_the_plan_has_requests_in_flight(s3, s3_store):
    # s3fs alone keeps 10: a read of a few hundred ranges would wait on round trips
    assert s3_store.storage_options["config_kwargs"] == {"max_pool_connections": S3_CONNECTIONS}
    fs, _ = s3_store.filesystem()
    assert fs.config_kwargs["max_pool_connections"] == S3_CONNECTIONS
    given = {**s3.storage_options, "config_kwargs": {"max_pool_connections": 4, "retries": {"max_attempts": 2}}}
    mine = open_dataset(s3_store.url, storage_options=given)
    assert mine.storage_options["config_kwargs"] == given["config_kwargs"]  # the user's own are kept
    assert mine.filesystem()[0].config_kwargs["max_pool_connections"] == 4


@pytest.mark.parametrize("where", ["s3", "http"])
@pytest.mark.parametrize("keep", [100, 0])
def test_a_shard_object_cut_short_remotely_is_damage_naming_it_for_reads_and_verify(where, keep, s3, nginx, data):
    # A range past a cut object's end is refused (S3's InvalidRange, HTTP's 416), where a local file
    # answers it short: the object's size against the manifest's tells it is damage, not a failed read.
    name = f"cut-{where}-{keep}.zarr"
    url, options, fs, prefix = damageable_store(where, name, s3, nginx, data)
    fs.pipe(f"{prefix}/x/c/2/0", fs.cat(f"{prefix}/x/c/2/0")[:keep])
    dataset = open_dataset(url, storage_options=options)
    written = dataset.manifest.nbytes["x"][2]
    cut_short = rf"array 'x': shard object .*{name}/x/c/2/0' \(samples 512..767\) is cut short: {keep} of the"
    with pytest.raises(IntegrityError, match=rf"{cut_short} {written} bytes written") as raised:
        SelectiveReader(dataset, ["x"]).read([600, 3])
    assert raised.value.ids == (600,)
    damages = verify_dataset(open_dataset(url, storage_options=options), progress=False)
    assert [(d.array, d.shard, d.problem) for d in damages] == [
        ("x", 2, f"is cut short: {keep} of the {written} bytes written")
    ]


def test_a_server_that_ignores_byte_ranges_is_named_and_no_sample_is_taken_for_damaged(tmp_path, data):
    # Python's http.server answers every GET with the whole file: that is the server, not the store.
    import functools
    import http.server
    import threading

    write_dataset(str(tmp_path / "ds.zarr"), batches(data), shard_samples=SHARD)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/ds.zarr"
        with pytest.raises(OSError, match=r"bytes came back for a range of \d+ .* does not serve byte ranges") as e:
            SelectiveReader(open_dataset(url), ["x"]).read([600])
        assert not isinstance(e.value, IntegrityError)
        torch = pytest.importorskip("torch")
        from loaders import StreamingLoader

        loader = StreamingLoader(url, batch_size=64, backend="torch", device="cpu", on_error="skip", cache=False)
        with pytest.raises(OSError, match="does not serve byte ranges"):  # skipped, it was every sample
            next(iter(loader))
        del torch
    finally:
        server.shutdown()
        server.server_close()


def test_the_command_line_without_credentials_says_so_in_one_line(s3, s3_store, tmp_path):
    # botocore's NoCredentialsError is no OSError: info (its probe for a selection), convert and a
    # selection saved to S3 printed tracebacks
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=s3.endpoint,
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",  # no instance metadata service: 127.0.0.1 is the only target
        PYTHONPATH=str(Path(__file__).parents[3]),
    )
    for argv in (
        ["info", s3_store.url],
        ["convert", "digits", "s3://nearstore-test/new.zarr"],
        ["info", "s3://nearstore-test/round0.npz"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "nearstore.app.cli", *argv], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert re.search(f"nearstore {argv[0]}: error: .*NoCredentialsError: Unable to locate credentials", done.stderr)


def test_a_url_through_fsspecs_caching_layers_warns_that_io_stats_count_above_them(id_store_url, caplog):
    # simplecache:: fetched the whole store for a 1% selection while io_stats said 97% saved
    dataset = open_dataset(f"simplecache::file://{id_store_url}")
    assert dataset.num_samples == 2500
    assert "read through fsspec's simplecache, which fetches whole objects" in caplog.text
    caplog.clear()
    open_dataset(id_store_url)
    assert "fsspec's" not in caplog.text


def test_an_error_is_restated_where_it_happened_whatever_its_class_takes():
    # botocore's errors take keyword arguments only: restating one as type(e)(message) raised KeyError
    from botocore.exceptions import ReadTimeoutError

    from nearstore.errors import restated

    timeout = ReadTimeoutError(endpoint_url="http://127.0.0.1:1")
    said = restated(timeout, f"a Dask worker could not open the dataset: {timeout}")
    assert type(said) is OSError and "could not open the dataset: Read timeout" in str(said)
    assert type(restated(FileNotFoundError("x"), "where: x")) is FileNotFoundError
    assert type(restated(DatasetError("x"), "where: x")) is DatasetError
