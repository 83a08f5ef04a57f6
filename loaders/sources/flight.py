"""`FlightSource`: the trainer's side of the near-storage server (`nearstore serve`).

Reads samples by id from grpc://host:port/name (or grpc+tls://), reconnecting when the server
goes away (or failing with a clear error, by option), pushes proxy weights and asks for new
selection rounds; the wire is `nearstore.serving.protocol`'s, the calls `nearstore.serving.client`'s.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from loaders.sources.base import Source
from nearstore import IOStats, Selection
from nearstore.serving import protocol
from nearstore.serving.client import Connection
from nearstore.storage.images import ImageTransform


class FlightSource(Source):
    """Samples of one dataset served by a `NearStoreServer`.

    url: grpc://host:port/name, or grpc+tls://host:port/name for a server listening with TLS.
    options: the keywords of `nearstore.serving.client.Connection`, documented there: the token,
        TLS files, retries when the server goes away, deadlines of a call and of a `select`.
    `stats` counts what was shipped to this trainer: bytes of record batches, requests, samples.
    A refusal by the server raises the error it raised there (`nearstore.errors`).
    """

    def __init__(self, url: str, **options: Any) -> None:
        self._server = Connection(url, **options)
        self.url, self.name, self.location = url, self._server.name, self._server.location
        self.stats = IOStats()
        self._fingerprint: str | None = None
        info = self.info()
        self.identity: dict[str, Any] = info["identity"]
        # sent with every request from here on: a server restarted on another store of the same
        # name and shape refuses it, where its samples would have been read as this dataset's
        self._fingerprint = self.identity.get("fingerprint")
        self.sample_arrays: tuple[str, ...] = tuple(info["sample_arrays"])
        self.label_array: str | None = info["label_array"]
        self.shard_samples: int = info["shard_samples"]
        self._stored_bytes: dict[str, int] = info["stored_bytes"]
        # the server's counts as this trainer saw them: the run that counts now, its last counts,
        # and what the runs before a restart had counted when last seen (`storage_reads`)
        self._incarnation: str | None = info.get("incarnation")
        self._last_reads: dict[str, int] = dict(info["storage_reads"])
        self._reads_before: dict[str, int] = {}

    def info(self) -> dict[str, Any]:
        """The server's dataset, current selection round, proxy version and I/O counts."""
        return json.loads(self.action("info", {}))

    def read(
        self, ids: Sequence[int] | np.ndarray, *, arrays: Sequence[str], round: int | str
    ) -> dict[str, np.ndarray]:
        # a request names at most MAX_REQUEST_SAMPLES (a cache's first read of a round may ask it whole)
        step = protocol.MAX_REQUEST_SAMPLES
        parts = []
        for first in range(0, max(1, len(ids)), step):
            ticket = protocol.ticket(self.name, round, ids[first : first + step], arrays, self._fingerprint)
            table = self._server.get(ticket)
            self.stats.add(bytes=table.nbytes, requests=1, samples=table.num_rows)
            parts.append(protocol.from_table(table))
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def stored_bytes(self, arrays: Sequence[str]) -> int:
        return sum(self._stored_bytes[name] for name in arrays)

    def storage_reads(self) -> dict[str, int]:
        """The server's counts of storage reads, never going back: a restarted server counts from
        0 again, and what its earlier run had counted (when this trainer last asked) is added to
        it (reads between then and the restart are not known). A group's sum of its servers' was
        wrong by every other server's reads since the start once one of them restarted."""
        info = self.info()
        if info.get("incarnation") != self._incarnation:
            self._reads_before = {k: self._reads_before.get(k, 0) + v for k, v in self._last_reads.items()}
            self._incarnation = info.get("incarnation")
        self._last_reads = dict(info["storage_reads"])
        return {k: self._reads_before.get(k, 0) + v for k, v in self._last_reads.items()}

    def selection(self, round: int | None = None) -> Selection:
        return Selection.from_bytes(self.action("selection", {"round": round}))

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
        """A new round on the server, after its current one (which holds `previous`), or after
        another trainer's if it asked first: the server answers with the round it ran (or, for a
        `request` id it already ran a round for, with that round)."""
        asked = {"keep": keep, "method": method, "options": options or {}, "seed": seed}
        return Selection.from_bytes(self.action("select", asked if request is None else {**asked, "request": request}))

    def update_proxy(
        self, model: torch.nn.Module, images: ImageTransform | None = None, head: str | None = None
    ) -> None:
        """Push the model's weights as the server's proxy (a do_put of `protocol.weight_batches`),
        with the `images` it is to decode encoded images by."""
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        body = buffer.getbuffer()
        descriptor = protocol.weights_descriptor(self.name, len(body), images, self._fingerprint, head)
        json.loads(self._server.put(descriptor, body))

    def close(self) -> None:
        self._server.close()

    def action(self, kind: str, request: dict[str, Any]) -> bytes:
        """The server's answer to action `kind` with `request` (`protocol.ACTIONS`)."""
        return self._server.action(kind, protocol.with_fingerprint(request, self._fingerprint))
