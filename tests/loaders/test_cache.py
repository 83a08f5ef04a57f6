from __future__ import annotations

import errno
import gc
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from images import NUM_IMAGES, SHARD_SAMPLES, image_store, photo
from resume import assert_resumes_at_every_batch

from loaders import StreamingLoader
from loaders import cache as cache_module
from loaders.cache import SampleCache
from nearstore import ParameterError, random_select, write_dataset


def sample_ids(x: torch.Tensor) -> list[int]:
    """The id-encoded store's x[i, 0] is i."""
    return x[:, 0].round().long().tolist()


def epoch(loader: StreamingLoader) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in loader]


def test_a_round_reads_each_selected_sample_once(id_store, id_data):
    selection = random_select(id_store, 0.2, seed=3)  # 500 of 2,500, in 10 shards
    cached = StreamingLoader(id_store, selection, batch_size=64, backend="torch", device="cpu", seed=4)
    plain = StreamingLoader(id_store, selection, batch_size=64, backend="torch", device="cpu", seed=4, cache=False)
    for _ in range(3):  # the same batches as reading storage, epoch after epoch
        ours, theirs = epoch(cached), epoch(plain)
        assert len(ours) == len(theirs)
        for (x, y), (x2, y2) in zip(ours, theirs):
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)
            np.testing.assert_array_equal(x, id_data["x"][sample_ids(torch.from_numpy(x))])
    first, *later = cached.io_stats()["per_epoch"]
    assert first["requests"] > 0 and first["samples"] >= 500
    assert all(e["bytes"] == e["requests"] == 0 and e["cache_hits"] == 500 for e in later)
    stats = cached.io_stats()["cache"]
    # every visit of the first epoch a miss (its sample read for it, alone or with a shard mate's)
    assert (stats["hits"], stats["misses"]) == (1000, 500)
    assert stats["samples"] == 500 and stats["memory_bytes"] == 500 * (8 * 4 + 8)
    # each hit is worth what its sample cost when it was read: its inputs, and its labels where a
    # batch read them (they are read ahead, a few shards a request, beside the first batches)
    labels = id_store.stored_nbytes(["y"])
    assert 2 * (first["bytes"] - labels) * 0.99 <= stats["bytes_saved"] <= 2 * first["bytes"] * 1.01
    # a shard is read once a round (x's index and samples; the labels whole, kept), where a batch at
    # a time reads it again
    assert first["requests"] == 3 * id_store.num_shards < plain.io_stats()["per_epoch"][0]["requests"]


def test_a_new_round_reads_only_what_it_adds(id_store):
    old = random_select(id_store, 0.2, seed=3)
    loader = StreamingLoader(id_store, old, batch_size=100, backend="torch", device="cpu")
    epoch(loader)
    new = random_select(id_store, 0.2, seed=9)
    loader.reselect(method="random", seed=9)
    np.testing.assert_array_equal(loader.ids, new.ids)
    epoch(loader)
    stats = loader.io_stats()
    added = len(np.setdiff1d(new.ids, old.ids))
    assert 0 < added < len(new.ids)
    assert stats["per_epoch"][1]["samples"] == added  # what the rounds share is not read again
    assert stats["cache"]["samples"] == len(new.ids)  # what the old round alone held is let go


def test_past_its_budget_the_cache_keeps_what_fits_and_reads_the_rest(id_store, id_data):
    selection = random_select(id_store, 0.2, seed=3)
    row = 8 * 4 + 8
    loader = StreamingLoader(
        id_store, selection, batch_size=64, backend="torch", device="cpu", cache=SampleCache(memory_bytes=200 * row)
    )
    for _ in range(3):
        seen = [i for x, _ in loader for i in sample_ids(x)]
        assert sorted(seen) == selection.ids.tolist()
    stats = loader.io_stats()
    assert stats["cache"]["samples"] == 200 and stats["cache"]["memory_bytes"] == 200 * row
    assert [e["cache_hits"] for e in stats["per_epoch"][1:]] == [200, 200]
    assert all(e["samples"] == 300 for e in stats["per_epoch"][1:])  # the rest, read every epoch


