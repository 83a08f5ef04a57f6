"""Real servers for the tests, on 127.0.0.1 only: moto's S3 app and nginx, each counting what it
serves, so tests can check I/O figures against the server's own books; and the certificates a
TLS server on 127.0.0.1 and its clients use."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

HOST = "127.0.0.1"


@dataclass
class Served:
    """One request as the server answered it."""

    method: str
    path: str
    status: int
    bytes: int  # of the response's body: what was downloaded
    range: str | None
    received: int = 0  # bytes of the request's body: what was uploaded (the S3 server counts them)
    kind: str = ""  # the S3 server's name for it: GET, HEAD, PUT, COPY, LIST, DELETE or POST


@dataclass
class ServerBooks:
    """Requests a server answered, filtered by path prefix."""

    served: list[Served] = field(default_factory=list)

    def gets(self, prefix: str = "") -> list[Served]:
        return [s for s in self.served if s.method == "GET" and s.path.startswith(prefix)]

    def bytes(self, prefix: str = "") -> int:
        return sum(s.bytes for s in self.gets(prefix))

    def clear(self) -> None:
        self.served.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # the books keep the record
        pass


class S3Server:
    """moto's S3 application on a real socket, behind a WSGI layer that counts every response's
    body bytes and can answer 503 SlowDown to chosen requests (S3's throttling reply), or 403
    AccessDenied to one write (a refusal no client retries: a writer stopped there)."""

    def __init__(self) -> None:
        self.books = ServerBooks()
        self.fail_next = 0  # how many of the coming GETs to refuse with 503
        self.deny_write: int | None = None  # which of the coming PUTs (uploads, copies) to deny, from 0
        self._lock = threading.Lock()
        self._server = make_server(HOST, free_port(), self._app, threaded=True, request_handler=_QuietHandler)
        self._moto = DomainDispatcherApplication(create_backend_app)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self._server.server_port}"

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def start(self) -> S3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()

    def _app(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with self._lock:
            refuse = method == "GET" and self.fail_next > 0
            self.fail_next -= refuse
            deny = method == "PUT" and self.deny_write == 0
            if method == "PUT" and self.deny_write is not None:
                self.deny_write = None if deny else self.deny_write - 1
        if refuse:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            start_response("503 Slow Down", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            self.books.served.append(Served(method, path, 503, len(body), environ.get("HTTP_RANGE")))
            return [body]
        if deny:
            body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            self.books.served.append(Served(method, path, 403, len(body), None, kind="PUT"))
            return [body]
        status = []

        def record_status(line, headers, exc_info=None):
            status.append(int(line.split()[0]))
            return start_response(line, headers, exc_info)

        received = int(environ.get("CONTENT_LENGTH") or 0)
        body = b"".join(self._moto(environ, record_status))
        kind = _s3_kind(method, path, environ.get("QUERY_STRING", ""), "HTTP_X_AMZ_COPY_SOURCE" in environ)
        self.books.served.append(Served(method, path, status[0], len(body), environ.get("HTTP_RANGE"), received, kind))
        return [body]


def _s3_kind(method: str, path: str, query: str, copy: bool) -> str:
    """What an S3 request does: a PUT naming a source is a server-side COPY, a GET of a bucket
    (path-style, as s3fs asks moto) a LIST, a POST ?delete a DELETE of up to 1000 objects."""
    if method == "PUT" and copy:
        return "COPY"
    if method == "GET" and path.strip("/").count("/") == 0:
        return "LIST"
    if method == "POST" and "delete" in query.split("&"):
        return "DELETE"
    return method


class Nginx:
    """nginx serving a directory read-only over HTTP with Range support, logging every response;
    or, given `server`, the server block it makes for a port (a gRPC front: `nearstore.serving.front`)."""

    LOG = re.compile(r'^(\S+) (\S+) (\d+) (\d+) "([^"]*)"$')

    def __init__(self, root: Path | None, workdir: Path, server: Callable[[int], str] | None = None) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is not installed: apt-get install nginx (.ci/run does)")
        self.root, self.port = root, free_port()
        self.log, self.error_log = workdir / "access.log", workdir / "error.log"
        files = f"""server {{
        listen {HOST}:{self.port};
        root {root};
        location / {{ limit_except GET {{ deny all; }} }}
    }}"""
        block = server(self.port) if server is not None else files
        conf = workdir / "nginx.conf"
        # master_process off: one process as the current user, so it reads what the tests wrote.
        conf.write_text(f"""
daemon off;
master_process off;
pid {workdir / "nginx.pid"};
error_log {self.error_log};
events {{ worker_connections 256; }}
http {{
    log_format books '$request_method $uri $status $body_bytes_sent "$http_range"';
    access_log {self.log} books;
    client_body_temp_path {workdir};
    proxy_temp_path {workdir};
    fastcgi_temp_path {workdir};
    uwsgi_temp_path {workdir};
    scgi_temp_path {workdir};
    {block}
}}
""")
        self._process = subprocess.Popen([binary, "-c", str(conf), "-p", str(workdir)], stderr=subprocess.PIPE)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def wait_ready(self, timeout: float = 10) -> Nginx:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self._process.stderr.read().decode()}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nginx did not listen on {HOST}:{self.port} within {timeout} s")

    def books(self) -> ServerBooks:
        """Every response so far, read from the access log."""
        served = []
        for line in self.log.read_text().splitlines() if self.log.exists() else []:
            method, path, status, nbytes, byte_range = self.LOG.match(line).groups()
            served.append(Served(method, path, int(status), int(nbytes), None if byte_range == "-" else byte_range))
        return ServerBooks(served)

    def clear(self) -> None:
        self.log.write_text("")

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA; a server certificate it signed for 127.0.0.1 and localhost; a client
    certificate it signed; and a stranger's self-signed certificate (its own CA), no CA's above."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def write_tls_files(directory: Path) -> TlsFiles:
    """Fresh keys and certificates (EC P-256, valid for a day) written under `directory`."""
    ca_key, server_key, client_key, stranger_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    hosts = [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
    pems = {
        "ca": _certificate("nearstore test CA", ca_key, "nearstore test CA", ca_key, authority=True),
        "server_cert": _certificate(HOST, server_key, "nearstore test CA", ca_key, hosts=hosts),
        "client_cert": _certificate("trainer", client_key, "nearstore test CA", ca_key),
        "stranger_cert": _certificate("stranger", stranger_key, "stranger", stranger_key, authority=True),
    }
    for name, key in (("server_key", server_key), ("client_key", client_key), ("stranger_key", stranger_key)):
        pems[name] = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    for name, pem in pems.items():
        (directory / f"{name}.pem").write_bytes(pem)
    return TlsFiles(**{name: directory / f"{name}.pem" for name in pems})


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    signer: ec.EllipticCurvePrivateKey,
    *,
    authority: bool = False,
    hosts: list[x509.GeneralName] | None = None,
) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a clock a little behind still takes it
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=authority, path_length=None), critical=True)
    )
    if hosts:  # gRPC checks the name dialled against these, not the common name
        builder = builder.add_extension(x509.SubjectAlternativeName(hosts), critical=False)
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def nearstore_serve(url: str, port: int, *options: str) -> subprocess.Popen:
    """`nearstore serve URL --port PORT OPTIONS...` as a process on 127.0.0.1; returns once it
    says it is serving."""
    here = Path(__file__).parent  # the project, and the tests' own modules (models:id_model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(here.parent), str(here)))}
    command = [sys.executable, "-m", "nearstore.app.cli", "serve", url, "--host", HOST, "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:
        if line.startswith(("serving grpc://", "serving grpc+tls://")):
            threading.Thread(target=process.stdout.read, daemon=True).start()  # a full pipe would stall it
            return process
    raise RuntimeError(f"nearstore serve exited with {process.wait()} before serving")
