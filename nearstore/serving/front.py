"""A size limit in front of the server: nginx proxying gRPC to it, refusing a request past its
method's limit before the server buffers it (Arrow Flight lifts gRPC's limit on a message's size
and pyarrow exposes no hook to set it: apache/arrow#40257). `nginx_front` writes the block for an
nginx of one's own; `NginxFront` runs one as a child process (`nearstore serve --front nginx`)."""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from nearstore.checks import check_integer
from nearstore.errors import ParameterError
from nearstore.serving.server import is_loopback

# Every call but a weights push: tickets and action bodies, a few KiB; the server refuses JSON
# bodies past 8 MiB itself, after receiving them.
REQUEST_BYTES = 16 << 20
# A push streams its weights in 1 MiB batches, each with a few hundred bytes of framing.
PUSH_FRAMING = 1 / 64


def nginx_front(
    listen: str,
    upstream: str,
    max_proxy_bytes: int,
    request_bytes: int = REQUEST_BYTES,
    *,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    insecure: bool = False,
) -> str:
    """An nginx `server { ... }` block (for its `http { }`) listening at `listen` ("host:port")
    and proxying gRPC to the server at `upstream` ("host:port", in the clear: keep it on the
    loopback): a weights push (DoPut) may hold `max_proxy_bytes` and its framing, any other call
    `request_bytes`; past that nginx cuts the stream off and the server holds no more than the
    limit of it. tls_cert, tls_key: PEM files; nginx then terminates TLS (grpc+tls:// for the
    trainers; tokens pass through), as it must beyond 127.0.0.1 unless `insecure` (as the
    server's own rule; start the server with a token too); tls_client_ca: a PEM CA whose
    certificates clients must present (mutual TLS)."""
    max_proxy_bytes = check_integer("max_proxy_bytes", max_proxy_bytes, 1)
    request_bytes = check_integer("request_bytes", request_bytes, 1)
    if (tls_cert is None) != (tls_key is None):
        raise ParameterError("tls_cert and tls_key go together: give both or neither")
    if tls_client_ca is not None and tls_cert is None:
        raise ParameterError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    if not is_loopback(_host(upstream)):
        raise ParameterError(f"upstream {upstream!r} must be on 127.0.0.1: nginx speaks to it in the clear")
    if tls_cert is None and not insecure and not is_loopback(_host(listen)):
        raise ParameterError(
            f"TLS is required to listen on {listen!r}, beyond 127.0.0.1 (give tls_cert and tls_key, or insecure=True)"
        )
    push_bytes = max_proxy_bytes + int(max_proxy_bytes * PUSH_FRAMING) + (1 << 20)
    tls = "" if tls_cert is None else f"\n    ssl_certificate {tls_cert};\n    ssl_certificate_key {tls_key};"
    if tls_client_ca is not None:
        tls += f"\n    ssl_client_certificate {tls_client_ca};\n    ssl_verify_client on;"
    return f"""server {{
    listen {listen}{" ssl" if tls_cert else ""} http2;{tls}
    client_max_body_size {request_bytes};
    location = /arrow.flight.protocol.FlightService/DoPut {{
        client_max_body_size {push_bytes};
        grpc_pass grpc://{upstream};
    }}
    location / {{
        grpc_pass grpc://{upstream};
    }}
}}
"""


def _host(address: str) -> str:
    """The host of "host:port" ("[::1]:port" for IPv6)."""
    return address.rsplit(":", 1)[0].strip("[]")


def nginx_conf(workdir: Path, servers: str) -> str:
    """A whole nginx.conf around `servers` (server blocks) for an nginx in the foreground whose
    pid file, logs and temporary files live in `workdir`. As root its workers run as root's own
    user, not nobody (who could not read `workdir`)."""
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    temp = "".join(
        f"\n    {kind}_temp_path {workdir};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
{user}
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"};
events {{ worker_connections 1024; }}
http {{{temp}
    {servers}
}}
"""


def nginx_binary() -> str | None:
    """The nginx to run: the one on PATH, or where distributions install it; None without one."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def front_for(host: str, front: str) -> str | None:
    """The front `nearstore serve --host HOST --front FRONT` runs: "nginx", or None. "auto" (the
    default) is nginx beyond the loopback interface, where any caller could make the server hold a
    message past its limit whole, and none on it; where nginx is not installed, auto beyond the
    loopback is refused by name rather than served without a limit unasked ("none" says so)."""
    if front not in ("auto", "nginx", "none"):
        raise ParameterError(f"front must be 'auto', 'nginx' or 'none', got {front!r}")
    if front == "auto":
        if is_loopback(host):
            return None
        if nginx_binary() is None:
            raise ParameterError(
                f"serving on {host!r} runs nginx in front of the server (--front auto) to cut off a call past its "
                "limit before the server holds it, and nginx is not installed: install it (e.g. apt-get install "
                "nginx), or pass --front none to serve without one"
            )
        return "nginx"
    return None if front == "none" else front


class NginxFront:
    """nginx running `nginx_front`'s block, a child process that ends with this one (it is sent
    SIGTERM when its parent dies, on Linux). Use as a context manager, or start() and stop()."""

    def __init__(self, listen: str, upstream: str, max_proxy_bytes: int, **options: object) -> None:
        self.listen, self.block = listen, nginx_front(listen, upstream, max_proxy_bytes, **options)
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> NginxFront:
        """Start nginx and return once it listens; a RuntimeError with nginx's own words if it cannot."""
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("--front nginx needs nginx installed (e.g. apt-get install nginx)")
        self._workdir = tempfile.TemporaryDirectory(prefix="nearstore-front-")
        workdir = Path(self._workdir.name)
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_conf(workdir, self.block))
        # what nginx says before its error log is open (a bad directive, a port taken) goes to a file:
        # a pipe nobody reads could fill and stall it
        with open(workdir / "stderr.log", "wb") as stderr:
            self._process = subprocess.Popen(
                [binary, "-c", str(conf), "-p", str(workdir)], stderr=stderr, preexec_fn=_die_with_parent
            )
        port = int(self.listen.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # nginx writes its pid file once its sockets listen (a port someone else holds, it retries
            # a few times, then exits): before that, whoever answers on the port is not nginx
            if self._process.poll() is not None:
                said = " ".join(
                    (workdir / log).read_text() for log in ("stderr.log", "error.log") if (workdir / log).exists()
                )
                self.stop()
                raise RuntimeError(f"nginx exited before listening on {self.listen}: {said.strip()}")
            try:
                if (workdir / "nginx.pid").exists():
                    socket.create_connection((_host(self.listen), port), timeout=0.2).close()
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nginx did not listen on {self.listen} within {timeout} s")

    def stop(self) -> None:
        """Stop nginx (a fast shutdown) and remove its files."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        if self._workdir is not None:
            self._workdir.cleanup()
        self._process = self._workdir = None

    def __enter__(self) -> NginxFront:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, so nginx never outlives the server."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
