from __future__ import annotations

import shutil
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numcodecs
import numpy as np
import pytest
import zarr
import zstandard
from conftest import flip, shard_file
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, TransposeCodec, ZstdCodec
from zarr.dtype import VariableLengthBytes

from nearstore import Coalescing, SelectiveReader, open_dataset, write_dataset
from nearstore.errors import DatasetError, IntegrityError
from nearstore.storage.codecs import Zstd, vlen_items
from nearstore.storage.dataset import UncheckedStoreWarning, encoded_bytes
from nearstore.storage.reader import _pread_ranges, small_arrays

INDEX_BYTES = 256 * 16 + 4  # one (offset, nbytes) uint64 pair per inner chunk, and a crc32c
SAMPLE_BYTES = {"x": 8 * 4 + 4, "y": 8 + 4}  # both stored raw (too small to compress), and a crc32c


@pytest.mark.parametrize("seed", range(5))
def test_read_equals_zarr_fancy_indexing(id_store, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2500, size=rng.integers(1, 400))  # unsorted, with repeats
    out = SelectiveReader(id_store).read(ids)
    for name in ("x", "y"):
        np.testing.assert_array_equal(out[name], id_store.arrays[name].get_orthogonal_selection((ids,)))


def test_every_sample_and_no_sample(id_store, id_data):
    reader = SelectiveReader(id_store)
    out = reader.read(np.arange(2500)[::-1])
    np.testing.assert_array_equal(out["x"], id_data["x"][::-1])
    empty = reader.read([])
    assert empty["x"].shape == (0, 8) and empty["y"].shape == (0,)


def test_each_shard_index_is_read_once(id_store):
    reader = SelectiveReader(id_store, ["x"], reads=Coalescing(0))
    ids = np.array([3, 9, 300, 301, 2499])  # shards 0, 1, 9
    reader.read(ids)
    first = reader.stats.snapshot()
    # 3 index requests, and runs: {3}, {9}, {300, 301}, {2499}
    assert first.requests == 3 + 4
    assert first.bytes == 3 * INDEX_BYTES + len(ids) * SAMPLE_BYTES["x"]
    reader.read(ids)
    second = reader.stats.snapshot() - first
    assert second.requests == 4 and second.bytes == len(ids) * SAMPLE_BYTES["x"]


def test_readers_of_one_opened_dataset_share_its_shard_indexes(id_store):
    ids = np.array([3, 300])  # shards 0 and 1
    SelectiveReader(id_store, ["x"], reads=Coalescing(0)).read(ids)
    again = SelectiveReader(id_store, ["x"], reads=Coalescing(0))
    again.read(ids)
    assert again.stats.requests == 2 and again.stats.bytes == len(ids) * SAMPLE_BYTES["x"]  # no index
    reopened = SelectiveReader(open_dataset(id_store.url), ["x"], reads=Coalescing(0))
    reopened.read(ids)
    assert reopened.stats.requests == 2 + 2 and reopened.stats.bytes == 2 * INDEX_BYTES + 2 * SAMPLE_BYTES["x"]


def test_a_whole_shard_is_one_request_per_array(id_store, id_data):
    reader = SelectiveReader(id_store)
    out = reader.read_shard(2)
    np.testing.assert_array_equal(out["x"], id_data["x"][512:768])
    assert reader.stats.requests == 2
    assert reader.stats.bytes == 2 * INDEX_BYTES + 256 * (SAMPLE_BYTES["x"] + SAMPLE_BYTES["y"])
    last = reader.read_shard(9)  # the partial shard
    assert len(last["y"]) == 2500 - 9 * 256
    with pytest.raises(IndexError, match="shard 10 out of range"):
        reader.read_shard(10)


def test_holes_cheaper_than_a_request_are_read_through(id_store):
    ids = np.arange(0, 256, 2)  # every other sample of shard 0: holes of one sample each
    strict = SelectiveReader(id_store, ["x"], reads=Coalescing(0))
    strict.read(ids)
    assert strict.stats.requests == 1 + len(ids)
    hole = SAMPLE_BYTES["x"]
    loose = SelectiveReader(open_dataset(id_store.url), ["x"], reads=Coalescing(hole + 1))  # its own shard index
    loose.read(ids)
    assert loose.stats.requests == 1 + 1
    assert loose.stats.bytes == INDEX_BYTES + (len(ids) * 2 - 1) * SAMPLE_BYTES["x"]
    tight = SelectiveReader(open_dataset(id_store.url), ["x"], reads=Coalescing(hole))  # a hole costs as much
    tight.read(ids)
    assert tight.stats.requests == 1 + len(ids)


