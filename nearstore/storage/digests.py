"""The digests of samples the writer records in the manifest and readers check them against: of
each shard's samples, and of every array's (the dataset's fingerprint)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

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
