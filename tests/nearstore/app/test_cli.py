from __future__ import annotations

import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import as_format_1
from image_sources import write_mds, write_tar

from loaders import StreamingLoader
from nearstore import Graft, ParameterError, Selection, open_dataset, random_select, write_dataset
from nearstore.app.cli import main
from nearstore.app.synthetic import SHAPES, write_shapes
from nearstore.storage.dataset import UncheckedStoreWarning
from nearstore.storage.reader import SelectiveReader


def test_convert_select_and_info_on_digits(tmp_path, capsys, fingerprint):
    store = str(tmp_path / "digits.zarr")
    assert main(["convert", "digits", store, "--shard-samples", "256"]) == 0
    dataset = open_dataset(store)
    assert dataset.num_samples == 1797 and dataset.arrays["x"].shape == (1797, 8, 8)
    assert dataset.class_names == tuple(str(c) for c in range(10))

    before = fingerprint(store)
    out = str(tmp_path / "sel.npz")
    assert main(["select", store, out, "--keep", "0.1", "--method", "sage", "--option", "ell=16"]) == 0
    per_class = np.bincount(dataset.labels[:])
    expected = int(sum(round(0.1 * n) for n in per_class))  # class-balanced: keep × n_c per class
    assert f"selected {expected} of 1797 samples" in capsys.readouterr().out
    selection = Selection.load(out)
    assert selection.method == "sage" and selection.params["ell"] == 16
    selection.check_dataset(dataset)
    assert fingerprint(store) == before

    assert main(["info", out]) == 0
    assert json.loads(capsys.readouterr().out)["selected"] == expected
    assert main(["info", store]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 1797


def test_select_reports_the_labels_that_look_wrong(tmp_path, capsys):
    # More samples than the model-free proxy's warm-up (4,096): those beyond are judged out of its sample.
    # outputs into folders that do not exist yet: made, as `mkdir -p` would
    store, out, report = (
        str(tmp_path / "m.zarr"),
        str(tmp_path / "out" / "sel.npz"),
        tmp_path / "a" / "b" / "suspects.csv",
    )
    main(["convert", "mnist1d", store, "--num-samples", "6000"])
    argv = ["select", store, out, "--keep", "0.2", "--report", str(report)]
    assert main(argv) == 0
    assert "samples' labels look wrong" in capsys.readouterr().out
    lines = report.read_text().splitlines()
    assert lines[0] == "id,label,suggested,quality,label_name,suggested_name"  # MNIST-1D's classes are named "0".."9"
    rows = [line.split(",") for line in lines[1:]]
    suspects = Selection.load(out).suspects
    assert sorted(int(r[0]) for r in rows) == suspects.ids.tolist() and len(rows) > 0
    labels = open_dataset(store).labels[:]
    assert all(int(r[1]) == labels[int(r[0])] != int(r[2]) for r in rows)  # the given label, and another
    assert all(r[4] == r[1] and r[5] == r[2] for r in rows)
    quality = [float(r[3]) for r in rows]
    assert quality == sorted(quality)  # the most suspect first
    # as stored to 6 significant digits (4 decimals wrote 0.0000 for values down to 6e-08)
    np.testing.assert_allclose(quality, np.sort(suspects.quality), rtol=1e-5)


def test_a_label_report_names_the_classes_where_the_store_has_names(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 5000)
    x = (rng.normal(size=(5000, 6)) + 3 * np.eye(3, 6)[y]).astype(np.float32)
    flipped = rng.random(5000) < 0.2
    y[flipped] = (y[flipped] + 1) % 3
    names = ("cat, tabby", "dog", 'the "emu"')  # a comma and quotes: the CSV quotes them
    store, report = str(tmp_path / "named.zarr"), tmp_path / "suspects.csv"
    write_dataset(store, [{"x": x, "y": y}], class_names=names)
    assert main(["select", store, str(tmp_path / "s.npz"), "--keep", "0.2", "--report", str(report)]) == 0
    with report.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label", "suggested", "quality", "label_name", "suggested_name"] and len(rows) > 100
    for row in rows[1:]:
        assert int(row[1]) == y[int(row[0])] and row[4] == names[int(row[1])] and row[5] == names[int(row[2])]
    assert np.mean([flipped[int(row[0])] for row in rows[1:]]) > 0.6  # the report's ids are mostly real flips


def test_convert_npy_pair_and_unlabelled_npy(tmp_path):
    x = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(300) % 4)
    assert (
        main(["convert", str(tmp_path / "x.npy"), str(tmp_path / "a.zarr"), "--labels", str(tmp_path / "y.npy")]) == 0
    )
    assert open_dataset(str(tmp_path / "a.zarr")).num_classes == 4
    assert main(["convert", str(tmp_path / "x.npy"), str(tmp_path / "b.zarr")]) == 0
    unlabelled = open_dataset(str(tmp_path / "b.zarr"))
    assert unlabelled.label_array is None
    np.testing.assert_array_equal(unlabelled.arrays["x"][:], x)


