"""The fast path: which backend "auto" takes, and epochs the cache holds whole read in the trainer's
thread, with the same batches as reading storage every epoch."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from images import image_store

from loaders import StreamingLoader
from loaders.cache import SampleCache
from loaders.dali_pipeline import dali_available
from nearstore import random_select

needs_dali = pytest.mark.skipif(not dali_available(), reason="needs DALI")


def sample_ids(x: torch.Tensor) -> list[int]:
    """The id-encoded store's x[i, 0] is i."""
    return x[:, 0].round().long().tolist()


def test_auto_takes_torch_for_fixed_size_samples(id_store):
    assert StreamingLoader(id_store, device="cpu").backend == "torch"


@needs_dali
def test_auto_takes_dali_to_decode_images_or_run_a_dali_transform(id_store, tmp_path):
    images, _ = image_store(str(tmp_path / "images.zarr"))
    assert StreamingLoader(images, device="cpu").backend == "dali"
    assert StreamingLoader(id_store, device="cpu", dali_transform=lambda x: x).backend == "dali"
    assert StreamingLoader(images, device="cpu", backend="torch").backend == "torch"


def reading_threads(loader: StreamingLoader) -> list[set[str]]:
    """Run 3 epochs, recording for each the threads that read its batches."""
    threads: list[set[str]] = []
    read_batch = loader._read_batch

    def recorded(*args):
        threads[-1].add(threading.current_thread().name)
        return read_batch(*args)

    loader._read_batch = recorded
    for _ in range(3):
        threads.append(set())
        list(loader)
    return threads


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_epochs_the_cache_holds_are_read_in_the_trainers_thread_with_the_same_batches(id_store, backend):
    selection = random_select(id_store, 0.3, seed=1)
    cached = StreamingLoader(id_store, selection, batch_size=64, backend=backend, device="cpu", seed=3)
    plain = StreamingLoader(id_store, selection, batch_size=64, backend="torch", device="cpu", seed=3, cache=False)
    threads = reading_threads(cached)
    assert threads[0] == {"nearstore-read_0"} and threads[1] == threads[2] == {threading.current_thread().name}
    for epoch in (1, 2):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for a, b in zip(cached, plain, strict=True):
            for ta, tb in zip(a, b, strict=True):
                assert torch.equal(ta, tb)
    stats = cached.io_stats()
    assert [e["cache_hits"] for e in stats["per_epoch"]] == [0, 750, 750, 750, 750]
    assert all(e["bytes"] == 0 for e in stats["per_epoch"][1:])


def test_an_epoch_abandoned_in_the_reader_thread_then_one_from_the_cache(id_store):
    loader = StreamingLoader(id_store, np.arange(0, 2500, 3), batch_size=50, backend="torch", device="cpu", seed=1)
    list(loader)  # the cache holds the selection now
    loader.cache.retain(np.arange(0, 2500, 6))  # and half of it after this: the next epoch reads
    batches = iter(loader)
    next(batches)  # abandoned, its reader thread maybe still reading ahead
    loader.set_epoch(5)
    seen = [i for x, _ in loader for i in sample_ids(x)]  # all held: read here, after the reader stops
    assert sorted(seen) == list(range(0, 2500, 3))


def test_samples_spilled_to_disk_are_read_in_the_reader_thread(id_store, tmp_path):
    row = 8 * 4 + 8  # x float32 (8,) and an int64 label
    cache = SampleCache(memory_bytes=100 * row, directory=tmp_path, disk_bytes=1 << 20)
    loader = StreamingLoader(id_store, np.arange(500), batch_size=64, backend="torch", device="cpu", cache=cache)
    threads = reading_threads(loader)
    assert threads[1] == threads[2] == {"nearstore-read_0"}
    assert loader.io_stats()["per_epoch"][2]["bytes"] == 0
