"""Integrity: `verify_dataset`, which reads every shard once and checks it whole.

Each inner chunk carries its crc32c, checked on every read (`nearstore.storage.reader`); the
manifest records each shard object's size, a digest of the samples it holds
(`nearstore.storage.digests`) and each inner chunk's crc32c. The reader checks sizes and
checksums, that every chunk it reads stores the crc32c recorded for its place, and the digest of a
shard it reads whole: either catches a shard object replaced by another whole one (its checksums
hold, its samples are not the ones written), the first also in a read of a part of it (stores
written before the manifest recorded the crc32c have only the digest). `verify_dataset` reads
every shard whole.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from nearstore.checks import check_integer
from nearstore.errors import IntegrityError
from nearstore.storage.dataset import Dataset
from nearstore.storage.reader import SelectiveReader, size_problem


@dataclass(frozen=True)
class Damage:
    """One damaged shard object: which array and shard, where it is, and what is wrong."""

    array: str
    shard: int
    path: str
    problem: str


def verify_dataset(dataset: Dataset, *, threads: int = 8, progress: bool = True) -> list[Damage]:
    """Read every shard object of every array once, concurrently, and check it: present, of the
    recorded size (no byte more), its index and every inner chunk's checksum, each chunk's crc32c
    against the manifest's, its samples' digest. Returns the damaged objects and those that cannot
    be read (empty: the store is whole). A format-1 store has no manifest to check against: refused
    with a DatasetError."""
    check_integer("threads", threads, 1)
    if dataset.manifest is None:
        raise IntegrityError(
            f"{dataset.url!r} has no checksums or manifest (format {dataset.format_version}): nothing to verify "
            "against. Rewrite it with `nearstore convert` to get them"
        )
    manifest = dataset.manifest
    # caches of its own: what earlier reads kept with `dataset` (shard indexes, digests checked) is
    # what was stored then, and a shard damaged since read as whole
    dataset = replace(dataset)
    fs, _ = dataset.filesystem()
    readers = {name: SelectiveReader(dataset, [name], digests=True) for name in dataset.sample_arrays}
    work = [(name, shard) for name in dataset.sample_arrays for shard in range(dataset.array_shards(name))]

    def check(item: tuple[str, int]) -> Damage | None:
        name, shard = item
        path = dataset.shard_path(name, shard)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            size = None  # the reader says it is missing
        except Exception as e:  # refused (permissions), unreachable: listed, and the others checked on
            return Damage(name, shard, path, f"cannot be read: {type(e).__name__}: {e}")
        problem = None if size is None else size_problem(size, int(manifest.nbytes[name][shard]))
        if problem is not None:
            return Damage(name, shard, path, problem)
        try:
            readers[name].read_shard(shard)  # its checksums, the manifest's, and, read whole, its samples' digest
        except IntegrityError as e:
            return Damage(name, shard, path, str(e))
        except OSError as e:  # a folder in its place, a permission: not whole either, and the others go on
            return Damage(name, shard, path, f"cannot be read: {e}")
        return None

    with ThreadPoolExecutor(threads) as pool:
        results = tqdm(
            pool.map(check, work), total=len(work), unit="shard", desc=f"verifying {dataset.url}", disable=not progress
        )
        return [damage for damage in results if damage is not None]
