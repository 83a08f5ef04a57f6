"""Encoded images from an ImageFolder, WebDataset shards and MDS folders, stored byte for byte."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from image_sources import write_mds, write_tar
from PIL import Image

from nearstore import DatasetError, ParameterError
from nearstore.app.encoded_converters import imagefolder_images, mds_images, webdataset_images
from nearstore.storage.reader import SelectiveReader


def _jpeg(seed: int, size: tuple[int, int] = (20, 12)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=80)
    return out.getvalue()


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((5, 7), seed % 256, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _webp(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((6, 4, 3), seed % 256, np.uint8)).save(out, format="WEBP")
    return out.getvalue()


def _stored(images, tmp_path: Path, **options) -> tuple[list[bytes], list[int], tuple[str, ...]]:
    """Write through `write_dataset` in shards of 3 and read every sample back, in reverse order:
    the bytes come from the store, not from the converter."""
    dataset = images.write(str(tmp_path / "out.zarr"), shard_samples=3, **options)
    ids = np.arange(dataset.num_samples)[::-1]
    read = SelectiveReader(dataset).read(ids)
    return list(read["image"][::-1]), read["y"][::-1].tolist(), dataset.class_names


def test_an_image_folder_is_stored_byte_for_byte_in_torchvisions_order(tmp_path):
    root = tmp_path / "folder"
    # torchvision's order: classes sorted; in a class, os.walk's folders sorted, then file names sorted
    # ("10" before "2"); extensions compared without case; other files skipped.
    files = {
        "cat/2.jpg": _jpeg(0),
        "cat/10.jpg": _jpeg(1),
        "cat/sub/0.PNG": _png(2) + b"\x00\x00",  # bytes after the image, NULs last, kept too
        "cat/notes.txt": b"not an image",
        "ant/x.JPEG": _jpeg(3, (64, 9)),
        "ant/.DS_Store": b"\x00",
        "bee/a.webp": _webp(4),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "README").write_text("a file beside the class folders is no class")

    images = imagefolder_images(root, batch=2)
    assert images.num_samples == 5 and images.class_names == ("ant", "bee", "cat")
    expected = ["ant/x.JPEG", "bee/a.webp", "cat/10.jpg", "cat/2.jpg", "cat/sub/0.PNG"]
    stored, labels, class_names = _stored(images, tmp_path)
    assert stored == [files[name] for name in expected]
    assert labels == [0, 1, 2, 2, 2] and class_names == ("ant", "bee", "cat")
    assert [len(b["image"]) for b in images.batches()] == [2, 2, 1]  # and a second pass reads again


def test_a_file_that_cannot_be_a_whole_image_is_refused_by_path(tmp_path):
    cases = {
        "empty.jpg": (b"", "empty sample"),
        "cut.jpg": (_jpeg(1)[:-200], "JPEG without its end-of-image marker"),
        "._mac.jpg": (b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X", "not an image nearstore decodes"),
    }
    for name, (data, problem) in cases.items():
        root = tmp_path / name.strip("._")
        (root / "a").mkdir(parents=True)
        (root / "a" / "fine.png").write_bytes(_png(0))
        (root / "a" / name).write_bytes(data)
        with pytest.raises(DatasetError, match=rf"a/{re.escape(name)}: {problem}"):
            list(imagefolder_images(root).batches())
    _shard(tmp_path, "cut.tar", [("k0", {"jpg": _jpeg(0), "cls": b"0"}), ("k1", {"png": _png(1)[:-12], "cls": b"0"})])
    with pytest.raises(DatasetError, match=r"cut\.tar: sample 'k1': PNG without its IEND chunk"):
        list(webdataset_images(tmp_path / "cut.tar").batches())


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image folder at '.*nowhere'"):
        imagefolder_images(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(_jpeg(0))
    with pytest.raises(FileNotFoundError, match="no class folder in '.*flat'"):
        imagefolder_images(tmp_path / "flat")
    (tmp_path / "f" / "dog").mkdir(parents=True)
    (tmp_path / "f" / "dog" / "a.jpg").write_bytes(_jpeg(0))
    (tmp_path / "f" / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "f" / "empty" / "list.txt").write_text("no image here")
    with pytest.raises(FileNotFoundError, match="class folder '.*f/empty' has no image"):
        imagefolder_images(tmp_path / "f")
    with pytest.raises(ParameterError, match="batch must be >= 1 sample, got 0"):
        imagefolder_images(tmp_path / "f" / "dog", batch=0)
    (tmp_path / "loop" / "a").mkdir(parents=True)
    (tmp_path / "loop" / "a" / "x.png").write_bytes(_png(0))
    (tmp_path / "loop" / "a" / "up").symlink_to("..")  # a/up/a is a again: images under two labels, forever
    with pytest.raises(DatasetError, match="'.*loop/a/up/a' is '.*loop/a' again \\(a symlink loop"):
        imagefolder_images(tmp_path / "loop")


def _shard(tmp_path: Path, name: str, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    members = [(f"{key}.{ext}", data) for key, files in samples for ext, data in files.items()]
    return write_tar(tmp_path / name, members)


def test_webdataset_shards_are_stored_byte_for_byte(tmp_path):
    first = [
        ("train/s0", {"jpg": _jpeg(0), "cls": b"2", "json": b"{}"}),
        ("train/s1", {"PNG": _png(1), "cls": b" 0\n"}),  # extensions compared in lower case
        ("train/s2", {"png": _png(2), "jpg": _jpeg(2), "cls": b"1"}),  # jpg comes first in image_keys
        ("train/s3", {"jpeg": _jpeg(3) + b"\x00", "meta.json": b"{}", "cls": b"2"}),  # key: up to the first dot
    ]
    second = [("s4", {"webp": _webp(4), "cls": b"1"})]
    _shard(tmp_path, "shard-000.tar", first)
    write_tar(  # webdataset's "__key__"-style entries are metadata, not samples
        tmp_path / "shard-001.tar",
        [("__meta__", b"x"), *[(f"{k}.{e}", d) for k, f in second for e, d in f.items()]],
    )
    expected = [_jpeg(0), _png(1), _jpeg(2), _jpeg(3) + b"\x00", _webp(4)]
    for shards in (
        str(tmp_path / "shard-{000..001}.tar"),
        str(tmp_path / "shard-*.tar"),
        [tmp_path / "shard-000.tar", tmp_path / "shard-001.tar"],
    ):
        images = webdataset_images(shards, batch=2)
        assert images.num_samples is None
        stored, labels, class_names = _stored(images, tmp_path, overwrite=True)
        assert stored == expected and labels == [2, 0, 1, 2, 1]
        assert class_names == ("0", "1", "2")  # write_dataset's default, from the labels
    named = webdataset_images(
        tmp_path / "shard-000.tar", class_names=["a", "b", "c"], image_keys=["png", "JPG", "jpeg"]
    )
    stored, _, class_names = _stored(named, tmp_path, overwrite=True)
    assert class_names == ("a", "b", "c") and stored == [_jpeg(0), _png(1), _png(2), _jpeg(3) + b"\x00"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"txt": b"hi", "cls": b"1"}, r"bad\.tar: sample 'k1' has no image \(none of .jpg, .jpeg, .png, .webp; it has"),
        ({"jpg": b"j"}, r"bad\.tar: sample 'k1' has no label \.cls"),
        ({"0001.jpg": b"j", "0001.cls": b"1"}, r"it has \.0001\.jpg, \.0001\.cls; a key ends at the first dot"),
        ({"jpg": b"j", "cls": b"cat"}, r"bad\.tar: sample 'k1': label \.cls is not an integer: b'cat'"),
        ({"jpg": b"j", "cls": b"-1"}, r"bad\.tar: sample 'k1': label \.cls is -1; labels must be in \[0, 2\*\*63\)"),
        (
            {"jpg": b"j", "cls": b"9" * 20},
            r"bad\.tar: sample 'k1': label \.cls is 9{20}; labels must be in \[0, 2\*\*63\)",
        ),
    ],
)
def test_a_bad_webdataset_sample_is_named_by_shard_and_key(tmp_path, files, message):
    _shard(tmp_path, "bad.tar", [("k0", {"jpg": _jpeg(0), "cls": b"0"}), ("k1", files)])
    with pytest.raises(DatasetError, match=message):
        list(webdataset_images(tmp_path / "bad.tar").batches())


def test_webdataset_refusals(tmp_path):
    write_tar(tmp_path / "missing-002.tar", [])
    with pytest.raises(FileNotFoundError, match="no WebDataset shard at '.*missing-003.tar'"):
        webdataset_images(str(tmp_path / "missing-{002..003}.tar"))
    with pytest.raises(FileNotFoundError, match="no WebDataset shard matches"):
        webdataset_images(str(tmp_path / "train-*.tar"))
    for label, name in enumerate("abc"):
        _shard(tmp_path, f"s-{name}.tar", [("k", {"jpg": _jpeg(label), "cls": str(label).encode()})])
    nested = webdataset_images(str(tmp_path / "s-{a,{b,c}}.tar"))  # as bash expands it: each shard once
    assert [int(y) for batch in nested.batches() for y in batch["y"]] == [0, 1, 2]
    with pytest.raises(ParameterError, match=r"shard '.*s-a.tar' is named twice"):
        webdataset_images([str(tmp_path / "s-{a,b}.tar"), tmp_path / "s-a.tar"])
    with pytest.raises(ParameterError, match=r"the range \{3\.\.1\} runs down"):
        webdataset_images(str(tmp_path / "s-{3..1}.tar"))
    with pytest.raises(ParameterError, match="has a '{' without its '}'"):
        webdataset_images(str(tmp_path / "s-{a,b.tar"))
    _shard(tmp_path, "a.tar", [("k", {"jpg": b"j", "cls": b"3"})])
    with pytest.raises(
        DatasetError, match=r"a\.tar: sample 'k': label \.cls is 3; labels must be in \[0, 2\) for 2 class names"
    ):
        list(webdataset_images(tmp_path / "a.tar", class_names=["a", "b"]).batches())
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(DatasetError, match="junk.tar: not a readable tar file"):
        list(webdataset_images(tmp_path / "junk.tar").batches())


def test_a_webdataset_shard_cut_short_is_refused_not_read_as_fewer_samples(tmp_path):
    samples = [(f"s{i}", {"jpg": _jpeg(i), "cls": b"1"}) for i in range(4)]
    whole = _shard(tmp_path, "whole.tar", samples).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third = tar.getmember("s2.jpg").offset  # a cut between two samples leaves a tar of two
    cuts = {
        "cut.tar": whole[:third],
        "garbled.tar": whole[:third] + b"x" * 512 + whole[third + 512 :],
        "cut.tar.gz": gzip.compress(whole[:third]),
    }
    for name, data in cuts.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=rf"{name}: ends after sample 's1' without the end-of-archive marker"):
            list(webdataset_images(tmp_path / name).batches())
    (tmp_path / "whole.tar.gz").write_bytes(gzip.compress(whole))
    assert sum(len(b["y"]) for b in webdataset_images(tmp_path / "whole.tar.gz").batches()) == 4
    (tmp_path / "joined.tar").write_bytes(whole + whole)  # cat a.tar b.tar: readers stop at a's end
    with pytest.raises(DatasetError, match=r"joined.tar: holds data after its end-of-archive marker"):
        list(webdataset_images(tmp_path / "joined.tar").batches())
    (tmp_path / "padded.tar").write_bytes(whole + bytes(10240))  # zeros past the marker are padding
    assert sum(len(b["y"]) for b in webdataset_images(tmp_path / "padded.tar").batches()) == 4


MDS_COLUMNS = {"caption": "str", "idx": "int64", "image": "jpeg", "label": "int"}


def _mds_samples(n: int) -> list[dict[str, object]]:
    return [
        {"caption": "x" * i, "idx": 100 + i, "image": _jpeg(i, (8 + i, 8)) + b"\x00" * (i % 2), "label": i % 3}
        for i in range(n)
    ]


@pytest.mark.parametrize("compression", [None, "zstd:7", "gz"])
def test_mds_shards_are_stored_byte_for_byte(tmp_path, compression):
    samples = _mds_samples(10)
    root = write_mds(tmp_path / "mds", MDS_COLUMNS, samples, shard_samples=4, compression=compression)
    images = mds_images(root, batch=3)  # the columns by default: image the jpeg one, label the one named so
    assert images.num_samples == 10 and images.class_names is None
    stored, labels, class_names = _stored(images, tmp_path)
    assert stored == [s["image"] for s in samples]
    assert labels == [s["label"] for s in samples] and class_names == ("0", "1", "2")


def test_mds_columns_can_be_named_and_of_other_integer_encodings(tmp_path):
    columns = {"a_png": "png", "blob": "bytes", "klass": "str_int", "small": "uint8"}
    samples = [{"a_png": _png(i), "blob": _webp(i) + bytes([i]) * i, "klass": i % 2, "small": 4 - i} for i in range(5)]
    root = write_mds(tmp_path / "mds", columns, samples, shard_samples=2)
    stored, labels, _ = _stored(mds_images(root), tmp_path)  # the png column, the first integer column
    assert stored == [s["a_png"] for s in samples] and labels == [0, 1, 0, 1, 0]
    chosen = mds_images(root, image_column="blob", label_column="small", class_names="abcde")
    stored, labels, class_names = _stored(chosen, tmp_path, overwrite=True)
    assert stored == [s["blob"] for s in samples] and labels == [4, 3, 2, 1, 0] and class_names == tuple("abcde")


@pytest.mark.parametrize(
    ("columns", "options", "message"),
    [
        (
            {"image": "pil", "label": "int"},
            {},
            r"no column of encoding jpeg, png, bytes \(column 'image' is 'pil': raw pixels",
        ),
        ({"image": "pil", "label": "int"}, {"image_column": "image"}, r"image column 'image' has encoding 'pil'"),
        (
            {"image": "jpeg", "label": "int", "caption": "str"},
            {"image_column": "caption"},
            r"image column 'caption' has encoding 'str'",
        ),
        ({"image": "jpeg", "label": "float32"}, {}, r"label column 'label' has encoding 'float32', not an integer"),
        ({"image": "jpeg", "idx": "int", "label": "str"}, {}, r"label column 'label' has encoding 'str'.*idx \(int\)"),
        ({"image": "jpeg", "caption": "str"}, {}, r"no integer label column; columns: image \(jpeg\), caption"),
        ({"image": "jpeg", "label": "int"}, {"label_column": "image"}, r"label column 'image' has encoding 'jpeg'"),
        ({"image": "jpeg", "label": "int"}, {"image_column": "img"}, r"no column 'img'; columns: image \(jpeg\)"),
    ],
)
def test_mds_columns_that_cannot_be_converted_are_named(tmp_path, columns, options, message):
    index = tmp_path / "mds" / "index.json"
    index.parent.mkdir()
    shard = {
        "column_names": list(columns),
        "column_encodings": list(columns.values()),
        "column_sizes": [None] * len(columns),
        "format": "mds",
        "version": 2,
        "samples": 1,
        "raw_data": {"basename": "shard.00000.mds"},
        "zip_data": None,
    }
    index.write_text(json.dumps({"version": 2, "shards": [shard]}))
    with pytest.raises(DatasetError, match=message):
        mds_images(index.parent, **options)


def test_mds_refusals_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MDS index at '.*nothing/index.json'"):
        mds_images(tmp_path / "nothing")
    root = write_mds(tmp_path / "mds", MDS_COLUMNS, _mds_samples(6), shard_samples=4)
    shard = root / "shard.00001.mds"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"shard.00001.mds: \d+ bytes, index.json says \d+ \(truncated"):
        list(mds_images(root).batches())
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard.00001.mds: shard file missing"):
        list(mds_images(root).batches())
    packed = write_mds(tmp_path / "br", MDS_COLUMNS, _mds_samples(2), compression="gz")
    index = (packed / "index.json").read_text().replace('"gz"', '"br:11"')
    (packed / "index.json").write_text(index)
    with pytest.raises(DatasetError, match=r"shard.00000.mds.gz: compression 'br:11' is not read here"):
        list(mds_images(packed).batches())