@pytest.mark.parametrize("kept", [10, 100])  # samples: fewer than a batch, more
def test_a_budget_reads_no_shard_mate_it_cannot_keep(id_store, kept):
    selection = random_select(id_store, 0.3, seed=1)  # 750 samples
    row = 8 * 4 + 8
    cache = SampleCache(memory_bytes=kept * row)
    loader = StreamingLoader(id_store, selection, batch_size=64, backend="torch", device="cpu", cache=cache)
    epoch(loader), epoch(loader)
    # each sample read once in the first epoch (the mates that fit kept, not the batch's own, which
    # are delivered already), then all but those kept
    assert [e["samples"] for e in loader.io_stats()["per_epoch"]] == [750, 750 - kept]


@pytest.mark.parametrize("kind", ["encoded", "ragged"])
def test_a_budget_reads_no_shard_mate_it_cannot_keep_where_sizes_vary(tmp_path, kind):
    rng = np.random.default_rng(0)
    samples = np.empty(NUM_IMAGES, dtype=object)  # labelled by their ids
    if kind == "encoded":
        samples[:] = [photo(i) for i in range(NUM_IMAGES)]
    else:  # token ids of any length, as a tokenizer's: zstd saves little on them
        samples[:] = [rng.integers(0, 50_000, rng.integers(1, 300)).astype(np.int32) for _ in range(NUM_IMAGES)]
    dataset = write_dataset(
        str(tmp_path / "d.zarr"), [{"x": samples, "y": np.arange(NUM_IMAGES)}], shard_samples=SHARD_SAMPLES
    )
    selection = rng.choice(NUM_IMAGES, NUM_IMAGES // 2, replace=False)  # each shard's half
    mean = np.mean([len(s) if kind == "encoded" else s.nbytes for s in samples]) + 8
    options = dict(batch_size=16, backend="torch", device="cpu", seed=2)
    loader = StreamingLoader(dataset, selection, **options, cache=SampleCache(memory_bytes=int(5 * mean)))
    plain = StreamingLoader(dataset, selection, **options, cache=False)
    for each in (loader, plain):
        assert sorted(i for _, y in each for i in y.tolist()) == sorted(selection.tolist())
    # a few samples kept, and about each read once: not every visited mate of the first batch's
    # shards read along, most of them dropped and read again at their visit
    first, read_once = loader.io_stats()["per_epoch"][0], plain.io_stats()["per_epoch"][0]
    assert 3 <= loader.io_stats()["cache"]["samples"] <= 10
    assert first["samples"] <= len(selection) + 10 and first["bytes"] < 1.05 * read_once["bytes"]


def test_a_spill_directory_inside_the_dataset_is_refused(tmp_path, id_store_url, fingerprint):
    # the store is read-only to us: a cache spilling into it wrote files there (left by a killed run)
    store = shutil.copytree(id_store_url, tmp_path / "ids.zarr")
    before = fingerprint(store)
    cache = SampleCache(memory_bytes=0, directory=store / "x", disk_bytes=1 << 20)
    with pytest.raises(ParameterError, match=r"the sample cache's directory '.*ids.zarr/x/nearstore-cache-.*' lies"):
        StreamingLoader(str(store), batch_size=64, backend="torch", device="cpu", cache=cache)
    del cache
    gc.collect()
    assert fingerprint(store) == before


def test_it_spills_to_a_directory_of_its_own_and_removes_it(id_store, tmp_path):
    selection = random_select(id_store, 0.2, seed=3)
    row = 8 * 4 + 8
    cache = SampleCache(memory_bytes=100 * row, directory=tmp_path, disk_bytes=300 * row)
    loader = StreamingLoader(id_store, selection, batch_size=64, backend="torch", device="cpu", cache=cache)
    epochs = [sorted(i for x, _ in loader for i in sample_ids(x)) for _ in range(2)]
    assert epochs == [selection.ids.tolist()] * 2
    stats = loader.io_stats()["cache"]
    assert (stats["memory_bytes"], stats["disk_bytes"]) == (100 * row, 300 * row)
    assert loader.io_stats()["per_epoch"][1]["samples"] == 100  # 500 selected, 400 kept
    assert len(os.listdir(tmp_path)) == 1
    del loader, cache
    assert os.listdir(tmp_path) == []


def test_encoded_samples_are_kept_in_memory_and_on_disk(tmp_path):
    dataset, blobs = image_store(str(tmp_path / "images.zarr"))
    sizes = sorted(len(b) for b in blobs)
    cache = SampleCache(memory_bytes=sum(sizes[:50]), directory=tmp_path, disk_bytes=sum(sizes) * 2)
    loader = StreamingLoader(dataset, batch_size=32, backend="torch", device="cpu", cache=cache, seed=1)
    plain = StreamingLoader(dataset, batch_size=32, backend="torch", device="cpu", cache=False, seed=1)
    for _ in range(2):
        for (x, y), (x2, y2) in zip(list(loader), list(plain)):  # lists: zip would leave `plain` unfinished
            torch.testing.assert_close(x, x2)
            torch.testing.assert_close(y, y2)
    stats = loader.io_stats()
    assert stats["per_epoch"][1]["bytes"] == 0 and stats["cache"]["hits"] == len(blobs)
    assert 0 < stats["cache"]["memory_bytes"] <= sum(sizes[:50]) and stats["cache"]["disk_bytes"] > 0


def test_warm_epochs_fill_it_and_the_selection_keeps_its_part(id_store):
    selection = random_select(id_store, 0.1, seed=2)
    loader = StreamingLoader(id_store, selection, batch_size=128, backend="torch", device="cpu", warm_start_epochs=1)
    epoch(loader)
    assert loader.io_stats()["cache"]["samples"] == id_store.num_samples
    epoch(loader)
    stats = loader.io_stats()
    assert stats["per_epoch"][1]["bytes"] == 0 and stats["cache"]["samples"] == len(selection.ids)


@pytest.mark.parametrize("shuffle", [True, "shards", False])
def test_resume_is_exact_with_the_cache_and_every_shuffle(id_store, shuffle):
    selection = random_select(id_store, 0.3, seed=1)

    def make() -> StreamingLoader:
        return StreamingLoader(
            id_store,
            selection,
            batch_size=64,
            shuffle=shuffle,
            shuffle_block=200,
            backend="torch",
            device="cpu",
            seed=3,
        )

    assert_resumes_at_every_batch(make, epochs=2)


def test_a_shards_shuffle_reads_a_block_of_shards_at_a_time(id_store):
    selection = random_select(id_store, 0.5, seed=1)  # 1,250 samples in 10 shards of 256
    loader = StreamingLoader(
        id_store,
        selection,
        batch_size=50,
        shuffle="shards",
        shuffle_block=250,
        prefetch=1,
        backend="torch",
        device="cpu",
    )
    batches = iter(loader)
    next(batches)
    # the first batch's block: a shard or two of the ten read, where a global shuffle reads them all
    assert loader.io_stats()["cache"]["samples"] <= 2 * 128 + 50
    rest = [i for x, _ in batches for i in sample_ids(x)]
    assert len(rest) == len(selection.ids) - 50


def test_damaged_shard_mates_do_not_fail_a_sound_batch(tmp_path, id_data):
    from nearstore import write_dataset

    dataset = write_dataset(str(tmp_path / "d.zarr"), [id_data], shard_samples=256, chunk_samples=1)
    # sample 5's chunk damaged: a batch of shard 0 without it reads whole; the one with it fails by name
    path = os.path.join(dataset.url, "x", "c", "0", "0")
    raw = bytearray(open(path, "rb").read())
    raw[5 * 36 + 3] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    loader = StreamingLoader(dataset, [1, 2, 5], batch_size=2, shuffle=False, backend="torch", device="cpu")
    batches = iter(loader)
    assert sample_ids(next(batches)[0]) == [1, 2]
    with pytest.raises(Exception, match="5"):
        next(batches)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory_bytes": -1}, "memory_bytes must be an integer >= 0"),
        ({"disk_bytes": 10}, "disk_bytes needs a directory"),
        ({"directory": "/nonexistent/dir"}, "is not a directory"),
        ({"directory": "/tmp"}, "directory='/tmp' needs disk_bytes=, the bytes it may spill there"),  # spilled none
    ],
)
def test_bad_budgets_are_named(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        SampleCache(**kwargs)


@pytest.mark.parametrize("error", [errno.EACCES, errno.EROFS])
def test_a_spill_directory_it_cannot_write_to_is_named_by_the_cache(tmp_path, monkeypatch, error):
    def refused(prefix: str, dir: str) -> str:  # the OS's answer: root writes through a directory's modes
        raise OSError(error, os.strerror(error), os.path.join(dir, prefix))

    monkeypatch.setattr(cache_module.tempfile, "mkdtemp", refused)
    message = f"cache directory '{tmp_path}' (directory=) cannot be written to: {os.strerror(error)}"
    with pytest.raises(ParameterError, match=re.escape(message)):
        SampleCache(directory=tmp_path, disk_bytes=1 << 20)
    monkeypatch.undo()

    def full(path: str, mode: str) -> None:  # the directory made, its owner file not: a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(cache_module, "open", full, raising=False)
    with pytest.raises(ParameterError, match="cannot be written to: No space left on device"):
        SampleCache(directory=tmp_path, disk_bytes=1 << 20)
    assert list(tmp_path.iterdir()) == []  # no folder without an owner, which no sweep removes


def test_a_cache_serves_one_loader_at_a_time(id_store):
    cache = SampleCache()
    first = StreamingLoader(id_store, np.arange(0, 2500, 2), batch_size=8, backend="torch", cache=cache)
    with pytest.raises(ParameterError, match="serves another loader"):  # each epoch would evict the other's
        StreamingLoader(id_store, np.arange(1, 2500, 2), batch_size=8, backend="torch", cache=cache)
    del first
    gc.collect()
    StreamingLoader(id_store, np.arange(1, 2500, 2), batch_size=8, backend="torch", cache=cache)  # its successor


def test_a_closed_loader_hands_its_cache_over_at_once_a_read_in_flight_too(id_store, monkeypatch):
    # `del` with a read in flight left the loader alive (the read holds it): its successor was
    # refused or not by timing; close() waits for the read and lets go of the cache
    cache = SampleCache()
    first = StreamingLoader(id_store, np.arange(0, 2500, 2), batch_size=8, backend="torch", cache=cache)
    read = first.source.read
    monkeypatch.setattr(first.source, "read", lambda *a, **k: (time.sleep(0.2), read(*a, **k))[1])
    running = iter(first)
    next(running)  # the next batches' reads under way
    first.close()
    with pytest.raises(RuntimeError, match="was closed mid-epoch"):  # its pool gone: an AttributeError
        next(running)
    successor = StreamingLoader(id_store, np.arange(1, 2500, 2), batch_size=8, backend="torch", cache=cache)
    assert sorted(i for x, _ in successor for i in sample_ids(x)) == list(range(1, 2500, 2))
    with pytest.raises(RuntimeError, match="was closed"):
        next(iter(first))
    with StreamingLoader(id_store, np.arange(2), batch_size=8, backend="torch") as loader:
        assert len(list(loader)) == 1
    assert loader._closed and loader._pool is None


def test_close_empties_the_cache_the_loader_made_not_one_handed_to_it(id_store, tmp_path):
    # a closed loader still referred to (a notebook's variables) held its own cache's samples: 82
    # MB a loader, up to the 1 GiB default each
    own = StreamingLoader(id_store, batch_size=64, backend="torch")
    sum(1 for _ in own)
    assert own.cache.samples == 2500 and own.cache.nbytes()[0] > 0
    running = iter(own)  # an epoch the cache holds whole is read in this thread, not the reader's
    next(running)
    own.close()
    with pytest.raises(RuntimeError, match="was closed mid-epoch"):  # it went on, refilling the cache
        next(running)
    own.close()  # once is enough; again does nothing
    assert own.cache.samples == 0 and own.cache.nbytes() == (0, 0)
    assert own.io_stats()["cache"]["misses"] == 2500  # its figures stay
    (tmp_path / "spill").mkdir()
    given = SampleCache(64 * 8, directory=tmp_path / "spill", disk_bytes=1 << 20)
    loader = StreamingLoader(id_store, batch_size=64, backend="torch", cache=given)
    sum(1 for _ in loader)
    loader.close()
    assert given.samples == 2500  # for its next loader, warm
    spill = Path(given.spill_directory)
    given.release()  # what close() does to a cache of the loader's own, on disk too
    assert given.samples == 0 and given.nbytes() == (0, 0) and [p.name for p in spill.iterdir()] == ["owner"]
    successor = StreamingLoader(id_store, batch_size=64, backend="torch", cache=given)
    for _ in range(2):
        assert sorted(i for x, _ in successor for i in sample_ids(x)) == list(range(2500))
    assert successor.io_stats()["per_epoch"][1]["bytes"] == 0  # the released cache keeps samples again


def _child_epoch(loader: StreamingLoader, results: multiprocessing.Queue) -> None:
    spill = loader.cache.spill_directory
    results.put((sorted(i for x, _ in loader for i in sample_ids(x)), spill, loader.cache.nbytes()))


def test_a_child_forked_after_the_loader_read_reads_its_epoch_and_leaves_the_parents_spill(id_store, tmp_path):
    # the reader thread is the parent's: the child's first batch waited for it forever; and the
    # child's cache spilled into (and when gone, removed) the parent's directory
    (tmp_path / "spill").mkdir()
    cache = SampleCache(64 * 8, directory=tmp_path / "spill", disk_bytes=1 << 20)  # 16 samples in memory
    loader = StreamingLoader(id_store, np.arange(0, 2500, 5), batch_size=64, backend="torch", cache=cache)
    parent = sorted(i for x, _ in loader for i in sample_ids(x))
    spilled = sorted(p.name for p in Path(cache.spill_directory).iterdir())
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    child = fork.Process(target=_child_epoch, args=(loader, results))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    ids, spill, (memory, disk) = results.get(timeout=10)
    assert ids == parent and spill is None and disk == 0 and memory > 0  # what was in memory, kept
    assert sorted(p.name for p in Path(cache.spill_directory).iterdir()) == spilled
    hits = cache.stats.hits
    assert sorted(i for x, _ in loader for i in sample_ids(x)) == parent and cache.stats.hits == hits + 500


def test_a_cache_serves_one_dataset(id_store, tmp_path):
    from nearstore import write_dataset

    cache = SampleCache()
    StreamingLoader(id_store, batch_size=8, backend="torch", device="cpu", cache=cache)
    other = write_dataset(str(tmp_path / "o.zarr"), [{"x": np.zeros((10, 2), np.float32)}], label_array=None)
    with pytest.raises(ParameterError, match="another dataset"):
        StreamingLoader(other, batch_size=8, backend="torch", device="cpu", cache=cache)
    with pytest.raises(ParameterError, match="cache must be True, False or a SampleCache"):
        StreamingLoader(id_store, batch_size=8, cache="yes")


def test_samples_put_one_at_a_time_and_let_go_reuse_their_slots():
    cache = SampleCache(memory_bytes=64 * 8)
    cache.bind({"num_samples": 100, "url": "here"}, ["x"])
    rows = np.arange(100 * 2, dtype=np.float32).reshape(100, 2)
    for i in range(64):  # a slot a put: the rows grow by doubling, never by more
        cache.put(np.array([i]), {"x": rows[i : i + 1]}, 8.0, np.array([i]))
    assert not cache.full and cache.nbytes() == (64 * 8, 0)
    cache.retain(np.arange(0, 64, 2))  # half let go: their slots serve the next samples
    cache.put(np.arange(64, 96), {"x": rows[64:96]}, 8.0, np.arange(64, 96))
    assert not cache.full and cache.samples == 64
    kept = np.concatenate([np.arange(0, 64, 2), np.arange(64, 96)])
    np.testing.assert_array_equal(cache.get(kept)["x"], rows[kept])
    cache.put(np.array([99]), {"x": rows[99:]}, 8.0, np.array([99]))
    assert cache.full and not cache.holds(np.array([99]))[0]


def spilling_token_loader(tmp_path) -> tuple[StreamingLoader, SampleCache]:
    """A loader of 300 token sequences whose cache keeps them all on disk, a file a sample."""
    tokens = np.empty(300, dtype=object)
    tokens[:] = [np.full(i % 50 + 1, i, dtype=np.int32) for i in range(300)]
    store = write_dataset(str(tmp_path / "t.zarr"), [{"tok": tokens, "y": np.arange(300) % 3}], shard_samples=32)
    (tmp_path / "spill").mkdir()
    cache = SampleCache(0, directory=tmp_path / "spill", disk_bytes=1 << 20)
    return StreamingLoader(store, batch_size=16, backend="torch", device="cpu", cache=cache), cache


def test_a_spill_directory_lost_mid_epoch_costs_reads_not_the_epoch(tmp_path):
    loader, cache = spilling_token_loader(tmp_path)
    seen = [int(v[0]) for x, _ in loader for v in x.unbind()]
    for k, (x, _) in enumerate(loader):
        seen += [int(v[0]) for v in x.unbind()]
        if k == 2:
            for spilled in (tmp_path / "spill").iterdir():
                shutil.rmtree(spilled, ignore_errors=True)  # the cache, finding it gone, removes its files too
    assert sorted(seen) == sorted(list(range(300)) * 2)
    assert cache.nbytes() == (0, 0)  # the disk tier dropped


def test_a_spill_directory_lost_between_rounds_costs_reads_not_every_epoch_after(tmp_path):
    # the next round let go of samples spilled there: unlinking them failed, and so did every epoch
    loader, cache = spilling_token_loader(tmp_path)
    assert len([x for x, _ in loader]) == 19 and cache.nbytes()[1] > 0
    for spilled in (tmp_path / "spill").iterdir():
        shutil.rmtree(spilled)
    new = loader.reselect(0.5, method="random", seed=1)
    for _ in range(2):
        assert sorted(int(v[0]) for x, _ in loader for v in x.unbind()) == new.ids.tolist()
    assert cache.nbytes() == (0, 0)  # the disk tier dropped


def test_a_disk_budget_past_the_room_there_is_is_cut_to_it(id_store, tmp_path, monkeypatch, caplog):
    room = shutil.disk_usage(tmp_path)._replace(free=cache_module.DISK_MARGIN + 4096)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: room)  # a write past it: SIGBUS
    cache = SampleCache(0, directory=tmp_path, disk_bytes=1 << 30)
    loader = StreamingLoader(id_store, batch_size=100, backend="torch", device="cpu", cache=cache)
    assert len([x for x, _ in loader]) == 25 and 0 < cache.nbytes()[1] <= 4096
    assert "has room for 4096 of disk_bytes=1073741824 bytes" in caplog.text


