"""Several servers, one dataset: each serves its storage node's shards, one (the primary) runs the
rounds and the others follow it, and a trainer reads them all as one source (`ServerGroup`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import distributed
import numpy as np
import pytest
import torch
from conftest import SHARD_SAMPLES, id_encoded
from servers import free_port

from loaders import ServerGroup, StreamingLoader, open_source
from nearstore import DatasetError, ParameterError, RequestError, open_dataset, random_select, write_dataset
from nearstore.selection import Graft
from nearstore.selection.executors import DaskExecutor, local_cluster
from nearstore.serving import NearStoreServer

FIRST, SECOND = list(range(0, 5)), list(range(5, 10))  # the id store's 10 shards, on two nodes


def sample_ids(x: torch.Tensor) -> list[int]:
    return x[:, 0].round().long().tolist()  # an id store's sample i holds i in its first feature


@pytest.fixture
def servers():
    """Start servers with `start(dataset, **options)`; all are shut down after the test."""
    started = []

    def start(dataset, **options) -> NearStoreServer:
        started.append(NearStoreServer(dataset, **options))
        return started[-1]

    yield start
    for server in reversed(started):
        server.shutdown()


@pytest.fixture
def pair(servers, id_store_url):
    """A primary of shards 0-4 holding a random 30% (round 0) and its follower of shards 5-9."""
    dataset = open_dataset(id_store_url)
    primary = servers(dataset, selection=random_select(dataset, 0.3, seed=1), shards=FIRST)
    follower = servers(open_dataset(id_store_url), shards=SECOND, primary=primary.url)
    return primary, follower


def test_a_group_yields_the_batches_one_server_of_every_shard_yields(pair, servers, id_store):
    primary, follower = pair
    whole = servers(id_store, selection=primary.current)
    options = dict(batch_size=64, seed=3, backend="torch", device="cpu", cache=False)
    grouped, single = StreamingLoader([primary.url, follower.url], **options), StreamingLoader(whole.url, **options)
    assert isinstance(grouped.source, ServerGroup)
    # the whole dataset, as a DataLoader's dataset is; the epoch visits the primary's round of it
    assert len(grouped.dataset) == len(single.dataset) == id_store.num_samples > len(primary.current.ids)
    for epoch in range(2):
        grouped.set_epoch(epoch)
        single.set_epoch(epoch)
        for (x, y), (x1, y1) in zip(grouped, single, strict=True):
            assert torch.equal(x, x1) and torch.equal(y, y1)
    # each sample came from the server of its shard, once an epoch
    ids = primary.current.ids
    assert primary.shipped.samples == 2 * np.count_nonzero(ids < SECOND[0] * SHARD_SAMPLES)
    assert follower.shipped.samples == 2 * np.count_nonzero(ids >= SECOND[0] * SHARD_SAMPLES)
    assert grouped.io_stats()["samples_read"] == 2 * len(ids)


def test_reads_of_one_server_or_none_go_straight_to_it(pair):
    primary, follower = pair
    group = ServerGroup([primary.url, follower.url])
    ids = primary.current.ids
    mine = ids[ids >= SECOND[0] * SHARD_SAMPLES][:5]
    before = primary.shipped.samples
    out = group.read(mine, arrays=["x"], round=0)
    assert sample_ids(torch.from_numpy(out["x"])) == mine.tolist() and primary.shipped.samples == before
    empty = group.read(np.zeros(0, dtype=np.int64), arrays=["x", "y"], round=0)
    assert empty["x"].shape == (0, 8) and empty["y"].shape == (0,)
    group.close()


def test_a_new_round_runs_on_the_primary_and_every_server_serves_it(pair):
    primary, follower = pair
    loader = StreamingLoader([primary.url, follower.url], batch_size=50, backend="torch", device="cpu")
    chosen = loader.reselect(0.1, method="graft", seed=4)
    assert chosen.round == primary.current.round == 1
    seen = [i for x, _ in loader for i in sample_ids(x)]
    assert sorted(seen) == chosen.ids.tolist()
    assert np.any(chosen.ids >= SECOND[0] * SHARD_SAMPLES)  # the follower served its part of it
    np.testing.assert_array_equal(follower.current.ids, chosen.ids)  # taken from the primary, not run


def test_a_follower_takes_from_the_primary_an_older_round_a_trainer_still_reads(pair):
    # trainer A on round 1 while B's read of round 2 had the follower keep [0, 2]: A's epoch was refused
    primary, follower = pair
    options = dict(batch_size=50, backend="torch", device="cpu", cache=False)
    a = StreamingLoader([primary.url, follower.url], **options)
    b = StreamingLoader([primary.url, follower.url], **options)
    first, second = a.reselect(0.1, method="random", seed=4), b.reselect(0.2, method="random", seed=5)
    assert (first.round, second.round) == (1, 2)
    assert sorted(i for x, _ in b for i in sample_ids(x)) == second.ids.tolist()
    assert sorted(i for x, _ in a for i in sample_ids(x)) == first.ids.tolist()


def test_a_round_on_a_cluster_reads_each_nodes_shards_beside_them(servers, id_store_url):
    cluster = local_cluster()
    with cluster, distributed.Client(cluster) as client:
        first, second = sorted(client.nthreads())  # a worker per storage node, each beside its shards
        executor = DaskExecutor(client, shards_of={first: FIRST, second: SECOND})
        dataset = open_dataset(id_store_url)
        primary = servers(dataset, selection=random_select(dataset, 0.3, seed=1), shards=FIRST, executor=executor)
        follower = servers(open_dataset(id_store_url), shards=SECOND, primary=primary.url)
        loader = StreamingLoader([primary.url, follower.url], batch_size=50, backend="torch", device="cpu")
        with distributed.get_task_stream(client) as stream:
            chosen = loader.reselect(0.25, method="graft", seed=5)
        ran = {task["key"]: task["worker"] for task in stream.data}
        assert chosen.params["executor"] == "dask" and len(executor.placed) >= 2
        for key, shards in executor.placed.items():  # no task read a shard of the other node
            assert set(shards) <= set(FIRST if ran[key] == first else SECOND), (key, shards, ran[key])
        seen = [i for x, _ in loader for i in sample_ids(x)]
    assert sorted(seen) == chosen.ids.tolist()
    in_process = Graft().select(dataset, 0.25, seed=5)  # the same class budgets, summed over the nodes
    labels = dataset.labels[:]
    assert np.bincount(labels[chosen.ids]).tolist() == np.bincount(labels[in_process.ids]).tolist()


def test_a_follower_serves_its_shards_only_and_leaves_rounds_to_the_primary(pair):
    primary, follower = pair
    source = open_source(follower.url)
    with pytest.raises(RequestError, match=r"sample 3 lies in shard 0 of .*does not serve \(it serves shards 5-9\)"):
        source.read([1300, 3], arrays=["x"], round=0)
    goes = f"goes to the primary of {follower.name!r}, {primary.url}"
    with pytest.raises(RequestError, match=f"^select {goes}: it runs the rounds$"):
        source.select(keep=0.1, method="random", seed=0)
    with pytest.raises(RequestError, match=f"^a push of proxy weights {goes}"):
        source.update_proxy(torch.nn.Linear(8, 5))
    assert source.info()["primary"] == primary.url and source.info()["shards"] == SECOND
    source.close()


@pytest.fixture
def twin_url(tmp_path):
    """A store of the id store's shapes and dtypes holding other samples."""
    data = id_encoded()
    url = str(tmp_path / "twin.zarr")
    write_dataset(url, [{"x": data["x"] + 1, "y": data["y"]}], shard_samples=SHARD_SAMPLES, chunk_samples=1)
    return url


