"""Converters of encoded images: an ImageFolder, WebDataset tar shards and MosaicML Streaming (MDS)
shards, each read as a stream into batches {"image": the file's bytes, "y": int64 label}.

The bytes are stored exactly as they were encoded (no decoding, no re-encoding): migrating a
dataset to nearstore is lossless, and a JPEG read back from the store is the file that went in.
Only one batch of samples is in memory at a time (one whole shard for a compressed MDS shard).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numcodecs
import numpy as np

from nearstore import Dataset, DatasetError, ParameterError, write_dataset
from nearstore.app.converters import Batches
from nearstore.storage.images import damaged

# Encoded images are large (tens of kB each): a batch this size is a few MB, not a few GB.
DEFAULT_IMAGE_BATCH = 256
# torchvision.datasets.folder.IMG_EXTENSIONS, compared case-insensitively as torchvision does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_BOUND = 1 << 63  # labels are stored as int64


@dataclass(frozen=True)
class EncodedImages:
    """Encoded images and their labels, ready for `write_dataset`: batches {"image": 1-D object
    array of `bytes`, "y": int64 labels}, with the sample count and class names where the source
    knows them (None: unknown; write_dataset then names classes "0".."C-1")."""

    num_samples: int | None
    class_names: tuple[str, ...] | None
    _read: Callable[[], Batches] = field(repr=False)

    def batches(self) -> Batches:
        """A fresh pass over the source, one batch in memory at a time."""
        return self._read()

    def write(self, url: str, **options: Any) -> Dataset:
        """Write the images to a new dataset at `url`; `options` go to `write_dataset`."""
        return write_dataset(url, self.batches(), class_names=self.class_names, num_samples=self.num_samples, **options)


def imagefolder_images(root: str | Path, *, batch: int = DEFAULT_IMAGE_BATCH) -> EncodedImages:
    """torchvision's ImageFolder layout, `root/<class>/**/<file>`: classes are the sorted subfolder
    names, a label the class's index, and samples come in torchvision's order (class, then path),
    so sample i here is sample i of `torchvision.datasets.ImageFolder(root)`.

    Files without one of IMG_EXTENSIONS are skipped, as torchvision skips them; a class folder with
    no image is refused, as torchvision refuses it. Only the file list is read now.
    """
    _check_batch(batch)
    files, classes = imagefolder_files(root)

    def read() -> Batches:
        return encoded_batches(((checked_image(Path(path).read_bytes(), path), label) for path, label in files), batch)

    return EncodedImages(len(files), classes, read)


def imagefolder_files(root: str | Path) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """The (path, label) of every image of an ImageFolder in torchvision's order, and its classes
    (the sorted subfolder names); FileNotFoundError naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {str(root)!r}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folder in {str(root)!r} (an image folder holds root/<class>/<image>)")
    files: list[tuple[str, int]] = []
    walked: dict[tuple[int, int], str] = {}  # each folder walked, by (device, inode): links may lead back
    for label, name in enumerate(classes):
        folders = []
        for folder, _, names in os.walk(root / name, followlinks=True):
            status = os.stat(folder)
            if (status.st_dev, status.st_ino) in walked:
                raise DatasetError(
                    f"{folder!r} is {walked[status.st_dev, status.st_ino]!r} again (a symlink loop, or two links to "
                    "one folder): its images would be stored twice, under more than one label"
                )
            walked[status.st_dev, status.st_ino] = folder
            folders.append((folder, names))
        found = [
            os.path.join(folder, file)
            for folder, names in sorted(folders)
            for file in sorted(names)
            if file.lower().endswith(IMG_EXTENSIONS)
        ]
        if not found:
            raise FileNotFoundError(
                f"class folder {str(root / name)!r} has no image (extensions: {', '.join(IMG_EXTENSIONS)})"
            )
        files.extend((path, label) for path in found)
    return files, tuple(classes)


