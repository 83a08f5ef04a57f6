"""The near-storage server: runs the scan beside the data, holds the selection rounds, and
streams the selected samples to trainers over Arrow Flight (`nearstore.serving.protocol`; the
client is `loaders.FlightSource`).

Beyond the loopback interface the server takes TLS (grpc+tls://, mutual TLS optional) and a
shared-secret token (`authorization: Bearer <token>`): an admin token that may do everything, and
optionally a read token that may only read (`protocol.ADMIN_ACTIONS`, do_put); requests are
validated (dataset, round, ids, sizes) before any byte is read.
"""

from __future__ import annotations

import hmac
import importlib
import io
import ipaddress
import json
import logging
import reprlib
import signal
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import torch

from nearstore.checks import check_integer
from nearstore.errors import (
    DatasetError,
    IntegrityError,
    NearstoreError,
    ParameterError,
    RequestError,
    RoundCancelled,
    StorageError,
)
from nearstore.selection import DEFAULT_METHOD, ModelProxy, Selection, default_reselect
from nearstore.selection.executors import Executor
from nearstore.selection.plan import check_keep
from nearstore.selection.proxies import nonfinite_weight
from nearstore.selection.record import in_sorted, write_whole
from nearstore.selection.selectors import next_round
from nearstore.selection.stages import never, stop_if_cancelled, vet
from nearstore.serving import protocol
from nearstore.serving.client import Connection
from nearstore.storage import ChunkCache, Dataset, IOStats, SelectiveReader, small_arrays
from nearstore.storage.images import PROXY_IMAGES, ImageTransform

log = logging.getLogger("nearstore")

# Rounds kept: the latest two, and any a trainer read from within ROUND_LEASE_SECONDS, so that a
# trainer mid-epoch finishes on the round it started however many rounds others ask for meanwhile.
ROUNDS_KEPT = 2
ROUND_LEASE_SECONDS = 600.0
# Inner chunks the server keeps once read, for every trainer: each trainer, every epoch, asks for the
# same selection, whose samples share inner chunks (a 25% selection of 160-byte samples in chunks of
# 4 KiB read 15x the bytes shipped without it, bench/server_trainers.py).
READ_CACHE_BYTES = 256 << 20


