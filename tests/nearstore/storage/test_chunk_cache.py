"""A ChunkCache shared by readers: each inner chunk read from storage once while it is held, within
its budget, least recently used out first."""

from __future__ import annotations

import numpy as np
import pytest

from nearstore import Coalescing, ParameterError, SelectiveReader
from nearstore.storage import ChunkCache

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
