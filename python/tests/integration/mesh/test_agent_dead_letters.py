"""Agents' dead letters and room sends within sendTo (issue 13): real agent processes.

Each agent is a process under a uid of its own (setpriv), named in the
node's ``agents`` config. A dead letter records the agent that sent it, and
an agent's ``dead_letters`` are its own only, whatever the topics it may
read; the node itself sees them all. An agent's room send is allowed only
when its ``sendTo`` covers every member it reaches, agents listed by name
included, and the refusal names the member that is not covered.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .nodes import FAST, Node, wait_until
from .test_agents import IDLE, OPS, READER, SCOUT, open_up, refused, request
from .test_room_agents import payload, read, texts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run agents as other uids")

NOTES = READER


def two_nodes(mesh_nodes: Callable[..., Node], a_roster: Callable[[str], dict[str, Any]]) -> tuple[Node, Node]:  # fmt: skip
    """b (agents ops, scout, notes: scout and notes on jobs), then a, whose roster may
    name b's id."""
    b_roster = {
        "ops": {"uid": OPS, "tier": 0},
        "scout": {"uid": SCOUT, "tier": 1, "mesh": {"topics": ["jobs"]}},
        "notes": {"uid": NOTES, "tier": 1, "mesh": {"topics": ["jobs"]}},
    }
    b = mesh_nodes("b", config={**FAST, "agents": b_roster}).start()
    a = mesh_nodes("a", config={**FAST, "agents": a_roster(b.node_id)}).start()
    b.join(a)
    a.wait_connected(b)
    open_up(a)
    open_up(b)
    return a, b


def letters(node: Node, uid: int) -> list[tuple[str, str | None, str]]:
    """(id, agent, reason) of the dead letters ``uid`` is shown, newest first."""
    answer = request(node, uid, "dead_letters")
    assert "ok" in answer, answer
    return [(d["id"], d["agent"], d["reason"]) for d in answer["ok"]]


def send(node: Node, uid: int, to: str, text: str, **extra: Any) -> str:
    answer = request(node, uid, "send", {"to": to, "topic": "jobs", "data": payload(text), **extra})
    assert "ok" in answer, answer
    return str(answer["ok"]["id"])


def test_an_agent_sees_only_its_own_dead_letters(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    a, b = two_nodes(
        mesh_nodes,
        lambda _: {
            "ops": {"uid": OPS, "tier": 0},
            "scout": {"uid": SCOUT, "tier": 1, "mesh": {"topics": ["jobs"]}},
            "notes": {"uid": NOTES, "tier": 1, "mesh": {"topics": ["jobs"]}},
        },
    )
    ghost = f"ghost@{b.node_id}"
    by_scout = send(a, SCOUT, ghost, "from scout")  # refused by b: no such agent
    by_ops = send(a, OPS, ghost, "from ops")
    by_node = a.client.send(ghost, "jobs", b"from the node")
    rejected = "rejected: no agent ghost on this node"
    wait_until(lambda: len(a.client.dead_letters()) == 3, timeout=20, what="3 dead letters")
    b.stop()  # and one that expires, of scout's, to the node as a whole
    late = send(a, SCOUT, b.node_id, "too late", ttl=1)
    wait_until(lambda: len(a.client.dead_letters()) == 4, timeout=20, what="the expired one")

    assert letters(a, SCOUT) == [(late, "scout", "expired"), (by_scout, "scout", rejected)]
    assert letters(a, OPS) == [(by_ops, "ops", rejected)]
    assert letters(a, NOTES) == []  # jobs is its topic, yet it sent none of them
    everything = a.client.dead_letters()  # the node itself: all, newest first
    assert {(d["id"], d["agent"], d["to_agent"]) for d in everything} == {
        (late, "scout", None),
        (by_scout, "scout", "ghost"),
        (by_ops, "ops", "ghost"),
        (by_node, None, "ghost"),
    }
    assert everything[0]["id"] == late

    shown = a.cli("dead-letters", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [(d["id"], d["agent"]) for d in json.loads(shown.stdout)] == [
        (d["id"], d["agent"]) for d in everything
    ]
    table = a.cli("dead-letters", "--limit", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["AT", "ID", "FROM", "TO", "TOPIC", "ROOM", "REASON"]
    assert len(lines) == 3
    assert lines[1].split()[1:5] == [late, "scout", b.node_id, "jobs"]


def test_an_agents_room_send_needs_its_send_to_to_cover_every_member(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    a, b = two_nodes(
        mesh_nodes,
        lambda b_id: {
            "ops": {"uid": OPS, "tier": 0},  # sendTo "*"
            "narrow": {
                "uid": IDLE,
                "tier": 2,
                "mesh": {"sendTo": [f"notes@{b_id}"], "topics": ["jobs"]},
            },
            "agentwise": {
                "uid": SCOUT,
                "tier": 2,
                "mesh": {"sendTo": [f"*@{b_id}"], "topics": ["jobs"]},
            },
        },
    )
    notes, scout, node_b = f"notes@{b.node_id}", f"scout@{b.node_id}", b.node_id
    for name, members in (("one", [notes]), ("two", [notes, scout]), ("whole", [node_b])):
        assert a.client.room_create(name, members)["room"]
    wait_until(lambda: len(b.client.rooms()) == 3, timeout=15, what="b to learn the rooms")

    def room_send(uid: int, room: str, text: str) -> Any:
        return request(a, uid, "room_send", {"room": room, "topic": "jobs", "data": payload(text)})

    # narrow may send to notes of b only: the room of notes alone, not the one with scout
    assert room_send(IDLE, "one", "narrow to one")["ok"]["recipients"] == [node_b]
    text = refused(room_send(IDLE, "two", "narrow to two"))
    assert text.startswith(f"agent narrow (tier 2, uid {IDLE}) may not send to room two (")
    assert text.endswith(f"its member {scout} is not covered by its mesh.sendTo, '{notes}'")
    # agentwise covers every agent of b but not b as a whole: the room of the whole node
    # would reach b's node-level readers, so it is refused there
    assert room_send(SCOUT, "two", "agentwise to two")["ok"]["recipients"] == [node_b]
    text = refused(room_send(SCOUT, "whole", "agentwise to whole"))
    assert text.endswith(f"its member {node_b} is not covered by its mesh.sendTo, '*@{node_b}'")
    assert refused(room_send(SCOUT, "whole", "again")) == text
    assert "ok" in room_send(OPS, "whole", "ops to whole")
    # what was allowed arrives, what was refused was never queued
    wait_until(lambda: b.status()["inbox"] == 3, timeout=20, what="the three room messages at b")
    assert texts(read(b, NOTES)) == [
        ("narrow to one", "narrow", a.node_id),
        ("agentwise to two", "agentwise", a.node_id),
        ("ops to whole", "ops", a.node_id),
    ]
    assert a.status()["outbox"] == 0
    assert a.client.dead_letters() == []
