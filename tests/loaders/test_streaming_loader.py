from __future__ import annotations

import dataclasses
import re
import threading

import numpy as np
import pytest
import torch
from resume import assert_resumes_at_every_batch, batches, checkpointed

from loaders import StoreSource, StreamingLoader
from nearstore import (
    Coalescing,
    DatasetError,
    Graft,
    ModelProxy,
    ParameterError,
    SampleError,
    SampleIdError,
    Selection,
    open_dataset,
    random_select,
    sage_select,
    write_dataset,
)
from nearstore.selection import default_reselect

BACKENDS = ["dali", "torch"]


def sample_ids(x: torch.Tensor) -> list[int]:
    """The id-encoded store's x[i, 0] is i."""
    return x[:, 0].round().long().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("batch_size", "drop_last"), [(64, False), (64, True), (1, False), (1000, False)])
def test_an_epoch_yields_every_selected_sample_once(id_store, id_data, backend, batch_size, drop_last):
    selection = random_select(id_store, 0.3, seed=1)  # 750 samples
    loader = StreamingLoader(
        id_store, selection, batch_size=batch_size, drop_last=drop_last, backend=backend, device="cpu"
    )
    seen, sizes = [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (8,)
        ids = sample_ids(x)
        np.testing.assert_array_equal(y.numpy(), id_data["y"][ids])
        np.testing.assert_array_equal(x.numpy(), id_data["x"][ids])
        seen += ids
        sizes.append(len(ids))
    assert len(sizes) == len(loader)
    if drop_last:
        assert set(sizes) == {batch_size} and len(seen) == 750 // batch_size * batch_size
        assert len(set(seen)) == len(seen) and set(seen) <= set(selection.ids.tolist())
    else:
        assert sorted(seen) == selection.ids.tolist()
        assert sizes[:-1] == [batch_size] * (len(sizes) - 1) and sizes[-1] == 750 - batch_size * (len(sizes) - 1)


@pytest.mark.parametrize(("drop_last", "share"), [(False, {}), (True, {}), (False, {"rank": 1, "world_size": 3})])
def test_it_answers_what_code_written_for_a_dataloader_asks(id_store, drop_last, share):
    selection = random_select(id_store, 0.3, seed=1)  # 750 samples: 250 a rank of 3
    loader = StreamingLoader(id_store, selection, batch_size=64, drop_last=drop_last, backend="torch", **share)
    assert (loader.batch_size, loader.drop_last, loader.num_workers) == (64, drop_last, 0)
    assert loader.dataset is loader.source and loader.dataset.num_samples == len(loader.dataset) == 2500
    samples = 250 if share else 750
    assert len(loader) == (samples // 64 if drop_last else -(-samples // 64)) == len(list(loader))
    for name in ("dataset", "batch_size", "drop_last", "num_workers"):
        with pytest.raises(AttributeError):
            setattr(loader, name, 1)


def test_dali_and_torch_backends_give_the_same_batches(id_store):
    selection = random_select(id_store, 0.2, seed=2)
    dali = StreamingLoader(id_store, selection, batch_size=96, weights=True, backend="dali", seed=5, device="cpu")
    plain = StreamingLoader(id_store, selection, batch_size=96, weights=True, backend="torch", seed=5, device="cpu")
    assert dali.backend == "dali" and plain.backend == "torch"
    for epoch in (0, 3):
        dali.set_epoch(epoch)
        plain.set_epoch(epoch)
        pairs = list(zip(dali, plain, strict=True))
        assert len(pairs) == len(dali)
        for a, b in pairs:
            for ta, tb in zip(a, b, strict=True):
                assert torch.equal(ta, tb)


def test_epochs_are_seeded_shuffles(id_store):
    loader = StreamingLoader(id_store, batch_size=2500, backend="torch", seed=7, device="cpu")
    ((x0, _),) = list(loader)
    ((x1, _),) = list(loader)  # a full pass advances the epoch
    loader.set_epoch(0)
    ((again, _),) = list(loader)
    assert sample_ids(x0) != sample_ids(x1)
    assert sample_ids(x0) == sample_ids(again)
    assert sorted(sample_ids(x0)) == list(range(2500))
    ordered = StreamingLoader(id_store, batch_size=2500, shuffle=False, backend="torch", device="cpu")
    ((x, _),) = list(ordered)
    assert sample_ids(x) == list(range(2500))


def test_an_abandoned_epoch_does_not_disturb_the_next(id_store):
    loader = StreamingLoader(id_store, [1, 2, 3, 4, 5, 6, 7], batch_size=2, backend="dali", shuffle=False, device="cpu")
    first = next(iter(loader))
    assert sample_ids(first[0]) == [1, 2]
    loader.set_epoch(0)
    assert [sample_ids(x) for x, _ in loader] == [[1, 2], [3, 4], [5, 6], [7]]


def test_weights_come_from_the_selection(id_store):
    selection = Selection(
        dataset=id_store.identity(),
        ids=np.array([10, 20, 30]),
        weights=np.array([0.5, 2.0, 3.0]),
        scores=np.zeros(3),
        method="test",
    )
    loader = StreamingLoader(id_store, selection, batch_size=3, weights=True, backend="dali", device="cpu")
    ((x, y, w),) = list(loader)
    by_id = dict(zip(sample_ids(x), w.tolist()))
    assert by_id == {10: 0.5, 20: 2.0, 30: 3.0}


def test_dali_and_torch_transforms_apply_to_inputs(id_store, id_data):
    ids = [0, 5, 9]
    dali = StreamingLoader(
        id_store, ids, batch_size=3, shuffle=False, backend="dali", device="cpu", dali_transform=lambda x: x * 2 + 1
    )
    ((x, y),) = list(dali)
    np.testing.assert_allclose(x.numpy(), id_data["x"][ids] * 2 + 1)
    np.testing.assert_array_equal(y.numpy(), id_data["y"][ids])
    plain = StreamingLoader(
        id_store, ids, batch_size=3, shuffle=False, backend="torch", device="cpu", transform=lambda x: x.flip(1)
    )
    ((x, _),) = list(plain)
    np.testing.assert_array_equal(x.numpy(), id_data["x"][ids][:, ::-1])


@pytest.mark.parametrize("augment", [False, True])
def test_a_batch_whose_transform_raised_is_not_delivered(id_store, augment):
    def make(transform=lambda x: x) -> StreamingLoader:
        subset = {"augment": np.arange(2500)} if augment else {}
        return StreamingLoader(id_store, batch_size=100, backend="torch", transform=transform, **subset)

    calls = []

    def out_of_memory_at_the_third(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise MemoryError("out of memory (on purpose)")
        return x

    loader = make(out_of_memory_at_the_third)
    held = []
    with pytest.raises(MemoryError):
        for x, _ in loader:
            held.append(sample_ids(x))
    assert len(held) == 2 and loader.batches_done == 2
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert held + [sample_ids(x) for x, _ in resumed] == [sample_ids(x) for x, _ in make()]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_batch_size_past_the_epoch_gives_the_epoch_in_one_batch(id_store, backend):
    loader = StreamingLoader(id_store, [0, 5, 9], batch_size=2**31, shuffle=False, backend=backend, device="cpu")
    assert [sample_ids(x) for x, _ in loader] == [[0, 5, 9]] and len(loader) == 1


def test_io_stats_count_only_selected_samples_per_epoch(id_store, caplog):
    selection = random_select(id_store, 0.1, seed=0)
    selection = dataclasses.replace(selection, io={"bytes": 1000, "requests": 7})
    # Without the cache, reading only the selected samples' ranges: each epoch reads them again.
    source = StoreSource(id_store, reads=Coalescing(0))
    loader = StreamingLoader(source, selection, batch_size=50, backend="torch", device="cpu", cache=False)
    with caplog.at_level("INFO", logger="nearstore"):
        for _ in range(2):
            for _ in loader:
                pass
    stats = loader.io_stats()
    assert stats["samples_read"] == 2 * stats["selected_samples"] == 500
    assert stats["epochs_completed"] == 2 and [e["epoch"] for e in stats["per_epoch"]] == [0, 1]
    assert sum(e["bytes"] for e in stats["per_epoch"]) == stats["bytes_read"]
    assert sum(e["requests"] for e in stats["per_epoch"]) == stats["requests"]
    assert stats["per_epoch"][1]["bytes"] < stats["per_epoch"][0]["bytes"]  # shard indexes read once
    assert stats["full_epoch_bytes"] == id_store.stored_nbytes(["x", "y"])
    assert 0 < stats["per_epoch"][1]["bytes"] < 0.2 * stats["full_epoch_bytes"]
    assert (stats["scan_bytes"], stats["scan_requests"]) == (1000, 7)
    expected = 1 - (stats["bytes_read"] + 1000) / (2 * stats["full_epoch_bytes"])
    assert stats["io_saving"] == pytest.approx(expected)
    lines = [r.getMessage() for r in caplog.records if r.name == "nearstore"]
    assert len(lines) == 2 and lines[1].startswith("epoch 1: 250 samples")


def test_io_stats_cover_the_whole_run_across_a_resume(id_store):
    def loader():
        return StreamingLoader(id_store, batch_size=100, backend="torch", device="cpu", cache=False)

    first = loader()
    for _ in range(2):
        sum(1 for _ in first)
    before = first.io_stats()
    resumed = loader()
    resumed.load_state_dict(checkpointed(first.state_dict()))
    assert resumed.io_stats()["bytes_read"] == before["bytes_read"]
    for _ in range(2):
        sum(1 for _ in resumed)
    after = resumed.io_stats()
    assert after["epochs_completed"] == 4 and len(after["per_epoch"]) == 4
    assert after["per_epoch"][:2] == before["per_epoch"]
    assert after["bytes_read"] == before["bytes_read"] + sum(e["bytes"] for e in after["per_epoch"][2:])
    # full data, no cache: every epoch reads every sample, so nothing is saved over the run
    assert after["io_saving"] == pytest.approx(1 - after["bytes_read"] / (4 * after["full_epoch_bytes"]))
    assert after["io_saving"] < 0.05


def test_io_saving_is_a_ranks_reads_against_its_share_of_the_data(id_store):
    ranks = [
        StreamingLoader(id_store, batch_size=100, rank=r, world_size=4, backend="torch", device="cpu", cache=False)
        for r in range(4)
    ]
    for loader in ranks:
        sum(1 for _ in loader)
    stats = [loader.io_stats() for loader in ranks]
    full = stats[0]["full_epoch_bytes"]
    assert [s["per_epoch"][0]["full_bytes"] for s in stats] == [round(full * 625 / 2500)] * 4
    # all data read once among the four: no rank saved anything
    assert all(s["io_saving"] < 0.05 for s in stats)
    assert sum(s["bytes_read"] for s in stats) >= full


@pytest.mark.parametrize("selected", [False, True])
def test_ranks_of_small_samples_read_the_chunks_one_rank_would(tmp_path, selected):
    """4,096 samples of 64 bytes, 64 to a chunk: 4 ranks of the default shuffle read each chunk
    about once in all (each its own shards, the same every epoch: later epochs read nothing),
    where 4 ranks of a global shuffle read every chunk each (a chunk read for a sample keeps its
    mates in the cache, for this rank only) and their shares move every epoch."""
    rng = np.random.default_rng(0)
    data = {"x": rng.random((4096, 16), dtype=np.float32), "y": rng.integers(0, 4, 4096)}
    url = str(tmp_path / "small.zarr")
    write_dataset(url, [data], shard_samples=512, chunk_samples=64)
    selection = random_select(open_dataset(url), 0.5, seed=0) if selected else None

    def read(shuffle, world_size: int) -> int:
        ranks = [  # each rank opens the store, as a process of its own does
            StreamingLoader(
                url,
                selection,
                batch_size=64,
                shuffle=shuffle,
                rank=r,
                world_size=world_size,
                backend="torch",
                device="cpu",
            )
            for r in range(world_size)
        ]
        for loader in ranks:
            for _ in range(2):
                sum(1 for _ in loader)
        later = sum(loader.io_stats()["per_epoch"][1]["bytes"] for loader in ranks)
        return sum(loader.io_stats()["per_epoch"][0]["bytes"] for loader in ranks), later

    one, _ = read("shards", 1)
    first, later = read("shards", 4)
    assert first < 1.25 * one and later == 0  # each rank's cache holds its span: read once a round
    first, later = read("global", 4)
    assert first > 2.5 * one and later > 0.5 * one


def test_a_url_works_and_the_store_is_never_written(id_store, fingerprint):
    before = fingerprint(id_store.url)
    loader = StreamingLoader(id_store.url, batch_size=500, backend="dali", device="cpu")
    assert sum(len(y) for _, y in loader) == 2500
    assert fingerprint(id_store.url) == before


def test_unlabelled_datasets_yield_inputs_only(tmp_path):
    ds = write_dataset(str(tmp_path / "u.zarr"), [{"x": np.arange(10, dtype=np.float32)[:, None]}], label_array=None)
    for backend in BACKENDS:
        batches = list(StreamingLoader(ds, batch_size=4, shuffle=False, backend=backend, device="cpu"))
        assert [len(b) for b in batches] == [1, 1, 1]
        assert torch.cat([b[0] for b in batches]).flatten().tolist() == list(range(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_of_any_integer_type_reach_the_trainer_as_torchs_class_indices(tmp_path, backend):
    # Keras' CIFAR stores uint8 labels: as uint8 tensors, cross_entropy refused them
    labels = np.arange(10, dtype=np.uint8) % 3
    ds = write_dataset(str(tmp_path / "u8.zarr"), [{"x": np.eye(10, 3, dtype=np.float32), "y": labels}])
    (x, y), *_ = StreamingLoader(ds, batch_size=10, shuffle=False, backend=backend, device="cpu")
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    torch.nn.functional.cross_entropy(x, y)


def test_bad_arguments_are_named(id_store, tmp_path):
    with pytest.raises(IndexError, match="selected sample id 2500 out of range"):
        StreamingLoader(id_store, [0, 2500])
    with pytest.raises(SampleIdError, match="selected sample id 3 is named twice in '.*ids.zarr'"):
        StreamingLoader(id_store, [7, 3, 3])
    with pytest.raises(SampleIdError, match="selected sample ids in '.*ids.zarr' must be integers, got float64"):
        StreamingLoader(id_store, [3.0, 7.0])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        StreamingLoader(id_store, batch_size=0)
    with pytest.raises(ValueError, match="backend must be"):
        StreamingLoader(id_store, backend="jax")
    with pytest.raises(ValueError, match="dali_transform needs the DALI backend"):
        StreamingLoader(id_store, backend="torch", dali_transform=lambda x: x)
    with pytest.raises(ValueError, match="input_array 'z' is not a sample array"):
        StreamingLoader(id_store, input_array="z")
    with pytest.raises(FileNotFoundError, match="no zarr group"):
        StreamingLoader(str(tmp_path / "nowhere.zarr"))
    other = write_dataset(str(tmp_path / "o.zarr"), [{"x": np.zeros((5, 2), np.float32), "y": np.zeros(5, int)}])
    with pytest.raises(ValueError, match="selection was made for"):
        StreamingLoader(id_store, random_select(other, 0.5))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
        ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),  # a bool is no integer
        ({"shuffle": "no"}, "shuffle must be True, False or one of ('global', 'shards'), got 'no'"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"rank": 1.0, "world_size": 2}, "rank must be an integer >= 0, got 1.0"),
        # every process took rank 0's share
        ({"world_size": 2}, "world_size=2 needs rank= (torch.distributed is not initialized)"),
        ({"warm_start_epochs": "1"}, "warm_start_epochs must be an integer >= 0, got '1'"),
        ({"weights": "yes"}, "weights must be True or False, got 'yes'"),
        ({"prefetch": "2"}, "prefetch must be an integer >= 1, got '2'"),
        ({"num_threads": 2.0}, "num_threads must be an integer >= 1, got 2.0"),
        ({"images": "jpeg"}, "images must be an ImageTransform, got 'jpeg'"),
        ({"transform": 3}, "transform must be a function, got 3"),
        ({"dali_transform": "f"}, "dali_transform must be a function, got 'f'"),
        ({"device": 2.5}, "device must be a torch.device or its name ('cpu', 'cuda:0'), got 2.5"),
        ({"device": "cuda:64"}, "device 'cuda:64': this machine has"),  # not at the first batch
        ({"storage_options": [1]}, "storage_options must be a mapping, got [1]"),
        ({"source": 5}, "source must be a URL, a list of server URLs, a Dataset or a Source, got 5"),
    ],
)
def test_bad_arguments_are_refused_by_name_before_anything_is_opened(tmp_path, arguments, message):
    # The store does not exist: an argument checked only after opening it would raise FileNotFoundError.
    arguments = {"source": str(tmp_path / "nowhere.zarr"), **arguments}
    with pytest.raises(ParameterError, match=re.escape(message)):
        StreamingLoader(**arguments)


def test_bad_arguments_to_a_loaders_methods_are_refused_by_name(id_store):
    loader = StreamingLoader(id_store, random_select(id_store, 0.2, seed=1), batch_size=100, backend="torch")
    for call, message in [
        (lambda: loader.set_epoch("2"), "epoch must be an integer >= 0, got '2'"),
        (lambda: loader.set_epoch(-1), "epoch must be an integer >= 0, got -1"),
        (lambda: loader.epoch_order(1.5), "epoch must be an integer >= 0, got 1.5"),
        (lambda: loader.reselect("a"), "keep must be in (0, 1], got 'a'"),
        (lambda: loader.reselect(0.1, method="random", seed=0.5), "seed must be an integer >= 0, got 0.5"),
        (lambda: loader.update_proxy("model"), "update_proxy takes the trainer's torch.nn.Module, got 'model'"),
    ]:
        with pytest.raises(ParameterError, match=re.escape(message)):
            call()
    assert loader.round == 0 and loader.epoch == 0


def test_plain_ids_come_in_any_order_and_are_visited_in_the_epochs(id_store):
    loader = StreamingLoader(id_store, [30, 2, 17], batch_size=2, shuffle=False, backend="torch", device="cpu")
    assert loader.ids.tolist() == [2, 17, 30]
    assert [i for x, _ in loader for i in sample_ids(x)] == [2, 17, 30]


def _plain(state: dict) -> dict:
    """A state with its arrays as lists, to compare with ==."""
    return {
        k: _plain(v) if isinstance(v, dict) else v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v
        for k, v in state.items()
    }


def test_a_refused_state_changes_nothing(id_store):
    def make() -> StreamingLoader:
        return StreamingLoader(id_store, random_select(id_store, 0.2, seed=1), batch_size=100, backend="torch")

    reference = iter(make())
    expected = [sample_ids(x) for x, _ in reference]
    loader = make()
    batches = iter(loader)
    assert [sample_ids(next(batches)[0]) for _ in range(2)] == expected[:2]
    before = _plain(loader.state_dict())

    # A good state of another round, further on: what a half-taken one would leave behind shows.
    other = make()
    other.reselect(0.1, method="random", seed=5)
    other.set_epoch(3)
    good = other.state_dict()
    chosen, order = good["selection"], good["order"]
    ids = chosen["ids"].numpy()
    without = {k: v for k, v in chosen.items() if k != "scan_io"}
    bad_states = [
        ([good], DatasetError, "state_dict must be a mapping (what state_dict() returns), got list"),
        ({**good, "dataset": [1]}, DatasetError, "state_dict['dataset'] must be a Mapping, got [1]"),
        ({k: v for k, v in good.items() if k != "order"}, DatasetError, "state_dict has no 'order'"),
        ({**good, "order": "x"}, DatasetError, "state_dict['order'] must be a Mapping, got 'x'"),
        ({**good, "selection": without}, DatasetError, "state_dict's selection has no 'scan_io'"),
        ({**good, "selection": {**chosen, "weights": None}}, DatasetError, "state_dict's selection has no 'weights'"),
        ({**good, "selection": {**chosen, "round": "1"}}, DatasetError, "['round'] must be an integer >= 0, got '1'"),
        ({**good, "selection": {**chosen, "scan_io": {"bytes": 1}}}, DatasetError, "scan_io has no 'requests'"),
        (
            {**good, "order": {k: v for k, v in order.items() if k != "epochs_completed"}},
            DatasetError,
            "state_dict's order has no 'epochs_completed'",
        ),
        ({**good, "order": {**order, "epoch": "3"}}, DatasetError, "order['epoch'] must be an integer >= 0, got '3'"),
        (
            {**good, "selection": {**chosen, "ids": np.r_[ids[:1], ids[:1], ids[:1], ids[3:]]}},
            SampleIdError,
            f"selected sample id {ids[0]} is named twice in state_dict's selection",
        ),
        (
            {**good, "selection": {**chosen, "ids": ids[::-1].copy()}},
            SampleIdError,
            f"selected sample ids in state_dict's selection must be sorted, got {ids[-1]} before {ids[-2]}",
        ),
        (
            {**good, "selection": {**chosen, "ids": np.r_[ids[:-1], 2500]}},
            SampleIdError,
            "selected sample id 2500 out of range [0, 2500) in state_dict's selection",
        ),
        (
            {**good, "selection": {**chosen, "ids": ids.astype(np.float64)}},
            SampleIdError,
            "selected sample ids in state_dict's selection must be integers, got float64",
        ),
        (
            {**good, "selection": {**chosen, "weights": chosen["weights"][1:]}},
            DatasetError,
            "selection weights in state_dict's selection must be 250 finite numbers",
        ),
        (
            {**good, "selection": {**chosen, "carry": {"x": np.array([{}], dtype=object)}}},
            DatasetError,
            "the carry of state_dict's selection holds 'x' of dtype object",
        ),
        ({**good, "io": {**good["io"], "bytes": -1}}, DatasetError, "io['bytes'] must be an integer >= 0, got -1"),
        ({**good, "io": {**good["io"], "per_epoch": [{}]}}, DatasetError, "io['per_epoch'][0] has no 'full_bytes'"),
    ]
    for state, error, message in bad_states:
        with pytest.raises(error, match=re.escape(message)):
            loader.load_state_dict(state)
        assert _plain(loader.state_dict()) == before, message
    assert [sample_ids(x) for x, _ in batches] == expected[2:]  # the epoch goes on where it was


def test_a_training_loop_runs_from_the_loader(id_store):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = StreamingLoader(open_dataset(id_store.url), batch_size=128, backend="dali", device="cpu")
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x / 2500), y)
            loss.backward()
            optimizer.step()
    assert torch.isfinite(loss)
    assert loader.io_stats()["epochs_completed"] == 2


