"""A ChunkCache shared by readers: each inner chunk read from storage once while it is held, within
its budget, least recently used out first."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from conftest import SHARD_SAMPLES, flip, shard_file

from nearstore import Coalescing, Dataset, IntegrityError, ParameterError, SelectiveReader, open_dataset
from nearstore.storage import ChunkCache
from nearstore.storage.dataset import SHORT_READ_BACKOFF

SAMPLE_BYTES = 8 * 4 + 4  # x of the id store: a sample an inner chunk, raw, and its crc32c


def test_readers_sharing_a_cache_read_each_chunk_once(id_store, id_data):
    cache = ChunkCache(1 << 20)
    ids = np.random.default_rng(0).choice(2500, 300, replace=False)
    first = SelectiveReader(id_store, ["x"], reads=Coalescing(0), cache=cache)
    np.testing.assert_array_equal(first.read(ids)["x"], id_data["x"][ids])
    assert first.stats.bytes > len(ids) * SAMPLE_BYTES  # its samples and the shard indexes
    second = SelectiveReader(id_store, ["x"], reads=Coalescing(0), cache=cache)
    again = ids[::-1]
    np.testing.assert_array_equal(second.read(again)["x"], id_data["x"][again])
    assert second.stats.requests == 0 and second.stats.bytes == 0
    more = np.concatenate([ids[:50], np.setdiff1d(np.arange(10), ids)])  # some held, some not
    np.testing.assert_array_equal(second.read(more)["x"], id_data["x"][more])
    assert second.stats.bytes == (len(more) - 50) * SAMPLE_BYTES
    assert cache.as_dict() == {
        "budget": 1 << 20,
        "bytes": (len(more) - 50 + len(ids)) * SAMPLE_BYTES,
        "chunks": len(more) - 50 + len(ids),
        "hits": len(ids) + 50,
        "misses": len(more) - 50 + len(ids),
    }


def test_the_budget_holds_and_the_least_recently_used_leave_first(id_store, id_data):
    cache = ChunkCache(10 * SAMPLE_BYTES)
    reader = SelectiveReader(id_store, ["x"], reads=Coalescing(0), cache=cache)
    reader.read(np.arange(20))
    assert cache.nbytes == 10 * SAMPLE_BYTES  # the last 10 put
    before = reader.stats.snapshot()
    reader.read(np.arange(10, 20))
    assert (reader.stats.snapshot() - before).requests == 0
    reader.read(np.array([10, 11]))  # now the most recently used: 12-19 leave first
    reader.read(np.arange(30, 38))
    assert cache.nbytes <= cache.budget
    before = reader.stats.snapshot()
    np.testing.assert_array_equal(reader.read(np.array([10, 11, 30, 37]))["x"], id_data["x"][[10, 11, 30, 37]])
    assert (reader.stats.snapshot() - before).requests == 0
    reader.read(np.array([12]))
    assert (reader.stats.snapshot() - before).requests == 1


def test_a_chunk_larger_than_the_budget_is_not_held():
    cache = ChunkCache(4)
    cache.put([(("shard", 0, 5), b"12345"), (("shard", 5, 4), b"1234")])
    assert cache.get([("shard", 0, 5), ("shard", 5, 4)]) == [None, b"1234"]
    assert cache.nbytes == 4


@pytest.mark.parametrize("budget", [0, -1, 1.5, True])
def test_a_budget_that_is_no_positive_byte_count_is_refused(budget):
    with pytest.raises(ParameterError, match="budget"):
        ChunkCache(budget)


def test_a_claim_gives_the_caller_the_chunks_neither_held_nor_claimed():
    cache = ChunkCache(1 << 10)
    held, a, b, c = ("shard", 0, 4), ("shard", 4, 4), ("shard", 8, 4), ("shard", 12, 4)
    cache.put([(held, b"1234")])
    ours, others = cache.claim([held, a, b])
    assert ours == [False, True, True] and others == []
    theirs, waits = cache.claim([a, c])
    assert theirs == [False, True] and len(waits) == 1 and not waits[0].is_set()
    cache.release([a, b])
    assert waits[0].is_set()
    again, waits = cache.claim([a, c])
    assert again == [True, False] and len(waits) == 1  # c is still the second claim's


class MissTogether(ChunkCache):
    """A ChunkCache whose readers' first lookups or claims end together: every read has missed
    (or claimed) before any has fetched, as reads started at once by trainers starting together."""

    def __init__(self, budget: int, readers: int) -> None:
        super().__init__(budget)
        self.together = threading.Barrier(readers, timeout=20)
        self.asked = threading.local()

    def get(self, keys):
        found = super().get(keys)
        self._first_together()
        return found

    def claim(self, keys):
        claimed = super().claim(keys)
        self._first_together()
        return claimed

    def _first_together(self) -> None:
        if not getattr(self.asked, "once", False):
            self.asked.once = True
            self.together.wait()


@pytest.fixture(scope="module")
def http_ids(nginx, id_store_url) -> tuple[str, str]:
    """A copy of the id store served by nginx: (its URL, its directory)."""
    root = nginx.root / "cached-ids.zarr"
    shutil.copytree(id_store_url, root)
    return f"{nginx.url}/cached-ids.zarr", str(root)


def indexed(url: str) -> Dataset:
    """The dataset at `url`, opened, with every shard index of "x" read."""
    dataset = open_dataset(url)
    SelectiveReader(dataset, ["x"]).read(np.arange(0, dataset.num_samples, SHARD_SAMPLES))
    return dataset


def read_at_once(dataset: Dataset, cache: ChunkCache, wanted: list[np.ndarray]) -> list:
    """Each of `wanted` read from "x" in a thread of its own by a reader sharing `cache`: each
    read's arrays, or the error it raised. Fails, not hangs, where a read is left waiting."""
    readers = [SelectiveReader(dataset, ["x"], reads=Coalescing(0), cache=cache) for _ in wanted]
    got: list = [None] * len(wanted)

    def read(k: int) -> None:
        try:
            got[k] = readers[k].read(wanted[k])
        except Exception as e:
            got[k] = e

    threads = [threading.Thread(target=read, args=(k,), daemon=True) for k in range(len(wanted))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a read still waits for a fetch that ended"
    return got


@pytest.mark.parametrize("overlap", [False, True], ids=["the same ids", "overlapping ids"])
def test_readers_missing_the_same_chunks_at_once_fetch_each_once(nginx, http_ids, id_data, overlap):
    url, _ = http_ids
    ids = np.random.default_rng(0).choice(2500, 600, replace=False)
    wanted = [ids[k * 100 : k * 100 + 300] if overlap else ids[::-1] for k in range(4)]
    dataset = indexed(url)
    nginx.clear()
    got = read_at_once(dataset, MissTogether(1 << 20, len(wanted)), wanted)
    for read, arrays in zip(wanted, got):
        np.testing.assert_array_equal(arrays["x"], id_data["x"][read])
    # a sample an inner chunk, each fetched once (without waiting: once a reader, 4x)
    assert nginx.books().bytes("/cached-ids.zarr/x/c/") == len(np.unique(np.concatenate(wanted))) * SAMPLE_BYTES


def test_readers_wanting_a_shard_whole_at_once_fetch_it_once(nginx, http_ids, id_data):
    url, root = http_ids
    shard = np.arange(SHARD_SAMPLES, 2 * SHARD_SAMPLES)
    dataset = open_dataset(url)  # no index read yet: a shard wanted whole comes with its index
    nginx.clear()
    got = read_at_once(dataset, MissTogether(1 << 20, 4), [shard] * 4)
    for arrays in got:
        np.testing.assert_array_equal(arrays["x"], id_data["x"][shard])
    # one read fetched the object, the others waited for its index and took its chunks (4x before)
    assert nginx.books().bytes("/cached-ids.zarr/x/c/") == shard_file(root, "x", 1).stat().st_size


@pytest.mark.parametrize("damage", ["sample", "index"])
def test_a_fetch_that_fails_its_checks_lets_its_waiters_fetch_and_check_for_themselves(nginx, http_ids, damage):
    url, root = http_ids
    shard = shard_file(root, "x", 1)
    whole = shard.read_bytes()
    flip(shard, 7 * SAMPLE_BYTES + 5 if damage == "sample" else -10)  # in sample 256 + 7's payload, or the index
    try:
        wanted = [np.array([3, 256 + 7, 600])] * 3
        # the reads claim the chunks (the indexes read before), or the indexes
        dataset = indexed(url) if damage == "sample" else open_dataset(url)
        nginx.clear()
        cache = MissTogether(1 << 20, len(wanted))
        got = read_at_once(dataset, cache, wanted)
    finally:
        shard.write_bytes(whole)
    problem = "1 damaged samples" if damage == "sample" else "damaged index"
    for error in got:
        assert isinstance(error, IntegrityError) and error.ids == (256 + 7,) and problem in str(error)
    # the one read that fetched failed and shared nothing: each waiter fetched and checked for itself
    # (an index that fails its checks is asked again, SHORT_READ_BACKOFF, before it is damage)
    asks = 1 if damage == "sample" else 1 + len(SHORT_READ_BACKOFF)
    assert len(nginx.books().gets("/cached-ids.zarr/x/c/1/")) == asks * len(wanted)
    assert cache.nbytes == 0
