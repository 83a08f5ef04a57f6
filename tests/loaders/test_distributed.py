"""Rank shares under a real torch.distributed group: 2 gloo processes on 127.0.0.1, reading a
store, or one near-storage server together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from servers import free_port

from nearstore import random_select

RANK = """
import json, sys
import torch.distributed as dist
from loaders import StreamingLoader
from nearstore import Selection

source, selection, out = sys.argv[1:4]
dist.init_process_group("gloo")
selection = None if selection == "-" else Selection.load(selection)  # "-": the server's round
loader = StreamingLoader(source, selection, batch_size=32, uneven="drop", backend="torch", device="cpu")
result = {"rank": loader.order.rank, "world_size": loader.order.world_size, "epochs": []}
try:
    for epoch in range(2):
        loader.set_epoch(epoch)
        result["epochs"].append([int(i) for x, _ in loader for i in x[:, 0].round().long().tolist()])
except ValueError as e:
    result["error"] = str(e)
json.dump(result, open(out, "w"))
dist.destroy_process_group()
"""


def run_ranks(source: str, selections: list[str], tmp_path: Path) -> list[dict]:
    port = free_port()
    root = str(Path(__file__).parents[2])
    processes = []
    for rank, selection in enumerate(selections):
        env = {
            **os.environ,
            "PYTHONPATH": root,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(len(selections)),
        }
        out = tmp_path / f"rank{rank}.json"
        processes.append((subprocess.Popen([sys.executable, "-c", RANK, source, selection, str(out)], env=env), out))
    for process, _ in processes:
        assert process.wait(timeout=300) == 0
    return [json.loads(out.read_text()) for _, out in processes]


@pytest.mark.slow
def test_two_ranks_share_every_epoch_disjointly(id_store, tmp_path):
    selection = random_select(id_store, 0.3, seed=1)  # 750 samples: 375 a rank
    path = str(tmp_path / "sel.npz")
    selection.save(path)
    ranks = run_ranks(id_store.url, [path, path], tmp_path)
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]  # taken from torch.distributed
    for epoch in range(2):
        shares = [r["epochs"][epoch] for r in ranks]
        assert len(shares[0]) == len(shares[1]) == 375
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == selection.ids.tolist()
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # a new shuffle each epoch


@pytest.mark.slow
def test_two_ranks_share_one_servers_round_disjointly(id_store, tmp_path):
    from nearstore.serving import NearStoreServer

    server = NearStoreServer(id_store, name="ids", keep=0.3, method="random", port=0)
    threading.Thread(target=server.serve, daemon=True).start()
    try:
        ranks = run_ranks(server.url, ["-", "-"], tmp_path)
    finally:
        server.shutdown()
    for epoch in range(2):
        shares = [r["epochs"][epoch] for r in ranks]
        assert len(shares[0]) == len(shares[1]) == 375 and not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == server.current.ids.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("differ", ["ids", "weights"])
def test_ranks_holding_different_selections_refuse_to_start(id_store, tmp_path, differ):
    paths, first = [], random_select(id_store, 0.3, seed=1)
    # the same ids weighted otherwise: a weighted loss averaged over ranks of differently weighted data
    second = random_select(id_store, 0.3, seed=2) if differ == "ids" else replace(first, weights=first.weights * 2)
    for k, selection in enumerate((first, second)):
        paths.append(str(tmp_path / f"sel{k}.npz"))
        selection.save(paths[-1])
    ranks = run_ranks(id_store.url, paths, tmp_path)
    for r in ranks:
        assert r["epochs"] == [] and "has round 0 (750 samples, digest" in r["error"]
    assert np.all([f"rank {r['rank']} iterates selection round 0" in r["error"] for r in ranks])


SCENARIO = """
import datetime, json, sys
import torch.distributed as dist
from loaders import StreamingLoader
from nearstore import DatasetError, Selection

