"""A connection to a `NearStoreServer`: Flight calls carrying the token, over TLS where the URL
says so, retried while the server is away, its refusals raised as the errors it raised. The
trainer's `loaders.FlightSource` speaks through it, and so does a server that follows another's
rounds (`NearStoreServer(primary=...)`)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.flight as flight

from nearstore.checks import check_range
from nearstore.errors import ParameterError
from nearstore.serving import protocol

OnDisconnect = Literal["reconnect", "raise"]
T = TypeVar("T")
log = logging.getLogger("nearstore")


class Connection:
    """Calls to the server at grpc://host:port/name (or grpc+tls://): the options of `FlightSource`
    and `NearStoreServer(primary_options=...)` are this class's.

    token: the server's admin or read token; default the NEARSTORE_TOKEN environment variable, else
        NEARSTORE_READ_TOKEN (a read token reads; pushing weights and `select` raise PermissionError).
    tls_root_certs: a PEM file of the CA(s) the server's certificate must chain to (grpc+tls://);
        default the system's.
    tls_cert, tls_key: PEM files of this client's certificate and key, for a server that asks for
        one (mutual TLS, `NearStoreServer(tls_client_ca=...)`).
    on_disconnect: "reconnect" retries a call whose server went away (with backoff, for up to
        `reconnect_seconds`), so a restarted server finishes the epoch with no sample lost or
        repeated; "raise" fails at once with ConnectionError.
    timeout_seconds: a call unanswered this long is a ConnectionError (a server frozen, or cut off
        without a reset, never says it went away).
    select_timeout_seconds: the same for a `select`, whose round scans the store: default 6 h (a
        store of 69M samples at the 3,205 samples/s of a SAGE scan in process on 2 cores); None
        waits for any scan. A select that expires leaves its round running on the server.

    Each `select` carries a request id of its own, the same on every retry of it: a retry whose
    first try's round landed (the answer lost, the server restarted from its state_dir) is answered
    that round, not a new one.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        tls_root_certs: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        on_disconnect: OnDisconnect = "reconnect",
        reconnect_seconds: float = 30.0,
        timeout_seconds: float = 300.0,
        select_timeout_seconds: float | None = 6 * 3600.0,
    ) -> None:
        parsed = urlparse(url)
        name = parsed.path.strip("/")
        schemes = (protocol.SCHEME, protocol.TLS_SCHEME)
        if parsed.scheme not in schemes or not parsed.hostname or not parsed.port or not name:
            raise ParameterError(f"a server URL looks like grpc://host:port/dataset (or grpc+tls://), got {url!r}")
        tls = _tls_options(parsed.scheme, tls_root_certs, tls_cert, tls_key)
        if on_disconnect not in ("reconnect", "raise"):
            raise ParameterError(f"on_disconnect must be 'reconnect' or 'raise', got {on_disconnect!r}")
        self.url, self.name = url, name
        self.location = f"{parsed.scheme}://{protocol.bracketed(parsed.hostname)}:{parsed.port}"
        check_range("reconnect_seconds", reconnect_seconds, 0)
        self.on_disconnect, self.reconnect_seconds = on_disconnect, reconnect_seconds
        if token is None:
            token = os.environ.get(protocol.TOKEN_ENV) or os.environ.get(protocol.READ_TOKEN_ENV)
        protocol.check_token("token", token)
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        check_range("timeout_seconds", timeout_seconds, 0, open_low=True)
        if select_timeout_seconds is not None:
            check_range("select_timeout_seconds", select_timeout_seconds, 0, open_low=True)
        self.timeout_seconds, self.select_timeout_seconds = timeout_seconds, select_timeout_seconds
        self._options = flight.FlightCallOptions(headers=headers, timeout=timeout_seconds)
        self._select_options = flight.FlightCallOptions(headers=headers, timeout=select_timeout_seconds)
        limits = [("grpc.max_metadata_size", protocol.MAX_METADATA_BYTES)]
        limits += [("grpc.absolute_max_metadata_size", protocol.MAX_METADATA_BYTES)]
        self._client = flight.FlightClient(self.location, generic_options=limits, **tls)

    def get(self, ticket: flight.Ticket) -> pa.Table:
        """The table a do_get of `ticket` streams."""
        return self._call(lambda: self._client.do_get(ticket, options=self._options).read_all())

    def action(self, kind: str, request: dict[str, Any]) -> bytes:
        """The server's answer to action `kind` with `request` (`protocol.ACTIONS`), which names
        this connection's dataset (a server of another refuses it). A select's request id (its
        "request") is made here, once, unless `request` names one."""
        if kind == "select":  # its round scans the store: a deadline of its own
            request = {"request": uuid.uuid4().hex, **request}
            options, limit = self._select_options, "select_timeout_seconds"
        else:
            options, limit = self._options, "timeout_seconds"
        body = json.dumps({"dataset": self.name, **request}).encode()  # built once: every retry sends it
        results = self._call(lambda: list(self._client.do_action(flight.Action(kind, body), options=options)), limit)
        return results[0].body.to_pybytes()

    def put(self, descriptor: flight.FlightDescriptor, body: memoryview) -> bytes:
        """Stream `body` to the server in `protocol.weight_batches`; its answer (the put's metadata)."""
        return self._call(lambda: self._put(descriptor, body))

    def close(self) -> None:
        self._client.close()

    def _put(self, descriptor: flight.FlightDescriptor, body: memoryview) -> bytes:
        writer, answers = self._client.do_put(descriptor, protocol.WEIGHTS, options=self._options)
        with writer:  # closing raises the server's refusal, if it refused
            for batch in protocol.weight_batches(body):
                writer.write_batch(batch)
            writer.done_writing()
            return answers.read().to_pybytes()

    def _call(self, call: Callable[[], T], limit: str = "timeout_seconds") -> T:
        """Run a Flight call; raise the server's refusals as its errors, retry while it is away.
        limit: the option that bounds the call (`timeout_seconds`, or a select's own)."""
        deadline = time.monotonic() + self.reconnect_seconds
        delay = 0.05
        while True:
            try:
                return call()
            # CANCELLED: a server shutting down ends the calls it is answering so (this client never
            # cancels its own), as gone as an unreachable one
            except (flight.FlightUnavailableError, flight.FlightCancelledError) as e:
                if _TLS_REFUSED in str(e):  # this client refused the server: no retry makes it agree
                    raise ConnectionError(
                        f"TLS handshake with nearstore server {self.location} failed: {_message(e)}"
                        " (tls_root_certs: the CA of the server's certificate; a grpc+tls:// URL for a TLS server only)"
                    ) from e
                if self.on_disconnect == "raise" or time.monotonic() > deadline:
                    raise ConnectionError(f"nearstore server {self.location} is unreachable: {_message(e)}") from e
                log.warning("nearstore server %s unreachable, retrying in %.2f s", self.location, delay)
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
            except flight.FlightTimedOutError as e:
                raise ConnectionError(
                    f"nearstore server {self.location} did not answer within {getattr(self, limit)} s for dataset"
                    f" {self.name!r} ({limit}: raise it if the server is only slow): frozen, or cut off: {_message(e)}"
                ) from e
            except flight.FlightUnauthenticatedError as e:
                raise PermissionError(f"nearstore server {self.location} refused the token: {_message(e)}") from e
            except flight.FlightUnauthorizedError as e:  # a read token's admin call
                raise PermissionError(f"nearstore server {self.location} refused: {_message(e)}") from e
            except flight.FlightServerError as e:
                refusal = protocol.refused(e)
                if refusal is None:
                    raise
                raise refusal from None


# gRPC's words for a handshake this client broke off (a certificate it could not verify, a server
# not speaking TLS); a server that refuses this client's certificate just closes the socket.
_TLS_REFUSED = "Ssl handshake failed"


def _tls_options(
    scheme: str,
    root_certs: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
) -> dict[str, bytes]:
    """FlightClient's TLS arguments from PEM files; refused on a plaintext grpc:// URL."""
    if scheme != protocol.TLS_SCHEME:
        given = {"tls_root_certs": root_certs, "tls_cert": cert, "tls_key": key}
        named = [option for option, path in given.items() if path is not None]
        if named:
            raise ParameterError(f"{', '.join(named)} given for a {scheme}:// URL: TLS needs a grpc+tls:// one")
        return {}
    options = {} if root_certs is None else {"tls_root_certs": protocol.read_pem(root_certs, "tls_root_certs")}
    pair = protocol.read_key_pair(cert, key)
    if pair is not None:
        options["cert_chain"], options["private_key"] = pair
    return options


def _message(error: Exception) -> str:
    """A transport error's message without Flight's detail (no refusal of ours: those carry their own)."""
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    return text.split(". Detail:")[0].split(". gRPC client debug context")[0]
