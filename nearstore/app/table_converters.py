"""Converters of tables: Parquet files and Arrow IPC files or streams (Feather v2, Hugging Face
datasets' .arrow), read record batch by record batch into batches {column: array} for
`write_dataset`, one column an array:

- integer, float or bool scalars: a fixed-size array (n,); the label column among them, which may
  also hold strings (or a dictionary of them: pandas' categoricals), class names stored as their
  index among the sorted names;
- `fixed_size_list` of numbers (nested for more axes), or `list` / `large_list` whose every row
  has the same length: a fixed-size array (n, *shape);
- `list` / `large_list` of numbers (or of fixed-size lists of numbers: rows of that shape) of
  varying length: a ragged numeric array (`nearstore.storage.ragged`);
- `binary`, `large_binary`, `fixed_size_binary`: encoded samples, each row's bytes as they are;
- `struct<bytes: binary, path: string>`, Hugging Face datasets' `Image` (and `Audio`): encoded
  samples too, a row's bytes, or where they are null the file at its path (relative to the
  table's file).

Arrow's view types (string, binary and list views, what polars and newer Arrow write) are read as
their plain twins. Strings, lists of variable-length lists and any other type are refused naming
the column and its type, a null naming the column and the row. Whether a list column is of one
length is found by a first pass over the list columns alone (their lengths and nulls, a batch at a
time), so that a column is never first written one way and then found to need the other; that pass
reads an integer label column too, so that a negative label is refused before anything is written.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from nearstore import Dataset, DatasetError, ParameterError, write_dataset
from nearstore.app.converters import Batches, refuse_negative_labels
from nearstore.app.encoded_converters import IMG_EXTENSIONS, checked_image
from nearstore.storage.images import looks_like_image
from nearstore.storage.writer import array_name_problem

# A record batch is cut to this many rows: about a shard's worth (write_dataset's default), and a
# few hundred MB at most of encoded images of a few hundred kB.
TABLE_BATCH = 1024
# The file name suffixes of each format, by which `table_format` tells them.
TABLE_SUFFIXES = {"parquet": (".parquet", ".pq"), "arrow": (".arrow", ".feather", ".ipc")}
DEFAULT_LABEL = "label"


@dataclass(frozen=True)
class Column:
    """How a table column is stored: "fixed" (a sample of `shape`), "ragged" (a sample of rows of
    `shape`, any number of them), "bytes" (encoded) or "names" (string labels, which
    `write_dataset` stores as class ids); `dtype` and `shape` unused but for the first two."""

    name: str
    kind: Literal["fixed", "ragged", "bytes", "names"]
    dtype: np.dtype | None = None
    shape: tuple[int, ...] = ()

    def numpy(self, array: pa.Array) -> np.ndarray:
        """The column of one record batch (checked for nulls) as `write_dataset` takes it."""
        n = len(array)
        if self.kind == "names":
            return np.asarray(array.to_pylist(), dtype=str)
        if self.kind == "bytes":
            out = np.empty(n, dtype=object)  # not np.asarray: it would drop trailing NUL bytes
            out[:] = array.to_pylist()
            return out
        values = _leaf(array).to_numpy(zero_copy_only=False)
        if self.kind == "fixed":
            return values.reshape(n, *self.shape)
        offsets = np.asarray(array.offsets, dtype=np.int64)
        rows = values.reshape(-1, *self.shape)
        out = np.empty(n, dtype=object)
        for i, sample in enumerate(np.split(rows, offsets[1:-1] - offsets[0]) if n else []):
            out[i] = sample  # one by one: samples of one length would be broadcast into a 2-D array
        return out


@dataclass(frozen=True)
class Table:
    """Parquet or Arrow IPC files read as one table, ready for `write_dataset`: batches {column
    name: array} of at most `batch` rows, files in order; the label column (None: unlabelled) and
    its class names where known (None: write_dataset names them "0".."C-1")."""

    kind: str
    paths: tuple[str, ...]
    columns: tuple[Column, ...]
    label: str | None
    class_names: tuple[str, ...] | None
    num_samples: int
    batch: int = field(default=TABLE_BATCH, repr=False)

    def batches(self) -> Batches:
        """A fresh pass over the files, one record batch in memory at a time."""
        names = [column.name for column in self.columns]
        for path in self.paths:
            row = 0
            for batch in _record_batches(self.kind, path, names, self.batch):
                arrays = {column.name: batch.column(column.name) for column in self.columns}
                for name, array in arrays.items():
                    _refuse_nulls(array, name, path, row)
                    if pa.types.is_struct(array.type):
                        arrays[name] = _embedded(array, name, path, row)
                out = {column.name: column.numpy(arrays[column.name]) for column in self.columns}
                for column in self.columns:
                    if column.kind == "bytes":
                        _refuse_damaged_images(out[column.name], column.name, path, row)
                yield out
                row += batch.num_rows

    def write(self, url: str, **options: Any) -> Dataset:
        """Write the table to a new dataset at `url`; `options` go to `write_dataset`."""
        return write_dataset(
            url,
            self.batches(),
            label_array=self.label,
            class_names=self.class_names,
            num_samples=self.num_samples,
            **options,
        )


def open_table(
    source: str | Path | Sequence[str | Path],
    *,
    format: str | None = None,
    columns: Sequence[str] | None = None,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    batch: int = TABLE_BATCH,
    progress: bool = False,
) -> Table:
    """Parquet or Arrow IPC files as one `Table`: their schemas checked against each other and the
    list columns surveyed (lengths and nulls); no other sample is read now.

    source: a file, a directory (its files of the format, recursively, sorted), a glob pattern
        (`**` recursive), or a list of these; files are read in that order.
    format: "parquet" or "arrow"; default told by the files' suffixes (`TABLE_SUFFIXES`).
    columns: the columns to store (default every one); the label column is stored too.
    label_column: the integer column of labels ("": none); default "label" where the table has
        one, else the dataset is unlabelled. A column named here must be there.
    class_names: default the Hugging Face `ClassLabel` names in the schema's metadata, if any.
    """
    if batch < 1:
        raise ParameterError(f"batch must be >= 1 row, got {batch}")
    if format is not None and format not in TABLE_SUFFIXES:
        raise ParameterError(f"format must be one of {tuple(TABLE_SUFFIXES)}, got {format!r}")
    paths = _table_paths(source, format)
    kind = format or _format_of(paths)
    schemas = [_schema(kind, path) for path in paths]
    first, schema = paths[0], schemas[0]
    label = _label_column(schema, label_column, first)
    names = list(schema.names if columns is None else dict.fromkeys(columns))
    for name in names:
        if name not in schema.names:
            raise DatasetError(f"{first}: no column {name!r}; it has {schema.names}")
    if label is not None and label not in names:
        names.append(label)
    if not [name for name in names if name != label]:
        besides = f" besides the label {label!r}" if label else ""
        raise DatasetError(f"{first}: no column to store{besides}")
    for path, other in zip(paths[1:], schemas[1:]):
        for name in names:
            if name not in other.names:
                raise DatasetError(f"{path}: no column {name!r}, which {first} has; it has {other.names}")
            if other.field(name).type != schema.field(name).type:
                raise DatasetError(
                    f"{path}: column {name!r} is {other.field(name).type}, {first} has it as {schema.field(name).type}"
                )
    stored = [
        Column(name, "names")
        if name == label and _strings(schema.field(name).type)
        else _column(schema.field(name), first)
        for name in names
    ]
    integer_label = label if label is not None and not _strings(schema.field(label).type) else None
    stored, num_samples = _survey(kind, paths, stored, integer_label, batch, progress)
    if any(column.name == integer_label and column.kind == "ragged" for column in stored):
        raise DatasetError(
            f"{first}: label column {label!r} holds lists of other lengths than 1: a label is one integer"
        )
    if class_names is None and label is not None:
        class_names = _huggingface_class_names(schema, label)
    if class_names is None and label is not None and _strings(schema.field(label).type):
        class_names = _label_names(kind, paths, label, batch)
    return Table(
        kind, tuple(paths), tuple(stored), label, tuple(class_names) if class_names else None, num_samples, batch
    )


def table_format(source: str) -> str | None:
    """The format a `convert` source names by its suffix ("data/*.parquet" too), or, for a
    directory, that of the first table or image file in it, recursively as `open_table` reads them;
    None for neither, or an image first."""
    path = Path(source)
    if not path.is_dir():
        return _suffix_format(source)
    for entry in path.rglob("*"):  # the first data file decides: an image folder's first is an image
        if not entry.is_file():
            continue
        if entry.name.lower().endswith(IMG_EXTENSIONS):
            return None
        if _suffix_format(entry.name) is not None:
            return _suffix_format(entry.name)
    return None


def _suffix_format(name: str) -> str | None:
    return next((kind for kind, suffixes in TABLE_SUFFIXES.items() if name.endswith(suffixes)), None)


def _table_paths(source: str | Path | Sequence[str | Path], format: str | None) -> list[str]:
    patterns = [source] if isinstance(source, (str, Path)) else list(source)
    suffixes = TABLE_SUFFIXES[format] if format else sum(TABLE_SUFFIXES.values(), ())
    paths: list[str] = []
    for pattern in map(str, patterns):
        if Path(pattern).is_dir():
            found = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file() and p.name.endswith(suffixes))
            if not found:
                raise FileNotFoundError(f"no {' or '.join(suffixes)} file in {pattern!r}")
            _refuse_partitions(found, pattern)
        elif any(c in pattern for c in "*?["):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"no file matches {pattern!r}")
            _refuse_partitions(found, re.split(r"[*?\[]", pattern, maxsplit=1)[0].rpartition("/")[0] or ".")
        elif Path(pattern).is_file():
            found = [pattern]
        else:
            raise FileNotFoundError(f"no such file: {pattern!r}")
        paths += found
    if not paths:
        raise ParameterError("no table file given")
    return paths


def _refuse_partitions(paths: list[str], root: str) -> None:
    """Refuse files in Hive partition folders under `root` (label=3/part.parquet, as pandas'
    partition_cols write them): the partition column's values are in the folder names, not in
    the files, and would be lost."""
    for path in paths:
        folders = Path(os.path.relpath(path, root)).parent.parts
        key = next((folder.partition("=")[0] for folder in folders if "=" in folder.strip("=")), None)
        if key is not None:
            raise DatasetError(
                f"{path}: in a Hive partition folder under {root!r}: column {key!r} is in the folder names, not "
                f"in the files, and would be lost; write the table unpartitioned and convert that "
                f"(pyarrow: pq.write_table(pyarrow.dataset.dataset({root!r}, partitioning='hive').to_table(), ...))"
            )


def _format_of(paths: list[str]) -> str:
    kinds = {path: next((k for k, s in TABLE_SUFFIXES.items() if path.endswith(s)), None) for path in paths}
    unknown = [path for path, kind in kinds.items() if kind is None]
    if unknown:
        raise ParameterError(f"cannot tell the format of {unknown[0]!r} by its suffix: name it (parquet or arrow)")
    if len(set(kinds.values())) > 1:
        raise ParameterError(f"the files mix Parquet and Arrow ({paths[0]!r}, ...): convert one format at a time")
    return kinds[paths[0]]


def _schema(kind: str, path: str) -> pa.Schema:
    """The file's schema, view types as their plain twins (`_plain`), as its batches are read."""
    if kind == "parquet":
        with _parquet(path) as table:
            schema = table.schema_arrow
    else:
        with pa.memory_map(path) as source:
            schema = _ipc_reader(source, path).schema
    return _plain_schema(schema)


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([field.with_type(_plain(field.type)) for field in schema], metadata=schema.metadata)


