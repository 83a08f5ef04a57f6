"""The scan's stages, each alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from images import photo
from PIL import Image

from nearstore import Dataset, Graft, RoundCancelled, SelectiveReader, open_dataset, write_dataset
from nearstore.selection.stages import (
    WARMUP_SAMPLES,
    Scan,
    SuspectsFound,
    decoded,
    mute_suspects,
    pool_batches,
    rebatch,
    samples_per_read,
    unseen_classes,
)
from nearstore.storage.dali_images import DaliDecoder, dali_available
from nearstore.storage.images import ImageTransform


def test_rebatch_joins_consecutive_batches_in_order():
    sizes = [3, 5, 2, 7, 1]
    starts = np.cumsum([0, *sizes])
    batches = [(np.arange(a, b), {"x": np.arange(a, b) * 10.0}) for a, b in zip(starts, starts[1:])]
    joined = list(rebatch(iter(batches), 6))
    # each at least 6 but the last; the batch of 7 cut into 6 and 1 first
    assert [len(ids) for ids, _ in joined] == [8, 8, 2]
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in joined]), np.arange(18))
    for ids, batch in joined:
        np.testing.assert_array_equal(batch["x"], ids * 10.0)
    cut = list(rebatch(iter([(np.arange(20), {"x": np.arange(20) * 10.0})]), 6))
    assert [len(ids) for ids, _ in cut] == [6, 6, 6, 2]  # a large batch is held a piece at a time
    np.testing.assert_array_equal(np.concatenate([batch["x"] for _, batch in cut]), np.arange(20) * 10.0)


def test_rebatch_holds_no_more_than_its_bytes(monkeypatch):
    sample = 8 * 8 * 3 * 8  # bytes of a sample's pixels, in float64
    batches = [(np.arange(a, a + 2), {"x": np.zeros((2, 8, 8, 3), np.float64)}) for a in range(0, 10, 2)]
    monkeypatch.setattr("nearstore.selection.stages.DECODED_BATCH_BYTES", 2 * sample)
    assert [len(ids) for ids, _ in rebatch(iter(batches), 100)] == [2, 2, 2, 2, 2]  # 100 samples would join all
    monkeypatch.setattr("nearstore.selection.stages.DECODED_BATCH_BYTES", 5 * sample)
    assert [len(ids) for ids, _ in rebatch(iter(batches), 100)] == [6, 4]  # 4 are under the limit, 6 reach it


def test_the_warm_up_of_wide_samples_is_bounded_in_bytes(tmp_path, monkeypatch):
    # counted in samples alone: 4,096 samples of 100,000 floats were 1.6 GB, held about four times
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2000, 256)).astype(np.float32), np.arange(2000) % 4  # 1 KiB a sample
    dataset = write_dataset(str(tmp_path / "wide.zarr"), [{"x": x, "y": y}], shard_samples=50)
    monkeypatch.setattr("nearstore.selection.stages.DECODED_BATCH_BYTES", 8 << 10)  # 8 samples' worth
    scan = Scan.open(dataset, "test", None, 0, "cpu", None, WARMUP_SAMPLES)
    assert len(scan.warm) == 1  # at least a shard: of 40, where 4,096 samples would take them all


def test_encoded_images_are_decoded_in_pieces_of_bounded_bytes(monkeypatch):
    def jpeg(shade: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.full((20, 30, 3), shade, np.uint8)).save(out, format="JPEG")
        return out.getvalue()

    blobs = np.empty(10, dtype=object)
    blobs[:] = [jpeg(20 * i) for i in range(10)]
    blobs[3] = b"not an image"
    ids, labels = np.arange(100, 110), np.arange(10) % 3
    images = ImageTransform(size=8, train=False)
    whole = list(decoded([(ids, {"x": blobs, "y": labels})], "x", images))
    assert len(whole) == 1 and len(whole[0][0]) == 9  # 7.5 KB of pixels: one piece; the damaged one left out
    monkeypatch.setattr("nearstore.selection.stages.DECODED_BATCH_BYTES", 4 * 3 * 8 * 8 * 4)  # 4 images
    pieces = list(decoded([(ids, {"x": blobs, "y": labels})], "x", images))
    assert [len(piece) for piece, _ in pieces] == [3, 4, 2]  # 4, 4 and 2 read; sample 103 left out
    for name in ("x", "y"):
        np.testing.assert_array_equal(np.concatenate([batch[name] for _, batch in pieces]), whole[0][1][name])
    np.testing.assert_array_equal(np.concatenate([piece for piece, _ in pieces]), whole[0][0])


def test_pools_are_read_in_chunks_of_bounded_stored_bytes(tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)  # 1 KB a sample, noise: stored whole
    dataset = open_dataset(write_dataset(str(tmp_path / "d.zarr"), [{"x": x, "y": np.arange(64) % 2}]).url)
    assert samples_per_read(dataset, ["x"], 50) == 50
    monkeypatch.setattr("nearstore.selection.stages.READ_BYTES", 10 * 1024)
    assert samples_per_read(dataset, ["x"], 50) == 9  # 10 KB of 1,089 bytes a sample (its 1 KB, framed and indexed)
    pools = {0: np.arange(0, 64, 2), 1: np.arange(1, 64, 2)}
    _, batches = pool_batches(dataset, "x", "y", pools, False, "pool")
    chunks = list(batches)
    assert [len(ids) for ids, _ in chunks] == [9] * 7 + [1]
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in chunks]), np.arange(64))
    np.testing.assert_array_equal(np.concatenate([batch["x"] for _, batch in chunks]), x)


def _judged(
    probs: np.ndarray, labels: np.ndarray, batch: int = 50, unseen: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """mute_suspects over a stream of these probabilities in batches: (suspect ids, whose gradient
    was zeroed)."""
    found, zeroed = SuspectsFound(), []
    stream = []
    for start in range(0, len(labels), batch):
        y, p = labels[start : start + batch], torch.from_numpy(probs[start : start + batch])
        residual = p - torch.nn.functional.one_hot(torch.from_numpy(y), p.shape[1]).double()
        groups = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
        stream.append(
            (np.arange(start, start + len(y)), groups, (residual, torch.ones(len(y), 3, dtype=torch.float64)))
        )
    for ids, _, (residual, _) in mute_suspects(stream, probs.shape[1], found, unseen=unseen):
        zeroed.append(ids[(residual == 0).all(1).numpy()])
    return np.sort(found.suspects().ids), np.concatenate(zeroed)


def test_an_unsure_proxy_still_finds_wrong_labels():
    """A proxy right about every sample but sure of none (0.45 on the true class), as one trained
    on wrong labels is: the floor follows its confidence down (min(1/2, 0.6 × 0.45)), and the wrong
    labels, and only they, are muted; a fixed floor of 1/2 would find none."""
    rng = np.random.default_rng(0)
    truth = np.arange(1000) % 10
    labels = np.where(rng.random(1000) < 0.2, (truth + rng.integers(1, 10, 1000)) % 10, truth)
    probs = np.full((1000, 10), 0.55 / 9)
    probs[np.arange(1000), truth] = 0.45
    # batches of 250 (25 a class): in one of 50 a class of 2-3 samples is not yet shown apart
    found, zeroed = _judged(probs, labels, batch=250)
    np.testing.assert_array_equal(found, np.flatnonzero(labels != truth))
    np.testing.assert_array_equal(zeroed, found)


def test_a_sure_proxy_keeps_the_majority_floor_and_the_odds():
    """Where the proxy is sure of most samples, another class must hold half the probability, and
    four times the given label's: a class it is unsure of (its own samples at 0.4) does not claim
    samples at 0.45 (the floor is min(1/2, 0.6 × 0.81) there), nor a sample split 0.55 to 0.3."""
    labels = np.arange(400) % 4
    probs = np.full((400, 4), 0.01)
    probs[np.arange(400), labels] = 0.97
    probs[labels == 3] = [0.2, 0.2, 0.2, 0.4]
    hard = np.flatnonzero(labels == 0)[-10:]  # labelled 0, class 3 at 0.45 ≥ t_3 ≈ 0.4, below the floor
    probs[hard] = [0.4, 0.1, 0.05, 0.45]
    assert len(_judged(probs, labels)[0]) == 0
    probs[hard] = [0.3, 0.1, 0.05, 0.55]  # past the floor, but not four times as likely
    assert len(_judged(probs, labels)[0]) == 0
    probs[hard] = [0.1, 0.3, 0.05, 0.55]  # both: suspects
    np.testing.assert_array_equal(_judged(probs, labels)[0], hard)


def test_a_proxy_that_knows_nothing_is_not_asked_for_odds():
    """Below 2/C mean top-class probability the odds are noise: what reaches the thresholds and
    the floor is muted, and MaxVol is left close to a random draw of its pool."""
    labels = np.arange(400) % 10
    probs = np.full((400, 10), 0.84 / 9)
    probs[np.arange(400), labels] = 0.16  # a hint of the labels, little more
    odd = np.arange(0, 400, 20)  # half of class 0: class 5 at 0.2, 2.5 times the label, ≥ t_5 = 0.16
    probs[odd] = 0.72 / 8
    probs[odd, 5], probs[odd, 0] = 0.2, 0.08
    np.testing.assert_array_equal(_judged(probs, labels)[0], odd)


def test_a_class_the_proxy_gives_every_sample_alike_is_no_ones_suspected_label():
    """A proxy that leans to one class whatever the sample (0.35-0.45 for class 0, as a CNN barely
    trained on hard images does): class 0's threshold t_0 ≈ 0.4 is reached by about half of the
    samples, past the floor and 5-8 times the given label, so confident learning would call some
    180 samples of other classes 0s. Samples labelled 0 get no more of p(0 | x) than the rest:
    nothing is suspected."""
    labels = np.arange(400) % 10
    lean = np.random.default_rng(0).uniform(0.35, 0.45, 400)
    probs = np.repeat(((1 - lean) / 9)[:, None], 10, axis=1)
    probs[:, 0] = lean
    assert len(_judged(probs, labels)[0]) == 0


def test_the_samples_of_a_class_the_proxy_never_saw_are_no_suspects():
    """A head fitted without class 3 gives its samples to other classes, all of them, with
    confidence: the class's every sample would be reported; no one is judged instead."""
    labels = np.arange(400) % 4
    probs = np.full((400, 4), 0.01)
    probs[np.arange(400), labels] = 0.97
    probs[labels == 3] = [0.97, 0.01, 0.01, 0.01]
    assert len(_judged(probs, labels)[0]) >= 80  # the running thresholds settle over the first batches
    assert len(_judged(probs, labels, unseen=np.array([False, False, False, True]))[0]) == 0


