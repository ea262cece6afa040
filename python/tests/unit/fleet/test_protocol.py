"""The fleet's messages: round trips, and every malformed message refused clearly."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.fleet import protocol
from keel.fleet.protocol import FleetProtocolError, Reply, Request, decode


def json_values() -> st.SearchStrategy[object]:
    """JSON values, with the shapes of fleet messages likely among them."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    keys = st.sampled_from(["v", "type", "id", "re", "ok", "body", "error"]) | st.text(max_size=5)
    return st.recursive(
        scalars | st.sampled_from([1, "reply", "status", "audit", "abc"]),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=6),
        max_leaves=20,
    )


def test_round_trips() -> None:
    request = Request("checkpoint", "abc-1", {"from": [3, 1]})
    assert decode(request.encode()) == request
    reply = Reply("abc-1", True, {"note": "x"})
    assert decode(reply.encode()) == reply
    failed = Reply("abc-1", False, error="nope " * 200)
    decoded = decode(failed.encode())
    assert isinstance(decoded, Reply)
    assert not decoded.ok
    assert len(decoded.error) == protocol.MAX_ERROR


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        (b"not json", "fleet message"),
        (b"[]", "is a JSON object"),
        (b'{"v": 2, "type": "status", "id": "a"}', "version"),
        (b'{"v": 1, "type": "launch", "id": "a"}', "unknown fleet message type"),
        (b'{"v": 1, "type": "status"}', "lacks 'id'"),
        (b'{"v": 1, "type": "status", "id": "a b"}', "id must be"),
        (b'{"v": 1, "type": "status", "id": "' + b"x" * 65 + b'"}', "id must be"),
        (b'{"v": 1, "type": "status", "id": "a", "body": []}', "status.body must be an object"),
        (b'{"v": 1, "type": "status", "id": "a", "from": "me"}', "unknown key 'from'"),
        (b'{"v": 1, "type": "reply", "re": "a", "ok": "yes"}', "reply.ok"),
        (b'{"v": 1, "type": "reply", "re": "a", "ok": false}', "error string"),
        (b'{"v": 1, "type": "status", "id": "a", "id": "b"}', "appears twice"),
        (b'{"v": 1, "type": "status", "id": "a", "body": {"x": NaN}}', "not a JSON value"),
    ],
)
def test_malformed_messages_are_refused_with_the_reason(message: bytes, problem: str) -> None:
    with pytest.raises(FleetProtocolError, match=problem):
        decode(message)


def test_oversized_messages() -> None:
    with pytest.raises(FleetProtocolError, match="more than"):
        decode(b" " * (protocol.MAX_MESSAGE + 1))
    with pytest.raises(FleetProtocolError, match="exceeds"):
        Request("status", "a", {"x": "y" * protocol.MAX_MESSAGE}).encode()


def test_proofs_and_sizes() -> None:
    hashes = [bytes([i]) * 32 for i in range(3)]
    encoded = protocol.encode_proofs({5: hashes, 9: None, 0: []})
    body = json.loads(json.dumps({"proofs": encoded}))
    assert protocol.proofs(body, "proofs", "checkpoint") == {5: hashes, 9: None, 0: []}
    assert protocol.sizes({"from": [5, 1, 5]}, "from", "checkpoint") == [1, 5]
    for bad in ({"from": [-1]}, {"from": [True]}, {"from": "1"}, {"from": list(range(65))}):
        with pytest.raises(FleetProtocolError, match="tree sizes"):
            protocol.sizes(bad, "from", "checkpoint")
    bad_proofs: dict[str, Any]
    for bad_proofs in (
        {"x": []},
        {"01": []},
        {"5": ["AAAA"]},
        {"5": [7]},
        {"5": "AAAA"},
        {"5": ["A" * 44] * 65},
    ):
        with pytest.raises(FleetProtocolError):
            protocol.proofs({"proofs": bad_proofs}, "proofs", "checkpoint")


def test_body_strings_and_items() -> None:
    assert protocol.string({"a": "x"}, "a", "w") == "x"
    for bad in ({}, {"a": ""}, {"a": 3}, {"a": "x" * 70_000}):
        with pytest.raises(FleetProtocolError, match=r"w\.a must be a string"):
            protocol.string(bad, "a", "w")
    assert protocol.optional_string({"a": None}, "a", "w") is None
    with pytest.raises(FleetProtocolError, match="at most 2"):
        protocol.items({"a": [{}, {}, {}]}, "a", "w", limit=2)
    with pytest.raises(FleetProtocolError, match=r"w.a\[0\] must be an object"):
        protocol.items({"a": [1]}, "a", "w", limit=2)


@settings(max_examples=300, deadline=None)
@given(json_values())
def test_any_json_is_a_message_or_a_clear_refusal(value: object) -> None:
    data = json.dumps(value).encode()
    try:
        decoded: object = decode(data)
    except FleetProtocolError as exc:
        decoded = exc
    assert isinstance(decoded, Request | Reply | FleetProtocolError)
    assert "\n" not in str(decoded) or not isinstance(decoded, FleetProtocolError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_message_or_a_clear_refusal(data: bytes) -> None:
    try:
        decode(data)
    except FleetProtocolError as exc:
        problem = str(exc)
    else:
        return
    assert "\n" not in problem
