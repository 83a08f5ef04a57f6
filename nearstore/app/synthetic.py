"""Image datasets generated here, nothing downloaded: rendered shapes and sklearn's digits, written as
an ImageFolder of encoded files (or streamed as encoded batches), for trying the encoded-image path
of nearstore end to end on a laptop or a CI runner without a network."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nearstore import Dataset, ParameterError
from nearstore.app.converters import ensure_dataset
from nearstore.app.encoded_converters import DEFAULT_IMAGE_BATCH, EncodedImages, encoded_batches
from nearstore.checks import check_integer

# Sorted, so that the label of a shape is its index both here and in an ImageFolder of it (whose
# classes are its sorted folder names).
SHAPES = ("arrow", "circle", "cross", "diamond", "ellipse", "hexagon", "ring", "square", "star", "triangle")
SIDES = (48, 160)  # pixels, each side drawn alone
MAX_ASPECT = 1.5  # a resize to a square then squeezes a circle less than a 2.5:1 ellipse is wide
QUALITY = (70, 95)  # JPEG
ROTATION = 20  # degrees either way: a square never turns into a diamond, nor an ellipse upright


def write_shapes(root: str | Path, num_samples: int, *, seed: int = 0) -> Path:
    """Write `num_samples` rendered shapes as an ImageFolder `root/<shape>/<sample>.jpg`; returns root.

    Ten classes (SHAPES) in balanced numbers, each image of random size (48..160 px a side, at most
    1.5:1), colours, position, scale and a small rotation, with pixel noise, encoded as JPEG of
    quality 70..95. Sample i depends on (seed, i) alone: the same seed writes the same bytes (with
    the same Pillow), and a smaller set is a subset of a larger one.
    """
    _check_count(num_samples)
    root = _empty_root(root)
    width = max(6, len(str(num_samples - 1)))
    for shape in SHAPES:
        (root / shape).mkdir()
    for i, (image, label) in enumerate(_shapes(num_samples, seed)):
        (root / SHAPES[label] / f"{i:0{width}d}.jpg").write_bytes(image)
    return root


def shapes_images(num_samples: int, *, seed: int = 0, batch: int = DEFAULT_IMAGE_BATCH) -> EncodedImages:
    """The images `write_shapes` writes, streamed as batches in generation order (classes
    interleaved) rather than as files (an ImageFolder of them reads class by class)."""
    _check_count(num_samples)
    seed = check_integer("seed", seed, 0)  # numpy's generators take none below 0
    return EncodedImages(num_samples, SHAPES, lambda: encoded_batches(_shapes(num_samples, seed), batch))


# Photo-sized: ImageNet's images are about 400 × 350 on average.
PHOTO_SIDES = (300, 500)
PHOTO_CLASSES = 8


def write_photos(root: str | Path, num_samples: int, *, sides: tuple[int, int] = PHOTO_SIDES, seed: int = 0) -> Path:
    """Write `num_samples` photo-like JPEGs (quality 90) as an ImageFolder `root/class<c>/<i>.jpg`,
    `sides` pixels a side, PHOTO_CLASSES classes in turn; returns root. A smooth colour field (a
    random 4 × 4 grid, bicubic) plus noise: they compress and decode like photographs rather than
    flat drawings, for measuring decoding and reading (their classes teach nothing)."""
    _check_count(num_samples)
    root = _empty_root(root)
    rng = np.random.default_rng(seed)
    for label in range(PHOTO_CLASSES):
        (root / f"class{label}").mkdir()
    for i in range(num_samples):
        width, height = (int(side) for side in rng.integers(sides[0], sides[1] + 1, 2))
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(field, np.float32) + rng.standard_normal((height, width, 3), dtype=np.float32) * 8
        photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        (root / f"class{i % PHOTO_CLASSES}" / f"{i:05d}.jpg").write_bytes(_encode(photo, "jpeg", quality=90))
    return root


def ensure_shapes(url: str, num_samples: int, seed: int = 0) -> Dataset:
    """Open the shapes store at `url`, generating it first if it is missing or another size."""
    return ensure_dataset(
        url, num_samples, lambda: shapes_images(num_samples, seed=seed).write(url, overwrite=True, progress=True)
    )


def write_digits_images(root: str | Path, *, format: str = "png", size: int = 32) -> Path:
    """Write sklearn's 1,797 8×8 digits as an ImageFolder `root/<digit>/<sample>.<png|jpg>` of
    grey `size`×`size` images (bilinear upscaling of the 0..16 pixels to 0..255); returns root."""
    if format not in ("png", "jpeg"):
        raise ParameterError(f"format must be 'png' or 'jpeg', got {format!r}")
    if size < 8:
        raise ParameterError(f"size must be >= 8 pixels, got {size}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = _empty_root(root)
    for digit in range(10):
        (root / str(digit)).mkdir()
    suffix = "png" if format == "png" else "jpg"
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        image = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8))  # 2-D uint8: mode "L"
        image = image.resize((size, size), Image.Resampling.BILINEAR)
        (root / str(label) / f"{i:04d}.{suffix}").write_bytes(_encode(image, format, quality=90))
    return root


def _shapes(num_samples: int, seed: int) -> Iterator[tuple[bytes, int]]:
    """(JPEG bytes, label) of samples 0..num_samples-1; each block of ten holds every class once."""
    for block in range(0, num_samples, len(SHAPES)):
        labels = np.random.default_rng([seed, 0, block]).permutation(len(SHAPES))
        for i in range(block, min(block + len(SHAPES), num_samples)):
            label = int(labels[i - block])
            yield _render(SHAPES[label], np.random.default_rng([seed, 1, i])), label


def _check_count(num_samples: int) -> None:
    if num_samples < 1:
        raise ParameterError(f"num_samples must be >= 1, got {num_samples}")


def _render(shape: str, rng: np.random.Generator) -> bytes:
    width = int(rng.integers(SIDES[0], SIDES[1] + 1))
    height = int(np.clip(width * math.exp(rng.uniform(-1, 1) * math.log(MAX_ASPECT)), *SIDES))
    background, foreground = _colours(rng)
    radius = rng.uniform(0.25, 0.45) * min(width, height)
    centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    turn = math.radians(rng.uniform(-ROTATION, ROTATION))

    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for outline, colour in zip(_outlines(shape), (foreground, background)):
        points = [
            (
                centre[0] + radius * (x * math.cos(turn) - y * math.sin(turn)),
                centre[1] - radius * (x * math.sin(turn) + y * math.cos(turn)),
            )
            for x, y in outline
        ]
        draw.polygon(points, fill=colour)
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(2, 12), pixels.shape)
    noisy = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return _encode(noisy, "jpeg", quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)))


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a foreground colour apart in brightness, so the shape can be seen in grey too."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        background, foreground = rng.integers(0, 256, (2, 3))
        if abs(luma @ (foreground - background)) >= 60:
            return tuple(background.tolist()), tuple(foreground.tolist())


def _outlines(shape: str) -> list[list[tuple[float, float]]]:
    """The shape's polygon in the unit disc (y up), then any hole drawn over it in the background."""

    def ellipse(rx: float, ry: float, n: int = 48) -> list[tuple[float, float]]:
        return [(rx * math.cos(2 * math.pi * k / n), ry * math.sin(2 * math.pi * k / n)) for k in range(n)]

    def regular(n: int, r: float = 1.0, start: float = 90.0) -> list[tuple[float, float]]:
        angles = [math.radians(start + 360 * k / n) for k in range(n)]
        return [(r * math.cos(a), r * math.sin(a)) for a in angles]

    if shape == "circle":
        return [ellipse(1, 1)]
    if shape == "ellipse":
        return [ellipse(1, 0.4)]
    if shape == "ring":
        return [ellipse(1, 1), ellipse(0.55, 0.55)]
    if shape == "square":
        return [[(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]]
    if shape == "diamond":
        return [[(0, 1), (0.65, 0), (0, -1), (-0.65, 0)]]
    if shape == "triangle":
        return [regular(3)]
    if shape == "hexagon":
        return [regular(6, start=0)]
    if shape == "star":
        outer, inner = regular(5), regular(5, 0.4, 90 + 36)
        return [[p for pair in zip(outer, inner) for p in pair]]
    if shape == "cross":
        a, b = 0.3, 1.0
        return [
            [(-a, b), (a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b), (-a, -b), (-a, -a), (-b, -a), (-b, a), (-a, a)]
        ]
    if shape == "arrow":
        return [[(-1, 0.2), (0.15, 0.2), (0.15, 0.6), (1, 0), (0.15, -0.6), (0.15, -0.2), (-1, -0.2)]]
    raise ParameterError(f"shape must be one of {SHAPES}, got {shape!r}")


def _encode(image: Image.Image, format: str, *, quality: int) -> bytes:
    out = io.BytesIO()
    if format == "jpeg":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def _empty_root(root: str | Path) -> Path:
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{str(root)!r} exists and is not an empty folder; an image folder is written afresh")
    root.mkdir(parents=True, exist_ok=True)
    return root