@pytest.mark.parametrize(
    "labels, problem",
    [(np.arange(10) / 2, "holds float64 values"), (np.arange(10) - 1, "holds a negative label, -1, at row 0")],
    ids=["float", "negative"],
)
def test_convert_refuses_labels_it_cannot_store_naming_their_file_and_writes_nothing(tmp_path, capsys, labels, problem):
    np.save(tmp_path / "x.npy", np.zeros((10, 3), dtype=np.float32))
    np.save(tmp_path / "y.npy", labels)
    np.savez(tmp_path / "a.npz", x=np.zeros((10, 3)), y=labels)
    npy = ["convert", str(tmp_path / "x.npy"), str(tmp_path / "b.zarr"), "--labels", str(tmp_path / "y.npy")]
    npz = ["convert", str(tmp_path / "a.npz"), str(tmp_path / "c.zarr")]
    for argv, source in ((npy, "y.npy"), (npz, "a.npz:y")):
        assert main(argv) == 2
        assert f"label array 'y' from {tmp_path / source} {problem}" in capsys.readouterr().err
        assert not Path(argv[2]).exists()


def test_convert_string_labels_from_npz_and_npy_sorted_as_class_names(tmp_path, capsys, monkeypatch):
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    y = np.array(["zebra", "ant", "moth", "ant", "zebra", "moth"])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y[:, None])  # (n, 1), as many tools save labels
    decompressed, read = [], np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(
        np.lib.npyio.NpzFile, "__getitem__", lambda self, key: decompressed.append(key) or read(self, key)
    )
    assert main(["convert", str(tmp_path / "d.npz"), str(tmp_path / "a.zarr")]) == 0
    assert sorted(decompressed) == ["x", "y"]  # the labels' names come from the array the batches read
    argv = ["convert", str(tmp_path / "x.npy"), str(tmp_path / "b.zarr"), "--labels", str(tmp_path / "y.npy")]
    assert main(argv) == 0
    for name in ("a.zarr", "b.zarr"):
        dataset = open_dataset(str(tmp_path / name))
        assert dataset.class_names == ("ant", "moth", "zebra")
        np.testing.assert_array_equal(dataset.labels[:], [2, 0, 1, 0, 2, 1])
    # --class-names fixes the order; a label it lacks is refused by name, nothing written
    argv = ["convert", str(tmp_path / "d.npz"), str(tmp_path / "c.zarr"), "--class-names", "zebra,moth,ant"]
    assert main(argv) == 0
    np.testing.assert_array_equal(open_dataset(str(tmp_path / "c.zarr")).labels[:], [0, 2, 1, 2, 0, 1])
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "d.npz"), str(tmp_path / "e.zarr"), "--class-names", "zebra,moth"]) == 2
    assert "sample 1 has the label 'ant'" in capsys.readouterr().err
    assert not (tmp_path / "e.zarr").exists()


def _images_of(url: str) -> tuple[list[bytes], list[int], tuple[str, ...]]:
    dataset = open_dataset(url)
    read = SelectiveReader(dataset).read(np.arange(dataset.num_samples))
    return list(read["image"]), read["y"].tolist(), dataset.class_names


