"""Faults to inject into real processes: importable by name, so Dask workers can load them; and a
proxy in front of object storage that answers some requests with the faults networks make."""

from __future__ import annotations

import http.client
import os
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from distributed import WorkerPlugin

# What FaultyProxy can do to a request, each a fault a client meets on real networks:
# "503", "500": S3's throttling reply and an internal error, as S3 words them;
# "reset": the connection reset (TCP RST) before any answer;
# "short": headers with the honest Content-Length, then the socket closed half-way through the body;
# "cut": the body cut in half, Content-Length saying the cut length (a complete answer, too short);
# "stall": no answer for `stall_seconds`, past the client's read timeout, then the socket closed.
FAULTS = ("503", "500", "reset", "short", "cut", "stall")
_ERRORS = {
    "503": ("Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": ("Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


class KillWorkerOnce(WorkerPlugin):
    """Kill the first worker that starts a task whose key begins with `prefix`, once: the marker
    file says it happened (and stops the restarted worker from dying again)."""

    def __init__(self, prefix: str, marker: str) -> None:
        self.prefix, self.marker = prefix, marker

    def transition(self, key, start, finish, **kwargs) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if finish == "executing" and str(name).startswith(self.prefix) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)


def stall_after_first(scan, shards: list[int], *, name: str) -> int:
    """A pass's task that stalls: the first partition's (shard 0) sets the cluster's Event
    `name`-first and returns; any other waits for the Event `name` (at most 60 s)."""
    from distributed import Event

    if shards[0] == 0:
        Event(f"{name}-first").set()
    else:
        Event(name).wait(60)
    return len(shards)


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` (moto's S3) that answers a share `rate` of
    the GETs `where` picks (by path) with a fault drawn from `faults` by a seeded RNG, and forwards
    everything else. `budget` bounds the faults injected (None: no bound, a fault that persists).
    `stall_seconds` should pass the client's read timeout.

    `injected` counts the faults by kind, `forwarded` the requests answered by the upstream.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rate: float,
        faults: Sequence[str] = FAULTS,
        seed: int = 0,
        budget: int | None = None,
        stall_seconds: float = 1.0,
        where: Callable[[str], bool] = lambda path: True,
    ) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"faults must be among {FAULTS}, got {sorted(unknown)}")
        self.upstream = urlparse(upstream)
        self.rate, self.faults, self.budget, self.where = rate, tuple(faults), budget, where
        self.stall_seconds = stall_seconds
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()  # ends stalls at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def faulting(self, rate: float, seed: int) -> None:
        """Fault a share `rate` of requests from now on, drawn from a fresh RNG seeded `seed`."""
        with self._lock:
            self.rate, self._rng = rate, random.Random(seed)

    def draw(self, method: str, path: str) -> str | None:
        """The fault for this request, if any (counted as injected)."""
        if method != "GET" or not self.where(path):
            return None
        with self._lock:
            if self.budget is not None and sum(self.injected.values()) >= self.budget:
                return None
            if self._rng.random() >= self.rate:
                return None
            fault = self._rng.choice(self.faults)
            self.injected[fault] += 1
            return fault

    # What the link does to an answer that goes through (SlowLink slows and counts it).
    def first_byte(self) -> None:
        """Called before an answer's first byte is sent."""

    def send(self, out, body: bytes) -> None:
        """Send an answer's body to the client."""
        out.write(body)

    def passed(self, method: str, path: str, status: int, nbytes: int) -> None:
        """An answer went through: `nbytes` of body sent."""


class SlowLink(FaultyProxy):
    """A FaultyProxy that faults nothing and is a slow link instead: each answer's first byte
    `latency` seconds after its upstream answered (on top of the upstream's own time), and every body
    through one token bucket of `bandwidth` bytes/s shared by all connections, sent in pieces of
    `piece` bytes. Counts what went through: `take`.

    Per request on S3 that is the time to first byte (tens of ms) and the throughput that one
    client's connections share; 20 ms and 100 MB/s by default.
    """

    def __init__(self, upstream: str, *, latency: float = 0.02, bandwidth: float = 100e6, piece: int = 1 << 16) -> None:
        if not 0 <= latency < 60:
            raise ValueError(f"latency must be in [0, 60) s, got {latency}")
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s, got {bandwidth}")
        super().__init__(upstream, rate=0.0)
        self.latency, self.bandwidth, self.piece = latency, bandwidth, piece
        self.requests: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._link_free = 0.0  # when the bucket's bytes queued so far have all gone (monotonic s)

    def first_byte(self) -> None:
        time.sleep(self.latency)

    def send(self, out, body: bytes) -> None:
        view = memoryview(body)
        for start in range(0, len(view), self.piece):
            piece = view[start : start + self.piece]
            with self._lock:  # the piece leaves once the pieces queued before it, on every connection, have
                done = self._link_free = max(time.monotonic(), self._link_free) + len(piece) / self.bandwidth
            time.sleep(max(0.0, done - time.monotonic()))
            out.write(piece)

    def passed(self, method: str, path: str, status: int, nbytes: int) -> None:
        kind = "LIST" if method == "GET" and "/" not in path.strip("/") else method  # a GET of a bucket lists it
        with self._lock:
            self.requests[kind] += 1
            self.bytes[kind] += nbytes

    def take(self) -> dict[str, dict[str, int]]:
        """{"requests": {kind: n}, "bytes": {kind: body bytes}} since the last take, by method, a
        GET of a bucket (not of an object) counted as "LIST"."""
        with self._lock:
            counts = {"requests": dict(self.requests), "bytes": dict(self.bytes)}
            self.requests.clear()
            self.bytes.clear()
            return counts


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled answer must not hold stop() up
    # socketserver listens with a backlog of 5: a client opening its 32 connections at once had the
    # rest of its SYNs dropped and resent a second later (~1 s on a first read), which S3 never does
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up on a fault is no error
            super().handle_error(request, client_address)


def _handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `proxy` (http.server makes one handler per request)."""
    local = threading.local()  # one keep-alive connection upstream per proxy thread

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:  # the counters keep the record
            pass

        def do_GET(self) -> None:
            self._answer()

        do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = proxy.draw(self.command, urlparse(self.path).path)
            if fault in _ERRORS:
                return self._error(fault)
            if fault == "reset":
                return self._reset()
            if fault == "stall":
                proxy._stopped.wait(proxy.stall_seconds)
                return self._reset()
            status, reason, headers, payload = self._forward(body)
            response_length = next((v for n, v in headers if n.lower() == "content-length"), "0")
            sent = payload
            if fault in ("short", "cut"):
                sent = payload[: len(payload) // 2]
                if fault == "cut":
                    payload = sent  # the header agrees with the cut body
            self.send_response(status, reason)
            for name, value in headers:
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            # a HEAD's Content-Length is the object's size, not its (empty) body's
            size = response_length if self.command == "HEAD" else len(payload)
            self.send_header("Content-Length", str(size))
            proxy.first_byte()
            self.end_headers()
            if self.command != "HEAD":
                proxy.send(self.wfile, sent)
            proxy.passed(self.command, urlparse(self.path).path, status, 0 if self.command == "HEAD" else len(sent))
            if fault == "short":
                self._reset()

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            connection = getattr(local, "connection", None)
            if connection is None:
                connection = local.connection = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=30
                )
            connection.request(self.command, self.path, body=body or None, headers=dict(self.headers))
            response = connection.getresponse()
            payload = response.read()
            with proxy._lock:
                proxy.forwarded += 1
            return response.status, response.reason, response.getheaders(), payload

        def _error(self, status: str) -> None:
            reason, code, message = _ERRORS[status]
            body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
            self.send_response(int(status), reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _reset(self) -> None:
            """Close with a TCP RST (linger 0), as a reset connection reads to the client."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

    return Handler
