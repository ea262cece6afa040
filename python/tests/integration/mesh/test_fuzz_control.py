"""Bounded fuzz of the real daemon's control verbs (issue 8: control-socket requests).

Any request a local process can send gets an answer (a result, or one line
saying what is wrong with it), never "internal error"; the daemon logs no
traceback and keeps serving. The parsers under these verbs are fuzzed on
their own in ``tests/unit/mesh/test_fuzz.py``.
"""

from __future__ import annotations

import base64
import json
import socket
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.json_values import json_values

from .nodes import Node

VERBS = [
    "status", "invite", "invites", "revoke_invite", "join", "peers", "send", "send_many", "recv",
    "ack", "remove", "operator",
    "room_create", "room_add", "room_remove", "room_send", "room_members", "rooms",
    "dead_letters", "nope",
]  # fmt: skip
KEYS = [
    "token", "to", "topic", "data", "ttl", "id", "max", "lease", "ack", "receipts", "node",
    "room", "name", "members", "messages", "limit", "uses", "timeout", "grant", "invite",
]  # fmt: skip

JSON = json_values(st.sampled_from(KEYS), max_leaves=12, max_size=4)


def plausible(b: Node) -> st.SearchStrategy[Any]:
    """Values that get past the first checks, so the fuzz reaches deeper."""
    return st.sampled_from(
        [b.node_id, "jobs", base64.b64encode(b"hi").decode(), "ab" * 16, 60, 1, [1, 2], "ops"]
    )


def request(path: str, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(path)
        sock.sendall(line + b"\n")
        answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
    return answer


def test_any_request_gets_a_one_line_answer(pair: tuple[Node, Node]) -> None:
    a, b = pair
    path = str(a.socket)
    values = JSON | plausible(b)

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        verb=st.sampled_from(VERBS),
        args=st.dictionaries(st.sampled_from(KEYS), values, max_size=6)
        | st.builds(lambda v: {"messages": v}, st.lists(st.dictionaries(st.sampled_from(KEYS), values, max_size=5), max_size=3)),
    )  # fmt: skip
    def one(verb: str, args: dict[str, Any]) -> None:
        answer = request(path, json.dumps({"verb": verb, "args": args}).encode())
        assert set(answer) in ({"ok", "result"}, {"ok", "error", "kind"}), answer
        if not answer["ok"]:
            error = answer["error"]
            assert answer["kind"] != "internal", (verb, args, error)
            assert "internal error" not in error, (verb, args, error)
            assert "\n" not in error
            assert len(error) < 400, error

    one()
    assert a.status()["node"] == a.node_id
    for node in (a, b):
        assert "Traceback" not in node.log(), node.log()[-3000:]