class NearStoreServer(flight.FlightServerBase):
    """Serve one dataset's selected samples over Arrow Flight (grpc://host:port/name, or
    grpc+tls:// with `tls_cert`).

    host: the address to listen on; localhost is 127.0.0.1 alone (not ::1 too), in `url` as well.
    selection: the round-0 selection; without one the server runs the selector `method` (with
        `options`, see `nearstore.selectors`) with `keep` itself
        before it starts listening.
    model: `module:factory` (or a callable) building the trainer's model architecture: pushed
        proxy weights (`update_proxy`) are a state_dict of it, loaded with weights_only; encoded
        images are decoded for it as the pushing loader shows them at evaluation (its `images`): a
        push for a size the model cannot take is refused.
    token: the admin token (NEARSTORE_TOKEN): may read, push proxy weights and start rounds.
    read_token: a token that may only read (NEARSTORE_READ_TOKEN): samples, `info`, selections.
        Without either, any caller may do anything; beyond the loopback interface one is required.
    tls_cert, tls_key: PEM files of the server's certificate (chain) and its private key: the
        server then listens on grpc+tls://. Required beyond the loopback interface.
    tls_client_ca: a PEM file of the CA(s) a client's certificate must chain to (mutual TLS): a
        client without such a certificate is refused in the handshake.
    insecure: listen beyond the loopback interface without TLS (a warning at start names what
        then crosses in clear); a token is required all the same.
    state_dir: where the server keeps its rounds and pushed proxy (never inside the dataset); a
        server started on a state_dir that holds them resumes from them instead of selecting.
    max_proxy_bytes: the largest pushed state_dict accepted, in bytes; a push announcing more is
        refused before its first byte is read.
    read_cache_bytes: the inner chunks read from storage kept for every trainer's later reads, in
        bytes at most, least recently used out first (`nearstore.storage.ChunkCache`: checked
        before they are kept, and again as they are served); 0: none kept.
    executor: where rounds run (`nearstore.selection.executors`): in this process by default, or
        on a Dask cluster beside the storage.
    shards: the shards this server serves, where a dataset's shards are served by several
        servers, one per storage node (`loaders.ServerGroup` reads them as one source); a read of
        any other shard's sample is refused by name. Default: every shard.
    primary: the URL of the server that runs this dataset's rounds, for a server of some of its
        shards: this one then runs none (no scan at start; `select` and weight pushes refused) and
        takes each round from the primary when a trainer first names it. primary_options: the
        connection's options (`nearstore.serving.client.Connection`: token, tls_root_certs, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        read_token: str | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_client_ca: str | Path | None = None,
        insecure: bool = False,
        selection: Selection | None = None,
        keep: float = 0.25,
        method: str = DEFAULT_METHOD,
        options: dict[str, Any] | None = None,
        seed: int = 0,
        model: str | Callable[[], torch.nn.Module] | None = None,
        state_dir: str | Path | None = None,
        max_proxy_bytes: int = protocol.MAX_PROXY_BYTES,
        read_cache_bytes: int = READ_CACHE_BYTES,
        progress: bool = False,
        executor: Executor | None = None,
        shards: Sequence[int] | None = None,
        primary: str | None = None,
        primary_options: dict[str, Any] | None = None,
    ) -> None:
        if host == "localhost":
            # gRPC listens on every address it resolves localhost to (::1 and 127.0.0.1) and, one of
            # them taken, goes on with the other alone (only its log says so): a trainer reaching
            # localhost by the other would reach whoever holds it. One address, in the URL too.
            host = "127.0.0.1"
        tls = _tls_options(tls_cert, tls_key, tls_client_ca)  # read now: a bad file fails before the scan
        check_exposure(host, token or read_token, tls, insecure)
        self.scheme = protocol.TLS_SCHEME if tls else protocol.SCHEME
        location = f"{self.scheme}://{protocol.bracketed(host)}:{port}"
        _check_listenable(location, host, port)  # before the scan too: the server listens only after it
        if not is_loopback(host):
            log.warning(
                "serving on %r with no front: one gRPC message past its limit (a push past max_proxy_bytes) is "
                "held whole before it is refused; nginx in front cuts it off first (`nearstore serve` runs one "
                "by default, nearstore.serving.front.NginxFront for one's own)",
                host,
            )
        protocol.check_token("token", token)
        protocol.check_token("read_token", read_token)
        if token is not None and token == read_token:
            raise ParameterError(
                "read_token must differ from token (the admin token): the server could not tell them apart"
            )
        self.max_proxy_bytes = check_integer("max_proxy_bytes", max_proxy_bytes, 1)
        check_integer("read_cache_bytes", read_cache_bytes, 0)
        self.read_cache = ChunkCache(read_cache_bytes) if read_cache_bytes else None
        self.dataset = dataset
        self.name = _default_name(dataset.url) if name is None else _checked_name(name)
        self.storage_reads = IOStats()  # every reader's, for samples shipped (read_cache's chunks are not read)
        # which run of the server counts them: a restart counts from 0 again (`FlightSource.storage_reads`)
        self.incarnation = uuid.uuid4().hex
        self._readers: dict[tuple[str, ...], SelectiveReader] = {}
        # Asked once (a size request per shard object): the store is read-only, and `info` is
        # called by every trainer at every epoch's start and end.
        self.stored_bytes = {name: dataset.stored_nbytes([name]) for name in dataset.sample_arrays}
        self.shipped = IOStats()
        self.progress, self.executor = progress, executor
        self._model_factory = None if model is None else _checked_factory(model)
        self._proxy: ModelProxy | None = None
        self.proxy_version = 0
        # The readers' dict, the rounds and the proxy change under it; reads run outside it, at once
        # for several trainers (a read from object storage is mostly waiting on the network).
        self._lock = threading.Lock()
        # One round runs at a time: each is numbered after, and handed, the round before it; reads
        # go on meanwhile.
        self._round_lock = threading.Lock()
        # Each select's calls waiting for its round (its first try and retries, by request id): the
        # round stops only once every one of them is cancelled (its caller gone). Under _lock.
        self._waiting: dict[object, list[Callable[[], bool]]] = {}
        self._rounds: dict[int, Selection] = {}
        self._sent_bytes: dict[int, tuple[Selection, bytes]] = {}  # each round as sent (`_sent`)
        self._read_at: dict[int, float] = {}  # when a trainer last read from each round (monotonic)
        self.state_dir = _state_dir(state_dir, dataset) if state_dir is not None else None
        self._persisted: dict[int, Selection] = {}  # the rounds in state_dir's server.json, as written
        self.shards = None if shards is None else _check_shards(shards, dataset.num_shards)
        self._primary: Connection | None = None
        if primary is not None:
            given = {"selection": selection, "model": model, "state_dir": state_dir, "executor": executor}
            named = [option for option, value in given.items() if value is not None]
            if named:
                raise ParameterError(f"{', '.join(named)} given with primary: its rounds are the primary's to run")
            self._primary = Connection(primary, **dict(primary_options or {}))
            self._follow(None)
        elif not self._restore():
            if selection is None:
                selection = self._run_round(keep=keep, method=method, options=dict(options or {}), seed=seed)
            else:
                selection.check_dataset(dataset)
                self._keep_round(selection)
        middleware = {"roles": _Roles(token, read_token)} if token or read_token else {}
        try:
            super().__init__(location, middleware=middleware, **tls)
        except pa.ArrowException as e:
            # gRPC says only "did not start" (why goes to its log): a port another process holds
            # (Flight listens without SO_REUSEPORT, so no two servers share one), a host that is not
            # this machine's, or a certificate and key that do not parse or belong together
            given, guess = "", CANNOT_LISTEN
            if tls:
                given = f" with tls_cert {str(tls_cert)!r} and tls_key {str(tls_key)!r}"
                guess = f"a PEM certificate and its own private key? {guess}"
            raise ParameterError(f"cannot listen on {location}{given} ({guess}): {e}") from e
        self.host = host

    @property
    def url(self) -> str:
        """What a trainer passes to StreamingLoader."""
        return f"{self.scheme}://{protocol.bracketed(self.host)}:{self.port}/{self.name}"

    def serve(self) -> None:
        """Serve until `shutdown()`, or, called from the main thread, until this process gets SIGINT
        or SIGTERM: then shut down (calls in flight finish) and return. (Flight's own serve takes
        no signal: Ctrl-C would not stop it, and SIGTERM would kill it before anything is cleaned up.)"""
        if threading.current_thread() is not threading.main_thread():
            return super().serve()  # signal handlers belong to the main thread
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        waiting = threading.Thread(target=self.wait, name="nearstore-serve", daemon=True)
        try:
            waiting.start()
            while waiting.is_alive() and not stop.wait(0.2):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stop.is_set():
            log.info("shutting down: calls in flight finish first")
            self.shutdown()
        waiting.join()

    @property
    def current(self) -> Selection:
        with self._lock:
            return self._rounds[max(self._rounds)]

    # Flight handlers -------------------------------------------------------------------------

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        with _answering("do_get"):
            request = protocol.parse(ticket.ticket, "ticket")
            self._check_dataset(request)
            ids = protocol.parse_ids(request.get("ids"), self.dataset.num_samples)
            names = tuple(protocol.parse_arrays(request.get("arrays"), self.dataset.sample_arrays))
            self._check_served(ids)
            if request.get("round") != protocol.ALL_SAMPLES:
                selection = self._round(request.get("round"))
                with self._lock:  # kept while read (`_keep_round`)
                    self._read_at[selection.round] = time.monotonic()
                outside = ids[~in_sorted(ids, selection.ids)]
                if outside.size:
                    raise RequestError(
                        f"sample {int(outside[0])} is not in selection round {selection.round} of {self.name!r}"
                    )
            arrays = self._read(names, ids)
            batch = protocol.to_record_batch(ids, arrays)
        self.shipped.add(bytes=batch.nbytes, requests=1, samples=len(ids))
        return flight.RecordBatchStream(pa.Table.from_batches([batch]))

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[flight.Result]:
        select = partial(self._select, cancelled=context.is_cancelled)  # a deadline passed, or the caller gone
        handlers = {"info": self._info, "selection": self._selection, "select": select}
        if action.type in protocol.ADMIN_ACTIONS:
            self._check_admin(context, f"action {action.type!r}")
        with _answering(f"action {action.type!r}"):
            if action.type not in handlers:
                raise RequestError(f"unknown action {action.type!r}; this server answers {sorted(handlers)}")
            request = protocol.parse(action.body, f"{action.type} request") if len(action.body) else {}
            self._check_dataset(request)  # a trainer of another dataset starts no round here
            del request["dataset"]
            answer = handlers[action.type](request)
        yield flight.Result(pa.py_buffer(answer))

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        """A push of proxy weights (`protocol.weights_descriptor`); answers the new proxy version."""
        self._check_admin(context, "do_put (a proxy weights push)")
        with _answering("a weights push"):
            request = protocol.parse(descriptor.command or b"", "weights descriptor")
            self._check_dataset(request)
            self._check_runs_rounds("a push of proxy weights")
            if self._model_factory is None:
                raise RequestError(
                    f"server of {self.name!r} has no proxy model: start it with --model to accept weights"
                )
            nbytes = request.get("bytes")
            if type(nbytes) is not int or nbytes < 0:
                raise RequestError(f"weights descriptor's 'bytes' must be a byte count, got {nbytes!r}")
            if nbytes > self.max_proxy_bytes:
                raise RequestError(
                    f"proxy state_dict of {nbytes} bytes exceeds the limit of {self.max_proxy_bytes} (max_proxy_bytes)"
                )
            images = protocol.parse_images(request.get("images"))
            head = protocol.parse_head(request.get("head"))
            answer = self._update_proxy(protocol.read_weights(reader, nbytes), images, head)
        writer.write(pa.py_buffer(answer))

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return list(protocol.ACTIONS.items())

    # The calls nearstore does not serve: refused in a line, not by pyarrow's default (its traceback
    # crossed to the caller, where nothing else of an exception does). GetSchema is left to it:
    # pyarrow sends a traceback of whatever it raises (its own frames, none of the server's).
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        raise _not_served("ListFlights")

    def get_flight_info(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> None:
        raise _not_served("GetFlightInfo")

    def do_exchange(self, context: flight.ServerCallContext, *streams: object) -> None:
        raise _not_served("DoExchange")

    def _check_admin(self, context: flight.ServerCallContext, call: str) -> None:
        """Refuse `call` to a caller holding the read token (one with no token passed only where
        the server takes none: then anyone may do anything)."""
        role = context.get_middleware("roles")
        if role is None or role.admin:
            return
        log.warning("refused %s to %s: it holds the read token", call, context.peer())
        raise flight.FlightUnauthorizedError(
            f"the read token may not call {call} on {self.name!r}: that takes the admin token ({protocol.TOKEN_ENV})"
        )

    def _reader(self, names: tuple[str, ...]) -> SelectiveReader:
        """A reader of these arrays (all share the dataset's shard indexes, one count and
        read_cache), made once and used by every trainer's reads at once (`SelectiveReader` says
        why that is safe)."""
        with self._lock:
            if names not in self._readers:
                keep = small_arrays(self.dataset, names)  # labels: read once, not a range each a sample
                self._readers[names] = SelectiveReader(
                    self.dataset, names, stats=self.storage_reads, keep=keep, cache=self.read_cache
                )
            return self._readers[names]

    def _read(self, names: tuple[str, ...], ids: np.ndarray) -> dict[str, np.ndarray]:
        """Samples for a client. Damage is logged here in full; the client is told it with the
        store's URL replaced by the served name (it is not the client's to know)."""
        try:
            read = self._reader(tuple(sorted(names))).read(ids)  # one reader for any order of the names
            return {name: read[name] for name in names}
        except IntegrityError as e:
            log.error("damaged store: %s", e)
            raise IntegrityError(self._hidden(e), e.ids) from None
        except OSError as e:  # the storage failed, retries spent: said as such, not an internal error
            log.error("storage failed a read: %s", e)
            raise StorageError(f"the storage of {self.name!r} failed a read: {self._hidden(e)}") from None

    def _hidden(self, error: Exception) -> str:
        """The error's message with the store's URL replaced by the served name (the root as the
        filesystem names the shards, a relative URL's absolute path, first)."""
        return str(error).replace(self.dataset.filesystem()[1], self.name).replace(self.dataset.url, self.name)

    # Actions ---------------------------------------------------------------------------------

    def _info(self, request: dict[str, Any] | None = None) -> bytes:
        current = self.current
        ds = self.dataset
        return json.dumps(
            {
                "dataset": self.name,
                "identity": self._identity(ds.identity()),
                "sample_arrays": list(ds.sample_arrays),
                "label_array": ds.label_array,
                "shard_samples": ds.shard_samples,
                "class_names": list(ds.class_names),
                "round": current.round,
                "selected": len(current),
                "method": current.method,
                "proxy_version": self.proxy_version,
                "shards": self.shards,
                "primary": None if self._primary is None else self._primary.url,
                "stored_bytes": self.stored_bytes,
                "storage_reads": self.storage_reads.snapshot().as_dict(),
                "incarnation": self.incarnation,
                "read_cache": None if self.read_cache is None else self.read_cache.as_dict(),
                "shipped": self.shipped.snapshot().as_dict(),
            }
        ).encode()

    def _selection(self, request: dict[str, Any]) -> bytes:
        return self._sent(self._round(request.get("round")))

    def _update_proxy(self, body: bytearray, images: ImageTransform | None = None, head: str | None = None) -> bytes:
        """Pushed weights, checked, as the proxy of the next rounds, which decodes encoded images by
        `images` (the trainer's loader's at evaluation; None: ModelProxy's default) and reads its
        logits from `head` (None: found by running it); answers its version."""
        proxy = self._proxy_from(body, images, head)
        with self._lock:
            version = self.proxy_version + 1
            self._persist(self._rounds, version, f"proxy version {version}", weights=body, proxy=proxy)
            self._proxy, self.proxy_version = proxy, version
        log.info("proxy version %d received (%d bytes)", version, len(body))
        return json.dumps({"proxy_version": version}).encode()

    def _proxy_from(
        self, body: bytes | bytearray, images: ImageTransform | None = None, head: str | None = None
    ) -> ModelProxy:
        """The server's model with pushed weights (a torch-saved state_dict), checked: where it
        scores encoded images, on a blank one of the size `images` decodes them at."""
        self._check_unpacked_size(body)
        try:
            state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
        except Exception as e:
            raise RequestError(f"proxy weights are not a torch state_dict: {e}") from e
        if not isinstance(state, dict):
            raise RequestError(f"proxy weights must be a state_dict, got {type(state).__name__}")
        model = self._model_factory()
        try:  # first: a tensor of the model's shape costs what the model does (one of a 1-element
            # storage expanded to 2e8 made the check below allocate 1.3 GB for a 3 kB push)
            model.load_state_dict(state)
        except RuntimeError as e:
            raise RequestError(f"proxy weights do not fit the server's model: {e}") from e
        bad = nonfinite_weight(model)
        if bad is not None:
            raise RequestError(f"proxy weights {bad!r} hold NaN or inf")
        try:
            proxy = ModelProxy(model, images=images if images is not None else PROXY_IMAGES, head=head)
        except ParameterError as e:  # a head the server's model does not have
            raise RequestError(f"proxy weights' head: {e}") from e
        vet(proxy, self._reader((self.dataset.input_array,)), self.dataset.input_array)
        return proxy

    def _check_unpacked_size(self, body: bytes | bytearray) -> None:
        """Refuse a push whose archive unpacks past max_proxy_bytes: torch.load inflates
        compressed records (1,000 to 1 for zeros: the bound on what a push costs was no bound)."""
        try:
            with zipfile.ZipFile(io.BytesIO(body)) as archive:
                unpacked = sum(member.file_size for member in archive.infolist())
        except zipfile.BadZipFile:
            return  # not torch.save's zip: torch.load refuses it, or reads its legacy format as it is
        if unpacked > self.max_proxy_bytes:
            raise RequestError(
                f"proxy weights unpack to {unpacked} bytes, past the server's max_proxy_bytes={self.max_proxy_bytes}"
            )

    def _select(self, request: dict[str, Any], cancelled: Callable[[], bool] = never) -> bytes:
        """A new round, run after any running one; answers with it, whichever round is current by
        then. A select whose request id a kept round ran for is answered that round (a retry).
        cancelled: whether this call is cancelled (`_run_round` says when that stops the round)."""
        self._check_runs_rounds("select")
        unknown = set(request) - set(protocol.SELECT_FIELDS)
        if unknown:
            raise RequestError(f"select takes {', '.join(protocol.SELECT_FIELDS)}; got unknown {sorted(unknown)}")
        current = self.current
        keep, method = request.get("keep", current.keep), request.get("method")
        options, seed = request.get("options", {}), request.get("seed", current.round + 1)
        if not isinstance(keep, int | float) or isinstance(keep, bool):
            raise RequestError(f"select's keep must be a number, got {keep!r}")
        check_keep(keep)  # before float(): a JSON integer may be past float's range
        if method is not None and not isinstance(method, str):
            raise RequestError(f"select's method must be a string, got {method!r}")
        if not isinstance(options, dict):
            raise RequestError(f"select's options must be a JSON object, got {type(options).__name__}")
        if method is None:  # later rounds' default, as a loader's reselect() asks: not round 0's method
            method, defaults = default_reselect(float(keep))
            options = {**defaults, **options}
        request_id = request.get("request")  # None: a client before request ids, each select a round
        longest = protocol.MAX_REQUEST_ID_CHARS
        if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= longest):
            got = f"{len(request_id)} characters" if isinstance(request_id, str) else type(request_id).__name__
            raise RequestError(f"select's request must be a string of 1 to {longest} characters (its id), got {got}")
        try:
            selection = self._run_round(
                keep=float(keep), method=method, options=options, seed=seed, request_id=request_id, cancelled=cancelled
            )
        except RoundCancelled as e:
            log.warning("select %s: %s; no round kept", request_id, e)
            raise
        return self._sent(selection)

    def _sent(self, selection: Selection) -> bytes:
        """`selection` as a client gets it: its dataset named by this server's URL, not the store's
        (which may hold credentials: it is not the client's to know, as `_hidden` says of errors).
        Made once a round held: every trainer and rank asks for it, and a round of 4M samples took
        9 s to pack."""
        held = self._sent_bytes.get(selection.round)
        if held is None or held[0] is not selection:
            held = (selection, replace(selection, dataset=self._identity(selection.dataset)).to_bytes())
            kept = {r: sent for r, sent in self._sent_bytes.items() if self._rounds.get(r) is sent[0]}
            self._sent_bytes = {**kept, selection.round: held}  # one assignment: readers in other threads
        return held[1]

    def _identity(self, identity: dict[str, Any]) -> dict[str, Any]:
        return {**identity, "url": self.url}

    # Rounds ----------------------------------------------------------------------------------

    def _run_round(
        self,
        *,
        keep: float,
        method: str,
        options: dict[str, Any],
        seed: int,
        request_id: str | None = None,
        cancelled: Callable[[], bool] = never,
    ) -> Selection:
        """Run the next round and keep it: numbered and handed the round before it under
        _round_lock, so concurrent requests get distinct rounds, each the one it ran. `request_id`, a
        select's, is kept in the round's params: the kept round that holds it is the answer to
        that select's retries (looked up under _round_lock: a retry arriving while its first try
        runs waits for that round), and none runs again.

        cancelled: whether the select's call is cancelled (a Flight call whose deadline passed, or
        whose caller went away; never for a round run from Python). The round stops, kept nowhere
        (RoundCancelled, logged), once every call of its request id, its first try and any retry
        waiting for it, is cancelled: a retry that arrives in time is answered the running round."""
        with self._waiting_for(request_id, cancelled) as nobody_waits, self._round_lock:
            with self._lock:
                ran = next((s for s in self._rounds.values() if s.params.get("request") == request_id), None)
                previous = self._rounds[max(self._rounds)] if self._rounds else None
                proxy, proxy_version = self._proxy, self.proxy_version
            if request_id is not None and ran is not None:
                log.info("select %s: answered with round %d, which it already ran", request_id, ran.round)
                return ran
            number = 0 if previous is None else previous.round + 1
            stop_if_cancelled(nobody_waits, "it began")  # its caller gave up waiting for the rounds before
            log.info(
                "selection round %d: %s %s, keep %.3f, proxy version %d", number, method, options, keep, proxy_version
            )
            selection = next_round(
                self.dataset,
                number,
                previous=None if previous is None else previous.ids,
                carried=None if previous is None else previous.carry,
                keep=keep,
                method=method,
                options=options,
                seed=seed,
                proxy=proxy,
                progress=self.progress,
                executor=self.executor,
                cancelled=nobody_waits,
            )
            params = {**selection.params, "proxy_version": proxy_version, "request": request_id}
            selection = replace(selection, params=params)
            self._keep_round(selection)
        return selection

    @contextmanager
    def _waiting_for(self, request_id: str | None, cancelled: Callable[[], bool]) -> Iterator[Callable[[], bool]]:
        """While a select waits for its round or runs it: its call (`cancelled`) counted among its
        request id's (a select without an id alone); yields whether every one of them is cancelled."""
        key = object() if request_id is None else request_id
        with self._lock:
            calls = self._waiting.setdefault(key, [])
            calls.append(cancelled)
            if len(calls) > 1:
                log.info("select %s: a retry, waits for the round its first try runs", request_id)

        def nobody_waits() -> bool:
            with self._lock:  # a call counted here is not yet answered: its context is alive
                return all(call() for call in calls)

        try:
            yield nobody_waits
        finally:
            with self._lock:
                calls.remove(cancelled)
                if not calls:
                    del self._waiting[key]

    def _keep_round(self, selection: Selection) -> None:
        with self._lock:
            rounds = {**self._rounds, selection.round: selection}
            latest = sorted(rounds)[-ROUNDS_KEPT:]
            now = time.monotonic()
            read = {n for n, at in self._read_at.items() if now - at < ROUND_LEASE_SECONDS}
            rounds = {number: rounds[number] for number in sorted(rounds) if number in latest or number in read}
            self._read_at = {n: at for n, at in self._read_at.items() if n in rounds}
            self._persist(rounds, self.proxy_version, f"selection round {selection.round}")
            self._rounds = rounds

    def _persist(
        self,
        rounds: dict[int, Selection],
        proxy_version: int,
        what: str,
        weights: bytes | None = None,
        proxy: ModelProxy | None = None,
    ) -> None:
        """Write the state that is to be, before it is taken in memory: the rounds, the proxy
        version, pushed `weights` and the images their `proxy` decodes (without them, the current
        proxy's: the default's where a push named none, so a restart decodes as before); server.json
        last, so a crash or a full disk mid-way leaves the previous state whole. Where it cannot be
        written, `what` is refused by name and nothing changes: a round no restart could restore is
        never served."""
        if self.state_dir is None:
            return
        try:
            if weights is not None:
                write_whole(self.state_dir / f"proxy-{proxy_version}.pt", weights)
            for number, selection in rounds.items():
                # a round file this server did not write may be one a failed write left: never kept
                if self._persisted.get(number) is not selection:
                    write_whole(self.state_dir / f"round-{number}.npz", selection.to_bytes())
            state: dict[str, Any] = {"rounds": sorted(rounds), "proxy_version": proxy_version}
            proxy = proxy if proxy is not None else self._proxy
            if proxy is not None:
                state["proxy_images"] = protocol.image_fields(proxy.images)
                state["proxy_head"] = proxy.head_name
            write_whole(self.state_dir / "server.json", json.dumps(state).encode())
            self._persisted = dict(rounds)
        except OSError as e:
            log.error("cannot keep %s in %s: %s", what, self.state_dir, e)
            raise RequestError(
                f"{what} was not taken: the server cannot write its state ({e.strerror or e}); it holds what it held"
            ) from None
        self._forget_rounds(rounds)
        self._remove(p for p in self.state_dir.glob("proxy*.pt") if p.name != f"proxy-{proxy_version}.pt")

    def _forget_rounds(self, rounds: dict[int, Selection]) -> None:
        """Remove from state_dir the round files server.json does not name: older rounds, and what
        a failed write left."""
        assert self.state_dir is not None
        named = {str(number) for number in rounds}
        self._remove(p for p in self.state_dir.glob("round-*.npz") if p.stem.removeprefix("round-") not in named)

    def _remove(self, paths: Iterable[Path]) -> None:
        """Remove files server.json no longer names, where it can: one left on a filesystem turned
        read-only since is no reason to stop serving (nor to refuse to start)."""
        for path in paths:
            try:
                path.unlink()
            except OSError as e:
                log.warning("cannot remove %s, which the server's state no longer names: %s", path, e)

    def _restore(self) -> bool:
        """Load the rounds and proxy a previous server left in state_dir; False if none."""
        path = self.state_dir / "server.json" if self.state_dir is not None else None
        if path is None or not path.exists():
            return False
        state = _server_state(path)
        rounds = {r: Selection.load(str(self.state_dir / f"round-{r}.npz")) for r in state["rounds"]}
        for selection in rounds.values():
            selection.check_dataset(self.dataset)  # a state_dir of another dataset is refused
        version = state["proxy_version"]
        if version:
            # proxy.pt: what servers before format 2 wrote, one file for every version
            found = [p for p in (self.state_dir / f"proxy-{version}.pt", self.state_dir / "proxy.pt") if p.exists()]
            if not found:
                raise DatasetError(f"{self.state_dir} records proxy version {version} but holds no pushed weights")
            pushed = found[0]
            if self._model_factory is None:
                raise DatasetError(f"{self.state_dir} holds a pushed proxy: start the server with its --model")
            images = protocol.parse_images(state.get("proxy_images"))  # an older server's: none, the default
            try:
                self._proxy = self._proxy_from(pushed.read_bytes(), images, state.get("proxy_head"))
            except NearstoreError as e:  # a --model other than the one pushed to: named, as a push would be
                raise DatasetError(f"{pushed} (proxy version {version}) does not suit the server's model: {e}") from e
        self.proxy_version = version
        self._rounds, self._persisted = rounds, dict(rounds)
        self._forget_rounds(rounds)  # a failed write's, which server.json does not name
        log.info("resumed from %s: rounds %s, proxy version %d", self.state_dir, state["rounds"], self.proxy_version)
        return True

    def _round(self, number: Any) -> Selection:
        if number is None:
            return self.current
        with self._lock:
            held = self._rounds.get(number) if type(number) is int else None
        # a follower asks its primary for any round it lacks: a newer one, or an older one a trainer
        # mid-epoch still reads after another trainer's newer round, or after a restart
        if held is None and self._primary is not None and type(number) is int:
            return self._follow(number)
        if held is None:
            held_rounds = sorted(self._rounds)
            raise RequestError(f"selection round {number!r} of {self.name!r} is not held; rounds {held_rounds}")
        return held

    def _follow(self, number: int | None) -> Selection:
        """Round `number` (None: the current one) as the primary holds it, checked and kept."""
        with self._round_lock:  # trainers naming a new round at once: one asks, the others find it
            with self._lock:
                if number in self._rounds:
                    return self._rounds[number]
            assert self._primary is not None
            try:
                answer = self._primary.action("selection", {"round": number})
            except (ConnectionError, NearstoreError, PermissionError) as e:
                which = "the current selection round" if number is None else f"selection round {number}"
                raise RequestError(
                    f"{which} of {self.name!r} is not held here, and its primary {self._primary.url} could not be"
                    f" asked: {e}"
                ) from None
            selection = Selection.from_bytes(answer)
            selection.check_dataset(self.dataset)  # a primary of another dataset is refused
            self._keep_round(selection)
            log.info("round %d taken from the primary %s", selection.round, self._primary.url)
            return selection

    def _check_served(self, ids: np.ndarray) -> None:
        if self.shards is None:
            return
        shards = ids // self.dataset.shard_samples
        outside = ~np.isin(shards, self.shards)
        if outside.any():
            first = int(np.argmax(outside))
            raise RequestError(
                f"sample {int(ids[first])} lies in shard {int(shards[first])} of {self.name!r}, which this server"
                f" does not serve (it serves shards {protocol.shard_ranges(self.shards)})"
            )

    def _check_runs_rounds(self, call: str) -> None:
        if self._primary is not None:
            raise RequestError(f"{call} goes to the primary of {self.name!r}, {self._primary.url}: it runs the rounds")

    def _check_dataset(self, request: dict[str, Any]) -> None:
        if "dataset" not in request:
            raise RequestError(
                f"the request names no dataset; this server serves {self.name!r} (a client older than the server?)"
            )
        if request.get("dataset") != self.name:
            raise RequestError(f"this server serves dataset {self.name!r}, not {request.get('dataset')!r}")
        fingerprint = request.pop("fingerprint", None)  # a client's since it first asked for info
        served = self.dataset.manifest.fingerprint if self.dataset.manifest else None
        if fingerprint is not None and fingerprint != served:
            raise DatasetError(
                f"this server serves {self.name!r} of fingerprint {served}, not the {fingerprint} this trainer "
                "began with: the server was restarted on another store of that name"
            )


