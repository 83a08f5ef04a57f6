"""The `nearstore` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from nearstore import NearstoreError, ParameterError, Selection, open_dataset, verify_dataset, write_dataset
from nearstore.app import converters
from nearstore.app.encoded_converters import EncodedImages, imagefolder_images, mds_images, webdataset_images
from nearstore.app.synthetic import shapes_images
from nearstore.app.table_converters import TABLE_SUFFIXES, open_table, table_format
from nearstore.errors import restated, storage_error
from nearstore.selection import DEFAULT_METHOD, SELECTORS, keep_freed_memory, make_executor, make_selector
from nearstore.selection.record import write_whole
from nearstore.storage import read_labels
from nearstore.storage.dataset import url_to_fs, within

log = logging.getLogger("nearstore")
# The methods whose scans run on an executor: SAGE's passes and the windowed selectors'.
MAX_SHARD_IDS = 1 << 24  # `serve --shards`: more than any one server holds (16M shards)
ON_DASK = ("sage", "graft", "craig", "adacore", "crest", "sas", "augaware", "clipcov")

# The demo's (training, test) samples by its data: images cost more to make and to train on.
DEMO_SIZES = {"mnist1d": (50_000, 10_000), "images": (10_000, 2_000)}
CONVERT_FORMATS = (
    "npy",
    "npz",
    "mnist1d",
    "digits",
    "imagefolder",
    "webdataset",
    "mds",
    "parquet",
    "arrow",
    "shapes",
    "nearstore",
)
GENERATED = ("mnist1d", "digits", "shapes")  # convert sources made here, not read from a path
# The convert options that apply to some kinds of source only: given for another, they would be ignored.
CONVERT_OPTIONS = {
    "labels": ("npy",),
    "x_key": ("npz",),
    "y_key": ("npz",),
    "image_key": ("webdataset", "mds"),
    "label_key": ("webdataset", "mds", "parquet", "arrow"),
    "columns": ("parquet", "arrow"),
    "num_samples": ("mnist1d", "shapes"),
    "seed": ("mnist1d", "shapes"),
    # the others name their classes themselves: folders, digits, a store's own names
    "class_names": ("npz", "npy", "webdataset", "mds", "parquet", "arrow", "nearstore"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearstore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="generate data (MNIST-1D or images), select near storage, train against random and full data"
    )
    demo.add_argument(
        "--data",
        choices=("mnist1d", "images"),
        default="mnist1d",
        help="MNIST-1D's signals, or generated images (rendered shapes, JPEGs decoded in the loader)",
    )
    demo.add_argument("--workdir", default="nearstore-demo", help="where the stores and demo.json go")
    demo.add_argument("--num-samples", type=int, help="training samples (default 50,000 of MNIST-1D, 10,000 images)")
    demo.add_argument("--test-samples", type=int, help="test samples (default 10,000 of MNIST-1D, 2,000 images)")
    demo.add_argument("--keep", type=float, default=0.25)
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--batch-size", type=int, help="default: 128 for MNIST-1D, 32 for images")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--reselect-every", type=int, default=3, help="epochs between the selected run's rounds (0: select once)"
    )
    demo.add_argument(
        "--server", action="store_true", help="select and ship the selected subset through a server on 127.0.0.1"
    )

    convert = commands.add_parser(
        "convert",
        help="write a nearstore dataset from arrays, encoded images or a generator",
        description="Write a nearstore dataset. Sources: 'mnist1d', 'digits' or 'shapes' (generated), an .npy "
        "file of inputs, a .npz archive, an image folder (root/<class>/<image>), WebDataset .tar shards (a "
        "path, or a pattern like 'train-{000..099}.tar' or '*.tar'), or a MosaicML Streaming MDS folder (with "
        "index.json), or Parquet or Arrow IPC files (.parquet, .arrow, .feather: a file, a folder of them or a "
        "pattern like 'data/*.parquet'; a column an array, lists of numbers of varying length stored ragged). "
        "Images, binary columns and Hugging Face Image columns are stored as the bytes they were encoded as.",
    )
    convert.add_argument("source", help="what to convert; its kind is told by what it is, or by --format")
    convert.add_argument("out", help="URL of the new dataset (local path or fsspec URL)")
    convert.add_argument("--format", choices=CONVERT_FORMATS, help="the source's kind, when its path does not tell")
    convert.add_argument(
        "--labels", help="with an .npy source: the .npy file of labels (integers, or strings: class names)"
    )
    convert.add_argument("--x-key", help="with a .npz source: the inputs' key (default x)")
    convert.add_argument("--y-key", help="with a .npz source: the labels' key (default y; '' for none)")
    convert.add_argument(
        "--image-key",
        help="with webdataset: the image extensions in order of preference (default jpg,jpeg,png,webp); "
        "with mds: the image column (default the first jpeg, png or bytes column)",
    )
    convert.add_argument(
        "--label-key",
        help="with webdataset: the label's extension (default cls); with mds: the integer label column; "
        "with parquet or arrow: the label column, integers or strings (default 'label' where there is one, "
        "else unlabelled; '' for none)",
    )
    convert.add_argument(
        "--class-names",
        help="comma-separated class names, in the order of their ids (default '0'..'C-1', a Hugging Face "
        "ClassLabel's names, or string labels' names sorted); string labels are stored as their index here",
    )
    convert.add_argument(
        "--columns", help="with parquet or arrow: comma-separated columns to store (default all; the label too)"
    )
    convert.add_argument(
        "--num-samples", type=int, help="with mnist1d or shapes: how many to generate (default 70,000 / 10,000)"
    )
    convert.add_argument("--seed", type=int, help="with mnist1d or shapes: generator seed (default 0)")
    convert.add_argument("--shard-samples", type=int, default=1024)
    convert.add_argument(
        "--chunk-samples",
        type=int,
        help="samples an inner chunk of a fixed-size array (1: each its own byte range; default: as many as "
        "fit in 4 KiB)",
    )
    convert.add_argument("--overwrite", action="store_true")

    select = commands.add_parser("select", help="run the storage-side scan and save a Selection")
    select.add_argument("url", help="dataset URL")
    select.add_argument("out", help="where to save the selection (.npz)")
    _selector_arguments(select)
    select.add_argument(
        "--scheduler", help=f"a dask.distributed scheduler (tcp://host:port) to run the scan on ({', '.join(ON_DASK)})"
    )
    _partitions_argument(select)
    select.add_argument(
        "--report",
        help="write the samples whose label looks wrong here (CSV: id, label, suggested, quality; and the classes' "
        "names, label_name and suggested_name, where the store has them)",
    )

    serve = commands.add_parser(
        "serve", help="run beside the data: select, then stream the selected samples to trainers (Arrow Flight)"
    )
    serve.add_argument("url", help="dataset URL")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="beyond 127.0.0.1: NEARSTORE_TOKEN and --tls-cert/--tls-key (or --insecure) are required",
    )
    serve.add_argument("--port", type=int, default=8815)
    serve.add_argument("--name", help="dataset name in grpc://host:port/NAME (default: the store's name)")
    serve.add_argument("--selection", help="serve this saved selection (as the round it holds) instead of scanning")
    _selector_arguments(serve)
    serve.add_argument("--model", help="module:factory of the trainer's model, to accept its weights as the proxy")
    serve.add_argument("--state-dir", help="keep rounds and pushed proxy here; a restart on it resumes from them")
    serve.add_argument("--tls-cert", help="PEM certificate: listen on grpc+tls:// (with --tls-key)")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", help="PEM CA: mutual TLS, clients must present a certificate it signed")
    serve.add_argument(
        "--insecure", action="store_true", help="beyond 127.0.0.1 without TLS: the token and samples cross in clear"
    )
    serve.add_argument(
        "--max-proxy-bytes", type=int, default=1 << 30, help="largest proxy weights push accepted, in bytes"
    )
    serve.add_argument(
        "--read-cache-bytes",
        type=int,
        default=256 << 20,
        help="inner chunks read from storage kept for every trainer's later reads, in bytes (0: none)",
    )
    serve.add_argument(
        "--scheduler",
        help=f"a dask.distributed scheduler (tcp://host:port): rounds run there ({', '.join(ON_DASK)})",
    )
    _partitions_argument(serve)
    serve.add_argument(
        "--shards",
        type=_shard_list,
        help="serve only these shards (START:STOP half-open runs and ids, comma-separated, e.g. 0:8,12): "
        "one server per storage node, a trainer reads them as one source with a list of their URLs",
    )
    serve.add_argument(
        "--primary",
        help="grpc://host:port/name of the server that runs this dataset's rounds: this one runs none and "
        "takes each round from it (NEARSTORE_TOKEN or NEARSTORE_READ_TOKEN is sent to it)",
    )
    serve.add_argument(
        "--front",
        choices=["auto", "nginx", "none"],
        default="auto",
        help="nginx: run nginx at --host:--port (TLS ends there) in front of the server, which listens on "
        "127.0.0.1: a call past its limit (a push past --max-proxy-bytes) is cut off before the server holds "
        "it; without a front the server buffers one gRPC message whole before refusing it. auto (default): "
        "nginx beyond 127.0.0.1 (refused if nginx is not installed), none on it",
    )

    info = commands.add_parser("info", help="describe a dataset or a saved selection")
    info.add_argument("url")

    verify = commands.add_parser(
        "verify",
        help="read every shard object once and check it (size, index, checksums, samples' digest); "
        "exit 1 if any is damaged or missing",
    )
    verify.add_argument("url", help="dataset URL")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument("--threads", type=int, default=8, help="shard objects read at once")

    args = parser.parse_args(argv)
    keep_freed_memory()  # selection rounds' forward passes would otherwise fault their memory back in
    terminate = _terminate_as_interrupt()
    try:
        commands = {
            "demo": _demo,
            "convert": _convert,
            "select": _select,
            "serve": _serve,
            "info": _info,
            "verify": _verify,
        }
        return commands[args.command](args)
    except KeyboardInterrupt as e:  # Ctrl-C (a serve's round 0, a convert): what was written is cleaned up already
        terminated = isinstance(e, Terminated)
        print(f"nearstore {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except BrokenPipeError:  # what reads the output left (`| head`): quietly, as other tools end
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 1
    except Exception as e:
        if isinstance(e, NearstoreError | OSError):  # a refusal, or a file or store that is not there
            message = str(e)
        elif storage_error(e):  # a storage backend's own (no credentials, a refused request)
            message = f"{type(e).__name__}: {e}"
        else:
            raise
        # and its notes: what a failed overwrite left, and where the dataset is whole
        print(f"nearstore {args.command}: error: {message}", *getattr(e, "__notes__", ()), sep="\n", file=sys.stderr)
        return 2
    finally:
        terminate()


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a job scheduler), raised as Ctrl-C is, so that what a command was
    writing is cleaned up alike (it killed the process and left a half-written store)."""