@pytest.mark.parametrize(("uneven", "share"), [("pad", 188), ("drop", 187)])
def test_ranks_share_each_epoch(id_store, uneven, share):
    selection = random_select(id_store, 0.3, seed=1)  # 750 samples over 4 ranks
    loaders = [
        StreamingLoader(
            id_store, selection, batch_size=50, rank=r, world_size=4, uneven=uneven, backend="torch", device="cpu"
        )
        for r in range(4)
    ]
    for epoch in (0, 1):
        shares = []
        for loader in loaders:
            loader.set_epoch(epoch)
            shares.append([i for x, _ in loader for i in sample_ids(x)])
        assert [len(s) for s in shares] == [share] * 4
        union = [i for s in shares for i in s]
        assert set(union) <= set(selection.ids.tolist())
        if uneven == "drop":
            assert len(set(union)) == len(union) == 748
        else:  # every sample at least once, two of them twice
            assert set(union) == set(selection.ids.tolist()) and len(union) == 752
    assert shares != [list(loader.ids[loader.epoch_order(0)]) for loader in loaders]
    with pytest.raises(ValueError, match="rank must be in"):
        StreamingLoader(id_store, rank=2, world_size=2)


def test_reselect_in_process_with_the_trainers_model(id_store):
    loader = StreamingLoader(id_store, random_select(id_store, 0.2, seed=1), batch_size=100, backend="torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    weights = [p.detach().clone() for p in model.parameters()]
    loader.update_proxy(model)
    assert model.training and all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))

    selection = loader.reselect(0.1, method="sage", seed=3)
    assert selection.round == loader.round == 1 and selection.params["proxy"] == "ModelProxy"
    np.testing.assert_array_equal(selection.ids, sage_select(id_store, 0.1, seed=3, proxy=ModelProxy(model)).ids)
    assert sorted(i for x, _ in loader for i in sample_ids(x)) == selection.ids.tolist()
    assert loader.io_stats()["scan_bytes"] == selection.io["bytes"] > 0  # the uniform round read nothing
    with pytest.raises(ValueError, match="method must be one of"):
        loader.reselect(method="oracle")
    default = loader.reselect(0.2, window=64)  # default_reselect: GRAFT on a pool, options overridable
    assert default.method == "graft" and default.params["pool"] == 2.0 and default.params["window"] == 64
    assert default.round == loader.round == 2 and default.params["proxy"] == "ModelProxy"
    # the round it replaced does not join its pool (wrong labels it picked would ride along), unless asked
    assert default.params["previous"] is None and not default.params["pool_previous"]
    assert default.suspects is not None  # the default judges labels
    carried = loader.reselect(0.2, pool=1, pool_previous=True)  # a pool of one budget: the current round
    np.testing.assert_array_equal(carried.ids, default.ids)
    # Above LARGE_BUDGET the default pool and windows change with the budget asked for.
    large = loader.reselect(0.5)
    method, options = default_reselect(0.5)
    assert options != default_reselect(0.2)[1] and large.method == method
    assert {name: large.params[name] for name in options} == options and large.params["window"] == 64


