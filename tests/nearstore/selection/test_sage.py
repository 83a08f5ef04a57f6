"""SAGE's two-pass scan and the random baseline, on a real store."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from nearstore import RandomFeatureProxy, open_dataset, random_select, sage_select, write_dataset
from nearstore.errors import DatasetError, ParameterError
from nearstore.selection.selectors import sage
from nearstore.storage import read_labels


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """150 samples of 3 Gaussian classes in shards of 32, written once: (url, x, y)."""
    rng = np.random.default_rng(0)
    y = np.arange(150) % 3
    x = (rng.normal(size=(150, 6)) + 2 * np.eye(3, 6)[y]).astype(np.float32)
    url = str(tmp_path_factory.mktemp("scan") / "blobs.zarr")
    write_dataset(url, [{"x": x, "y": y}], shard_samples=32)
    return url, x, y


@pytest.fixture
def blobs(written):
    """`written` opened afresh, so what a test reads is not in an earlier test's caches."""
    url, x, y = written
    return open_dataset(url), x, y


def test_sage_equals_brute_force_agreement_when_the_sketch_is_exact(blobs):
    dataset, x, y = blobs
    proxy = RandomFeatureProxy(3, width=8, seed=1).fit(x, y)
    # 50 samples per class < ell: Frequent Directions never shrinks, the sketch spans the data
    selection = sage_select(dataset, 0.2, proxy=proxy, ell=64)
    np.testing.assert_array_equal(selection.ids, brute_force_agreement(proxy, x, y, 10))
    assert selection.method == "sage" and selection.params["ell"] == 64
    assert np.all((selection.scores > 0) & (selection.scores <= 1 + 1e-6))
    assert np.all(selection.weights == 1)


