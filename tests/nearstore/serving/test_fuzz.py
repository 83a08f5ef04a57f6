"""Fuzzing what a server parses: random bytes and JSON as tickets and action bodies are refused
with one of nearstore's errors (a RequestError, a SampleIdError) or taken as a valid request, never
another exception, in the parsers and through a live server (never an internal error)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nearstore import NearstoreError, RequestError, SampleIdError, open_dataset, random_select
from nearstore.selection.selectors import SELECTORS
from nearstore.serving import NearStoreServer, protocol

NUM_SAMPLES = 2500  # the id store's
SERVED = ("x", "y")
REFUSALS = (RequestError, SampleIdError)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=20,
)
# Near-valid requests: each field a valid value or a random one, so refusals deep in a parser are reached.
id_lists = st.lists(st.integers(-3, NUM_SAMPLES + 3), max_size=20) | json_values
tickets = st.fixed_dictionaries(
    {},
    optional={
        "dataset": st.just("ids") | json_values,
        "round": st.sampled_from([0, protocol.ALL_SAMPLES]) | json_values,
        "ids": id_lists,
        "arrays": st.sampled_from([["x"], ["y", "x"], ["z"], []]) | json_values,
    },
)
select_bodies = st.fixed_dictionaries(
    {"method": st.text(max_size=8).filter(lambda m: m not in SELECTORS) | json_values},  # so no round runs
    optional={
        "keep": st.floats(allow_nan=True, allow_infinity=True) | json_values,
        "options": json_values,
        "seed": json_values,
        "request": st.text(max_size=80) | json_values,
    },
)
raw = st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(raw)
def test_parse_takes_a_json_object_or_refuses(body):
    try:
        assert isinstance(protocol.parse(body, "ticket"), dict)
    except RequestError as e:
        assert str(e).startswith("ticket")


@FUZZ
@given(id_lists)
def test_parse_ids_takes_ids_in_range_or_refuses(ids):
    try:
        parsed = protocol.parse_ids(ids, NUM_SAMPLES)
    except REFUSALS:
        return
    assert parsed.dtype == np.int64 and parsed.tolist() == ids and all(0 <= i < NUM_SAMPLES for i in ids)


@FUZZ
@given(st.sampled_from([["x"], ["y", "x"], ["z"]]) | json_values)
def test_parse_arrays_takes_served_names_or_refuses(arrays):
    try:
        parsed = protocol.parse_arrays(arrays, SERVED)
    except RequestError:
        return
    assert set(parsed) <= set(SERVED)


@FUZZ
@given(raw)
def test_a_refusals_extra_info_is_an_error_of_ours_or_none(info):
    error = protocol.refused(flight.FlightServerError("refused", extra_info=info))
    assert error is None or isinstance(error, NearstoreError)


@pytest.fixture(scope="module")
def server(id_store_url):
    dataset = open_dataset(id_store_url)
    server = NearStoreServer(dataset, selection=random_select(dataset, 0.3, seed=1))
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with flight.FlightClient(f"grpc://127.0.0.1:{server.port}") as client:
        yield client


def _refused(call) -> NearstoreError | None:
    """What the server refused the call with (one of our errors), or None if it answered; an
    internal error (any other exception on its side) fails the test."""
    try:
        call()
    except flight.FlightServerError as e:
        refusal = protocol.refused(e)
        assert refusal is not None, f"not a refusal of ours: {e}"
        return refusal
    return None


@FUZZ
@given(tickets.map(lambda t: json.dumps(t).encode()) | raw)
def test_a_live_server_answers_or_refuses_random_tickets(client, server, ticket):
    refusal = _refused(lambda: client.do_get(flight.Ticket(ticket)).read_all())
    assert refusal is None or isinstance(refusal, REFUSALS)


@FUZZ
@given(
    st.tuples(st.just("select"), select_bodies.map(lambda b: json.dumps(b).encode()))
    | st.tuples(st.sampled_from(["selection", "info", "nothing"]), raw)
)
def test_a_live_server_answers_or_refuses_random_action_bodies(client, server, action):
    kind, body = action
    rounds = server.current.round
    refusal = _refused(lambda: list(client.do_action(flight.Action(kind, pa.py_buffer(body)))))
    assert refusal is None or isinstance(refusal, NearstoreError)
    assert kind not in ("select", "nothing") or refusal is not None  # no selector named: no round may run
    assert server.current.round == rounds