def test_convert_encoded_images_from_each_kind_of_source(tmp_path, capsys):
    folder = write_shapes(tmp_path / "folder", 30, seed=2)
    files = [(p, label) for label, shape in enumerate(SHAPES) for p in sorted((folder / shape).iterdir())]
    in_folder = [p.read_bytes() for p, _ in files]
    assert main(["convert", str(folder), str(tmp_path / "f.zarr"), "--shard-samples", "8"]) == 0
    images, labels, names = _images_of(str(tmp_path / "f.zarr"))
    assert images == in_folder and labels == [label for _, label in files] and names == SHAPES

    assert main(["convert", "shapes", str(tmp_path / "s.zarr"), "--num-samples", "30", "--seed", "2"]) == 0
    images, _, names = _images_of(str(tmp_path / "s.zarr"))
    assert sorted(images) == sorted(in_folder) and names == SHAPES  # the same images, in generation order

    for i in range(2):  # two shards whose name the pattern gives, and a label file named "label"
        write_tar(
            tmp_path / f"wds-{i}.tar",
            [
                (f"k{i}{j}.{ext}", data)
                for j in range(3)
                for ext, data in (("png", in_folder[3 * i + j]), ("label", str(j).encode()))
            ],
        )
    argv = ["convert", str(tmp_path / "wds-{0..1}.tar"), str(tmp_path / "w.zarr"), "--image-key", "png"]
    assert main([*argv, "--label-key", "label", "--class-names", "a,b,c"]) == 0
    images, labels, names = _images_of(str(tmp_path / "w.zarr"))
    assert images == in_folder[:6] and labels == [0, 1, 2] * 2 and names == ("a", "b", "c")

    samples = [{"img": data, "label": i % 4} for i, data in enumerate(in_folder[:9])]
    write_mds(tmp_path / "mds", {"img": "jpeg", "label": "int"}, samples, compression="zstd")
    assert main(["convert", str(tmp_path / "mds"), str(tmp_path / "m.zarr")]) == 0
    images, labels, names = _images_of(str(tmp_path / "m.zarr"))
    assert images == in_folder[:9] and labels == [i % 4 for i in range(9)] and names == ("0", "1", "2", "3")
    assert "wrote 9 samples" in capsys.readouterr().out

    (tmp_path / "wds-0.tar").rename(tmp_path / "shard.data")  # a name that does not tell: --format does
    argv = ["convert", str(tmp_path / "shard.data"), str(tmp_path / "x.zarr"), "--format", "webdataset"]
    assert main([*argv, "--image-key", "png", "--label-key", "label"]) == 0
    assert _images_of(str(tmp_path / "x.zarr"))[0] == in_folder[:3]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "imagenet", "{tmp}/o.zarr"], "unknown source 'imagenet'"),
        (["convert", "{digits}", "{tmp}/o.zarr", "--format", "mds"], "no MDS index at '.*index.json'"),
        (["convert", "{tmp}/nowhere", "{tmp}/o.zarr", "--format", "imagefolder"], "no image folder at '.*nowhere'"),
        (["convert", "{tmp}/none-{{0..1}}.tar", "{tmp}/o.zarr"], "no WebDataset shard at '.*none-0.tar'"),
        (["convert", "shapes", "{tmp}/o.zarr", "--num-samples", "0"], "num_samples must be >= 1, got 0"),
        (["convert", "{tmp}/missing.npz", "{tmp}/o.zarr"], "missing.npz"),
        (["select", "{tmp}/nothing.zarr", "{tmp}/s.npz"], "no zarr group"),
        (["select", "{digits}", "{tmp}/s.npz", "--keep", "2"], r"keep must be in \(0, 1\], got 2.0"),
        (["demo", "--workdir", "{tmp}/d", "--reselect-every", "-1"], "reselect_every must be an integer >= 0, got -1"),
        (
            ["select", "{digits}", "{tmp}/s.npz", "--method", "crest", "--report", "{tmp}/r.csv"],
            "--report needs a method that judges",
        ),
        (
            ["select", "{digits}", "{tmp}/s.npz", "--report", "{tmp}/s.npz/r.csv"],
            "--report .*s.npz/r.csv' is where the selection goes",  # below the selection's file
        ),
        (
            ["select", "{digits}", "{tmp}/s.npz", "--report", "{tmp}/junk.npy/r.csv"],
            "cannot write the report to '.*junk.npy/r.csv': '.*junk.npy' is a file, not a folder",  # below a file
        ),
        (["select", "{digits}", "{digits}/s.npz"], "the selection '.*digits.zarr/s.npz' lies inside the dataset"),
        (
            ["select", "{digits}", "{tmp}/s.npz", "--report", "{digits}/r.csv"],
            "the report '.*digits.zarr/r.csv' lies inside the dataset",
        ),
        # convert never writes into its source (an image folder would gain a class), nor over it
        (
            ["convert", "{tmp}", "{tmp}/o.zarr", "--format", "imagefolder"],
            "the dataset '.*o.zarr' and its source '.*' overlap",
        ),
        (["convert", "{tmp}/x.npy", "{tmp}/x.npy", "--overwrite"], "the dataset '.*x.npy' and its source '.*x.npy'"),
        (["convert", "{tmp}/a/x.npz", "{tmp}/a", "--overwrite"], "the dataset '.*a' and its source '.*a/x.npz'"),
        (
            ["convert", "{tmp}/x.npy", "{tmp}/o.zarr", "--labels", "{tmp}/o.zarr/y.npy", "--overwrite"],
            "the dataset '.*o.zarr' and its source '.*o.zarr/y.npy' overlap",
        ),
        (["serve", "{digits}", "--port", "99999", "--method", "random"], r"--port must be in \[0, 65535\], got 99999"),
        (["serve", "{digits}", "--read-cache-bytes", "-1"], "read_cache_bytes must be an integer >= 0, got -1"),
        # a factory that builds no model: refused at start, not at a trainer's first push
        (["serve", "{digits}", "--model", "torch.nn:Linear"], "model factory 'torch.nn:Linear' must build a model"),
        (["serve", "{digits}", "--model", "os:getcwd"], "must return a torch.nn.Module, got str"),
        (["select", "{digits}", "{tmp}/s.npz", "--seed", "-1"], r"seed must be an integer in \[0, \d+\), got -1"),
        (["select", "{digits}", "{tmp}/s.npz", "--report", "{tmp}/s.npz"], "--report .* is where the selection goes"),
        (["select", "{digits}", "{tmp}/s.npz", "--report", "{tmp}/../{tmp.name}/s.npz"], "--report .* is where the"),
        (["select", "{digits}", "{tmp}", "--method", "random"], "cannot write the selection to .*: it names a folder"),
        (["select", "{digits}", "{tmp}/s.npz", "--scheduler", "127.0.0.1"], "--scheduler '127.0.0.1' is not a sch"),
        (["select", "{digits}", "{tmp}/s.npz", "--report", ""], "--report takes the path of a CSV file, got ''"),
        (["select", "{digits}", "{tmp}/s.npz", "--report", "-"], "--report takes the path of a CSV file, got '-'"),
        (["select", "{digits}", "{tmp}/s.npz", "--report", "{tmp}/new/"], "cannot write the report to .*: it names a"),
        (["demo", "--epochs", "-1", "--workdir", "{tmp}/w"], "epochs must be an integer >= 1, got -1"),
        # 0 was taken for no value: the whole default demo ran
        (["demo", "--num-samples", "0", "--workdir", "{tmp}/w"], "num_samples must be an integer >= 100, got 0"),
        (["demo", "--test-samples", "0", "--workdir", "{tmp}/w"], "test_samples must be .*, got 0"),
        (["convert", "mnist1d", "{tmp}/o.zarr", "--seed", "-1"], "seed must be an integer >= 0, got -1"),  # a traceback
        (["convert", "shapes", "{tmp}/o.zarr", "--seed", "-1"], "seed must be an integer >= 0, got -1"),
        (["convert", "{tmp}/junk.npy", "{tmp}/j.zarr"], "junk.npy is neither an .npy file nor an .npz archive"),
        # an option for another kind of source would be ignored
        (["convert", "{tmp}/xy.npz", "{tmp}/o.zarr", "--labels", "{tmp}/y.npy"], "--labels is for npy sources"),
        (["convert", "{tmp}/x.npy", "{tmp}/o.zarr", "--y-key", "t"], "--y-key is for npz sources; .*x.npy' is npy"),
        (["convert", "digits", "{tmp}/o.zarr", "--columns", "a"], "--columns is for parquet, arrow sources"),
        (["convert", "{tmp}/w.tar", "{tmp}/o.zarr", "--label-key", ""], "--label-key '' .* webdataset images need"),
        (["convert", "digits", "{tmp}/o.zarr", "--class-names", "a,b"], "--class-names is for npz, npy, .* is digits"),
        # other sources are read from local paths (a remote .tar was 'no WebDataset shard at' it)
        (["convert", "memory://a.npz", "{tmp}/o.zarr"], "convert reads a URL only where it is a nearstore dataset"),
        (["convert", "s3://b/a.tar", "{tmp}/o.zarr", "--format", "webdataset"], "copy it here first"),
        (["convert", "digits", "{tmp}/o.zarr", "--seed", "3"], "--seed is for mnist1d, shapes sources; .* is digits"),
        # a server given its round 0, or following a primary, runs no round its --keep/--method would shape
        (
            ["serve", "{digits}", "--selection", "{tmp}/s.npz", "--keep", "0.5", "--method", "random"],
            "--keep, --method given with --selection: the server then selects nothing of its own accord",
        ),
        (["serve", "{digits}", "--primary", "grpc://127.0.0.1:1/d", "--seed", "1"], "--seed given with --primary"),
        (["info", "{tmp}"], "no zarr group at .*: it has no zarr.json"),  # a folder: no dataset, not a selection
        (["convert", "{tmp}/cut.npz", "{tmp}/o.zarr"], "cut.npz: not a whole .npz archive .*BadZipFile"),
        (
            ["convert", "{tmp}/wide.npz", "{tmp}/o.zarr"],
            "wide.npz:x holds float128 values, which are not stored",
        ),
        (["convert", "{tmp}/xy_npz.npy", "{tmp}/o.zarr"], "xy_npz.npy is a .npz archive, not an .npy file"),
        (["convert", "{tmp}/scalar.npy", "{tmp}/o.zarr"], "scalar.npy is a single value"),
        (["convert", "{tmp}/pickled.npz", "{tmp}/o.zarr"], "pickled.npz:y cannot be read as a numeric array"),
        (
            ["convert", "digits", "{tmp}/d.zarr", "--chunk-samples", "3"],
            r"chunk_samples must be a divisor of shard_samples \(1024\), got 3",
        ),
    ],
)
def test_errors_exit_2_with_the_reason(tmp_path, capsys, argv, message):
    digits = str(tmp_path / "digits.zarr")
    main(["convert", "digits", digits])
    (tmp_path / "junk.npy").write_bytes(b"not numpy\n")
    np.save(tmp_path / "x.npy", np.ones((4, 2), np.float32))
    np.save(tmp_path / "y.npy", np.arange(4))
    np.save(tmp_path / "scalar.npy", np.float32(1))
    np.savez(tmp_path / "xy.npz", x=np.ones((4, 2), np.float32), y=np.arange(4))
    (tmp_path / "xy_npz.npy").write_bytes((tmp_path / "xy.npz").read_bytes())
    (tmp_path / "cut.npz").write_bytes((tmp_path / "xy.npz").read_bytes()[:-40])
    np.savez(tmp_path / "wide.npz", x=np.ones((4, 2), np.longdouble), y=np.arange(4))
    np.savez(tmp_path / "pickled.npz", x=np.ones((4, 2)), y=np.array(["a", "b", "a", "b"], object))
    capsys.readouterr()
    assert main([a.format(tmp=tmp_path, digits=digits) for a in argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_output_cut_short_by_its_reader_is_no_error(tmp_path):
    # `nearstore info ... | head`: head leaves after a byte, the rest of 400 kB finds the pipe closed
    names = [f"class {i:06d} of a long tail" for i in range(12_000)]
    write_dataset(
        str(tmp_path / "many.zarr"),
        [{"x": np.zeros((12_000, 1), np.float32), "y": np.arange(12_000)}],
        class_names=names,
    )
    command = f"{sys.executable} -m nearstore.app.cli info {tmp_path / 'many.zarr'} | head -c 1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.stdout == "{" and result.stderr == "" and result.returncode == 1


def test_convert_sees_through_symlinks_and_overwrites_only_a_dataset(tmp_path, capsys, fingerprint):
    folder = write_shapes(tmp_path / "folder", 20)
    (tmp_path / "alias").symlink_to(folder)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    before = fingerprint(str(folder))
    refused = [
        # the source under another name: --overwrite would have deleted it, without it written into it
        (["convert", str(tmp_path / "alias"), str(folder), "--overwrite"], "overlap"),
        (["convert", str(folder), str(tmp_path / "alias" / "o.zarr")], "overlap"),
        # what is not a dataset is never overwritten
        (["convert", str(folder), str(work), "--overwrite"], "'.*work' is a folder that is not a zarr group"),
        (["convert", str(folder), str(work / "notes.txt"), "--overwrite"], "notes.txt' is a file, not a dataset"),
    ]
    for argv, message in refused:
        assert main(argv) == 2
        assert re.search(message, capsys.readouterr().err), argv
    assert fingerprint(str(folder)) == before and (work / "notes.txt").read_text() == "mine"
    digits = tmp_path / "digits.zarr"
    assert main(["convert", "digits", str(digits)]) == 0
    (tmp_path / "store").symlink_to(digits)  # a selection under the store's other name is inside it
    assert main(["select", str(digits), str(tmp_path / "store" / "s.npz"), "--method", "random"]) == 2
    assert "lies inside the dataset" in capsys.readouterr().err
    out = tmp_path / "out.zarr"
    out.mkdir()  # an empty folder may be written over, and a dataset replaced
    for _ in range(2):
        assert main(["convert", str(folder), str(out), "--overwrite"]) == 0
    assert open_dataset(str(out)).num_samples == 20


def test_select_to_a_full_disk_is_refused_before_the_scan(tmp_path, capsys, monkeypatch):
    # the check wrote an empty file, which a full disk takes: the scan ran, and its result was
    # lost with "[Errno 28] No space left on device", naming nothing
    from fsspec.implementations.local import LocalFileSystem

    digits = str(tmp_path / "digits.zarr")
    main(["convert", "digits", digits])
    capsys.readouterr()
    pipe = LocalFileSystem.pipe_file

    def full(self, path: str, value: bytes, **options) -> None:
        if value:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        pipe(self, path, value, **options)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", full)
    out = tmp_path / "full" / "s.npz"
    assert main(["select", digits, str(out), "--method", "random"]) == 2
    captured = capsys.readouterr()
    assert "cannot write the selection to" in captured.err and "No space left on device" in captured.err
    assert "selected" not in captured.out and not out.exists()


def test_a_damaged_selection_file_is_one_line_and_exit_2(tmp_path, capsys):
    digits = str(tmp_path / "digits.zarr")
    main(["convert", "digits", digits])
    out = tmp_path / "s.npz"
    assert main(["select", digits, str(out), "--method", "random"]) == 0
    whole = out.read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "junk.npz").write_bytes(b"not a selection\n")
    capsys.readouterr()
    for name, argv in [
        ("cut.npz", ["info", str(tmp_path / "cut.npz")]),
        ("junk.npz", ["info", str(tmp_path / "junk.npz")]),
        ("cut.npz", ["serve", digits, "--port", "0", "--selection", str(tmp_path / "cut.npz")]),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(
            rf"nearstore {argv[0]}: error: selection file '.*{name}' is not a selection: not an \.npz archive, "
            r"or cut short \(\d+ bytes\)\n",
            err,
        ), err


def test_an_error_after_an_overwrite_is_in_place_says_the_dataset_is_whole(tmp_path, capsys, monkeypatch):
    import fsspec

    store = str(tmp_path / "digits.zarr")
    assert main(["convert", "digits", store]) == 0

    def denied(path, recursive=False):
        raise PermissionError(f"deleting {path} denied")

    monkeypatch.setattr(fsspec.filesystem("file"), "rm", denied)  # the writer's: one instance per options
    capsys.readouterr()
    assert main(["convert", "digits", store, "--shard-samples", "256", "--overwrite"]) == 2
    error, note = capsys.readouterr().err.splitlines()[-2:]  # after the progress bar
    assert error.startswith("nearstore convert: error: deleting") and error.endswith("denied")
    assert note.startswith(f"{store!r} was replaced: the new dataset there is whole.")
    assert open_dataset(store).num_shards == 8  # the new one: 256 samples a shard, where 1024 made 2


@pytest.mark.slow
@pytest.mark.parametrize(("through_server", "reselect_every"), [(False, 1), (True, 2)])
def test_demo_prints_its_table_and_writes_json(tmp_path, through_server, reselect_every):
    # The real demo at toy size, through the console entry point (and through a server on 127.0.0.1),
    # the selected run re-selecting with its model before epochs 1 and 2 (or 2 alone).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nearstore.app.cli",
            "demo",
            "--workdir",
            str(tmp_path),
            "--num-samples",
            "2000",
            "--test-samples",
            "500",
            "--epochs",
            "3",
            "--reselect-every",
            str(reselect_every),
            *(["--server"] if through_server else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "samples", "accuracy"]
    assert [line.split()[0] for line in lines[1:4]] == ["graft", "random", "full"]
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["server"] is through_server
    runs = {r["run"]: r for r in report["results"]}
    assert runs["graft 25%"]["samples"] == runs["random 25%"]["samples"] == 500
    assert runs["full data"]["samples"] == 2000
    assert runs["graft 25%"]["scan_bytes"] > 0 and runs["random 25%"]["scan_bytes"] == 0
    assert [runs[name]["rounds"] for name in runs] == [1 + 2 // reselect_every, 1, 0]
    assert report["reselect_every"] == reselect_every
    # every sample read once, then served by the loader's cache: two epochs of three
    assert runs["full data"]["cache_hits"] == pytest.approx(2 / 3)
    train = open_dataset(str(tmp_path / "mnist1d-train-2000-seed0.zarr"))
    # (the samples' bytes once: the labels and shard indexes the earlier runs read are kept)
    assert 0.5 * train.stored_nbytes(["x", "y"]) < runs["full data"]["shipped_bytes"] <= train.stored_nbytes(["x", "y"])
    assert runs["full data"]["io_saving"] >= 2 / 3
    # a subset of small samples (40 floats) read from the store comes in whole shards (the holes
    # between them cost less than a request), once a round: about the bytes of the full data; through
    # the server only the selected samples cross to the trainer (the server reads the shards)
    full = runs["full data"]["shipped_bytes"]
    assert 0.9 * full < runs["random 25%"]["shipped_bytes"] <= full
    if through_server:
        assert 0 < runs["graft 25%"]["shipped_bytes"] < 0.75 * full
    assert runs["random 25%"]["io_saving"] > runs["graft 25%"]["io_saving"]  # no scan
    assert runs["full data"]["test_accuracy"] > 0.2  # twice chance: it trained and evaluated


def test_serve_refuses_to_listen_beyond_loopback_without_a_token(id_store, capsys, monkeypatch):
    monkeypatch.delenv("NEARSTORE_TOKEN", raising=False)
    assert main(["serve", id_store.url, "--host", "0.0.0.0", "--method", "random"]) == 2
    assert "a token is required to listen on '0.0.0.0'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_image_demo_decodes_generated_jpegs_in_the_loader(tmp_path):
    argv = ["demo", "--data", "images", "--workdir", str(tmp_path), "--num-samples", "600", "--test-samples", "200"]
    result = subprocess.run(
        [sys.executable, "-m", "nearstore.app.cli", *argv, "--epochs", "2", "--reselect-every", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert [line.split()[0] for line in result.stdout.splitlines()[1:4]] == ["graft", "random", "full"]
    report = json.loads((tmp_path / "demo.json").read_text())
    runs = {r["run"]: r for r in report["results"]}
    assert report["data"] == "images" and runs["full data"]["samples"] == 600
    assert (report["batch_size"], report["lr"]) == (32, 1e-3)  # the images' recipe, not MNIST-1D's
    assert runs["graft 25%"]["samples"] == runs["random 25%"]["samples"] == 150
    assert runs["graft 25%"]["rounds"] == 2 and runs["graft 25%"]["scan_bytes"] > 0
    train = open_dataset(str(tmp_path / "shapes-train-600-seed0.zarr"))
    assert train.encoded("image")
    # the full run read every JPEG once, its second epoch served by the cache (learning itself takes
    # more than 2 epochs of 600 images: the demo's own run, in the README, shows it)
    stored = train.stored_nbytes(["image"])
    assert 0.9 * stored <= runs["full data"]["shipped_bytes"] <= stored and runs["full data"]["cache_hits"] == 0.5
    assert 0 <= runs["full data"]["test_accuracy"] <= 1


def test_verify_reports_each_damaged_object_and_exits_1(tmp_path, capsys):
    digits = str(tmp_path / "digits.zarr")
    main(["convert", "digits", digits, "--shard-samples", "256"])
    assert main(["verify", digits]) == 0
    assert "16 of 16 shard objects whole, 0 damaged" in capsys.readouterr().out  # x and y, 8 shards each
    dataset = open_dataset(digits)
    Path(dataset.shard_path("x", 2)).unlink()
    y1 = Path(dataset.shard_path("y", 1))
    y1.write_bytes(y1.read_bytes()[:-8])
    assert main(["verify", digits, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fingerprint"] == dataset.manifest.fingerprint and report["shard_objects"] == 16
    assert [(d["array"], d["shard"]) for d in report["damaged"]] == [("x", 2), ("y", 1)]
    assert "is missing" in report["damaged"][0]["problem"] and report["damaged"][0]["path"].endswith("x/c/2/0/0")
    # a scan over the damaged store refuses too, by name
    assert main(["select", digits, str(tmp_path / "g.npz"), "--method", "graft"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"shard object '.*(y/c/1' \(samples 256\.\.511\) is cut short|x/c/2/0/0' .* is missing)", err), err
    assert not (tmp_path / "g.npz").exists()


def test_convert_rewrites_a_store_written_before_checksums(tmp_path, capsys):
    old, new = str(tmp_path / "old.zarr"), str(tmp_path / "new.zarr")
    main(["convert", "digits", old])
    as_format_1(old)
    with pytest.warns(UncheckedStoreWarning):
        assert main(["verify", old]) == 2  # nothing to verify against
    assert "no checksums or manifest" in capsys.readouterr().err
    assert main(["convert", old, new]) == 0
    assert main(["verify", new]) == 0
    rewritten = open_dataset(new)
    assert rewritten.class_names == tuple(str(c) for c in range(10)) and rewritten.num_samples == 1797


def test_unlabelled_sources_and_a_selection_by_any_name(tmp_path, capsys):
    np.savez(tmp_path / "x.npz", x=np.ones((6, 2), np.float32), y=np.arange(6))
    assert main(["convert", str(tmp_path / "x.npz"), str(tmp_path / "x.zarr"), "--y-key", ""]) == 0
    assert open_dataset(str(tmp_path / "x.zarr")).label_array is None
    pq.write_table(pa.table({"f": [1.0, 2.0, 3.0], "label": [0.5, 1.5, 2.5]}), tmp_path / "reg.parquet")
    assert main(["convert", str(tmp_path / "reg.parquet"), str(tmp_path / "r.zarr"), "--label-key", ""]) == 0
    assert open_dataset(str(tmp_path / "r.zarr")).sample_arrays == ("f", "label")  # a float target, stored
    digits = str(tmp_path / "digits.zarr")
    main(["convert", "digits", digits])
    assert main(["select", digits, str(tmp_path / "round0.sel"), "--method", "random"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "round0.sel")]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "random"
    assert main(["info", str(tmp_path / "nowhere.npz")]) == 2
    assert "nowhere.npz" in capsys.readouterr().err


def test_convert_reads_sources_under_home_as_the_shell_would(tmp_path, monkeypatch):
    # the shell does not expand --labels=~/y.npy: '~/y.npy' was 'no such file'
    monkeypatch.setenv("HOME", str(tmp_path))
    np.save(tmp_path / "x.npy", np.ones((4, 2), np.float32))
    np.save(tmp_path / "y.npy", np.arange(4) % 2)
    assert main(["convert", "~/x.npy", str(tmp_path / "o.zarr"), "--labels=~/y.npy"]) == 0
    assert open_dataset(str(tmp_path / "o.zarr")).num_samples == 4


def test_demo_data_of_each_seed_is_its_own(tmp_path):
    # named by size alone, seed 1's demo trained on the stores seed 0's left in the workdir
    from nearstore.app.demo import demo_data

    first, again, other = (demo_data("mnist1d", tmp_path, 300, 100, seed) for seed in (0, 0, 1))
    assert first.train.manifest.fingerprint == again.train.manifest.fingerprint
    assert other.train.manifest.fingerprint != first.train.manifest.fingerprint
    assert other.test.manifest.fingerprint != first.test.manifest.fingerprint


def test_sigterm_ends_a_command_as_ctrl_c_does_and_leaves_nothing(tmp_path):
    # kill, timeout and job schedulers send SIGTERM: it killed convert, leaving a half-written store
    out = tmp_path / "m.zarr"
    command = [sys.executable, "-m", "nearstore.app.cli", "convert", "mnist1d", str(out), "--num-samples", "70000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # past the write's first moments
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "nearstore convert: terminated" in err and "Traceback" not in err
    assert not out.exists()


def test_ctrl_c_ends_a_command_quietly_and_leaves_nothing(tmp_path):
    out = tmp_path / "m.zarr"
    command = [sys.executable, "-m", "nearstore.app.cli", "convert", "mnist1d", str(out), "--num-samples", "70000"]
    # Ctrl-C as a terminal sends it: SIGINT handled by default in the child even where this test
    # runs with it ignored (a CI in the background, `nohup ... &`, which its children inherit)
    restored = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restored)
    deadline = time.monotonic() + 60
    while not out.exists() and time.monotonic() < deadline:  # writing: its group is there
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    # 130, or now and then (an interrupt in the write's first moments) killed by SIGINT after saying so,
    # at its end: a shell reports 130 for both
    assert process.returncode in (130, -signal.SIGINT)
    assert "nearstore convert: interrupted" in err and "Traceback" not in err
    assert not out.exists()  # a write that fails removes what it wrote


def test_a_url_of_a_protocol_fsspec_does_not_have_is_named_in_one_line(id_store, tmp_path, capsys):
    # fsspec's "Protocol not known: s4" (and gcsfs missing) named no URL, and three commands
    # crossed as a traceback
    selection = random_select(id_store, 0.1)
    for save in (lambda: selection.save("s4://bucket/sel.npz"), lambda: Selection.load("s4://bucket/sel.npz")):
        with pytest.raises(ParameterError, match="'s4://bucket/sel.npz': Protocol not known: s4"):
            save()
    for argv in (["info", "s4://bucket/ds.zarr"], ["select", id_store.url, "s4://b/sel.npz"]):
        assert main(argv) == 2
        assert "'s4://b" in capsys.readouterr().err.splitlines()[-1]


def test_a_zarr_store_that_names_no_classes_selects_and_converts(tmp_path, capsys):
    # its classes were 0: Graft said the labels hold "a single class", and the convert the open
    # warning suggests failed with "0 class names ... labels go up to 3" (nor took --class-names)
    import zarr

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 600)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    x[:, 0] += 3 * y
    url = str(tmp_path / "zarrs.zarr")
    group = zarr.create_group(url)
    group.create_array("x", shape=x.shape, dtype="f4", chunks=(4, 8), shards=(128, 8))[:] = x
    group.create_array("y", shape=(600,), dtype="i8", chunks=(64,), shards=(128,))[:] = y
    group.attrs["nearstore"] = {
        "format_version": 1,
        "num_samples": 600,
        "sample_arrays": ["x", "y"],
        "label_array": "y",
    }
    round0 = Graft().select(open_dataset(url), 0.2)
    assert len(round0) >= 100 and round0.carry  # its suspects handed on, of classes the store names none of
    loader = StreamingLoader(url, round0, batch_size=64, backend="torch")
    loader.update_proxy(torch.nn.Sequential(torch.nn.Linear(8, 4)))
    assert loader.reselect(0.2).round == 1
    assert main(["convert", url, str(tmp_path / "a.zarr")]) == 0
    assert open_dataset(str(tmp_path / "a.zarr")).class_names == ("0", "1", "2", "3")
    assert main(["convert", url, str(tmp_path / "b.zarr"), "--class-names", "w,x,y,z"]) == 0
    assert open_dataset(str(tmp_path / "b.zarr")).class_names == ("w", "x", "y", "z")
