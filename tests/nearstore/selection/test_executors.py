"""Executors: the SAGE scan and windowed selection (GRAFT, CRAIG) on a real dask.distributed
cluster (2 worker processes on 127.0.0.1) against the same scans in process."""

from __future__ import annotations

import operator
import re
import threading
import time

import numpy as np
import pytest
import torch
from faults import stall_after_first

from loaders import StoreSource, StreamingLoader
from nearstore import (
    AdaCore,
    AugmentAware,
    Craig,
    Crest,
    DatasetError,
    Graft,
    ParameterError,
    RandomFeatureProxy,
    RoundCancelled,
    Sas,
    Selection,
    SelectiveReader,
    sage_select,
    write_dataset,
)
from nearstore.app.cli import main
from nearstore.selection.executors import DaskExecutor, LocalExecutor, local_cluster, make_executor
from nearstore.selection.selectors.sage import SagePass1, sage_pass1
from nearstore.selection.stages import Scan

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # a cluster of worker processes


@pytest.fixture(scope="module")
def client():
    cluster = local_cluster()
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """600 samples of 3 classes in 10 shards of 64, and a fitted proxy."""
    rng = np.random.default_rng(0)
    y = np.arange(600) % 3
    x = (rng.normal(size=(600, 6)) + 2 * np.eye(3, 6)[y]).astype(np.float32)
    dataset = write_dataset(str(tmp_path_factory.mktemp("dask") / "b.zarr"), [{"x": x, "y": y}], shard_samples=64)
    return dataset, x, y, RandomFeatureProxy(3, width=8, seed=1).fit(x, y)


def test_distributed_scan_equals_the_in_process_scan_when_the_sketch_is_exact(client, blobs):
    dataset, _, _, proxy = blobs
    # 27 = 3 × (8 + 1) embedding dimensions < ell: no shrink anywhere, so merging is exact
    here = sage_select(dataset, 0.2, ell=32, proxy=proxy)
    there = sage_select(dataset, 0.2, ell=32, proxy=proxy, executor=DaskExecutor(client))
    np.testing.assert_array_equal(there.ids, here.ids)
    np.testing.assert_allclose(there.scores, here.scores, atol=1e-5)
    # each pass reads every shard once, whole; the workers' pass 2 reads the indexes again
    stored = dataset.stored_nbytes(["x", "y"])
    assert (here.params["executor"], there.params["executor"]) == ("local", "dask")
    assert here.io["bytes"] <= there.io["bytes"] <= 2 * stored


def test_workers_open_the_clients_dataset_or_refuse_by_name(client, blobs, tmp_path, monkeypatch):
    _, x, y, proxy = blobs
    # opened by a relative path: a worker's working directory is its own (there the path named
    # nothing, or another store of the layout, whose samples were scored as this dataset's)
    monkeypatch.chdir(tmp_path)
    here = write_dataset("rel.zarr", [{"x": x, "y": y}], shard_samples=64)
    assert here.url == "rel.zarr"
    there = sage_select(here, 0.2, ell=32, proxy=proxy, executor=DaskExecutor(client))  # exact when merged
    np.testing.assert_array_equal(there.ids, sage_select(here, 0.2, ell=32, proxy=proxy).ids)
    # the store replaced under the client's open dataset: the workers open the new one, refused
    write_dataset("rel.zarr", [{"x": x + 1, "y": y}], shard_samples=64, overwrite=True)
    with pytest.raises(DatasetError, match=r"a Dask worker opened another dataset at '/.*/rel.zarr' than the client"):
        Graft(window=64).select(here, 0.2, proxy=proxy, executor=DaskExecutor(client))


def test_merged_sketches_meet_the_frequent_directions_bound(client, blobs):
    dataset, x, y, proxy = blobs
    ell, k = 8, 4
    scan = Scan.open(dataset, "SAGE", proxy, 0, "cpu")
    first, reads = DaskExecutor(client).map_reduce(
        scan, sage_pass1, SagePass1.merge, ell=ell, class_balanced=True, device="cpu"
    )
    assert first.counts.tolist() == [200, 200, 200]
    assert reads["bytes"] >= dataset.stored_nbytes(["x", "y"]) - 2 * dataset.num_shards * (64 * 16 + 4)
    for c in range(3):
        a = proxy.embed(x[y == c], y[y == c]).double()
        b = first.sketches[c].sketch().double()
        error = torch.linalg.matrix_norm(a.T @ a - b.T @ b, ord=2)
        tail = (torch.linalg.svdvals(a)[k:] ** 2).sum()
        assert error <= tail / (ell - k) * (1 + 1e-6)
        torch.testing.assert_close(first.sums[c], a.sum(0))