def webdataset_images(
    shards: str | Path | Sequence[str | Path],
    *,
    image_keys: Sequence[str] = WEBDATASET_IMAGE_KEYS,
    label_key: str = "cls",
    class_names: Sequence[str] | None = None,
    batch: int = DEFAULT_IMAGE_BATCH,
) -> EncodedImages:
    """WebDataset tar shards: `shards` is a path, a list of paths, or a pattern with `{000..099}`
    ranges, `{a,b}` lists or glob wildcards. A sample is the run of files sharing a key (the path
    up to the first dot of the file name, as webdataset groups them); its image is the first of
    `image_keys` it has, its label the ASCII integer in its `label_key` file.
    """
    _check_batch(batch)
    paths = _shard_paths(shards)
    image_keys = tuple(key.lower() for key in image_keys)
    if not image_keys:
        raise ParameterError("image_keys must name at least one extension, got none")
    names = tuple(class_names) if class_names is not None else None

    def samples() -> Iterator[tuple[bytes, int]]:
        for path in paths:
            for key, files in _tar_samples(path, {*image_keys, label_key}):
                image = next((files[k] for k in image_keys if k in files), None)
                if image is None:
                    raise DatasetError(
                        f"{path}: sample {key!r} has no image (none of .{', .'.join(image_keys)}; "
                        f"it has {_extensions(files)})"
                    )
                if label_key not in files:
                    raise DatasetError(
                        f"{path}: sample {key!r} has no label .{label_key} (it has {_extensions(files)})"
                    )
                label = _label(files[label_key], names, f"{path}: sample {key!r}: label .{label_key}")
                yield checked_image(image, f"{path}: sample {key!r}"), label

    return EncodedImages(None, names, lambda: encoded_batches(samples(), batch))


def mds_images(
    root: str | Path,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    batch: int = DEFAULT_IMAGE_BATCH,
) -> EncodedImages:
    """A MosaicML Streaming MDS dataset (a folder with index.json and its shards), read by this
    module, not by the `streaming` package. Shards may be uncompressed or compressed with zstd,
    gz or bz2 (a compressed shard is decompressed whole, one at a time).

    image_column: a column of encoding jpeg, png or bytes (stored as they are); default the first
        jpeg or png column, else the first bytes column. `pil` columns are refused: they hold raw
        pixels, not an encoded file.
    label_column: an integer column (int, int8..int64, uint8..uint64, str_int); default one named
        label, y, class, cls or target, else the first integer column.
    """
    _check_batch(batch)
    root = Path(root)
    index_path = root / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no MDS index at {str(index_path)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{index_path}: not a JSON index: {e}") from None
    shards = index.get("shards") if isinstance(index, dict) else None
    if not shards:
        raise DatasetError(f"{index_path}: no shards listed")
    for shard in shards:
        if shard.get("format") != "mds" or shard.get("version") != 2:
            raise DatasetError(
                f"{index_path}: shard {_shard_name(shard)} is format {shard.get('format')!r} version "
                f"{shard.get('version')!r}; only MDS version 2 is read"
            )
    columns = _mds_listed(shards[0])
    image = image_column or _mds_default_image(columns, str(index_path))
    label = label_column or _mds_default_label(columns, str(index_path))
    names = tuple(class_names) if class_names is not None else None
    for shard in shards:  # every shard before the first sample: a merged index may mix layouts
        where = f"{root}/{_shard_name(shard, root)}"
        _mds_check(_mds_listed(shard), image, _MDS_IMAGES, "image", where)
        _mds_check(_mds_listed(shard), label, tuple(_MDS_INTEGERS), "label", where)

    def samples() -> Iterator[tuple[bytes, int]]:
        for shard in shards:
            where = f"{root}/{_shard_name(shard, root)}"
            decode = _MDS_INTEGERS[_mds_listed(shard)[label]]
            for i, data in enumerate(_mds_shard_samples(root, shard, where)):
                fields = _mds_fields(data, shard, f"{where}: sample {i}")
                label_of = _label(fields[label], names, f"{where}: sample {i}: column {label!r}", decode)
                yield checked_image(fields[image], f"{where}: sample {i}: column {image!r}"), label_of

    total = sum(int(shard["samples"]) for shard in shards)
    return EncodedImages(total, names, lambda: encoded_batches(samples(), batch))


def encoded_batches(samples: Iterable[tuple[bytes, int]], batch: int = DEFAULT_IMAGE_BATCH) -> Batches:
    """Batches {"image", "y"} of `batch` samples from (encoded bytes, label) pairs, as they come."""
    _check_batch(batch)
    images: list[bytes] = []
    labels: list[int] = []
    for image, label in samples:
        images.append(image)
        labels.append(label)
        if len(images) == batch:
            yield _batch(images, labels)
            images, labels = [], []
    if images:
        yield _batch(images, labels)


def _check_batch(batch: int) -> None:
    if batch < 1:
        raise ParameterError(f"batch must be >= 1 sample, got {batch}")


def _batch(images: list[bytes], labels: list[int]) -> dict[str, np.ndarray]:
    # Filled element by element: np.asarray(images) would make a fixed-width "S" array, which
    # drops trailing NUL bytes, and a JPEG may well end in one.
    encoded = np.empty(len(images), dtype=object)
    encoded[:] = images
    return {"image": encoded, "y": np.asarray(labels, dtype=np.int64)}


def checked_image(blob: bytes, where: str) -> bytes:
    """`blob`, refused naming `where` if it cannot be a whole image (`images.damaged`): a file cut
    short, empty or of another kind is caught here, not by sample id in the middle of training."""
    problem = damaged(blob)
    if problem is not None:
        raise DatasetError(f"{where}: {problem}; remove it or replace it, then convert again")
    return blob


def _label(
    data: bytes, class_names: tuple[str, ...] | None, where: str, decode: Callable[[bytes], int] | None = None
) -> int:
    try:
        label = decode(data) if decode is not None else int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError, IndexError):
        raise DatasetError(f"{where} is not an integer: {data[:32]!r}") from None
    if label < 0 or label >= (len(class_names) if class_names is not None else LABEL_BOUND):
        count = len(class_names) if class_names is not None else None
        bound = f"in [0, {count}) for {count} class names" if count is not None else "in [0, 2**63)"
        raise DatasetError(f"{where} is {label}; labels must be {bound}")
    return label