def _terminate_as_interrupt() -> Callable[[], None]:
    """Have SIGTERM raise `Terminated` in this process's main thread while a command runs (a
    server sets its own); returns what puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminated(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _demo(args: argparse.Namespace) -> int:
    from nearstore.app.demo import format_table, run_demo

    results = run_demo(
        data=args.data,
        workdir=args.workdir,
        num_samples=DEMO_SIZES[args.data][0] if args.num_samples is None else args.num_samples,
        test_samples=DEMO_SIZES[args.data][1] if args.test_samples is None else args.test_samples,
        keep=args.keep,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        reselect_every=args.reselect_every,
        server=args.server,
    )
    print(format_table(results))
    print(f"wrote {Path(args.workdir) / 'demo.json'}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    # the sources are read as local paths: '~' as the shell would (it does not in --labels=~/y.npy)
    if not _remote(args.source):
        args.source = os.path.expanduser(args.source)
    if args.labels is not None:
        args.labels = os.path.expanduser(args.labels)
    kind = args.format or _source_kind(args.source)
    if kind != "nearstore" and _remote(args.source):
        raise ParameterError(
            f"{args.source!r}: convert reads a URL only where it is a nearstore dataset; other sources are read "
            "from local paths (copy it here first)"
        )
    for option, kinds in CONVERT_OPTIONS.items():
        if getattr(args, option) is not None and kind not in kinds:
            flag = "--" + option.replace("_", "-")
            raise ParameterError(f"{flag} is for {', '.join(kinds)} sources; {args.source!r} is {kind}")
    if args.label_key == "" and kind in ("webdataset", "mds"):
        raise ParameterError(f"--label-key '' (no labels) is for parquet and arrow sources; {kind} images need theirs")
    if kind not in GENERATED:
        _check_apart(args.out, [args.source, *([args.labels] if args.labels else [])])
    source, num_samples, class_names, label_array = args.source, None, None, "y"
    if kind == "nearstore":
        batches, old = converters.nearstore_batches(source)
        num_samples, label_array = old.num_samples, old.label_array
        # a store of zarr's own may name none: given here, or "0".."C-1" (an empty tuple was 0 names)
        class_names = _named(args) or old.class_names or None
    elif kind == "mnist1d":
        num_samples = 70_000 if args.num_samples is None else args.num_samples
        batches = converters.mnist1d_batches(num_samples, seed=args.seed or 0)
    elif kind == "digits":
        batches = converters.digits_batches()
    elif kind == "npz":
        y_key = "y" if args.y_key is None else args.y_key or None  # '': unlabelled
        arrays = converters.npz_arrays(source, x_key=args.x_key or "x", y_key=y_key)
        batches, class_names = arrays.batches(), _named(args) or arrays.class_names
        label_array = label_array if y_key else None
    elif kind == "npy":
        arrays = converters.npy_arrays(source, args.labels)
        batches, class_names = arrays.batches(), _named(args) or arrays.class_names
    elif kind in TABLE_SUFFIXES:
        table = open_table(
            source,
            format=args.format,  # as given: told by the suffixes, a folder mixing two is refused
            columns=args.columns.split(",") if args.columns else None,
            label_column=args.label_key,
            class_names=_named(args),
            progress=True,
        )
        batches, num_samples = table.batches(), table.num_samples
        class_names, label_array = table.class_names, table.label
    else:
        images = _images(kind, args)
        batches, num_samples, class_names = images.batches(), images.num_samples, images.class_names
    dataset = write_dataset(
        args.out,
        batches,
        label_array=None if kind == "npy" and args.labels is None else label_array,
        class_names=class_names,
        num_samples=num_samples,
        shard_samples=args.shard_samples,
        chunk_samples=args.chunk_samples,
        overwrite=args.overwrite,
        progress=True,
    )
    print(f"wrote {dataset.num_samples} samples to {args.out}")
    return 0


def _named(args: argparse.Namespace) -> list[str] | None:
    """The class names `--class-names` gives, in order, or None."""
    return args.class_names.split(",") if args.class_names else None


def _verify(args: argparse.Namespace) -> int:
    dataset = open_dataset(args.url)
    damages = verify_dataset(dataset, threads=args.threads, progress=not args.json)
    shards = sum(dataset.array_shards(name) for name in dataset.sample_arrays)
    if args.json:
        report = {
            "url": dataset.url,
            "fingerprint": dataset.manifest.fingerprint,
            "shard_objects": shards,
            "damaged": [dataclasses.asdict(d) for d in damages],
        }
        print(json.dumps(report, indent=2))
    else:
        for d in damages:
            print(f"damaged: array {d.array!r}, shard {d.shard}, {d.path}: {d.problem}")
        print(f"{dataset.url}: {shards - len(damages)} of {shards} shard objects whole, {len(damages)} damaged")
    return 1 if damages else 0


def _source_kind(source: str) -> str:
    """The kind of a `convert` source, told by its name or by what lies at its path."""
    if source in GENERATED:
        return source
    if _remote(source):  # fsspec's URLs: a nearstore store alone is read from them
        fs, path = url_to_fs(source)
        return "nearstore" if fs.exists(f"{path.rstrip('/')}/zarr.json") else "remote"
    if source.endswith((".npz", ".npy")):
        return source[-3:]
    if source.rstrip("}").endswith((".tar", ".tar.gz", ".tgz")):  # a path, or a pattern ending in a {a,b} list
        return "webdataset"
    path = Path(source)
    if (path / "index.json").is_file():
        return "mds"
    if (path / "zarr.json").is_file():
        return "nearstore"
    if (path / ".zgroup").is_file() or (path / ".zarray").is_file():  # not a folder of images
        raise ParameterError(
            f"{source!r} is a Zarr v2 store, which convert does not read: save its arrays to an .npz and convert that"
        )
    table = table_format(source)  # a .parquet or .arrow path or pattern, or a folder of such files
    if table is not None:
        return table
    if path.is_dir():
        return "imagefolder"
    raise ParameterError(
        f"unknown source {source!r}: expected 'mnist1d', 'digits', 'shapes', a .npz or an .npy path, .tar shards, "
        "an MDS folder (with index.json), a nearstore dataset (with zarr.json), .parquet or .arrow files or an "
        "image folder (root/<class>/<image>); or name it with --format"
    )


def _remote(source: str) -> bool:
    """Whether a convert source is an fsspec URL other than a local path (not a generated source's name)."""
    return source not in GENERATED and fsspec.utils.get_protocol(source) not in ("file", "local")


def _check_apart(out: str, sources: list[str]) -> None:
    """Refuse to write a dataset at `out` where it is a source, lies inside one (it would be written
    into the input: an image folder would gain a class), or holds one (--overwrite deletes it)."""
    for source in sources:
        if _overlap(out, source):
            raise ParameterError(f"the dataset {out!r} and its source {source!r} overlap: write it elsewhere")


def _overlap(a: str, b: str) -> bool:
    """Whether URLs `a` and `b` name the same place, or one lies inside the other (`within`)."""
    return within(a, b) or within(b, a)


def _images(kind: str, args: argparse.Namespace) -> EncodedImages:
    class_names = _named(args)
    if kind == "imagefolder":
        return imagefolder_images(args.source)
    if kind == "webdataset":
        keys = {"image_keys": args.image_key.split(",")} if args.image_key else {}
        return webdataset_images(args.source, label_key=args.label_key or "cls", class_names=class_names, **keys)
    if kind == "mds":
        return mds_images(
            args.source, image_column=args.image_key, label_column=args.label_key, class_names=class_names
        )
    return shapes_images(10_000 if args.num_samples is None else args.num_samples, seed=args.seed or 0)


SELECTOR_DEFAULTS = {"keep": 0.25, "method": DEFAULT_METHOD, "option": [], "seed": 0}


def _selector_arguments(parser: argparse.ArgumentParser) -> None:
    """The round's arguments; unset they are None, so that a command can tell which were given
    (`_selector_choice`)."""
    parser.add_argument("--keep", type=float, help="fraction of samples to keep, in (0, 1] (default 0.25)")
    parser.add_argument("--method", choices=sorted(SELECTORS), help=f"the selector (default {DEFAULT_METHOD})")
    parser.add_argument(
        "--option",
        action="append",
        metavar="NAME=VALUE",
        help="a selector parameter, e.g. ell=16 or class_balanced=false (VALUE read as JSON)",
    )
    parser.add_argument("--seed", type=int, help="the selection's seed (default 0)")


def _selector_choice(args: argparse.Namespace, ignored_with: str | None = None) -> None:
    """Fill in the round's arguments left unset; where `ignored_with` (a flag) makes the command run no
    round of its own, refuse those given, which it would ignore."""
    given = [name for name in SELECTOR_DEFAULTS if getattr(args, name) is not None]
    if ignored_with and given:
        flags = ", ".join(f"--{name}" for name in given)
        raise ParameterError(
            f"{flags} given with {ignored_with}: the server then selects nothing of its own accord (a "
            "trainer's reselect names its own keep and method)"
        )
    for name, default in SELECTOR_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _options(pairs: list[str]) -> dict[str, object]:
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ParameterError(f"--option takes NAME=VALUE, got {pair!r}")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options


def _select(args: argparse.Namespace) -> int:
    dataset = open_dataset(args.url)
    _selector_choice(args)
    options = _options(args.option)
    _check_partitions(args)
    if args.scheduler and args.method not in ON_DASK:
        raise ParameterError(f"--scheduler runs the scans of {', '.join(ON_DASK)}, not {args.method!r}")
    selector = make_selector(args.method, **options)  # options checked before any scan
    if args.report is not None and args.report.strip() in ("", "-"):  # '': no report written; '-': a file so named
        raise ParameterError(f"--report takes the path of a CSV file, got {args.report!r}")
    if args.report and not selector.mute_suspects:
        raise ParameterError(f"--report needs a method that judges labels; {selector} does not")
    if args.report and _overlap(args.report, args.out):
        raise ParameterError(f"--report {args.report!r} is where the selection goes: give it another path")
    # Where the results go is checked now, not after the scan: an unwritable path loses no work.
    dataset.check_outside(args.out, "the selection")
    _check_writable(args.out, "the selection")
    if args.report:
        dataset.check_outside(args.report, "the report")
        _check_writable(args.report, "the report")
    if args.scheduler:
        with _dask_client(args.scheduler) as client:
            executor = make_executor("dask", client=client, partitions=args.partitions)
            selection = selector.select(dataset, args.keep, seed=args.seed, executor=executor)
    else:
        selection = selector.select(dataset, args.keep, seed=args.seed, progress=True)
    selection.save(args.out)
    print(
        f"selected {len(selection)} of {dataset.num_samples} samples ({selection.keep:.1%}); "
        f"scan read {selection.io['bytes'] / 1e6:.2f} MB in {selection.io['seconds']:.1f} s; saved {args.out}"
    )
    if args.report:
        suspects = selection.suspects
        labels, _ = read_labels(dataset, "a label report")  # kept by the scan: read again from memory
        order = np.argsort(suspects.quality, kind="stable")  # the most suspect first
        given, suggested = labels[suspects.ids[order]], suspects.labels[order].astype(np.int64)
        rows = [
            [int(i), int(y), int(s), f"{q:.6g}"]  # 4 decimals printed 0.0000 for a fifth of 100 classes' rows
            for i, y, s, q in zip(suspects.ids[order], given, suggested, suspects.quality[order])
        ]
        header = ["id", "label", "suggested", "quality"]
        if dataset.class_names:  # the classes' names too, where the store has them
            header += ["label_name", "suggested_name"]
            rows = [[*row, dataset.class_names[row[1]], dataset.class_names[row[2]]] for row in rows]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([header, *rows])
        _write(args.report, "the report", text.getvalue().encode())
        share = len(suspects) / dataset.num_samples
        print(f"{len(suspects)} samples' labels look wrong ({share:.1%}); wrote {args.report}")
    return 0


# What the check of a place to write writes there (and removes): a page.
PROBE_BYTES = 4096


def _check_writable(url: str, what: str) -> None:
    """Refuse now a place `what` cannot be written to, by writing a page beside it (not it:
    a file already there is kept until the new one replaces it, and a failed scan leaves none).
    Missing local folders on the way are made, as `mkdir -p` would (object storage has none, and a
    missing bucket is not made)."""
    fs, path = url_to_fs(url)
    if url.endswith("/") or fs.isdir(path):
        raise IsADirectoryError(f"cannot write {what} to {url!r}: it names a folder; give a file's path")
    probe = f"{path}.nearstore-probe"
    if "file" in fs.protocol:  # makedirs would say "File exists" of the file in the way
        blocking = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise NotADirectoryError(f"cannot write {what} to {url!r}: {str(blocking)!r} is a file, not a folder")
    try:
        if "file" in fs.protocol:
            fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(probe, bytes(PROBE_BYTES))  # not empty: a full disk takes an empty file
        fs.rm_file(probe)
    except OSError as e:
        reason = e.strerror or str(e)  # not the probe's name, which the user never gave
        raise restated(e, f"cannot write {what} to {url!r}: {reason}") from e


def _write(url: str, what: str, data: bytes) -> None:
    try:
        write_whole(url, data)
    except OSError as e:
        raise restated(e, f"cannot write {what} to {url!r}: {e}") from e


def _serve(args: argparse.Namespace) -> int:
    from nearstore.serving import NearStoreServer
    from nearstore.serving.front import NginxFront, front_for, nginx_front
    from nearstore.serving.protocol import READ_TOKEN_ENV, TOKEN_ENV
    from nearstore.serving.server import check_exposure

    _selector_choice(args, "--selection" if args.selection else "--primary" if args.primary else None)
    _check_partitions(args)
    if not 0 <= args.port <= 65535:  # Arrow would refuse it with a traceback, after the first scan
        raise ParameterError(f"--port must be in [0, 65535], got {args.port}")
    token = os.environ.get(TOKEN_ENV)  # the admin token: may also push weights and start rounds
    read_token = os.environ.get(READ_TOKEN_ENV)  # may only read samples and selections
    tls = {"tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_client_ca": args.tls_client_ca}
    host, port, front = args.host, args.port, contextlib.nullcontext()
    listen, front_options = _address(args.host, args.port), {"insecure": args.insecure, **tls}
    if args.front != "none":  # the server's rules for what listens beyond 127.0.0.1 hold for a front there
        check_exposure(args.host, token or read_token, {k: v for k, v in tls.items() if v}, args.insecure)
    nginx = front_for(args.host, args.front) == "nginx"
    if nginx:
        if not args.port:
            raise ParameterError(f"nginx in front (--front {args.front}) listens on --port: give one, not 0")
        # port 0: the OS picks the server's port as it binds it (one picked here could be taken by
        # then, after the scan); nginx is pointed at it once the server listens, and the front's
        # refusals (TLS files in pairs, ...) are made now, before the scan, on a stand-in port
        host, port = "127.0.0.1", 0
        nginx_front(listen, f"{host}:1", args.max_proxy_bytes, **front_options)
        tls = {key: None for key in tls}  # nginx speaks to the server in the clear, on the loopback

    with contextlib.ExitStack() as stack:
        executor = None
        if args.scheduler:
            client = stack.enter_context(_dask_client(args.scheduler))
            executor = make_executor("dask", client=client, partitions=args.partitions)
        server = NearStoreServer(
            open_dataset(args.url),
            name=args.name,
            host=host,
            port=port,
            token=token,
            read_token=read_token,
            **tls,
            insecure=args.insecure and not nginx,
            max_proxy_bytes=args.max_proxy_bytes,
            read_cache_bytes=args.read_cache_bytes,
            selection=Selection.load(args.selection) if args.selection else None,
            keep=args.keep,
            method=args.method,
            options=_options(args.option),
            seed=args.seed,
            model=args.model,
            state_dir=args.state_dir,
            progress=True,
            executor=executor,
            shards=args.shards,
            primary=args.primary,
        )
        url = server.url
        if nginx:
            upstream = _address(server.host, server.port)
            front = NginxFront(listen, upstream, args.max_proxy_bytes, **front_options)
            scheme = "grpc+tls" if args.tls_cert else "grpc"
            url = f"{scheme}://{listen}/{server.name} (nginx in front of {server.url})"
        current = server.current
        with front:
            print(f"serving {url} (round {current.round}: {len(current)} samples by {current.method})", flush=True)
            server.serve()  # until SIGINT or SIGTERM, then the front stops too
        return 0


def _shard_list(spec: str) -> list[int]:
    """ "0:8,12" -> [0, ..., 7, 12]: half-open runs and single shard ids, at most MAX_SHARD_IDS
    (checked before a run is spelled out: 0:10000000000, a typo, took all the memory)."""
    shards: list[int] = []
    for part in spec.split(","):
        start, colon, stop = part.partition(":")
        try:
            run = range(int(start), int(stop)) if colon else range(int(start), int(start) + 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is neither a shard id nor a START:STOP run") from None
        if len(shards) + len(run) > MAX_SHARD_IDS:
            raise argparse.ArgumentTypeError(f"{spec!r} names more than {MAX_SHARD_IDS:,} shards")
        shards += run
    return shards


def _partitions_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--partitions",
        type=int,
        help="with --scheduler: the partitions of consecutive shards a scan runs in (default: one a worker thread "
        "of the cluster; windows end where partitions do, so give the count a selection records, "
        "params['partitions'], for its picks on any cluster)",
    )


def _check_partitions(args: argparse.Namespace) -> None:
    if args.partitions is not None and not args.scheduler:
        raise ParameterError("--partitions cuts a scan on a Dask cluster: it needs --scheduler")
    if args.partitions is not None and args.partitions < 1:
        raise ParameterError(f"--partitions must be an integer >= 1, got {args.partitions}")


def _dask_client(address: str) -> Any:
    """A dask.distributed Client of the scheduler at `address`; one that is no address refused by name."""
    from distributed import Client

    try:
        return Client(address)
    except ValueError as e:  # distributed's parse of it: 'missing port number in address ...'
        raise ParameterError(f"--scheduler {address!r} is not a scheduler's address (tcp://host:port): {e}") from e


def _address(host: str, port: int) -> str:
    """host:port, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _info(args: argparse.Namespace) -> int:
    fs, path = url_to_fs(args.url)
    # a file is a selection, whatever its name, and so is a .npz; anything else a dataset
    # (open_dataset names what it lacks, or why it cannot be read)
    if path.endswith(".npz") or fs.isfile(path):
        s = Selection.load(args.url)
        print(
            json.dumps(
                {
                    "method": s.method,
                    "selected": len(s),
                    "keep": s.keep,
                    "params": s.params,
                    "round": s.round,
                    "io": s.io,
                    "dataset": s.dataset,
                },
                indent=2,
            )
        )
        return 0
    ds = open_dataset(args.url)
    print(
        json.dumps(
            {
                **ds.identity(),
                "label_array": ds.label_array,
                "class_names": list(ds.class_names),
                "shard_samples": ds.shard_samples,
                "stored_bytes": ds.stored_nbytes(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
