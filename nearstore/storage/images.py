"""Encoded images as model inputs: `ImageTransform` says how (decode, crop, resize, flip,
normalize), the same whether DALI runs it (`nearstore.storage.dali_images`: in the trainer's
pipeline, and beside the data for a proxy where DALI is installed) or PIL runs it here (in the
loader's torch backend, a proxy's scaled thumbnails, and a scan where DALI is not installed).

A sample is checked whole before it is decoded (`damaged`): a truncated or foreign file is named
by the `on_error` policy of whoever reads it, never decoded silently into something else.
"""

from __future__ import annotations

import io
import math
import numbers
import re
import struct
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from nearstore.checks import check_flag, check_integer, is_integer
from nearstore.errors import ParameterError

OnError = Literal["raise", "skip"]
ON_ERROR = ("raise", "skip")
# ImageNet's channel statistics, in 0..255: the usual default for image classification.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a stored image is to be turned for viewing


def _numbers(values: object, count: int) -> bool:
    """Whether `values` is `count` finite real numbers (no bools)."""
    return (
        isinstance(values, (tuple, list))
        and len(values) == count
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


@dataclass(frozen=True)
class ImageTransform:
    """Encoded image → float32 (3, size, size), normalized: the ready default for classification.

    train=False: the shorter side resized to `resize` (default size · 8/7, 256 for 224), then the
    centre `size` × `size` crop. train=True: a random crop of `crop_area` of the image's area (and
    aspect ratio 3/4..4/3), resized to `size` × `size`, flipped left-right at random; with DALI the
    crop is decoded alone (`decoders.image_random_crop`).
    mean, std: per RGB channel, in 0..255.
    draft: train=False only, a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 of its size that
    still covers the resize (libjpeg's DCT scaling, PIL's `draft`), not whole: a 32 × 32 thumbnail of
    a photograph 2.6x faster, its pixels not DALI's (which decodes whole). For the model-free proxy's
    thumbnails; the loader's images leave it off.
    """

    size: int = 224
    train: bool = True
    resize: int | None = None
    crop_area: tuple[float, float] = (0.35, 1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    draft: bool = False

    def __post_init__(self) -> None:
        # both backends take what passes: a float size or a string train would run on one and not the other
        check_integer("ImageTransform size", self.size, 1)
        check_flag("ImageTransform train", self.train)
        check_flag("ImageTransform draft", self.draft)
        if self.resize is not None and not (is_integer(self.resize) and self.resize >= self.size):
            raise ParameterError(f"ImageTransform resize must be an integer >= size {self.size}, got {self.resize!r}")
        if not _numbers(self.crop_area, 2) or not 0 < self.crop_area[0] <= self.crop_area[1] <= 1:
            raise ParameterError(
                f"ImageTransform crop_area must be (low, high) with 0 < low <= high <= 1, got {self.crop_area!r}"
            )
        if not _numbers(self.mean, 3) or not _numbers(self.std, 3) or min(self.std) <= 0:
            raise ParameterError(
                f"ImageTransform mean and std need 3 finite numbers each, std > 0; got {self.mean!r}, {self.std!r}"
            )

    @property
    def shorter_side(self) -> int:
        """What the shorter side is resized to before the centre crop (train=False)."""
        return self.resize if self.resize is not None else round(self.size * 8 / 7)

    def decode(self, blob: bytes, rng: np.random.Generator | None = None) -> np.ndarray:
        """One encoded image as float32 (3, size, size); `rng` draws the crop and flip (train=True).
        Raises OSError or ValueError (PIL's) for bytes that do not decode."""
        with Image.open(io.BytesIO(blob)) as image:
            if self.draft and not self.train:  # before the pixels load; a no-op but for JPEGs
                image.draft("RGB", _shorter_to(image.width, image.height, self.shorter_side))
            image = _rgb(image)
        if self.train:
            rng = rng if rng is not None else np.random.default_rng()
            left, top, width, height = self._random_crop(image.width, image.height, rng)
            image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + width, top + height))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = image.resize(_shorter_to(image.width, image.height, self.shorter_side), Image.BILINEAR)
            # DALI's centre crop rounds half a pixel up
            left = (image.width - self.size + 1) // 2
            top = (image.height - self.size + 1) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(image, dtype=np.float32)
        return ((pixels - np.float32(self.mean)) / np.float32(self.std)).transpose(2, 0, 1)

    def decode_batch(
        self, blobs: Sequence[bytes], *, seed: int | Sequence[int] = 0, executor: Executor | None = None
    ) -> tuple[np.ndarray, dict[int, str]]:
        """The images that decode, as float32 (n_decoded, 3, size, size) in order, and why each
        other one did not, {index in blobs: reason}: what to do about them is the caller's
        `on_error` policy. Image i's crop and flip are drawn from (seed, i), so a batch decodes the
        same however `executor`'s threads share it (PIL lets go of the GIL to decode and resize)."""
        seeds = [seed] if isinstance(seed, int) else list(seed)
        out = np.empty((len(blobs), 3, self.size, self.size), dtype=np.float32)

        def decode_into(i: int) -> str | None:
            """Sample i decoded straight into its row (a copy after would leave the threads idle
            while one thread fills a fresh array: up to 200 ms a batch of 64 on a small VM)."""
            image = self._decode_or_why(blobs[i], np.random.default_rng([*seeds, i]) if self.train else None)
            if isinstance(image, str):
                return image
            out[i] = image
            return None

        whys = list((executor.map if executor is not None else map)(decode_into, range(len(blobs))))
        failed = {i: why for i, why in enumerate(whys) if why is not None}
        return (np.delete(out, list(failed), axis=0) if failed else out), failed

    def _decode_or_why(self, blob: bytes, rng: np.random.Generator | None) -> np.ndarray | str:
        why = damaged(blob)
        if why is not None:
            return why
        try:
            return self.decode(blob, rng)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what PIL raises
            return f"the decoder refused it: {type(e).__name__}: {e}"

    def _random_crop(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, width, height) of a crop of crop_area of the area, aspect 3/4..4/3 (ten tries,
        then the centre crop of the largest such aspect the image holds), as torchvision's
        RandomResizedCrop draws it, and DALI's crops: a wide image is not squashed whole."""
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.crop_area)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
        w, h = width, height
        if width / height < 3 / 4:
            h = max(1, min(height, round(width * 4 / 3)))
        elif width / height > 4 / 3:
            w = max(1, min(width, round(height * 4 / 3)))
        return (width - w) // 2, (height - h) // 2, w, h