def test_the_warm_up_of_a_store_in_class_order_covers_every_class(tmp_path):
    """As image folders are converted, class by class: random whole shards held a few classes, and
    every sample of the others was reported mislabelled."""
    rng = np.random.default_rng(0)

    def ordered(classes: int) -> tuple[Dataset, np.ndarray]:
        y = np.repeat(np.arange(classes), 512)
        x = (rng.normal(size=(len(y), 48)) + 3 * np.eye(classes, 48)[y]).astype(np.float32)
        return write_dataset(str(tmp_path / f"{classes}.zarr"), [{"x": x, "y": y}], shard_samples=512), y

    dataset, y = ordered(8)
    warm = Scan.open(dataset, "graft", None, 0, "cpu").warm
    assert set(np.concatenate([batch["y"] for _, batch in warm.values()]).tolist()) == set(range(8))
    assert len(Graft().select(dataset, 0.1, seed=0).suspects) < 0.05 * len(y)  # clean labels
    # more classes than 4x the warm-up covers (a shard each): those it missed are judged by no one
    dataset, y = ordered(40)
    scan = Scan.open(dataset, "graft", None, 0, "cpu")
    assert sum(len(ids) for ids, _ in scan.warm.values()) == 4 * WARMUP_SAMPLES
    missed = np.flatnonzero(unseen_classes(scan.proxy))
    assert len(missed) == 40 - 4 * WARMUP_SAMPLES // 512
    assert not np.isin(y[Graft().select(dataset, 0.1, seed=0).suspects.ids], missed).any()