def test_a_misfit_model_is_refused_at_update_proxy_not_at_the_next_round(id_store):
    loader = StreamingLoader(id_store, batch_size=100, backend="torch", device="cpu")
    with pytest.raises(DatasetError, match=r"the proxy scores 3 classes, .*ids.zarr' has 5"):
        loader.update_proxy(torch.nn.Linear(8, 3))
    with pytest.raises(
        ParameterError, match=r"Linear cannot run on 'x'.s samples \(of shape \(8,\)\) of .*mat1 and mat2"
    ):
        loader.update_proxy(torch.nn.Linear(7, 5))
    with pytest.raises(
        ParameterError, match=r"Linear cannot run on .x..s samples \(of shape \(8,\)\) \(a batch of samples 0\.\.2499\)"
    ):
        Graft().select(id_store, 0.1, proxy=ModelProxy(torch.nn.Linear(7, 5)))  # handed to a selector: named too
    # the model's own refusals of the samples (not torch's RuntimeError), and a model deepcopy
    # refuses: each was a raw TypeError or ValueError out of update_proxy

    class Checks(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError(f"expected images, got {tuple(x.shape)}")

    with pytest.raises(ParameterError, match=r"Checks cannot run on 'x'.s samples .*ValueError: expected images"):
        loader.update_proxy(Checks(8, 5))
    holder = torch.nn.Linear(8, 5)
    holder.lock = threading.Lock()  # as a module holding its trainer holds one
    with pytest.raises(ParameterError, match=r"Linear cannot be copied to score beside training \(TypeError"):
        loader.update_proxy(holder)
    assert loader.reselect(0.1, seed=0).params["proxy"] != "ModelProxy"  # none was kept
    loader.update_proxy(torch.nn.Linear(8, 5))
    assert loader.reselect(0.1, seed=0).params["proxy"] == "ModelProxy"


def test_what_a_round_hands_on_reaches_the_next_and_survives_a_resume(id_store):
    """AdaCore's running curvature: handed from round to round by the loader, kept in its state."""

    def model(seed: int) -> torch.nn.Module:  # logits of a few units on id_store's x (up to 2,500)
        torch.manual_seed(seed)
        linear = torch.nn.Linear(8, 10)
        with torch.no_grad():
            linear.weight.mul_(1e-3)
        return linear

    def make() -> StreamingLoader:
        return StreamingLoader(id_store, batch_size=100, backend="torch", device="cpu")

    loader = make()
    loader.update_proxy(model(0))
    first = loader.reselect(0.2, method="adacore", window=128)
    assert str(first.carry["proxy"]) == "ModelProxy" and first.carry["curvature"].shape == (10, 9)
    state = loader.state_dict()
    np.testing.assert_array_equal(state["selection"]["carry"]["curvature"], first.carry["curvature"])
    resumed, forgetful = make(), make()
    resumed.load_state_dict(state)
    forgetful.load_state_dict({**state, "selection": {**state["selection"], "carry": {}}})  # a state of before

    rounds = []
    for each in (loader, resumed, forgetful):
        each.update_proxy(model(1))
        rounds.append(each.reselect(0.2, method="adacore", window=128, average=0.5))
    second, again, afresh = rounds
    np.testing.assert_array_equal(again.ids, second.ids)
    np.testing.assert_array_equal(again.carry["curvature"], second.carry["curvature"])
    expected = 0.5 * first.carry["curvature"] + 0.5 * afresh.carry["curvature"]
    np.testing.assert_allclose(second.carry["curvature"], expected, rtol=1e-5)
    assert not np.allclose(second.carry["curvature"], afresh.carry["curvature"], rtol=1e-2)


def test_round_0s_suspects_reach_the_trainers_rounds_and_survive_a_resume(tmp_path):
    """Round 0's suspects, handed on in its carry, are rechecked by the round the loader runs with
    the trainer's model (a young one, right about the classes, too unsure to judge a label alone)."""
    rng = np.random.default_rng(3)
    truth = np.arange(1200) % 4
    x = (rng.normal(size=(1200, 8)) + 4 * np.eye(4, 8)[truth]).astype(np.float32)
    flipped = rng.random(1200) < 0.2
    url = str(tmp_path / "noisy.zarr")
    write_dataset(url, [{"x": x, "y": np.where(flipped, (truth + rng.integers(1, 4, 1200)) % 4, truth)}])
    first = Graft().select(open_dataset(url), 0.2, seed=0)
    young = torch.nn.Linear(8, 4)
    with torch.no_grad():
        young.weight.copy_(0.05 * torch.eye(4, 8)), young.bias.zero_()

    def make() -> StreamingLoader:
        loader = StreamingLoader(url, first, batch_size=100, backend="torch", device="cpu")
        loader.update_proxy(young)
        return loader

    loader, resumed = make(), make()
    resumed.load_state_dict(loader.state_dict())
    later = [each.reselect(0.2, seed=1) for each in (loader, resumed)]
    assert later[0].params["suspects_confirmed"] > 20 and flipped[later[0].ids].mean() < 0.5 * flipped.mean()
    np.testing.assert_array_equal(later[1].ids, later[0].ids)
    np.testing.assert_array_equal(loader.state_dict()["selection"]["carry"]["suspects"], first.suspects.ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resuming_mid_epoch_delivers_exactly_the_batches_not_delivered(id_store, backend):
    selection = random_select(id_store, 0.3, seed=1)

    def make() -> StreamingLoader:
        return StreamingLoader(id_store, selection, batch_size=64, seed=3, backend=backend, device="cpu")

    reference = make()
    reference.set_epoch(2)
    expected = [sample_ids(x) for x, _ in reference] + [sample_ids(x) for x, _ in reference]  # epochs 2 and 3

    interrupted = make()
    interrupted.set_epoch(2)
    batches = iter(interrupted)
    got = [sample_ids(next(batches)[0]) for _ in range(5)]
    state = interrupted.state_dict()
    assert state["order"]["epoch"] == 2 and state["order"]["batches_done"] == 5

    resumed = make()
    resumed.load_state_dict(state)
    got += [sample_ids(x) for x, _ in resumed]
    assert resumed.epoch == 3
    got += [sample_ids(x) for x, _ in resumed]
    assert got == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [{}, {"drop_last": True}, {"rank": 1, "world_size": 3}, {"warm_start_epochs": 1, "weights": True}],
    ids=["plain", "drop_last", "rank-share", "warm-start"],
)
def test_every_batch_boundary_resumes(id_store, backend, options):
    selection = random_select(id_store, 0.1, seed=1)  # 250 samples, batches of 64

    def make() -> StreamingLoader:
        return StreamingLoader(id_store, selection, batch_size=64, seed=3, backend=backend, device="cpu", **options)

    assert assert_resumes_at_every_batch(make) >= 4


def test_a_reselected_round_resumes_at_every_batch(id_store):
    def make() -> StreamingLoader:
        loader = StreamingLoader(id_store, random_select(id_store, 0.2, seed=1), batch_size=50, backend="torch")
        loader.reselect(0.05, method="random", seed=5)  # the round a state carries
        return loader

    assert assert_resumes_at_every_batch(make) == 2 * 3 + 1


def test_resuming_keeps_the_reselected_round(id_store):
    loader = StreamingLoader(id_store, random_select(id_store, 0.2, seed=1), batch_size=50, backend="torch")
    loader.reselect(0.1, method="random", seed=5)
    batches = iter(loader)
    first = [i for _ in range(2) for i in sample_ids(next(batches)[0])]
    state = loader.state_dict()
    restarted = StreamingLoader(id_store, random_select(id_store, 0.2, seed=1), batch_size=50, backend="torch")
    restarted.load_state_dict(state)
    rest = [i for x, _ in restarted for i in sample_ids(x)]
    assert restarted.round == 1 and len(first + rest) == len(set(first + rest))
    assert sorted(first + rest) == loader.ids.tolist()


def test_a_round_selected_mid_epoch_starts_with_the_next_and_a_state_taken_meanwhile_resumes_both(id_store):
    def make() -> StreamingLoader:
        return StreamingLoader(id_store, random_select(id_store, 0.2, seed=1), batch_size=50, backend="torch")

    live = make()
    batches = iter(live)
    head = [sample_ids(next(batches)[0]) for _ in range(3)]
    new = live.reselect(0.1, method="random", seed=5)
    assert len(live) == 10 and live.round == 0  # the epoch being iterated keeps its round
    state = live.state_dict()
    rest = [sample_ids(x) for x, _ in batches]
    assert sorted(i for b in head + rest for i in b) == random_select(id_store, 0.2, seed=1).ids.tolist()
    assert live.round == 1 and len(live) == 5
    following = [sample_ids(x) for x, _ in live]
    assert sorted(i for b in following for i in b) == new.ids.tolist()
    resumed = make()
    resumed.load_state_dict(state)
    assert [sample_ids(x) for x, _ in resumed] == rest and resumed.round == 1
    assert [sample_ids(x) for x, _ in resumed] == following


def test_a_newer_iterator_replaces_the_older(id_store):
    loader = StreamingLoader(id_store, batch_size=100, backend="torch")
    first, second = iter(loader), iter(loader)
    next(first)
    next(second)
    with pytest.raises(RuntimeError, match="a newer iterator over this loader .* took its place in epoch 0"):
        next(first)
    assert loader.batches_done == 1 and len([next(second) for _ in range(24)]) == 24
    assert next(second, None) is None and loader.epoch == 1  # the newer one ends epoch 0
    older = iter(loader)
    assert len([next(older) for _ in range(24)]) == 24  # all of epoch 1 but its last batch
    newer = iter(loader)
    next(newer), next(newer)
    assert (loader.epoch, loader.batches_done) == (1, 2)  # the newer starts epoch 1 again
    with pytest.raises(RuntimeError, match="took its place in epoch 1"):
        next(older)
    # an iterator left at its epoch's last batch (a loop of len(loader) steps) delivered that
    # epoch: the next iteration starts the next epoch, not that one again
    assert len([next(newer) for _ in range(23)]) == 23 and (loader.epoch, loader.epochs_completed) == (1, 1)
    next(iter(loader))
    assert (loader.epoch, loader.epochs_completed, loader.batches_done) == (2, 2, 1)


@pytest.mark.parametrize("set_epoch", [False, True])
def test_a_loop_of_len_steps_ends_its_epoch(id_store, set_epoch):
    # zip(range(len(loader)), loader) takes every batch but never asks past the last: its epochs
    # were never counted (each pass repeated epoch 0's order) and a round asked ahead never came
    loader = StreamingLoader(id_store, batch_size=500, seed=1, backend="torch")
    firsts = []
    for epoch in range(3):
        if set_epoch:
            loader.set_epoch(epoch)
        if epoch == 1:
            loader.reselect_ahead(0.2, method="random", seed=2)
        firsts.append([sample_ids(x)[:3] for _, (x, _labels) in zip(range(len(loader)), loader)][0])
    next(iter(loader))
    assert loader.epochs_completed == 3 and len(loader.io_stats()["per_epoch"]) == 3
    assert firsts[0] != firsts[1] != firsts[2] and loader.round == 1


@pytest.mark.parametrize("between", ["reselect_ahead", "reselect", "state_dict"])
def test_a_loop_of_len_steps_is_an_epoch_as_a_for_loop_is(id_store, between):
    # after zip(range(len(loader)), loader), a round asked between epochs landed an epoch early
    # (len said the old round's batches), reselect reused the epoch's number (its shuffle), and a
    # state saved there resumed an epoch short
    def run(steps: bool) -> tuple[list, int]:
        loader, seen = StreamingLoader(id_store, batch_size=100, seed=1, backend="torch"), []
        for epoch in range(4):
            if epoch == 1 and between == "state_dict":
                loader.reselect_ahead(0.2, method="random", seed=2)
                state = checkpointed(loader.state_dict())
                loader = StreamingLoader(id_store, batch_size=100, seed=1, backend="torch")
                loader.load_state_dict(state)
            elif epoch == 1:
                getattr(loader, between)(0.2, method="random", seed=2)
            said = len(loader)
            got = [sample_ids(x) for _, (x, _y) in zip(range(said), loader)] if steps else batches(loader, epoch + 1)
            seen.append((said, list(got)))
        return seen, loader.state_dict()["order"]["epochs_completed"]  # the last epoch counted by then

    assert run(steps=True) == run(steps=False)


def test_a_round_selected_before_a_resumed_epoch_goes_on_is_the_next_epochs(id_store):
    def make() -> StreamingLoader:
        return StreamingLoader(id_store, batch_size=100, seed=1, backend="torch")

    whole = list(batches(make(), 1))
    stopped = make()
    delivered = iter(stopped)
    [next(delivered) for _ in range(4)]
    loader = make()
    loader.load_state_dict(stopped.state_dict())
    new = loader.reselect(0.2, method="random", seed=2)  # before the resumed epoch's first batch
    assert len(loader) == len(whole) - 4
    assert list(batches(loader, 1)) == whole[4:]  # that epoch finishes its own round (it lost 60% of it)
    assert sorted(i for ids in batches(loader, 2) for i in ids) == new.ids.tolist()


def test_len_counts_the_round_the_next_iteration_takes(id_store):
    # a round selected in an epoch left by a break: the next iteration takes it, and len said the old
    loader = StreamingLoader(id_store, batch_size=100, backend="torch")
    for k, _ in enumerate(loader):
        if k == 0:
            loader.reselect(0.04, method="random", seed=1)  # 100 samples: one batch
        if k == 5:
            break
    assert len(loader) == 1 == len(list(loader))


def test_a_round_selected_after_leaving_an_epoch_is_taken_at_once(id_store):
    loader = StreamingLoader(id_store, batch_size=100, backend="torch")
    for k, _ in enumerate(loader):
        if k == 3:
            break
    loader.reselect(0.2, method="random", seed=1)
    assert loader.round == 1 and len(loader) == 5


def test_a_state_after_a_break_holds_its_place_as_a_stateful_dataloaders_does(id_store):
    def make() -> StreamingLoader:
        return StreamingLoader(id_store, batch_size=100, backend="torch")

    loader, whole = make(), list(batches(make(), 1))
    for k, _ in enumerate(loader):
        if k == 3:
            break  # a step budget spent: the checkpoint after it resumes the rest of the epoch
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert list(batches(resumed, 1)) == whole[4:]
    assert list(batches(loader, 1)) == whole  # iterated again, live: the epoch afresh, as DataLoader's


def test_a_loaded_place_set_aside_by_set_epoch_is_not_saved(id_store):
    def make() -> StreamingLoader:
        return StreamingLoader(id_store, batch_size=100, backend="torch")

    stopped = make()
    delivered = iter(stopped)
    [next(delivered) for _ in range(3)]
    loader = make()
    loader.load_state_dict(stopped.state_dict())
    loader.set_epoch(1)  # another epoch than the state's: from its first batch
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert list(batches(resumed, 3)) == list(batches(loader, 3))


def test_a_state_over_other_shards_is_refused_where_the_order_follows_them(id_store, id_data, tmp_path):
    resharded = write_dataset(str(tmp_path / "resharded.zarr"), [id_data], shard_samples=100)
    loader = StreamingLoader(id_store, batch_size=64, backend="torch")  # shuffle="shards" by default
    next(iter(loader))
    with pytest.raises(ValueError, match="state_dict was taken over shards of 256 samples; .* has shards of 100"):
        StreamingLoader(resharded, batch_size=64, backend="torch").load_state_dict(loader.state_dict())
    globally = StreamingLoader(id_store, batch_size=64, shuffle="global", backend="torch")
    head = sample_ids(next(iter(globally))[0])
    again = StreamingLoader(resharded, batch_size=64, shuffle="global", backend="torch")
    again.load_state_dict(globally.state_dict())  # a global order is the same over any shards
    rest = [i for x, _ in again for i in sample_ids(x)]
    assert sorted(head + rest) == list(range(2500))


def test_a_state_dict_of_other_data_or_another_order_is_refused(id_store, tmp_path):
    state = StreamingLoader(id_store, batch_size=64, backend="torch").state_dict()
    with pytest.raises(ValueError, match="state_dict was taken with batch_size=64; this loader has 32"):
        StreamingLoader(id_store, batch_size=32, backend="torch").load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict was taken with seed=0"):
        StreamingLoader(id_store, batch_size=64, seed=1, backend="torch").load_state_dict(state)
    other = write_dataset(str(tmp_path / "other.zarr"), [{"x": np.zeros((10, 8), np.float32), "y": np.arange(10)}])
    with pytest.raises(ValueError, match="state_dict is from dataset .*ids.zarr"):
        StreamingLoader(other, batch_size=64, backend="torch").load_state_dict(state)
    with pytest.raises(ValueError, match=re.escape("state_dict version 99 is not one of (2, 3)")):
        StreamingLoader(id_store, batch_size=64, backend="torch").load_state_dict({**state, "version": 99})
    # 3 since a state records its order's spans, which a release reading 2 would ignore; a 2 loads
    assert state["version"] == 3 and "spans" in state["order"]
    older = {**state, "version": 2, "order": {k: v for k, v in state["order"].items() if k != "spans"}}
    StreamingLoader(id_store, batch_size=64, backend="torch").load_state_dict(older)


def test_a_state_no_loader_writes_is_refused_by_name(id_store, tmp_path):
    # a skip past its epoch delivered nothing and counted the epoch done; a round asked ahead
    # after more epochs than were completed waited for them
    loader = StreamingLoader(id_store, batch_size=64, backend="torch")
    loader.reselect_ahead(0.1, method="random", seed=1).result()
    state = loader.state_dict()
    fresh = StreamingLoader(id_store, batch_size=64, backend="torch")
    with pytest.raises(ValueError, match="state_dict's order skips 1000000000000 samples of an epoch of 2500"):
        fresh.load_state_dict({**state, "order": {**state["order"], "skipped": 10**12}})
    with pytest.raises(ValueError, match="round selected ahead was asked for after 99 epochs, of 0 completed"):
        fresh.load_state_dict({**state, "ahead": {**state["ahead"], "completed": 99}})
    fresh.load_state_dict(state)
    # a store written anew under the same path: the message says what differs
    url = str(tmp_path / "again.zarr")
    write_dataset(url, [{"x": np.zeros((10, 8), np.float32), "y": np.arange(10)}])
    taken = StreamingLoader(url, batch_size=4, backend="torch").state_dict()
    write_dataset(url, [{"x": np.zeros((12, 8), np.float32), "y": np.arange(12)}], overwrite=True)
    with pytest.raises(ValueError, match=r"'num_samples': 10.*\), not .*'num_samples': 12"):
        StreamingLoader(url, batch_size=4, backend="torch").load_state_dict(taken)


def test_a_state_of_the_same_order_under_another_spelling_resumes(id_store):
    # shuffle=True is "global", whose order no shuffle_block cuts: such states were refused
    def made(**options) -> StreamingLoader:
        return StreamingLoader(id_store, batch_size=64, backend="torch", **options)

    for taken, resumed in (
        ({"shuffle": True}, {"shuffle": "global"}),
        ({"shuffle": "global", "shuffle_block": 300}, {"shuffle": True}),
    ):
        loader = made(**taken)
        head = [i for _, (x, _labels) in zip(range(3), loader) for i in sample_ids(x)]
        again = made(**resumed)
        again.load_state_dict(loader.state_dict())
        assert sorted(head + [i for x, _ in again for i in sample_ids(x)]) == list(range(2500))
    with pytest.raises(ValueError, match="state_dict was taken with shuffle_block=300"):  # it cuts "shards"
        made(shuffle="shards").load_state_dict(made(shuffle="shards", shuffle_block=300).state_dict())


def test_warm_start_epochs_visit_every_sample_then_the_selection(id_store):
    selection = random_select(id_store, 0.1, seed=1)  # 250 of 2,500
    loader = StreamingLoader(
        id_store, selection, batch_size=100, warm_start_epochs=2, weights=True, backend="torch", device="cpu"
    )
    epochs = []
    for epoch in range(3):
        assert len(loader) == (25 if epoch < 2 else 3)
        batches = list(loader)
        epochs.append([i for x, _, _ in batches for i in sample_ids(x)])
        assert all(torch.all(w == 1) for _, _, w in batches)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(2500)) and epochs[0] != epochs[1]
    assert sorted(epochs[2]) == selection.ids.tolist()
    per_epoch = loader.io_stats()["per_epoch"]
    # the warm epochs read every sample once (then kept): the selection's epoch reads nothing
    assert [e["samples"] for e in per_epoch] == [2500, 0, 0]
    assert [e["cache_hits"] for e in per_epoch] == [0, 2500, 250]

    # resumed inside a warm epoch: the rest of that full epoch, then the selection
    interrupted = StreamingLoader(id_store, selection, batch_size=100, warm_start_epochs=2, backend="torch")
    interrupted.set_epoch(1)
    batches = iter(interrupted)
    got = [i for _ in range(4) for i in sample_ids(next(batches)[0])]
    resumed = StreamingLoader(id_store, selection, batch_size=100, warm_start_epochs=2, backend="torch")
    resumed.load_state_dict(interrupted.state_dict())
    got += [i for x, _ in resumed for i in sample_ids(x)]
    assert got == epochs[1] and resumed.epoch == 2 and len(resumed) == 3
    with pytest.raises(ValueError, match="taken with warm_start_epochs=2; this loader has 0"):
        StreamingLoader(id_store, selection, batch_size=100, backend="torch").load_state_dict(interrupted.state_dict())
    with pytest.raises(ValueError, match="warm_start_epochs must be an integer >= 0, got -1"):
        StreamingLoader(id_store, selection, warm_start_epochs=-1)


