"""`Mixture`: batches of several StreamingLoaders (several datasets, each with its own selection
rounds) in one seeded order, each loader's share of an epoch set by its proportion."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from loaders.order import state_count, state_entry
from loaders.streaming_loader import StreamingLoader
from nearstore.checks import check_integer, is_integer
from nearstore.errors import DatasetError, ParameterError

STATE_VERSION = 1


def shares(proportions: np.ndarray, total: int) -> np.ndarray:
    """`total` batches split in `proportions` (summing to 1) by largest remainders: exact totals."""
    exact = proportions * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(counts - exact, kind="stable")[:short]] += 1  # the largest remainders first
    return counts


class Mixture:
    """Batches of `loaders` interleaved, as mosaicml/streaming's `Stream(proportion=...)` mixes
    streams, but by whole batches (so datasets of different sample shapes mix).

        mixture = Mixture([StreamingLoader(web, web_selection), StreamingLoader(books, None)], [0.7, 0.3])
        for epoch in range(10):
            for x, y in mixture:
                ...

    proportions: each loader's share of an epoch's batches (any positive numbers, normalized);
        default: their sizes, so an epoch is one epoch of each. A loader asked for more batches
        than its epoch holds goes on into its next epoch (upsampled), one asked for fewer
        continues its epoch in the mixture's next (downsampled): every loader still visits
        each of its samples once an epoch of its own.
    batches_per_epoch: the mixture's epoch (default: the loaders' batches together).
    seed: the order of each epoch's batches, a function of (seed, epoch).

    Each loader keeps its own selection rounds (`reselect`), cache and I/O figures; a mixture's
    `state_dict` holds every loader's, so a resumed mixture delivers exactly the batches not yet
    delivered, in the same order.
    """

    def __init__(
        self,
        loaders: Sequence[StreamingLoader],
        proportions: Sequence[float] | None = None,
        *,
        batches_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        self.loaders = list(loaders)
        if not self.loaders or not all(isinstance(loader, StreamingLoader) for loader in self.loaders):
            raise ParameterError("loaders must be one or more StreamingLoaders")
        if len({id(loader) for loader in self.loaders}) < len(self.loaders):  # one place, two schedules
            raise ParameterError("a loader is given twice: give each its own StreamingLoader (proportions weigh them)")
        first = self.loaders[0].batch_roles
        for k, loader in enumerate(self.loaders[1:], 1):
            if loader.batch_roles != first:  # else `for x, y, w in mixture` fails at a random step
                raise ParameterError(
                    f"loader {k} ({loader.url!r}) yields batches of ({', '.join(loader.batch_roles)}), loader 0 "
                    f"({self.loaders[0].url!r}) of ({', '.join(first)}): a mixture's batches must be alike "
                    "(the same weights=, views=, paired_arrays= and labels)"
                )
        if proportions is not None:
            sequence = isinstance(proportions, Sequence | np.ndarray) and not isinstance(proportions, str)
            given = list(proportions) if sequence else []
            if len(given) != len(self.loaders) or not all(map(_positive_number, given)):
                raise ParameterError(
                    f"proportions must be {len(self.loaders)} positive numbers, one a loader, got {proportions!r}"
                )
            weights = np.array(given, dtype=np.float64)
            weights /= weights.max()  # first: a sum past float's range made every proportion 0
            proportions = tuple(float(w) for w in weights / weights.sum())
        self.proportions = proportions
        self.batches_per_epoch = (
            None if batches_per_epoch is None else check_integer("batches_per_epoch", batches_per_epoch, 1)
        )
        self.seed = check_integer("seed", seed, 0)
        self.epoch = self.batches_done = 0
        self._resume_at = 0
        self._counts: list[int] | None = None  # the epoch being iterated: each loader's batches
        self._resumed_counts: list[int] | None = None
        self._running: list[Iterator | None] = [None] * len(self.loaders)

    @property
    def epoch_batches(self) -> int:
        """Batches of an epoch, all of them (those a loaded state already delivered too)."""
        return self.batches_per_epoch or sum(loader.epoch_batches for loader in self.loaders)

    def __len__(self) -> int:
        """Batches the next iteration yields: an epoch's, less those a loaded state already
        delivered (of its epoch as it was scheduled: a loader's round may differ since)."""
        scheduled = self._resumed_counts if self._resume_at else None
        return (self.epoch_batches if scheduled is None else sum(scheduled)) - self._resume_at

    def schedule(self, epoch: int, counts: Sequence[int] | None = None) -> np.ndarray:
        """Which loader gives each batch of epoch `epoch`, in order: `counts` of each (default
        from the loaders' lengths now), shuffled by (seed, epoch)."""
        if counts is None:
            sizes = np.array([loader.epoch_batches for loader in self.loaders], dtype=np.float64)
            if not sizes.all():
                empty = int(np.argmin(sizes))
                raise ParameterError(f"loader {empty} ({self.loaders[empty].url!r}) has no batch to give")
            weights = np.asarray(self.proportions) if self.proportions is not None else sizes / sizes.sum()
            counts = shares(weights, self.epoch_batches)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(np.repeat(np.arange(len(self.loaders)), np.asarray(counts, dtype=np.int64)))

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows; the loaders go on where they are."""
        epoch = check_integer("epoch", epoch, 0)
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # a resumed epoch keeps the counts it was scheduled with (a loader's round may differ since)
        order = self.schedule(self.epoch, self._resumed_counts if self._resume_at else None)
        self._counts = np.bincount(order, minlength=len(self.loaders)).tolist()
        self.batches_done, self._resume_at, self._resumed_counts = self._resume_at, 0, None
        for k in order[self.batches_done :].tolist():
            batch = self._next(k)
            self.batches_done += 1
            yield batch
        self.epoch += 1
        self.batches_done = 0
        for k, loader in enumerate(self.loaders):  # a loader that gave its whole epoch ends it now
            if self._running[k] is not None and loader.batches_done >= loader.epoch_batches:
                next(self._running[k], None)  # its end: a round selected meanwhile is taken
                self._running[k] = None

    def _next(self, k: int) -> tuple[torch.Tensor, ...]:
        """Loader k's next batch, into its next epoch where this one is done."""
        for _ in range(2):  # a fresh pass yields at least one batch (its size was checked)
            if self._running[k] is None:
                self._running[k] = iter(self.loaders[k])
            try:
                return next(self._running[k])
            except StopIteration:
                self._running[k] = None
        raise ParameterError(f"loader {k} ({self.loaders[k].url!r}) gave no batch in a fresh epoch")

    def state_dict(self) -> dict[str, Any]:
        """The mixture's place (epoch, batches delivered) and every loader's `state_dict`."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_done": self._resume_at or self.batches_done,  # loaded, not iterated yet: that place
            "counts": self._resumed_counts if self._resume_at else self._counts if self.batches_done else None,
            "seed": self.seed,
            "proportions": self.proportions,
            "batches_per_epoch": self.batches_per_epoch,
            "loaders": [loader.state_dict() for loader in self.loaders],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume where `state_dict()` was taken. A state of another mixture (seed, proportions,
        epoch length or number of loaders) or one a loader refuses is refused by name, and then
        changes nothing."""
        if not isinstance(state, Mapping):
            raise DatasetError(
                f"Mixture state_dict must be a mapping (what state_dict() returns), got {type(state).__name__}"
            )
        if state.get("version") != STATE_VERSION:
            raise DatasetError(f"Mixture state_dict version {state.get('version')!r} is not {STATE_VERSION}")
        epoch, batches_done = (state_count(state, key, "Mixture state_dict") for key in ("epoch", "batches_done"))
        proportions = state.get("proportions")
        proportions = None if proportions is None else tuple(proportions)
        for name, value, ours in (
            ("seed", state.get("seed"), self.seed),
            ("proportions", proportions, self.proportions),
            ("batches_per_epoch", state.get("batches_per_epoch"), self.batches_per_epoch),
        ):
            if value != ours:
                raise DatasetError(f"Mixture state_dict was taken with {name}={value!r}; this mixture has {ours!r}")
        states = state_entry(state, "loaders", "Mixture state_dict", Sequence)
        if len(states) != len(self.loaders):
            raise DatasetError(
                f"Mixture state_dict holds {len(states)} loaders' states; this mixture has {len(self.loaders)}"
            )
        # every part checked before any is loaded: a refused state changes nothing
        loads = [loader._checked_state(loader_state) for loader, loader_state in zip(self.loaders, states)]
        counts = state.get("counts")  # states written before it hold none: counted afresh
        if counts is not None and (
            not isinstance(counts, Sequence)
            or len(counts) != len(self.loaders)
            or not all(is_integer(c) and c >= 0 for c in counts)
            or not sum(counts)
            or (self.batches_per_epoch is not None and sum(counts) != self.batches_per_epoch)
        ):
            length = f", {self.batches_per_epoch} in all" if self.batches_per_epoch is not None else ""
            raise DatasetError(
                f"Mixture state_dict's counts must be {len(self.loaders)} integers >= 0 (each loader's batches of "
                f"the epoch{length}), got {counts!r}"
            )
        scheduled = sum(counts) if counts is not None else self.epoch_batches
        if batches_done > scheduled:  # len() went negative, the schedule's repeats too
            raise DatasetError(f"Mixture state_dict says {batches_done} batches of {scheduled} were delivered")
        for load in loads:
            load()
        self.epoch, self._resume_at, self.batches_done = epoch, batches_done, 0
        self._resumed_counts = None if counts is None else [int(c) for c in counts]
        self._running = [None] * len(self.loaders)

    def io_stats(self) -> list[dict[str, Any]]:
        """Each loader's `io_stats()`, in order."""
        return [loader.io_stats() for loader in self.loaders]

    def close(self) -> None:
        """Close every loader (`StreamingLoader.close`): the mixture iterates no more."""
        for loader in self.loaders:
            loader.close()

    def __enter__(self) -> Mixture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _positive_number(value: Any) -> bool:
    """A finite number > 0, not a bool nor a string (numpy would read True and '1' as 1)."""
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool | np.bool_)
        and math.isfinite(value)
        and value > 0
    )
