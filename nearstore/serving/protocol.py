"""The wire protocol between `NearStoreServer` and its client (`loaders.FlightSource`), over
Arrow Flight; everything both sides must agree on lives here.

- `do_get(ticket)`: a JSON ticket `{"dataset": name, "round": r, "ids": [...], "arrays": [...]}`
  names ids of selection round r (or, with r = ALL_SAMPLES, any ids: a trainer's full-data warm
  epochs) and the sample arrays wanted (default: all). The stream holds the samples in ticket
  order: an int64 `id` column and one column per array: fixed-size binary for fixed-size samples
  (a sample's raw bytes, C order), variable-length binary for encoded ones (their bytes as
  stored); the schema's metadata gives each array's dtype ("bytes" for encoded) and sample shape.
- actions (`ACTIONS`), JSON bodies and answers: `info`, `selection` (`{"round": r}` →
  `Selection.to_bytes()`), `update_proxy` (a `torch.save`d state_dict → the new proxy version),
  `select` (`{"keep", "method", "options", "seed"}` → runs a round, answers like `info`).
- refusals: a FlightServerError whose extra_info is `{"error": class name, "message": ...}`, the
  class one of `nearstore.errors`; the client raises that class again with the message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from nearstore.errors import ERRORS, NearstoreError, RequestError
from nearstore.storage.dataset import check_ids

MAX_TICKET_BYTES = 8 << 20
MAX_REQUEST_SAMPLES = 65_536
MAX_PROXY_BYTES = 1 << 30
# The ticket round of a full-data epoch (a loader's warm start): any sample of the dataset.
ALL_SAMPLES = "all"
ACTIONS = {
    "info": "the dataset, the current selection round and the server's I/O counts",
    "selection": "a selection round as Selection.to_bytes()",
    "update_proxy": "push a torch state_dict of the proxy model",
    "select": "run a new selection round",
}
SELECT_FIELDS = ("keep", "method", "options", "seed")


def ticket(dataset: str, round: int | str, ids: Sequence[int] | np.ndarray, arrays: Sequence[str]) -> flight.Ticket:
    """The client's request for samples `ids` of selection round `round`, arrays `arrays` only."""
    body = {"dataset": dataset, "round": round, "ids": np.asarray(ids).tolist(), "arrays": list(arrays)}
    return flight.Ticket(json.dumps(body).encode())


def parse(raw: bytes, what: str, limit: int = MAX_TICKET_BYTES) -> dict[str, Any]:
    """A JSON object of at most `limit` bytes; RequestError naming `what` otherwise."""
    if len(raw) > limit:
        raise RequestError(f"{what} of {len(raw)} bytes exceeds the limit of {limit}")
    try:
        request = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"{what} is not JSON: {e}") from e
    if not isinstance(request, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(request).__name__}")
    return request


def parse_ids(raw: Any, num_samples: int) -> np.ndarray:
    """A ticket's ids: a list of at most MAX_REQUEST_SAMPLES integers, each naming a sample."""
    if not isinstance(raw, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        raise RequestError("ticket 'ids' must be a list of integers")
    if len(raw) > MAX_REQUEST_SAMPLES:
        raise RequestError(f"ticket names {len(raw)} samples; at most {MAX_REQUEST_SAMPLES} per request")
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
    return raw


ENCODED = "bytes"  # the metadata dtype of an array of encoded samples


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


def refusal(error: NearstoreError) -> flight.FlightServerError:
    """What the server raises for one of our errors: its class and message in extra_info."""
    info = {"error": type(error).__name__, "message": str(error)}
    return flight.FlightServerError(str(error), extra_info=json.dumps(info).encode())


def refused(error: flight.FlightServerError) -> NearstoreError | None:
    """The error a server's refusal stands for, as the class it raised; None if not a refusal."""
    try:
        info = json.loads(error.extra_info or b"")
        return ERRORS[info["error"]](info["message"])
    except (ValueError, KeyError, TypeError):
        return None