def test_bad_ids_are_named(id_store):
    reader = SelectiveReader(id_store)
    with pytest.raises(IndexError, match="sample id 2500 out of range"):
        reader.read([0, 2500])
    with pytest.raises(IndexError, match="sample id -1 out of range"):
        reader.read([-1])
    with pytest.raises(TypeError, match="1-D sequence of integers"):
        reader.read([0.5])
    with pytest.raises(ValueError, match="no sample arrays \\['z'\\]"):
        SelectiveReader(id_store, ["z"])


def test_reading_never_writes_the_store(id_store, fingerprint):
    before = fingerprint(id_store.url)
    reader = SelectiveReader(id_store)
    reader.read(np.arange(0, 2500, 7))
    for shard in range(reader.num_shards):
        reader.read_shard(shard)
    assert fingerprint(id_store.url) == before


def test_compressed_samples_and_samples_of_fill_values(tmp_path):
    # Samples of few distinct values are zstd-compressed; samples and shards of zeros (the fill
    # value) are stored all the same, so that a missing one is damage, never zeros.
    rng = np.random.default_rng(0)
    x = rng.integers(1, 4, size=(300, 64)).astype(np.float32)
    x[5] = 0
    x[100:200] = 0
    ds = write_dataset(str(tmp_path / "z.zarr"), [{"x": x, "y": np.arange(300) % 3}], shard_samples=100)
    assert [c.to_dict()["name"] for c in ds.arrays["x"].compressors] == ["zstd", "crc32c"]
    assert (tmp_path / "z.zarr" / "x" / "c" / "1" / "0").exists()
    reader = SelectiveReader(ds)
    ids = np.array([5, 4, 150, 299, 100, 0])
    np.testing.assert_array_equal(reader.read(ids)["x"], x[ids])
    np.testing.assert_array_equal(reader.read_shard(1)["x"], x[100:200])


def test_fsspec_urls_read_the_same(id_store, id_data):
    ds = open_dataset(f"file://{id_store.url}")
    ids = np.array([7, 1000, 2400])
    np.testing.assert_array_equal(SelectiveReader(ds).read(ids)["x"], id_data["x"][ids])


def test_unsharded_arrays_are_refused_with_their_name(tmp_path):
    url = str(tmp_path / "plain.zarr")
    group = zarr.open_group(url, mode="w")
    group.create_array("x", shape=(4, 2), chunks=(1, 2), dtype="f4")
    group.attrs["nearstore"] = {"format_version": 1, "num_samples": 4, "sample_arrays": ["x"], "label_array": None}
    with pytest.raises(DatasetError, match="array 'x' is not sharded: not a nearstore dataset's"):
        open_dataset(url)  # when opened: a loader failed on it with a TypeError before any reader


def test_kept_arrays_are_read_a_shard_whole_once_then_served_from_memory(id_store, id_data):
    assert small_arrays(id_store, ["x", "y"]) == ("y",)  # 8-byte labels; x's 32-byte samples are read by range
    reader = SelectiveReader(id_store, ["x", "y"], reads=Coalescing(0), keep=["y"])
    ids = np.array([3, 300, 2400])
    first = reader.read(ids)
    np.testing.assert_array_equal(first["y"], id_data["y"][ids])
    # the 3 y shards these samples are in, whole (a rank reading its own shards reads their labels
    # alone: every shard's were read at a first read); x: 3 indexes, 3 samples
    assert reader.stats.requests == 3 + 3 + 3
    before = reader.stats.snapshot()
    again = SelectiveReader(id_store, ["x", "y"], reads=Coalescing(0), keep=["y"])
    np.testing.assert_array_equal(again.read(ids[::-1])["y"], id_data["y"][ids[::-1]])
    assert again.stats.requests == 3 and reader.stats.snapshot() == before  # x only; y from memory
    more = SelectiveReader(id_store, ["y"], reads=Coalescing(0), keep=["y"])
    np.testing.assert_array_equal(more.read(np.array([1300, 2]))["y"], id_data["y"][[1300, 2]])
    assert more.stats.requests == 1  # shard 5's, not kept yet
    whole = more.whole("y")
    np.testing.assert_array_equal(whole, id_data["y"])
    assert more.stats.requests == 1 + id_store.num_shards - 4 and not whole.flags.writeable
    np.testing.assert_array_equal(SelectiveReader(id_store, ["y"], keep=["y"]).whole("y"), id_data["y"])


