"""DaliDecoder: the scan's decoder where DALI is installed, against PIL's (the loader's DALI pipeline:
tests/loaders/test_images.py; the scan taking it: tests/nearstore/selection/test_stages.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from images import photo
from PIL import Image

from nearstore import ParameterError
from nearstore.storage.dali_images import DaliDecoder, dali_available
from nearstore.storage.images import ImageTransform

pytestmark = pytest.mark.skipif(not dali_available(), reason="needs DALI")

EVAL = ImageTransform(size=16, train=False)


def photos(n: int) -> list[bytes]:
    return [photo(i) for i in range(n)]  # JPEG and PNG of 40-160 px


def test_pixels_are_close_to_pils_not_equal():
    blobs = photos(12)
    pixels, failed = DaliDecoder(EVAL, threads=2).decode_batch(blobs)
    assert failed == {} and pixels.shape == (12, 3, 16, 16) and pixels.dtype == np.float32
    by_pil, _ = EVAL.decode_batch(blobs)  # another resize filter
    assert 0 < np.abs(pixels - by_pil).mean() < 0.05


def test_batches_past_the_pipelines_size_or_bytes_decode_as_one(monkeypatch):
    blobs = photos(11)
    whole, _ = DaliDecoder(EVAL, threads=2).decode_batch(blobs)
    pieces, _ = DaliDecoder(EVAL, threads=1, batch=4).decode_batch(blobs)
    np.testing.assert_array_equal(pieces, whole)
    sizes = [len(blob) for blob in blobs]
    monkeypatch.setattr("nearstore.storage.dali_images.DALI_BATCH_BYTES", max(sizes))
    decoder = DaliDecoder(EVAL, threads=2)
    parts = decoder._parts(list(range(11)), blobs)
    assert [i for part in parts for i in part] == list(range(11)) and len(parts) > 2
    assert all(sum(sizes[i] for i in part) <= max(sizes) for part in parts)
    np.testing.assert_array_equal(decoder.decode_batch(blobs)[0], whole)


def test_damaged_samples_are_named_and_a_refused_batch_is_decoded_by_pil():
    blobs = photos(9)
    blobs[2] = blobs[2][: len(blobs[2]) // 2]  # cut short: named before decoding
    # looks whole (a comment, a scan, its end) and the decoders refuse it: no frame, no tables
    blobs[6] = b"\xff\xd8\xff\xfe\x00\x0cnot a JPEG\xff\xda\x00\x08" + b"not a scan" * 20 + b"\xff\xd9"
    decoder = DaliDecoder(EVAL, threads=2, batch=4)
    pixels, failed = decoder.decode_batch(blobs)
    assert sorted(failed) == [2, 6]
    assert "truncated" in failed[2] and "the decoder refused it" in failed[6]
    kept = [blob for i, blob in enumerate(blobs) if i not in failed]
    alone, _ = DaliDecoder(EVAL, threads=2).decode_batch(kept)
    by_pil, _ = EVAL.decode_batch(kept)
    # samples 0, 1, 3, 4 by DALI; 5, 7 and 8, the refused batch's others, by PIL
    np.testing.assert_array_equal(pixels[:4], alone[:4])
    np.testing.assert_array_equal(pixels[4:], by_pil[4:])
    again, none = decoder.decode_batch(kept)  # the decoder goes on after a refusal
    assert none == {} and np.array_equal(again, alone)


def test_only_evaluation_transforms_are_dalis():
    with pytest.raises(ParameterError, match="evaluation transforms"):
        DaliDecoder(ImageTransform(size=16), threads=1)


def test_a_drafts_large_jpegs_are_pils_scaled_and_the_rest_dalis(monkeypatch):
    thumbnails = ImageTransform(size=16, train=False, draft=True)
    blobs = photos(8)  # JPEGs (odd) and PNGs (even) of 40-160 px
    pixels = [int(np.prod(Image.open(io.BytesIO(blob)).size)) for blob in blobs]
    threshold = int(np.median(pixels))
    monkeypatch.setattr("nearstore.storage.dali_images.DRAFT_PIXELS", threshold)
    large = [i for i, n in enumerate(pixels) if n > threshold and i % 2]
    assert large and len(large) < 4
    mixed, _ = DaliDecoder(thumbnails, threads=2).decode_batch(blobs)
    by_dali, _ = DaliDecoder(EVAL, threads=2).decode_batch(blobs)  # the same transform, decoded whole
    by_pil, _ = thumbnails.decode_batch(blobs)
    for i in range(8):
        np.testing.assert_array_equal(mixed[i], (by_pil if i in large else by_dali)[i])
    assert not np.array_equal(by_pil[large], by_dali[large])


def test_the_formats_pil_decodes_decode_alike_and_one_dali_refuses_falls_to_pil():
    rng = np.random.default_rng(0)
    rgb = np.kron(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    kinds = [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP")]
    blobs = []
    for mode, format in kinds:
        out = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(out, format=format, **({"quality": 95} if format == "JPEG" else {}))
        blobs.append(out.getvalue())
    std = np.array(EVAL.std, np.float32)[:, None, None]
    by_dali, failed = DaliDecoder(EVAL, threads=2).decode_batch(blobs)
    by_pil, _ = EVAL.decode_batch(blobs)
    assert failed == {}
    assert (np.abs(by_dali - by_pil) * std).mean((1, 2, 3)).max() < 1.5  # levels of 255
    bilevel = io.BytesIO()
    Image.fromarray(rgb[..., 0]).convert("1").save(bilevel, format="TIFF")  # PIL decodes it, DALI's decoder not
    pixels, failed = DaliDecoder(EVAL, threads=2).decode_batch([*blobs, bilevel.getvalue()])
    assert failed == {} and len(pixels) == 7
    np.testing.assert_array_equal(pixels, EVAL.decode_batch([*blobs, bilevel.getvalue()])[0])  # all PIL's


def test_a_jpeg_with_data_after_its_end_decodes_as_without():
    blob = photo(1)  # a JPEG
    trailer = np.random.default_rng(0).integers(0, 256, 9000, dtype=np.uint8).tobytes()  # a motion photo's video
    (plain, with_trailer), failed = DaliDecoder(EVAL, threads=1).decode_batch([blob, blob + bytes(3000) + trailer])
    assert failed == {} and np.array_equal(plain, with_trailer)
