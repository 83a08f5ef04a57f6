"""nearstore: select a representative subset beside the data; ship only that to the trainer.

The layers, each a package, imports going one way: `nearstore.storage` (the format, reading by id)
← `nearstore.selection` (proxies, selectors, the `Selection` record) ← `nearstore.serving` (the
near-storage server) ← `loaders` (beside the trainer) ← `nearstore.app` (the command line, the demo).

The names below are imported on first use (PEP 562): the storage layer then works without torch,
which only the selection layer and those above it need.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "nearstore.errors": (
        "DatasetError",
        "IntegrityError",
        "NearstoreError",
        "ParameterError",
        "RequestError",
        "RoundCancelled",
        "SampleError",
        "SampleIdError",
        "StorageError",
    ),
    "nearstore.selection": ("ModelProxy", "RandomFeatureProxy", "Selection", "keep_freed_memory"),
    "nearstore.selection.selectors": (
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
        "make_selector",
    ),
    "nearstore.selection.selectors.random": ("random_select",),
    "nearstore.selection.selectors.sage": ("sage_select",),
    "nearstore.storage": (
        "Coalescing",
        "Dataset",
        "IOStats",
        "SelectiveReader",
        "open_dataset",
        "verify_dataset",
        "write_dataset",
    ),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS, key=lambda name: (not name.isupper(), name))  # constants first, as isort orders them


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nearstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
