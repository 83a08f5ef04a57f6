"""A size limit in front of the server: nginx proxying gRPC to it, refusing a request past its
method's limit before the server buffers it (Arrow Flight lifts gRPC's limit on a message's size
and pyarrow exposes no hook to set it: apache/arrow#40257)."""

from __future__ import annotations

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
    insecure: bool = False,
) -> str:
    """An nginx `server { ... }` block (for its `http { }`) listening at `listen` ("host:port")
    and proxying gRPC to the server at `upstream` ("host:port", in the clear: keep it on the
    loopback): a weights push (DoPut) may hold `max_proxy_bytes` and its framing, any other call
    `request_bytes`; past that nginx cuts the stream off and the server holds no more than the
    limit of it. tls_cert, tls_key: PEM files; nginx then terminates TLS (grpc+tls:// for the
    trainers; tokens pass through), as it must beyond 127.0.0.1 unless `insecure` (as the
    server's own rule; start the server with a token too)."""
    max_proxy_bytes = check_integer("max_proxy_bytes", max_proxy_bytes, 1)
    request_bytes = check_integer("request_bytes", request_bytes, 1)
    if (tls_cert is None) != (tls_key is None):
        raise ParameterError("tls_cert and tls_key go together: give both or neither")
    if not is_loopback(_host(upstream)):
        raise ParameterError(f"upstream {upstream!r} must be on 127.0.0.1: nginx speaks to it in the clear")
    if tls_cert is None and not insecure and not is_loopback(_host(listen)):
        raise ParameterError(
            f"TLS is required to listen on {listen!r}, beyond 127.0.0.1 (give tls_cert and tls_key, or insecure=True)"
        )
    push_bytes = max_proxy_bytes + int(max_proxy_bytes * PUSH_FRAMING) + (1 << 20)
    tls = "" if tls_cert is None else f"\n    ssl_certificate {tls_cert};\n    ssl_certificate_key {tls_key};"
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