@contextmanager
def _answering(what: str) -> Iterator[None]:
    """Errors raised answering `what` as they cross the wire: ours as their class and message
    (`protocol.refusal`); any other as an internal error, logged here with its traceback under an
    incident id the client is told. pyarrow would send the client a Python exception's traceback,
    the server's file paths in it: the exception does not leave this block."""
    try:
        yield
    except NearstoreError as e:
        raise protocol.refusal(e) from None
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception("internal error %s answering %s", incident, what)
        raise protocol.internal_error(incident) from None


class _Role(flight.ServerMiddleware):
    """The role a call's token gave it, for the handlers (`context.get_middleware("roles")`)."""

    def __init__(self, admin: bool) -> None:
        self.admin = admin


class _Roles(flight.ServerMiddlewareFactory):
    """Admit a call holding the admin or the read token, as that role; refuse any other."""

    def __init__(self, token: str | None, read_token: str | None) -> None:
        self._expected = {admin: f"Bearer {t}".encode() for admin, t in ((True, token), (False, read_token)) if t}

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> _Role:
        given = (headers.get("authorization") or [""])[0].encode()
        # Both compared, in constant time: how long it takes tells nothing of either token.
        matched = [admin for admin, expected in self._expected.items() if hmac.compare_digest(given, expected)]
        if not matched:
            raise flight.FlightUnauthenticatedError("missing or wrong token (authorization: Bearer <token>)")
        return _Role(matched[0])


