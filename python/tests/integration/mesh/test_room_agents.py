"""Rooms with agents as members (issue 13): real agent processes under uids of their own.

Two daemons (root) each know the agents ops (tier 0, every topic), scout
and notes (topic ``jobs``, from everyone), each a uid run with setpriv. a owns a room of
itself and of the agents notes and scout of b: ops of b, no member, reads
and acknowledges none of the room's messages although its grant covers the
topic; once a removes notes, notes can send to the room no more and reads
nothing sent afterwards. A member speaking the wire itself cannot put an
agent on a room message its signature does not cover.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from keel.mesh import rooms
from keel.mesh.ids import new_message_id
from keel.mesh.packets import Ack, Msg, RoomStamp

from .nodes import FAST, Node, wait_until
from .test_agents import OPS, READER, SCOUT, SUBSCRIBE, as_uid, open_up, refused, request
from .test_security import member

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run agents as other uids")

NOTES = READER  # the uid of agent notes in two_nodes_with_agents

# Subscribes to jobs as the given uid, says so (on stderr: stdout is read only once it
# ends), then takes (and acknowledges) what it is handed until a message reads argv[2];
# prints the payloads it got.
WATCH = """
import json, sys
from keel.mesh.client import MeshClient
with MeshClient(sys.argv[1]).subscribe("jobs") as sub:
    got = sub.recv(wait=0)
    print("subscribed", file=sys.stderr, flush=True)
    while not any(m.data.decode() == sys.argv[2] for m in got):
        got += sub.recv(wait=30)
    sub.ack()
