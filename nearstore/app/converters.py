"""What `nearstore convert` writes from: batches for `write_dataset` from files and from built-in
generators, each streamed so that converting a million samples never holds them all in memory."""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nearstore import Dataset, DatasetError, ParameterError, SelectiveReader, open_dataset, write_dataset
from nearstore.checks import check_integer
from nearstore.storage.dataset import UncheckedStoreWarning
from nearstore.storage.writer import fixed_size, label_strings

Batches = Iterator[dict[str, np.ndarray]]
DEFAULT_BATCH = 4096


@dataclass(frozen=True)
class Arrays:
    """Samples `x` and labels `y` (None: unlabelled) from .npy files or a .npz archive, checked,
    ready for `write_dataset`: batches {"x", "y"}, and the class names of string labels, sorted as
    ImageFolder sorts its class folders (None for integer labels: write_dataset names them
    "0".."C-1")."""

    x: np.ndarray = field(repr=False)
    y: np.ndarray | None = field(repr=False)
    class_names: tuple[str, ...] | None
    batch: int = field(default=DEFAULT_BATCH, repr=False)

    def batches(self) -> Batches:
        """A fresh pass over x and y in batches of at most `batch` samples and BATCH_BYTES (samples
        of 256 KiB come 256 at a time), read one batch at a time."""
        return _sliced(self.x, self.y, self.batch)


def npy_arrays(x_path: str | Path, y_path: str | Path | None = None, *, batch: int = DEFAULT_BATCH) -> Arrays:
    """Samples and labels from .npy files, memory-mapped: only one batch is ever in memory. The
    files are checked here, before a batch is asked for: one that cannot be stored is refused
    naming it before anything is written."""
    x = _npy(x_path)
    y = _npy(y_path) if y_path is not None else None
    return _checked(x, y, str(x_path), str(y_path), batch)


def npz_arrays(path: str | Path, *, x_key: str = "x", y_key: str | None = "y", batch: int = DEFAULT_BATCH) -> Arrays:
    """Samples and labels from a .npz archive (each array is decompressed once, whole, here),
    checked as `npy_arrays`' are."""
    with _open_npz(path) as archive:
        for key in (x_key, y_key):
            if key is not None and key not in archive:
                unlabelled = " (unlabelled data: --y-key '', or y_key=None)" if key == y_key else ""
                raise DatasetError(f"{path}: no array {key!r}; it has {sorted(archive.files)}{unlabelled}")
        x = _member(archive, x_key, path)
        y = _member(archive, y_key, path) if y_key is not None else None
    return _checked(x, y, f"{path}:{x_key}", f"{path}:{y_key}", batch)


def _checked(x: np.ndarray, y: np.ndarray | None, x_name: str, y_name: str, batch: int) -> Arrays:
    """x and y checked (`_check_arrays`), with the class names of string labels: the labels are
    read for them here, from the array the batches read, not loaded again."""
    _check_arrays(x, y, x_name, y_name)
    if y is None or y.dtype.kind not in "US":
        return Arrays(x, y, None, batch)
    names = np.unique(label_strings(np.asarray(y), f"label array 'y' from {y_name}"))
    return Arrays(x, y, tuple(str(name) for name in names), batch)


def mnist1d_batches(num_samples: int, *, seed: int = 0, batch: int = DEFAULT_BATCH) -> Batches:
    """MNIST-1D (Greydanus 2020) generated locally by the `mnist1d` package, any number of samples.

    Samples are float32 (40,), labels int64, classes balanced within each batch. Batch j is
    generated from seed (seed, j), so any prefix of a larger dataset is the smaller one.
    The values are mnist1d's raw signal, not standardised over the whole set (that would need
    all samples at once); the proxy and the demo model standardise for themselves.
    """
    if num_samples < 1:
        raise ParameterError(f"num_samples must be >= 1, got {num_samples}")
    seed = check_integer("seed", seed, 0)  # numpy's generators take none below 0: a traceback at the CLI
    from mnist1d.data import get_dataset_args, get_templates, transform

    args, templates = get_dataset_args(), get_templates()
    for j, start in enumerate(range(0, num_samples, batch)):
        n = min(batch, num_samples - start)
        rng = np.random.default_rng([seed, j])
        labels = rng.permutation(np.arange(start, start + n) % 10).astype(np.int64)
        # mnist1d draws from numpy's global generator: seed it per batch, then put it back.
        saved = np.random.get_state()
        np.random.seed(rng.integers(2**32 - 1))
        try:
            x = np.stack([transform(templates["x"][c], templates["t"], args)[0] for c in labels])
        finally:
            np.random.set_state(saved)
        yield {"x": x.astype(np.float32), "y": labels}