def test_a_round_selected_ahead_runs_while_the_next_epoch_trains_and_is_iterated_after_it(id_store, monkeypatch):
    start = random_select(id_store, 0.2, seed=1)
    loader = StreamingLoader(id_store, start, batch_size=50, backend="torch")
    expected = StreamingLoader(id_store, start, batch_size=50, backend="torch").reselect(0.1, method="random", seed=5)
    during = threading.Barrier(2, timeout=20)  # passed only by a round running while the epoch is read
    select = loader.source.select

    def select_during_the_epoch(**round):
        during.wait()
        return select(**round)

    monkeypatch.setattr(loader.source, "select", select_during_the_epoch)
    future = loader.reselect_ahead(0.1, method="random", seed=5)
    assert loader.round == 0 and len(loader) == 10  # the next epoch keeps the current selection
    loader.set_epoch(7)  # numbered as the trainer likes: the epoch after it iterates the round
    seen = []
    for k, (x, _) in enumerate(loader):
        if k == 1:
            during.wait()
        seen += sample_ids(x)
    assert sorted(seen) == start.ids.tolist()
    assert future.done() and loader.round == 1 and len(loader) == 5  # taken as the epoch ended
    np.testing.assert_array_equal(future.result().ids, expected.ids)
    loader.set_epoch(7)  # the same number again is another epoch all the same
    assert sorted(i for x, _ in loader for i in sample_ids(x)) == expected.ids.tolist()


