"""nginx in front of `nearstore serve` (nearstore.serving.front), our own or the one `--front nginx`
runs: calls pass through, and a request past its method's limit is cut off before the server
buffers it whole."""

from __future__ import annotations

import signal
import socket
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from models import id_model
from servers import HOST, Nginx, free_port, nearstore_serve, write_tls_files

from loaders import FlightSource, StreamingLoader
from nearstore import ParameterError, serving
from nearstore.app.cli import main
from nearstore.serving import NearStoreServer, protocol
from nearstore.serving import front as fronts
from nearstore.serving.front import REQUEST_BYTES, NginxFront, front_for, nginx_front

pytestmark = pytest.mark.slow  # starts a `nearstore serve` process and nginx

LIMIT = 8 << 20  # the server's max_proxy_bytes; other calls 1 MiB at the front


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


@pytest.fixture
def front(id_store_url, tmp_path):
    port = free_port()
    model = "models:id_model"
    server = nearstore_serve(
        id_store_url, port, "--method", "random", "--name", "ids", "--model", model, "--max-proxy-bytes", str(LIMIT)
    )
    nginx = Nginx(None, tmp_path, lambda at: nginx_front(f"{HOST}:{at}", f"{HOST}:{port}", LIMIT, 1 << 20))
    try:
        yield server, nginx.wait_ready()
    finally:
        nginx.stop()
        server.kill()
        server.wait()


def test_a_loader_reads_and_pushes_through_the_front(front, id_data):
    _, nginx = front
    loader = StreamingLoader(f"grpc://{HOST}:{nginx.port}/ids", batch_size=500, backend="torch", device="cpu")
    seen = np.concatenate([x[:, 0].round().long().numpy() for x, _ in loader])
    assert np.array_equal(np.sort(seen), loader.ids)
    loader.update_proxy(id_model())  # a push under the limit passes


def push_past_the_limits(port: int, pid: int, limit: int) -> None:
    """Send an action body and a weights push far past their limits to the front at `port`; both
    are cut off, the server at `pid` grows by less than twice the front's larger `limit`, and
    still serves."""
    client = flight.connect(f"grpc://{HOST}:{port}")
    before = rss_bytes(pid)
    with pytest.raises(flight.FlightError):  # 64 MiB of action body against the front's 1 or 16 MiB
        list(client.do_action(flight.Action("select", bytes(64 << 20))))
    descriptor = protocol.weights_descriptor("ids", 100)  # announces 100 bytes, sends one 64 MiB batch
    batch = pa.record_batch([pa.array([bytes(64 << 20)], type=pa.binary())], schema=protocol.WEIGHTS)
    with pytest.raises(flight.FlightError):
        writer, _ = client.do_put(descriptor, protocol.WEIGHTS)
        writer.write_batch(batch)
        writer.close()
    # 1.2-1.5x here (a few MiB of the process's own on 8 MiB; 1.02x at 1 GiB); without the front, 16x
    assert rss_bytes(pid) - before < 2 * limit
    assert len(client.list_actions()) > 0  # and it still serves


def test_a_call_past_its_limit_is_cut_off_before_the_server_holds_it(front):
    server, nginx = front
    push_past_the_limits(nginx.port, server.pid, LIMIT)  # other calls: 1 MiB
    assert "client intended to send too large" in nginx.error_log.read_text()


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in found.split()]


def test_serve_runs_its_own_front_and_stops_it_with_itself(id_store_url):
    port = free_port()
    model = "models:id_model"
    options = ["--method", "random", "--name", "ids", "--model", model, "--max-proxy-bytes", str(LIMIT)]
    server = nearstore_serve(id_store_url, port, *options, "--front", "nginx")
    try:
        (nginx,) = children(server.pid)
        assert "nginx" in open(f"/proc/{nginx}/cmdline").read()
        loader = StreamingLoader(f"grpc://{HOST}:{port}/ids", batch_size=500, backend="torch", device="cpu")
        seen = np.concatenate([x[:, 0].round().long().numpy() for x, _ in loader])
        assert np.array_equal(np.sort(seen), loader.ids)
        loader.update_proxy(id_model())  # a push under the limit passes the front
        push_past_the_limits(port, server.pid, max(LIMIT, REQUEST_BYTES))  # other calls: the default 16 MiB
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert not children(server.pid)
    with pytest.raises(OSError):  # nobody listens there any more
        socket.create_connection((HOST, port), timeout=1).close()