def _plain(kind: pa.DataType) -> pa.DataType:
    """`kind` with Arrow's view types (what polars and newer Arrow write) made their plain twins:
    string and binary views large string and large binary, list views large lists (a view's
    values, shared or out of order, laid out in turn may pass a list's 2^31); in structs and
    dictionaries too."""
    if pa.types.is_string_view(kind):
        return pa.large_string()
    if pa.types.is_binary_view(kind):
        return pa.large_binary()
    if _list_view(kind):
        return pa.large_list(kind.value_field.with_type(_plain(kind.value_type)))
    if pa.types.is_struct(kind):  # a Hugging Face Image column's bytes and path
        return pa.struct([kind.field(i).with_type(_plain(kind.field(i).type)) for i in range(kind.num_fields)])
    if pa.types.is_dictionary(kind):
        return pa.dictionary(kind.index_type, _plain(kind.value_type), kind.ordered)
    return kind


def _parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise DatasetError(f"{path}: not a Parquet file: {e}") from None


def _ipc_reader(source: pa.MemoryMappedFile, path: str) -> pa.ipc.RecordBatchReader | pa.ipc.RecordBatchFileReader:
    """An IPC file (Feather v2 too) or an IPC stream (what Hugging Face datasets write), told by
    the file's first bytes."""
    head = source.read(6)
    source.seek(0)
    if head.startswith(b"FEA1"):
        raise DatasetError(f"{path}: Feather version 1, which is not read; rewrite it as Feather 2 (Arrow IPC)")
    try:
        return pa.ipc.open_file(source) if head == b"ARROW1" else pa.ipc.open_stream(source)
    except pa.ArrowInvalid as e:
        raise DatasetError(f"{path}: not an Arrow IPC file or stream: {e}") from None