def brute_force_agreement(proxy: RandomFeatureProxy, x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Each class's k samples of highest cos(g_i, ḡ), from the gradients themselves, sorted."""
    expected = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        g = proxy.embed(x[members], y[members]).double().numpy()
        mean = g.mean(0)
        scores = g @ mean / (np.linalg.norm(g, axis=1) * np.linalg.norm(mean))
        expected.extend(members[np.argsort(-scores, kind="stable")[:k]])
    return np.sort(expected)


def test_an_ell_past_the_embedding_sizes_the_sketch_by_it_and_stays_exact(blobs):
    dataset, x, y = blobs
    # 9-dim gradients: 50 samples a class fill a sketch of dim + 1 = 10 rows (a buffer of 20) and
    # shrink it, by its 10th eigenvalue, which is 0: the sketch stays exact
    proxy = RandomFeatureProxy(3, width=2, seed=1).fit(x, y)
    selection = sage_select(dataset, 0.2, proxy=proxy, ell=10**9)  # 2·10^9·9 floats a class, were it allocated
    np.testing.assert_array_equal(selection.ids, brute_force_agreement(proxy, x, y, 10))
    assert selection.params["ell"] == 10**9


def test_two_passes_read_every_shard_once_each(blobs, fingerprint):
    dataset, _, _ = blobs
    before = fingerprint(dataset.url)
    selection = sage_select(dataset, 0.5, ell=4, warmup_samples=40)
    # Pass 1 (warm-up shards included, not read twice; the labels read whole for the warm-up and
    # kept) reads every shard object whole; pass 2 reads every shard's inputs in one range, without
    # the shard indexes it already holds, and no labels.
    stored = dataset.stored_nbytes(["x", "y"])
    x = dataset.arrays["x"]
    # an index a shard object: (offset, length) an inner chunk, and a checksum
    indexes = dataset.num_shards * (x.shards[0] // x.chunks[0] * 16 + 4)
    assert selection.io["first_pass_bytes"] == stored
    assert selection.io["bytes"] == stored + dataset.stored_nbytes(["x"]) - indexes
    assert selection.io["requests"] == 3 * dataset.num_shards
    assert fingerprint(dataset.url) == before


def test_class_balanced_and_global_budgets(blobs):
    dataset, _, y = blobs
    balanced = sage_select(dataset, 0.1, ell=4, warmup_samples=64)
    assert np.bincount(y[balanced.ids], minlength=3).tolist() == [5, 5, 5]
    tiny = sage_select(dataset, 0.001, ell=4, warmup_samples=64)
    assert np.bincount(y[tiny.ids], minlength=3).tolist() == [1, 1, 1]  # at least one per class
    unbalanced = sage_select(dataset, 0.1, ell=4, class_balanced=False, warmup_samples=64)
    assert len(unbalanced) == 15 and len(np.unique(unbalanced.ids)) == 15
    everything = sage_select(dataset, 1.0, ell=4, warmup_samples=64)
    np.testing.assert_array_equal(everything.ids, np.arange(150))


@pytest.mark.parametrize("keep", [0, -0.5, 1.01, float("nan")])
def test_keep_outside_unit_interval_is_refused(blobs, keep):
    dataset, _, _ = blobs
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        sage_select(dataset, keep)
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        random_select(dataset, keep)


def test_missing_labels_are_named(tmp_path):
    dataset = write_dataset(str(tmp_path / "u.zarr"), [{"x": np.ones((10, 3), np.float32)}], label_array=None)
    with pytest.raises(ValueError, match="needs labels.*has no label array"):
        sage_select(dataset, 0.5)
    with pytest.raises(ValueError, match="class-balanced selection needs labels"):
        random_select(dataset, 0.5, class_balanced=True)
    assert len(random_select(dataset, 0.5)) == 5


@pytest.mark.parametrize(
    ("bad", "dtype"),
    [(np.nan, np.float32), (np.inf, np.float32), (-3e37, np.float32), (np.inf, np.float16), (np.nan, np.float16)],
)  # 3e37 is finite, and its float32 square is not; ±1e18 cast to float16 is inf, which inf passed
def test_non_finite_samples_are_named(tmp_path, bad, dtype):
    x = np.ones((100, 3), dtype)
    x[37, 1] = bad
    dataset = write_dataset(str(tmp_path / "nan.zarr"), [{"x": x, "y": np.arange(100) % 2}], shard_samples=16)
    with pytest.raises(ValueError, match=r"sample 37 of array 'x' contains NaN, inf or a value past ±1e\+18"):
        sage_select(dataset, 0.5, warmup_samples=1)  # warm-up reads one random shard, pass 1 the rest


def test_random_selection_is_seeded_and_can_balance_classes(blobs):
    dataset, _, y = blobs
    a, b, c = (random_select(dataset, 0.2, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.ids, b.ids)
    assert not np.array_equal(a.ids, c.ids)
    assert len(a) == 30 and a.io["bytes"] == 0
    balanced = random_select(dataset, 0.2, seed=0, class_balanced=True)
    assert np.bincount(y[balanced.ids]).tolist() == [10, 10, 10]
    assert balanced.io["bytes"] == dataset.stored_nbytes(["y"])
    # the labels stay with the opened dataset: a second round reads nothing, and draws the same
    again = random_select(dataset, 0.2, seed=0, class_balanced=True)
    assert again.io["bytes"] == again.io["requests"] == 0
    with pytest.raises(ValueError, match="read-only"):
        read_labels(dataset, "this test")[0][0] = 1  # kept for every round: nobody may change it
    np.testing.assert_array_equal(again.ids, balanced.ids)
    reopened = random_select(open_dataset(dataset.url), 0.2, seed=0, class_balanced=True)
    assert reopened.io["bytes"] == dataset.stored_nbytes(["y"])


SCAN_MEMORY_PROBE = """
import sys
import numpy as np
from nearstore import RandomFeatureProxy, open_dataset, sage_select

def peak_rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

dataset = open_dataset(sys.argv[1])
x, y = dataset.arrays["x"][:512], dataset.labels[:512]
proxy = RandomFeatureProxy(10, width=2047).fit(x, y)
proxy.embed(x[:256], y[:256])  # one shard's worth: the working set the scan needs
before = peak_rss_bytes()
sage_select(dataset, 0.1, ell=8, proxy=proxy)
print(peak_rss_bytes() - before)
"""


@pytest.mark.slow
def test_scan_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    # 16,000 samples with 20,480-dim gradient embeddings: holding them all would take 1.3 GB;
    # the scan needs a few copies of one shard's (21 MB) and the sketches (13 MB).
    n, dim = 16_000, 10 * 2048
    rng = np.random.default_rng(0)
    batches = ({"x": rng.normal(size=(1000, 16)).astype(np.float32), "y": rng.integers(0, 10, 1000)} for _ in range(16))
    dataset = write_dataset(str(tmp_path / "wide.zarr"), batches, shard_samples=256)
    probe = subprocess.run(
        [sys.executable, "-c", SCAN_MEMORY_PROBE, dataset.url], capture_output=True, text=True, check=True
    )
    growth = int(probe.stdout.split()[-1])
    assert growth < n * dim * 4 / 4, f"the scan's peak memory grew by {growth / 1e6:.0f} MB"


def test_sketches_past_their_memory_are_refused_before_a_pass(blobs, monkeypatch):
    dataset, x, y = blobs
    proxy = RandomFeatureProxy(3, width=8, seed=1).fit(x, y)  # gradients of 3 x 9 floats
    monkeypatch.setattr(sage, "SKETCH_BYTES", 2 * (2 * 4 * 27 * 4))  # two sketches of 2 x 4 rows
    with pytest.raises(ParameterError, match=r"SAGE's sketches would take 0.0 GiB \(3 of 2 x 4 rows of 27 floats\)"):
        sage_select(dataset, 0.5, ell=4, proxy=proxy)
    assert len(sage_select(dataset, 0.5, ell=4, proxy=proxy, class_balanced=False)) == 75  # one sketch fits


def test_a_consensus_with_no_direction_is_refused_by_name(tmp_path):
    # identical inputs, balanced labels: the pooled gradients cancel out
    dataset = write_dataset(str(tmp_path / "same.zarr"), [{"x": np.ones((60, 3), np.float32), "y": np.arange(60) % 2}])
    with pytest.raises(DatasetError, match="the mean gradient of the pooled samples has no direction in its sketch"):
        sage_select(dataset, 0.5, class_balanced=False)
    assert len(sage_select(dataset, 0.5, class_balanced=False, score="residual")) == 30


def test_sage_select_refuses_an_ell_that_keeps_no_row(blobs):
    # only the Sage selector checked it: agreement blamed the data, residual scored every sample 1
    dataset, x, y = blobs
    with pytest.raises(ParameterError, match="ell must be an integer >= 2, got 1"):
        sage_select(dataset, 0.2, proxy=RandomFeatureProxy(3, width=8, seed=1).fit(x, y), ell=1)
