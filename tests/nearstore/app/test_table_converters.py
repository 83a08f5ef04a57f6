"""Parquet and Arrow IPC tables, a column an array: ragged, fixed-size, encoded and label columns
stored losslessly, files in order, and every refusal naming the column (and the row)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch
from images import photo

from loaders import StreamingLoader
from nearstore import DatasetError, open_dataset
from nearstore.app.cli import main
from nearstore.app.table_converters import open_table
from nearstore.storage.images import ImageTransform

# How Hugging Face datasets store an `Image` (or `Audio`) feature: the encoded file, or its path.
ENCODED_FILE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _rows(n: int, seed: int = 0) -> dict[str, list]:
    """Columns as a tokenized text and audio set holds them: token ids and clips of varying length
    (an empty one too), fixed-size embeddings, padded ids of one length, point sets (L, 3),
    bytes (some empty, some ending in NUL) and labels."""
    rng = np.random.default_rng(seed)
    return {
        "tokens": [rng.integers(0, 50_000, rng.integers(0, 40)).astype(np.int32) for _ in range(n)],
        "audio": [rng.normal(size=rng.integers(1, 300)).astype(np.float32) for _ in range(n)],
        "embedding": [rng.normal(size=4).astype(np.float32) for _ in range(n)],
        "padded": [rng.integers(0, 9, 6) for _ in range(n)],
        "points": [rng.normal(size=(rng.integers(1, 5), 3)) for _ in range(n)],
        "blob": [rng.bytes(int(rng.integers(0, 20))) + b"\x00" * (i % 2) for i in range(n)],
        "label": [int(c) for c in rng.integers(0, 7, n)],
    }


def _table(rows: dict[str, list]) -> pa.Table:
    return pa.table(
        {
            "tokens": pa.array(rows["tokens"], pa.list_(pa.int32())),
            "audio": pa.array(rows["audio"], pa.large_list(pa.float32())),
            "embedding": pa.array(rows["embedding"], pa.list_(pa.float32(), 4)),
            "padded": pa.array(rows["padded"], pa.list_(pa.int64())),
            "points": pa.array([p.tolist() for p in rows["points"]], pa.list_(pa.list_(pa.float64(), 3))),
            "blob": pa.array(rows["blob"], pa.binary()),
            "label": pa.array(rows["label"], pa.int64()),
        }
    )


def _read_back(url: str) -> dict[str, list]:
    """Every sample of the store as a zarr user reads it: each array whole, ragged ones decoded by
    their layout."""
    dataset = open_dataset(url)
    out = {}
    for name in dataset.sample_arrays:
        values = dataset.arrays[name][:]
        layout = dataset.ragged(name)
        out[name] = list(layout.decode_all(values, range(len(values))) if layout else values)
    return out


def _assert_rows(stored: dict[str, list], rows: dict[str, list]) -> None:
    assert list(stored) == list(rows)
    for name, column in rows.items():
        assert len(stored[name]) == len(column), name
        for i, (got, want) in enumerate(zip(stored[name], column)):
            if isinstance(want, bytes):
                assert got == want, (name, i)
            else:
                want = np.asarray(want)
                assert got.dtype == want.dtype and np.array_equal(got, want), (name, i)


def test_a_parquet_table_converts_losslessly_and_loads_as_nested_tensors(tmp_path):
    rows = _rows(45)
    rows["tokens"][3] = np.zeros(0, np.int32)
    pq.write_table(_table(rows), tmp_path / "t.parquet", row_group_size=10)
    table = open_table(tmp_path / "t.parquet", batch=7)  # batches across row groups' edges
    kinds = {c.name: (c.kind, c.dtype, c.shape) for c in table.columns}
    assert kinds == {
        "tokens": ("ragged", np.int32, ()),
        "audio": ("ragged", np.float32, ()),
        "embedding": ("fixed", np.float32, (4,)),
        "padded": ("fixed", np.int64, (6,)),  # lists of one length everywhere: fixed-size
        "points": ("ragged", np.float64, (3,)),
        "blob": ("bytes", None, ()),
        "label": ("fixed", np.int64, ()),
    }
    assert (table.label, table.num_samples, table.class_names) == ("label", 45, None)
    url = str(tmp_path / "t.zarr")
    dataset = table.write(url, shard_samples=8)
    assert dataset.label_array == "label" and dataset.class_names == tuple(map(str, range(max(rows["label"]) + 1)))
    assert dataset.ragged("points").row_shape == (3,) and dataset.ragged("padded") is None
    _assert_rows(_read_back(url), rows)

    loader = StreamingLoader(
        url,
        batch_size=16,
        shuffle=False,
        input_array="tokens",
        paired_arrays=("audio", "points", "padded"),
        backend="torch",
        device="cpu",
    )
    seen = 0
    for tokens, audio, points, padded, y in loader:
        assert tokens.is_nested and audio.is_nested and points.is_nested
        for k, (t, a, p) in enumerate(zip(tokens.unbind(), audio.unbind(), points.unbind())):
            i = seen + k
            assert torch.equal(t, torch.from_numpy(rows["tokens"][i]))
            assert torch.equal(a, torch.from_numpy(rows["audio"][i]))
            assert torch.equal(p, torch.from_numpy(rows["points"][i]))
        assert torch.equal(padded, torch.from_numpy(np.stack(rows["padded"][seen : seen + len(y)])))
        assert y.tolist() == rows["label"][seen : seen + len(y)]
        seen += len(y)
    assert seen == 45


def test_several_files_are_one_table_in_order(tmp_path):
    parts = [_rows(n, seed) for seed, n in enumerate([5, 12, 3])]
    folder = tmp_path / "parts" / "nested"
    folder.mkdir(parents=True)
    for k, part in enumerate(parts):
        pq.write_table(_table(part), folder / f"train-{k:05d}.parquet")
    (folder / "README.md").write_text("not a table")
    whole = {name: sum((part[name] for part in parts), []) for name in parts[0]}
    for source in (tmp_path / "parts", str(folder / "train-*.parquet"), str(tmp_path / "**" / "*.parquet")):
        table = open_table(source, batch=4)
        assert table.num_samples == 20 and len(table.paths) == 3
        # padded ids are of one length in every file: fixed-size
        assert {c.name: c.kind for c in table.columns}["padded"] == "fixed"
        url = str(tmp_path / "whole.zarr")
        table.write(url, shard_samples=6, overwrite=True)
        _assert_rows(_read_back(url), whole)


def test_list_lengths_decide_over_every_file(tmp_path):
    # each file's lists have one length, but the files differ: the column is ragged, not fixed
    pq.write_table(pa.table({"ids": pa.array([[1, 2]] * 3), "label": [0, 1, 0]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"ids": pa.array([[1, 2, 3]] * 2), "label": [1, 1]}), tmp_path / "b.parquet")
    table = open_table(tmp_path)
    assert [(c.name, c.kind) for c in table.columns] == [("ids", "ragged"), ("label", "fixed")]
    table.write(str(tmp_path / "o.zarr"))
    assert [s.tolist() for s in _read_back(str(tmp_path / "o.zarr"))["ids"]] == [[1, 2]] * 3 + [[1, 2, 3]] * 2


@pytest.mark.parametrize("kind", ["file", "stream", "feather"])
def test_arrow_ipc_files_and_streams_with_hugging_face_class_names(tmp_path, kind):
    rows = _rows(30, seed=3)
    table = _table(rows)
    # what Hugging Face datasets write beside a ClassLabel column
    features = {"label": {"names": [f"c{i}" for i in range(7)], "_type": "ClassLabel"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path = tmp_path / ("data-00000-of-00001.arrow" if kind != "feather" else "t.feather")
    if kind == "feather":
        feather.write_feather(table, path, chunksize=11, compression="uncompressed")
    else:
        with pa.OSFile(str(path), "wb") as sink:
            writer = pa.ipc.new_file if kind == "file" else pa.ipc.new_stream
            with writer(sink, table.schema) as ipc:
                for batch in table.to_batches(max_chunksize=13):
                    ipc.write_batch(batch)
    converted = open_table(path, batch=5)
    assert converted.kind == "arrow" and converted.num_samples == 30
    assert converted.class_names == tuple(f"c{i}" for i in range(7))
    dataset = converted.write(str(tmp_path / "o.zarr"), shard_samples=8)
    assert dataset.class_names == converted.class_names
    _assert_rows(_read_back(dataset.url), rows)


def test_columns_choose_what_is_stored_the_label_beside_them(tmp_path):
    table = _table(_rows(10)).append_column("text", pa.array(["a sentence"] * 10))
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(DatasetError, match="column 'text' is string: strings are not stored"):
        open_table(tmp_path / "t.parquet")  # every column by default: the strings are refused
    chosen = open_table(tmp_path / "t.parquet", columns=["audio", "tokens"])
    assert [c.name for c in chosen.columns] == ["audio", "tokens", "label"]
    unlabelled = pa.table({"tokens": table["tokens"], "y": table["label"]})
    pq.write_table(unlabelled, tmp_path / "u.parquet")
    assert open_table(tmp_path / "u.parquet").label is None  # no "label": unlabelled
    assert open_table(tmp_path / "u.parquet", label_column="y").label == "y"


def test_hugging_face_images_convert_as_encoded_files_and_load_decoded(tmp_path):
    n = 12
    blobs = [photo(i) for i in range(n)]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "5.png").write_bytes(blobs[5])  # a row that names its file instead
    files = [{"bytes": blob, "path": f"{i}.jpg"} for i, blob in enumerate(blobs)]
    files[5] = {"bytes": None, "path": "images/5.png"}
    files[6] = {"bytes": b"", "path": "images/6.jpg"}  # empty bytes, as some writers leave them: the file too
    (tmp_path / "images" / "6.jpg").write_bytes(blobs[6])
    table = pa.table({"image": pa.array(files, ENCODED_FILE), "label": pa.array([i % 3 for i in range(n)])})
    features = {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog", "eel"], "_type": "ClassLabel"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet", row_group_size=5)

    out = str(tmp_path / "train.zarr")
    assert main(["convert", str(tmp_path / "train-00000-of-00001.parquet"), out, "--shard-samples", "4"]) == 0
    dataset = open_dataset(out)
    assert dataset.class_names == ("cat", "dog", "eel")
    assert list(dataset.arrays["image"][:]) == blobs  # stored as encoded, the named file's bytes too
    loader = StreamingLoader(out, batch_size=5, shuffle=False, images=ImageTransform(16, train=False), backend="torch")
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(5, 3, 16, 16), (5, 3, 16, 16), (2, 3, 16, 16)]
    assert torch.cat([y for _, y in batches]).tolist() == [i % 3 for i in range(n)]


def _encoded_files(*files: dict | None) -> pa.Table:
    return pa.table({"image": pa.array(list(files), ENCODED_FILE), "label": [0] * len(files)})


def _null_in_list() -> pa.Table:
    return pa.table({"ids": pa.array([[1], [2, 3], [4, None], [5]], pa.list_(pa.int32())), "label": [0, 1, 0, 1]})


@pytest.mark.parametrize(
    "table, options, message",
    [
        (
            pa.table({"text": ["a", "b"], "label": [0, 1]}),
            {},
            r"t.parquet: column 'text' is string: strings are not stored .* tokenize",
        ),
        (
            pa.table({"nested": pa.array([[[1, 2], [3]], [[4]]]), "label": [0, 1]}),
            {},
            r"column 'nested' is list<\w+: list<\w+: int64>>, a list of lists of varying length",
        ),
        (
            pa.table({"ids": pa.array([[1, 2]] * 5, pa.list_(pa.int32())), "label": [0, 1, None, 1, 0]}),
            {},
            r"t.parquet: column 'label' is null at row 2",
        ),
        (_null_in_list(), {}, r"column 'ids' is null at row 2 \(or holds a null there\)"),
        (
            pa.table({"x": pa.array([1.0, None, 2.0, None]), "label": [0, 1, 0, 1]}),
            {},
            r"column 'x' is null at row 1",
        ),
        (
            pa.table({"x": [1.0, 2.0], "target": [0, 1]}),
            {"label_column": "label"},
            r"t.parquet: no label column 'label'; it has \['x', 'target'\]",
        ),
        (
            pa.table({"x": [1, 2], "label": [0.5, 1.0]}),
            {},
            "label column 'label' is double; labels are integers or strings",
        ),
        (pa.table({"x": [1, 2], "label": [0, 1]}), {"columns": ["x", "z"]}, r"no column 'z'; it has \['x', 'label'\]"),
        (pa.table({"day": pa.array([1, 2], pa.date32())}), {}, r"column 'day' is date32\[day\], which is not stored"),
        (pa.table({"a/b": [1, 2]}), {}, "column 'a/b' cannot name a folder of the store"),
        (pa.table({"..": [1, 2]}), {}, r"column '\.\.' cannot name a folder of the store"),
        (pa.table({"zarr.json": [1, 2]}), {}, "column 'zarr.json' cannot name a folder of the store"),
        (pa.table({"label": [0, 1]}), {}, "no column to store besides the label 'label'"),
        (
            _encoded_files({"bytes": b"x", "path": None}, None, {"bytes": b"y", "path": None}),
            {},
            r"column 'image' is null at row 1",
        ),
        (
            _encoded_files({"bytes": b"x", "path": "a"}, {"bytes": b"y", "path": "b"}, {"bytes": None, "path": None}),
            {},
            r"t.parquet: column 'image' at row 2 has neither bytes nor a path",
        ),
        (
            _encoded_files({"bytes": b"", "path": None}),
            {},
            r"t.parquet: column 'image' at row 0 has neither bytes nor a path",
        ),
        (
            _encoded_files({"bytes": None, "path": "gone.jpg"}),
            {},
            r"column 'image' at row 0 has no bytes, and its file '.*gone.jpg' cannot be read",
        ),
        (
            _encoded_files({"bytes": photo(1), "path": None}, {"bytes": photo(3)[:300], "path": None}),
            {},
            r"t.parquet: column 'image' at row 1: JPEG without its end-of-image marker \(truncated\?\); remove it",
        ),
        (
            pa.table({"image": pa.array([{"bytes": b"x", "src": "a"}]), "label": [0]}),
            {},
            r"column 'image' is struct<bytes: binary, src: string>, which is not stored: .* structs of encoded files",
        ),
    ],
)
def test_each_refusal_names_the_column(tmp_path, table, options, message):
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    with pytest.raises(DatasetError, match=message):
        open_table(tmp_path / "t.parquet", **options).write(str(tmp_path / "o.zarr"))
    assert not (tmp_path / "o.zarr").exists()  # a refusal mid-write leaves nothing


def test_string_and_categorical_labels_become_class_ids_over_every_file(tmp_path):
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "label": ["dog", "cat", "dog"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"x": [4.0, 5.0], "label": ["ant", "cat"]}), tmp_path / "b.parquet")
    table = open_table(tmp_path, batch=2)
    assert table.class_names == ("ant", "cat", "dog")  # sorted, from both files
    dataset = table.write(str(tmp_path / "o.zarr"))
    np.testing.assert_array_equal(dataset.labels[:], [2, 1, 2, 0, 1])
    categorical = pa.table({"x": [1.0, 2.0, 3.0], "label": pa.array(["b", "a", "b"]).dictionary_encode()})
    pq.write_table(categorical, tmp_path / "c.parquet")
    dataset = open_table(tmp_path / "c.parquet").write(str(tmp_path / "c.zarr"))
    assert dataset.class_names == ("a", "b")
    np.testing.assert_array_equal(dataset.labels[:], [1, 0, 1])


@pytest.mark.parametrize("kind", [pa.list_(pa.int32(), 1), pa.list_(pa.int64()), pa.large_list(pa.int16())])
def test_labels_saved_as_one_integer_lists_are_labels(tmp_path, kind):
    column = pa.array([[2], [0], [1], [2]], kind)  # an (n, 1) array's column, fixed-size or as pandas writes it
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0, 4.0], "label": column}), tmp_path / "t.parquet")
    dataset = open_table(tmp_path / "t.parquet").write(str(tmp_path / "o.zarr"))
    assert dataset.label_array == "label" and dataset.num_classes == 3
    np.testing.assert_array_equal(dataset.labels[:], [2, 0, 1, 2])
    longer = pa.array([[2], [0, 1], [1], [2]], pa.list_(pa.int64()))
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0, 4.0], "label": longer}), tmp_path / "u.parquet")
    with pytest.raises(DatasetError, match="label column 'label' holds lists of other lengths than 1"):
        open_table(tmp_path / "u.parquet")


def test_a_negative_label_is_refused_naming_its_file_and_row_before_anything_is_written(tmp_path):
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"x": [1.0, 2.0], "label": [0, 1]}), tmp_path / "t" / "a.parquet")
    pq.write_table(pa.table({"x": [1.0] * 5, "label": [1, 0, 2, -2, -1]}), tmp_path / "t" / "b.parquet")
    with pytest.raises(DatasetError, match=r"b.parquet: column 'label' holds a negative label, -2, at row 3"):
        open_table(tmp_path / "t", batch=2)
    column = pa.array([[0], [-4], [1]], pa.list_(pa.int32(), 1))  # an (n, 1) array's column
    feather.write_feather(pa.table({"x": [1.0, 2.0, 3.0], "label": column}), tmp_path / "c.arrow")
    with pytest.raises(DatasetError, match=r"c.arrow: column 'label' holds a negative label, -4, at row 1"):
        open_table(tmp_path / "c.arrow")


def test_files_that_disagree_are_refused_naming_the_file(tmp_path):
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.int32()), "label": [0, 1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.int64()), "label": [0, 1]}), tmp_path / "b.parquet")
    with pytest.raises(DatasetError, match=r"b.parquet: column 'x' is int64, .*a.parquet has it as int32"):
        open_table(tmp_path)
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="c.parquet: not a Parquet file"):
        open_table(tmp_path / "c.parquet")


def test_the_cli_converts_parquet_and_arrow_end_to_end(tmp_path, capsys):
    rows = _rows(40, seed=5)
    table = _table(rows).append_column("text", pa.array(["x"] * 40))
    pq.write_table(table.slice(0, 25), tmp_path / "train-0.parquet")
    pq.write_table(table.slice(25), tmp_path / "train-1.parquet")
    columns = "tokens,audio,blob"
    out = str(tmp_path / "out.zarr")
    argv = ["convert", str(tmp_path / "train-*.parquet"), out, "--columns", columns, "--shard-samples", "16"]
    assert main([*argv, "--class-names", ",".join("abcdefg")]) == 0
    assert "wrote 40 samples" in capsys.readouterr().out
    _assert_rows(_read_back(out), {name: rows[name] for name in [*columns.split(","), "label"]})
    assert open_dataset(out).class_names == tuple("abcdefg")

    # a folder of them, told by its files; then Arrow without a suffix, named by --format
    assert main(["convert", str(tmp_path), str(tmp_path / "all.zarr"), "--columns", "audio"]) == 2
    assert re.search(r"the dataset .* and its source .* overlap", capsys.readouterr().err)
    folder = tmp_path / "parts"
    folder.mkdir()
    (tmp_path / "train-0.parquet").rename(folder / "train-0.parquet")
    assert main(["convert", str(folder), str(tmp_path / "part.zarr"), "--columns", "points"]) == 0
    assert open_dataset(str(tmp_path / "part.zarr")).num_samples == 25
    feather.write_feather(table.drop_columns(["text"]), tmp_path / "blob")
    assert main(["convert", str(tmp_path / "blob"), str(tmp_path / "a.zarr"), "--format", "arrow"]) == 0
    _assert_rows(_read_back(str(tmp_path / "a.zarr")), rows)
    assert main(["convert", str(tmp_path / "train-1.parquet"), str(tmp_path / "t.zarr")]) == 2
    assert "column 'text' is string" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "none.parquet"), str(tmp_path / "n.zarr")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_folder_is_told_by_its_files_at_any_depth_and_two_formats_are_refused(tmp_path, capsys):
    for year in (2020, 2021):  # no file at the top
        (tmp_path / "deep" / str(year)).mkdir(parents=True)
        pq.write_table(pa.table({"f": [1.0, 2.0], "label": [0, 1]}), tmp_path / "deep" / str(year) / "p.parquet")
    assert main(["convert", str(tmp_path / "deep"), str(tmp_path / "deep.zarr")]) == 0
    assert open_dataset(str(tmp_path / "deep.zarr")).num_samples == 4
    (tmp_path / "mix").mkdir()
    pq.write_table(pa.table({"f": [1.0, 2.0]}), tmp_path / "mix" / "a.parquet")
    feather.write_feather(pa.table({"f": [3.0, 4.0]}), tmp_path / "mix" / "b.arrow")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "mix"), str(tmp_path / "mix.zarr")]) == 2  # half was converted
    assert "the files mix Parquet and Arrow" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "mix"), str(tmp_path / "mix.zarr"), "--format", "arrow"]) == 0
    assert open_dataset(str(tmp_path / "mix.zarr")).num_samples == 2  # named: that format's files only


def test_a_hive_partitioned_table_is_refused_naming_the_column_it_would_lose(tmp_path, capsys):
    for label in (0, 1):  # pandas' to_parquet(partition_cols=["label"]): the labels are in the folder names only
        (tmp_path / "hive" / f"label={label}").mkdir(parents=True)
        pq.write_table(pa.table({"f": [1.0, 2.0]}), tmp_path / "hive" / f"label={label}" / "p.parquet")
    for source in (tmp_path / "hive", tmp_path / "hive" / "*" / "*.parquet"):
        assert main(["convert", str(source), str(tmp_path / "hive.zarr")]) == 2
        assert "column 'label' is in the folder names, not in the files" in capsys.readouterr().err
        assert not (tmp_path / "hive.zarr").exists()
    name = tmp_path / "hive" / "label=0" / "p.parquet"  # one file named: its folder is not a partition of it
    assert open_table(name).num_samples == 2


def test_string_and_binary_views_read_as_strings_and_bytes(tmp_path):
    table = pa.table(  # as polars writes strings
        {
            "f": pa.array([1.0, 2.0, 3.0]),
            "label": pa.array(["cat", "dog", "cat"], type=pa.string_view()),
            "blob": pa.array([b"a", b"bc", b""], type=pa.binary_view()),
        }
    )
    feather.write_feather(table, tmp_path / "views.arrow", compression="uncompressed")
    dataset = open_table(tmp_path / "views.arrow").write(str(tmp_path / "v.zarr"))
    read = _read_back(dataset.url)
    assert dataset.class_names == ("cat", "dog") and list(read["label"]) == [0, 1, 0]
    assert list(read["blob"]) == [b"a", b"bc", b""]
    as_views = pa.struct([("bytes", pa.binary_view()), ("path", pa.string_view())])  # an Image column
    images = pa.table({"image": pa.array([{"bytes": photo(0), "path": None}], type=as_views), "label": [0]})
    feather.write_feather(images, tmp_path / "images.arrow", compression="uncompressed")
    assert list(_read_back(open_table(tmp_path / "images.arrow").write(str(tmp_path / "i.zarr")).url)["image"]) == [
        photo(0)
    ]


def test_list_views_read_as_lists_row_by_row(tmp_path):
    # views out of order and sharing values: row i is values[offsets[i] : offsets[i] + sizes[i]]
    offsets, sizes = pa.array([6, 0, 2, 0], pa.int32()), pa.array([2, 3, 4, 1], pa.int32())
    tokens = pa.ListViewArray.from_arrays(offsets, sizes, pa.array(np.arange(10, dtype=np.int32)))
    table = pa.table(
        {
            "tokens": tokens,
            "points": pa.array([[[1, 2]], [[3, 4], [5, 6]], [], [[7, 8]]], pa.list_view(pa.list_(pa.int8(), 2))),
            "pair": pa.array([[1, 2]] * 4, pa.large_list_view(pa.int16())),  # one length: fixed-size samples
            "label": [0, 1, 0, 1],
        }
    )
    feather.write_feather(table, tmp_path / "views.arrow", compression="uncompressed")
    read = _read_back(open_table(tmp_path / "views.arrow", batch=3).write(str(tmp_path / "v.zarr")).url)
    assert [row.tolist() for row in read["tokens"]] == [[6, 7], [0, 1, 2], [2, 3, 4, 5], [0]]
    assert [row.tolist() for row in read["points"]] == [[[1, 2]], [[3, 4], [5, 6]], [], [[7, 8]]]
    assert [row.tolist() for row in read["pair"]] == [[1, 2]] * 4
    nulls = pa.table({"tokens": pa.array([[1], [2, 3], None], pa.list_view(pa.int32())), "label": [0, 1, 2]})
    feather.write_feather(nulls, tmp_path / "nulls.arrow", compression="uncompressed")
    with pytest.raises(DatasetError, match="column 'tokens' is null at row 2"):
        open_table(tmp_path / "nulls.arrow")


def test_bytes_that_only_start_as_an_image_starts_are_stored_as_they_are(tmp_path):
    # a row of text beginning "BM" was a damaged BMP, and the whole table was refused
    import io

    from PIL import Image

    bmp = io.BytesIO()
    Image.new("RGB", (4, 4)).save(bmp, "BMP")
    blobs = [b"BMW 320i, 2019, 45000 km", b"BM" + bytes(range(40)), b"\xff\xd8\xff\x10" + bytes(20), b"plain"]
    table = pa.table({"blob": pa.array(blobs, pa.binary()), "label": pa.array(np.arange(4) % 2)})
    pq.write_table(table, tmp_path / "t.parquet")
    open_table(tmp_path / "t.parquet").write(str(tmp_path / "o.zarr"))
    assert list(_read_back(str(tmp_path / "o.zarr"))["blob"]) == blobs
    cut = pa.table({"blob": pa.array([bmp.getvalue()[:-10]], pa.binary()), "label": pa.array([0])})
    pq.write_table(cut, tmp_path / "cut.parquet")
    with pytest.raises(DatasetError, match="column 'blob' at row 0: BMP"):  # a real one cut short still is
        open_table(tmp_path / "cut.parquet").write(str(tmp_path / "cut.zarr"))