def _record_batches(kind: str, path: str, columns: list[str], batch: int) -> Iterator[pa.RecordBatch]:
    """The record batches of `columns` of one file, in order, each cut to at most `batch` rows;
    Parquet reads only those columns, an IPC file is memory-mapped (the others cost nothing)."""
    if kind == "parquet":
        with _parquet(path) as table:
            for whole in table.iter_batches(batch_size=batch, columns=columns, use_pandas_metadata=False):
                yield from _cut(whole.select(columns), batch)
        return
    with pa.memory_map(path) as source:  # batches read from it keep the mapping alive once it is closed
        reader = _ipc_reader(source, path)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            wholes = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            wholes = iter(reader)
        for whole in wholes:
            yield from _cut(whole.select(columns), batch)


def _cut(whole: pa.RecordBatch, batch: int) -> Iterator[pa.RecordBatch]:
    plain = _plain_schema(whole.schema)
    if plain != whole.schema:  # view types, read as the schema (`_schema`) says
        columns = [_laid_out(column) if _list_view(column.type) else column for column in whole.columns]
        whole = pa.RecordBatch.from_arrays(columns, names=whole.schema.names).cast(plain)
    for start in range(0, whole.num_rows, batch):
        yield whole.slice(start, batch)


def _list_view(kind: pa.DataType) -> bool:
    return pa.types.is_list_view(kind) or pa.types.is_large_list_view(kind)


