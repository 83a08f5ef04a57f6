"""Storage: the dataset format, its writer, and reading samples by id (layer 1)."""

from nearstore.storage.chunk_cache import ChunkCache
from nearstore.storage.dataset import Dataset, open_dataset
from nearstore.storage.integrity import Damage, verify_dataset
from nearstore.storage.iostats import IOStats
from nearstore.storage.ranges import DEFAULT_READS, Coalescing
from nearstore.storage.reader import SelectiveReader, read_labels, small_arrays
from nearstore.storage.writer import write_dataset

__all__ = [
    "ChunkCache",
    "DEFAULT_READS",
    "Coalescing",
    "Damage",
    "Dataset",
    "IOStats",
    "SelectiveReader",
    "open_dataset",
    "read_labels",
    "small_arrays",
    "verify_dataset",
    "write_dataset",
]