def test_clipcov_runs_on_a_scheduler_from_the_command(client, tmp_path):
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(600, 8)).astype(np.float32), rng.normal(size=(600, 4)).astype(np.float32)
    dataset = write_dataset(str(tmp_path / "pairs.zarr"), [{"x": x, "t": t}], label_array=None, shard_samples=64)
    out = str(tmp_path / "sel.npz")
    assert (
        main(
            [
                "select",
                dataset.url,
                out,
                "--method",
                "clipcov",
                "--keep",
                "0.2",
                "--scheduler",
                client.scheduler.address,
            ]
        )
        == 0
    )
    chosen = Selection.load(out)
    assert chosen.params["executor"] == "dask" and chosen.params["paired_array"] == "t"
    assert abs(len(chosen) - 120) <= 10 and len(np.unique(chosen.ids)) == len(chosen)  # each partition rounds its own


def test_select_command_runs_on_a_scheduler(client, blobs, tmp_path, capsys):
    dataset = blobs[0]
    out = str(tmp_path / "sel.npz")
    args = ["select", dataset.url, out, "--method", "sage", "--keep", "0.1", "--option", "ell=32"]
    assert main([*args, "--scheduler", client.scheduler.address]) == 0
    from_cli = Selection.load(out)
    assert from_cli.params["executor"] == "dask"
    np.testing.assert_array_equal(from_cli.ids, sage_select(dataset, 0.1, ell=32, executor=DaskExecutor(client)).ids)
    # The default proxy's 771-dim gradients overflow ell=32: the merged sketch differs from the
    # streamed one (within the same FD bound), so the picks may differ a little.
    here = sage_select(dataset, 0.1, ell=32)
    assert len(np.intersect1d(from_cli.ids, here.ids)) >= 0.8 * len(here)
    assert main([*args, "--method", "random", "--scheduler", client.scheduler.address]) == 2
    assert (
        "--scheduler runs the scans of sage, graft, craig, adacore, crest, sas, augaware, clipcov, not 'random'"
        in capsys.readouterr().err
    )
    graft = ["select", dataset.url, out, "--keep", "0.25", "--scheduler", client.scheduler.address]
    assert main([*graft, "--method", "adacore"]) == 0 and Selection.load(out).method == "adacore"
    assert Selection.load(out).params["executor"] == "dask"
    assert main(graft) == 0 and Selection.load(out).params["executor"] == "dask"
    np.testing.assert_array_equal(
        Selection.load(out).ids, Graft().select(dataset, 0.25, executor=DaskExecutor(client)).ids
    )
    assert main([*graft, "--partitions", "1"]) == 0 and Selection.load(out).params["partitions"] == 1
    np.testing.assert_array_equal(
        Selection.load(out).ids, Graft().select(dataset, 0.25, executor=DaskExecutor(client, partitions=1)).ids
    )
    assert main([*graft[:5], "--partitions", "1"]) == 2
    assert "--partitions cuts a scan on a Dask cluster: it needs --scheduler" in capsys.readouterr().err


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """1,200 samples of 3 separable classes, y = i % 3, in 25 shards of 48: 16 of each class a
    shard, so windows of 16 never straddle two shards, nor two partitions."""
    rng = np.random.default_rng(2)
    y = np.arange(1200) % 3
    x = (rng.normal(size=(1200, 6)) + 3 * np.eye(3, 6)[y]).astype(np.float32)
    url = str(tmp_path_factory.mktemp("aligned") / "a.zarr")
    return write_dataset(url, [{"x": x, "y": y}], shard_samples=48), y


@pytest.mark.parametrize(
    "selector", [Graft(window=16, mute_suspects=False), Craig(window=16), AdaCore(window=16), AugmentAware(window=16)]
)
@pytest.mark.parametrize("keep", [0.25, 0.1])  # 0.1: 1.6 of a window, budgets rounded on running totals
def test_windowed_selection_on_the_cluster_equals_it_in_process_where_windows_agree(client, aligned, selector, keep):
    dataset, _ = aligned
    there = selector.select(dataset, keep, seed=5, executor=DaskExecutor(client))
    here = selector.select(dataset, keep, seed=5)
    np.testing.assert_array_equal(np.sort(there.ids), np.sort(here.ids))
    order = np.argsort(there.ids), np.argsort(here.ids)
    np.testing.assert_allclose(there.weights[order[0]], here.weights[order[1]])
    assert there.params["executor"] == "dask" and "executor" not in here.params
    assert there.io["bytes"] >= dataset.stored_nbytes()  # the workers' reads counted: every shard, whole
    assert set(there.carry) == set(here.carry)  # what a round hands on: AdaCore's curvature, summed over partitions
    if "curvature" in here.carry:
        np.testing.assert_allclose(there.carry["curvature"], here.carry["curvature"], rtol=1e-5)


