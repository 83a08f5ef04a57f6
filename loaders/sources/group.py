"""`ServerGroup`: one dataset whose shards are served by several servers, one per storage node,
read as one source. Each sample comes from the server of its shard (a batch's parts from their
servers at once); rounds, selections and proxy pushes go to the primary, the one server that runs
rounds, which the others follow (`NearStoreServer(shards=..., primary=...)`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from loaders.sources.base import Source
from loaders.sources.flight import FlightSource
from nearstore import DatasetError, IOStats, ParameterError, Selection
from nearstore.serving.protocol import shard_ranges
from nearstore.storage.dataset import check_ids, sample_identity
from nearstore.storage.images import ImageTransform

T = TypeVar("T")


class ServerGroup(Source):
    """The servers at `urls` (grpc://host:port/name each) as one source of their dataset.

    options: each server's `FlightSource` options (token, tls_root_certs, on_disconnect, ...).
    Refused by name at open: servers of different datasets (by content), a shard served by two
    servers or by none, a group with no primary or with two. A server lost mid-epoch is retried
    as a FlightSource retries (`on_disconnect`), then its reads fail with a ConnectionError naming
    it and its shards: an epoch never goes on without them.
    """

    def __init__(self, urls: Sequence[str], **options: Any) -> None:
        if isinstance(urls, str) or not isinstance(urls, Sequence) or len(urls) < 2:
            raise ParameterError(f"a server group takes two or more server URLs, got {urls!r}")
        self.servers: list[FlightSource] = []
        try:
            for url in urls:
                self.servers.append(FlightSource(url, **options))
            infos = [server.info() for server in self.servers]
            self._check(infos)
        except BaseException:
            self.close()
            raise
        primaries = [k for k, info in enumerate(infos) if info["primary"] is None]
        self.primary = self.servers[primaries[0]]
        self.url = ",".join(urls)
        self.identity = self.primary.identity
        self.sample_arrays, self.label_array = self.primary.sample_arrays, self.primary.label_array
        self.shard_samples = self.primary.shard_samples
        self.stats = IOStats()
        for server in self.servers:  # one count of what every server shipped to this trainer
            server.stats = self.stats
        self._owner = self._owners(infos)
        self._shards = {k: np.flatnonzero(self._owner == k) for k in range(len(self.servers))}
        self._pool = ThreadPoolExecutor(len(self.servers), thread_name_prefix="nearstore-group")

    def read(
        self, ids: Sequence[int] | np.ndarray, *, arrays: Sequence[str], round: int | str
    ) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        check_ids(ids, self.num_samples, repr(self.url))
        owners = self._owner[ids // self.shard_samples]
        parts = {int(k): np.flatnonzero(owners == k) for k in np.unique(owners)}
        if len(parts) <= 1:  # one server's samples (or none): no threads, no reassembly
            k = next(iter(parts), 0)
            return self._ask(k, lambda s: s.read(ids, arrays=arrays, round=round))
        futures = {
            k: self._pool.submit(self._ask, k, lambda s, rows=rows: s.read(ids[rows], arrays=arrays, round=round))
            for k, rows in parts.items()
        }
        read = {k: future.result() for k, future in futures.items()}
        out = {}
        for name in arrays:
            first = next(iter(read.values()))[name]
            out[name] = np.empty((len(ids), *first.shape[1:]), dtype=first.dtype)
            for k, rows in parts.items():
                out[name][rows] = read[k][name]
        return out

    def stored_bytes(self, arrays: Sequence[str]) -> int:
        return self.primary.stored_bytes(arrays)

    def storage_reads(self) -> dict[str, int]:
        """What every server's storage side has read for samples."""
        each = [self._ask(k, lambda s: s.storage_reads()) for k in range(len(self.servers))]
        return {key: sum(reads[key] for reads in each) for key in each[0]}

    def selection(self, round: int | None = None) -> Selection:
        return self.primary.selection(round)

    def select(
        self,
        previous: np.ndarray | None = None,
        round: int | None = None,
        *,
        keep: float,
        method: str,
        options: dict[str, Any] | None = None,
        seed: int,
        carried: Mapping[str, np.ndarray] | None = None,
        request: str | None = None,
    ) -> Selection:
        """A new round, run by the primary over every shard; the other servers take it from it."""
        return self.primary.select(
            previous, round, keep=keep, method=method, options=options, seed=seed, request=request
        )

    def update_proxy(
        self, model: torch.nn.Module, images: ImageTransform | None = None, head: str | None = None
    ) -> None:
        self.primary.update_proxy(model, images, head)

    def close(self) -> None:
        if hasattr(self, "_pool"):
            self._pool.shutdown()
        for server in self.servers:
            server.close()

    def _ask(self, k: int, call: Callable[[FlightSource], T]) -> T:
        """call(server k), a lost server named with the shards it serves."""
        server = self.servers[k]
        try:
            return call(server)
        except ConnectionError as e:
            raise ConnectionError(
                f"{server.url}, the server of shards {shard_ranges(self._shards[k])} of this group, is lost: {e}"
            ) from e

    def _check(self, infos: list[dict[str, Any]]) -> None:
        """Refuse servers of another dataset, and a group without exactly one primary."""
        first = self.servers[0]
        for server in self.servers[1:]:
            # by content, not URL: a follower may read its own copy, or the store spelt otherwise
            if sample_identity(server.identity) != sample_identity(first.identity):
                raise DatasetError(
                    f"{server.url} serves another dataset than {first.url}: a group's servers serve one"
                    " dataset's shards (identity, fingerprint included, must be equal)"
                )
        primaries = [server.url for server, info in zip(self.servers, infos) if info["primary"] is None]
        if len(primaries) != 1:
            raise ParameterError(
                f"a server group has one primary, the server that runs the rounds (the others started with"
                f" primary=its URL); these run their own: {primaries or 'none'}"
            )

    def _owners(self, infos: list[dict[str, Any]]) -> np.ndarray:
        """Each shard's server (its index in `servers`); a shard served twice or by none refused."""
        num_shards = -(-self.num_samples // self.shard_samples)
        owner = np.full(num_shards, -1)
        for k, info in enumerate(infos):
            shards = np.arange(num_shards) if info["shards"] is None else np.asarray(info["shards"], dtype=np.int64)
            twice = shards[owner[shards] >= 0]
            if twice.size:
                other = self.servers[owner[twice[0]]].url
                raise ParameterError(f"shard {int(twice[0])} is served by both {other} and {self.servers[k].url}")
            owner[shards] = k
        if (owner < 0).any():
            raise ParameterError(
                f"no server of the group serves shards {shard_ranges(np.flatnonzero(owner < 0))} of {self.url!r}"
            )
        return owner
