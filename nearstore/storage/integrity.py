"""Integrity: the digests the writer records and `verify_dataset`, which reads every shard once.

Each inner chunk carries its crc32c, checked on every read (`nearstore.storage.reader`); the
manifest records each shard object's size and a digest of the samples it holds. The reader
checks sizes and checksums; `verify_dataset` also checks the digests, which catches a shard
object replaced by another whole one (its checksums hold, its samples are not the ones written).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from nearstore.errors import IntegrityError
from nearstore.storage.dataset import Dataset

_DIGEST_BYTES = 16


def content_digest(values: np.ndarray) -> str:
    """Digest of a run of samples as the reader hands them back: fixed-size samples by their
    little-endian bytes, encoded ones (an object array of bytes) by each one's length and bytes."""
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    if values.dtype == object:
        for sample in values:
            digest.update(len(sample).to_bytes(8, "little"))
            digest.update(sample)
    else:
        little = values.dtype.newbyteorder("<") if values.dtype.byteorder != "|" else values.dtype
        digest.update(np.ascontiguousarray(values, dtype=little).tobytes())
    return digest.hexdigest()


def fingerprint(digests: Iterable[tuple[str, Iterable[str]]]) -> str:
    """The dataset's fingerprint from (array name, its shard digests in order) pairs."""
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for name, shard_digests in digests:
        digest.update(name.encode() + b"\0")
        for shard in shard_digests:
            digest.update(bytes.fromhex(shard))
    return digest.hexdigest()


@dataclass(frozen=True)
class Damage:
    """One damaged shard object: which array and shard, where it is, and what is wrong."""

    array: str
    shard: int
    path: str
    problem: str


def verify_dataset(dataset: Dataset, *, threads: int = 8, progress: bool = True) -> list[Damage]:
    """Read every shard object of every array once, concurrently, and check it: present, of the
    recorded size, its index and every inner chunk's checksum, its samples' digest. Returns the
    damaged objects (empty: the store is whole). A format-1 store has no manifest to check against:
    refused with a DatasetError."""
    from nearstore.storage.reader import SelectiveReader  # the reader imports this module

    if dataset.manifest is None:
        raise IntegrityError(
            f"{dataset.url!r} has no checksums or manifest (format {dataset.format_version}): nothing to verify "
            "against. Rewrite it with `nearstore convert` to get them"
        )
    manifest = dataset.manifest
    readers = {name: SelectiveReader(dataset, [name]) for name in dataset.sample_arrays}
    work = [(name, shard) for name in dataset.sample_arrays for shard in range(dataset.array_shards(name))]

    def check(item: tuple[str, int]) -> Damage | None:
        name, shard = item
        try:
            values = readers[name].read_shard(shard)[name]
        except IntegrityError as e:
            return Damage(name, shard, dataset.shard_path(name, shard), str(e))
        if content_digest(values) != manifest.digests[name][shard]:
            problem = "holds other samples than were written (checksums hold, the samples' digest does not)"
            return Damage(name, shard, dataset.shard_path(name, shard), problem)
        return None

    with ThreadPoolExecutor(threads) as pool:
        results = tqdm(
            pool.map(check, work), total=len(work), unit="shard", desc=f"verifying {dataset.url}", disable=not progress
        )
        return [damage for damage in results if damage is not None]