# WebDataset ----------------------------------------------------------------------------------------

# webdataset's own rules (tariterators.py): the key is the path up to the first dot of the file
# name; "__...__" entries are metadata, not sample files.
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_WDS_META = re.compile(r"__[^/]*__($|/)")


def _tar_samples(path: str, keep: set[str]) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {extension: bytes}) for each sample of one shard, read as a stream; only the files
    whose extension is in `keep` are read into memory (the others: None)."""
    key: str | None = None
    files: dict[str, bytes | None] = {}
    marked = _end_marked()
    try:
        with tarfile.open(path, mode="r|*", tarinfo=marked) as stream:
            for member in stream:
                match = _WDS_KEY.match(member.name)
                if not member.isreg() or _WDS_META.match(member.name) or match is None:
                    continue
                prefix, extension = match.group(1), match.group(2).lower()
                if prefix != key:
                    if key is not None:
                        yield key, files
                    key, files = prefix, {}
                if extension in files:
                    raise DatasetError(f"{path}: sample {key!r} has two .{extension} files")
                files[extension] = stream.extractfile(member).read() if extension in keep else None
                # A streamed TarFile keeps every header it passed; a shard may hold millions.
                stream.members = []
            if marked.ended and _data_follows(stream.fileobj):
                raise DatasetError(
                    f"{path}: holds data after its end-of-archive marker (tars joined by `cat`?), which tar "
                    "readers do not read: convert each tar as a shard of its own"
                )
    except tarfile.TarError as e:
        raise DatasetError(f"{path}: not a readable tar file: {e}") from None
    if not marked.ended:  # tarfile ends a stream cut between two members, or at a garbled header, silently
        after = f"after sample {key!r}" if key is not None else "before its first sample"
        raise DatasetError(f"{path}: ends {after} without the end-of-archive marker (cut short, or damaged there)")
    if key is not None:
        yield key, files


def _data_follows(stream: BinaryIO) -> bool:
    """Whether anything but zeros (the end marker's second block, the record's padding) is left."""
    while chunk := stream.read(1 << 20):
        if chunk.count(0) != len(chunk):
            return True
    return False


def _end_marked() -> type[tarfile.TarInfo]:
    """A TarInfo class of its own for one stream, whose `ended` says whether the stream reached the
    end-of-archive marker (a zero block) rather than the end of the data or an unreadable header."""

    class Marked(tarfile.TarInfo):
        ended = False

        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tar)
            except tarfile.EOFHeaderError:
                cls.ended = True
                raise

    return Marked


def _extensions(files: dict[str, bytes | None]) -> str:
    listed = ", ".join(f".{k}" for k in files)
    # webdataset's key ends at the first dot of the file name: img.0001.jpg is sample img's .0001.jpg
    dotted = any("." in k for k in files)
    return listed + ("; a key ends at the first dot of a file's name" if dotted else "")


def _shard_paths(shards: str | Path | Sequence[str | Path]) -> list[str]:
    patterns = [shards] if isinstance(shards, (str, Path)) else list(shards)
    if not patterns:
        raise ParameterError("no WebDataset shard given")
    paths = [path for pattern in patterns for path in _expand(str(pattern))]
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no WebDataset shard at {path!r}")
    twice = next((path for path, times in Counter(paths).items() if times > 1), None)
    if twice is not None:
        raise ParameterError(f"WebDataset shard {twice!r} is named twice: its samples would be stored twice")
    return paths


def _expand(pattern: str) -> list[str]:
    """The shard names of a webdataset pattern, as bash's brace expansion: `{000..099}` (zero
    padding kept), `{a,b}`, nested `{a,{b,c}}`, then glob wildcards (sorted matches)."""
    start = pattern.find("{")
    if start < 0:
        if not any(c in pattern for c in "*?["):
            return [pattern]
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"no WebDataset shard matches {pattern!r}")
        return matches
    depth, commas = 0, []  # the brace's end and its own commas, not those of a brace inside it
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 1 and pattern[end] == ",":
            commas.append(end)
        if depth == 0:
            break
    else:
        raise ParameterError(f"WebDataset pattern {pattern!r} has a '{{' without its '}}'")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        low, high = span.groups()
        if int(low) > int(high):
            raise ParameterError(f"WebDataset pattern {pattern!r}: the range {{{body}}} runs down; write it upwards")
        width = len(low) if len(low) == len(high) else 0
        parts = [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    else:
        cuts = [start, *commas, end]
        parts = [pattern[a + 1 : b] for a, b in zip(cuts, cuts[1:])]
    return [path for part in parts for path in _expand(head + part + tail)]


# MosaicML Streaming MDS ----------------------------------------------------------------------------
# A shard (streaming/base/format/mds/writer.py): uint32 sample count n, uint32 offsets[n + 1] from
# the file's start, the JSON config, then the samples. A sample: one uint32 size for each column of
# variable size (column_sizes[i] is None), in column order, then each column's bytes in that order.

_MDS_IMAGES = ("jpeg", "png", "bytes")
_MDS_INTEGERS: dict[str, Callable[[bytes], int]] = {
    **{
        name: (lambda data, dtype=dtype: int(np.frombuffer(data, dtype)[0]))
        for name, dtype in {
            "int": "<i8",
            "int8": "i1",
            "int16": "<i2",
            "int32": "<i4",
            "int64": "<i8",
            "uint8": "u1",
            "uint16": "<u2",
            "uint32": "<u4",
            "uint64": "<u8",
        }.items()
    },
    "str_int": lambda data: int(data.decode("ascii")),
}
_MDS_LABEL_NAMES = ("label", "labels", "y", "class", "cls", "target", "targets")
_MDS_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "zstd": lambda data: bytes(numcodecs.Zstd().decode(data)),
    "gz": gzip.decompress,
    "bz2": bz2.decompress,
}


def _mds_listed(shard: dict[str, Any]) -> dict[str, str]:
    """{column name: encoding} of one shard, in the shard's column order."""
    return dict(zip(shard["column_names"], shard["column_encodings"]))


