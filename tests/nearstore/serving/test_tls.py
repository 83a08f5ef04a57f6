"""TLS and roles on the near-storage server: grpc+tls:// on 127.0.0.1 with certificates made for
the session, mutual TLS, a read token beside the admin token, and what listening beyond the
loopback interface requires (decided before anything binds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from servers import TlsFiles, free_port, nearstore_serve, write_tls_files

from loaders import FlightSource, StreamingLoader
from nearstore import ParameterError, open_dataset, random_select
from nearstore.serving import NearStoreServer
from nearstore.serving.server import check_exposure

ADMIN, READ = "admin-s3cret", "read-s3cret"


def proxy_model() -> torch.nn.Module:
    """A proxy architecture for the id store: 8 inputs, 5 classes."""
    return torch.nn.Linear(8, 5)


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> TlsFiles:
    return write_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(id_store_url, tls):
    """A grpc+tls:// server on 127.0.0.1 with an admin and a read token, holding a random 30%."""
    id_store = open_dataset(id_store_url)
    server = NearStoreServer(
        id_store,
        selection=random_select(id_store, 0.3, seed=1),
        model=proxy_model,
        token=ADMIN,
        read_token=READ,
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
    )
    yield server
    server.shutdown()


def test_samples_read_through_grpc_tls_equal_local_reads(tls_server, tls, id_data):
    assert tls_server.url.startswith(f"grpc+tls://127.0.0.1:{tls_server.port}/")
    source = FlightSource(tls_server.url, token=READ, tls_root_certs=tls.ca)
    ids = np.array([0, 7, 255, 256, 2499])
    read = source.read(ids, arrays=["x", "y"], round="all")
    np.testing.assert_array_equal(read["x"], id_data["x"][ids])
    np.testing.assert_array_equal(read["y"], id_data["y"][ids])

    # the loader takes the URL as a user gives it, the TLS options as its storage_options
    options = {"token": READ, "tls_root_certs": str(tls.ca)}
    loader = StreamingLoader(tls_server.url, storage_options=options, batch_size=100, backend="torch", device="cpu")
    seen = []
    for x, y in loader:
        ids = x[:, 0].round().long().numpy()
        np.testing.assert_array_equal(x.numpy(), id_data["x"][ids])
        np.testing.assert_array_equal(y.numpy(), id_data["y"][ids])
        seen += ids.tolist()
    assert sorted(seen) == tls_server.current.ids.tolist()


def test_a_client_without_the_servers_ca_is_refused_at_once(tls_server, tls):
    # at once: a certificate this client cannot verify is no server away, so "reconnect" does not retry
    with pytest.raises(ConnectionError, match="TLS handshake .* failed: .*certificate verify failed"):
        FlightSource(tls_server.url, token=READ, on_disconnect="reconnect")
    with pytest.raises(ConnectionError, match="TLS handshake .* failed: .*certificate verify failed"):
        FlightSource(tls_server.url, token=READ, tls_root_certs=tls.stranger_cert)


def test_plaintext_and_tls_do_not_mix(tls_server, tls, id_store):
    plaintext = f"grpc://127.0.0.1:{tls_server.port}/{tls_server.name}"
    with pytest.raises(ConnectionError, match=f"{plaintext.rsplit('/', 1)[0]} is unreachable"):
        FlightSource(plaintext, token=READ, on_disconnect="raise")
    with pytest.raises(ParameterError, match="tls_root_certs given for a grpc:// URL"):
        FlightSource(plaintext, token=READ, tls_root_certs=tls.ca)
    server = NearStoreServer(id_store, selection=random_select(id_store, 0.1))
    try:
        with pytest.raises(ConnectionError, match="TLS handshake .* failed: .*wrong version number"):
            FlightSource(server.url.replace("grpc://", "grpc+tls://"), tls_root_certs=tls.ca)
    finally:
        server.shutdown()