print(json.dumps([[m.data.decode(), m.room] for m in got]), flush=True)
"""


def watching(node: Node, uid: int, until: str) -> subprocess.Popen[str]:
    """An agent subscribed to jobs on ``node`` (returns once the daemon answered it)."""
    watcher = subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         sys.executable, "-c", WATCH, str(node.socket), until],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert watcher.stderr is not None
    assert watcher.stderr.readline() == "subscribed\n", watcher.communicate(timeout=30)
    return watcher


def watched(watcher: subprocess.Popen[str]) -> list[list[Any]]:
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    return list(json.loads(out))


def agents_on_both(mesh_nodes: Callable[..., Node], short_tmp: Path) -> tuple[Node, Node]:
    """a and b, each knowing ops (tier 0: every topic, from everyone), and scout and
    notes (topic jobs, from everyone)."""
    roster = {
        "ops": {"uid": OPS, "tier": 0},
        "scout": {
            "uid": SCOUT,
            "tier": 2,
            "mesh": {"sendTo": ["*"], "receiveFrom": ["*"], "topics": ["jobs"]},
        },
        "notes": {"uid": NOTES, "tier": 1, "mesh": {"topics": ["jobs"]}},
    }
    b = mesh_nodes("b", config={**FAST, "agents": roster}).start()
    a = mesh_nodes("a", config={**FAST, "agents": roster}).start()
    b.join(a)
    a.wait_connected(b)
    open_up(a)
    open_up(b)
    return a, b


def payload(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def read(node: Node, uid: int, *, lease: float | None = None) -> list[dict[str, Any]]:
    """What the agent of ``uid`` gets from ``recv`` on jobs (without acknowledging it)."""
    args: dict[str, Any] = {"topic": "jobs", "wait": 0}
    if lease is not None:
        args["lease"] = lease
    answer = request(node, uid, "recv", args)
    assert "ok" in answer, answer
    return list(answer["ok"]["messages"])


def texts(messages: list[dict[str, Any]]) -> list[tuple[str, str | None, str]]:
    return [(base64.b64decode(m["data"]).decode(), m["agent"], m["from"]) for m in messages]


def test_only_member_agents_read_a_room_and_a_removed_agent_leaves_it(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    a, b = agents_on_both(mesh_nodes, short_tmp)
    created = a.cli("room", "create", "crew", f"notes@{b.node_id}", f"scout@{b.node_id}", "--json")
    assert created.returncode == 0, created.stderr
    room = a.client.room_members("crew")
    assert [(m["id"], m["agent"]) for m in room["members"]] == sorted(
        [(a.node_id, None), (f"notes@{b.node_id}", "notes"), (f"scout@{b.node_id}", "scout")]
    )
    wait_until(b.client.rooms, timeout=15, what="b to learn the room")
    listed = b.cli("room", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"notes@{b.node_id}" in listed.stdout
    as_json = json.loads(b.cli("room", "list", "--json").stdout)
    assert [(r["name"], r["version"], len(r["members"])) for r in as_json] == [("crew", 1, 3)]
    table = [line.split() for line in b.cli("room", "members", "crew").stdout.splitlines()]
    assert [a.node_id, a.node_id, "*", "(every", "agent)", "yes"] in table
    assert [f"scout@{b.node_id}", b.node_id, "scout", "yes"] in table

    # ops of a (a is in as a whole node) writes to the room; b stores it
    assert "ok" in request(a, OPS, "room_send", {"room": "crew", "topic": "jobs", "data": payload("before")})  # fmt: skip
    wait_until(lambda: b.status()["inbox"] == 1, timeout=20, what="the room message at b")
    # ops of b may read jobs, but is not in the room: nothing for it, on either channel
    assert read(b, OPS) == []
    assert as_uid(OPS, SUBSCRIBE, str(b.socket), "jobs") == "subscribed 0"
    got = read(b, NOTES, lease=60)
    assert texts(got) == [("before", "ops", a.node_id)]
    assert got[0]["room"] == room["room"]
    receipt = got[0]["receipt"]
    # ops cannot delete it by acknowledging its receipt; notes can
    assert request(b, OPS, "ack", {"receipts": [receipt]})["ok"] == {"acked": 0}
    assert request(b, NOTES, "ack", {"receipts": [receipt]})["ok"] == {"acked": 1}

    # sending: a member agent may, another agent of the same node may not
    sent = request(b, NOTES, "room_send", {"room": "crew", "topic": "jobs", "data": payload("from notes")})  # fmt: skip
    assert sent["ok"]["recipients"] == [a.node_id]
    text = refused(request(b, OPS, "room_send", {"room": "crew", "topic": "jobs", "data": payload("x")}))  # fmt: skip
    assert text.startswith(f"agent ops is not a member of room crew ({room['room']}, version 1)")
    assert text.endswith("its members on this node are the agents notes, scout")
    at_a = wait_until(lambda: a.client.recv("jobs", wait=1), timeout=20, what="notes' message")
    assert [(m.data, m.agent, m.sender, m.room) for m in at_a] == [
        (b"from notes", "notes", b.node_id, room["room"])
    ]
    a.client.ack()

    # a removes notes: its next send is refused, it reads nothing sent afterwards
    removed = a.cli("room", "remove", "crew", f"notes@{b.node_id}", "--json")
    assert removed.returncode == 0, removed.stderr
    wait_until(lambda: b.client.room_members("crew")["version"] == 2, timeout=15, what="b to learn v2")  # fmt: skip
    text = refused(request(b, NOTES, "room_send", {"room": "crew", "topic": "jobs", "data": payload("still here?")}))  # fmt: skip
    assert text.startswith("agent notes is not a member of room crew")
    assert "ok" in request(a, OPS, "room_send", {"room": "crew", "topic": "jobs", "data": payload("after")})  # fmt: skip
    wait_until(lambda: b.status()["inbox"] == 1, timeout=20, what="the second room message at b")
    assert read(b, NOTES) == []
    after = read(b, SCOUT)
    assert texts(after) == [("after", "ops", a.node_id)]
    assert request(b, NOTES, "ack", {"receipts": [after[0]["receipt"]]})["ok"] == {"acked": 0}
    assert request(b, SCOUT, "ack", {"receipts": [after[0]["receipt"]]})["ok"] == {"acked": 1}
    assert a.client.recv("jobs") == []  # the refused sends queued nothing


def test_a_room_message_whose_agent_its_signature_does_not_cover_is_rejected(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    a, _ = agents_on_both(mesh_nodes, short_tmp)
    forger = member(a)
    me = forger.identity.node_id
    room = a.client.room_create("crew", [f"scout@{me}"])
    assert {m["id"] for m in room["members"]} == {a.node_id, f"scout@{me}"}

    def sent(agent: str | None, signed_for: str | None, text: str) -> tuple[str, tuple[Any, ...]]:
        """A room message of ``agent`` of the forger's node, signed as ``signed_for``'s."""
        message_id = new_message_id()
        signed = rooms.signed_bytes(room["room"], message_id, me, topic="jobs", expires=2**31,
                                    version=room["version"], payload=text.encode(), agent=signed_for)  # fmt: skip
        stamp = RoomStamp(room["room"], me, room["version"], forger.identity.sign(rooms.MESSAGE_DOMAIN, signed))  # fmt: skip
        before = len(forger.received())
        forger.send_packet(Msg(message_id, "jobs", 2**31, text.encode(), stamp, agent))
        forger.read_until(lambda e: any(isinstance(p, Ack) for p in forger.received()[before:]))
        (answer,) = [p for p in forger.received()[before:] if isinstance(p, Ack)]
        return message_id, (answer.ok, answer.rejected)

    # its node signed it as its own (no agent), then it claims scout wrote it
    forged, answer = sent("scout", None, "scout says: wire the money")
    assert answer == ((), ((forged, f"signature of scout@{me} does not verify"),))
    # the other way round: scout's message passed off as the node's
    stripped, answer = sent(None, "scout", "the node says: wire the money")
    assert answer == ((), ((stripped, f"signature of {me} does not verify"),))
    # an agent of a node in the room by its agents, not listed: rejected before its signature
    outsider, answer = sent("notes", "notes", "let me in")
    assert answer == ((), ((outsider, f"author notes@{me} is not in room {room['room']}"),))
    a.wait_log("refusing message")
    # scout's own message, signed as scout's, goes through, and a's readers see scout of the forger
    honest, answer = sent("scout", "scout", "hello from scout")
    assert answer == ((honest,), ())
    got = a.client.recv("jobs", wait=5)
    assert [(m.id, m.data, m.agent, m.sender) for m in got] == [
        (honest, b"hello from scout", "scout", me)
    ]
    a.client.ack()


def test_a_room_message_from_an_agent_is_not_sent_to_a_peer_before_revision_4(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    # The raw peer announces no application revision: it would check the signature
    # without the agent and reject the message, so a dead-letters it, saying why; a
    # room message from the node itself still reaches it as before.
    a, _ = agents_on_both(mesh_nodes, short_tmp)
    old = member(a)
    a.client.room_create("crew", [old.identity.node_id])
    by_agent = request(a, OPS, "room_send", {"room": "crew", "topic": "jobs", "data": payload("x")})
    assert by_agent["ok"]["recipients"] == [old.identity.node_id]
    letter = wait_until(a.client.dead_letters, timeout=20, what="the dead letter")
    assert [(d["id"], d["reason"]) for d in letter] == [
        (
            by_agent["ok"]["id"],
            "the recipient's keel is too old for room messages from an agent "
            "(application revision 4): upgrade it",
        )
    ]
    # it is ops' dead letter: ops sees it, scout (jobs is its topic too) does not
    assert letter[0]["agent"] == "ops"
    assert [d["id"] for d in request(a, OPS, "dead_letters")["ok"]] == [by_agent["ok"]["id"]]
    assert request(a, SCOUT, "dead_letters")["ok"] == []
    by_node = a.client.room_send("crew", "jobs", b"from the node")
    old.read_until(lambda e: any(isinstance(p, Msg) for p in old.received()))
    (message,) = [p for p in old.received() if isinstance(p, Msg)]
    assert (message.id, message.payload, message.agent) == (by_node, b"from the node", None)


def test_a_room_message_is_handed_only_to_a_subscribed_member_agent(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    # ops of b subscribes first: a message of a room it is not in is not handed to it
    # from memory, but stored (for the room's agents and the node)...
    a, b = agents_on_both(mesh_nodes, short_tmp)
    room = a.client.room_create("crew", [f"notes@{b.node_id}"])["room"]
    wait_until(b.client.rooms, timeout=15, what="b to learn the room")
    ops = watching(b, OPS, "marker")
    a.client.room_send("crew", "jobs", b"for the crew")
    wait_until(lambda: b.status()["inbox"] == 1, timeout=20, what="the room message stored at b")
    a.client.send(f"ops@{b.node_id}", "jobs", b"marker")
    assert watched(ops) == [["marker", None]]
    # ... where notes, subscribing, finds it; and a member subscribed before the next
    # message arrives is handed that one straight away
    assert watched(watching(b, NOTES, "for the crew")) == [["for the crew", room]]
    notes = watching(b, NOTES, "again")
    a.client.room_send("crew", "jobs", b"again")
    assert watched(notes) == [["again", room]]
    wait_until(lambda: b.status()["inbox"] == 0, timeout=20, what="b's inbox to empty")
