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

from nearstore.checks import check_integer
from nearstore.errors import IntegrityError
from nearstore.storage.dataset import Dataset

_DIGEST_BYTES = 16


def new_digest() -> hashlib.blake2b:
    """A digest of samples, fed by `digest_samples`."""
    return hashlib.blake2b(digest_size=_DIGEST_BYTES)


def digest_samples(values: np.ndarray, *digests: hashlib.blake2b) -> None:
    """Feed a run of samples, as the reader hands them back, to each digest: fixed-size samples by
    their little-endian bytes, encoded ones (an object array of bytes) by each one's length and
    bytes. Runs fed one after another digest as their concatenation, whatever their boundaries."""
    if values.dtype == object:
        chunks = [part for sample in values for part in (len(sample).to_bytes(8, "little"), sample)]
    else:
        little = values.dtype.newbyteorder("<") if values.dtype.byteorder != "|" else values.dtype
        chunks = [np.ascontiguousarray(values, dtype=little).tobytes()]
    for digest in digests:
        for chunk in chunks:
            digest.update(chunk)


def content_digest(values: np.ndarray) -> str:
    """The digest of a run of samples (a shard's, as the manifest records them)."""
    digest = new_digest()
    digest_samples(values, digest)
    return digest.hexdigest()


def fingerprint(arrays: Iterable[tuple[str, hashlib.blake2b]]) -> str:
    """The dataset's fingerprint from (array name, digest of all its samples) pairs: the samples'
    content only, whatever the store's URL or shard size."""
    digest = new_digest()
    for name, samples in arrays:
        digest.update(name.encode() + b"\0" + samples.digest())
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
    recorded size (no byte more), its index and every inner chunk's checksum, its samples' digest. Returns the
    damaged objects (empty: the store is whole). A format-1 store has no manifest to check against:
    refused with a DatasetError."""
    from nearstore.storage.reader import SelectiveReader  # the reader imports this module

    check_integer("threads", threads, 1)
    if dataset.manifest is None:
        raise IntegrityError(
            f"{dataset.url!r} has no checksums or manifest (format {dataset.format_version}): nothing to verify "
            "against. Rewrite it with `nearstore convert` to get them"
        )
    manifest = dataset.manifest
    fs, _ = dataset.filesystem()
    readers = {name: SelectiveReader(dataset, [name]) for name in dataset.sample_arrays}
    work = [(name, shard) for name in dataset.sample_arrays for shard in range(dataset.array_shards(name))]

    def check(item: tuple[str, int]) -> Damage | None:
        name, shard = item
        path = dataset.shard_path(name, shard)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            size = None  # the reader says it is missing
        if size is not None and size > manifest.nbytes[name][shard]:  # the reader finds one cut short
            return Damage(
                name,
                shard,
                path,
                f"is longer than written: {size} bytes, the manifest records {manifest.nbytes[name][shard]}",
            )
        try:
            readers[name].read_shard(shard)  # its checksums, and, read whole, its samples' digest
        except IntegrityError as e:
            return Damage(name, shard, path, str(e))
        return None

    with ThreadPoolExecutor(threads) as pool:
        results = tqdm(
            pool.map(check, work), total=len(work), unit="shard", desc=f"verifying {dataset.url}", disable=not progress
        )
        return [damage for damage in results if damage is not None]
