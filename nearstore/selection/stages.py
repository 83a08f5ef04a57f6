"""The scan's stages, each a generator over batches, that compose: read shards (or pooled ids) →
decode encoded images → join them into larger batches → the proxy's gradient embeddings per class. `Scan` holds what
every streaming selection starts from: a reader of the input and label arrays and a fitted proxy.
The stages that read ask the scan's `cancelled` before each shard or pool chunk (and windowed
selection before each decision), and stop a round nobody waits for any more (`RoundCancelled`)."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kernels import ConfidentJoint, label_issues
from nearstore.errors import DatasetError, NearstoreError, ParameterError, RoundCancelled
from nearstore.selection.augment import augmentation
from nearstore.selection.proxies import ModelProxy, Proxy, RandomFeatureProxy
from nearstore.selection.record import Suspects
from nearstore.storage import DEFAULT_READS, Coalescing, Dataset, SelectiveReader, small_arrays
from nearstore.storage.dali_images import DaliDecoder, dali_decodes
from nearstore.storage.images import ImageTransform
from nearstore.storage.ragged import RaggedLayout

# Inputs past this size overflow float32 when squared (3.4e38), as the proxies' standardizing does.
MAX_INPUT = 1e18

Batch = tuple[np.ndarray, dict[str, np.ndarray]]  # (ids, {array: rows})
# (ids, {group: rows}, gradient embeddings, or their two factors where asked for)
Embedded = tuple[np.ndarray, dict[int, np.ndarray], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
log = logging.getLogger("nearstore")
# Threads that decode images beside the data: DALI's (`DaliDecoder`), or PIL's where DALI does not
# decode them (PIL lets go of the GIL only while it decodes, so small images gain little from a second).
DECODE_THREADS = 2
# The most decoded pixels a stage holds at once: 21,845 thumbnails of 32 x 32, 435 images of 224.
DECODED_BATCH_BYTES = 1 << 28
# The default proxy is fitted on random whole shards holding at least this many samples.
WARMUP_SAMPLES = 4096
# The warm-up may read up to this many times WARMUP_SAMPLES to hold a sample of every class.
WARMUP_COVER = 4
# Pooled samples are read and embedded this many at a time.
POOL_CHUNK_SAMPLES = 4096
# The most stored bytes a scan reads at once (by the manifest's mean a sample): 8 shards of
# MNIST-1D or of JPEGs of ~100 kB, 64 photographs of 4 MB (`samples_per_read`).
READ_BYTES = 1 << 28
# The most classes a selection scores: its proxies hold C outputs a sample (the model-free one's fit
# several 4,096 x C matrices), so the largest label bounds its memory (ImageNet-21k's 21,841 fit).
MAX_CLASSES = 1 << 15
# What makes a suspect beyond confident learning's per-class thresholds (bench/selection_quality.py,
# MNIST-1D and digits at 5-10%, 5 seeds; docs/benchmarks.md#label-noise-and-long-tails):
# - a floor: with a weak proxy the thresholds are low, and confident learning alone muted hard,
#   clean samples by the thousand (clean MNIST-1D at 10%: 87.0% with it alone, 91.0% with 1/2);
# - that follows the proxy: one trained on wrong labels is unsure of every sample (mean top-class
#   probability 0.22-0.50 under 40% noise, 0.48-0.89 clean), and a floor of 1/2 found almost no
#   wrong label there (40% noise: 79.7% at 10%; min(1/2, 0.6 x the mean): 84.2%);
# - odds: the other class at least ODDS times as likely as the given label, or a weak proxy that
#   splits a hard sample between two classes mutes it (clean 5%: 77.1% without, 82.4% with);
# - except from a proxy that knows nothing (mean top-class probability under INFORMATIVE / C, 0.75
#   with two classes: `informative_top`; as digits' MLP after 3 epochs on 140 samples): there the
#   odds are noise, and muting what its floors catch leaves MaxVol close to a random draw of the
#   fresh pool, which is what such a proxy deserves (digits, 40% noise, 10%: 50.4% with the odds,
#   69.7% without).
# - and only a class the proxy tells apart can be a suspect's other class: the samples labelled c
#   get on average at least SEPARATION times the p(c | x) the others get (`ConfidentJoint`). A proxy
#   near chance gives its favourite class the same probability whatever the sample (the shapes CNN
#   after 3 epochs on 1,000 images, 13% right: 1.01-1.15 over its classes), and without this rule
#   it called 87% of the samples wrong at the precision of chance (20% noise: 0.189 against 0.184);
#   one that knows a little separates some classes (digits' MLP after 3 epochs on 70 samples:
#   0.99-2.29), and their suspects still pay;
# - and only where that gap is significant (a z-test at SEPARATION_ALPHA / C a class): the heads of
#   the model-free proxy on pure-noise labels, 100 classes of 41 warm-up samples, are at chance
#   held out but scatter, and 11% of the samples cleared the ratio alone.
SEPARATION = 1.25
SEPARATION_ALPHA = 0.01
MAJORITY = 0.5
CONFIDENCE_SHARE = 0.6
ODDS = 4.0
INFORMATIVE = 2.0


def never() -> bool:
    """The `cancelled` of a round nobody stops: one run from Python, or a task on a Dask worker
    (its driver cancels the task instead)."""
    return False


def stop_if_cancelled(cancelled: Callable[[], bool], before: str) -> None:
    """Raise RoundCancelled, naming what is left undone (`before`), where `cancelled()` says nobody
    waits for the round any more."""
    if cancelled():
        raise RoundCancelled(f"selection round stopped before {before}: nobody waits for it any more")


@dataclass
class Scan:
    """A reader of the input and label arrays and a fitted proxy, with the warm-up shards it was
    fitted on (not to be read again, nor decoded); `cancelled` says nobody waits for its round any more."""

    reader: SelectiveReader
    proxy: Proxy
    input_array: str
    labels: str | None  # None: a scan without labels (`features` only)
    warm: dict[int, Batch]
    cancelled: Callable[[], bool] = never

    @classmethod
    def open(
        cls,
        dataset: Dataset,
        who: str,
        proxy: Proxy | None,
        seed: int,
        device: torch.device | str,
        input_array: str | None = None,
        warmup_samples: int = WARMUP_SAMPLES,
        keep_labels: bool = False,
        labelled: bool = True,
        also: Sequence[str] = (),
        cancelled: Callable[[], bool] = never,
    ) -> Scan:
        """The scan `who` (a method's name, for errors) runs: with `proxy`, or by default a
        RandomFeatureProxy fitted on `warmup_samples` samples of random whole shards.
        keep_labels: the labels are read whole on first use and kept with the dataset, not read
        with each shard: for a selection that reads them whole anyway (`read_labels`: class
        budgets, pools), where reading them twice was a third of a scan's reading.
        labelled: False for a method that needs no labels (SAS, ClipCov): the default proxy then
        fits its features alone, and a given one is not checked against the classes.
        also: other arrays each shard is read with (ClipCov's pairs).
        cancelled: whether nobody waits for the round any more (a server's select whose caller
            has gone): asked before each shard or pool chunk is read, and before each decision of windows."""
        labels = dataset.required_labels(f"{who} scores per-example gradients, which") if labelled else None
        if labels and dataset.num_classes:  # a store that names no classes: the labels say, at the fit
            check_classes(dataset.num_classes, dataset, labels)
        input_array = input_array or dataset.input_array
        # the default proxy's warm-up reads them whole too, to cover every class (`_warm_shards`)
        keep = small_arrays(dataset, [labels]) if labels and (keep_labels or proxy is None) else ()
        names = [input_array, *([labels] if labels else []), *(a for a in also if a not in (input_array, labels))]
        reader = SelectiveReader(dataset, names, keep=keep)
        warm: dict[int, Batch] = {}
        if proxy is None:
            proxy, warm = _fit_default_proxy(reader, input_array, labels, warmup_samples, seed, device, cancelled)
        else:
            probe(proxy, reader, input_array)
            if labelled:
                check_proxy(dataset, proxy)
        return cls(reader, proxy, input_array, labels, warm, cancelled)

    def embeddings(
        self,
        progress: bool,
        desc: str,
        class_balanced: bool = True,
        shards: Iterable[int] | None = None,
        factored: bool = False,
        batch_samples: int = 0,
    ) -> Iterator[Embedded]:
        """Every shard (or those given) once: (ids, {group: rows}, gradient embeddings), or the
        embeddings' two factors (Proxy.gradient_factors) with `factored`; consecutive shards
        embedded together up to `batch_samples` (0: one shard at a time), and read together as well."""
        dataset = self.reader.dataset
        together = max(1, samples_per_read(dataset, self.reader.layouts, batch_samples) // dataset.shard_samples)
        batches = decoded(
            shard_batches(self.reader, self.warm, progress, desc, shards, together, self.cancelled),
            self.input_array,
            self.proxy.images,
            self.reader.dataset.ragged(self.input_array),
        )
        if batch_samples:
            batches = rebatch(batches, batch_samples)
        return embed(batches, self.proxy, self.input_array, self.labels, class_balanced, factored)

    def pooled(
        self,
        pools: dict[int, np.ndarray],
        progress: bool,
        desc: str,
        reads: Coalescing = DEFAULT_READS,
        factored: bool = False,
    ) -> tuple[SelectiveReader, Iterator[Embedded]]:
        """The pooled samples embedded per class, and the reader of their inputs (`pool_batches`)."""
        dataset = self.reader.dataset
        reader, batches = pool_batches(
            dataset, self.input_array, self.labels, pools, progress, desc, reads, self.cancelled
        )
        batches = decoded(batches, self.input_array, self.proxy.images, dataset.ragged(self.input_array))
        return reader, embed(batches, self.proxy, self.input_array, self.labels, True, factored)


def shard_batches(
    reader: SelectiveReader,
    warm: dict[int, Batch],
    progress: bool,
    desc: str,
    shards: Iterable[int] | None = None,
    together: int = 1,
    cancelled: Callable[[], bool] = never,
) -> Iterator[Batch]:
    """Stage 1: every shard (or those given) once, in order; shards in `warm` are not read again.
    Up to `together` consecutive shards are read in one call, each yielded alone: a read's own
    cost (~0.3 ms a call) was half of reading a shard of MNIST-1D. `cancelled` is asked before each
    shard (`stop_if_cancelled`)."""
    shards = list(range(reader.num_shards) if shards is None else shards)
    read: dict[int, Batch] = {}
    for at, shard in enumerate(tqdm(shards, desc=desc, unit="shard", disable=not progress)):
        stop_if_cancelled(cancelled, f"shard {shard} of {reader.dataset.url!r}")
        if shard in warm:
            yield warm.pop(shard)
            continue
        if shard not in read:
            run = [shard]
            for after in shards[at + 1 : at + together]:
                if after != run[-1] + 1 or after in warm:
                    break
                run.append(after)
            read = _read_run(reader, run)
        yield read.pop(shard)


def _read_run(reader: SelectiveReader, run: list[int]) -> dict[int, Batch]:
    """Consecutive shards `run` in one read, each shard's samples apart (views)."""
    if not (0 <= run[0] and run[-1] < reader.num_shards):
        raise IndexError(f"shards {run} out of range [0, {reader.num_shards}) in {reader.dataset.url!r}")
    ranges = [reader.shard_range(shard) for shard in run]
    first = ranges[0].start
    values = reader.read(np.arange(first, ranges[-1].stop))
    return {
        shard: (np.arange(r.start, r.stop), {name: v[r.start - first : r.stop - first] for name, v in values.items()})
        for shard, r in zip(run, ranges)
    }


def pool_batches(
    dataset: Dataset,
    input_array: str,
    label_array: str,
    pools: dict[int, np.ndarray],
    progress: bool,
    desc: str,
    reads: Coalescing = DEFAULT_READS,
    cancelled: Callable[[], bool] = never,
) -> tuple[SelectiveReader, Iterator[Batch]]:
    """Stage 1 for pools: the reader of the pooled inputs (coalescing as `reads`), and every pooled
    sample, in id order, in chunks of POOL_CHUNK_SAMPLES (fewer of large samples, `samples_per_read`):
    inputs read, each labelled by its pool's class (`pools`: {class: its pooled ids}). `cancelled`
    is asked before each chunk."""
    reader = SelectiveReader(dataset, [input_array], reads=reads)
    ids = np.concatenate([np.asarray(members, dtype=np.int64) for members in pools.values()] or [np.zeros(0, np.int64)])
    classes = np.concatenate([np.full(len(m), c, dtype=np.int64) for c, m in pools.items()] or [np.zeros(0, np.int64)])
    order = np.argsort(ids, kind="stable")
    ids, classes = ids[order], classes[order]

    step = samples_per_read(dataset, [input_array], POOL_CHUNK_SAMPLES)

    def batches() -> Iterator[Batch]:
        chunks = range(0, len(ids), step)
        for start in tqdm(chunks, desc=desc, unit="chunk", disable=not progress):
            stop_if_cancelled(cancelled, f"pooled sample {ids[start]} of {dataset.url!r}")
            chunk = slice(start, start + step)
            yield ids[chunk], {input_array: reader.read(ids[chunk])[input_array], label_array: classes[chunk]}

    return reader, batches()


def samples_per_read(dataset: Dataset, arrays: Iterable[str], samples: int) -> int:
    """`samples`, or fewer where their stored bytes in `arrays` (the manifest's mean a sample)
    would pass READ_BYTES; `samples` for a store without a manifest."""
    if dataset.manifest is None or not dataset.num_samples:
        return samples
    sample_bytes = sum(sum(dataset.manifest.nbytes[name]) for name in arrays) / dataset.num_samples
    return max(1, min(samples, int(READ_BYTES // max(sample_bytes, 1))))


def decoded(
    batches: Iterable[Batch], input_array: str, images: ImageTransform, ragged: RaggedLayout | None = None
) -> Iterator[Batch]:
    """Stage 1b: ragged samples (laid out as `ragged`) as arrays; encoded images decoded as
    `images` (the proxy's; by DALI where it is installed, `DaliDecoder`, else PIL), damaged ones
    left out (logged: the scan cannot score them, so they are never selected), a batch in pieces
    of at most DECODED_BATCH_BYTES of pixels; other inputs, and inputs decoded already, pass as
    they are."""
    piece = max(1, DECODED_BATCH_BYTES // (3 * images.size**2 * 4))
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="nearstore-decode") as pool:
        decode = None  # chosen at the first encoded batch: only then is DALI imported
        for whole_ids, whole in batches:
            x = whole[input_array]
            if x.dtype != object or (len(x) and not isinstance(x[0], bytes)):
                yield whole_ids, whole
                continue
            if ragged is not None:
                yield whole_ids, {**whole, input_array: ragged.decode_all(x, whole_ids)}
                continue
            if decode is None:
                decode = (
                    DaliDecoder(images, DECODE_THREADS, executor=pool).decode_batch
                    if dali_decodes(images)
                    else functools.partial(images.decode_batch, executor=pool)
                )
            for start in range(0, len(whole_ids), piece):
                ids, batch = whole_ids[start : start + piece], {k: v[start : start + piece] for k, v in whole.items()}
                inputs, failed = decode(batch[input_array])
                if failed:
                    for i, why in failed.items():
                        log.warning("left out of selection: sample %d of array %r: %s", ids[i], input_array, why)
                    kept = np.setdiff1d(np.arange(len(ids)), list(failed))
                    ids, batch = ids[kept], {name: values[kept] for name, values in batch.items()}
                yield ids, {**batch, input_array: inputs}


def augmented_views(
    scan: Scan, shards: list[int], *, augmentations: int, augment: str, seed: int, progress: bool, desc: str
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], list[np.ndarray]]]:
    """Stage 1c: every sample of `shards`, a shard at a time, with `augmentations` random views of
    its input (`nearstore.selection.augment`'s `augment`): (ids, the shard's arrays, the views). A
    shard's views are drawn from (seed, its first id): every pass, and any partition of the
    shards, sees the same views."""
    ragged = scan.reader.dataset.ragged(scan.input_array)
    batches = decoded(
        shard_batches(scan.reader, scan.warm, progress, desc, shards, cancelled=scan.cancelled),
        scan.input_array,
        scan.proxy.images,
        ragged,
    )
    for ids, batch in batches:
        x = batch[scan.input_array]
        check_finite(x, ids, scan.input_array)
        rng = np.random.default_rng([seed, int(ids[0])])
        varied = augmentation(augment, x)
        yield ids, batch, [varied(x, rng) for _ in range(augmentations)]


def rebatch(batches: Iterable[Batch], samples: int) -> Iterator[Batch]:
    """Consecutive batches joined until each holds at least `samples` or DECODED_BATCH_BYTES of
    arrays (the last may hold fewer): fewer, larger calls for the stages after; a batch of more
    than `samples` is cut into pieces of that many first (what the stages after hold of it is
    bounded: whole gradients, decoded images)."""
    held: list[Batch] = []
    for ids, arrays in batches:
        for start in range(0, len(ids), samples):
            piece = slice(start, start + samples)
            held.append((ids[piece], {name: a[piece] for name, a in arrays.items()}))
            full = sum(a.nbytes for _, part in held for a in part.values()) >= DECODED_BATCH_BYTES
            if full or sum(len(part) for part, _ in held) >= samples:
                yield _join(held)
                held = []
    if held:
        yield _join(held)


def _join(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    ids = np.concatenate([ids for ids, _ in batches])
    return ids, {name: np.concatenate([b[name] for _, b in batches]) for name in batches[0][1]}


def embed(
    batches: Iterable[Batch], proxy: Proxy, input_array: str, labels: str, class_balanced: bool, factored: bool = False
) -> Iterator[Embedded]:
    """Stage 2: gradient embeddings of a batch, with the rows of each group (class, or all)."""
    for ids, batch in batches:
        x, y = batch[input_array], batch[labels]
        check_finite(x, ids, input_array)
        with model_errors_named(proxy, input_array, x, ids):
            embeddings = proxy.gradient_factors(x, y) if factored else proxy.embed(x, y)
        if class_balanced:
            groups = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
        else:
            groups = {0: np.arange(len(ids))}
        yield ids, groups, embeddings


class SuspectsFound:
    """What `mute_suspects` found, batch by batch, and the proxy's mean top-class probability over
    every sample it saw so far."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.ids: set[int] = set()  # of them all, for `among`
        self.top, self.streamed = 0.0, 0
        self.confirmed = 0  # of them, earlier suspects this proxy confirmed (`mute_suspects`)

    @property
    def mean_top(self) -> float:
        return self.top / self.streamed if self.streamed else 0.0

    def informed(self, num_classes: int) -> bool:
        """Whether the proxy knows something of the labels so far (`informed`)."""
        return informed(self.mean_top, num_classes)

    def add(self, ids: np.ndarray, labels: np.ndarray, quality: np.ndarray) -> None:
        self.parts.append((ids, labels, quality))
        self.ids.update(ids.tolist())

    def among(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` were found suspect so far."""
        return np.fromiter(map(self.ids.__contains__, ids.tolist()), dtype=bool, count=len(ids))

    def suspects(self) -> Suspects:
        return suspects_of(self.parts)


def suspects_of(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Suspects:
    """The suspects of `parts`, (ids, suggested labels, quality) each, in one record."""
    if not parts:
        return Suspects(np.zeros(0), np.zeros(0), np.zeros(0))
    return Suspects(*(np.concatenate(column) for column in zip(*parts)))


def mute_suspects(
    stream: Iterable[Embedded],
    num_classes: int,
    found: SuspectsFound,
    mute: bool = True,
    typical: np.ndarray | None = None,
    earlier: Suspects | None = None,
    unseen: np.ndarray | None = None,
    prior: ConfidentJoint | None = None,
) -> Iterator[Embedded]:
    """Stage 3, for factored embeddings grouped by class: the samples whose label the proxy
    contradicts with confidence (`suspects`) get a zero gradient, so a diversity pick (MaxVol)
    takes them only when their window has nothing else left to span; what was found goes to
    `found`. Thresholds and the proxy's mean confidence are kept over every sample streamed so
    far (`found.mean_top`; without `mute`, only that is kept). The proxy's p = r + onehot(y).
    typical: per class, a floor of p(label | x) under which a sample is muted too, not reported
    (NaN: none; round 0's typical half, `windows.typical_floors`).
    earlier: suspects another judge found (round 0's model-free proxy, handed on in
    `Selection.carry`); one of them is a suspect here too where this proxy's top class is the one
    that judge named, at the floor of confidence a suspect needs (`confirmed`).
    unseen: classes the proxy never saw (`unseen_classes`), whose samples are never suspects.
    prior: the proxy's own confidences on its held-out warm-up (`RandomFeatureProxy.warm_joint`),
    from which the thresholds start: else a class has none until its samples stream, and in a store
    written class by class a flip to a later class was never suspected (recall 0.71 to 0.53)."""
    fits = prior is not None and len(prior.counts) == num_classes
    joint = copy.deepcopy(prior) if fits else ConfidentJoint(num_classes)
    floors = None if typical is None else torch.as_tensor(typical)
    unjudged = None if unseen is None or not unseen.any() else torch.as_tensor(unseen)
    for ids, groups, (residual, inputs) in stream:
        labels = torch.empty(len(ids), dtype=torch.int64, device=residual.device)
        for group, rows in groups.items():
            labels[torch.from_numpy(rows).to(residual.device)] = group
        probs = residual + torch.nn.functional.one_hot(labels, residual.shape[1]).to(residual)
        quality = probs.gather(1, labels[:, None])[:, 0]  # p(given label | x)
        found.top, found.streamed = found.top + probs.max(1).values.sum().item(), found.streamed + len(ids)
        if floors is not None:  # a NaN floor compares false: nothing muted
            residual = residual.masked_fill((quality < floors.to(quality)[labels])[:, None], 0)
        if not mute:
            yield ids, groups, (residual, inputs)
            continue
        joint.update(probs, labels)
        confident = suspects(probs, labels, joint.thresholds(SEPARATION, SEPARATION_ALPHA), found.mean_top)
        if earlier is not None:
            named = confirmed(probs, earlier, ids, found.mean_top)
            again = (named >= 0) & (confident < 0)
            confident = torch.where(again, named, confident)
            found.confirmed += int(again.sum())
        if unjudged is not None:
            confident = confident.masked_fill(unjudged.to(labels.device)[labels], -1)
        suspect = confident >= 0
        if suspect.any():
            rows = suspect.cpu().numpy()
            found.add(ids[rows], confident[suspect].cpu().numpy(), quality[suspect].cpu().numpy())
            residual = residual.masked_fill(suspect[:, None], 0)
        yield ids, groups, (residual, inputs)


def confirmed(probs: torch.Tensor, earlier: Suspects, ids: np.ndarray, mean_top: float) -> torch.Tensor:
    """For samples `ids` (probabilities `probs` under this proxy), the class the earlier judge
    named where they are `earlier` suspects this proxy puts in that class, with at least the floor
    of probability a suspect's other class needs, min(MAJORITY, CONFIDENCE_SHARE × mean_top)
    (`suspects`), else -1: two judges that name the same other class. The rule for a proxy too young to be sure of any
    label (digits' MLP after 3 epochs on 70 samples: a mean top-class probability of 0.15, right
    on 78% of the clean ones) but not wrong about which class, as a model-free one can be."""
    if not len(earlier):
        return torch.full((len(ids),), -1, dtype=torch.int64, device=probs.device)
    at = np.searchsorted(earlier.ids, ids).clip(max=len(earlier) - 1)
    named = torch.from_numpy(np.where(earlier.ids[at] == ids, earlier.labels[at], -1)).to(probs.device)
    top = probs.max(1)
    agreed = (top.indices == named) & (top.values >= min(MAJORITY, CONFIDENCE_SHARE * mean_top))
    return torch.where(agreed, named, -1)


def informed(mean_top: float, num_classes: int) -> bool:
    """Whether a proxy knows something of the labels: its mean top-class probability is at least
    `informative_top(C)`."""
    return mean_top >= informative_top(num_classes)


def informative_top(num_classes: int) -> float:
    """The mean top-class probability of a proxy that knows something of the labels: INFORMATIVE / C,
    that many times what one that knows nothing gives (about 1 / C); with two classes, where that
    is certainty, which no proxy reaches, halfway from chance to certainty (0.75)."""
    return min(INFORMATIVE / num_classes, (1 + 1 / num_classes) / 2)


def suspects(probs: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor, mean_top: float) -> torch.Tensor:
    """The class each sample's label is suspected to be instead, else -1 (`kernels.label_issues`):
    another class c with p(c | x) at or above its threshold t_c and the floor min(MAJORITY,
    CONFIDENCE_SHARE × mean_top), and, from a proxy that knows something (`informed`), at least
    ODDS times p(given label | x). mean_top: the proxy's mean top-class probability."""
    floor = min(MAJORITY, CONFIDENCE_SHARE * mean_top)
    confident = label_issues(probs, labels, thresholds.clamp_min(floor))
    if informed(mean_top, probs.shape[1]):
        own = probs.gather(1, labels[:, None])[:, 0]
        other = probs.gather(1, confident.clamp_min(0)[:, None])[:, 0]
        confident = torch.where(other >= ODDS * own, confident, torch.full_like(confident, -1))
    return confident


def _fit_default_proxy(
    reader: SelectiveReader,
    input_array: str,
    labels: str | None,
    warmup_samples: int,
    seed: int,
    device: torch.device | str,
    cancelled: Callable[[], bool] = never,
) -> tuple[RandomFeatureProxy, dict[int, dict[str, np.ndarray]]]:
    """Fit a RandomFeatureProxy on random whole shards (its features alone without `labels`;
    `_warm_shards`); return them so pass 1 need not re-read. `cancelled` is asked before each
    shard is read and before the fit."""
    dataset = reader.dataset
    sample_bytes = dataset.sample_nbytes(input_array)
    if sample_bytes is not None:  # fixed-size samples: as many as fit DECODED_BATCH_BYTES, at least a shard's
        # (4,096 samples of 100,000 floats: 1.6 GB, and the fit holds about four copies)
        warmup_samples = min(warmup_samples, max(1, DECODED_BATCH_BYTES // max(1, sample_bytes)))
    warm: dict[int, Batch] = {}
    for shard in _warm_shards(reader, labels, warmup_samples, seed):
        stop_if_cancelled(cancelled, f"the default proxy's warm-up read shard {shard} of {dataset.url!r}")
        r = reader.shard_range(int(shard))
        read = [(np.arange(r.start, r.stop), reader.read_shard(int(shard)))]
        warm[int(shard)] = ids, batch = next(
            decoded(read, input_array, RandomFeatureProxy.images, dataset.ragged(input_array))
        )
        check_finite(batch[input_array], ids, input_array)
    x = np.concatenate([b[input_array] for _, b in warm.values()])
    y = np.concatenate([b[labels] for _, b in warm.values()]) if labels else None
    if y is None:  # its features alone: no head is scored, whatever the store's labels
        num_classes = 2
    else:
        num_classes = max(dataset.num_classes, int(y.max()) + 1)
        check_classes(num_classes, dataset, labels)
    stop_if_cancelled(cancelled, f"the default proxy was fitted on {dataset.url!r}'s warm-up")
    return RandomFeatureProxy(num_classes, seed=seed, device=device).fit(x, y), warm


def _warm_shards(reader: SelectiveReader, labels: str | None, warmup_samples: int, seed: int) -> list[int]:
    """The warm-up's shards: random whole ones, `warmup_samples` samples' worth; then, where labels
    read whole (kept) show classes they miss (a store written class by class, as image folders
    are), the next shards of that order holding one, up to WARMUP_COVER times as many samples in
    all. A class the warm-up still misses is one the proxy cannot judge (`unseen_classes`)."""
    order = np.random.default_rng(seed).permutation(reader.num_shards).tolist()
    sizes = [len(reader.shard_range(shard)) for shard in order]
    first = next((i + 1 for i, total in enumerate(np.cumsum(sizes)) if total >= warmup_samples), len(order))
    taken = order[:first]
    if not labels or labels not in reader.keep:
        return taken
    y = reader.whole(labels)

    def classes(shard: int) -> set[int]:
        r = reader.shard_range(shard)
        return set(np.unique(y[r.start : r.stop]).tolist())

    missing = set(np.unique(y).tolist()).difference(*map(classes, taken))
    budget = WARMUP_COVER * warmup_samples - sum(sizes[:first])
    for shard, size in zip(order[first:], sizes[first:]):
        if not missing or size > budget:
            break
        held = classes(shard)
        if missing & held:
            taken.append(shard)
            missing -= held
            budget -= size
    return taken


def unseen_classes(proxy: Proxy) -> np.ndarray | None:
    """The classes a model-free proxy's warm-up held no sample of (a (C,) bool mask): it scores
    every sample of one as another class's, so none of them is judged mislabelled; None for a
    proxy without a warm-up (the trainer's model)."""
    recall = getattr(proxy, "held_out_recall", None)
    return None if recall is None else np.isnan(recall)


def check_classes(num_classes: int, dataset: Dataset, labels: str | None) -> None:
    """Refuse labels that name one class (a last-layer gradient then says nothing), or more than
    MAX_CLASSES (the largest label + 1) before a selection allocates C outputs a sample (labels up to
    a million took all 24 GB here)."""
    if num_classes < 2:
        raise DatasetError(
            f"label array {labels!r} of {dataset.url!r} holds a single class: per-example gradients need two "
            "or more (method 'random' selects without them)"
        )
    if num_classes > MAX_CLASSES:
        raise DatasetError(
            f"label array {labels!r} of {dataset.url!r} names {num_classes:,} classes (labels up to "
            f"{num_classes - 1:,}); a selection scores at most {MAX_CLASSES:,}: give the classes dense ids "
            "(np.unique(labels, return_inverse=True))"
        )


def check_finite(x: np.ndarray, ids: np.ndarray, name: str) -> None:
    """Refuse, naming the first, samples holding NaN, inf or a value past ±MAX_INPUT: no proxy
    can score them (float32 squares of such values, as standardizing takes, are inf). Ragged
    integers are ids (tokens, hashed keys), which proxies look up or hash, and pass whatever
    their size."""
    if x.dtype == object:  # ragged samples
        bad = np.array([np.issubdtype(s.dtype, np.floating) and not _within(s).all() for s in x], dtype=bool)
    elif _sizable(x.dtype):
        bad = ~_within(x.reshape(len(x), -1)).all(axis=1)
    else:
        return
    if bad.any():
        raise DatasetError(
            f"sample {int(ids[bad][0])} of array {name!r} contains NaN, inf or a value past ±{MAX_INPUT:.0e}; "
            "the proxy cannot score it"
        )


def _within(x: np.ndarray) -> np.ndarray:
    """|x| <= MAX_INPUT, elementwise (NaN compares false). The bound is capped at the largest
    value of x's dtype: cast to float16 it would be inf, which inf passes."""
    bound = min(MAX_INPUT, float(np.finfo(x.dtype).max)) if np.issubdtype(x.dtype, np.floating) else MAX_INPUT
    return np.abs(x) <= bound


def _sizable(dtype: np.dtype) -> bool:
    """Whether values of `dtype` can pass MAX_INPUT: floats, 64-bit integers."""
    return np.issubdtype(dtype, np.floating) or (np.issubdtype(dtype, np.integer) and dtype.itemsize == 8)


# Samples a probe reads, from the first: a damaged image among them is passed over.
PROBE_SAMPLES = 8


def probe(proxy: Proxy, reader: SelectiveReader, input_array: str, *, run: bool = False) -> bool:
    """A ModelProxy told whether the dataset's samples are encoded images it decodes
    (`ModelProxy.decodes_images`), and its head found on the first sample (encoded images: the
    first that decodes of the first PROBE_SAMPLES; an empty ragged one: with those after it, as a
    batch: `ModelProxy.probe`), before its classes are checked and its gradients
    sized; another proxy, or a head settled already, reads nothing. run: the model is run on that
    sample even where its head is settled (`vet`). Whether a sample was read that decodes."""
    if not isinstance(proxy, ModelProxy):
        return False
    ragged = reader.dataset.ragged(input_array)
    proxy.decodes_images = reader.dataset.encoded(input_array) and ragged is None  # as `decoded` takes them
    if (proxy.sized and not run) or not reader.dataset.num_samples:
        return False
    n = reader.dataset.num_samples
    first = np.arange(min(PROBE_SAMPLES if proxy.decodes_images else 1, n), dtype=np.int64)  # images may not decode
    read = reader.read(first)
    if ragged is not None and not len(read[input_array][0]):
        # an empty sequence alone may run no model that a batch, padded to its longest, runs
        first = np.arange(min(PROBE_SAMPLES, n), dtype=np.int64)
        read = reader.read(first)
    [(ids, batch)] = decoded([(first, read)], input_array, proxy.images, ragged)
    samples = batch[input_array][:1] if proxy.decodes_images else batch[input_array]
    # where none decodes, it stays sized by its last registered Linear (refused if a run finds another head)
    if len(ids) and run:
        proxy.features(samples)  # sizes the proxy too, as `ModelProxy.probe` would
    elif len(ids):
        proxy.probe(samples)
    return bool(len(ids))


# What a model's own failure on samples raises (torch's, or the model's code's).
MODEL_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError)


@contextlib.contextmanager
def model_errors_named(proxy: Proxy, input_array: str, x: np.ndarray, ids: np.ndarray) -> Iterator[None]:
    """A trainer's model failing on a batch of a round (samples `ids` of `input_array`, `x`) named
    as `vet` names one failing on the first: a model handed to a selector unvetted, or one that
    fails on later samples only (its own ValueError crossed the round naming nothing)."""
    try:
        yield
    except NearstoreError:  # ModelProxy's own refusals
        raise
    except MODEL_ERRORS as e:
        if not isinstance(proxy, ModelProxy) or isinstance(e, torch.OutOfMemoryError):
            raise
        shape = "ragged" if x.dtype == object else f"of shape {tuple(x.shape[1:])}"
        where = f" (a batch of samples {int(ids.min())}..{int(ids.max())})" if len(ids) else ""
        raise misfit(proxy, input_array, shape, e, where) from e


def vet(proxy: Proxy, reader: SelectiveReader, input_array: str) -> None:
    """A trainer's model tried where it is handed over, not at the next round: its head found and
    the model run once on what a round will give it (`probe`), the first sample that decodes
    (encoded images, where none of the first decodes: a blank one of the size it decodes them at). A
    model that cannot run on them is refused by name (`ParameterError`), one that scores fewer
    classes than the dataset has too (`check_proxy`)."""
    dataset = reader.dataset
    try:
        ran = probe(proxy, reader, input_array, run=True)
    except NearstoreError:  # ModelProxy's own refusals (the images it decodes, its head) name more
        raise
    except MODEL_ERRORS as e:  # the model's own
        shape = "ragged" if dataset.ragged(input_array) else f"of shape {tuple(dataset.arrays[input_array].shape[1:])}"
        raise misfit(proxy, input_array, shape, e, f" of {dataset.url!r}") from e
    if isinstance(proxy, ModelProxy) and proxy.decodes_images and not ran:  # none of the first decodes
        side = proxy.images.size
        proxy.features(np.zeros((1, 3, side, side), np.float32))
    check_proxy(dataset, proxy)


def misfit(proxy: ModelProxy, input_array: str, shape: str, error: Exception, where: str = "") -> ParameterError:
    """The refusal of a model that cannot run on `input_array`'s samples (`shape`, as said: "of
    shape (8,)", "ragged"; `where`: " of <dataset>"), torch's error beside it."""
    return ParameterError(
        f"{type(proxy.model).__name__} cannot run on {input_array!r}'s samples ({shape}){where}: "
        f"{type(error).__name__}: {error}"
    )


def check_proxy(dataset: Dataset, proxy: Proxy) -> None:
    """Refuse a proxy that scores fewer classes than the dataset has."""
    if dataset.num_classes and proxy.num_classes < dataset.num_classes:
        raise DatasetError(f"the proxy scores {proxy.num_classes} classes, {dataset.url!r} has {dataset.num_classes}")


def scan_io(started: float, readers: list[SelectiveReader], passes: int = 1) -> dict[str, float | int]:
    """What a selection read, over all its readers, and how long it took."""
    stats = [r.stats.snapshot() for r in readers]
    return {
        "bytes": sum(s.bytes for s in stats),
        "requests": sum(s.requests for s in stats),
        "seconds": time.perf_counter() - started,
        "passes": passes,
    }