# Why a server cannot listen, most likely.
CANNOT_LISTEN = "the port taken, or the host not an address of this machine?"


def _check_listenable(location: str, host: str, port: int) -> None:
    """Refuse a port another process listens on now, or a host not this machine's (port 0: the OS
    picks one, free). A port taken after this is refused when the server starts listening."""
    if not port:
        return
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port in TIME_WAIT is free
            probe.bind(address)
    except OSError as e:
        raise ParameterError(f"cannot listen on {location} ({CANNOT_LISTEN}): {e}") from e


def _tls_options(cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None) -> dict[str, Any]:
    """FlightServerBase's TLS arguments from PEM files; empty without a certificate."""
    pair = protocol.read_key_pair(cert, key)
    if pair is None:
        if client_ca is not None:
            raise ParameterError(f"tls_client_ca {str(client_ca)!r} needs tls_cert and tls_key (mutual TLS is TLS)")
        return {}
    options: dict[str, Any] = {"tls_certificates": [pair]}
    if client_ca is not None:
        options.update(verify_client=True, root_certificates=protocol.read_pem(client_ca, "tls_client_ca"))
    return options


def check_exposure(host: str, token: str | None, tls: dict[str, Any], insecure: bool) -> None:
    """Beyond the loopback interface: a token, and TLS unless `insecure` (said in a warning)."""
    if insecure and tls:
        raise ParameterError("insecure=True and tls_cert contradict each other: give one")
    if is_loopback(host):
        return
    if not token:
        raise ParameterError(f"a token is required to listen on {host!r}, beyond 127.0.0.1 (set {protocol.TOKEN_ENV})")
    if not tls and not insecure:
        raise ParameterError(
            f"TLS is required to listen on {host!r}, beyond 127.0.0.1: the token and the samples would cross"
            " the network in clear (give tls_cert and tls_key, --tls-cert and --tls-key, or insecure=True, --insecure,"
            " to accept that)"
        )
    if not tls:
        log.warning(
            "listening on %r without TLS (insecure=True): the token, the samples shipped, the selections and"
            " pushed proxy weights cross the network in clear",
            host,
        )


