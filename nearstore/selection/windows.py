"""Windowed selection (GRAFT, CRAIG; CREST's coresets): each class's samples, in id order, cut
into windows (`plan.window_bounds`), each window keeping its share of the class's budget
(`plan.share`) by a method's rule. Memory is one unfinished window per class and a batch of
windows to decide, whatever the number of samples: a window of the gradients' two factors for the
methods that take them (C + H + 1 floats a sample, A · (C + H + 1) for AugmentAware's A draws;
CRAIG's medoids come from the factors' Gram matrix: no C · (H + 1) gradient is formed)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from kernels import ConfidentJoint, facility_location, facility_location_of_factors
from nearstore.errors import DatasetError
from nearstore.selection.executors import Executor, LocalExecutor
from nearstore.selection.plan import (
    check_keep,
    check_seed,
    class_budgets,
    class_pools,
    class_sizes,
    share,
    window_bounds,
)
from nearstore.selection.policy import TRUSTED_PROXY
from nearstore.selection.proxies import Proxy
from nearstore.selection.record import Selection, Suspects
from nearstore.selection.stages import (
    MAX_CLASSES,
    Embedded,
    Scan,
    SuspectsFound,
    informative_top,
    informed,
    log,
    mute_suspects,
    never,
    scan_io,
    stop_if_cancelled,
    suspects_of,
    unseen_classes,
)
from nearstore.storage import DEFAULT_READS, Coalescing, Dataset, read_labels

# A window to decide: its samples' embeddings (or their two factors), and how many to keep.
Window = tuple[tuple[torch.Tensor, ...], int]
# A window's choice: rows of the window, their weights and scores.
Pick = tuple[np.ndarray, np.ndarray, np.ndarray]
Picker = Callable[[list[Window]], list[Pick]]
# Shards are embedded together up to this many samples: fewer, larger proxy calls; and, for whole
# gradients (C · (d + 1) floats a sample: 1 GB a 1,024-sample shard at 1,000 classes), this many bytes.
EMBED_BATCH_SAMPLES = 8192
EMBED_BATCH_BYTES = 1 << 28


class ClassWindows:
    """Cuts each class's stream of samples into windows of `window` (`window_bounds`: the last one
    1 to `window` long, so a full window waits for the class's next sample), and gives each its
    budget: the class keeps rate(class) = (total, of), `total` of every `of` of its samples, in
    `share`s of the running totals; a class whose budget rounds to zero keeps one sample."""

    def __init__(
        self,
        window: int,
        rate: Callable[[int], tuple[float, int]],
        seen: dict[int, int] | None = None,
        sizes: dict[int, int] | None = None,
    ) -> None:
        """seen: each class's samples before these (a later partition of the shards starts there);
        sizes: each class's samples in all (None: these are all): the one sample a class too small
        for its budget keeps is its last, in the partition that holds it (each partition kept one)."""
        self.window, self.rate, self.sizes = window, rate, sizes
        self._pending: dict[int, tuple[np.ndarray, tuple[torch.Tensor, ...]]] = {}
        self._seen: dict[int, int] = dict(seen or {})

    def add(self, group: int, ids: np.ndarray, parts: tuple[torch.Tensor, ...]) -> Iterator[tuple[np.ndarray, Window]]:
        """The class's windows that these samples complete: (ids, (parts, budget)) each."""
        if group in self._pending:  # one copy per class and batch; the windows below are views
            before_ids, before_parts = self._pending[group]
            ids = np.concatenate([before_ids, ids])
            parts = tuple(torch.cat(pair) for pair in zip(before_parts, parts))
        end = (len(ids) - 1) // self.window * self.window
        for start in range(0, end, self.window):
            stop = start + self.window
            yield self._cut(group, ids[start:stop], tuple(p[start:stop] for p in parts), last=False)
        if end:  # copied: a view would hold the batch its windows were cut from until the class goes on
            ids, parts = ids[end:].copy(), tuple(p[end:].clone() for p in parts)
        self._pending[group] = ids, parts

    def finish(self) -> Iterator[tuple[int, np.ndarray, Window]]:
        """Each class's last window: (class, ids, (parts, budget)) each."""
        for group, (ids, parts) in self._pending.items():
            yield group, *self._cut(group, ids, parts, last=True)
        self._pending.clear()

    def _cut(
        self, group: int, ids: np.ndarray, parts: tuple[torch.Tensor, ...], last: bool
    ) -> tuple[np.ndarray, Window]:
        before = self._seen.get(group, 0)
        end = before + len(ids)
        total, of = self.rate(group)
        k = share(total, of, before, end)
        size = self.sizes.get(group) if self.sizes is not None else end if last else None
        if last and end == size and not share(total, of, 0, end):
            k = 1  # a class too small for its budget keeps one sample rather than vanish
        self._seen[group] = end
        return ids, (parts, k)