# The scan decodes small: a proxy's features need the shape of a thing, not its detail, and a
# 32 × 32 decode costs a tenth of a 224 one.
PROXY_IMAGES = ImageTransform(size=32, train=False)
# The model-free proxy's: its random features need no more than a JPEG's scaled decode gives.
THUMBNAILS = ImageTransform(size=32, train=False, draft=True)


def _rgb(image: Image.Image) -> Image.Image:
    """The RGB pixels DALI's decoder gives: turned as the EXIF orientation says, and grey of more
    than 8 bits scaled to 8, round(v · 255 / (2^bits − 1)) (PIL's convert clips it at 255: a 16-bit
    PNG came out white; a 12-bit TIFF holds levels to 4095, not 65535)."""
    bits = getattr(image, "tag_v2", {}).get(_BITS_PER_SAMPLE, 16)  # a TIFF's bits a sample (a copy has none)
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # a phone's photograph, stored sideways
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        top = 2 ** (bits[0] if isinstance(bits, tuple) else bits) - 1
        levels = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255 / top), 0, 255)
        image = Image.fromarray(levels.astype(np.uint8))
    return image.convert("RGB")


def _shorter_to(width: int, height: int, side: int) -> tuple[int, int]:
    """The size with the shorter side `side` and the aspect ratio kept, rounded as DALI rounds."""
    if width <= height:
        return side, max(1, round(height * side / width))
    return max(1, round(width * side / height)), side