def _check_shards(shards: Sequence[int], num_shards: int) -> list[int]:
    """Sorted shard ids, each in [0, num_shards) and named once."""
    if isinstance(shards, str) or not isinstance(shards, Sequence | np.ndarray) or not len(shards):
        raise ParameterError(f"shards must be a non-empty sequence of shard ids, got {shards!r}")
    for shard in shards:
        if isinstance(shard, bool) or not isinstance(shard, int | np.integer) or not 0 <= shard < num_shards:
            raise ParameterError(f"shards holds {shard!r}, not a shard id in [0, {num_shards})")
    if len(set(shards)) != len(shards):
        raise ParameterError(f"shards names a shard twice: {sorted(shards)}")
    return sorted(int(s) for s in shards)


def _server_state(path: Path) -> dict[str, Any]:
    """server.json of a state_dir, checked: what is no server's state (empty, cut short, edited) is
    refused by a DatasetError naming it, where it was a traceback of json's or a KeyError."""
    try:
        state = json.loads(path.read_text())
        rounds, version = state["rounds"], state["proxy_version"]
        if not (isinstance(rounds, list) and all(type(r) is int and r >= 0 for r in rounds) and type(version) is int):
            raise ValueError(f"rounds {reprlib.repr(rounds)}, proxy_version {reprlib.repr(version)}")
    except (ValueError, KeyError, TypeError) as e:  # json's errors are ValueErrors
        raise DatasetError(
            f"{path} is not a nearstore server's state ({type(e).__name__}: {e}); move the state_dir aside to start "
            "afresh, or give another"
        ) from None
    return state


