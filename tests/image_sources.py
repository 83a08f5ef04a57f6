"""Real files of the encoded-image formats nearstore converts, written as their own tools write them:
WebDataset tar shards (by tarfile: a shard is a plain tar) and MosaicML Streaming MDS folders (by a
small writer that follows `streaming/base/format/mds/writer.py`, byte for byte)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numcodecs
import numpy as np


def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    """A tar of (name, content) files, in the given order (a WebDataset sample's files are adjacent)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# MDSWriter's fixed-size encodings and how it packs them; every other column is of variable size.
_FIXED = {"int": "<i8", "int8": "i1", "int16": "<i2", "int32": "<i4", "int64": "<i8", "uint8": "u1", "uint32": "<u4"}
_COMPRESS = {"zstd": lambda data: bytes(numcodecs.Zstd(level=3).encode(data)), "gz": gzip.compress}


def write_mds(
    root: Path,
    columns: dict[str, str],
    samples: Sequence[dict[str, object]],
    *,
    shard_samples: int = 4,
    compression: str | None = None,
) -> Path:
    """An MDS folder: index.json and shards of `shard_samples` samples, as MDSWriter writes them.

    columns: {name: MDS encoding}; values are bytes (taken as they are, as MDSWriter takes them),
    str for `str`/`str_int`, int for the integer encodings.
    """
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(columns)  # MDSWriter orders the columns by name
    encodings = [columns[n] for n in names]
    sizes = [np.dtype(_FIXED[e]).itemsize if e in _FIXED else None for e in encodings]
    config = {
        "column_encodings": encodings,
        "column_names": names,
        "column_sizes": sizes,
        "compression": compression,
        "format": "mds",
        "hashes": [],
        "size_limit": None,
        "version": 2,
    }
    config_data = json.dumps(config, sort_keys=True).encode()
    shards = []
    for number, start in enumerate(range(0, len(samples), shard_samples)):
        encoded = [_encode_sample(s, names, encodings, sizes) for s in samples[start : start + shard_samples]]
        count = np.uint32(len(encoded))
        offsets = np.array([0, *map(len, encoded)]).cumsum().astype(np.uint32)
        offsets += len(count.tobytes()) + len(offsets.tobytes()) + len(config_data)
        raw = count.tobytes() + offsets.tobytes() + config_data + b"".join(encoded)
        basename = f"shard.{number:05}.mds"
        raw_info = {"basename": basename, "bytes": len(raw), "hashes": {}}
        zip_info = None
        if compression:
            packed = _COMPRESS[compression.split(":")[0]](raw)
            zip_info = {"basename": f"{basename}.{compression.split(':')[0]}", "bytes": len(packed), "hashes": {}}
            (root / zip_info["basename"]).write_bytes(packed)
        else:
            (root / basename).write_bytes(raw)
        shards.append({"samples": len(encoded), "raw_data": raw_info, "zip_data": zip_info, **config})
    (root / "index.json").write_text(json.dumps({"version": 2, "shards": shards}, sort_keys=True))
    return root


def _encode_sample(sample: dict[str, object], names: list[str], encodings: list[str], sizes: list[int | None]) -> bytes:
    data = []
    for name, encoding in zip(names, encodings):
        value = sample[name]
        if isinstance(value, bytes):
            data.append(value)
        elif encoding in _FIXED:
            data.append(np.array(value, _FIXED[encoding]).tobytes())
        else:
            data.append(str(value).encode())
    head = np.array([len(d) for d, size in zip(data, sizes) if size is None], np.uint32).tobytes()
    return head + b"".join(data)
