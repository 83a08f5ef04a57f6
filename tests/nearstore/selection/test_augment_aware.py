"""AugmentAware beside the data: per window of a class, the weighted facility-location medoids of
the samples' expected gradients under augmentation, checked against the objective computed by
brute force; by name through the command line and a loader's re-selection."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from loaders import StreamingLoader
from nearstore import AugmentAware, Craig, ModelProxy, ParameterError, RandomFeatureProxy, make_selector, write_dataset
from nearstore.app.cli import main
from nearstore.selection import Selection
from nearstore.selection.augment import shifted_signals
from nearstore.selection.executors import DaskExecutor, local_cluster
from nearstore.selection.plan import share, window_bounds

PER_CLASS, SHARD, WINDOW, DRAWS = 40, 16, 16, 3


@pytest.fixture(scope="module")
def signals(tmp_path_factory):
    """80 signals of 40 points, 2 classes (a bump early or late) interleaved, shards of 16, and a
    proxy fitted on them."""
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], PER_CLASS)
    t = np.arange(40)
    x = np.exp(-0.5 * ((t[None] - (12 + 16 * y)[:, None]) / 3.0) ** 2) + 0.3 * rng.normal(size=(len(y), 40))
    x = x.astype(np.float32)
    url = str(tmp_path_factory.mktemp("augaware") / "signals.zarr")
    dataset = write_dataset(url, [{"x": x, "y": y}], shard_samples=SHARD)
    return dataset, x, y, RandomFeatureProxy(2, width=12, seed=1).fit(x, y)


def expected_gradients(x: np.ndarray, y: np.ndarray, proxy, seed: int) -> np.ndarray:
    """ḡ_i = mean over DRAWS augmented copies of the proxy's gradient, a shard's copies drawn from
    (seed, its first id), in float64."""
    means = []
    for start in range(0, len(y), SHARD):
        shard = slice(start, start + SHARD)
        rng = np.random.default_rng([seed, start])
        views = [shifted_signals(x[shard], rng) for _ in range(DRAWS)]
        means.append(np.mean([proxy.embed(v, y[shard]).double().numpy() for v in views], axis=0))
    return np.concatenate(means)


def coverage(distances: np.ndarray, chosen: list[int]) -> float:
    """F(S) = Σ_i max_{j∈S} (C − d(i, j)), C the largest distance (F(∅) = 0)."""
    if not chosen:
        return 0.0
    return float((distances.max() - distances[:, chosen].min(1)).sum())


def greedy(distances: np.ndarray, k: int, taken: set[int] = frozenset()) -> tuple[list[int], np.ndarray]:
    """Plain greedy on F, every candidate's F(S ∪ {j}) evaluated, and CRAIG's weights: each point to
    its nearest pick (a pick owns itself), sizes × k / w. Gains equal up to float32's rounding (two
    points nearest each other, apart from the rest, gain alike: which one rounding favours is luck)
    are a tie, which goes to a point in `taken` (the picks being checked), then the lowest index."""
    chosen: list[int] = []
    for _ in range(k):
        gains = np.array(
            [coverage(distances, chosen + [j]) if j not in chosen else -np.inf for j in range(len(distances))]
        )
        tied = np.flatnonzero(gains >= gains.max() * (1 - 1e-6))
        chosen.append(int(next((j for j in tied if j in taken), tied[0])))
    owner = distances[:, chosen].argmin(1)
    owner[chosen] = np.arange(k)
    return chosen, np.bincount(owner, minlength=k) * k / len(distances)


def greedy_medoids(x: np.ndarray, y: np.ndarray, proxy, keep: float, seed: int, window: int, taken=()):
    """The expected selection by brute force: per window of each class, `greedy` on the distances of
    the ḡ formed explicitly (`expected_gradients`), ties to the ids in `taken`; (ids, weights)
    sorted by id, and each window's (distances, picks)."""
    means = expected_gradients(x, y, proxy, seed)
    expected, weights, windows = [], [], []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        for start, end in window_bounds(len(members), window):
            ids = members[start:end]
            points = means[ids]
            distances = np.linalg.norm(points[:, None] - points[None], axis=2)
            picks, w = greedy(distances, share(keep, 1, start, end), {i for i, j in enumerate(ids) if j in taken})
            expected += ids[picks].tolist()
            weights += w.tolist()
            windows.append((distances, picks))
    order = np.argsort(expected)
    return np.array(expected)[order], np.array(weights)[order], windows


