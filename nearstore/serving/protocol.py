"""The wire protocol between `NearStoreServer` and its client (`loaders.FlightSource`), over
Arrow Flight; everything both sides must agree on lives here.

- `do_get(ticket)`: a JSON ticket `{"dataset": name, "round": r, "ids": [...], "arrays": [...]}`
  names ids of selection round r (or, with r = ALL_SAMPLES, any ids: a trainer's full-data warm
  epochs) and the sample arrays wanted (default: all). The stream holds the samples in ticket
  order: an int64 `id` column and one column per array: fixed-size binary for fixed-size samples
  (a sample's raw bytes, C order), variable-length binary for encoded ones (their bytes as
  stored); the schema's metadata gives each array's dtype ("bytes" for encoded) and sample shape.
- actions (`ACTIONS`), JSON bodies of at most MAX_TICKET_BYTES naming the dataset
  (`{"dataset": name, ...}`) and answers: `info`, `selection` (`{"round": r}` →
  `Selection.to_bytes()`), `select` (`{"keep", "method", "options", "seed", "request"}` → runs a
  round, answers with its `Selection.to_bytes()`). `request` is the select's idempotency key (the
  client's, one per select, the same on every retry): a select whose key a kept round ran for is
  answered that round and runs none, so a retry whose first try's round landed (its answer lost, the
  server restarted) does not run a second.
- `do_put(weights_descriptor(name, n, images))`: pushes proxy weights (a `torch.save`d state_dict
  of n bytes) as WEIGHTS batches of at most WEIGHTS_CHUNK_BYTES each, with how the proxy is to
  decode encoded images (`image_fields`: the trainer's loader's transform at evaluation; without
  them, `ModelProxy`'s default); the server reads them batch by batch, refusing n over its limit
  before a byte is read and a stream that passes n at once, and answers with the new proxy
  version as the put's metadata.
- roles: a read token (`READ_TOKEN_ENV`) may call do_get and the read actions; the admin token
  (`TOKEN_ENV`) may also push weights (do_put) and start rounds (`ADMIN_ACTIONS`). A read token's
  admin call is a FlightUnauthorizedError naming the call; a missing or wrong token, a
  FlightUnauthenticatedError. Both travel as `authorization: Bearer <token>`, over grpc+tls://
  (`TLS_SCHEME`) whenever the server listens beyond the loopback interface.
- refusals: a FlightServerError whose extra_info is `{"error": class name, "message": ...}`, the
  class one of `nearstore.errors`; the client raises that class again with the message. Nothing
  else of the server's exception crosses: an unexpected one is `internal_error(incident)`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import reprlib
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from nearstore.errors import ERRORS, IntegrityError, NearstoreError, ParameterError, RequestError, restated
from nearstore.storage.dataset import check_ids
from nearstore.storage.images import ImageTransform

MAX_TICKET_BYTES = 8 << 20
MAX_REQUEST_SAMPLES = 65_536
MAX_PROXY_BYTES = 1 << 30  # the server's default limit on pushed weights (max_proxy_bytes)
WEIGHTS_CHUNK_BYTES = 1 << 20
MAX_IMAGE_SIDE = 4096  # a pushed proxy's image size, at most: a bound on what the server decodes
WEIGHTS = pa.schema([pa.field("chunk", pa.binary())])
INT64 = np.iinfo(np.int64)
# The ticket round of a full-data epoch (a loader's warm start): any sample of the dataset.
ALL_SAMPLES = "all"
ACTIONS = {
    "info": "the dataset, the current selection round and the server's I/O counts",
    "selection": "a selection round as Selection.to_bytes()",
    "select": "run a new selection round; answers with it as Selection.to_bytes()",
}
SELECT_FIELDS = ("keep", "method", "options", "seed", "request")
MAX_REQUEST_ID_CHARS = 64  # a select's request id (the client's: a uuid4, 32 hex digits)
# Actions that change what the server serves: the admin token's, as is do_put (a weights push).
ADMIN_ACTIONS = ("select",)
TOKEN_ENV = "NEARSTORE_TOKEN"  # the admin token: reads, pushes weights, starts rounds
READ_TOKEN_ENV = "NEARSTORE_READ_TOKEN"  # the read token: samples, info and selections only


def check_token(name: str, token: str | None) -> None:
    """Refuse a token a gRPC header cannot carry (printable ASCII only): a server started with one
    could not be used, its holder told 'Invalid metadata'. The token itself is not repeated."""
    if token is not None and (not isinstance(token, str) or not all(" " <= c <= "~" for c in token)):
        raise ParameterError(f"{name} must be printable ASCII text (it travels as a gRPC header)")


SCHEME, TLS_SCHEME = "grpc", "grpc+tls"


def bracketed(host: str) -> str:
    """A host as a URL names it: an IPv6 address in brackets ("[::1]"), others as they are."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def read_pem(path: str | os.PathLike[str], option: str) -> bytes:
    """The PEM file (a certificate, a key or a CA bundle) given as `option`."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise restated(e, f"cannot read {option} {str(path)!r}: {e.strerror or e}") from e
    if b"-----BEGIN " not in data:  # gRPC would only say that the server or the channel failed
        raise ParameterError(f"{option} {str(path)!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def read_key_pair(
    cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None
) -> tuple[bytes, bytes] | None:
    """The PEM certificate (chain) and private key given as tls_cert and tls_key; None without them."""
    if (cert is None) != (key is None):
        raise ParameterError(f"tls_cert and tls_key go together, got tls_cert={cert!r} and tls_key={key!r}")
    return None if cert is None else (read_pem(cert, "tls_cert"), read_pem(key, "tls_key"))


def ticket(
    dataset: str,
    round: int | str,
    ids: Sequence[int] | np.ndarray,
    arrays: Sequence[str],
    fingerprint: str | None = None,
) -> flight.Ticket:
    """The client's request for samples `ids` of selection round `round`, arrays `arrays` only, of
    the dataset of `fingerprint` (where known: a server restarted on another store refuses it)."""
    body = {"dataset": dataset, "round": round, "ids": np.asarray(ids).tolist(), "arrays": list(arrays)}
    return flight.Ticket(json.dumps(with_fingerprint(body, fingerprint)).encode())


def with_fingerprint(request: dict[str, Any], fingerprint: str | None) -> dict[str, Any]:
    """`request` naming the dataset's fingerprint too, where there is one (format 1 has none)."""
    return request if fingerprint is None else {**request, "fingerprint": fingerprint}


