"""The control verbs' typed requests: every value checked before the node sees it."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from keel.errors import KeelError, UsageError
from keel.mesh import verbs
from keel.mesh.membership import Membership

from .test_membership import T0, A, B, C, join, remove

DATA = base64.b64encode(b"hi").decode()


def test_a_direct_message_is_checked_field_by_field() -> None:
    message = verbs.Direct.parse({"to": B.node_id, "topic": "t", "data": DATA, "ttl": 60})
    assert (message.to, message.topic, message.payload, message.ttl) == (B.node_id, "t", b"hi", 60)
    assert len(message.id) == 32  # chosen by the daemon when the client did not
    assert verbs.Direct.parse({"to": B.node_id, "topic": "t", "data": DATA}).ttl is None
    cases: list[tuple[dict[str, Any], str]] = [
        ({"topic": "t", "data": DATA}, "to must be a non-empty string"),
        ({"to": "x", "topic": "t", "data": DATA}, "to 'x' is not a node id"),
        ({"to": B.node_id, "topic": "a b", "data": DATA}, "topic 'a b' must be"),
        ({"to": B.node_id, "topic": "t", "data": "!!"}, "data is not valid base64"),
        ({"to": B.node_id, "topic": "t", "data": DATA, "ttl": 0}, "ttl must be positive"),
        ({"to": B.node_id, "topic": "t", "data": DATA, "id": "X"}, "id must be 32"),
    ]
    for args, problem in cases:
        with pytest.raises(UsageError, match=problem):
            verbs.Direct.parse(args)


@pytest.mark.parametrize(
    ("parse", "args", "problem"),
    [
        (verbs.SendMany.parse, {"messages": []}, "messages must be a list of 1 to 10000"),
        (verbs.SendMany.parse, {"messages": [5]}, "to must be a non-empty string"),
        (verbs.Recv.parse, {"topic": "t", "max": 0}, "max must be an integer from 1 to 10000"),
        (verbs.Recv.parse, {"topic": "t", "lease": 0}, "lease must be positive"),
        (verbs.Ack.parse, {"receipts": [-1]}, "receipts must be a list"),
        (verbs.Invite.parse, {"uses": 0}, "uses must be an integer from 1"),
        (verbs.RoomCreate.parse, {"name": "ops", "members": "ab"}, "members must be a list"),
        (verbs.RoomMember.parse, {"room": "ops", "node": "x"}, "node 'x' is not a node id"),
        (verbs.DeadLetters.parse, {"limit": 0}, "limit must be an integer"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_key(
    parse: Any, args: dict[str, Any], problem: str
) -> None:
    with pytest.raises(UsageError, match=problem) as caught:
        parse(args)
    assert "\n" not in str(caught.value)


def test_a_bad_invite_token_is_refused_as_the_invite_module_words_it() -> None:
    with pytest.raises(KeelError, match="not a keel invite token"):
        verbs.Join.parse({"token": "nope"})
    with pytest.raises(UsageError, match="token must be a non-empty string"):
        verbs.Join.parse({})


def test_recv_waits_at_most_an_hour_and_never_less_than_nothing() -> None:
    assert verbs.Recv.parse({"topic": "t", "wait": 1e9}).wait == 3600
    assert verbs.Recv.parse({"topic": "t", "wait": -5}).wait == 0
    request = verbs.Recv.parse({"topic": "t", "ack": [1, 2]})
    assert (request.max, request.lease, request.ack) == (100, None, (1, 2))


def test_a_recipient_is_another_member() -> None:
    mesh = Membership.found(A, [], T0)
    mesh.add(join(A, B, T0 + 1))
    mesh.add(join(A, C, T0 + 2))
    mesh.add(remove(A, C, T0 + 3))
    view = mesh.view
    assert verbs.recipient(view, A.node_id, B.node_id) == B.node_id
    with pytest.raises(UsageError, match="own id"):
        verbs.recipient(view, A.node_id, A.node_id)
    with pytest.raises(KeelError, match=f"{C.node_id} was removed from mesh"):
        verbs.recipient(view, A.node_id, C.node_id)
    with pytest.raises(KeelError, match="is not a member of mesh"):
        verbs.recipient(view, A.node_id, "c" * 32)
    verbs.require_member(view, A.node_id)
    with pytest.raises(KeelError, match="this node was removed"):
        verbs.require_member(view, C.node_id)