def test_picks_are_the_greedy_medoids_of_the_expected_augmented_gradients(signals):
    dataset, x, y, proxy = signals
    keep, seed = 0.25, 3
    chosen = AugmentAware(window=WINDOW, augmentations=DRAWS, augment="signal").select(
        dataset, keep, proxy=proxy, seed=seed
    )
    ids, weights, windows = greedy_medoids(x, y, proxy, keep, seed, WINDOW, set(chosen.ids.tolist()))
    np.testing.assert_array_equal(chosen.ids, ids)
    np.testing.assert_allclose(chosen.weights, weights, rtol=1e-6)
    for distances, picks in windows[:: len(windows) // 2]:  # each class's first window, by brute force:
        best = max(coverage(distances, list(s)) for s in itertools.combinations(range(len(distances)), len(picks)))
        assert coverage(distances, picks) >= (1 - 1 / np.e) * best  # greedy within 1 − 1/e of the best subset
    assert len(chosen) == 20 and chosen.method == "augaware" and np.isnan(chosen.scores).all()
    assert chosen.params == {
        "keep": keep,
        "seed": seed,
        "proxy": "RandomFeatureProxy",
        "window": WINDOW,
        "augmentations": DRAWS,
        "augment": "signal",
    }
    assert chosen.io["bytes"] > 0


def test_many_classes_of_a_few_samples_pick_as_their_mean_gradients_formed_whole(tmp_path):
    """The windows hold each draw's factors, not ḡ: at more classes than features, and every class's
    last window unfinished until the pass's end, the picks are still those of ḡ formed whole."""
    rng = np.random.default_rng(4)
    classes = 60
    y = rng.permutation(np.repeat(np.arange(classes), 7))  # 7 a class: one window of 8, never full
    x = (rng.normal(size=(classes, 40))[y] + 0.5 * rng.normal(size=(len(y), 40))).astype(np.float32)
    dataset = write_dataset(str(tmp_path / "classes.zarr"), [{"x": x, "y": y}], shard_samples=SHARD)
    proxy = RandomFeatureProxy(classes, width=12, seed=1).fit(x, y)
    keep, seed = 0.3, 7
    chosen = AugmentAware(window=8, augmentations=DRAWS, augment="signal").select(dataset, keep, proxy=proxy, seed=seed)
    ids, weights, _ = greedy_medoids(x, y, proxy, keep, seed, 8, set(chosen.ids.tolist()))
    assert len(ids) == classes * 2  # round(0.3 · 7) a class
    np.testing.assert_array_equal(chosen.ids, ids)
    np.testing.assert_allclose(chosen.weights, weights, rtol=1e-6)
    assert not np.all(weights == 1)  # windows that merged samples into clusters, not only singletons


def test_without_augmentation_it_is_craig(signals):
    dataset, _, _, proxy = signals
    plain = AugmentAware(window=WINDOW, augmentations=1, augment="none").select(dataset, 0.3, proxy=proxy)
    craig = Craig(window=WINDOW).select(dataset, 0.3, proxy=proxy)
    np.testing.assert_array_equal(plain.ids, craig.ids)
    np.testing.assert_allclose(plain.weights, craig.weights)


def test_augmented_picks_differ_from_plain_ones_and_are_seeded(signals):
    dataset, _, _, proxy = signals
    selector = AugmentAware(window=WINDOW, augmentations=DRAWS)
    first, again, other = (selector.select(dataset, 0.3, proxy=proxy, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(first.ids, again.ids)
    plain = Craig(window=WINDOW).select(dataset, 0.3, proxy=proxy)
    assert not np.array_equal(first.ids, plain.ids) and not np.array_equal(first.ids, other.ids)
    assert np.bincount(y_of(dataset)[first.ids]).tolist() == [12, 12]  # round(0.3 · 40) per class


def y_of(dataset) -> np.ndarray:
    return dataset.labels[:]


def test_it_runs_by_name_from_the_command_line(signals, tmp_path):
    dataset, _, _, _ = signals
    out = str(tmp_path / "augaware.npz")
    argv = ["select", dataset.url, out, "--keep", "0.5", "--method", "augaware", "--option", "augmentations=2"]
    assert main(argv) == 0
    chosen = Selection.load(out)
    assert chosen.method == "augaware" and chosen.params["augmentations"] == 2 and len(chosen) == 40
    assert np.all(chosen.weights > 0) and abs(chosen.weights.mean() - 1) < 1e-6


def test_a_loader_reselects_with_it_and_augments_what_it_picked(signals):
    dataset, _, _, _ = signals
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    loader = StreamingLoader(dataset, batch_size=16, backend="torch", device="cpu")
    loader.update_proxy(model)
    chosen = loader.reselect(0.25, method="augaware", window=WINDOW, augmentations=2)
    assert chosen.method == "augaware" and chosen.params["proxy"] == ModelProxy.__name__ and len(chosen) == 20
    assert sum(len(x) for x, _ in loader) == 20  # the next epoch iterates it
    marked = StreamingLoader(dataset, batch_size=80, augment=chosen, transform=lambda x: x + 100, shuffle=False)
    ((x, _),) = list(marked)
    np.testing.assert_array_equal(np.flatnonzero((x[:, 0] > 50).numpy()), chosen.ids)


@pytest.mark.slow  # a cluster of worker processes
def test_on_a_dask_cluster_it_selects_as_in_process_where_windows_agree(tmp_path):
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(2)
    y = np.arange(960) % 3  # 20 shards of 48, 16 of each class a shard: no window straddles two partitions
    x = (rng.normal(size=(960, 40)) + 2 * np.repeat(np.eye(3), [13, 13, 14], axis=1)[y]).astype(np.float32)
    dataset = write_dataset(str(tmp_path / "aligned.zarr"), [{"x": x, "y": y}], shard_samples=48)
    proxy = RandomFeatureProxy(3, width=8, seed=1).fit(x, y)
    selector = AugmentAware(window=16, augmentations=2)
    cluster = local_cluster()
    with cluster, distributed.Client(cluster) as client:
        there = selector.select(dataset, 0.25, proxy=proxy, seed=5, executor=DaskExecutor(client))
    here = selector.select(dataset, 0.25, proxy=proxy, seed=5)
    np.testing.assert_array_equal(there.ids, here.ids)
    np.testing.assert_allclose(there.weights, here.weights)
    assert there.params["executor"] == "dask" and "executor" not in here.params
    assert there.io["bytes"] >= dataset.stored_nbytes()  # the workers' reads counted: every shard, whole


@pytest.mark.parametrize(
    "options, message",
    [
        ({"window": 1}, "window"),
        ({"window": True}, "window"),
        ({"augmentations": 0}, "augmentations"),
        ({"augmentations": 1.5}, "augmentations"),
        ({"augment": "rotate"}, "augment must be one of"),
        ({"pool": 2}, "'augaware' has no options \\['pool'\\]"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ParameterError, match=message):
        make_selector("augaware", **options)


def test_an_augmentation_for_other_samples_is_refused_by_name(signals):
    dataset, _, _, proxy = signals
    with pytest.raises(ParameterError, match="augment='image' takes a batch of images"):
        AugmentAware(augment="image").select(dataset, 0.5, proxy=proxy)