def parse(raw: bytes | pa.Buffer, what: str, limit: int = MAX_TICKET_BYTES) -> dict[str, Any]:
    """A JSON object of at most `limit` bytes; RequestError naming `what` otherwise."""
    if len(raw) > limit:  # before an action's body is copied out of Arrow's buffer
        raise RequestError(f"{what} of {len(raw)} bytes exceeds the limit of {limit}")
    try:
        request = json.loads(bytes(raw))
    except RecursionError as e:
        raise RequestError(f"{what} is nested too deeply") from e
    except ValueError as e:  # not UTF-8, not JSON, or an integer of more digits than Python converts
        raise RequestError(f"{what} is not JSON: {e}") from e
    if not isinstance(request, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(request).__name__}")
    return request


def parse_ids(raw: Any, num_samples: int) -> np.ndarray:
    """A ticket's ids: a list of at most MAX_REQUEST_SAMPLES integers, each naming a sample."""
    if not isinstance(raw, list):
        raise RequestError(f"ticket 'ids' must be a list of integers, got {type(raw).__name__}")
    if len(raw) > MAX_REQUEST_SAMPLES:
        raise RequestError(f"ticket names {len(raw)} samples; at most {MAX_REQUEST_SAMPLES} per request")
    # int64 first: what numpy holds; the dataset's range is check_ids'
    bad = next((k for k, i in enumerate(raw) if type(i) is not int or not INT64.min <= i <= INT64.max), None)
    if bad is not None:
        raise RequestError(f"ticket 'ids' must be 64-bit integers; item {bad} is {raw[bad]!r}")
    ids = np.asarray(raw, dtype=np.int64)
    check_ids(ids, num_samples, "the served dataset")
    return ids


def parse_arrays(raw: Any, served: Sequence[str]) -> list[str]:
    """A ticket's arrays: names of served sample arrays (default: all of them)."""
    if raw is None:
        return list(served)
    if not isinstance(raw, list) or not all(isinstance(name, str) for name in raw):
        raise RequestError("ticket 'arrays' must be a list of array names")
    unknown = [name for name in raw if name not in served]
    if unknown:
        raise RequestError(f"no sample arrays {unknown} here; this server has {list(served)}")
    if len(set(raw)) < len(raw):  # a reader was made and kept for each spelling: 1.6M names stalled every read
        raise RequestError(f"ticket 'arrays' names {next(n for n in raw if raw.count(n) > 1)!r} more than once")
    return raw