def test_a_kept_shard_is_read_once_while_reads_of_other_shards_go_on(id_store, id_data, monkeypatch):
    # one lock an array, held while a shard's labels were fetched: every other read waited for it,
    # one of labels kept long before too (a server's ranks, each starting its own span)
    reader = SelectiveReader(id_store, ["y"], keep=["y"])
    reader.read(np.array([0]))  # shard 0's labels kept
    read_kept, proceed, fetching, fetched = SelectiveReader._read_kept, threading.Event(), threading.Event(), []

    def held(self, name, kept, shards):  # shard 7's read, held until the other reads are done
        fetched.append(shards.tolist())
        fetching.set()
        fetched.append(proceed.wait(timeout=30))  # False: the reads below waited for this one
        read_kept(self, name, kept, shards)

    monkeypatch.setattr(SelectiveReader, "_read_kept", held)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(reader.read, np.array([2000]))
        fetching.wait(timeout=30)
        second = pool.submit(reader.read, np.array([2001, 5]))  # shard 7 being read: waits for it
        np.testing.assert_array_equal(reader.read(np.array([1, 2]))["y"], id_data["y"][[1, 2]])  # kept: at once
        proceed.set()
        np.testing.assert_array_equal(first.result()["y"], id_data["y"][[2000]])
        np.testing.assert_array_equal(second.result()["y"], id_data["y"][[2001, 5]])
    assert fetched == [[7], True]  # shard 7 read once, by the first to want it; nothing waited on it but its mate


def test_labels_read_ahead_a_few_shards_a_request_and_damage_keeps_the_rest_kept(id_store_url, id_data, tmp_path):
    # read a shard at a time, each shard's labels were a round trip of their own before its inputs'
    # (an epoch in order over object storage took 2-3x as long); a damaged shard of them turned
    # keeping off for every shard, for the reader's life
    url = shutil.copytree(id_store_url, tmp_path / "ids.zarr")
    reader = SelectiveReader(open_dataset(str(url)), ["x", "y"], reads=Coalescing(0), keep=["y"])
    reader.keep_ahead(np.arange(0, 1500))  # shards 0-5, in a thread
    deadline = time.monotonic() + 60
    while not reader._kept("y").read[:6].all() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reader._kept("y").read.tolist() == [True] * 6 + [False] * 4
    assert reader.stats.requests == 6  # a shard's labels a request, all asked at once
    np.testing.assert_array_equal(reader.read(np.array([3, 1400]))["y"], id_data["y"][[3, 1400]])
    flip(shard_file(str(url), "y", 8), 52 * 12 + 2)  # sample 2100's chunk (8 bytes and its crc32c a sample)
    with pytest.raises(IntegrityError, match="2100"):  # named by the read's own samples
        reader.read(np.array([2100, 5]))
    np.testing.assert_array_equal(reader.read(np.array([2101]))["y"], id_data["y"][[2101]])  # its shard mate
    before = reader.stats.requests
    np.testing.assert_array_equal(reader.read(np.array([7]))["y"], id_data["y"][[7]])
    assert reader.keep == ("y",) and reader.stats.requests == before + 1  # x's sample alone: y kept, x's index read


def zarr_written(url: str, values: np.ndarray, **options) -> zarr.Array:
    """Array `x` of `values`, written by zarr itself in shards of 64 samples with `options`, in a
    group whose attributes make it a nearstore store of format 1 (no manifest)."""
    group = zarr.open_group(url, mode="w")
    encoded = values.dtype == object
    with encoded_bytes():
        array = group.create_array(
            "x",
            shape=values.shape,
            dtype=VariableLengthBytes() if encoded else values.dtype,
            chunks=(1, *values.shape[1:]),
            shards=options.pop("shards", (64, *values.shape[1:])),
            fill_value=b"" if encoded else 0,
            **options,
        )
        array[:] = values
    group.attrs["nearstore"] = {"format_version": 1, "num_samples": len(values), "sample_arrays": ["x"]}
    return array