# Magic numbers of the formats both decoders read, with how a whole file ends where that is known.
_JPEG, _PNG, _PNG_END = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
_PNM = (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")  # plain and binary bitmaps, greymaps, pixmaps


def looks_like_image(blob: bytes) -> bool:
    """Whether `blob` starts as a JPEG, PNG, WebP, BMP or TIFF does (PNM's two letters say too
    little): a column of bytes that may hold other things (audio) is checked where it does. A
    BMP's two letters ("BMW 320i") and a JPEG's three bytes (1 row in 16M of random bytes) say
    too little too: a BMP's reserved bytes and header size, and the marker after a JPEG's start,
    must be a BMP's and a JPEG's."""
    if blob.startswith(_JPEG):
        return len(blob) > 3 and 0xC0 <= blob[3] <= 0xFE and blob[3] != 0xD8
    if blob.startswith(b"BM"):
        return blob[6:10] == b"\0\0\0\0" and int.from_bytes(blob[14:18], "little") in _BMP_HEADER_SIZES
    return blob.startswith((_PNG, b"II*\x00", b"MM\x00*")) or (blob[:4] == b"RIFF" and blob[8:12] == b"WEBP")


_BMP_HEADER_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)  # BITMAPCOREHEADER ... BITMAPV5HEADER