def test_serve_starts_its_server_on_port_0_and_its_front_proxies_to_the_port_it_got(
    id_store_url, id_data, monkeypatch, capsys
):
    """No port is picked for the server before it listens (another process could take it meanwhile,
    during the scan): it binds port 0, and nginx proxies to the port the OS gave it."""
    asked, served = [], []

    class Server(NearStoreServer):
        def __init__(self, *args, **kwargs) -> None:
            asked.append(kwargs["port"])
            super().__init__(*args, **kwargs)

        def serve(self) -> None:  # in place of waiting for SIGTERM: read through the front, then stop
            try:
                source = FlightSource(f"grpc://{HOST}:{port}/ids", on_disconnect="raise")
                served.append((self.port, source.read(np.array([3, 2400]), arrays=["x"], round="all")["x"]))
                source.close()
            finally:
                self.shutdown()

    monkeypatch.setattr(serving, "NearStoreServer", Server)
    port = free_port()
    argv = ["serve", id_store_url, "--method", "random", "--name", "ids", "--host", HOST, "--port", str(port)]
    assert main([*argv, "--front", "nginx"]) == 0
    assert asked == [0]
    ((server_port, read),) = served
    np.testing.assert_array_equal(read, id_data["x"][[3, 2400]])
    said = f"serving grpc://{HOST}:{port}/ids (nginx in front of grpc://127.0.0.1:{server_port}/ids)"
    assert said in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "0"], "nginx in front (--front nginx) listens on --port: give one, not 0"),
        (["--host", "0.0.0.0", "--port", "8815"], "a token is required to listen on '0.0.0.0'"),
        (["--port", "8815", "--tls-cert", "cert.pem"], "tls_cert and tls_key go together"),
    ],
)
def test_serve_with_a_front_keeps_the_rules_of_exposure(id_store_url, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("NEARSTORE_TOKEN", raising=False)
    monkeypatch.delenv("NEARSTORE_READ_TOKEN", raising=False)
    scanned = []
    monkeypatch.setattr(serving.server, "next_round", lambda *args, **kwargs: scanned.append(args))
    assert main(["serve", id_store_url, "--method", "random", "--front", "nginx", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not scanned  # refused before the scan


@pytest.mark.parametrize(
    "host, front, chosen",
    [
        ("127.0.0.1", "auto", None),
        ("localhost", "auto", None),
        ("::1", "auto", None),
        ("10.0.0.5", "auto", "nginx"),
        ("0.0.0.0", "auto", "nginx"),
        ("10.0.0.5", "none", None),
        ("127.0.0.1", "nginx", "nginx"),
    ],
)
def test_a_front_is_the_default_beyond_the_loopback(host, front, chosen):
    assert front_for(host, front) == chosen


def test_beyond_the_loopback_without_nginx_serve_asks_for_front_none(id_store_url, capsys, monkeypatch):
    monkeypatch.setattr(fronts, "nginx_binary", lambda: None)
    with pytest.raises(ParameterError, match="front must be 'auto', 'nginx' or 'none', got 'apache'"):
        front_for("10.0.0.5", "apache")
    assert front_for("127.0.0.1", "auto") is None  # on the loopback no front is needed
    monkeypatch.setenv("NEARSTORE_TOKEN", "t")
    argv = ["serve", id_store_url, "--method", "random", "--host", "10.0.0.5", "--insecure"]
    assert main(argv) == 2  # refused before anything listens
    said = capsys.readouterr().err
    assert "serving on '10.0.0.5' runs nginx in front of the server (--front auto)" in said
    assert "nginx is not installed" in said and "--front none" in said


def test_a_front_that_cannot_listen_says_why(tmp_path):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        address = f"{HOST}:{taken.getsockname()[1]}"
        with pytest.raises(RuntimeError, match=f"nginx exited before listening on {address}: .*in use"):
            NginxFront(address, f"{HOST}:1", LIMIT).start()


def test_the_front_terminates_tls(id_store_url, id_data, tmp_path):
    tls = write_tls_files(tmp_path)
    port = free_port()
    server = nearstore_serve(id_store_url, port, "--method", "random", "--name", "ids")
    nginx = Nginx(
        None,
        tmp_path,
        lambda at: nginx_front(
            f"{HOST}:{at}", f"{HOST}:{port}", LIMIT, tls_cert=str(tls.server_cert), tls_key=str(tls.server_key)
        ),
    )
    try:
        nginx.wait_ready()
        source = FlightSource(f"grpc+tls://{HOST}:{nginx.port}/ids", tls_root_certs=tls.ca)
        read = source.read(np.array([3, 2400]), arrays=["x"], round="all")
        np.testing.assert_array_equal(read["x"], id_data["x"][[3, 2400]])
    finally:
        nginx.stop()
        server.kill()
        server.wait()


def test_bad_limits_and_exposures_are_named():
    with pytest.raises(ParameterError, match="max_proxy_bytes"):
        nginx_front("127.0.0.1:1", "127.0.0.1:2", 0)
    with pytest.raises(ParameterError, match="tls_cert and tls_key go together"):
        nginx_front("127.0.0.1:1", "127.0.0.1:2", 1, tls_cert="cert.pem")
    with pytest.raises(ParameterError, match="TLS is required to listen on '10.0.0.5:8815'"):
        nginx_front("10.0.0.5:8815", "127.0.0.1:2", 1)
    with pytest.raises(ParameterError, match="upstream '10.0.0.6:8816' must be on 127.0.0.1"):
        nginx_front("127.0.0.1:1", "10.0.0.6:8816", 1)
    with pytest.raises(ParameterError, match="tls_client_ca \\(mutual TLS\\) needs tls_cert and tls_key"):
        nginx_front("127.0.0.1:1", "127.0.0.1:2", 1, tls_client_ca="ca.pem")
    mutual = nginx_front("127.0.0.1:1", "127.0.0.1:2", 1, tls_cert="c.pem", tls_key="k.pem", tls_client_ca="ca.pem")
    assert "ssl_client_certificate ca.pem;" in mutual and "ssl_verify_client on;" in mutual
    assert "listen 10.0.0.5:8815 http2;" in nginx_front("10.0.0.5:8815", "[::1]:8816", 1, insecure=True)