def test_a_round_selected_ahead_is_kept_in_a_state_and_iterated_by_the_same_epoch_after_a_resume(id_store):
    def make() -> StreamingLoader:
        return StreamingLoader(id_store, random_select(id_store, 0.2, seed=1), batch_size=50, backend="torch")

    def epoch_ids(loader: StreamingLoader) -> list[list[int]]:
        return [sample_ids(x) for x, _ in loader]

    live = make()
    batches = iter(live)
    head = [sample_ids(next(batches)[0]) for _ in range(3)]
    future = live.reselect_ahead(0.1, method="random", seed=5)  # mid-epoch 0: iterated from epoch 1
    state = live.state_dict()  # waits for the round
    assert future.done() and state["ahead"]["completed"] == 0 and state["ahead"]["round"] == 1
    rest, following = [sample_ids(x) for x, _ in batches], epoch_ids(live)
    assert sorted(i for b in head + rest for i in b) == random_select(id_store, 0.2, seed=1).ids.tolist()
    assert sorted(i for b in following for i in b) == future.result().ids.tolist()
    resumed = make()
    resumed.load_state_dict(state)
    assert epoch_ids(resumed) == rest and epoch_ids(resumed) == following and resumed.round == 1

    between = make()  # between epochs: the next epoch (0) keeps the current selection, epoch 1 the new one
    future = between.reselect_ahead(0.1, method="random", seed=5)
    state = between.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    for each in (between, resumed):
        assert sorted(i for b in epoch_ids(each) for i in b) == random_select(id_store, 0.2, seed=1).ids.tolist()
        assert sorted(i for b in epoch_ids(each) for i in b) == future.result().ids.tolist()
    with pytest.raises(DatasetError, match="state_dict's round selected ahead"):
        make().load_state_dict({**state, "ahead": {**state["ahead"], "completed": -1}})


