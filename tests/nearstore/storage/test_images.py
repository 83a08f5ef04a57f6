"""ImageTransform with PIL (the torch backend's and the scan's decoder) and the damage check."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from nearstore import ParameterError
from nearstore.storage.images import ImageTransform, damaged, jpeg_size


def encode(pixels: np.ndarray, format: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=format, **options)
    return out.getvalue()


def gradient(height: int, width: int) -> np.ndarray:
    """An image whose every pixel says where it is: R follows x, G follows y."""
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 90)], -1).astype(
        np.uint8
    )


FORMATS = {"PNG": {}, "JPEG": {"quality": 95}, "WEBP": {"lossless": True}, "BMP": {}, "TIFF": {}, "PPM": {}}


@pytest.mark.parametrize("format", FORMATS)
def test_whole_images_pass_and_cut_ones_are_named(format):
    blob = encode(gradient(40, 60), format, **FORMATS[format])
    assert damaged(blob) is None
    if format in ("PNG", "JPEG", "WEBP", "BMP"):  # formats whose end can be checked
        assert damaged(blob[: len(blob) // 2]) is not None


def exif_with_thumbnail(pixels: np.ndarray) -> bytes:
    """A JPEG whose EXIF holds a JPEG thumbnail: an end-of-image marker before the image's scan."""
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 1  # orientation: an IFD0 for the thumbnail's IFD1 to follow
    thumbnail = encode(pixels[::8, ::8].copy(), "JPEG")
    return encode(pixels, "JPEG", exif=exif.tobytes() + thumbnail)


def test_jpegs_with_data_after_their_end_pass_and_cut_ones_with_an_exif_thumbnail_do_not():
    blob = encode(gradient(40, 60), "JPEG", quality=95)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, 8192, dtype=np.uint8).tobytes().replace(b"\xff\xd9", b"\x00\x00")
    for trailer in (video, bytes(2000)):  # a phone's motion photo; padding
        assert damaged(blob + trailer) is None
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(blob + trailer))), np.asarray(Image.open(io.BytesIO(blob)))
        )
    with_thumbnail = exif_with_thumbnail(gradient(200, 300))
    assert with_thumbnail.count(b"\xff\xd9") == 2 and damaged(with_thumbnail) is None
    assert damaged(with_thumbnail[: len(with_thumbnail) - 2000]) is not None  # the thumbnail's end is not the image's
    # a small JPEG whose comment holds an end marker, cut in its scan: the marker was within its last KiB
    small = encode(gradient(16, 16), "JPEG", comment=b"end \xff\xd9 here")
    assert len(small) < 1024 and damaged(small) is None
    assert damaged(small[: len(small) - 100]) == "JPEG without its end-of-image marker (truncated?)"


def test_pngs_with_data_after_their_end_pass_and_cut_ones_do_not():
    blob = encode(gradient(40, 60), "PNG")
    for trailer in (b"appended by a tool" * 10, bytes(700)):
        assert damaged(blob + trailer) is None
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(blob + trailer))), np.asarray(Image.open(io.BytesIO(blob)))
        )
    assert damaged(blob[:-1]) == damaged(blob[:-13] + bytes(50)) == "PNG without its IEND chunk (truncated?)"


@pytest.mark.parametrize(
    ("blob", "why"),
    [(b"", "empty sample"), (b"GIF89a....", "not an image nearstore decodes"), (b"\x89PNG\r\n\x1a\nIHDR", "IEND")],
)
def test_damage_is_said(blob, why):
    assert why in damaged(blob)


def test_plain_pnm_passes_and_tiffs_the_decoders_scale_apart_are_named():
    for header in (b"P1\n2 2\n1 0\n0 1\n", b"P2\n2 2\n255\n0 9\n9 0\n", b"P3\n1 1\n255\n1 2 3\n", b"P4\n8 1\n\xaa"):
        assert damaged(header) is None  # PIL and DALI decode each alike
    for pixels in (np.full((6, 4), 100, np.uint16), gradient(6, 4), np.eye(4, dtype=bool)):
        for compression in ("raw", "tiff_lzw"):
            assert damaged(encode(pixels, "TIFF", compression=compression)) is None
    floats = encode(np.full((6, 4), 100, np.float32), "TIFF")  # DALI reads 255, PIL 100
    assert "TIFF of floating-point samples" in damaged(floats)
    assert "TIFF of more than 16 bits a sample" in damaged(encode(np.full((6, 4), 100, np.int32), "TIFF"))