def test_a_disk_that_fills_after_the_cache_measured_it_costs_reads_not_the_process(id_store, tmp_path, monkeypatch):
    # rows went into a memory-mapped file: another cache or job filling the disk killed the
    # trainer (SIGBUS); written by pwrite, the full disk is an OSError that drops the tier
    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module.os, "pwrite", full)
    cache = SampleCache(0, directory=tmp_path, disk_bytes=1 << 20)
    loader = StreamingLoader(id_store, batch_size=100, backend="torch", device="cpu", cache=cache)
    for _ in range(2):
        assert sorted(i for x, _ in loader for i in sample_ids(x)) == list(range(2500))
    assert cache.nbytes() == (0, 0) and loader.io_stats()["per_epoch"][1]["samples"] == 2500


def test_a_disk_that_fills_mid_batch_costs_reads_not_samples_and_keeps_no_files(
    id_store, id_data, tmp_path, monkeypatch
):
    # a batch of samples held in memory, on disk and not at all: the put that filled the disk
    # dropped the disk tier after the batch counted its samples kept, and one sample held in
    # memory was handed out for every one the disk had held (or a KeyError ended the epoch)
    (tmp_path / "spill").mkdir()
    cache = SampleCache(8 * 4 + 8, directory=tmp_path / "spill", disk_bytes=1 << 20)  # one sample in memory
    first = StreamingLoader(id_store, np.arange(1000), batch_size=1000, shuffle=False, backend="torch", cache=cache)
    assert sum(len(y) for _, y in first) == 1000 and cache.nbytes()[1] > 0
    first.close()

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module.os, "pwrite", full)
    ids = np.r_[0:60, 1000:1040]  # 0 in memory, 1-59 on disk, 1000-1039 read, then put: ENOSPC
    second = StreamingLoader(id_store, ids, batch_size=100, shuffle=False, backend="torch", cache=cache)
    ((x, y),) = list(second)
    assert sample_ids(x) == ids.tolist()
    np.testing.assert_array_equal(x.numpy(), id_data["x"][ids])
    assert cache.nbytes()[1] == 0 and [p.name for p in Path(cache.spill_directory).iterdir()] == ["owner"]


