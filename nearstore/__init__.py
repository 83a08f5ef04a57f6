"""nearstore: select a representative subset beside the data; ship only that to the trainer."""

from nearstore.allocator import keep_freed_memory
from nearstore.dataset import Dataset, open_dataset, write_dataset
from nearstore.iostats import IOStats
from nearstore.proxy import RandomFeatureProxy
from nearstore.reader import SelectiveReader
from nearstore.scan import random_select, sage_select
from nearstore.selection import Selection

__all__ = [
    "Dataset",
    "IOStats",
    "RandomFeatureProxy",
    "SelectiveReader",
    "Selection",
    "keep_freed_memory",
    "open_dataset",
    "random_select",
    "sage_select",
    "write_dataset",
]