def _laid_out(array: pa.Array) -> pa.LargeListArray:
    """A list view array as a large list array of its rows' values in turn. (Arrow's cast reads
    a list view's offsets as a list's, ignoring its sizes: invalid lists in pyarrow 26.)"""
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    kind = pa.large_list(array.type.value_field)
    return pa.LargeListArray.from_arrays(offsets, array.flatten(), type=kind, mask=array.is_null())


def _column(arrow: pa.Field, where: str) -> Column:
    """How the column `arrow` is stored, or refused naming it and its type."""
    name, kind = arrow.name, arrow.type
    problem = array_name_problem(name)
    if problem is not None:
        raise DatasetError(f"{where}: column {name!r} {problem}")
    if _binary(kind) or _encoded_file(kind):
        return Column(name, "bytes")
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        dtype, shape = _numbers(kind.value_type, arrow, where)
        return Column(name, "ragged", dtype, shape)
    dtype, shape = _numbers(kind, arrow, where)
    return Column(name, "fixed", dtype, shape)


def _numbers(kind: pa.DataType, column: pa.Field, where: str) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape of `kind`, numbers in fixed-size lists to any depth; anything else is
    refused naming `column`."""
    shape: tuple[int, ...] = ()
    while pa.types.is_fixed_size_list(kind):
        shape, kind = (*shape, kind.list_size), kind.value_type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return np.dtype(kind.to_pandas_dtype()), shape
    what = f"{where}: column {column.name!r} is {column.type}"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        raise DatasetError(
            f"{what}: strings are not stored (numbers and bytes are); tokenize them into a list<int32> "
            "column, or leave the column out (--columns)"
        )
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        raise DatasetError(
            f"{what}, a list of lists of varying length: a sample varies along its first axis only; "
            "store the inner lists as fixed-size lists, or flatten them"
        )
    raise DatasetError(
        f"{what}, which is not stored: numbers, fixed-size or variable-length lists of numbers, binary, "
        "and structs of encoded files (bytes and path, as Hugging Face's Image) are"
    )


def _binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def _encoded_file(kind: pa.DataType) -> bool:
    """Whether `kind` is a struct of an encoded file's bytes and path, as Hugging Face datasets
    store an `Image` or `Audio` feature."""
    if not pa.types.is_struct(kind) or {kind.field(i).name for i in range(kind.num_fields)} != {"bytes", "path"}:
        return False
    path = kind.field("path").type
    return _binary(kind.field("bytes").type) and (pa.types.is_string(path) or pa.types.is_large_string(path))


def _refuse_damaged_images(blobs: np.ndarray, name: str, table: str, first: int) -> None:
    """Refuse the first of `blobs` (rows `first`, ... of column `name`) that starts as an image and
    cannot be a whole one, as an image folder's file is (`encoded_converters.checked_image`): here,
    not by sample id in the middle of training. Other bytes (audio, say) pass as they are."""
    for row, blob in enumerate(blobs):
        if looks_like_image(blob):
            checked_image(blob, f"{table}: column {name!r} at row {first + row}")


def _embedded(array: pa.StructArray, name: str, table: str, first: int) -> pa.Array:
    """The encoded files of a struct column (`_encoded_file`, rows `first`, ... of `table`): each
    row's bytes, or where they are null or empty the file at its path (relative to the table's folder); a
    row with neither, or whose file cannot be read, is refused naming the column and the row."""
    blobs = array.field("bytes").to_pylist()
    for row in [i for i, blob in enumerate(blobs) if not blob]:  # null or b"": the file at its path
        where = f"{table}: column {name!r} at row {first + row}"
        path = array.field("path")[row].as_py()
        if path is None:
            raise DatasetError(f"{where} has neither bytes nor a path; nothing missing is stored")
        file = Path(table).parent / path  # an absolute path stays itself
        try:
            blobs[row] = file.read_bytes()
        except OSError as e:
            raise DatasetError(f"{where} has no bytes, and its file {str(file)!r} cannot be read: {e}") from None
    return pa.array(blobs, pa.large_binary())


def _survey(
    kind: str, paths: list[str], columns: list[Column], label: str | None, batch: int, progress: bool
) -> tuple[list[Column], int]:
    """The columns with each list column of one length everywhere made fixed-size, and the number
    of rows; reads the list columns' lengths and the integer `label` column's ids (and checks them
    for nulls, the ids for negative ones), file by file."""
    ragged = [column for column in columns if column.kind == "ragged"]
    read = list(dict.fromkeys([column.name for column in ragged] + ([label] if label is not None else [])))
    lengths = {column.name: (np.inf, -1) for column in ragged}
    total = 0
    for path in tqdm(paths, desc="surveying columns", unit="file", disable=not progress or not read):
        if kind == "parquet" and not read:
            with _parquet(path) as table:
                total += table.metadata.num_rows
            continue
        row = 0
        for part in _record_batches(kind, path, read, batch):
            for column in ragged:
                array = part.column(column.name)
                _refuse_nulls(array, column.name, path, row)
                counts = np.diff(np.asarray(array.offsets, dtype=np.int64))
                if len(counts):
                    low, high = lengths[column.name]
                    lengths[column.name] = (min(low, counts.min()), max(high, counts.max()))
            if label is not None:
                array = part.column(label)
                _refuse_nulls(array, label, path, row)
                refuse_negative_labels(_leaf(array).to_numpy(zero_copy_only=False), f"{path}: column {label!r}", row)
            row += part.num_rows
        total += row
    if total == 0:
        raise DatasetError(f"{paths[0]}: the table has no rows")
    surveyed = []
    for column in columns:
        low, high = lengths.get(column.name, (0, -1))
        if column.kind == "ragged" and low == high > 0:  # one length everywhere: fixed-size samples
            column = replace(column, kind="fixed", shape=(int(high), *column.shape))
        surveyed.append(column)
    return surveyed, total


def _refuse_nulls(array: pa.Array, name: str, path: str, first: int) -> None:
    """Refuse a null in `array` (rows `first`, ... of the file at `path`), or a null inside a list
    of it, naming the column and the row."""
    row = _null_row(array)
    if row is not None:
        raise DatasetError(
            f"{path}: column {name!r} is null at row {first + row} (or holds a null there); "
            "nothing missing is stored: fill or drop such rows first"
        )


def _null_row(array: pa.Array) -> int | None:
    """The first row of `array` that is null or holds a null in its lists, or None."""
    if array.null_count:
        return int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
    kind = array.type
    if pa.types.is_fixed_size_list(kind):
        inner = _null_row(array.flatten())
        return None if inner is None else inner // kind.list_size
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        inner = _null_row(array.flatten())
        if inner is None:
            return None
        offsets = np.asarray(array.offsets, dtype=np.int64)
        return int(np.searchsorted(offsets - offsets[0], inner, side="right") - 1)
    return None


def _leaf(array: pa.Array) -> pa.Array:
    """The numbers of a (nested) list array, in order, the slice's alone."""
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    return array