SAMPLES = np.random.default_rng(0).integers(0, 4, size=(200, 3, 5)).astype(">i4")  # compressible, big-endian
ENCODED = np.empty(200, dtype=object)
ENCODED[:] = [bytes([k % 7]) * (k % 50) for k in range(200)]  # of any length, empty ones too


@pytest.mark.parametrize(
    ("values", "options"),
    [
        (SAMPLES, {"compressors": [GzipCodec()]}),
        (SAMPLES, {"compressors": [BloscCodec(cname="lz4", shuffle="bitshuffle")]}),
        (SAMPLES, {"compressors": [ZstdCodec(checksum=True)]}),
        (SAMPLES, {"serializer": BytesCodec(endian="big"), "compressors": None}),
        (SAMPLES, {"shards": {"shape": (64, 3, 5), "index_location": "start"}, "compressors": None}),
        (SAMPLES, {"chunk_key_encoding": {"name": "v2", "separator": "."}}),
        (ENCODED, {"compressors": [GzipCodec()]}),
    ],
    ids=["gzip", "blosc", "zstd with its checksum", "big-endian", "index at the start", "v2 keys", "encoded, gzip"],
)
def test_stores_zarr_wrote_with_other_codecs_read_the_same(tmp_path, values, options):
    array = zarr_written(str(tmp_path / "z.zarr"), values, **options)
    with pytest.warns(UncheckedStoreWarning):
        dataset = open_dataset(str(tmp_path / "z.zarr"))
    ids = np.random.default_rng(1).integers(0, len(values), 150)
    out = SelectiveReader(dataset).read(ids)["x"]
    np.testing.assert_array_equal(out, values[ids])
    with encoded_bytes():
        np.testing.assert_array_equal(out, array.get_orthogonal_selection((ids,)))


def test_codecs_the_reader_does_not_decode_are_named(tmp_path):
    zarr_written(str(tmp_path / "t.zarr"), SAMPLES, filters=[TransposeCodec(order=(0, 2, 1))])
    with pytest.warns(UncheckedStoreWarning):
        dataset = open_dataset(str(tmp_path / "t.zarr"))
    with pytest.raises(DatasetError, match=r"array 'x' of .*t.zarr.*codecs \['transpose', 'bytes'"):
        SelectiveReader(dataset)


def test_on_local_disk_a_selection_of_large_samples_reads_no_hole(tmp_path):
    # 30 kB samples, every other one selected: holes of 30 kB, cheaper than a request to object
    # storage (64 KiB, read through there) but not than a local read (a page)
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, 30_000, dtype=np.uint8).tobytes() for _ in range(64)]
    samples = np.empty(64, dtype=object)
    samples[:] = blobs
    dataset = write_dataset(str(tmp_path / "large.zarr"), [{"x": samples}], label_array=None, shard_samples=64)
    ids = np.arange(0, 64, 2)
    reader = SelectiveReader(dataset)
    reader.read(ids[:1])  # the shard index
    before = reader.stats.snapshot()
    assert list(reader.read(ids)["x"]) == [blobs[i] for i in ids]
    read = reader.stats.snapshot() - before
    assert read.bytes == sum(len(blobs[i]) + 8 + 4 for i in ids)  # each sample, its length and crc32c
    bridged = SelectiveReader(open_dataset(dataset.url), reads=Coalescing(1 << 16))
    bridged.read(ids[:1])
    before = bridged.stats.snapshot()
    bridged.read(ids)
    assert (bridged.stats.snapshot() - before).requests == 1  # as over S3: one run, holes and all


def test_local_ranges_read_by_pread_as_a_file_object_reads_them(tmp_path):
    path = tmp_path / "shard"
    data = bytes(range(256)) * 40  # 10,240 bytes
    path.write_bytes(data)
    # (start, end): closed, open-ended, from the end (format 1), past the end, empty
    ranges = [(0, 10), (100, 4100), (5000, None), (-16, None), (10_000, 20_000), (20_000, 30_000), (7, 7)]
    blobs: list = [None] * len(ranges)
    _pread_ranges(str(path), list(range(len(ranges))), [r[0] for r in ranges], [r[1] for r in ranges], blobs)
    with open(path, "rb") as f:
        for (start, end), blob in zip(ranges, blobs):
            f.seek(start, 0 if start >= 0 else 2)
            assert blob == (f.read() if end is None else f.read(end - f.tell()))
    # a start before the file's beginning fails every range of it, as a missing file does
    for where, error in ((str(path), OSError), (str(tmp_path / "missing"), FileNotFoundError)):
        blobs = [None, None]
        _pread_ranges(where, [0, 1], [0, -len(data) - 1], [10, None], blobs)
        assert all(isinstance(b, error) for b in blobs)