def test_binary_pnm_of_a_maxval_the_decoders_scale_apart_is_named():
    grey = np.full((4, 4), 50, np.uint8).tobytes()
    for maxval in (255, 65535):  # both decoders scale these alike
        depth = np.full((4, 4), maxval // 2, ">u2" if maxval > 255 else "u1").tobytes()
        assert damaged(b"P5\n# a comment\n4 4\n%d\n" % maxval + depth) is None
    for maxval in (100, 4095):  # DALI read a 12-bit scan's mid-grey as 7 of 255, PIL as 128
        why = damaged(b"P5 4 4 %d\n" % maxval + grey)
        assert (
            why
            == f"PNM of maxval {maxval} (DALI reads its levels unscaled, PIL scales them; store maxval 255 or 65535)"
        )
    assert "maxval 1023" in damaged(b"P6\n4 4\n1023\n" + grey * 6)


def tiff_of_12_bits(side: int, level: int) -> bytes:
    """An uncompressed little-endian 12-bit grey TIFF (a scientific camera's), every pixel `level`."""
    pair = bytes([level >> 4, ((level & 0xF) << 4) | (level >> 8), level & 0xFF])  # two samples, MSB first
    data = pair * (side * side // 2)
    tags = [(256, 3, side), (257, 3, side), (258, 3, 12), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 12 * 9 + 4)]
    tags += [(277, 3, 1), (278, 3, side), (279, 4, len(data))]
    entries = b"".join(
        struct.pack("<HHI", tag, kind, 1)
        + (struct.pack("<H", v).ljust(4, b"\0") if kind == 3 else struct.pack("<I", v))
        for tag, kind, v in tags
    )
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0) + data


def test_grey_of_12_bits_is_scaled_by_its_own_depth():
    # PIL reads it as 16-bit levels to 4095: divided by 257, mid-grey came out 8 of 255 (DALI: 128)
    levels = ImageTransform(size=4, train=False, mean=(0, 0, 0), std=(1, 1, 1)).decode(tiff_of_12_bits(8, 2048))
    np.testing.assert_array_equal(levels, np.full((3, 4, 4), 128, np.float32))


def test_evaluation_is_resize_then_centre_crop_then_normalize():
    pixels = gradient(50, 80)
    blob = encode(pixels, "PNG")
    transform = ImageTransform(size=20, train=False, resize=25, mean=(10, 20, 30), std=(2, 4, 8))
    out = transform.decode(blob)
    assert out.shape == (3, 20, 20) and out.dtype == np.float32
    # by hand: shorter side 50 -> 25 keeps the aspect (80 -> 40), then the centre 20 x 20
    resized = np.asarray(Image.fromarray(pixels).resize((40, 25), Image.BILINEAR), dtype=np.float32)
    expected = (resized[3:23, 10:30] - [10, 20, 30]) / [2, 4, 8]
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1), rtol=0, atol=1e-5)


def test_training_crops_are_drawn_from_the_seed_and_stay_inside_the_image():
    blob = encode(gradient(64, 96), "PNG")
    transform = ImageTransform(size=16, mean=(0, 0, 0), std=(1, 1, 1))
    first, failed = transform.decode_batch([blob] * 8, seed=(3, 1))
    again, _ = transform.decode_batch([blob] * 8, seed=(3, 1))
    other, _ = transform.decode_batch([blob] * 8, seed=(4, 1))
    assert not failed and first.shape == (8, 3, 16, 16)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len({image.tobytes() for image in first}) > 1  # each image of a batch its own crop
    assert first.min() >= 0 and first.max() <= 255 and np.all(first[:, 2] == 90)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_a_draft_decodes_a_large_jpeg_scaled_close_to_its_whole_decode(mode):
    out = io.BytesIO()
    Image.fromarray(gradient(300, 400)).convert(mode).save(out, format="JPEG", quality=95)
    blob = out.getvalue()
    whole = ImageTransform(size=32, train=False).decode(blob)
    drafted = ImageTransform(size=32, train=False, draft=True).decode(blob)
    assert drafted.shape == whole.shape == (3, 32, 32)
    assert not np.array_equal(drafted, whole)  # decoded at 1/8 (50 x 38 covers 43 x 36), not whole
    assert np.abs(drafted - whole).mean() * 58 < 3  # within 3 of 255 levels on average (std ~58)