def test_mutual_tls_admits_only_a_certificate_of_the_client_ca(id_store, tls):
    server = NearStoreServer(
        id_store,
        selection=random_select(id_store, 0.1),
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
        tls_client_ca=tls.ca,
    )
    try:
        # the server ends the handshake: the client sees its socket closed, as if the server were away
        with pytest.raises(ConnectionError, match="is unreachable"):
            FlightSource(server.url, tls_root_certs=tls.ca, on_disconnect="raise")
        with pytest.raises(ConnectionError, match="is unreachable"):
            FlightSource(
                server.url,
                tls_root_certs=tls.ca,
                tls_cert=tls.stranger_cert,
                tls_key=tls.stranger_key,
                on_disconnect="raise",
            )
        admitted = FlightSource(server.url, tls_root_certs=tls.ca, tls_cert=tls.client_cert, tls_key=tls.client_key)
        assert admitted.info()["selected"] == 250
    finally:
        server.shutdown()


def test_a_read_token_reads_but_may_not_push_weights_or_select(tls_server, tls, monkeypatch, caplog):
    monkeypatch.delenv("NEARSTORE_TOKEN", raising=False)
    monkeypatch.setenv("NEARSTORE_READ_TOKEN", READ)  # what a trainer holding the read token sets
    reader = FlightSource(tls_server.url, tls_root_certs=tls.ca)
    current, version = tls_server.current, tls_server.proxy_version
    assert reader.info()["round"] == current.round
    np.testing.assert_array_equal(reader.selection(current.round).ids, current.ids)
    assert len(reader.read(current.ids[:4], arrays=["x"], round=current.round)["x"]) == 4

    with caplog.at_level("WARNING", logger="nearstore"):
        with pytest.raises(PermissionError, match=r"the read token may not call do_put \(a proxy weights push\)"):
            reader.update_proxy(proxy_model())
        with pytest.raises(PermissionError, match="the read token may not call action 'select'"):
            reader.select(keep=0.1, method="random", seed=0)
    refused = [r.getMessage() for r in caplog.records if "it holds the read token" in r.getMessage()]
    assert len(refused) == 2 and "do_put" in refused[0] and "'select'" in refused[1]
    assert tls_server.current is current and tls_server.proxy_version == version

    with pytest.raises(PermissionError, match="refused the token"):
        FlightSource(tls_server.url, token="guess", tls_root_certs=tls.ca)

    monkeypatch.setenv("NEARSTORE_TOKEN", ADMIN)  # the admin token, preferred to the read one
    admin = FlightSource(tls_server.url, tls_root_certs=tls.ca)
    admin.update_proxy(proxy_model())
    assert tls_server.proxy_version == version + 1
    assert admin.select(keep=0.1, method="random", seed=0).round == current.round + 1 == tls_server.current.round
    assert len(admin.read(current.ids[:4], arrays=["x"], round=current.round)["x"]) == 4


def test_beyond_loopback_a_token_and_tls_are_required_unless_insecure(id_store, tls, caplog):
    # refused before the scan or a bind: 10.0.0.5 is never listened on
    with pytest.raises(ParameterError, match="a token is required to listen on '10.0.0.5'"):
        NearStoreServer(id_store, host="10.0.0.5", method="no-such-method")
    with pytest.raises(ParameterError, match="TLS is required to listen on '10.0.0.5'"):
        NearStoreServer(id_store, host="10.0.0.5", token=ADMIN, read_token=READ, method="no-such-method")
    with pytest.raises(ParameterError, match="TLS is required to listen on '::'"):
        NearStoreServer(id_store, host="::", token=ADMIN, method="no-such-method")
    with pytest.raises(ParameterError, match="insecure=True and tls_cert contradict"):
        NearStoreServer(
            id_store, token=ADMIN, tls_cert=tls.server_cert, tls_key=tls.server_key, insecure=True, method="x"
        )

    server_tls = {"tls_certificates": [(b"cert", b"key")]}
    with caplog.at_level("WARNING", logger="nearstore"):
        check_exposure("10.0.0.5", ADMIN, server_tls, insecure=False)
        check_exposure("127.0.0.1", None, {}, insecure=False)
        assert not caplog.records
        check_exposure("10.0.0.5", ADMIN, {}, insecure=True)
    (warning,) = caplog.records
    assert "'10.0.0.5' without TLS (insecure=True)" in warning.getMessage()
    assert "the token, the samples shipped" in warning.getMessage()
    with pytest.raises(ParameterError, match="a token is required"):
        check_exposure("10.0.0.5", None, {}, insecure=True)


