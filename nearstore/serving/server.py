"""The near-storage server: runs the scan beside the data, holds the selection rounds, and
streams the selected samples to trainers over Arrow Flight (`nearstore.serving.protocol`; the
client is `loaders.FlightSource`).

A shared-secret token (`authorization: Bearer <token>`) is required when the server listens
beyond the loopback interface; requests are validated (dataset, round, ids, sizes) before any
byte is read.
"""

from __future__ import annotations

import hmac
import importlib
import io
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import torch

from nearstore.errors import DatasetError, NearstoreError, ParameterError, RequestError
from nearstore.selection import DEFAULT_METHOD, ModelProxy, Selection
from nearstore.selection.selectors import next_round
from nearstore.serving import protocol
from nearstore.storage import Dataset, IOStats, SelectiveReader

log = logging.getLogger("nearstore")

ROUNDS_KEPT = 2  # a trainer mid-epoch finishes on the round it started while another asks for a new one


class NearStoreServer(flight.FlightServerBase):
    """Serve one dataset's selected samples over Arrow Flight (grpc://host:port/name).

    selection: the round-0 selection; without one the server runs the selector `method` (with
        `options`, see `nearstore.selectors`) with `keep` itself
        before it starts listening.
    model: `module:factory` (or a callable) building the trainer's model architecture: pushed
        proxy weights (`update_proxy`) are a state_dict of it, loaded with weights_only.
    token: required when host is not a loopback address.
    state_dir: where the server keeps its rounds and pushed proxy (never inside the dataset); a
        server started on a state_dir that holds them resumes from them instead of selecting.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        selection: Selection | None = None,
        keep: float = 0.25,
        method: str = DEFAULT_METHOD,
        options: dict[str, Any] | None = None,
        seed: int = 0,
        model: str | Callable[[], torch.nn.Module] | None = None,
        state_dir: str | Path | None = None,
        progress: bool = False,
    ) -> None:
        if not _is_loopback(host) and not token:
            raise ParameterError(f"a token is required to listen on {host!r}, beyond 127.0.0.1 (set NEARSTORE_TOKEN)")
        self.dataset = dataset
        self.name = name or _default_name(dataset.url)
        self.storage_reads = IOStats()  # every reader's, for samples shipped
        self._readers: dict[tuple[str, ...], SelectiveReader] = {}
        # Asked once (a size request per shard object): the store is read-only, and `info` is
        # called by every trainer at every epoch's start and end.
        self.stored_bytes = {name: dataset.stored_nbytes([name]) for name in dataset.sample_arrays}
        self.shipped = IOStats()
        self.progress = progress
        self._model_factory = _import_factory(model) if isinstance(model, str) else model
        self._proxy: ModelProxy | None = None
        self.proxy_version = 0
        self._lock = threading.Lock()  # the readers' caches and the rounds change under it
        self._rounds: dict[int, Selection] = {}
        self.state_dir = _state_dir(state_dir, dataset) if state_dir is not None else None
        if not self._restore():
            if selection is None:
                selection = self._run_round(keep=keep, method=method, options=dict(options or {}), seed=seed)
            selection.check_dataset(dataset)
            self._keep_round(selection)
        middleware = {"token": _TokenCheck(token)} if token else {}
        super().__init__(f"grpc://{host}:{port}", middleware=middleware)
        self.host = host

    @property
    def url(self) -> str:
        """What a trainer passes to StreamingLoader."""
        return f"grpc://{self.host}:{self.port}/{self.name}"

    @property
    def current(self) -> Selection:
        return self._rounds[max(self._rounds)]

    # Flight handlers -------------------------------------------------------------------------

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        try:
            request = protocol.parse(ticket.ticket, "ticket")
            self._check_dataset(request)
            ids = protocol.parse_ids(request.get("ids"), self.dataset.num_samples)
            names = tuple(protocol.parse_arrays(request.get("arrays"), self.dataset.sample_arrays))
            if request.get("round") != protocol.ALL_SAMPLES:
                selection = self._round(request.get("round"))
                outside = ids[~np.isin(ids, selection.ids)]
                if outside.size:
                    raise RequestError(
                        f"sample {int(outside[0])} is not in selection round {selection.round} of {self.name!r}"
                    )
            with self._lock:
                arrays = self._reader(names).read(ids)
        except NearstoreError as e:
            raise protocol.refusal(e) from e
        batch = protocol.to_record_batch(ids, arrays)
        self.shipped.add(bytes=batch.nbytes, requests=1, samples=len(ids))
        return flight.RecordBatchStream(pa.Table.from_batches([batch]))

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[flight.Result]:
        handlers = {
            "info": self._info,
            "selection": self._selection,
            "update_proxy": self._update_proxy,
            "select": self._select,
        }
        try:
            if action.type not in handlers:
                raise RequestError(f"unknown action {action.type!r}; this server answers {sorted(handlers)}")
            answer = handlers[action.type](action.body.to_pybytes())
        except NearstoreError as e:
            raise protocol.refusal(e) from e
        yield flight.Result(pa.py_buffer(answer))

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return list(protocol.ACTIONS.items())

    def _reader(self, names: tuple[str, ...]) -> SelectiveReader:
        """A reader of these arrays (all share the dataset's shard indexes, and one count)."""
        if names not in self._readers:
            self._readers[names] = SelectiveReader(self.dataset, names, stats=self.storage_reads)
        return self._readers[names]

    # Actions ---------------------------------------------------------------------------------

    def _info(self, body: bytes = b"") -> bytes:
        current = self.current
        ds = self.dataset
        return json.dumps(
            {
                "dataset": self.name,
                "identity": ds.identity(),
                "sample_arrays": list(ds.sample_arrays),
                "label_array": ds.label_array,
                "shard_samples": ds.shard_samples,
                "class_names": list(ds.class_names),
                "round": current.round,
                "selected": len(current),
                "method": current.method,
                "proxy_version": self.proxy_version,
                "stored_bytes": self.stored_bytes,
                "storage_reads": self.storage_reads.snapshot().as_dict(),
                "shipped": self.shipped.snapshot().as_dict(),
            }
        ).encode()

    def _selection(self, body: bytes) -> bytes:
        request = protocol.parse(body, "selection request") if body else {}
        return self._round(request.get("round")).to_bytes()

    def _update_proxy(self, body: bytes) -> bytes:
        if self._model_factory is None:
            raise RequestError(
                f"server of {self.name!r} has no proxy model: start it with --model module:factory to accept weights"
            )
        if len(body) > protocol.MAX_PROXY_BYTES:
            raise RequestError(f"proxy state_dict of {len(body)} bytes exceeds the limit of {protocol.MAX_PROXY_BYTES}")
        proxy = self._proxy_from(body)
        with self._lock:
            self._proxy = proxy
            self.proxy_version += 1
            if self.state_dir is not None:
                _write_atomically(self.state_dir / "proxy.pt", body)
                self._persist()
        log.info("proxy version %d received (%d bytes)", self.proxy_version, len(body))
        return json.dumps({"proxy_version": self.proxy_version}).encode()

    def _proxy_from(self, body: bytes) -> ModelProxy:
        """The server's model with pushed weights (a torch-saved state_dict), checked."""
        try:
            state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
        except Exception as e:
            raise RequestError(f"proxy weights are not a torch state_dict: {e}") from e
        if not isinstance(state, dict):
            raise RequestError(f"proxy weights must be a state_dict, got {type(state).__name__}")
        model = self._model_factory()
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise RequestError(f"proxy weights do not fit the server's model: {e}") from e
        proxy = ModelProxy(model)
        if self.dataset.num_classes and proxy.num_classes < self.dataset.num_classes:
            raise RequestError(
                f"proxy model outputs {proxy.num_classes} classes, {self.name!r} has {self.dataset.num_classes}"
            )
        return proxy

    def _select(self, body: bytes) -> bytes:
        request = protocol.parse(body, "select request") if body else {}
        unknown = set(request) - set(protocol.SELECT_FIELDS)
        if unknown:
            raise RequestError(f"select takes keep, method, options and seed; got unknown {sorted(unknown)}")
        options = request.get("options") or {}
        if not isinstance(options, dict):
            raise RequestError(f"select options must be a JSON object, got {type(options).__name__}")
        if not isinstance(request.get("keep", 0.0), int | float) or not isinstance(request.get("seed", 0), int):
            raise RequestError(f"select's keep must be a number and its seed an integer, got {request}")
        selection = self._run_round(
            keep=float(request.get("keep", self.current.keep)),
            method=str(request.get("method", self.current.method)),
            options=options,
            seed=int(request.get("seed", self.current.round + 1)),
        )
        self._keep_round(selection)
        return self._info()

    # Rounds ----------------------------------------------------------------------------------

    def _run_round(self, *, keep: float, method: str, options: dict[str, Any], seed: int) -> Selection:
        previous = self.current if self._rounds else None
        number = 0 if previous is None else previous.round + 1
        log.info(
            "selection round %d: %s %s, keep %.3f, proxy version %d", number, method, options, keep, self.proxy_version
        )
        selection = next_round(
            self.dataset,
            number,
            previous=None if previous is None else previous.ids,
            keep=keep,
            method=method,
            options=options,
            seed=seed,
            proxy=self._proxy,
            progress=self.progress,
        )
        return replace(selection, params={**selection.params, "proxy_version": self.proxy_version})

    def _keep_round(self, selection: Selection) -> None:
        with self._lock:
            self._rounds[selection.round] = selection
            for old in sorted(self._rounds)[:-ROUNDS_KEPT]:
                del self._rounds[old]
            if self.state_dir is not None:
                self._persist()

    def _persist(self) -> None:
        """Write the held rounds and the proxy version; server.json last, so a crash mid-way
        leaves the previous state whole."""
        for number, selection in self._rounds.items():
            path = self.state_dir / f"round-{number}.npz"
            if not path.exists():
                _write_atomically(path, selection.to_bytes())
        state = {"rounds": sorted(self._rounds), "proxy_version": self.proxy_version}
        _write_atomically(self.state_dir / "server.json", json.dumps(state).encode())
        for path in self.state_dir.glob("round-*.npz"):
            if int(path.stem.removeprefix("round-")) not in self._rounds:
                path.unlink()

    def _restore(self) -> bool:
        """Load the rounds and proxy a previous server left in state_dir; False if none."""
        if self.state_dir is None or not (self.state_dir / "server.json").exists():
            return False
        state = json.loads((self.state_dir / "server.json").read_text())
        rounds = {r: Selection.load(str(self.state_dir / f"round-{r}.npz")) for r in state["rounds"]}
        for selection in rounds.values():
            selection.check_dataset(self.dataset)  # a state_dir of another dataset is refused
        if (self.state_dir / "proxy.pt").exists() and state["proxy_version"]:
            if self._model_factory is None:
                raise DatasetError(f"{self.state_dir} holds a pushed proxy: start the server with its --model")
            self._proxy = self._proxy_from((self.state_dir / "proxy.pt").read_bytes())
        self.proxy_version = state["proxy_version"]
        self._rounds = rounds
        log.info("resumed from %s: rounds %s, proxy version %d", self.state_dir, state["rounds"], self.proxy_version)
        return True

    def _round(self, number: Any) -> Selection:
        if number is None:
            return self.current
        if not isinstance(number, int) or number not in self._rounds:
            raise RequestError(
                f"selection round {number!r} of {self.name!r} is not held; rounds {sorted(self._rounds)}"
            )
        return self._rounds[number]

    def _check_dataset(self, request: dict[str, Any]) -> None:
        if request.get("dataset") != self.name:
            raise RequestError(f"this server serves dataset {self.name!r}, not {request.get('dataset')!r}")


class _TokenCheck(flight.ServerMiddlewareFactory):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> None:
        given = (headers.get("authorization") or [""])[0].encode()
        if not hmac.compare_digest(given, self._expected):
            raise flight.FlightUnauthenticatedError("missing or wrong token (authorization: Bearer <token>)")


def _state_dir(path: str | Path, dataset: Dataset) -> Path:
    """The server's own directory, created if missing; refused inside the dataset."""
    path = Path(path).resolve()
    dataset.check_outside(str(path), "state_dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_name(url: str) -> str:
    leaf = url.rstrip("/").rsplit("/", 1)[-1]
    return leaf.removesuffix(".zarr") or "dataset"


def _import_factory(spec: str) -> Callable[[], torch.nn.Module]:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ParameterError(f"model must be 'module:factory', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ParameterError(f"cannot import model factory {spec!r}: {e}") from e