@pytest.mark.parametrize("picked", [False, True])
def test_the_default_on_the_cluster_keeps_every_class_budget_exactly(client, blobs, picked):
    dataset, _, y, proxy = blobs  # 64-sample shards, classes not aligned with them: windows differ
    # 40 samples a class: the default draws them (under DRAW_BELOW); draw_below=0 has MaxVol pick them
    selector = Graft(draw_below=0) if picked else Graft()
    there = selector.select(dataset, 0.2, seed=1, executor=DaskExecutor(client))
    here = selector.select(dataset, 0.2, seed=1)
    np.testing.assert_array_equal(np.bincount(y[there.ids], minlength=3), np.bincount(y[here.ids], minlength=3))
    assert len(np.unique(there.ids)) == len(there.ids)
    assert there.params["classes_drawn"] == here.params["classes_drawn"] == (0 if picked else 3)
    if picked:  # MaxVol's picks of windows that differ still mostly agree (draws are seeded by window)
        assert len(np.intersect1d(there.ids, here.ids)) >= 0.6 * len(here.ids)


def test_a_rounds_partitions_are_recorded_and_given_make_its_picks_on_any_cluster(client, blobs):
    # one partition a worker thread: the same seed picked 450 of 1,000 others on 1 worker than on 2
    dataset, _, _, proxy = blobs  # 10 shards: windows straddle them, so the partitions change the picks
    selector = Graft(draw_below=0)
    there = selector.select(dataset, 0.2, seed=1, proxy=proxy, executor=DaskExecutor(client))
    assert there.params["partitions"] == 2  # 2 workers of a thread
    one = selector.select(dataset, 0.2, seed=1, proxy=proxy, executor=DaskExecutor(client, partitions=1))
    here = selector.select(dataset, 0.2, seed=1, proxy=proxy)
    assert one.params["partitions"] == 1 and not np.array_equal(np.sort(there.ids), np.sort(here.ids))
    np.testing.assert_array_equal(np.sort(one.ids), np.sort(here.ids))  # one partition: the pass in process
    three = DaskExecutor(client, partitions=3)
    assert len(selector.select(dataset, 0.2, seed=1, proxy=proxy, executor=three).ids) == len(here.ids)
    assert three.recorded() == {"executor": "dask", "partitions": 3}
    for bad, message in [
        ({"partitions": 0}, "partitions must be an integer >= 1, got 0"),
        ({"partitions": 2, "shards_of": {}}, "partitions= and shards_of= both cut the shards: give one"),
    ]:
        with pytest.raises(ParameterError, match=re.escape(message)):
            DaskExecutor(client, **bad)


@pytest.fixture(scope="module")
def small_classes(tmp_path_factory):
    """100 classes of 10 samples, interleaved, in 40 shards: at keep 0.01 each keeps its one sample."""
    rng = np.random.default_rng(0)
    y = np.arange(1000) % 100
    x = (rng.normal(size=(1000, 8)) + (y[:, None] % 7)).astype(np.float32)
    dataset = write_dataset(str(tmp_path_factory.mktemp("small") / "s.zarr"), [{"x": x, "y": y}], shard_samples=25)
    return dataset, y


@pytest.mark.parametrize(
    "selector", [Craig(), Graft(), AugmentAware(), Graft(pool=2.0)], ids=["craig", "graft", "augment", "pooled"]
)
def test_a_class_too_small_for_its_budget_keeps_one_sample_on_the_cluster_not_one_a_partition(
    client, small_classes, selector
):
    # each partition whose share of such a class rounded to 0 kept one: 800 samples where 100 are due
    dataset, y = small_classes
    here = selector.select(dataset, 0.01, seed=0)
    there = selector.select(dataset, 0.01, seed=0, executor=DaskExecutor(client))
    assert len(there.ids) == len(here.ids) == 100
    assert np.bincount(y[there.ids], minlength=100).tolist() == [1] * 100