def test_groups_that_are_not_one_dataset_once_are_refused_by_name(servers, id_store_url, twin_url):
    dataset = open_dataset(id_store_url)
    every = random_select(dataset, 1.0)
    primary = servers(dataset, selection=every, shards=list(range(6)))
    overlapping = servers(open_dataset(id_store_url), shards=list(range(5, 10)), primary=primary.url)
    short = servers(open_dataset(id_store_url), shards=list(range(7, 10)), primary=primary.url)
    other_primary = servers(open_dataset(id_store_url), selection=every, shards=list(range(6, 10)))
    twin = open_dataset(twin_url)
    twin_server = servers(twin, selection=random_select(twin, 1.0), shards=list(range(6, 10)))
    cases = [
        ([primary.url, overlapping.url], ParameterError, f"shard 5 is served by both {primary.url} and"),
        ([primary.url, short.url], ParameterError, "no server of the group serves shards 6 of"),
        ([primary.url, other_primary.url], ParameterError, "one primary.*these run their own"),
        ([primary.url, twin_server.url], DatasetError, f"{twin_server.url} serves another dataset than"),
        ([primary.url], ParameterError, "two or more server URLs"),
    ]
    for urls, error, message in cases:
        with pytest.raises(error, match=message):
            ServerGroup(urls)
    with pytest.raises(DatasetError):  # a follower of another dataset's primary: refused at start
        NearStoreServer(twin, shards=list(range(6, 10)), primary=primary.url)


def test_servers_of_one_store_spelt_otherwise_are_one_group(servers, id_store_url):
    # its URL was part of the comparison: a trailing slash, or a follower's own copy, was "another dataset"
    dataset = open_dataset(id_store_url)
    primary = servers(dataset, selection=random_select(dataset, 1.0), shards=list(range(6)))
    spelt = open_dataset(f"file://{id_store_url}/")
    assert spelt.identity()["url"] != dataset.identity()["url"]
    follower = servers(spelt, shards=list(range(6, 10)), primary=primary.url)
    loader = StreamingLoader([primary.url, follower.url], batch_size=500, shuffle=False, backend="torch")
    assert [i for x, _ in loader for i in x[:, 0].round().long().tolist()] == list(range(2500))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"shards": [10]}, r"shards holds 10, not a shard id in \[0, 10\)"),
        ({"shards": [1, 1]}, "shards names a shard twice"),
        ({"shards": []}, "shards must be a non-empty sequence"),
        ({"primary": "grpc://127.0.0.1:1/ids", "state_dir": "x"}, "^state_dir given with primary"),
        ({"primary": "http://127.0.0.1:1/ids"}, "a server URL looks like grpc://"),
        # a local folder named "s3:" held the rounds, which never left the machine
        ({"state_dir": "s3://bucket/state"}, "state_dir must be a local directory, got the URL 's3://bucket/state'"),
    ],
)
def test_bad_server_options_are_refused_by_name(id_store, options, message):
    with pytest.raises(ParameterError, match=message):
        selection = None if "primary" in options else random_select(id_store, 0.1)
        NearStoreServer(id_store, selection=selection, **options)