def test_a_draft_leaves_other_formats_and_training_crops_as_they_are():
    png, jpeg = encode(gradient(300, 400), "PNG"), encode(gradient(300, 400), "JPEG")
    for blob in (png, encode(gradient(40, 60), "JPEG")):  # a JPEG already near the size: nothing to scale
        np.testing.assert_array_equal(
            ImageTransform(size=32, train=False, draft=True).decode(blob),
            ImageTransform(size=32, train=False).decode(blob),
        )
    crops = [ImageTransform(size=32, draft=draft).decode_batch([jpeg] * 4, seed=5)[0] for draft in (True, False)]
    np.testing.assert_array_equal(*crops)


def test_a_batch_decodes_what_it_can_and_says_why_not_the_rest():
    good = encode(gradient(30, 30), "JPEG")
    garbled = good[:200] + bytes(len(good) - 400) + good[-200:]  # whole on the outside
    blobs = [good, good[:100], b"not an image", garbled, good]
    images, failed = ImageTransform(size=8, train=False).decode_batch(blobs)
    assert images.shape == (len(blobs) - len(failed), 3, 8, 8)
    assert set(failed) >= {1, 2} and "end-of-image" in failed[1] and "not an image" in failed[2]
    assert 0 not in failed and 4 not in failed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": 0}, "size must be an integer >= 1"),
        ({"size": 32, "resize": 16}, "resize must be an integer >= size"),
        ({"crop_area": (0.0, 1.0)}, "crop_area"),
        ({"std": (1, 0, 1)}, "std > 0"),
        # what one backend ran and the other did not, or neither as meant
        ({"size": 32.5}, "size must be an integer >= 1, got 32.5"),
        ({"size": True}, "size must be an integer >= 1, got True"),
        ({"train": "no"}, "train must be True or False, got 'no'"),
        ({"crop_area": 0.5}, "crop_area must be \\(low, high\\)"),
        ({"crop_area": (0.5,)}, "crop_area must be \\(low, high\\)"),
        ({"mean": (float("nan"), 0, 0)}, "mean and std need 3 finite numbers"),
        ({"size": 32, "resize": 40.5}, "resize must be an integer >= size 32, got 40.5"),
    ],
)
def test_bad_transforms_are_refused_by_name(options, message):
    with pytest.raises(ParameterError, match=message):
        ImageTransform(**options)


def test_a_training_crop_of_a_wide_image_keeps_its_aspect_within_4_3():
    """Where ten draws fail, the centre crop of the widest allowed aspect, as torchvision's and
    DALI's: a 3:1 image was squashed whole into the square 72% of the time."""
    transform = ImageTransform(size=8, crop_area=(1.0, 1.0))  # the whole area: no draw of 3/4..4/3 fits
    rng = np.random.default_rng(0)
    assert transform._random_crop(300, 100, rng) == (83, 0, 133, 100)
    assert transform._random_crop(100, 300, rng) == (0, 83, 100, 133)
    assert transform._random_crop(120, 100, rng) == (0, 0, 120, 100)  # within 4/3: the whole image


def test_a_jpegs_size_is_read_from_its_frame_header():
    pixels = gradient(37, 91)
    turned = Image.Exif()
    turned[0x0112] = 6  # stored sideways: the header states the stored size
    for options in ({}, {"progressive": True}, {"quality": 50, "subsampling": 0}, {"exif": turned.tobytes()}):
        blob = encode(pixels, "JPEG", **options)
        assert jpeg_size(blob) == Image.open(io.BytesIO(blob)).size == (91, 37)
    assert jpeg_size(encode(pixels, "PNG")) is None
    assert jpeg_size(encode(pixels, "JPEG")[:20]) is None  # cut before its frame header