def test_sas_clusters_by_partition_and_merges_the_sketches_on_the_cluster(client, blobs):
    dataset, _, y, _ = blobs
    executor = DaskExecutor(client)
    there = Sas().select(dataset, 0.3, seed=2, executor=executor)
    here = Sas().select(dataset, 0.3, seed=2)
    assert there.params["executor"] == "dask" and len(executor.placed) >= 2
    # each partition rounds its latent classes' budgets alone: the sizes agree within a sample a class a partition
    assert abs(len(there) - len(here)) <= 3 * len(executor.placed) and len(np.unique(there.ids)) == len(there)
    # windows end where partitions do: picks differ, still twice the overlap of two random draws
    assert len(np.intersect1d(there.ids, here.ids)) >= 0.6 * len(here.ids)
    assert there.io["bytes"] >= 2 * dataset.stored_nbytes([dataset.input_array])  # two passes, on the workers


@pytest.mark.parametrize("coreset", [False, True])
def test_crest_scores_its_pools_on_the_cluster_as_in_process(client, blobs, coreset):
    dataset, _, _, proxy = blobs
    executor = DaskExecutor(client)
    with distributed.get_task_stream(client) as stream:
        there = Crest(coreset=coreset).select(dataset, 0.2, proxy=proxy, seed=1, executor=executor)
    here = Crest(coreset=coreset).select(dataset, 0.2, proxy=proxy, seed=1)
    assert {task["key"] for task in stream.data} >= set(executor.placed) and len(executor.placed) >= 2
    np.testing.assert_array_equal(there.ids, here.ids)
    np.testing.assert_allclose(there.weights, here.weights)
    np.testing.assert_allclose(there.scores, here.scores, rtol=1e-5)
    # the workers' pool reads counted (and their shard indexes, which this process had read before)
    assert there.io["bytes"] >= here.io["bytes"] > 0


@pytest.mark.parametrize("task", ["sage_pass1", "windowed_pass"])
def test_a_worker_lost_mid_scan_changes_nothing(blobs, aligned, tmp_path, task):
    from faults import KillWorkerOnce

    if task == "sage_pass1":  # an exact sketch: the same as in process
        dataset, _, _, proxy = blobs
        select = lambda **on: sage_select(dataset, 0.2, ell=32, proxy=proxy, **on)  # noqa: E731
    else:  # windows inside partitions however many workers are left: the same as in process
        dataset, _ = aligned
        select = lambda **on: Graft(window=16, mute_suspects=False).select(dataset, 0.25, seed=5, **on)  # noqa: E731
    marker = tmp_path / "killed"
    cluster = local_cluster()
    try:
        with distributed.Client(cluster) as client:
            client.register_plugin(KillWorkerOnce(task, str(marker)))
            there = select(executor=DaskExecutor(client))
    finally:
        cluster.close()
    assert marker.exists()  # a worker really died during the pass; Dask ran its task elsewhere
    np.testing.assert_array_equal(np.sort(there.ids), np.sort(select().ids))


def test_executors_are_chosen_by_name(client, blobs):
    dataset, _, _, proxy = blobs
    assert isinstance(make_executor(), LocalExecutor)
    assert make_executor("dask", client=client).client is client
    with pytest.raises(ParameterError, match="executor must be one of \\['dask', 'local'\\], got 'ray'"):
        make_executor("ray")
    with pytest.raises(ParameterError, match="executor must be one of .*, got \\['x'\\]"):
        make_executor(["x"])
    with pytest.raises(ParameterError, match="executor 'local' does not take the options \\['foo'\\]"):
        make_executor("local", foo=1)
    with pytest.raises(ParameterError, match="executor must be an Executor .*, got 'dask'"):
        Graft().select(dataset, 0.1, executor="dask")
    with pytest.raises(ParameterError, match="executor must be an Executor .*, got <Client: "):
        StoreSource(dataset, executor=client)  # the client itself, not DaskExecutor(client)
    with pytest.raises(ParameterError, match="workers must be an integer >= 1, got 0"):
        local_cluster(0)
    assert {address.split("//")[1].split(":")[0] for address in client.nthreads()} == {"127.0.0.1"}
    assert set(client.nthreads().values()) == {1}  # single-threaded workers, as local_cluster makes them
    # the local executor runs one task over every shard, on the scan's own reader
    scan = Scan.open(dataset, "SAGE", proxy, 0, "cpu")
    first, reads = LocalExecutor().map_reduce(
        scan, sage_pass1, SagePass1.merge, ell=8, class_balanced=False, device="cpu"
    )
    assert first.counts.tolist() == [600] and reads == {
        "bytes": scan.reader.stats.bytes,
        "requests": scan.reader.stats.requests,
    }