ENCODED = "bytes"  # the metadata dtype of an array of encoded samples


def shard_ranges(shards: Sequence[int] | np.ndarray) -> str:
    """Sorted shard ids as runs, as errors name them: "0-3, 8, 10-11"."""
    runs = np.split(np.asarray(shards), np.flatnonzero(np.diff(shards) != 1) + 1)
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def to_record_batch(ids: np.ndarray, arrays: dict[str, np.ndarray]) -> pa.RecordBatch:
    """ids and each array's samples as binary rows; dtype and shape in the metadata."""
    fields, columns, metadata = [pa.field("id", pa.int64())], [pa.array(ids, type=pa.int64())], {}
    for name, values in arrays.items():
        if values.dtype == object:  # large_binary: a batch of images may pass 2 GiB
            columns.append(pa.array(values, type=pa.large_binary()))
            fields.append(pa.field(name, pa.large_binary()))
            metadata[name] = json.dumps({"dtype": ENCODED, "shape": []})
            continue
        values = np.ascontiguousarray(values)
        kind = pa.binary(values.itemsize * math.prod(values.shape[1:]))
        columns.append(pa.FixedSizeBinaryArray.from_buffers(kind, len(values), [None, pa.py_buffer(values)]))
        fields.append(pa.field(name, kind))
        metadata[name] = json.dumps({"dtype": values.dtype.str, "shape": list(values.shape[1:])})
    return pa.record_batch(columns, schema=pa.schema(fields, metadata=metadata))


def from_table(table: pa.Table) -> dict[str, np.ndarray]:
    """`to_record_batch`'s arrays again, {name: samples}, without the id column."""
    arrays = {}
    for name in table.column_names[1:]:
        layout = json.loads(table.schema.metadata[name.encode()])
        column = table.column(name).combine_chunks()
        if layout["dtype"] == ENCODED:
            arrays[name] = column.to_numpy(zero_copy_only=False)
            continue
        raw = np.frombuffer(column.buffers()[1], dtype=np.uint8)
        width = column.type.byte_width
        rows = raw[column.offset * width : (column.offset + len(column)) * width]
        arrays[name] = rows.view(np.dtype(layout["dtype"])).reshape(len(column), *layout["shape"])
    return arrays


def weights_descriptor(
    dataset: str,
    nbytes: int,
    images: ImageTransform | None = None,
    fingerprint: str | None = None,
    head: str | None = None,
) -> flight.FlightDescriptor:
    """The client's do_put of proxy weights of `nbytes` bytes for `dataset` (of `fingerprint`, as
    `ticket`); `images`: how the proxy is to decode encoded images (the loader's evaluation
    transform), None: its default; `head`: the name of the model's classifier (None: found by
    running it)."""
    request: dict[str, Any] = {"dataset": dataset, "bytes": nbytes}
    if images is not None:
        request["images"] = image_fields(images)
    if head is not None:
        request["head"] = head
    return flight.FlightDescriptor.for_command(json.dumps(with_fingerprint(request, fingerprint)).encode())


def image_fields(images: ImageTransform) -> dict[str, Any]:
    """What of an `ImageTransform` its evaluation (train=False) decode depends on, as JSON takes it."""
    return {"size": images.size, "resize": images.resize, "mean": list(images.mean), "std": list(images.std)}


def parse_head(raw: Any) -> str | None:
    """A push's `head`: a module's name in the model (dots between), or None."""
    if raw is not None and (not isinstance(raw, str) or not 0 < len(raw) <= 1000):
        raise RequestError(f"a weights push's head must be a module's name, got {raw!r}")
    return raw


