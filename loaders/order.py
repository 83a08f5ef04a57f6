"""The order of an epoch: pure seeded functions of (size, seed, epoch, rank), as mosaicml/streaming's
shuffles are, and `EpochOrder`, the loader's place in them, which is what resumes."""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nearstore.checks import check_flag, check_integer, is_integer
from nearstore.errors import DatasetError, ParameterError

Uneven = Literal["pad", "drop"]
# How an epoch is shuffled, by name (True is "global", False none): see `epoch_order`.
SHUFFLES = ("global", "shards")
Shuffle = bool | Literal["global", "shards"]
# Samples a block of shuffle="shards" holds at most (mosaicml/streaming's default block size).
SHUFFLE_BLOCK = 1 << 18
# What fixes each epoch's order (a state resumes only where they agree), the rank share it was
# taken on (a state resumes on any), and where a loader is.
ORDER = ("batch_size", "shuffle", "shuffle_block", "seed", "drop_last", "uneven", "warm_start_epochs")
SHARE = ("rank", "world_size")
PLACE = ("epoch", "batches_done", "epochs_completed", "skipped", "spans")
# Keys a state of an older release may lack, and what they meant then (its ranks' shares of a
# "shards" shuffle were cut from one order, spread over every shard).
ADDED = {"shuffle_block": None, "skipped": 0, "spans": 1}


def state_entry(state: Mapping[str, Any], key: str, where: str, kind: type | None = None) -> Any:
    """A saved state's `key`; a DatasetError naming `where` and the key where it is missing (or
    None), or not a `kind`."""
    if state.get(key) is None:
        raise DatasetError(f"{where} has no {key!r}")
    if kind is not None and not isinstance(state[key], kind):
        raise DatasetError(f"{where}[{key!r}] must be a {kind.__name__}, got {reprlib.repr(state[key])}")
    return state[key]


def state_count(state: Mapping[str, Any], key: str, where: str) -> int:
    """A saved state's `key`, an integer >= 0; a DatasetError naming `where` and the key otherwise."""
    value = state_entry(state, key, where)
    if not is_integer(value) or value < 0:
        raise DatasetError(f"{where}[{key!r}] must be an integer >= 0, got {reprlib.repr(value)}")
    return int(value)


def epoch_order(
    shards: np.ndarray, *, seed: int, epoch: int, shuffle: Shuffle, block: int = SHUFFLE_BLOCK, spans: int = 1
) -> np.ndarray:
    """Positions 0..len(shards)-1 of the epoch's samples (`shards`: the shard of each, in sample
    order) in the order epoch `epoch` visits them. The same for every rank, whatever ran before.

    False: in order. True or "global": permutation(seed, epoch). "shards" (as mosaicml/streaming's
    py1s): the shards in a random order, cut into blocks of whole shards of about `block` samples,
    each block's samples shuffled: a batch draws from a few shards, so its reads coalesce and a
    shard's samples are read together, where a global shuffle touches every shard every batch.
    With `spans` above 1 ("shards" only), the shards, in an order fixed by the seed alone, are cut
    into `spans` contiguous spans of equal size (a shard at a cut split between two); each epoch
    orders each span's shards anew and shuffles its blocks; the spans are interleaved: every
    `spans`-th position (`rank_share`) is one span, so each of `spans` ranks reads its own shards,
    not a share of every one, and the same ones every epoch of a selection (its cache keeps them).
    """
    size = len(shards)
    if shuffle is False:
        return np.arange(size)
    rng = np.random.default_rng([seed, epoch])
    if shuffle is True or shuffle == "global":
        return rng.permutation(size)
    starts = np.flatnonzero(np.diff(shards, prepend=-1)) if size else np.empty(0, dtype=np.int64)
    counts = np.diff(np.append(starts, size))
    if spans == 1:
        visit = rng.permutation(len(starts))
        before = _ahead(counts[visit])  # samples ahead of each shard in its new place
        return _runs(starts[visit], counts[visit])[
            _sorted_within(rng.random(size), _blocks(before, counts[visit], block))
        ]
    spans = min(spans, max(1, size))  # past one a sample, more spans cut nothing more (a state's is not trusted)
    # which samples each span holds: cut from the shards in an order of the seed's alone, a draw a
    # shard id ([seed, epoch] pads to [seed, epoch, 0]: a stream of its own), so that a rank's span
    # is the same every epoch, and a round that leaves out a few shards moves the cuts, not them
    present = shards[starts]
    draws = np.random.default_rng([seed, 0, 1]).random(int(present[-1]) + 1 if size else 0)
    placed = np.argsort(draws[present], kind="stable")
    sequence = _runs(starts[placed], counts[placed])
    # span k holds size // spans samples, one more for k < size % spans: so interleaved, the
    # epoch's position i * spans + k is span k's i-th sample, each position once
    lengths = size // spans + (np.arange(spans) < size % spans)
    span, span_starts = np.repeat(np.arange(spans), lengths), _ahead(lengths)
    # its pieces (a shard's samples within one span) in a new order each epoch, then its blocks shuffled
    piece = np.flatnonzero((np.diff(shards[sequence], prepend=-1) != 0) | (np.diff(span, prepend=-1) != 0))
    sizes = np.diff(np.append(piece, size))
    visit = np.lexsort((rng.random(len(piece)), span[piece]))
    # samples ahead of each piece, from its span's start
    before = _ahead(sizes[visit]) - np.repeat(span_starts, np.bincount(span[piece], minlength=spans))
    blocks = _blocks(before, sizes[visit], block)
    visited = sequence[_runs(piece[visit], sizes[visit])][_sorted_within(rng.random(size), blocks, span)]
    within = np.arange(size) - np.repeat(span_starts, lengths)  # each slot's place in its span
    order = np.empty(size, dtype=np.int64)
    order[within * spans + span] = visited
    return order


