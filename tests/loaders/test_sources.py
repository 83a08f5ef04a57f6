"""One conformance suite for every `Source` a loader reads from (as zarr-python's StoreTests is for
its stores): a store on local files, on S3 (moto) and over HTTP (nginx), and a near-storage server
over Flight, and two servers each serving some of the shards (a group), all holding the same
id-encoded samples: fixed-size ones, encoded images and ragged token sequences."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, SHARD_SAMPLES, id_encoded
from PIL import Image

from loaders import FlightSource, ServerGroup, Source, StoreSource, StreamingLoader, open_source
from nearstore import SampleIdError, Selection, open_dataset, write_dataset
from nearstore.serving import NearStoreServer, protocol
from nearstore.serving.protocol import ALL_SAMPLES
from nearstore.storage.dataset import sample_identity
from nearstore.storage.images import ImageTransform

KINDS = ["local", "s3", "http", "flight", "group"]
SERVED = (FlightSource, ServerGroup)  # sources that hold rounds: a server reads only what its round holds


def tiny_model() -> torch.nn.Module:
    """The trainer's model for the id-encoded samples: 8 inputs, 5 classes."""
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, NUM_CLASSES))


def batches(data):
    return ({k: v[i : i + 700] for k, v in data.items()} for i in range(0, len(data["y"]), 700))


