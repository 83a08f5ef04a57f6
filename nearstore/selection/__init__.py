"""Selection beside the data (layer 2): proxies, the scan's stages, planning, the selectors, and
the `Selection` record they return."""

from nearstore.selection.allocator import keep_freed_memory
from nearstore.selection.executors import DaskExecutor, LocalExecutor, local_cluster, make_executor
from nearstore.selection.policy import DEFAULT_METHOD, default_reselect
from nearstore.selection.proxies import ModelProxy, Proxy, RandomFeatureProxy
from nearstore.selection.record import Selection
from nearstore.selection.selectors import (
    SELECTORS,
    AdaCore,
    AugmentAware,
    ClipCov,
    Craig,
    Crest,
    Graft,
    Random,
    Sage,
    Sas,
    Selector,
    make_selector,
    random_select,
    sage_select,
)

__all__ = [
    "DEFAULT_METHOD",
    "SELECTORS",
    "AdaCore",
    "AugmentAware",
    "ClipCov",
    "Craig",
    "Crest",
    "DaskExecutor",
    "Graft",
    "LocalExecutor",
    "ModelProxy",
    "Proxy",
    "Random",
    "RandomFeatureProxy",
    "Sage",
    "Sas",
    "Selection",
    "Selector",
    "default_reselect",
    "keep_freed_memory",
    "local_cluster",
    "make_executor",
    "make_selector",
    "random_select",
    "sage_select",
]