source, selection, out, scenario = sys.argv[1:5]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank, result = dist.get_rank(), {"epochs": []}
try:
    if scenario == "pending":  # rank 0 alone selects a round mid-epoch; both stop early (a step budget)
        loader = StreamingLoader(source, Selection.load(selection), batch_size=32, backend="torch", device="cpu")
        for step, _ in enumerate(loader):
            if step == 0 and rank == 0:
                loader.reselect(0.1, method="random", seed=5)
            if step == 1:
                break
        result["epochs"].append(len([_ for _ in loader]))
    elif scenario == "server":  # every rank reselects through one server, as the README's loop does
        loader = StreamingLoader(source, batch_size=32, uneven="drop", backend="torch", device="cpu")
        sum(1 for _ in loader)
        result["round"] = loader.reselect(0.1, method="random", seed=5).round
        result["epochs"].append([int(i) for x, _ in loader for i in x[:, 0].round().long().tolist()])
    elif rank < 2:  # "subgroup": ranks 0 and 1 load, as a group of their own; rank 2 does not
        loader = StreamingLoader(source, Selection.load(selection), batch_size=32, rank=rank, world_size=2)
        result["epochs"].append([int(i) for x, _ in loader for i in x[:, 0].round().long().tolist()])
    dist.barrier()
except DatasetError as e:
    result["error"] = str(e)
json.dump(result, open(out, "w"))
"""


def run_scenario(source: str, selection: str | None, scenario: str, world_size: int, tmp_path: Path) -> list[dict]:
    port, root, processes = free_port(), str(Path(__file__).parents[2]), []
    for rank in range(world_size):
        env = {**os.environ, "PYTHONPATH": root, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.update(RANK=str(rank), WORLD_SIZE=str(world_size))
        out = tmp_path / f"rank{rank}.json"
        command = [sys.executable, "-c", SCENARIO, source, selection or "-", str(out), scenario]
        processes.append((subprocess.Popen(command, env=env), out))
    for process, _ in processes:
        assert process.wait(timeout=300) == 0
    return [json.loads(out.read_text()) for _, out in processes]


@pytest.mark.slow
def test_ranks_are_compared_on_the_round_an_epoch_iterates_a_round_due_taken(id_store, tmp_path):
    path = str(tmp_path / "sel.npz")
    random_select(id_store, 0.3, seed=1).save(path)
    ranks = run_scenario(id_store.url, path, "pending", 2, tmp_path)
    # rank 0's next epoch iterates its new round 1, rank 1's round 0: refused, not read overlapping
    assert [r["epochs"] for r in ranks] == [[], []]
    assert "rank 0 iterates selection round 1 (250 samples" in ranks[0]["error"]
    assert "rank 1 iterates selection round 0 (750 samples" in ranks[1]["error"]


@pytest.mark.slow
def test_a_loader_of_some_ranks_does_not_wait_for_the_others(id_store, tmp_path):
    path = str(tmp_path / "sel.npz")
    selection = random_select(id_store, 0.3, seed=1)
    selection.save(path)
    ranks = run_scenario(id_store.url, path, "subgroup", 3, tmp_path)
    assert all("error" not in r for r in ranks) and ranks[2]["epochs"] == []
    shares = [r["epochs"][0] for r in ranks[:2]]
    assert sorted(shares[0] + shares[1]) == selection.ids.tolist()


@pytest.mark.slow
def test_ranks_reselecting_through_one_server_share_one_round(id_store, tmp_path):
    from nearstore.serving import NearStoreServer

    server = NearStoreServer(id_store, name="ids", keep=0.3, method="random", port=0)
    threading.Thread(target=server.serve, daemon=True).start()
    try:
        ranks = run_scenario(server.url, None, "server", 2, tmp_path)
        held = server.current
    finally:
        server.shutdown()
    assert all("error" not in r for r in ranks) and [r["round"] for r in ranks] == [1, 1] == [held.round] * 2
    shares = [r["epochs"][0] for r in ranks]  # the round ran once, and both ranks iterate it
    assert len(shares[0]) == len(shares[1]) == 125 and sorted(shares[0] + shares[1]) == held.ids.tolist()