def _blocks(before: np.ndarray, counts: np.ndarray, block: int) -> np.ndarray:
    """The block of each sample of runs of `counts` samples with `before` samples ahead of each:
    a run lies whole in the block where it starts."""
    return np.repeat(before // block, counts)


def _ahead(counts: np.ndarray) -> np.ndarray:
    """The items ahead of each run of `counts` items, laid end to end."""
    return np.cumsum(counts) - counts


def _runs(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """starts[0], starts[0] + 1, ... (counts[0] of them), then starts[1], ...: without a loop."""
    return np.arange(int(counts.sum())) + np.repeat(starts - _ahead(counts), counts)


def _sorted_within(draws: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """np.lexsort((draws, *keys)) where the keys are sorted already (the last first, as lexsort
    reads them), so equal keys lie in runs: the draws sorted within each run, a run at a time (the
    same order, so states resume: lexsort over 4M samples took 3 s, this a tenth), or by lexsort
    itself where the runs are short."""
    changes = np.zeros(max(0, len(draws) - 1), dtype=bool)
    for key in keys:
        changes |= np.diff(key) != 0
    bounds = np.concatenate([[0], np.flatnonzero(changes) + 1, [len(draws)]])
    if len(bounds) > 1 + len(draws) // 64:  # runs of a few samples (tiny blocks): a loop a run costs more
        return np.lexsort((draws, *keys))
    return np.concatenate([a + np.argsort(draws[a:b], kind="stable") for a, b in zip(bounds[:-1], bounds[1:])])


def share_size(size: int, world_size: int, uneven: Uneven) -> int:
    """Samples a rank visits of an epoch of `size`: equal on every rank, by padding or dropping."""
    return size // world_size if uneven == "drop" else math.ceil(size / world_size)


def rank_share(order: np.ndarray, *, rank: int, world_size: int, uneven: Uneven) -> np.ndarray:
    """Rank `rank`'s positions of an epoch order (as DistributedSampler's): rank, rank +
    world_size, ... of the order, wrapped around to equal length ("pad") or cut to it ("drop")."""
    if world_size == 1:
        return order
    return np.resize(order, share_size(len(order), world_size, uneven) * world_size)[rank::world_size]


@dataclass
class EpochOrder:
    """Which positions each epoch's batches hold on this rank, and how far the loader has got.

    The ORDER fields fix every epoch's order: a state resumes only where they agree. rank and
    world_size (SHARE) cut it into this rank's share. The last four (PLACE) are where the loader
    is: the epoch, its batches delivered, the epochs completed, `skipped`: the samples of the
    epoch's order done before its first batch here (a state resumed on another world size: the
    rest of the order is shared anew), and `spans`: the ranks a "shards" shuffle's order is cut
    for (`epoch_order`), world_size but in an epoch resumed from another world size. A loaded
    place is resumed by the next epoch that starts (`start`), once.
    """

    batch_size: int
    shuffle: Shuffle
    shuffle_block: int
    seed: int
    drop_last: bool
    rank: int
    world_size: int
    uneven: Uneven
    warm_start_epochs: int
    epoch: int = 0
    batches_done: int = 0
    epochs_completed: int = 0
    skipped: int = 0
    spans: int = 0  # 0: world_size

    def __post_init__(self) -> None:
        self.batch_size = check_integer("batch_size", self.batch_size, 1)
        if isinstance(self.shuffle, np.bool_):
            self.shuffle = bool(self.shuffle)
        if not isinstance(self.shuffle, bool) and self.shuffle not in SHUFFLES:
            raise ParameterError(f"shuffle must be True, False or one of {SHUFFLES}, got {self.shuffle!r}")
        self.shuffle_block = check_integer("shuffle_block", self.shuffle_block, 1)
        self.drop_last = check_flag("drop_last", self.drop_last)
        self.seed = check_integer("seed", self.seed, 0)  # numpy seeds from non-negative integers only
        self.world_size = check_integer("world_size", self.world_size, 1)
        self.rank = check_integer("rank", self.rank, 0)
        if self.rank >= self.world_size:
            raise ParameterError(
                f"rank must be in [0, world_size), got rank {self.rank} of world_size {self.world_size}"
            )
        self.warm_start_epochs = check_integer("warm_start_epochs", self.warm_start_epochs, 0)
        if self.uneven not in ("pad", "drop"):
            raise ParameterError(f"uneven must be 'pad' or 'drop', got {self.uneven!r}")
        self.spans = self.spans or self.world_size
        # a loaded place not started yet (the batch it resumes at, the order's samples it skips,
        # the spans its order is cut in), and whether the epoch last started was left (a break):
        # the next iteration starts afresh
        self._resume_at = self._resume_skip = 0
        self._resume_spans = self.spans
        self._left = False

    def warming(self, epoch: int) -> bool:
        """Whether epoch `epoch` visits every sample (a full-data warm start) rather than the selection."""
        return epoch < self.warm_start_epochs

    def positions(self, epoch: int, shards: np.ndarray) -> np.ndarray:
        """This rank's positions of an epoch of samples in `shards` (each one's), in the order it
        visits them: of the epoch's order past the samples `skipped` (in the loader's epoch only)."""
        resumed = epoch == self.epoch and not self._left
        order = epoch_order(
            shards,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            block=self.shuffle_block,
            spans=self.spans if resumed else self.world_size,
        )
        return rank_share(order[self._skip(epoch) :], rank=self.rank, world_size=self.world_size, uneven=self.uneven)

    def num_batches(self, epoch: int, size: int) -> int:
        """Batches of this rank's share of epoch `epoch`, of `size` samples."""
        return self._batches(max(0, size - self._skip(epoch)), self.world_size)

    def resumes_at(self, epoch: int) -> int:
        """The batch epoch `epoch` starts at when it is next iterated: a loaded place's, else 0."""
        return self._resume_at if epoch == self.epoch else 0

    def resuming(self, epoch: int) -> bool:
        """Whether the next iteration of epoch `epoch` goes on from a loaded place (a batch in, or
        past samples other ranks' states delivered)."""
        return epoch == self.epoch and bool(self._resume_at or self._resume_skip)

    def batches(
        self, epoch: int, shards: np.ndarray, first: int = 0, *, positions: np.ndarray | None = None
    ) -> list[np.ndarray]:
        """The positions of each batch of epoch `epoch` (its samples in `shards`) from batch `first`
        on; `positions`: this rank's of the epoch (`positions`), where they are at hand."""
        positions = self.positions(epoch, shards) if positions is None else positions
        b = self.batch_size
        return [positions[i * b : (i + 1) * b] for i in range(first, self.num_batches(epoch, len(shards)))]

    def set_epoch(self, epoch: int) -> None:
        """Go to epoch `epoch`: the place a state was loaded at is kept in its own epoch only."""
        epoch = check_integer("epoch", epoch, 0)
        if epoch != self.epoch:
            self.forget_place()
        self.epoch = epoch

    def forget_place(self) -> None:
        """The next epoch starts at its first batch, whatever state was loaded (and a state taken
        before it starts says so: the loaded place's batches are not the next epoch's)."""
        self._resume_at = self._resume_skip = self.skipped = self.batches_done = 0
        self.spans = self._resume_spans = self.world_size
        self._left = False

    def start(self) -> int:
        """An epoch starts: the batch it starts at (a loaded place, once; else 0)."""
        self.batches_done, self._resume_at = self._resume_at, 0
        self.skipped, self._resume_skip, self._left = self._resume_skip, 0, False
        self.spans, self._resume_spans = self._resume_spans, self.world_size
        return self.batches_done

    def left(self) -> None:
        """The epoch being iterated was left before its end (a break): its place stays what a state
        saves, and the next iteration starts it afresh, from its first sample."""
        self._left = True

    def finish(self) -> None:
        """The epoch being iterated delivered its last batch."""
        self.epochs_completed += 1
        self.epoch += 1
        self.batches_done = self.skipped = 0
        self.spans = self.world_size

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*ORDER, *SHARE, *PLACE)}

    def check(self, state: Any, epoch_size: Callable[[int], int]) -> None:
        """Refuse, by a DatasetError naming the key, a state that is not an order's place (a key
        missing, not an integer >= 0), was taken with other batches, or names more batches of its
        epoch than there are (`epoch_size(epoch)`: the samples that epoch visits). What passes,
        `load_state_dict` takes without fail."""
        where = "state_dict's order"
        if not isinstance(state, Mapping):
            raise DatasetError(f"{where} must be a mapping, got {reprlib.repr(state)}")
        for name in ORDER:
            if name in ADDED and name not in state:  # taken before it existed
                continue
            if name == "shuffle_block" and _shuffle_named(self.shuffle) != "shards":  # no block cuts this order
                continue
            ours, theirs = getattr(self, name), state_entry(state, name, where)
            if name == "shuffle" and isinstance(theirs, bool | str):  # True is "global": the same order
                ours, theirs = _shuffle_named(ours), _shuffle_named(theirs)
            # True == 1 to Python, but not as a batch_size; an array compares element by element
            if not np.isscalar(theirs) or isinstance(theirs, bool) != isinstance(ours, bool) or theirs != ours:
                raise DatasetError(f"state_dict was taken with {name}={theirs!r}; this loader has {ours!r}")
        rank, world_size = (state_count(state, name, where) for name in SHARE)
        if not rank < world_size:
            raise DatasetError(f"{where} names rank {rank} of world_size {world_size}")
        epoch, done, _, skipped, spans = (state_count({**ADDED, **state}, name, where) for name in PLACE)
        if not spans:
            raise DatasetError(f"{where}['spans'] must be an integer >= 1, got 0")
        if skipped and skipped >= epoch_size(epoch):  # no state skips a whole epoch: it ended
            raise DatasetError(f"{where} skips {skipped} samples of an epoch of {epoch_size(epoch)}")
        batches = self._batches(max(0, epoch_size(epoch) - skipped), world_size)
        if done > batches:
            raise DatasetError(f"state_dict says {done!r} batches of {batches} were delivered")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take a checked state's place: the next epoch that starts resumes there, at the batch
        after the last delivered. A state of another world size (every rank of it as far as this
        one, as under DistributedDataParallel) resumes at the first sample of the epoch's order
        none of its ranks had: the rest is shared among this world's ranks, each sample once (from
        the order that state's ranks followed: `spans`); a state where none of its epoch was done
        (taken at an epoch's end) starts it as this world's own."""
        self.epoch, done, self.epochs_completed, skipped, self.spans = (int({**ADDED, **state}[name]) for name in PLACE)
        if state["world_size"] == self.world_size:
            self.batches_done, self.skipped = done, skipped
        else:  # the ranks' first `done` batches are the order's first done * batch * world_size positions
            self.batches_done, self.skipped = 0, skipped + done * self.batch_size * int(state["world_size"])
        if not (self.batches_done or self.skipped):  # none of the epoch done (a state at an epoch's end): ours
            self.spans = self.world_size
        self._resume_at, self._resume_skip, self._resume_spans = self.batches_done, self.skipped, self.spans
        self._left = False

    def _skip(self, epoch: int) -> int:
        return self.skipped if epoch == self.epoch and not self._left else 0

    def _batches(self, size: int, world_size: int) -> int:
        n = share_size(size, world_size, self.uneven)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def _shuffle_named(shuffle: Shuffle | str) -> str | bool:
    """A shuffle by its name: True is "global" (the same order), False stays False."""
    return "global" if shuffle is True else shuffle