def _label_column(schema: pa.Schema, name: str | None, where: str) -> str | None:
    """The label column: `name` (which must be there, of integers, one-integer lists or strings;
    "": none, as for a float target), else "label" where there is one."""
    if name == "":
        return None
    if name is None:
        if DEFAULT_LABEL not in schema.names:
            return None
        name = DEFAULT_LABEL
    if name not in schema.names:
        raise DatasetError(f"{where}: no label column {name!r}; it has {schema.names}")
    kind = schema.field(name).type
    if pa.types.is_fixed_size_list(kind) and kind.list_size == 1 and pa.types.is_integer(kind.value_type):
        return name  # labels saved as an (n, 1) array: write_dataset takes them so
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type):
        return name  # as pandas writes an (n, 1) array's rows: one integer each, which the survey checks
    if not pa.types.is_integer(kind) and not _strings(kind):
        raise DatasetError(f"{where}: label column {name!r} is {kind}; labels are integers or strings")
    return name


def _strings(kind: pa.DataType) -> bool:
    """Whether a column of type `kind` holds strings (plain, or a dictionary of them)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _label_names(kind: str, paths: list[str], label: str, batch: int) -> list[str]:
    """The distinct string labels of every file, sorted (as ImageFolder sorts class folders);
    nulls are refused naming the row."""
    names: set[str] = set()
    for path in paths:
        row = 0
        for part in _record_batches(kind, path, [label], batch):
            array = part.column(label)
            _refuse_nulls(array, label, path, row)
            if pa.types.is_dictionary(array.type):
                array = array.dictionary_decode()
            names.update(pc.unique(array).to_pylist())
            row += part.num_rows
    return sorted(names)


def _huggingface_class_names(schema: pa.Schema, label: str) -> list[str] | None:
    """The names of a Hugging Face `ClassLabel` column, from the schema's metadata, if it has them."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
        names = features[label]["names"] if features[label].get("_type") == "ClassLabel" else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None
