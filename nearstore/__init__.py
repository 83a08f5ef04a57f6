"""nearstore: select a representative subset beside the data; ship only that to the trainer.

The layers, each a package, imports going one way: `nearstore.storage` (the format, reading by id)
← `nearstore.selection` (proxies, selectors, the `Selection` record) ← `nearstore.serving` (the
near-storage server) ← `loaders` (beside the trainer) ← `nearstore.app` (the command line, the demo).
"""

from nearstore.errors import (
    DatasetError,
    IntegrityError,
    NearstoreError,
    ParameterError,
    RequestError,
    SampleError,
    SampleIdError,
)
from nearstore.selection import ModelProxy, RandomFeatureProxy, Selection, keep_freed_memory
from nearstore.selection.selectors import SELECTORS, Craig, Crest, Graft, Random, Sage, make_selector
from nearstore.selection.selectors.random import random_select
from nearstore.selection.selectors.sage import sage_select
from nearstore.storage import (
    Coalescing,
    Dataset,
    IOStats,
    SelectiveReader,
    open_dataset,
    verify_dataset,
    write_dataset,
)

__all__ = [
    "SELECTORS",
    "Coalescing",
    "Craig",
    "Crest",
    "Dataset",
    "DatasetError",
    "Graft",
    "IOStats",
    "IntegrityError",
    "ModelProxy",
    "NearstoreError",
    "ParameterError",
    "Random",
    "RandomFeatureProxy",
    "RequestError",
    "Sage",
    "SampleError",
    "SampleIdError",
    "Selection",
    "SelectiveReader",
    "keep_freed_memory",
    "make_selector",
    "open_dataset",
    "random_select",
    "sage_select",
    "verify_dataset",
    "write_dataset",
]