def damaged(blob: bytes) -> str | None:
    """Why an encoded image cannot be whole, or None: an empty sample, an unknown format, or a
    JPEG, PNG, WebP or BMP cut short (its end marker missing, its stated size not its size).
    Costs a few byte comparisons, so every sample is checked before it is decoded."""
    if not blob:
        return "empty sample"
    if blob.startswith(_JPEG):
        # An end-of-image marker past the first scan's start, at the end or where data follows it
        # (padding; a phone's motion photo, its video): none can stand in entropy-coded data, while
        # the header may hold one (an EXIF thumbnail's, a comment's: in a small file, near its end).
        # Where the header's segments cannot be walked, one in the last KiB does.
        scan = _jpeg_scan(blob)
        whole = b"\xff\xd9" in blob[-1024:] if scan is None else blob.rfind(b"\xff\xd9") > scan
        return None if whole else "JPEG without its end-of-image marker (truncated?)"
    if blob.startswith(_PNG):
        # IEND past the header (signature and IHDR, 33 bytes), at the end or where data follows it,
        # as a JPEG's end marker may be: its 8 bytes with their CRC do not occur by chance
        whole = blob.rfind(_PNG_END) >= 33
        return None if whole else "PNG without its IEND chunk (truncated?)"
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        stated = int.from_bytes(blob[4:8], "little") + 8
        return None if len(blob) >= stated else f"WebP of {len(blob)} bytes, its header says {stated}"
    if blob[:2] == b"BM":
        stated = int.from_bytes(blob[2:6], "little")
        return None if len(blob) >= stated else f"BMP of {len(blob)} bytes, its header says {stated}"
    if blob[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_samples(blob)  # no end to check
    if blob[:2] in _PNM:
        return _pnm_levels(blob)  # no end to check
    return f"not an image nearstore decodes (starts {blob[:8]!r}; JPEG, PNG, WebP, BMP, TIFF, PNM)"


# JPEG markers that begin a frame header (SOF0-SOF15 but DHT, JPG and DAC), which holds the size.
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SCAN_MARKER = frozenset({0xDA})


def jpeg_size(blob: bytes) -> tuple[int, int] | None:
    """(width, height) as a JPEG's frame header states it, before any EXIF turn; None for another
    format or a header not found. Reads the segments' lengths up to the frame header, a few steps."""
    if not blob.startswith(_JPEG):
        return None
    at = _jpeg_segment(blob, _FRAME_MARKERS)
    if at is None or at + 9 > len(blob):
        return None
    height, width = struct.unpack_from(">HH", blob, at + 5)
    return width, height


def _jpeg_scan(blob: bytes) -> int | None:
    """Where a JPEG's first scan (start of scan, SOS) begins, len(blob) where the header is cut
    short before it, or None where the segments cannot be walked."""
    return _jpeg_segment(blob, _SCAN_MARKER)


def _jpeg_segment(blob: bytes, markers: frozenset[int]) -> int | None:
    """Where the first of a JPEG's segments with one of `markers` begins, by their lengths from the
    start of image (a few steps: the header's segments); len(blob) where the segments run past its
    end first, None where a segment does not start with a marker."""
    at = 2
    while at < len(blob):
        if at + 4 > len(blob):
            return len(blob)
        if blob[at] != 0xFF:
            return None
        marker = blob[at + 1]
        if marker == 0xFF:  # a fill byte before the marker
            at += 1
        elif marker in markers:
            return at
        else:
            at += 2 + int.from_bytes(blob[at + 2 : at + 4], "big")
    return len(blob)


def check_on_error(on_error: str) -> OnError:
    if on_error not in ON_ERROR:
        raise ParameterError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error  # type: ignore[return-value]


def _tiff_samples(blob: bytes) -> str | None:
    """Why a TIFF's samples cannot be decoded alike by PIL and DALI, from its first directory, or
    None: floats or more than 16 bits a sample (DALI scales a float image of 100s to 255, PIL
    clips it). A directory past the bytes is left to the decoders, which name it."""
    order = "<" if blob[:2] == b"II" else ">"
    try:
        (first,) = struct.unpack_from(order + "I", blob, 4)
        (count,) = struct.unpack_from(order + "H", blob, first)
        tags = {}
        for k in range(count):
            tag, kind, n, value = struct.unpack_from(order + "HHI4s", blob, first + 2 + 12 * k)
            if tag not in (_BITS_PER_SAMPLE, _SAMPLE_FORMAT) or kind != 3:  # SHORTs: 2 inline, more at an offset
                continue
            raw = value if n <= 2 else blob[struct.unpack(order + "I", value)[0] :]
            tags[tag] = struct.unpack(f"{order}{n}H", raw[: 2 * n])
    except struct.error:
        return None
    if any(f == 3 for f in tags.get(_SAMPLE_FORMAT, ())):
        return "TIFF of floating-point samples (DALI and PIL scale them differently; store 8 or 16 bits)"
    if any(bits > 16 for bits in tags.get(_BITS_PER_SAMPLE, ())):
        return "TIFF of more than 16 bits a sample (DALI and PIL scale them differently; store 8 or 16 bits)"
    return None


_BITS_PER_SAMPLE, _SAMPLE_FORMAT = 258, 339  # TIFF tags
_PNM_FIELD = re.compile(rb"(?:\s|#[^\n]*\n)*(\d+)")  # a header field, after blanks and comments


def _pnm_levels(blob: bytes) -> str | None:
    """Why a binary greymap or pixmap (P5, P6) cannot be decoded alike by PIL and DALI, or None:
    a maxval other than 255 or 65535, which PIL scales to 255 and DALI does not (mid-grey of a
    12-bit scan, maxval 4095, came out 7 of 255). A header cut short is left to the decoders."""
    if blob[:2] not in (b"P5", b"P6"):
        return None
    at, fields = 2, []
    for _ in range(3):  # width, height, maxval
        field = _PNM_FIELD.match(blob, at)
        if field is None:
            return None
        fields.append(int(field.group(1)))
        at = field.end()
    maxval = fields[2]
    if maxval in (255, 65535):
        return None
    return f"PNM of maxval {maxval} (DALI reads its levels unscaled, PIL scales them; store maxval 255 or 65535)"