def test_a_server_runs_its_scans_on_the_cluster(client, aligned):
    from nearstore.serving import NearStoreServer

    dataset, _ = aligned
    options = {"window": 16, "mute_suspects": False}  # windows that agree (`aligned`)
    server = NearStoreServer(dataset, keep=0.25, method="graft", options=options, executor=DaskExecutor(client), port=0)
    try:
        assert server.current.params["executor"] == "dask"
        here = Graft(**options).select(dataset, 0.25)
        np.testing.assert_array_equal(np.sort(server.current.ids), np.sort(here.ids))
    finally:
        server.shutdown()


def test_a_loaders_rounds_run_on_the_cluster_its_source_names(client, aligned):
    dataset, y = aligned
    executor = DaskExecutor(client)
    loader = StreamingLoader(StoreSource(dataset, executor=executor), backend="torch", device="cpu", batch_size=64)
    assert sum(len(batch) for batch, _ in loader) == dataset.num_samples
    with distributed.get_task_stream(client) as stream:
        chosen = loader.reselect(0.25, seed=3)  # the default round: GRAFT on a pool
    assert chosen.params["executor"] == "dask" and chosen.round == 1
    assert {task["key"] for task in stream.data} >= set(executor.placed) and len(executor.placed) >= 2
    # every class keeps its budget, as the round in process does
    here = StreamingLoader(dataset, backend="torch", device="cpu").reselect(0.25, seed=3)
    np.testing.assert_array_equal(np.bincount(y[chosen.ids], minlength=3), np.bincount(y[here.ids], minlength=3))


def test_partitions_run_on_the_worker_beside_their_shards(client, aligned):
    dataset, _ = aligned
    first, second = sorted(client.nthreads())
    # interleaved ownership: a partition is a run of one worker's consecutive shards
    shards_of = {
        first: [s for s in range(dataset.num_shards) if s % 5 < 3],
        second: [s for s in range(dataset.num_shards) if s % 5 >= 3],
    }
    executor = DaskExecutor(client, shards_of=shards_of)
    selector = Graft(window=16, mute_suspects=False)
    with distributed.get_task_stream(client) as stream:
        there = selector.select(dataset, 0.25, seed=5, executor=executor)
    ran = {task["key"]: task["worker"] for task in stream.data}
    assert len(executor.placed) >= 10 and set(executor.placed) <= set(ran)
    for key, shards in executor.placed.items():
        assert set(shards) <= set(shards_of[ran[key]]), (key, shards, ran[key])  # read only what it holds
    np.testing.assert_array_equal(np.sort(there.ids), np.sort(selector.select(dataset, 0.25, seed=5).ids))
    assert executor.result_bytes >= there.ids.nbytes  # every kept id came back from a worker
    # the map and the workers' threads cut the partitions: a count would not make them again
    assert there.params["executor"] == "dask" and "partitions" not in there.params


@pytest.mark.parametrize(
    "shards_of, message",
    [
        ({"tcp://10.0.0.9:1": range(25)}, "shards_of names worker 'tcp://10.0.0.9:1', which is not in the cluster"),
        ("twice", "shards_of gives shard 3 to .* and .*"),
        ("missing", "shards_of gives shard 24 to no worker"),
    ],
)
def test_a_shard_map_that_does_not_cover_the_shards_once_is_refused(client, aligned, shards_of, message):
    dataset, _ = aligned
    first, second = sorted(client.nthreads())
    if isinstance(shards_of, str):
        shards_of = {
            "twice": {first: range(0, 13), second: range(3, 25)},
            "missing": {first: range(0, 12), second: range(12, 24)},
        }[shards_of]
    with pytest.raises(ParameterError, match=message):
        Graft().select(dataset, 0.25, executor=DaskExecutor(client, shards_of=shards_of))