def _state_dir(path: str | Path, dataset: Dataset) -> Path:
    """The server's own directory, created if missing; refused inside the dataset, and where it is
    a URL (Path made a local folder named "s3:" of s3://bucket/state, and the rounds never left
    the machine)."""
    if fsspec.utils.get_protocol(str(path)) != "file":
        raise ParameterError(f"state_dir must be a local directory, got the URL {str(path)!r}")
    path = Path(str(path).removeprefix("file://")).resolve()
    dataset.check_outside(str(path), "state_dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _not_served(call: str) -> Exception:
    return protocol.refusal(RequestError(f"{call} is not served: a nearstore server answers DoGet, DoPut and DoAction"))


def is_loopback(host: str) -> bool:
    """Whether `host` names the loopback interface (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# A trainer reads the name from the server's URL's path: these would end it (a query, a fragment).
URL_ENDS = "?#"


def _default_name(url: str) -> str:
    leaf = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
    return "".join("_" if c in URL_ENDS else c for c in leaf) or "dataset"


def _checked_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip("/") or any(c in URL_ENDS for c in name):
        raise ParameterError(
            f"name must be a non-empty string without '?' or '#' (it is the path of the server's URL), got {name!r}"
        )
    return name.strip("/")


def _checked_factory(model: str | Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    """The model factory `model` names ('module:factory') or is, built once now: one that builds no
    model is refused at start, not at a trainer's first push."""
    factory = _import_factory(model) if isinstance(model, str) else model
    spec = model if isinstance(model, str) else getattr(model, "__qualname__", repr(model))
    try:
        built = factory()
    except Exception as e:
        raise ParameterError(f"model factory {spec!r} must build a model when called without arguments: {e}") from e
    if not isinstance(built, torch.nn.Module):
        raise ParameterError(f"model factory {spec!r} must return a torch.nn.Module, got {type(built).__name__}")
    return factory


def _import_factory(spec: str) -> Callable[[], torch.nn.Module]:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ParameterError(f"model must be 'module:factory', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ParameterError(f"cannot import model factory {spec!r}: {e}") from e
