"""Selectors, one module each, registered by name: a new method is a module and a line below."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch

from nearstore.errors import ParameterError
from nearstore.selection.executors import Executor
from nearstore.selection.plan import check_seed
from nearstore.selection.proxies import Proxy
from nearstore.selection.record import Selection
from nearstore.selection.selectors.adacore import AdaCore
from nearstore.selection.selectors.augment_aware import AugmentAware
from nearstore.selection.selectors.base import Selector
from nearstore.selection.selectors.clipcov import ClipCov
from nearstore.selection.selectors.craig import Craig
from nearstore.selection.selectors.crest import Crest
from nearstore.selection.selectors.graft import Graft
from nearstore.selection.selectors.random import Random, random_select
from nearstore.selection.selectors.sage import Sage, sage_select
from nearstore.selection.selectors.sas import Sas
from nearstore.selection.stages import never
from nearstore.storage import Dataset

SELECTORS: dict[str, type[Selector]] = {
    cls.method: cls for cls in (Random, Sage, Graft, Craig, Crest, AdaCore, Sas, ClipCov, AugmentAware)
}


def make_selector(method: str, **options: Any) -> Selector:
    """The selector named `method` with its options, checked now (before any scan), e.g.
    make_selector("craig", window=512)."""
    if method not in SELECTORS:
        raise ParameterError(f"method must be one of {sorted(SELECTORS)}, got {method!r}")
    known = {field.name for field in fields(SELECTORS[method])}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ParameterError(f"{method!r} has no options {unknown}; its options are {sorted(known)}")
    return SELECTORS[method](**options)


def next_round(
    dataset: Dataset,
    number: int,
    *,
    keep: float,
    method: str,
    options: dict[str, Any],
    seed: int,
    previous: np.ndarray | None = None,
    carried: Mapping[str, np.ndarray] | None = None,
    proxy: Proxy | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    executor: Executor | None = None,
    cancelled: Callable[[], bool] = never,
) -> Selection:
    """Selection round `number`, run by `method` with `options` and `proxy` (on `executor`); the
    selector is handed the ids of the round it replaces, `previous`, and what that round handed on
    (its `Selection.carry`), `carried`. cancelled: whether nobody waits for the round any more,
    asked between shards and between windows' decisions (then `RoundCancelled`)."""
    check_seed(seed)
    selector = make_selector(method, **options)
    selection = selector.select(
        dataset,
        keep,
        proxy=proxy,
        seed=seed,
        device=device,
        progress=progress,
        previous=previous,
        carried=carried,
        executor=executor,
        cancelled=cancelled,
    )
    return replace(selection, round=number)


__all__ = [
    "SELECTORS",
    "AdaCore",
    "AugmentAware",
    "ClipCov",
    "Craig",
    "Crest",
    "Graft",
    "Random",
    "Sage",
    "Sas",
    "Selector",
    "make_selector",
    "next_round",
    "random_select",
    "sage_select",
]