def parse_images(raw: Any) -> ImageTransform | None:
    """`image_fields` (a weights descriptor's 'images') as the evaluation transform (train=False)
    they describe; None where there are none."""
    if raw is None:
        return None
    fields = ("size", "resize", "mean", "std")
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise RequestError(
            f"weights descriptor's 'images' must be an object of {', '.join(fields)}, got {reprlib.repr(raw)}"
        )
    size, resize, mean, std = (raw[name] for name in fields)
    triples = all(isinstance(v, list) and len(v) == 3 and all(_number(c) for c in v) for v in (mean, std))
    sides = [side for side in (size, resize) if side is not None]
    if not all(type(side) is int and side <= MAX_IMAGE_SIDE for side in sides) or not triples:
        raise RequestError(
            f"weights descriptor's 'images' must hold sizes of at most {MAX_IMAGE_SIDE} pixels and 3 numbers"
            f" a statistic, got {reprlib.repr(raw)}"
        )
    try:
        return ImageTransform(size=size, train=False, resize=resize, mean=tuple(mean), std=tuple(std))
    except ParameterError as e:
        raise RequestError(f"weights descriptor's 'images': {e}") from None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def weight_batches(body: bytes | memoryview) -> Iterator[pa.RecordBatch]:
    """`body` as WEIGHTS batches of one chunk of at most WEIGHTS_CHUNK_BYTES each."""
    view = memoryview(body)
    for start in range(0, len(view), WEIGHTS_CHUNK_BYTES):
        chunk = bytes(view[start : start + WEIGHTS_CHUNK_BYTES])
        yield pa.record_batch([pa.array([chunk], type=pa.binary())], schema=WEIGHTS)


def read_weights(reader: flight.MetadataRecordBatchReader, nbytes: int) -> bytearray:
    """The `nbytes` bytes a do_put stream of WEIGHTS batches holds, read batch by batch: a stream
    that passes `nbytes` is refused at the batch that does, so a client that announced fewer bytes
    than it sends costs the server nbytes and one message, not what it sends."""
    if reader.schema != WEIGHTS:
        raise RequestError(f"pushed weights must be batches of {WEIGHTS}, got {reader.schema}")
    body = bytearray(nbytes)
    filled = 0
    for chunk in reader:
        for value in chunk.data.column(0):
            data = value.as_buffer() or b""  # a null chunk holds no bytes
            if filled + len(data) > nbytes:
                raise RequestError(f"pushed weights pass the {nbytes} bytes their descriptor announced")
            body[filled : filled + len(data)] = data
            filled += len(data)
    if filled != nbytes:
        raise RequestError(f"pushed weights hold {filled} bytes, not the {nbytes} their descriptor announced")
    return body


# The gRPC metadata a client takes, extra_info among it (gRPC's default: 8 KiB, then at most 16):
# an IntegrityError's ids, packed, for a request's 65,536 ids at most.
MAX_METADATA_BYTES = 1 << 20


def refusal(error: NearstoreError) -> flight.FlightServerError:
    """What the server raises for one of our errors: its class and message in extra_info (and an
    IntegrityError's sample ids, so a loader can skip them: packed, as their JSON list of a batch
    of 4,096 passed what gRPC carries, and crossed as an unnamed error)."""
    info = {"error": type(error).__name__, "message": str(error)}
    if isinstance(error, IntegrityError):
        info["ids"] = _packed(error.ids)
    return flight.FlightServerError(str(error), extra_info=json.dumps(info).encode())


def _packed(ids: Sequence[int]) -> str:
    """Sorted ids as base64 of their zlib'd differences (a shard's ids: a byte or two each, or less)."""
    steps = np.diff(np.asarray(ids, dtype=np.int64), prepend=0).astype("<i8")
    return base64.b64encode(zlib.compress(steps.tobytes())).decode()


def _unpacked(packed: str) -> tuple[int, ...]:
    return tuple(np.cumsum(np.frombuffer(zlib.decompress(base64.b64decode(packed)), dtype="<i8")).tolist())


def internal_error(incident: str) -> flight.FlightServerError:
    """What the server raises for an error not of ours: the incident id its log holds the
    traceback under, and nothing of the error (its message may hold paths of the server's)."""
    return flight.FlightServerError(f"internal error {incident} (the server's log holds its traceback)")


def refused(error: flight.FlightServerError) -> NearstoreError | None:
    """The error a server's refusal stands for, as the class it raised; None if not a refusal."""
    try:
        info = json.loads(error.extra_info or b"")
        if info["error"] == IntegrityError.__name__:
            return IntegrityError(info["message"], _unpacked(info["ids"]) if "ids" in info else ())
        return ERRORS[info["error"]](info["message"])
    except (ValueError, KeyError, TypeError, zlib.error):
        return None