def id_image(i: int) -> bytes:
    """A PNG of one colour that encodes i, (R, G) = divmod(i, 256), of a size that varies with i."""
    image = Image.new("RGB", (4 + i % 5, 4 + i % 3), (i // 256, i % 256, 7))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def id_tokens(i: int) -> np.ndarray:
    """Ragged int32 tokens that encode i: i, (i % 6) times (so some are empty)."""
    return np.full(i % 6, i, dtype=np.int32)


@pytest.fixture(scope="module")
def data():
    """id_encoded's x and y, "image": sample i's id in an encoded image, "tokens": in ragged tokens."""
    images = np.empty(len(id_encoded()["y"]), dtype=object)
    images[:] = [id_image(i) for i in range(len(images))]
    tokens = np.empty(len(images), dtype=object)
    tokens[:] = [id_tokens(i) for i in range(len(images))]
    return {**id_encoded(), "image": images, "tokens": tokens}


@pytest.fixture(scope="module")
def urls(tmp_path_factory, s3, nginx, data):
    """The same samples written to local files, S3 and nginx's root: {kind: (url, storage_options)}."""
    local = str(tmp_path_factory.mktemp("sources") / "ids.zarr")
    write_dataset(local, batches(data), shard_samples=SHARD_SAMPLES)
    fsspec.filesystem("s3", **s3.storage_options).mkdir("sources")
    write_dataset(
        "s3://sources/ids.zarr", batches(data), shard_samples=SHARD_SAMPLES, storage_options=s3.storage_options
    )
    write_dataset(str(nginx.root / "sources-ids.zarr"), batches(data), shard_samples=SHARD_SAMPLES)
    return {
        "local": (local, None),
        "s3": ("s3://sources/ids.zarr", s3.storage_options),
        "http": (f"{nginx.url}/sources-ids.zarr", None),
    }


@pytest.fixture(scope="module")
def server(urls):
    """A near-storage server beside the local store, round 0 every sample, taking tiny_model weights."""
    dataset = open_dataset(urls["local"][0])
    every = Selection.of(dataset, np.arange(dataset.num_samples), method="all", params={}, io={})
    # no read cache: these tests read the same samples again and count what storage served each time
    near = NearStoreServer(dataset, selection=every, model=tiny_model, read_cache_bytes=0)
    yield near
    near.shutdown()


@pytest.fixture(scope="module")
def group(urls):
    """The local store's shards served by two servers: the primary (which runs the rounds, round 0
    every sample, taking tiny_model weights) serves shards 0-3 and 7-9, its follower 4-6."""
    dataset = open_dataset(urls["local"][0])
    every = Selection.of(dataset, np.arange(dataset.num_samples), method="all", params={}, io={})
    primary = NearStoreServer(
        dataset, selection=every, model=tiny_model, shards=[0, 1, 2, 3, 7, 8, 9], read_cache_bytes=0
    )
    follower = NearStoreServer(
        open_dataset(urls["local"][0]), shards=[4, 5, 6], primary=primary.url, read_cache_bytes=0
    )
    yield [primary.url, follower.url]
    follower.shutdown()
    primary.shutdown()


@pytest.fixture(params=KINDS)
def source(request, urls, server, group) -> Source:
    """Each kind of source, opened afresh (a source keeps what it has learnt of its store)."""
    if request.param == "flight":
        opened = open_source(server.url)
    elif request.param == "group":
        opened = open_source(group)
    else:
        url, options = urls[request.param]
        opened = open_source(url, storage_options=options)
    yield opened
    opened.close()


class TestSources:
    def test_kind_follows_the_url(self, source, request):
        kind = request.node.callspec.params["source"]
        assert isinstance(source, {"flight": FlightSource, "group": ServerGroup}.get(kind, StoreSource))

    def test_identity_names_the_samples(self, source, urls, data):
        local = open_dataset(urls["local"][0])
        assert sample_identity(source.identity) == sample_identity(local.identity())
        assert source.num_samples == len(data["y"]) and source.sample_arrays == ("x", "y", "image", "tokens")
        assert source.label_array == "y"
        assert len(source) == source.num_samples  # a torch Dataset's len: the whole dataset

    def test_reads_return_the_samples_asked_for_in_order(self, source, data):
        ids = np.array([2499, 3, 3, 1000, 256, 255, 0])  # unsorted, repeated, across shards
        out = source.read(ids, arrays=["x", "y", "image"], round=ALL_SAMPLES)
        np.testing.assert_array_equal(out["x"], data["x"][ids])
        np.testing.assert_array_equal(out["y"], data["y"][ids])
        assert out["image"].dtype == object and list(out["image"]) == list(data["image"][ids])
        only_x = source.read(ids[:2], arrays=["x"], round=ALL_SAMPLES)
        assert list(only_x) == ["x"]
        stats = source.stats.snapshot()
        assert stats.samples == len(ids) + 2 and stats.requests >= 2 and stats.bytes >= len(ids) * (8 * 4 + 8)

    def test_a_read_past_a_requests_limit_is_asked_in_parts(self, source, data, monkeypatch):
        monkeypatch.setattr(protocol, "MAX_REQUEST_SAMPLES", 100)  # the server's limit too: it runs here
        ids = np.random.default_rng(0).permutation(len(data["y"]))[:450]  # a cache's first read: a round
        before = source.stats.snapshot()
        out = source.read(ids, arrays=["x", "image"], round=ALL_SAMPLES)
        np.testing.assert_array_equal(out["x"], data["x"][ids])
        assert list(out["image"]) == list(data["image"][ids])
        if isinstance(source, (FlightSource, ServerGroup)):
            assert source.stats.snapshot().requests - before.requests >= 5

    def test_ids_out_of_range_are_refused_by_name(self, source):
        with pytest.raises(SampleIdError, match="sample id 2500 out of range"):
            source.read([0, 2500], arrays=["x"], round=ALL_SAMPLES)
        with pytest.raises(SampleIdError, match="sample id -1 out of range"):
            source.read([-1], arrays=["y"], round=ALL_SAMPLES)

    def test_stored_bytes_are_the_stores(self, source, urls):
        local = open_dataset(urls["local"][0])
        assert source.stored_bytes(["x"]) == local.stored_nbytes(["x"])
        assert source.stored_bytes(["x", "y"]) == local.stored_nbytes(["x", "y"])

    def test_storage_reads_count_what_the_storage_side_read(self, source):
        before = source.storage_reads()
        source.read(np.arange(40, 80), arrays=["x", "y"], round=ALL_SAMPLES)
        after = source.storage_reads()
        # every x is stored; a label equal to the fill value (0) is not (zarr writes no such chunk)
        assert after["samples"] - before["samples"] >= 40 and after["bytes"] - before["bytes"] >= 40 * 8 * 4

    def test_the_held_selection_is_of_this_dataset(self, source):
        held = source.selection()
        assert held is None or sample_identity(held.dataset) == sample_identity(source.identity)

    def test_a_new_round_is_scored_by_the_pushed_model(self, source, data):
        torch.manual_seed(0)
        source.update_proxy(tiny_model())
        held = source.selection()  # a store holds no rounds: the loader says which it iterates
        ids, round = (held.ids, held.round) if held is not None else (np.arange(source.num_samples), 4)
        chosen = source.select(ids, round, keep=0.1, method="crest", options={}, seed=3)
        assert chosen.round == round + 1 and chosen.params["proxy"] == "ModelProxy"
        assert sample_identity(chosen.dataset) == sample_identity(source.identity)
        assert np.bincount(data["y"][chosen.ids]).tolist() == [50] * NUM_CLASSES
        out = source.read(chosen.ids, arrays=["x"], round=chosen.round)  # a group: from both servers
        np.testing.assert_array_equal(out["x"], data["x"][chosen.ids])

    def test_a_round_without_labels_runs_on_every_source(self, source):
        # SAS needs no labels; through a server it runs there, scored by the pushed model
        torch.manual_seed(0)
        source.update_proxy(tiny_model())
        held = source.selection()
        ids, round = (held.ids, held.round) if held is not None else (np.arange(source.num_samples), 4)
        chosen = source.select(ids, round, keep=0.2, method="sas", options={"clusters": 5}, seed=3)
        assert chosen.method == "sas" and abs(len(chosen) - 500) <= 5 and len(np.unique(chosen.ids)) == len(chosen)
        out = source.read(chosen.ids, arrays=["x"], round=chosen.round)
        np.testing.assert_array_equal(out["x"][:, 0].round().astype(int), chosen.ids)

    def test_a_loader_yields_paired_arrays_row_for_row(self, source):
        ids = np.arange(0, 2500, 4) if not isinstance(source, SERVED) else None
        loader = StreamingLoader(source, ids, batch_size=64, paired_arrays=["tokens"], backend="torch", device="cpu")
        seen = []
        for x, tokens, y in loader:
            samples = x[:, 0].round().long()
            assert torch.equal(tokens.offsets().diff(), samples % 6)  # sample i: i, (i % 6) times
            assert torch.equal(y, samples % NUM_CLASSES)
            seen += samples.tolist()
        assert sorted(seen) == loader.ids.tolist()

    def test_a_loader_reads_every_selected_sample_once(self, source, data):
        ids = np.arange(0, 2500, 7) if not isinstance(source, SERVED) else None  # a server's: its round
        loader = StreamingLoader(source, ids, batch_size=64, backend="torch", device="cpu")
        seen = [int(i) for x, _ in loader for i in x[:, 0].round().long()]
        assert sorted(seen) == loader.ids.tolist()
        assert loader.io_stats()["full_epoch_bytes"] == source.stored_bytes(["x", "y"])

    def test_a_loader_yields_every_selected_ragged_sample_once_as_nested_tensors(self, source):
        ids = np.arange(0, 2500, 3) if not isinstance(source, SERVED) else None
        loader = StreamingLoader(source, ids, batch_size=64, input_array="tokens", device="cpu")
        seen, empty = [], 0
        for x, y in loader:
            assert x.is_nested and x.dtype == torch.int32 and len(x) == len(y)
            # sample i is i, i % 6 times: its length says i % 6 (an empty one only that it is empty)
            lengths = x.offsets().diff()
            padded = x.to_padded_tensor(-1)
            for length, row, label in zip(lengths.tolist(), padded, y.tolist()):
                assert torch.all(row[length:] == -1)
                if length:
                    assert torch.all(row[:length] == row[0])
                    assert int(row[0]) % 6 == length and int(row[0]) % NUM_CLASSES == label
            seen += [int(row[0]) for length, row in zip(lengths.tolist(), padded) if length]
            empty += int((lengths == 0).sum())
        assert sorted(seen) == [i for i in loader.ids.tolist() if i % 6]
        assert empty == sum(1 for i in loader.ids.tolist() if i % 6 == 0)

    @pytest.mark.parametrize("backend", ["torch", "dali"])
    def test_a_loader_decodes_every_selected_image_once(self, source, data, backend):
        ids = np.arange(0, 2500, 5) if not isinstance(source, SERVED) else None
        images = ImageTransform(size=4, train=False, mean=(0, 0, 0), std=(1, 1, 1))
        loader = StreamingLoader(source, ids, batch_size=64, input_array="image", images=images, backend=backend)
        seen = []
        for x, y in loader:
            assert x.shape[1:] == (3, 4, 4) and x.dtype == torch.float32
            decoded = (x[:, 0, 0, 0] * 256 + x[:, 1, 0, 0]).long()  # the id each image encodes
            assert torch.all(x[:, 2] == 7) and torch.equal(decoded % NUM_CLASSES, y)
            seen += decoded.tolist()
        assert sorted(seen) == loader.ids.tolist()
        assert loader.io_stats()["skipped_samples"] == []


@pytest.mark.parametrize("opened_by_loader", [True, False])
def test_close_closes_a_connection_the_loader_opened_not_one_handed_to_it(server, group, opened_by_loader):
    # a closed loader still referred to kept its gRPC connection: a socket and a native thread a
    # loader, and a connection on the server, 200 of them after 200 closed loaders
    for urls in (server.url, group):
        handed = None if opened_by_loader else open_source(urls)
        loader = StreamingLoader(handed or urls, batch_size=500, backend="torch")
        sum(1 for _ in loader)
        before = loader.io_stats()["storage_reads"]
        loader.close()
        assert loader.io_stats()["storage_reads"] == before  # what the server said last
        servers = loader.source.servers if isinstance(loader.source, ServerGroup) else [loader.source]
        if opened_by_loader:
            for source in servers:
                with pytest.raises(Exception, match="FlightClient is closed"):
                    source.storage_reads()
        else:  # the caller's to close
            assert all(source.storage_reads()["samples"] >= 0 for source in servers)
            handed.close()