def digits_batches() -> Batches:
    """sklearn's 8×8 handwritten digits (1,797 samples, uint8 pixels 0..16), shipped with sklearn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    yield {"x": digits.images.astype(np.uint8), "y": digits.target.astype(np.int64)}


def nearstore_batches(url: str) -> tuple[Batches, Dataset]:
    """Batches of every array of the nearstore dataset at `url`, shard by shard, and the dataset:
    to rewrite a store (one written before checksums into the current format, or with other shard
    sizes). A format-1 store has no checksums: what it holds is rewritten as it reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedStoreWarning)  # rewriting it is what the warning asks
        dataset = open_dataset(url)
    reader = SelectiveReader(dataset)
    return (reader.read_shard(shard) for shard in range(reader.num_shards)), dataset


def ensure_dataset(url: str, num_samples: int, write: Callable[[], Dataset]) -> Dataset:
    """Open the store at `url`, or `write()` it first where it is missing, holds another number
    of samples, or was written before checksums (a generated dataset, made once and kept)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncheckedStoreWarning)  # such a store is written again
            dataset = open_dataset(url)
        if dataset.num_samples == num_samples and dataset.manifest is not None:
            return dataset
    except (FileNotFoundError, DatasetError):
        pass
    return write()


def ensure_mnist1d(url: str, num_samples: int, seed: int) -> Dataset:
    """Open the MNIST-1D store at `url`, generating it first if it is missing or another size."""
    batches = mnist1d_batches(num_samples, seed=seed)
    return ensure_dataset(
        url,
        num_samples,
        lambda: write_dataset(url, batches, num_samples=num_samples, overwrite=True, progress=True),
    )


NOISE = ("symmetric", "pair")


def noisy_labels(labels: np.ndarray, kind: str, rate: float, *, seed: int = 0) -> np.ndarray:
    """`labels` with a share `rate` of them corrupted, for studying robustness: "symmetric" replaces
    a label by a uniformly random class (which may be the same one), "pair" turns class c into
    c + 1 (mod the number of classes). Seeded: the same call corrupts the same samples."""
    if kind not in NOISE:
        raise ParameterError(f"label noise must be one of {NOISE}, got {kind!r}")
    if not 0 <= rate <= 1:
        raise ParameterError(f"label noise rate must be in [0, 1], got {rate}")
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    hit = rng.random(len(labels)) < rate
    noisy = labels.copy()
    noisy[hit] = rng.integers(0, classes, int(hit.sum())) if kind == "symmetric" else (labels[hit] + 1) % classes
    return noisy


def long_tail(labels: np.ndarray, ratio: float) -> np.ndarray:
    """The sample ids (sorted) a long tail keeps: class c of C keeps its first
    n_c · ratio^(−c / (C − 1)) samples (at least one), so n_max / n_min is about `ratio`."""
    if not ratio >= 1:
        raise ParameterError(f"imbalance ratio must be >= 1, got {ratio}")
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1
    members = [np.flatnonzero(labels == c) for c in range(classes)]
    shares = [ratio ** (-c / max(1, classes - 1)) for c in range(classes)]
    return np.sort(np.concatenate([m[: max(1, round(len(m) * f))] for m, f in zip(members, shares) if len(m)]))


def _check_arrays(x: np.ndarray, y: np.ndarray | None, x_name: str, y_name: str) -> None:
    """Refuse, naming the file (`x_name`, `y_name`), samples or labels `write_dataset` would refuse
    naming only the array: here, where the file is known, not by write_dataset."""
    for array, name in ((x, x_name), (y, y_name)):
        if array is not None and array.ndim == 0:
            raise DatasetError(f"{name} is a single value ({array.dtype} scalar), not an array of samples")
    if not fixed_size(x.dtype):
        raise DatasetError(
            f"array 'x' from {x_name} holds {x.dtype} values, which are not stored: samples are booleans, "
            "integers or floats of up to 8 bytes"
        )
    if y is not None and (y.dtype.kind not in "iuUS" or y.shape[1:] not in ((), (1,))):
        raise DatasetError(
            f"label array 'y' from {y_name} holds {y.dtype} values of shape {y.shape}: labels are integers or "
            "strings (class names), one a sample, of shape (n,) or (n, 1)"
        )
    if y is not None and len(y) != len(x):
        raise DatasetError(f"{x_name} has {len(x)} samples but {y_name} has {len(y)}")
    if y is not None:
        refuse_negative_labels(y, f"label array 'y' from {y_name}")


def refuse_negative_labels(labels: np.ndarray, where: str, first: int = 0) -> None:
    """Refuse the first negative label of `labels` (of shape (n,) or (n, 1): rows `first`, ... of
    `where`, a file and its array or column) naming its row and value; write_dataset would name
    neither, nor the file. Other labels (strings: class names) pass."""
    if labels.dtype.kind != "i" or not len(labels) or labels.min() >= 0:  # min: no copy of a memory-mapped file
        return
    row = int(np.flatnonzero(labels < 0)[0])
    raise DatasetError(
        f"{where} holds a negative label, {labels.flat[row]}, at row {first + row}; labels are class ids, 0 or more"
    )


def _sliced(x: np.ndarray, y: np.ndarray | None, batch: int) -> Batches:
    """x and y in batches of at most `batch` samples and BATCH_BYTES, read one batch at a time."""
    if len(x):
        batch = max(1, min(batch, BATCH_BYTES // max(1, x[:1].nbytes)))
    for start in range(0, len(x), batch):
        out = {"x": np.asarray(x[start : start + batch])}
        if y is not None:
            out["y"] = np.asarray(y[start : start + batch])
        yield out


# A batch read from an array holds at most this many bytes (and at most `batch` samples): one batch
# in memory, whatever a sample's size.
BATCH_BYTES = 64 << 20
_MAGIC = (b"\x93NUMPY", b"PK\x03\x04")  # what an .npy file and an .npz archive (a zip) start with


def _load(path: str | Path, *, mmap: bool) -> np.ndarray:
    """An .npy array or .npz archive; anything else refused naming the file (numpy would call
    any other file pickled data)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    if not head.startswith(_MAGIC):
        raise DatasetError(f"{path} is neither an .npy file nor an .npz archive (it starts with {head!r})")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:  # an object array (pickled), or a header numpy cannot read
        raise DatasetError(f"{path} cannot be read as numeric arrays: {e}") from None
    except zipfile.BadZipFile as e:  # cut short, or its bytes changed
        raise DatasetError(f"{path}: not a whole .npz archive ({type(e).__name__}: {e})") from None


def _npy(path: str | Path) -> np.ndarray:
    """An .npy file's array, memory-mapped; an .npz archive or a scalar refused naming the file."""
    array = _load(path, mmap=True)
    if isinstance(array, np.lib.npyio.NpzFile):
        array.close()
        raise DatasetError(f"{path} is a .npz archive, not an .npy file: name it path.npz (or --format npz)")
    return array


def _member(archive: np.lib.npyio.NpzFile, key: str, path: str | Path) -> np.ndarray:
    """Array `key` of a .npz archive; one numpy would unpickle refused naming it."""
    try:
        return archive[key]
    except ValueError as e:  # an object array: pickled
        raise DatasetError(f"{path}:{key} cannot be read as a numeric array: {e}") from None
    except (zipfile.BadZipFile, EOFError) as e:  # its bytes changed or cut inside the archive
        raise DatasetError(f"{path}:{key}: not a whole .npz archive ({type(e).__name__}: {e})") from None


def _open_npz(path: str | Path):
    archive = _load(path, mmap=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path} is not a .npz archive")
    return archive
