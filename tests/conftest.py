"""Shared fixtures: small real stores on disk, and a fingerprint to prove they stay untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from nearstore import Dataset, open_dataset, write_dataset

NUM_SAMPLES = 2500
SHARD_SAMPLES = 256
NUM_CLASSES = 5


def id_encoded(num_samples: int = NUM_SAMPLES) -> dict[str, np.ndarray]:
    """x[i] encodes i (so a batch names its samples), y[i] = i % NUM_CLASSES."""
    ids = np.arange(num_samples)
    x = ids[:, None] + np.linspace(0, 0.5, 8, dtype=np.float32)[None, :]
    return {"x": x.astype(np.float32), "y": (ids % NUM_CLASSES).astype(np.int64)}


def as_format_1(url: str) -> None:
    """Make the store at `url` look written before checksums: format 1, no manifest (its chunks
    keep their crc32c, which a format-1 reader decodes through zarr's codec like any other)."""
    import zarr

    group = zarr.open_group(url, mode="r+")
    attrs = {k: v for k, v in group.attrs["nearstore"].items() if k not in ("fingerprint", "shards", "layouts")}
    group.attrs["nearstore"] = {**attrs, "format_version": 1}


def shard_file(url: str, array: str, shard: int) -> Path:
    """The file of shard object `shard` of `array` in the local store at `url`."""
    return Path(open_dataset(url).shard_path(array, shard))


def flip(f: Path, at: int) -> None:
    """Damage file `f`: one bit of its byte `at` flipped."""
    blob = bytearray(f.read_bytes())
    blob[at] ^= 0x10
    f.write_bytes(bytes(blob))


@pytest.fixture(scope="session")
def id_store_url(tmp_path_factory) -> str:
    """Where `id_store` is written, once a session."""
    data = id_encoded()
    url = str(tmp_path_factory.mktemp("stores") / "ids.zarr")
    batches = ({k: v[i : i + 700] for k, v in data.items()} for i in range(0, NUM_SAMPLES, 700))
    # a sample an inner chunk (not the default for samples this small): the tests of reads count
    # each sample's byte range
    write_dataset(url, batches, shard_samples=SHARD_SAMPLES, chunk_samples=1)
    return url


@pytest.fixture
def id_store(id_store_url) -> Dataset:
    """2,500 id-encoded samples in shards of 256 (the last shard partial), opened afresh for each
    test: an opened dataset keeps the shard indexes and labels its readers read."""
    return open_dataset(id_store_url)


@pytest.fixture(scope="session")
def id_data() -> dict[str, np.ndarray]:
    """The arrays stored in `id_store`."""
    return id_encoded()


@pytest.fixture(scope="session")
def fingerprint():
    """sha256 of every file under a root: equal before and after means nothing was written."""

    def digest(root: str | Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*"))
            if p.is_file()
        }

    return digest


@pytest.fixture(scope="session")
def s3():
    """moto's S3 on 127.0.0.1, counting what it serves; stopped after the session."""
    from servers import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nginx(tmp_path_factory):
    """nginx serving a fresh directory (`nginx.root`) over HTTP on 127.0.0.1."""
    from servers import Nginx

    server = Nginx(tmp_path_factory.mktemp("www"), tmp_path_factory.mktemp("nginx")).wait_ready()
    yield server
    server.stop()
