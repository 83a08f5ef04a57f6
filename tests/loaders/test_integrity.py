"""The loader over a damaged store: an IntegrityError names the damage, or with on_error="skip"
exactly the damaged samples are left out, every other sample delivered once; a loader state of a
twin store (same shapes, other samples) is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARD_SAMPLES, id_encoded

from loaders import StreamingLoader
from nearstore import DatasetError, IntegrityError, open_dataset, write_dataset
from nearstore.serving import NearStoreServer


@pytest.fixture
def damaged(tmp_path, id_store_url) -> str:
    """A copy of the id store whose x shard 3 is deleted and y shard 6 cut short."""
    url = str(tmp_path / "ids.zarr")
    shutil.copytree(id_store_url, url)
    ds = open_dataset(url)
    Path(ds.shard_path("x", 3)).unlink()
    y6 = Path(ds.shard_path("y", 6))
    y6.write_bytes(y6.read_bytes()[:500])
    return url


def sample_ids(x: np.ndarray) -> list[int]:
    return np.floor(x[:, 0]).astype(int).tolist()  # x[i, 0] == i


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_damage_raises_by_default_naming_the_shard_object(damaged, backend):
    loader = StreamingLoader(damaged, batch_size=100, shuffle=True, backend=backend, device="cpu")
    with pytest.raises(IntegrityError, match=r"array '[xy]': shard object .*/[xy]/c/[36]"):
        for _ in loader:
            pass


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_skip_leaves_out_exactly_the_damaged_samples(damaged, backend):
    loader = StreamingLoader(
        damaged, batch_size=100, shuffle=True, on_error="skip", backend=backend, device="cpu", seed=1
    )
    seen = []
    for _ in range(2):
        for x, y in loader:
            ids = sample_ids(x.numpy())
            assert y.tolist() == [i % 5 for i in ids]  # every label its own sample's
            seen += ids
    lost = set(range(3 * SHARD_SAMPLES, 4 * SHARD_SAMPLES)) | set(range(6 * SHARD_SAMPLES, 7 * SHARD_SAMPLES))
    assert sorted(seen) == sorted(2 * [i for i in range(2500) if i not in lost])
    assert loader.io_stats()["skipped_samples"] == sorted(lost)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_batch_wholly_damaged_is_not_delivered_and_resume_stays_exact(damaged, backend):
    # In order, batches of a shard each: batch 3 is all of the deleted x shard 3.
    def loader():
        return StreamingLoader(
            damaged, batch_size=SHARD_SAMPLES, on_error="skip", backend=backend, device="cpu", shuffle=False
        )

    first = loader()
    epoch = iter(first)
    before = [sample_ids(next(epoch)[0].numpy()) for _ in range(3)]
    state = first.state_dict()
    rest = [sample_ids(x.numpy()) for x, _ in epoch]
    assert [b[0] for b in before + rest] == [0, 256, 512, 1024, 1280, 1792, 2048, 2304]  # no 768, and 1536 lost to y
    resumed = loader()
    resumed.load_state_dict(state)
    assert [sample_ids(x.numpy()) for x, _ in resumed] == rest


def test_a_state_of_a_twin_store_is_refused(tmp_path, id_store_url):
    twin_data = id_encoded()
    twin_data["x"] = twin_data["x"][::-1].copy()  # same N, shapes and dtypes: other samples
    twin = write_dataset(str(tmp_path / "twin.zarr"), [twin_data], shard_samples=SHARD_SAMPLES)
    state = StreamingLoader(twin.url, batch_size=100, backend="torch", device="cpu").state_dict()
    loader = StreamingLoader(id_store_url, batch_size=100, backend="torch", device="cpu")
    with pytest.raises(DatasetError, match="twin.zarr"):
        loader.load_state_dict(state)


def test_through_a_server_damage_is_named_without_its_paths_and_skipped_by_id(damaged):
    server = NearStoreServer(open_dataset(damaged), keep=1.0, method="random", name="ids")
    try:
        with pytest.raises(IntegrityError, match=r"'ids', array '[xy]': shard object 'ids/[xy]/c/[36]") as raised:
            for _ in StreamingLoader(server.url, batch_size=100, shuffle=True, backend="torch", device="cpu"):
                pass
        assert damaged not in str(raised.value) and raised.value.ids  # the ids crossed the wire
        loader = StreamingLoader(
            server.url, batch_size=100, shuffle=True, on_error="skip", backend="torch", device="cpu"
        )
        seen = [i for x, _ in loader for i in sample_ids(x.numpy())]
        lost = set(range(3 * SHARD_SAMPLES, 4 * SHARD_SAMPLES)) | set(range(6 * SHARD_SAMPLES, 7 * SHARD_SAMPLES))
        assert sorted(seen) == [i for i in range(2500) if i not in lost]
    finally:
        server.shutdown()


def test_through_a_server_the_damage_of_a_large_batch_crosses_with_its_ids(tmp_path):
    # its ids as a JSON list passed what gRPC carries (16 KiB): an unnamed error, which skip cannot skip
    n, shard = 60_000, 4096
    url = str(tmp_path / "large.zarr")
    write_dataset(url, [{"x": np.arange(n, dtype=np.float32)[:, None], "y": np.arange(n) % 10}], shard_samples=shard)
    for k in (2, 7, 11):
        Path(open_dataset(url).shard_path("x", k)).unlink()
    server = NearStoreServer(open_dataset(url), keep=1.0, method="random", name="large")
    try:
        loader = StreamingLoader(
            server.url, batch_size=20_000, shuffle=True, on_error="skip", backend="torch", device="cpu", cache=False
        )
        seen = sorted(i for x, _ in loader for i in sample_ids(x.numpy()))
        lost = {i for k in (2, 7, 11) for i in range(k * shard, (k + 1) * shard)}
        assert seen == [i for i in range(n) if i not in lost]
        assert sorted(loader.io_stats()["skipped_samples"]) == sorted(lost)
    finally:
        server.shutdown()


def test_ranks_refuse_a_batch_left_empty_rather_than_step_apart(damaged):
    # left out on one rank alone, the ranks took different numbers of steps: DDP's all-reduce hangs
    def rank(r: int, world_size: int) -> StreamingLoader:
        return StreamingLoader(
            damaged, batch_size=50, shuffle=False, on_error="skip", rank=r, world_size=world_size, backend="torch"
        )

    alone = rank(0, 1)
    assert sum(len(x) for x, _ in alone) == 2500 - 2 * SHARD_SAMPLES  # one rank: an empty batch is no step
    with pytest.raises(IntegrityError, match=r"batch \d+ of epoch 0 on rank 0 of .* held only damaged samples"):
        list(rank(0, 2))