def test_zstd_decodes_as_numcodecs_does_every_frame_it_may_meet():
    # a context kept per thread, numcodecs' own decode where that context would not take the frame whole
    raw = np.arange(1000, dtype=np.int32).tobytes()
    frames = {
        "numcodecs'": numcodecs.Zstd().encode(raw),
        "without its size": zstandard.ZstdCompressor(write_content_size=False).compress(raw),
        "two frames": numcodecs.Zstd().encode(raw[:2000]) + numcodecs.Zstd().encode(raw[2000:]),
    }
    ours = Zstd()
    for name, frame in frames.items():
        expected = numcodecs.Zstd().decode(frame)
        assert ours.decode(frame) == expected, name
        assert ours.decode(np.frombuffer(frame, np.uint8)) == expected, name  # as the reader hands it
    damaged = bytearray(frames["numcodecs'"])
    damaged[10] ^= 0xFF
    with pytest.raises(RuntimeError, match="Zstd decompression error"):
        ours.decode(bytes(damaged))
    with ThreadPoolExecutor(4) as pool:  # each thread its own context
        assert all(out == raw for out in pool.map(ours.decode, [frames["numcodecs'"]] * 64))


def test_vlen_chunks_decode_as_numcodecs_decodes_them():
    # one item a chunk is cut without numcodecs' checks; any other chunk, or a damaged one, is numcodecs'
    vlen = numcodecs.VLenBytes()
    for items in ([b"abc"], [b""], [bytes(range(256)) * 10], [b"a", b"bc"], []):
        stored = vlen.encode(np.array(items, dtype=object))
        for given in (stored, np.frombuffer(stored, np.uint8)):  # bytes, or the reader's view
            decoded = vlen_items(given)
            assert decoded.dtype == object and list(decoded) == list(vlen.decode(stored))
    for damaged in (b"\x01\x00\x00\x00\x05\x00\x00\x00ab", b"\x01\x00", b""):
        with pytest.raises(ValueError, match="corrupt buffer"):
            vlen_items(damaged)


def test_a_read_holds_its_bytes_about_three_times_at_once(tmp_path):
    """Its fetched pieces, them joined, and decoded, the raw chunks gathered a block at a time (the
    whole read's were copied once more: four times, 0.8 GB for 0.2 GB)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10_000, 1024)).astype(np.float32)  # 41 MB that zstd does not shrink: stored raw
    write_dataset(str(tmp_path / "big.zarr"), [{"x": x}], label_array=None, shard_samples=4096)
    reader = SelectiveReader(open_dataset(str(tmp_path / "big.zarr")))
    ids = np.arange(0, 10_000, 1)
    tracemalloc.start()
    try:
        read = reader.read(ids)["x"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(read, x)
    assert peak < 3.5 * x.nbytes, f"a read of {x.nbytes / 1e6:.0f} MB peaked at {peak / 1e6:.0f} MB"


def test_fixed_width_bytes_have_no_byte_order_to_name():
    # zarr writes {"name": "bytes"} with no endian for S12, and reads it back: refused here as an
    # endian of None, where a dtype that has a byte order needs one
    from nearstore.storage.codecs import ChunkCodecs

    assert ChunkCodecs.parse([{"name": "bytes"}], np.dtype("S12"), (4,), "x").stored_dtype == np.dtype("S12")
    with pytest.raises(DatasetError, match="the bytes codec's endian is None"):
        ChunkCodecs.parse([{"name": "bytes"}], np.dtype("f4"), (4,), "x")
    big = ChunkCodecs.parse([{"name": "bytes", "configuration": {"endian": "big"}}], np.dtype("U3"), (4,), "x")
    assert big.stored_dtype == np.dtype(">U3")
