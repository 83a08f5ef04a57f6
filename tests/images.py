"""A small store of encoded images, JPEG and PNG of varying sizes, for the loader's tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from nearstore import Dataset, write_dataset

NUM_IMAGES = 240
SHARD_SAMPLES = 64


def photo(i: int) -> bytes:
    """Image i: smooth colour fields of a size that varies, JPEG for odd i, PNG for even."""
    rng = np.random.default_rng(i)
    height, width = rng.integers(40, 160, 2)
    y, x = np.mgrid[:height, :width]
    phase = rng.uniform(0, 6)
    pixels = np.stack([x * 255 / width, y * 255 / height, 128 + 100 * np.sin(x / 7 + phase) * np.cos(y / 9)], -1)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="JPEG" if i % 2 else "PNG", quality=90)
    return out.getvalue()


def image_store(url: str, damaged: dict[int, bytes] | None = None) -> tuple[Dataset, list[bytes]]:
    """NUM_IMAGES photos (some replaced by `damaged`, {id: bytes}) labelled i % 4, written at `url`."""
    blobs = [photo(i) for i in range(NUM_IMAGES)]
    for i, blob in (damaged or {}).items():
        blobs[i] = blob
    images = np.empty(NUM_IMAGES, dtype=object)
    images[:] = blobs
    labels = np.arange(NUM_IMAGES) % 4
    return write_dataset(url, [{"image": images, "y": labels}], shard_samples=SHARD_SAMPLES), blobs
