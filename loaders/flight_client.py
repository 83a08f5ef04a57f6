"""`FlightSource`: the trainer's side of the near-storage server (`nearstore serve`).

Reads samples by id from grpc://host:port/name, reconnecting when the server goes away (or
failing with a clear error, by option), pushes proxy weights and asks for new selection rounds.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import pyarrow.flight as flight
import torch

from nearstore.iostats import IOStats
from nearstore.selection import Selection

OnDisconnect = Literal["reconnect", "raise"]
log = logging.getLogger("nearstore")


class FlightSource:
    """Samples of one dataset served by a `NearStoreServer`.

    url: grpc://host:port/name.
    token: the server's shared secret; default the NEARSTORE_TOKEN environment variable.
    on_disconnect: "reconnect" retries a read whose server went away (with backoff, for up to
        `reconnect_seconds`), so a restarted server finishes the epoch with no sample lost or
        repeated; "raise" fails at once with ConnectionError.
    `stats` counts what was shipped to this trainer: bytes of record batches, requests, samples.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        on_disconnect: OnDisconnect = "reconnect",
        reconnect_seconds: float = 30.0,
    ) -> None:
        parsed = urlparse(url)
        name = parsed.path.strip("/")
        if parsed.scheme != "grpc" or not parsed.hostname or not parsed.port or not name:
            raise ValueError(f"a server URL looks like grpc://host:port/dataset, got {url!r}")
        if on_disconnect not in ("reconnect", "raise"):
            raise ValueError(f"on_disconnect must be 'reconnect' or 'raise', got {on_disconnect!r}")
        self.url, self.name = url, name
        self.location = f"grpc://{parsed.hostname}:{parsed.port}"
        self.on_disconnect, self.reconnect_seconds = on_disconnect, reconnect_seconds
        token = token if token is not None else os.environ.get("NEARSTORE_TOKEN")
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = flight.FlightCallOptions(headers=headers)
        self._client = flight.FlightClient(self.location)
        self.stats = IOStats()
        info = self.info()
        self.identity: dict[str, Any] = info["identity"]
        self.num_samples: int = self.identity["num_samples"]
        self.sample_arrays: tuple[str, ...] = tuple(info["sample_arrays"])
        self.label_array: str | None = info["label_array"]
        self.full_epoch_bytes: int = info["full_epoch_bytes"]

    def info(self) -> dict[str, Any]:
        """The server's dataset, current selection round, proxy version and I/O counts."""
        return json.loads(self._action("info", b""))

    def selection(self, round: int | None = None) -> Selection:
        """Selection round `round` (default: the current one)."""
        return Selection.from_bytes(self._action("selection", json.dumps({"round": round}).encode()))

    def update_proxy(self, model: torch.nn.Module) -> int:
        """Push the model's weights as the server's proxy; returns the new proxy version."""
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        return json.loads(self._action("update_proxy", buffer.getvalue()))["proxy_version"]

    def select(self, **params: Any) -> Selection:
        """Run a new selection round on the server (keep, method, options, seed) and return it."""
        info = json.loads(self._action("select", json.dumps(params).encode()))
        return self.selection(info["round"])

    def read(self, ids: Sequence[int] | np.ndarray, *, round: int | str) -> dict[str, np.ndarray]:
        """{array: samples} for ids of selection round `round` (or of the whole dataset, round
        ALL_SAMPLES), rows in the order of `ids`."""
        ticket = json.dumps({"dataset": self.name, "round": round, "ids": np.asarray(ids).tolist()}).encode()
        table = self._call(lambda: self._client.do_get(flight.Ticket(ticket), options=self._options).read_all())
        self.stats.add(bytes=table.nbytes, requests=1, samples=table.num_rows)
        arrays = {}
        for name in table.column_names[1:]:
            layout = json.loads(table.schema.metadata[name.encode()])
            column = table.column(name).combine_chunks()
            raw = np.frombuffer(column.buffers()[1], dtype=np.uint8)
            width = column.type.byte_width
            rows = raw[column.offset * width : (column.offset + len(column)) * width]
            arrays[name] = rows.view(np.dtype(layout["dtype"])).reshape(len(column), *layout["shape"])
        return arrays

    def close(self) -> None:
        self._client.close()

    def _action(self, kind: str, body: bytes) -> bytes:
        results = self._call(lambda: list(self._client.do_action(flight.Action(kind, body), options=self._options)))
        return results[0].body.to_pybytes()

    def _call(self, call: Any) -> Any:
        """Run a Flight call; map the server's errors to Python's, retry while it is away."""
        deadline = time.monotonic() + self.reconnect_seconds
        delay = 0.05
        while True:
            try:
                return call()
            except flight.FlightUnavailableError as e:
                if self.on_disconnect == "raise" or time.monotonic() > deadline:
                    raise ConnectionError(f"nearstore server {self.location} is unreachable: {_message(e)}") from e
                log.warning("nearstore server %s unreachable, retrying in %.2f s", self.location, delay)
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
            except flight.FlightUnauthenticatedError as e:
                raise PermissionError(f"nearstore server {self.location} refused the token: {_message(e)}") from e
            except ValueError as e:  # pyarrow's ArrowInvalid: the server refused the request
                raise ValueError(_message(e)) from e


def _message(error: Exception) -> str:
    """The server's message without Flight's traceback detail."""
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    return text.split(". Detail:")[0].split(". gRPC client debug context")[0]