@pytest.mark.skipif(not dali_available(), reason="needs DALI")
def test_the_scan_decodes_by_dali_where_it_is_installed():
    blobs = np.empty(6, dtype=object)
    blobs[:] = [photo(i) for i in range(6)]
    for images in (ImageTransform(size=16, train=False), ImageTransform(size=16, train=False, draft=True)):
        [(_, batch)] = decoded([(np.arange(6), {"x": blobs})], "x", images)
        np.testing.assert_array_equal(batch["x"], DaliDecoder(images, threads=1).decode_batch(list(blobs))[0])
        assert not np.array_equal(batch["x"], images.decode_batch(list(blobs))[0])  # not PIL's


def test_a_round_nobody_waits_for_stops_before_its_warm_up_and_before_its_fit(id_store):
    # a server's select whose caller has gone: the default proxy's warm-up read its shards and was
    # fitted before the first check (seconds, over photographs)
    with pytest.raises(RoundCancelled, match="before the default proxy's warm-up read shard"):
        Graft().select(open_dataset(id_store.url), 0.25, cancelled=lambda: True)
    shards = SelectiveReader(id_store).num_shards
    assert id_store.num_samples <= WARMUP_SAMPLES  # the warm-up reads every shard
    asked: list[int] = []

    def after_the_warm_up_read() -> bool:
        asked.append(1)
        return len(asked) > shards

    with pytest.raises(RoundCancelled, match="before the default proxy was fitted"):
        Graft().select(open_dataset(id_store.url), 0.25, cancelled=after_the_warm_up_read)


def test_a_store_written_class_by_class_finds_about_the_wrong_labels_an_interleaved_one_does(tmp_path):
    # a class had no threshold until its samples streamed: in class order, a flip to a later class
    # was judged before it could be suggested (recall on them 0.52 against 0.74 interleaved)
    rng = np.random.default_rng(3)
    n, classes = 12000, 5
    truth = rng.integers(0, classes, n)
    x = (rng.normal(size=(classes, 16))[truth] + rng.normal(size=(n, 16))).astype(np.float32)
    flipped = rng.random(n) < 0.2
    y = truth.copy()
    y[flipped] = (truth[flipped] + rng.integers(1, classes, flipped.sum())) % classes

    def found(order: np.ndarray, name: str) -> np.ndarray:
        dataset = write_dataset(str(tmp_path / name), [{"x": x[order], "y": y[order]}], shard_samples=256)
        suspects = np.zeros(n, dtype=bool)
        suspects[order[Graft().select(dataset, 0.1).suspects.ids]] = True
        return suspects

    later = flipped & (truth > y)  # their true class streams after the one they are labelled
    interleaved, by_class = found(np.arange(n), "a.zarr"), found(np.argsort(y, kind="stable"), "b.zarr")
    assert by_class[later].mean() >= interleaved[later].mean() - 0.15
    assert by_class[flipped].mean() >= 0.7