def test_beyond_loopback_a_server_without_a_front_says_so(id_store, caplog):
    with caplog.at_level("WARNING", logger="nearstore"):
        NearStoreServer(id_store, selection=random_select(id_store, 0.1)).shutdown()  # 127.0.0.1: no front needed
        assert not caplog.records
        # the warning comes before the scan, which fails on the method: 10.0.0.5 is never listened on
        with pytest.raises(ParameterError, match="no-such-method"):
            NearStoreServer(id_store, host="10.0.0.5", token=ADMIN, insecure=True, method="no-such-method")
    said = " ".join(record.getMessage() for record in caplog.records)
    assert "serving on '10.0.0.5' with no front" in said and "NginxFront" in said


def test_tls_files_and_tokens_are_checked_by_name(id_store, tls, tmp_path):
    selection = random_select(id_store, 0.1)
    with pytest.raises(ParameterError, match="tls_cert and tls_key go together"):
        NearStoreServer(id_store, selection=selection, tls_cert=tls.server_cert)
    with pytest.raises(FileNotFoundError, match=f"cannot read tls_key '{tmp_path}/missing.pem'"):
        NearStoreServer(id_store, selection=selection, tls_cert=tls.server_cert, tls_key=tmp_path / "missing.pem")
    (tmp_path / "cert.der").write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ParameterError, match=f"tls_cert '{tmp_path}/cert.der' is not a PEM file"):
        NearStoreServer(id_store, selection=selection, tls_cert=tmp_path / "cert.der", tls_key=tls.server_key)
    with pytest.raises(ParameterError, match="tls_client_ca .* needs tls_cert and tls_key"):
        NearStoreServer(id_store, selection=selection, tls_client_ca=tls.ca)
    with pytest.raises(ParameterError, match=r"cannot listen on grpc\+tls://127.0.0.1:0 with tls_cert"):
        NearStoreServer(id_store, selection=selection, tls_cert=tls.server_cert, tls_key=tls.client_key)
    with pytest.raises(ParameterError, match="read_token must differ from token"):
        NearStoreServer(id_store, selection=selection, token=ADMIN, read_token=ADMIN)
    # started, then unusable: its holder was told only "Invalid metadata"
    for option, token in (("token", "pässwörd"), ("read_token", "tok\r")):
        with pytest.raises(ParameterError, match=f"^{option} must be printable ASCII text") as refused:
            NearStoreServer(id_store, selection=selection, **{option: token})
        assert token not in str(refused.value)  # a secret is not repeated
    with pytest.raises(ParameterError, match="^token must be printable ASCII text"):
        FlightSource("grpc://127.0.0.1:1/ids", token="pässwörd")
    with pytest.raises(ParameterError, match="tls_cert and tls_key go together"):
        FlightSource("grpc+tls://127.0.0.1:1/ids", tls_cert=tls.client_cert)
    with pytest.raises(ParameterError, match="looks like grpc://host:port/dataset"):
        FlightSource("grpcs://127.0.0.1:1/ids")


@pytest.mark.slow  # starts a `nearstore serve` process
def test_nearstore_serve_takes_tls_and_both_tokens_from_its_flags_and_environment(
    id_store_url, tls, monkeypatch, id_data
):
    monkeypatch.setenv("NEARSTORE_TOKEN", ADMIN)
    monkeypatch.setenv("NEARSTORE_READ_TOKEN", READ)
    port = free_port()
    tls_flags = ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
    process = nearstore_serve(id_store_url, port, "--method", "random", "--name", "ids", *tls_flags)
    try:
        url = f"grpc+tls://127.0.0.1:{port}/ids"
        reader = FlightSource(url, token=READ, tls_root_certs=tls.ca, on_disconnect="raise")
        read = reader.read(np.array([3, 2400]), arrays=["x"], round="all")
        np.testing.assert_array_equal(read["x"], id_data["x"][[3, 2400]])
        with pytest.raises(PermissionError, match="read token may not call action 'select'"):
            reader.select(reader.selection().ids, 0, keep=0.1, method="random", options={}, seed=1)
        admin = FlightSource(url, token=ADMIN, tls_root_certs=tls.ca, on_disconnect="raise")
        assert admin.select(admin.selection().ids, 0, keep=0.1, method="random", options={}, seed=1).round == 1
    finally:
        process.kill()
        process.wait()
