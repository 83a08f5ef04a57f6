"""Image datasets generated locally: rendered shapes and sklearn's digits, as image folders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nearstore import ParameterError
from nearstore.app.encoded_converters import imagefolder_images
from nearstore.app.synthetic import SHAPES, shapes_images, write_digits_images, write_shapes


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_are_deterministic_balanced_varied_and_decodable(tmp_path):
    first = _files(write_shapes(tmp_path / "a", 45, seed=3))
    assert first == _files(write_shapes(tmp_path / "b", 45, seed=3))
    other = _files(write_shapes(tmp_path / "c", 45, seed=4))
    assert len(other) == 45 and set(first.values()).isdisjoint(other.values())
    smaller = _files(write_shapes(tmp_path / "d", 20, seed=3))
    assert all(first[name] == data for name, data in smaller.items())  # sample i depends on (seed, i) alone

    per_class = {shape: len(list((tmp_path / "a" / shape).iterdir())) for shape in SHAPES}
    assert sorted(per_class.values()) == [4] * 5 + [5] * 5  # 45 in 10 classes: as even as can be
    sizes, qualities = set(), set()
    for data in first.values():
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.format == "JPEG" and image.mode == "RGB"
        assert all(48 <= side <= 160 for side in image.size)
        sizes.add(image.size)
        qualities.add(image.quantization[0][0])  # the quantisation table differs with the quality
    assert len(sizes) > 30 and any(w != h for w, h in sizes) and len(qualities) > 5


def test_streamed_shapes_are_the_written_files_in_generation_order(tmp_path):
    root = write_shapes(tmp_path / "s", 12, seed=1)
    images = shapes_images(12, seed=1, batch=5)
    assert images.num_samples == 12 and images.class_names == SHAPES
    batches = list(images.batches())
    streamed = [data for b in batches for data in b["image"]]
    labels = np.concatenate([b["y"] for b in batches])
    assert [len(b["y"]) for b in batches] == [5, 5, 2]
    files = [(root / SHAPES[label] / f"{i:06d}.jpg").read_bytes() for i, label in enumerate(labels)]
    assert streamed == files
    # the folder's classes (its sorted subfolders) are SHAPES in order: a label means the same shape
    assert imagefolder_images(root).class_names == SHAPES


def test_digits_are_written_as_an_image_folder(tmp_path):
    root = write_digits_images(tmp_path / "png", size=16)
    images = imagefolder_images(root)
    assert images.num_samples == 1797 and images.class_names == tuple(str(d) for d in range(10))
    sample = Image.open(root / "0" / "0000.png")
    assert (sample.format, sample.mode, sample.size) == ("PNG", "L", (16, 16))
    jpeg = write_digits_images(tmp_path / "jpeg", format="jpeg")
    sample = Image.open(jpeg / "3" / "0003.jpg")
    assert (sample.format, sample.size) == ("JPEG", (32, 32))
    assert np.asarray(sample).max() > 200  # 0..16 became 0..255


def test_generator_refusals(tmp_path):
    with pytest.raises(ParameterError, match="num_samples must be >= 1, got 0"):
        write_shapes(tmp_path / "none", 0)
    assert not (tmp_path / "none").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="'.*full' exists and is not an empty folder"):
        write_shapes(tmp_path / "full", 10)
    with pytest.raises(ParameterError, match="format must be 'png' or 'jpeg', got 'gif'"):
        write_digits_images(tmp_path / "d", format="gif")