def test_a_round_selected_ahead_that_fails_is_raised_where_it_is_due_and_the_selection_stays(id_store):
    start = random_select(id_store, 0.2, seed=1)
    loader = StreamingLoader(id_store, start, batch_size=50, backend="torch")
    with pytest.raises(ParameterError, match="keep"):  # checked in the caller's thread
        loader.reselect_ahead(2.0)
    future = loader.reselect_ahead(0.1, method="oracle")
    with pytest.raises(ValueError, match="method must be one of"):
        for _ in loader:
            pass
    assert isinstance(future.exception(), ValueError) and loader.round == 0 and loader.epoch == 1
    assert sorted(i for x, _ in loader for i in sample_ids(x)) == start.ids.tolist()  # training goes on


def test_a_proxy_pushed_while_a_round_selected_ahead_runs_waits_for_it(id_store, monkeypatch):
    loader = StreamingLoader(id_store, random_select(id_store, 0.2, seed=1), batch_size=50, backend="torch")
    torch.manual_seed(0)
    first, second = (torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)) for _ in "12")
    loader.update_proxy(first)
    started, release = threading.Event(), threading.Event()
    select = loader.source.select

    def select_once_released(**round):
        started.set()
        release.wait(20)
        return select(**round)

    monkeypatch.setattr(loader.source, "select", select_once_released)
    future = loader.reselect_ahead(0.1, method="sage", seed=3)
    started.wait(20)
    threading.Timer(0.3, release.set).start()
    loader.update_proxy(second)
    assert future.done()
    np.testing.assert_array_equal(future.result().ids, sage_select(id_store, 0.1, seed=3, proxy=ModelProxy(first)).ids)