def test_a_lost_server_is_named_and_the_epoch_stops(pair):
    primary, follower = pair
    loader = StreamingLoader(
        [primary.url, follower.url],
        batch_size=64,
        backend="torch",
        device="cpu",
        cache=False,
        storage_options={"on_disconnect": "raise"},
    )
    follower.shutdown()
    with pytest.raises(ConnectionError, match=f"{follower.url}, the server of shards 5-9 of this group, is lost"):
        list(loader)


def test_a_follower_whose_primary_is_lost_refuses_a_new_round_by_name(servers, id_store_url):
    dataset = open_dataset(id_store_url)
    primary = servers(dataset, selection=random_select(dataset, 0.3, seed=1), shards=FIRST)
    follower = servers(
        open_dataset(id_store_url), shards=SECOND, primary=primary.url, primary_options={"on_disconnect": "raise"}
    )
    mine = int(primary.current.ids[primary.current.ids >= SECOND[0] * SHARD_SAMPLES][0])
    primary.shutdown()
    source = open_source(follower.url)
    assert sample_ids(torch.from_numpy(source.read([mine], arrays=["x"], round=0)["x"])) == [mine]  # held: served
    with pytest.raises(RequestError, match=f"round 1 of .* is not held here, and its primary {primary.url} could not"):
        source.read([mine], arrays=["x"], round=1)
    source.close()
    # a follower started while its primary is down cannot take its round 0: named as the current round
    with pytest.raises(RequestError, match=f"the current selection round of .* its primary {primary.url} could"):
        servers(open_dataset(id_store_url), shards=SECOND, primary=primary.url)


def test_a_follower_runs_from_the_command_line(pair, id_store_url):
    primary, _ = pair
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1].parent)}
    command = ["serve", id_store_url, "--port", str(port), "--shards", "5:8,8,9", "--primary", primary.url]
    process = subprocess.Popen(
        [sys.executable, "-m", "nearstore.app.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        for line in process.stdout:
            if line.startswith("serving grpc://"):
                break
        else:
            raise AssertionError(f"nearstore serve exited with {process.wait()} before serving")
        follower_url = f"grpc://127.0.0.1:{port}/{primary.name}"
        loader = StreamingLoader([primary.url, follower_url], batch_size=64, backend="torch", device="cpu")
        assert sorted(i for x, _ in loader for i in sample_ids(x)) == primary.current.ids.tolist()
    finally:
        process.terminate()
        process.wait(30)
    bad = subprocess.run(
        [sys.executable, "-m", "nearstore.app.cli", "serve", id_store_url, "--shards", "5-9"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "'5-9' is neither a shard id nor a START:STOP run" in bad.stderr
    typo = subprocess.run(  # a run spelled out whole took all the memory before it was refused
        [sys.executable, "-m", "nearstore.app.cli", "serve", id_store_url, "--shards", "0:10000000000"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert typo.returncode == 2 and "'0:10000000000' names more than 16,777,216 shards" in typo.stderr


def test_a_groups_storage_figures_go_on_across_one_servers_restart(pair, servers, id_store_url):
    # the group summed its servers' counts: one restarted server's count from 0 made the sum lower
    # than at the epoch's start, which the loader took for the whole group restarting (the
    # primary's reads of every earlier epoch landed in that one)
    primary, follower = pair
    loader = StreamingLoader([primary.url, follower.url], batch_size=64, backend="torch", cache=False)
    list(loader)
    port = int(follower.url.rsplit(":", 1)[1].split("/")[0])
    batches = iter(loader)
    next(batches)
    read_before = primary.storage_reads.snapshot().bytes
    follower.shutdown()
    again = servers(open_dataset(id_store_url), shards=SECOND, primary=primary.url, port=port)
    list(batches)
    per_epoch = [epoch["storage"]["bytes"] for epoch in loader.io_stats()["per_epoch"]]
    epoch_1 = primary.storage_reads.snapshot().bytes - read_before + again.storage_reads.snapshot().bytes
    assert per_epoch[1] >= epoch_1 > 0  # what was read in it (and the follower's before its restart)
    assert per_epoch[1] < per_epoch[0] + epoch_1  # not epoch 0's reads counted again
    assert loader.io_stats()["storage_reads"]["bytes"] == sum(per_epoch)