class Windowed(Protocol):
    """What `windowed_select` needs of a method (`selectors.base.WindowedSelector` has it)."""

    method: str
    factored: bool  # whether `pick` takes the gradients' two factors (r, x) rather than g = r ⊗ x (or A pairs)
    mute_suspects: bool  # whether samples with suspected label errors get zero gradients (factored)
    draw_uninformed: bool  # whether a proxy that knows nothing of the labels gets a draw, not a pick (factored)
    draw_below: int  # with the model-free proxy, classes whose budget is under this many get a draw (factored)
    typical: bool | None  # round 0: MaxVol among each class's typical half (`typical_floors`; factored)
    recheck_suspects: bool  # later rounds: round 0's suspects muted where the proxy confirms them (factored)

    def params(self) -> dict[str, Any]: ...

    def pick(self, windows: list[Window]) -> list[Pick]: ...

    def carry(self, totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def window_for(self, keep: float) -> int: ...

    def at_once(self, window: int) -> int: ...


def unscored(ids: np.ndarray) -> Pick:
    """Kept samples that no pick scored: weight 1, score NaN."""
    return ids, np.ones(len(ids), dtype=np.float32), np.full(len(ids), np.nan, dtype=np.float32)


class Decisions:
    """Windows waiting for a method's pick, and what the decided ones keep. Where `draw(class)` says
    so (the proxy knows nothing of the labels, or the class's budget is small), a window keeps a
    seeded random draw instead: its samples with a gradient (in any draw, for AugmentAware's
    factors) first, muted ones (zero gradients) only where those run out."""

    def __init__(
        self,
        pick: Picker,
        draw: Callable[[int], bool] = lambda group: False,
        seed: int = 0,
        suspected: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.pick, self.draw, self.seed = pick, draw, seed
        # which of a window's ids are suspects (muted as a typical floor mutes samples, but last to fill)
        self.suspected = suspected or (lambda ids: np.zeros(len(ids), dtype=bool))
        self.waiting: list[tuple[np.ndarray, Window]] = []
        self.kept: list[Pick] = []  # (ids, weights, scores) of each decided window
        self.drawn = 0  # windows decided by a draw

    def add(self, group: int, ids: np.ndarray, window: Window) -> None:
        """A window of class `group` with its budget: kept whole where the budget holds it, drawn
        from where `draw(group)` says so, else left to `pick`."""
        parts, k = window
        if k >= len(ids):  # nothing to decide
            self.kept.append(unscored(ids))
        elif k and self.draw(group):
            rng = np.random.default_rng([self.seed, int(ids[0])])  # a window is known by its first id
            live, suspect = _live(parts), self.suspected(ids)
            tiers = (live, ~live & ~suspect, ~live & suspect)  # suspects only where nothing else is left
            order = np.concatenate([rng.permutation(np.flatnonzero(tier)) for tier in tiers])
            self.kept.append(unscored(ids[np.sort(order[:k])]))
            self.drawn += 1
        elif k:
            self.waiting.append((ids, window))

    def decide(self) -> None:
        """Pick from every waiting window in one call."""
        if self.waiting:
            for (ids, (parts, _)), (rows, weights, scores) in zip(
                self.waiting, self.pick([w for _, w in self.waiting])
            ):
                self.kept.append((ids[_suspects_last(rows, self.suspected(ids), _live(parts))], weights, scores))
            self.waiting.clear()


def _live(parts: tuple[torch.Tensor, ...]) -> np.ndarray:
    """Which rows of a window have a gradient (its first factor: residuals (n, C), or (n, A, C) of
    A draws, or whole embeddings): the others were muted."""
    return (parts[0] != 0).flatten(1).any(1).cpu().numpy()


def _suspects_last(rows: np.ndarray, suspect: np.ndarray, live: np.ndarray) -> np.ndarray:
    """A pick's `rows` of a window, each suspect among them given way to the window's next row not
    picked that is none, live before muted. A pick takes a suspect (muted) only where it fills past
    what it could span, where any muted row would do: it took them in id order, and round 0's
    typical floors mute half a class, so from keep 0.5 on suspects filled beside unsuspected rows."""
    at = np.flatnonzero(suspect[rows])
    if not len(at):
        return rows
    spare = np.setdiff1d(np.arange(len(suspect)), rows)
    spare = spare[~suspect[spare]]
    spare = np.concatenate([spare[live[spare]], spare[~live[spare]]])[: len(at)]
    rows = rows.copy()
    rows[at[: len(spare)]] = spare  # a substitute takes the suspect's weight and score
    return rows


@dataclass
class WindowedPart:
    """What windowed selection kept over some of the shards: each decided window's (ids, weights,
    scores), the suspects found, the windows drawn, the proxy's summed top-class probability over
    the samples streamed, the selector's tallies of them (`tally`), and what readers of the pass's
    own read (a pool's: the scan's reader is counted by the executor). Parts over disjoint shards
    merge by concatenation, and by adding their tallies."""

    kept: list[Pick]
    suspects: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    drawn: int
    top: float
    streamed: int
    totals: dict[str, np.ndarray] = field(default_factory=dict)
    confirmed: int = 0  # of the suspects, earlier ones the proxy confirmed
    reads: dict[str, int] = field(default_factory=lambda: {"bytes": 0, "requests": 0})

    @staticmethod
    def merge(a: WindowedPart, b: WindowedPart) -> WindowedPart:
        return WindowedPart(
            a.kept + b.kept,
            a.suspects + b.suspects,
            a.drawn + b.drawn,
            a.top + b.top,
            a.streamed + b.streamed,
            added(a.totals, b.totals),
            a.confirmed + b.confirmed,
            {k: a.reads[k] + b.reads[k] for k in a.reads},
        )

    @property
    def mean_top(self) -> float:
        return self.top / self.streamed if self.streamed else 0.0

    def selection(self, dataset: Dataset, method: str, params: dict[str, Any], io: dict, **extra: Any) -> Selection:
        """The Selection of what the decided windows kept (their ids, weights and scores)."""
        kept = self.kept
        return Selection.of(
            dataset,
            np.concatenate([k[0] for k in kept]) if kept else np.zeros(0, dtype=np.int64),
            weights=np.concatenate([k[1] for k in kept]) if kept else None,
            scores=np.concatenate([k[2] for k in kept]) if kept else None,
            method=method,
            params=params,
            io=io,
            **extra,
        )


def decide(
    stream: Iterable[Embedded],
    windows: ClassWindows,
    selector: Windowed,
    num_classes: int,
    seed: int,
    drawn_classes: frozenset[int] = frozenset(),
    cancelled: Callable[[], bool] = never,
    typical: np.ndarray | None = None,
    earlier: Suspects | None = None,
    unseen: np.ndarray | None = None,
    prior: ConfidentJoint | None = None,
) -> WindowedPart:
    """Cut the stream's samples into windows per class and decide each: kept whole, drawn while the
    proxy knows nothing of the labels or for the classes in `drawn_classes`, or picked by the
    selector, `at_once` windows together; `cancelled` asked before each decision (`stop_if_cancelled`);
    `typical`: floors of p(label | x) under which a sample is muted (`typical_floors`); `earlier`:
    suspects muted where the proxy confirms them (`stages.confirmed`); `unseen`: classes the proxy
    never saw, none of whose samples is a suspect (`stages.unseen_classes`); `prior`: where the
    thresholds of suspects start (`stages.mute_suspects`)."""
    found = SuspectsFound() if selector.mute_suspects or selector.draw_uninformed or typical is not None else None
    uninformed = lambda: False  # noqa: E731
    if found is not None:
        stream = mute_suspects(stream, num_classes, found, selector.mute_suspects, typical, earlier, unseen, prior)
        if selector.draw_uninformed:
            uninformed = lambda: not found.informed(num_classes)  # noqa: E731
    draw = lambda group: group in drawn_classes or uninformed()  # noqa: E731
    suspected = found.among if found is not None else None
    decisions, at_once = Decisions(selector.pick, draw, seed, suspected), selector.at_once(windows.window)
    # what the selector sums over the round's samples for the next round (a method keeping nothing has no tally)
    tally, totals = getattr(selector, "tally", lambda parts: {}), {}
    for ids, groups, embeddings in stream:
        parts = embeddings if selector.factored else (embeddings,)
        totals = added(totals, tally(parts))
        for group, rows in groups.items():
            for cut in windows.add(group, ids[rows], tuple(p[rows] for p in parts)):
                decisions.add(group, *cut)
                if len(decisions.waiting) >= at_once:
                    stop_if_cancelled(cancelled, f"{selector.method}'s windows of class {group} were decided")
                    decisions.decide()
    for cut in windows.finish():
        decisions.add(*cut)
    stop_if_cancelled(cancelled, f"{selector.method}'s last windows were decided")
    decisions.decide()
    if found is None:
        return WindowedPart(decisions.kept, [], decisions.drawn, 0.0, 0, totals)
    return WindowedPart(
        decisions.kept, found.parts, decisions.drawn, found.top, found.streamed, totals, found.confirmed
    )


def added(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two tallies added, name by name (a name in one only is kept as it is)."""
    return {name: a[name] + b[name] if name in a and name in b else a.get(name, b.get(name)) for name in a | b}


def windowed_pass(
    scan: Scan,
    shards: list[int],
    *,
    selector: Windowed,
    window: int,
    budgets: dict[int, tuple[float, int]] | None,
    keep: float,
    before: np.ndarray | None,
    seed: int,
    progress: bool,
    drawn_classes: frozenset[int] = frozenset(),
    typical: np.ndarray | None = None,
    earlier: Suspects | None = None,
) -> WindowedPart:
    """The pass over `shards` (consecutive) of a scan: every sample embedded, windowed per class and
    decided. A class keeps `budgets[c]` = (total, of) of its samples, or `keep` of them (None);
    before: each class's samples in the shards before shard s, (num_shards + 1, C) (None: from the
    first shard), so that rounded running totals keep the budgets exact across partitions; the
    classes in `drawn_classes` keep a draw, and `typical` and `earlier` mute (`decide`)."""
    stream = scan.embeddings(
        progress,
        f"{selector.method} pass 1/1",
        factored=selector.factored,
        batch_samples=embed_batch(scan, selector.factored),
        shards=shards,
    )
    windows = ClassWindows(
        window, lambda group: budgets[group] if budgets else (keep, 1), seen_before(before, shards), sizes_of(before)
    )
    return _decided(scan, stream, windows, selector, seed, drawn_classes, typical, earlier)


def _decided(
    scan: Scan,
    stream: Iterable[Embedded],
    windows: ClassWindows,
    selector: Windowed,
    seed: int,
    drawn_classes: frozenset[int],
    typical: np.ndarray | None,
    earlier: Suspects | None,
) -> WindowedPart:
    """`decide` over a scan's stream: its proxy's classes, those its warm-up never saw, its cancel."""
    return decide(
        stream,
        windows,
        selector,
        scan.proxy.num_classes,
        seed,
        drawn_classes,
        scan.cancelled,
        typical,
        earlier,
        unseen_classes(scan.proxy),
        getattr(scan.proxy, "warm_joint", None),
    )


def embed_batch(scan: Scan, factored: bool) -> int:
    """Samples a pass embeds together: EMBED_BATCH_SAMPLES, fewer where whole gradients would pass
    EMBED_BATCH_BYTES (the factors are C + d + 1 floats a sample, never that many)."""
    if factored:
        return EMBED_BATCH_SAMPLES
    return max(1, min(EMBED_BATCH_SAMPLES, EMBED_BATCH_BYTES // (4 * scan.proxy.embedding_dim)))


def pooled_pass(
    scan: Scan,
    shards: list[int],
    *,
    selector: Windowed,
    window: int,
    budgets: dict[int, int],
    pools: dict[int, np.ndarray],
    reads: Coalescing,
    seed: int,
    progress: bool,
    drawn_classes: frozenset[int] = frozenset(),
    typical: np.ndarray | None = None,
    earlier: Suspects | None = None,
) -> WindowedPart:
    """The pass over the pooled samples (`pools`: {class: sorted ids}) that lie in `shards`
    (consecutive): read (coalescing as `reads`), embedded, windowed per class and decided; class c
    keeps budgets[c] of its len(pools[c]) pooled samples, its running count starting at its
    pooled samples before these shards; the classes in `drawn_classes` keep a draw, and `typical`
    and `earlier` mute (`decide`)."""
    first, end = shards[0] * scan.reader.dataset.shard_samples, (shards[-1] + 1) * scan.reader.dataset.shard_samples
    bounds = {c: np.searchsorted(members, [first, end]) for c, members in pools.items()}
    mine = {c: members[a:b] for (c, members), (a, b) in zip(pools.items(), bounds.values()) if b > a}
    seen = {c: int(a) for c, (a, _) in bounds.items() if a}
    sizes = {c: len(members) for c, members in pools.items()}
    reader, stream = scan.pooled(mine, progress, "pool", reads, selector.factored)
    windows = ClassWindows(window, lambda group: (budgets[group], len(pools[group])), seen, sizes)
    part = _decided(scan, stream, windows, selector, seed, drawn_classes, typical, earlier)
    read = reader.stats.snapshot()
    part.reads = {"bytes": read.bytes, "requests": read.requests}
    return part


def windowed_select(
    selector: Windowed,
    dataset: Dataset,
    keep: float,
    *,
    proxy: Proxy | None,
    seed: int,
    device: torch.device | str,
    progress: bool,
    pool: float | None = None,
    previous: np.ndarray | None = None,
    pool_reads: Coalescing = DEFAULT_READS,
    budget_power: float = 1.0,
    executor: Executor | None = None,
    cancelled: Callable[[], bool] = never,
    carried: Mapping[str, np.ndarray] | None = None,
) -> Selection:
    """Stream gradient embeddings once; per class, cut them into windows (`ClassWindows`) and keep
    what the selector picks of each, deciding `at_once` windows together. A class keeps
    round(keep · n_c) samples in all (at least one), or with `budget_power` below 1 a budget that
    grows as n_c^budget_power (`plan.class_budgets`: the labels are read first). With `pool`, only a
    pool of pool × its budget per class is read (coalescing as `pool_reads`) and windowed: the
    `previous` ids of the class, the rest drawn at random (`plan.class_pools`).

    executor: where the pass runs (`nearstore.selection.executors`): in this process by default,
    or on a Dask cluster, a task a partition of consecutive shards, each windowing its own shards'
    samples (or pooled samples: a window does not straddle two partitions) with the class budgets
    kept exact by running counts that start where the partition does, each judging labels and the
    proxy on what it streams.

    With the model-free proxy (`proxy` None), the classes whose budget is under
    `selector.draw_below` keep a seeded draw of their samples the proxy does not suspect, not the
    selector's picks (`policy.DRAW_BELOW`).

    With `selector.recheck_suspects`, the model-free proxy's suspects are handed on in the
    selection's carry, and a later round, given them back (`carried`, the round it replaces'),
    mutes those its proxy confirms (`stages.confirmed`) and hands them on again.

    cancelled: whether nobody waits for the round any more (`Scan.open`)."""
    check_keep(keep)
    check_seed(seed)
    started = time.perf_counter()
    executor = executor or LocalExecutor()
    window = selector.window_for(keep)
    small_drawn = proxy is None and selector.draw_below > 0  # needs the class budgets: labels read first
    labels_whole = pool is not None or budget_power != 1 or executor.name != "local" or small_drawn
    scan = Scan.open(dataset, selector.method, proxy, seed, device, keep_labels=labels_whole, cancelled=cancelled)
    readers, worker_reads = [scan.reader], {"bytes": 0, "requests": 0}

    def small_classes(counts: dict[int, int]) -> frozenset[int]:
        return frozenset(c for c, k in counts.items() if k < selector.draw_below) if small_drawn else frozenset()

    sizes: dict[int, int] | None = None  # each class's samples, where the labels are read whole
    if pool is None:
        budgets, before, small = None, None, frozenset()
        if labels_whole:
            labels, labels_reader = read_labels(dataset, "budgets by class size")
            readers.append(labels_reader)
            sizes = class_sizes(labels)
            counts = class_budgets(sizes, keep, budget_power)
            small = small_classes(counts)
            if budget_power != 1:
                budgets = {c: (counts[c], sizes[c]) for c in sizes}
            if executor.name != "local":  # each partition starts its classes' running counts where it starts
                before = class_counts_before_shards(labels, dataset.shard_samples, scan.proxy.num_classes)
        one_pass, arguments = windowed_pass, dict(budgets=budgets, keep=keep, before=before)
    else:
        labels, labels_reader = read_labels(dataset, "a class-balanced pool")
        readers.append(labels_reader)
        sizes = class_sizes(labels)
        budgets, pools = class_pools(
            labels, keep, pool, seed, previous=previous, where=repr(dataset.url), power=budget_power
        )
        small = small_classes(budgets)
        one_pass, arguments = pooled_pass, dict(budgets=budgets, pools=pools, reads=pool_reads)
    typical = typical_floors(selector, scan.proxy, small, sizes) if proxy is None else None
    earlier = carried_suspects(carried, dataset) if selector.recheck_suspects and proxy is not None else None
    if typical is not None:
        log.info(
            "%s: the model-free proxy is right on %.0f%% of its held-out warm-up (balanced): MaxVol picks "
            "among each class's typical half",
            selector.method,
            100 * trust(scan.proxy, sizes),
        )
    part, worker_reads = executor.map_reduce(
        scan,
        one_pass,
        WindowedPart.merge,
        progress=progress,
        selector=selector,
        window=window,
        seed=seed,
        drawn_classes=small,
        typical=typical,
        earlier=earlier,
        **arguments,
    )

    if executor.name == "local":  # the scan's own reader did that reading: scan_io counts it
        worker_reads = {"bytes": 0, "requests": 0}
    if small:
        log.info(
            "%s: %d classes with budgets under %d samples drawn from what the model-free proxy does not suspect",
            selector.method,
            len(small),
            selector.draw_below,
        )
    if part.drawn and not informed(part.mean_top, scan.proxy.num_classes):
        log.info(
            "%s: the proxy knows nothing of the labels (mean top-class probability %.3f, under %.3f): "
            "%d windows drawn at random",
            selector.method,
            part.mean_top,
            informative_top(scan.proxy.num_classes),
            part.drawn,
        )
    io = scan_io(started, readers)
    io.update({k: io[k] + worker_reads[k] + part.reads[k] for k in ("bytes", "requests")})
    suspects = suspects_of(part.suspects) if selector.mute_suspects else None
    carry = selector.carry(part.totals)
    if selector.recheck_suspects and selector.mute_suspects:  # round 0's suspects, or those it was handed
        carry |= suspects_carry(suspects if proxy is None else earlier)
    return part.selection(
        dataset,
        selector.method,
        {
            "keep": keep,
            "seed": seed,
            "proxy": type(scan.proxy).__name__,
            "previous": None if previous is None else len(previous),
            "windows_drawn": part.drawn,
            "classes_drawn": len(small),
            "typical_half": typical is not None,
            **({} if earlier is None else {"suspects_confirmed": part.confirmed}),
            **selector.params(),
            "window": window,
            **executor.recorded(),
        },
        io,
        suspects=suspects,
        carry=carry,
    )


# Where a selection's carry hands on the model-free proxy's suspects: their ids, and the class it named.
SUSPECTS_CARRIED = ("suspects", "suspected_as")


def suspects_carry(suspects: Suspects | None) -> dict[str, np.ndarray]:
    """`suspects` as a selection's carry holds them (none: nothing)."""
    if suspects is None:
        return {}
    return dict(zip(SUSPECTS_CARRIED, (suspects.ids, suspects.labels.astype(np.int32))))


def carried_suspects(carried: Mapping[str, np.ndarray] | None, dataset: Dataset) -> Suspects | None:
    """The suspects a round of `dataset` handed on in its carry (`suspects_carry`); None where it
    handed none. Ids or classes outside the dataset are refused: a carry of another dataset's."""
    held = [name for name in SUSPECTS_CARRIED if name in (carried or {})]
    if not held:
        return None
    if len(held) < len(SUSPECTS_CARRIED):
        raise DatasetError(f"a selection's carry holds {held[0]!r} without {set(SUSPECTS_CARRIED) - set(held)}")
    ids, labels = (np.asarray(carried[name]) for name in SUSPECTS_CARRIED)
    suspects = Suspects(ids, labels, np.full(len(ids), np.nan, np.float32))
    classes = dataset.num_classes or MAX_CLASSES  # a store that names none (zarr's own): its labels say
    outside = (suspects.ids >= dataset.num_samples) | (suspects.labels < 0) | (suspects.labels >= classes)
    if outside.any():
        k = int(np.argmax(outside))
        raise DatasetError(
            f"the carry handed on names suspect {int(suspects.ids[k])} of class {int(suspects.labels[k])}, "
            f"outside {dataset.url!r} ({dataset.num_samples} samples, {dataset.num_classes} classes): a carry of "
            "another dataset's"
        )
    return suspects


def typical_floors(
    selector: Windowed, proxy: Proxy, drawn: frozenset[int], classes: Iterable[int] | None = None
) -> np.ndarray | None:
    """Round 0's floors of p(label | x) under which a sample enters MaxVol muted (`Graft.typical`):
    each class's median on the model-free proxy's held-out warm-up (NaN, no floor, for the classes
    drawn and those the warm-up missed); None where the selector asks for none, or asks the policy
    and the proxy is right on under TRUSTED_PROXY of its held-out warm-up over `classes` (`trust`)."""
    if selector.typical is False or (selector.typical is None and trust(proxy, classes) < TRUSTED_PROXY):
        return None
    floors = getattr(proxy, "median_confidence", None)
    if floors is None:
        return None
    floors = floors.copy()
    floors[sorted(drawn)] = np.nan
    return floors


def trust(proxy: Proxy, classes: Iterable[int] | None = None) -> float:
    """How far a model-free proxy is right: its held-out recall on the warm-up, averaged over
    `classes` (the dataset's, where known: labels 3, 7 and 100 are 3 classes, not 101; else the
    proxy's), a class the warm-up missed counting 0 (a proxy knows nothing of it); 0 for a proxy
    without a warm-up."""
    recall = getattr(proxy, "held_out_recall", None)
    if recall is None:
        return 0.0
    recall = np.nan_to_num(recall)
    return float(recall.mean() if classes is None else recall[sorted(classes)].mean())


def class_counts_before_shards(labels: np.ndarray, shard_samples: int, num_classes: int) -> np.ndarray:
    """(num_shards + 1, C): row s counts each class's samples in the shards before shard s, so
    that a partition of the shards (on Dask) starts its classes' running budgets where it starts."""
    shard = np.arange(len(labels)) // shard_samples
    counts = np.zeros(
        (shard[-1] + 2 if len(labels) else 1, max(num_classes, int(labels.max(initial=-1)) + 1)), np.int64
    )
    np.add.at(counts, (shard + 1, labels), 1)
    return np.cumsum(counts, axis=0)


def seen_before(before: np.ndarray | None, shards: list[int]) -> dict[int, int] | None:
    """ClassWindows' `seen` for a pass over `shards` (consecutive): each class's samples before
    them, from `class_counts_before_shards` (None: the pass starts at the first shard)."""
    return None if before is None else {c: int(n) for c, n in enumerate(before[shards[0]]) if n}


def sizes_of(before: np.ndarray | None) -> dict[int, int] | None:
    """ClassWindows' `sizes`: each class's samples, the last row of `class_counts_before_shards`
    (None: a pass over every shard, which sees them all)."""
    return None if before is None else {c: int(n) for c, n in enumerate(before[-1]) if n}


def coresets(points: torch.Tensor, k: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """k facility-location medoids of points (n, d) held in memory, per window of at most `window`
    of them (`window_bounds`) with budgets that add up to k (`share`), and their weights, cluster
    sizes × k_w / n_w (mean 1 per window)."""
    rows, weights = [], []
    for start, end in window_bounds(len(points), window):
        budget = share(k, len(points), start, end)
        if budget:
            found, weight = medoids(points[start:end], budget)
            rows.append(start + found)
            weights.append(weight)
    return np.concatenate(rows), np.concatenate(weights)


def factored_medoids(windows: list[Window]) -> list[Pick]:
    """CRAIG's pick of windows held as their gradients' factors, a pair or A pairs a sample
    (`gradients_of_factors`): each window's medoids by the distances of its gradients, from the
    factors' Gram matrix (`facility_location_of_factors`), weighted as `medoids`; scores NaN."""
    return [
        (*_weighted(*facility_location_of_factors(*factors, k), len(factors[0])), np.full(k, np.nan, dtype=np.float32))
        for factors, k in windows
    ]


def medoids(points: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """CRAIG's k facility-location medoids of points and their weights, cluster sizes × k / n (mean 1)."""
    return _weighted(*facility_location(points, k), len(points))


def _weighted(rows: torch.Tensor, sizes: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    # numpy's own arrays, not views of torch's: a pick outlives its window, and torch's small blocks
    # left among the window's freed temporaries kept malloc from reusing them (AdaCore at 1,000
    # classes of 3 samples: 1.4 to 4.7 GB resident, from run to run, against 1 MB)
    return rows.cpu().numpy().copy(), (sizes.cpu().numpy() * len(rows) / n).astype(np.float32)