def _mds_default_image(columns: dict[str, str], where: str) -> str:
    images = [c for c, e in columns.items() if e in ("jpeg", "png")] or [c for c, e in columns.items() if e == "bytes"]
    if not images:
        pil = [c for c, e in columns.items() if e == "pil"]
        hint = f" (column {pil[0]!r} is 'pil': raw pixels, not an encoded file)" if pil else ""
        raise DatasetError(f"{where}: no column of encoding {', '.join(_MDS_IMAGES)}{hint}; {_mds_listing(columns)}")
    return images[0]


def _mds_default_label(columns: dict[str, str], where: str) -> str:
    """The column named as a label (`_MDS_LABEL_NAMES`), else the first integer one. A label-named
    column of another encoding (strings) is refused, not passed over for an integer column (an
    index would be read as the labels)."""
    named = [c for c in columns if c.lower() in _MDS_LABEL_NAMES]
    integers = [c for c, e in columns.items() if e in _MDS_INTEGERS]
    if named and columns[named[0]] not in _MDS_INTEGERS:
        raise DatasetError(
            f"{where}: label column {named[0]!r} has encoding {columns[named[0]]!r}, not an integer one "
            f"{tuple(_MDS_INTEGERS)}; name an integer one with --label-key (label_column=); {_mds_listing(columns)}"
        )
    if not integers:
        raise DatasetError(f"{where}: no integer label column; {_mds_listing(columns)}")
    return (named or integers)[0]