def test_spill_directories_of_processes_that_are_gone_are_removed(tmp_path):
    # a process stopped by SIGTERM (SLURM, torchrun) never removes its own: they piled up, counted as used
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    for name, owner in [("gone", f"{host} {gone.stdout.strip()}"), ("alive", f"{host} {os.getpid()}")]:
        (tmp_path / f"nearstore-cache-{name}").mkdir()
        (tmp_path / f"nearstore-cache-{name}" / "owner").write_text(owner)
    (tmp_path / "nearstore-cache-unowned").mkdir()  # a release before owners were written: kept
    (tmp_path / "nearstore-cache-elsewhere").mkdir()
    (tmp_path / "nearstore-cache-elsewhere" / "owner").write_text(f"another-{host} {gone.stdout.strip()}")
    cache = SampleCache(0, directory=tmp_path, disk_bytes=1 << 20)
    left = sorted(p.name for p in tmp_path.iterdir())
    own = os.path.basename(cache.spill_directory)
    assert left == sorted([own, "nearstore-cache-alive", "nearstore-cache-elsewhere", "nearstore-cache-unowned"])


@pytest.mark.parametrize("kind", ["fixed", "encoded"])
def test_a_spilled_sample_changed_on_disk_is_read_again_not_delivered(tmp_path, id_store, id_data, kind):
    # the crc32c the store guarantees holds through the cache: a changed byte came back as data
    if kind == "encoded":
        tokens = np.empty(300, dtype=object)
        tokens[:] = [np.full(i % 50 + 1, i, dtype=np.int32) for i in range(300)]  # a file a sample
        store = write_dataset(str(tmp_path / "t.zarr"), [{"tok": tokens, "y": np.arange(300) % 3}], shard_samples=32)
    else:
        store = id_store

    def check(batches: list) -> int:
        for x, _ in batches:
            if kind == "encoded":
                assert all(len(v) == int(v[0]) % 50 + 1 and (v == v[0]).all() for v in x.unbind())
            else:
                np.testing.assert_array_equal(x.numpy(), id_data["x"][sample_ids(x)])
        return sum(len(x) for x, _ in batches)

    (tmp_path / "spill").mkdir()
    cache = SampleCache(0, directory=tmp_path / "spill", disk_bytes=1 << 24)
    loader = StreamingLoader(store, batch_size=16, backend="torch", device="cpu", cache=cache)
    size = check(list(loader))
    for path in Path(cache.spill_directory).iterdir():
        if path.suffix == ".rows":  # rows of fixed-size samples: the first five changed
            rows = np.load(path, mmap_mode="r+")
            rows[:5] += 1
            rows.flush()
        elif path.suffix == ".bin":  # an encoded sample's file, cut short
            path.write_bytes(path.read_bytes()[:-1])
    assert check(list(loader)) == size
    assert cache.nbytes()[1] == 0  # the disk tier dropped: what it kept was read from the store
    assert loader.io_stats()["per_epoch"][1]["samples"] > 0
