"""`Selector`: a selection method with its parameters, checked when it is made, and one call that
runs it beside the data and returns a `Selection`."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from nearstore.checks import check_range
from nearstore.errors import ParameterError
from nearstore.selection.executors import Executor, check_executor
from nearstore.selection.plan import check_keep, check_seed
from nearstore.selection.proxies import Proxy
from nearstore.selection.record import Selection
from nearstore.selection.stages import never
from nearstore.selection.windows import Pick, Window, windowed_select
from nearstore.storage import Dataset, open_dataset

# A window's Gram matrix (GRAFT) or similarity matrix (CRAIG, CREST's coresets) is w² floats, and
# GRAFT decides windows in batches of `gram_entries` of them: at most 2^26 entries (256 MiB in
# float32; 16x GRAFT's default batch, 64x a CRAIG window of 1,024), so a window holds at most 8,192.
MAX_GRAM_ENTRIES = 1 << 26
MAX_WINDOW = 1 << 13


@dataclass(frozen=True)
class SelectCall:
    """One `Selector.select` call's keywords (documented there), the executor defaulted: what a
    method's `run` is given beside the dataset and the budget."""

    proxy: Proxy | None
    seed: int
    device: torch.device | str
    progress: bool
    previous: np.ndarray | None
    carried: Mapping[str, np.ndarray] | None
    executor: Executor
    cancelled: Callable[[], bool]

    def params(self, keep: float, proxy: Proxy, options: Mapping[str, Any]) -> dict[str, Any]:
        """What a Selection records of how it was made: the budget, the seed, the proxy's kind,
        the method's `options`, and where the scan ran (when not in this process)."""
        return {"keep": keep, "seed": self.seed, "proxy": type(proxy).__name__, **options, **self.executor.recorded()}

    def io(self, io: dict[str, Any], *worker_reads: Mapping[str, int]) -> dict[str, Any]:
        """`io` (`stages.scan_io` of the scan's own readers) with what the passes' readers on the
        workers read; in process the scan's own reader did that reading, counted already."""
        if self.executor.name != "local":
            io.update({k: io[k] + sum(reads[k] for reads in worker_reads) for k in ("bytes", "requests")})
        return io


class Selector(ABC):
    """A selection method with its parameters (a frozen dataclass, options checked on
    construction); `select` runs it over a dataset."""

    method: ClassVar[str]
    # Whether the method judges labels: the samples whose label its proxy contradicts with
    # confidence (confident learning) are kept out of its picks and reported (Selection.suspects).
    mute_suspects: ClassVar[bool] = False

    def select(
        self,
        dataset: Dataset | str,
        keep: float,
        *,
        proxy: Proxy | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: bool = False,
        previous: np.ndarray | None = None,
        carried: Mapping[str, np.ndarray] | None = None,
        executor: Executor | None = None,
        cancelled: Callable[[], bool] = never,
    ) -> Selection:
        """Select about round(keep · N) samples of `dataset` (a Dataset, or a URL `open_dataset` opens).

        proxy: what embeds samples (the trainer's model as a `ModelProxy`, for re-selection);
            default a RandomFeatureProxy fitted on warm-up shards.
        previous: the ids of the round this one replaces, if any. GRAFT on a pool puts them in
            its pool (`pool_previous`); the other selectors do not use them.
        carried: what the round this one replaces handed on (its `Selection.carry`): AdaCore's
            running average of the curvature; the other selectors keep nothing across rounds.
        executor: where a scan over every shard runs (`nearstore.selection.executors`): in this
            process by default, or on a Dask cluster (every selector but random, which reads
            only the labels).
        cancelled: whether nobody waits for the round any more (a server's select whose caller
            has gone), asked between shards and between windows' decisions: then RoundCancelled
            is raised, nothing returned.
        """
        if isinstance(dataset, str):
            dataset = open_dataset(dataset)
        elif not isinstance(dataset, Dataset):
            raise ParameterError(f"dataset must be a Dataset or a URL, got {type(dataset).__name__}")
        check_keep(keep)
        check_seed(seed)
        # numpy's scalars pass the checks; as Python's, torch's generators and JSON take them too
        call = SelectCall(proxy, int(seed), device, progress, previous, carried, check_executor(executor), cancelled)
        return self.run(dataset, float(keep), call)

    @abstractmethod
    def run(self, dataset: Dataset, keep: float, call: SelectCall) -> Selection:
        """What `select` does, its keywords gathered in `call`."""

    def params(self) -> dict[str, Any]:
        return asdict(self)


class WindowedSelector(Selector):
    """A method that keeps, per window of one class's samples, what `pick` chooses of it (GRAFT,
    CRAIG); `select` is `windowed_select`."""

    # Whether `pick` takes the gradients' two factors (r, x) rather than g = r ⊗ x.
    factored: ClassVar[bool] = False
    # Whether a window scored by a proxy that knows nothing of the labels keeps a random draw.
    draw_uninformed: ClassVar[bool] = False
    # With the model-free proxy, classes whose budget is under this many samples keep a draw (0: none).
    draw_below: ClassVar[int] = 0
    # Round 0: whether the selector picks among each class's typical half (None: where trusted).
    typical: ClassVar[bool | None] = False
    # Later rounds: whether round 0's suspects, handed on in the carry, are muted where confirmed.
    recheck_suspects: ClassVar[bool] = False

    def run(self, dataset: Dataset, keep: float, call: SelectCall) -> Selection:
        return windowed_select(
            self.resumed(call.carried, call.proxy),
            dataset,
            keep,
            proxy=call.proxy,
            seed=call.seed,
            device=call.device,
            progress=call.progress,
            executor=call.executor,
            cancelled=call.cancelled,
            carried=call.carried,
            **self.scan_options(call.previous),
        )

    def scan_options(self, previous: np.ndarray | None) -> dict[str, Any]:
        """windowed_select's options beyond every selector's (pool, budgets, ...), given the
        round this one replaces."""
        return {}

    def resumed(self, carried: Mapping[str, np.ndarray] | None, proxy: Proxy | None) -> WindowedSelector:
        """This selector going on from what the round before handed on (`carry`), scored by
        `proxy` (None: the model-free one); itself for a method that keeps nothing across rounds."""
        return self

    def tally(self, parts: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        """What the method sums over the streamed samples of a round (`parts` as `pick` takes
        them, a batch at a time): added across batches and partitions, handed to `carry`."""
        return {}

    def carry(self, totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What this round hands the next one (`Selection.carry`), from its `tally` totals."""
        return {}

    @abstractmethod
    def pick(self, windows: list[Window]) -> list[Pick]:
        """What each window keeps: (rows of the window, their weights, their scores)."""

    @abstractmethod
    def window_for(self, keep: float) -> int:
        """Samples a window holds at `keep`."""

    def at_once(self, window: int) -> int:
        """Windows decided together (one `pick` call)."""
        return 1


def check_window(window: int | None, name: str = "window", *, optional: bool = False) -> None:
    """A window holds at least two samples, and at most MAX_WINDOW (None, where `optional`: the
    method's default)."""
    if window is not None or not optional:
        check_range(name, window, 2, MAX_WINDOW, integer=True)


def check_pool(pool: float | None, *, optional: bool = True) -> None:
    """A pool is a finite multiple of the budget, at least 1 (None, where `optional`: no pool)."""
    if pool is not None or not optional:
        check_range("pool", pool, 1, math.inf, open_high=True)