def test_a_loader_refuses_to_be_pickled_by_name(id_store):
    # spawn and torch.multiprocessing pickle their arguments: a weakref or a lock was named, not the loader
    import pickle

    loader = StreamingLoader(id_store, batch_size=8, backend="torch")
    with pytest.raises(TypeError, match="a StreamingLoader cannot be pickled .* make one in each process"):
        pickle.dumps(loader)


def test_a_round_asked_without_keep_keeps_what_the_last_round_was_asked_for(tmp_path):
    # the share of a round with classes at their one-sample floor is more than it asked for:
    # asked again, it grew the subset round after round (300, 450, 575, ... of 2,400)
    y = np.concatenate([np.zeros(2000, np.int64), np.repeat(np.arange(1, 201), 2)])
    x = np.arange(len(y), dtype=np.float32)[:, None].repeat(4, 1)
    store = write_dataset(str(tmp_path / "tail.zarr"), [{"x": x, "y": y}], shard_samples=256)
    loader = StreamingLoader(
        store, random_select(store, 0.05, seed=1, class_balanced=True), batch_size=64, backend="torch"
    )
    assert len(loader.ids) == 300  # 100 of the large class, and one of each small one
    sizes = [len(loader.reselect(method="random", seed=seed, class_balanced=True).ids) for seed in (2, 3)]
    sizes.append(len(loader.reselect_ahead(method="random", seed=4, class_balanced=True).result().ids))
    resumed = StreamingLoader(
        store, random_select(store, 0.05, seed=1, class_balanced=True), batch_size=64, backend="torch"
    )
    resumed.load_state_dict(loader.state_dict())
    sizes.append(len(resumed.reselect(method="random", seed=5, class_balanced=True).ids))
    assert sizes == [300] * 4
    with pytest.raises(ValueError, match=r"keeps\['1'\] must be a number in \(0, 1\], got 2"):
        resumed.load_state_dict({**loader.state_dict(), "keeps": {"1": 2}})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "bad"), [("u8", 2**63 + 1), ("i1", -3)])