def test_a_round_on_a_pool_runs_on_the_cluster_with_its_budgets_exact(client, blobs):
    from nearstore.selection.plan import class_pools

    dataset, _, y, proxy = blobs
    previous = np.arange(0, 600, 7)
    selector = Graft(pool=2.0, window=16)
    there = selector.select(dataset, 0.2, proxy=proxy, seed=2, previous=previous, executor=DaskExecutor(client))
    here = selector.select(dataset, 0.2, proxy=proxy, seed=2, previous=previous)
    assert there.params["executor"] == "dask"
    np.testing.assert_array_equal(np.bincount(y[there.ids], minlength=3), np.bincount(y[here.ids], minlength=3))
    _, pools = class_pools(y, 0.2, 2.0, 2, power=selector.budget_power)  # previous: not pooled by default
    assert set(there.ids) <= set(np.concatenate(list(pools.values())))  # only pooled samples, as in process
    assert len(np.intersect1d(there.ids, here.ids)) >= 0.6 * len(here.ids)
    assert there.io["bytes"] >= here.io["bytes"] > 0  # the workers' reads counted (each reads its indexes)


def test_a_pass_nobody_waits_for_cancels_its_tasks_not_done(client, blobs):
    dataset, _, _, proxy = blobs
    first_done, release = distributed.Event("stall-first"), distributed.Event("stall")
    # nobody waits once the first partition's task is done: the other one stalls until released
    scan = Scan(SelectiveReader(dataset, ["x", "y"]), proxy, "x", "y", {}, cancelled=first_done.is_set)
    executor = DaskExecutor(client)
    try:
        with pytest.raises(RoundCancelled, match="stopped before stall_after_first's tasks over .* were done"):
            executor.map_reduce(scan, stall_after_first, operator.add, name="stall")
        stalled = {key for key, shards in executor.placed.items() if shards[0] != 0}
        deadline = time.monotonic() + 10  # the scheduler forgets a cancelled task as its worker hears of it
        while (held := client.run_on_scheduler(lambda dask_scheduler: set(dask_scheduler.tasks))) & stalled:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert stalled and not stalled & held  # cancelled from the driver: the scheduler forgot them
    finally:
        release.set()  # the stalled task, cancelled, still held its worker's thread


def test_results_merge_in_one_tree_as_they_come_whatever_their_order():
    # every partition's result was held until the last came: SAGE's sketch sets, one a worker thread
    from nearstore.selection.executors import _MergeTree

    def reference(parts: list) -> tuple:
        while len(parts) > 1:  # level by level, an odd last one carried up
            merged = [((a[0], b[0]), {"bytes": a[1]["bytes"] + b[1]["bytes"]}) for a, b in zip(parts[::2], parts[1::2])]
            parts = merged + ([parts[-1]] if len(parts) % 2 else [])
        return parts[0]

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 8, 13):
        parts = [(k, {"bytes": k}) for k in range(n)]
        for trial, order in enumerate([np.arange(n), *(rng.permutation(n) for _ in range(5))]):
            tree, most = _MergeTree(n, lambda a, b: (a, b)), 0
            for k in order:
                tree.add(int(k), parts[k])
                most = max(most, sum(len(level) for level in tree.held))
            assert tree.root == reference(parts)  # not commutative, not associative: the same tree
            assert most <= (len(tree.sizes) if trial == 0 else n - 1)  # in order: a result a level


def test_a_cluster_without_workers_and_tasks_cancelled_under_a_round_are_named(blobs, monkeypatch):
    # no workers: the round waited for ever, saying nothing; a scheduler lost mid-round cancels the
    # tasks, whose CancelledError reached the command line as a traceback
    dataset, _, _, proxy = blobs
    monkeypatch.setattr("nearstore.selection.executors.WORKERS_SECONDS", 0.5)
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as empty:
        with distributed.Client(empty) as client:
            with pytest.raises(ConnectionError, match=r"the Dask scheduler .* has no workers: none joined within 0 s"):
                Graft().select(dataset, 0.2, proxy=proxy, executor=DaskExecutor(client))
    cluster = local_cluster()
    with distributed.Client(cluster) as client:
        first_done, release = distributed.Event("lost-first"), distributed.Event("lost")
        scan = Scan(SelectiveReader(dataset, ["x", "y"]), proxy, "x", "y", {})
        executor = DaskExecutor(client)

        def lose() -> None:  # as the scheduler's loss does: every task not done cancelled under the driver
            first_done.wait(60)
            client.cancel([distributed.Future(key, client) for key, shards in executor.placed.items() if shards[0]])

        thread = threading.Thread(target=lose)
        thread.start()
        try:
            with pytest.raises(ConnectionError, match="the Dask scheduler .* was lost while stall_after_first ran"):
                executor.map_reduce(scan, stall_after_first, operator.add, name="lost")
        finally:
            release.set()
            thread.join()
    cluster.close()