def _mds_check(columns: dict[str, str], name: str, allowed: tuple[str, ...], role: str, where: str) -> None:
    if name not in columns:
        raise DatasetError(f"{where}: no column {name!r}; {_mds_listing(columns)}")
    encoding = columns[name]
    if encoding == "pil" and role == "image":
        raise DatasetError(
            f"{where}: image column {name!r} has encoding 'pil': raw pixels, not an encoded file; "
            "write the images as jpeg or png to keep the migration lossless"
        )
    if encoding not in allowed:
        raise DatasetError(
            f"{where}: {role} column {name!r} has encoding {encoding!r}; a {role} column must be one of {allowed}"
        )


def _mds_listing(columns: dict[str, str]) -> str:
    return "columns: " + ", ".join(f"{c} ({e})" for c, e in columns.items())


def _shard_name(shard: dict[str, Any], root: Path | None = None) -> str:
    """The shard's file name: the raw one, or the compressed one where only that is under `root`."""
    raw, packed = shard.get("raw_data") or {}, shard.get("zip_data") or {}
    if packed and root is not None and not (root / raw.get("basename", "")).is_file():
        return str(packed.get("basename", "?"))
    return str(raw.get("basename") or packed.get("basename", "?"))


def _mds_fields(data: bytes, shard: dict[str, Any], where: str) -> dict[str, bytes]:
    """{column: its bytes} of one sample."""
    sizes = shard["column_sizes"]
    head = 4 * sum(size is None for size in sizes)
    if len(data) < head:
        raise DatasetError(f"{where}: {len(data)} bytes, too short for its {head // 4} column sizes")
    varying = iter(np.frombuffer(data[:head], "<u4").tolist())
    fields, start = {}, head
    for name, size in zip(shard["column_names"], sizes):
        n = next(varying) if size is None else size
        fields[name] = data[start : start + n]
        start += n
    if start != len(data):
        raise DatasetError(f"{where}: its columns hold {start} bytes, the sample has {len(data)}")
    return fields


def _mds_shard_samples(root: Path, shard: dict[str, Any], where: str) -> Iterator[bytes]:
    """Each sample's bytes, in order; an uncompressed shard is read sample by sample."""
    raw, packed = shard.get("raw_data"), shard.get("zip_data")
    if raw and (root / raw["basename"]).is_file():
        with open(root / raw["basename"], "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if raw.get("bytes") not in (None, size):
                raise DatasetError(f"{where}: {size} bytes, index.json says {raw['bytes']} (truncated or changed?)")
            offsets = _mds_offsets(f.read, shard, size, where)
            f.seek(int(offsets[0]))
            for begin, end in zip(offsets[:-1], offsets[1:]):
                yield f.read(int(end - begin))
        return
    if not packed:
        raise FileNotFoundError(f"{where}: shard file missing")
    compression = str(shard.get("compression") or "").split(":")[0]
    if compression not in _MDS_DECOMPRESS:
        raise DatasetError(
            f"{where}: compression {shard.get('compression')!r} is not read here "
            f"(only {', '.join(_MDS_DECOMPRESS)}); decompress the shards first"
        )
    try:
        data = _MDS_DECOMPRESS[compression]((root / packed["basename"]).read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: shard file missing, compressed or not") from None
    except Exception as e:  # each decompressor raises its own kind of error on corrupt data
        raise DatasetError(f"{where}: cannot decompress ({compression}): {e}") from None
    view = memoryview(data)
    cursor = 0

    def read(n: int) -> bytes:
        nonlocal cursor
        cursor += n
        return bytes(view[cursor - n : cursor])

    offsets = _mds_offsets(read, shard, len(data), where)
    for begin, end in zip(offsets[:-1], offsets[1:]):
        yield bytes(view[int(begin) : int(end)])


def _mds_offsets(read: Callable[[int], bytes], shard: dict[str, Any], size: int, where: str) -> np.ndarray:
    head = read(4)
    count = int(np.frombuffer(head, "<u4")[0]) if len(head) == 4 else -1
    if count != shard["samples"]:
        raise DatasetError(f"{where}: holds {count} samples, index.json says {shard['samples']}")
    offsets = np.frombuffer(read(4 * (count + 1)), "<u4").astype(np.int64)
    if len(offsets) != count + 1 or np.any(np.diff(offsets) < 0) or offsets[-1] > size:
        raise DatasetError(f"{where}: sample offsets are not those of an MDS shard of {size} bytes")
    return offsets