def test_labels_that_are_no_class_id_are_refused_by_sample_not_wrapped(tmp_path, backend, dtype, bad):
    # a zarr-written store's uint64 label past 2**63 reached the trainer as -9223372036854775807
    import zarr

    url = str(tmp_path / "labels.zarr")
    group = zarr.create_group(url)
    group.create_array("x", shape=(64, 2), dtype="f4", chunks=(8, 2), shards=(32, 2))[:] = np.arange(128).reshape(64, 2)
    labels = (np.arange(64).reshape(64, 1) % 4).astype(dtype)
    labels[[5, 40]] = bad
    group.create_array("y", shape=(64, 1), dtype=dtype, chunks=(8, 1), shards=(32, 1))[:] = labels
    group.attrs["nearstore"] = {"format_version": 1, "num_samples": 64, "sample_arrays": ["x", "y"], "label_array": "y"}
    loader = StreamingLoader(url, batch_size=16, shuffle=False, backend=backend, device="cpu")
    with pytest.raises(
        SampleError, match=re.escape(f"holds labels that are no class id, an integer in [0, 2**63) (sample 5: {bad})")
    ):
        list(loader)
    skipping = StreamingLoader(url, batch_size=16, shuffle=False, backend=backend, device="cpu", on_error="skip")
    batches = list(skipping)
    assert [tuple(y.shape) for _, y in batches] == [(15,), (16,), (15,), (16,)]  # (n, 1) labels as (batch,)
    assert torch.cat([y for _, y in batches]).tolist() == [
        v for i, v in enumerate(labels[:, 0].tolist()) if i not in (5, 40)
    ]
    assert skipping.io_stats()["skipped_samples"] == [5, 40]


def test_samples_a_batch_cannot_carry_are_refused_by_array_when_the_loader_is_made(tmp_path):
    # a zarr-written store's complex64 samples failed DALI's feed with "stoi", its datetime64 ones
    # torch's conversion, naming no array
    import zarr

    url = str(tmp_path / "odd.zarr")
    group = zarr.create_group(url)
    group.create_array("c", shape=(64, 2), dtype="c8", chunks=(8, 2), shards=(32, 2))[:] = np.ones((64, 2))
    group.create_array("t", shape=(64,), dtype="datetime64[s]", chunks=(8,), shards=(32,))[:] = np.zeros(64, "M8[s]")
    group.attrs["nearstore"] = {"format_version": 1, "num_samples": 64, "sample_arrays": ["c", "t"]}
    assert StreamingLoader(url, input_array="c", batch_size=8, backend="torch").batch_roles == ("x",)
    with pytest.raises(ParameterError, match="array 'c' .* complex64 samples, which the dali backend cannot carry"):
        StreamingLoader(url, input_array="c", batch_size=8, backend="dali")
    with pytest.raises(ParameterError, match=r"array 't' .* holds datetime64\[s\] samples, which the torch backend"):
        StreamingLoader(url, input_array="t", batch_size=8, backend="torch")
