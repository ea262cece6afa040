"""Rooms: owner-only changes, per-sender signatures, removed members."""

from __future__ import annotations

import dataclasses

import pytest
from keel.agents.meshgrant import MeshGrant
from keel.agents.roster import AgentEntry
from keel.api import Peer
from keel.errors import KeelError, UsageError
from keel.mesh import rooms
from keel.mesh.access import Agents
from keel.mesh.errors import RemoteProtocolError
from keel.mesh.identity import NodeIdentity
from keel.mesh.membership import Membership, Room, SignedRecord
from keel.mesh.packets import Msg
from keel.mesh.rooms import RoomVerdict

from .test_membership import T0, A, B, C, D, join, remove

MSG_ID = "00112233445566778899aabbccddeeff"


def create(
    by: NodeIdentity, m: Membership, *, name: str, members: list[str], now_ms: int
) -> SignedRecord:
    return m.make(by, "room", now_ms, **rooms.create(by, name=name, members=members))


def update(
    by: NodeIdentity, m: Membership, room: Room, *, members: list[str], now_ms: int
) -> SignedRecord:
    return m.make(by, "room", now_ms, **rooms.update(by, room, members=members))


@pytest.fixture
def m() -> Membership:
    mesh = Membership.found(A, [], T0)
    for who, at in ((B, 1), (C, 2), (D, 3)):
        mesh.add(join(A, who, T0 + at))
    return mesh


def room_msg(m: Membership, author=B, room_id: str | None = None, payload: bytes = b"hi") -> Msg:
    room = m.view.rooms[room_id or next(iter(m.view.rooms))]
    stamp = rooms.stamp(
        author, room, MSG_ID, topic="chat", expires=T0 // 1000 + 60, payload=payload
    )
    return Msg(MSG_ID, "chat", T0 // 1000 + 60, payload, stamp)


def test_create_and_members(m: Membership) -> None:
    record = create(A, m, name="ops", members=[B.node_id, C.node_id], now_ms=T0 + 10)
    room = m.view.rooms[record.body["room"]]
    assert room.owner == A.node_id
    assert room.version == 1
    assert set(room.members) == {A.node_id, B.node_id, C.node_id}
    assert set(m.view.room_recipients(room.id)) == set(room.members)


def test_only_the_owner_updates_and_the_highest_version_wins(m: Membership) -> None:
    record = create(A, m, name="ops", members=[B.node_id], now_ms=T0 + 10)
    room = m.view.rooms[record.body["room"]]
    with pytest.raises(UsageError, match="only its owner"):
        update(B, m, room, members=[B.node_id, C.node_id], now_ms=T0 + 11)
    update(A, m, room, members=[B.node_id, C.node_id], now_ms=T0 + 12)
    room2 = m.view.rooms[room.id]
    assert room2.version == 2
    assert C.node_id in room2.members
    # an older version arriving late changes nothing
    other = Membership.found(A, [], T0)
    for r in m.records():
        if r.kind != "genesis":
            other.add(r)
    assert other.view.rooms[room.id].version == 2


def test_a_member_checks_the_author_signature(m: Membership) -> None:
    create(A, m, name="ops", members=[B.node_id, C.node_id], now_ms=T0 + 10)
    good = room_msg(m)
    assert rooms.check_message(m.view, C.node_id, good).verdict is RoomVerdict.ACCEPT
    # C relays B's message after changing the payload: refused
    tampered = good._replace(payload=b"evil")
    check = rooms.check_message(m.view, A.node_id, tampered)
    assert check.verdict is RoomVerdict.REJECT
    assert "signature" in check.reason
    # C signs a message but claims B wrote it: refused
    forged_stamp = dataclasses.replace(room_msg(m, author=C).room, author=B.node_id)  # type: ignore[type-var]
    forged = good._replace(room=forged_stamp)
    assert rooms.check_message(m.view, A.node_id, forged).verdict is RoomVerdict.REJECT


def test_outsiders_and_removed_members(m: Membership) -> None:
    record = create(A, m, name="ops", members=[B.node_id, C.node_id], now_ms=T0 + 10)
    room_id = record.body["room"]
    msg = room_msg(m)
    check = rooms.check_message(m.view, D.node_id, msg)
    assert check.verdict is RoomVerdict.REJECT
    assert "not in room" in check.reason
    from_d = room_msg(m, author=D)
    assert rooms.check_message(m.view, A.node_id, from_d).verdict is RoomVerdict.REJECT
    # C leaves the room: it takes nothing more
    update(A, m, m.view.rooms[room_id], members=[B.node_id], now_ms=T0 + 20)
    assert C.node_id not in m.view.room_recipients(room_id)
    assert rooms.check_message(m.view, C.node_id, room_msg(m)).verdict is RoomVerdict.REJECT
    # B leaves the mesh: B's room messages are refused, B is no recipient
    m.add(remove(A, B, T0 + 30))
    assert B.node_id not in m.view.room_recipients(room_id)
    assert rooms.check_message(m.view, A.node_id, msg).verdict is RoomVerdict.REJECT


def test_unknown_room_or_newer_version_means_not_yet(m: Membership) -> None:
    record = create(A, m, name="ops", members=[B.node_id, C.node_id], now_ms=T0 + 10)
    msg = room_msg(m)
    behind = Membership.found(A, [], T0)
    for r in m.records():
        if r.kind == "join":
            behind.add(r)
    assert rooms.check_message(behind.view, C.node_id, msg).verdict is RoomVerdict.BUSY
    behind.add(record)
    update(
        A,
        m,
        m.view.rooms[record.body["room"]],
        members=[B.node_id, C.node_id, D.node_id],
        now_ms=T0 + 11,
    )
    newer = room_msg(m)
    assert newer.room is not None
    assert newer.room.version == 2
    assert rooms.check_message(behind.view, C.node_id, newer).verdict is RoomVerdict.BUSY


def test_bad_names_and_members() -> None:
    m = Membership.found(A, [], T0)
    with pytest.raises(UsageError, match="room name"):
        create(A, m, name="", members=[], now_ms=T0)
    with pytest.raises(UsageError, match="not a node id"):
        create(A, m, name="x", members=["bogus"], now_ms=T0)


def test_room_records_gossip_like_any_record(m: Membership) -> None:
    record = create(A, m, name="ops", members=[B.node_id], now_ms=T0 + 10)
    copy = SignedRecord.from_json(record.to_json())
    assert copy.id == record.id


# -- agents as members (issue 13)


def agent_msg(m: Membership, author: NodeIdentity, agent: str | None, to: str | None = None) -> Msg:
    """A room message of ``agent`` of ``author`` (None: the node), stamped as its node would."""
    room = m.view.rooms[next(iter(m.view.rooms))]
    stamp = rooms.stamp(
        author, room, MSG_ID, topic="chat", expires=T0 // 1000 + 60, payload=b"hi", agent=agent
    )
    return Msg(MSG_ID, "chat", T0 // 1000 + 60, b"hi", stamp, agent, to)


def test_agent_members_are_listed_by_node_and_checked_by_shape(m: Membership) -> None:
    record = create(
        A,
        m,
        name="ops",
        members=[f"scout@{B.node_id}", f"notes@{B.node_id}", C.node_id],
        now_ms=T0 + 10,
    )
    room = m.view.rooms[record.body["room"]]
    assert room.members == tuple(
        sorted([A.node_id, C.node_id, f"notes@{B.node_id}", f"scout@{B.node_id}"])
    )
    assert set(m.view.room_recipients(room.id)) == {A.node_id, B.node_id, C.node_id}
    assert room.agents_of(B.node_id) == ("notes", "scout")
    assert room.agents_of(C.node_id) is None  # a whole node: every agent of its
    assert room.agents_of(D.node_id) == ()
    assert room.admits(B.node_id, "scout")
    assert room.admits(B.node_id, None)
    assert not room.admits(B.node_id, "intruder")
    assert room.admits(C.node_id, "anyone")
    assert not room.admits(D.node_id, None)
    with pytest.raises(UsageError, match="both as a whole node and by its agents"):
        create(A, m, name="x", members=[B.node_id, f"scout@{B.node_id}"], now_ms=T0 + 11)
    with pytest.raises(UsageError, match="not a node id or AGENT@NODE_ID"):
        create(A, m, name="x", members=[f"Scout@{B.node_id}"], now_ms=T0 + 11)
    # the owner may be in by its agents alone
    own = create(A, m, name="mine", members=[f"ops@{A.node_id}"], now_ms=T0 + 12)
    assert own.body["members"] == [f"ops@{A.node_id}"]
    # a record a peer sends is checked the same way
    body = dict(record.to_json().items())
    for bad, why in (
        ([A.node_id, B.node_id, f"scout@{B.node_id}"], "either as a whole"),
        ([B.node_id], "owner is one of its members"),
        ([A.node_id, "x@y"], "AGENT@NODE_ID"),
        ([f"scout@{B.node_id}", A.node_id], "sorted"),
    ):
        with pytest.raises(RemoteProtocolError, match=why):
            SignedRecord.from_json({**body, "members": bad})


def test_a_room_message_binds_its_agent(m: Membership) -> None:
    create(A, m, name="ops", members=[f"scout@{B.node_id}", C.node_id], now_ms=T0 + 10)
    good = agent_msg(m, B, "scout")
    assert rooms.check_message(m.view, C.node_id, good).verdict is RoomVerdict.ACCEPT
    assert rooms.check_message(m.view, A.node_id, good).verdict is RoomVerdict.ACCEPT
    # B's node-level sender is in too (its node is in by its agents)
    assert (
        rooms.check_message(m.view, C.node_id, agent_msg(m, B, None)).verdict is RoomVerdict.ACCEPT
    )
    # a relay that strips, changes or adds the agent breaks the author's signature
    for forged in (good._replace(agent=None), agent_msg(m, B, None)._replace(agent="scout")):
        check = rooms.check_message(m.view, C.node_id, forged)
        assert check.verdict is RoomVerdict.REJECT, forged
        assert "does not verify" in check.reason
    # an agent of B's that is not in the room: rejected before the signature
    check = rooms.check_message(m.view, C.node_id, agent_msg(m, B, "notes"))
    assert check.verdict is RoomVerdict.REJECT
    assert check.reason == f"author notes@{B.node_id} is not in room {good.room.room}"  # type: ignore[union-attr]
    # agents of a whole node are all in
    assert (
        rooms.check_message(m.view, A.node_id, agent_msg(m, C, "any")).verdict is RoomVerdict.ACCEPT
    )
    # a room message for one agent is no room message
    check = rooms.check_message(m.view, C.node_id, agent_msg(m, B, "scout", to="notes"))
    assert check.verdict is RoomVerdict.REJECT
    assert "not for one agent" in check.reason


def test_a_message_without_agent_signs_the_revision_2_bytes(m: Membership) -> None:
    create(A, m, name="ops", members=[B.node_id], now_ms=T0 + 10)
    room = m.view.rooms[next(iter(m.view.rooms))]
    plain = rooms.signed_bytes(
        room.id, MSG_ID, B.node_id, topic="chat", expires=5, version=1, payload=b""
    )
    assert b"agent" not in plain
    signed = rooms.signed_bytes(
        room.id, MSG_ID, B.node_id, topic="chat", expires=5, version=1, payload=b"", agent="scout"
    )
    assert signed == plain[:1] + b'"agent":"scout",' + plain[1:]


def test_removing_an_agent_takes_effect_for_its_next_message(m: Membership) -> None:
    record = create(
        A, m, name="ops", members=[f"scout@{B.node_id}", f"notes@{B.node_id}"], now_ms=T0 + 10
    )
    room_id = record.body["room"]
    room = m.view.rooms[room_id]
    assert rooms.refuse_send(m.view, B.node_id, room, "scout") is None
    refusal = rooms.refuse_send(m.view, B.node_id, room, "intruder")
    assert refusal is not None
    assert "agent intruder is not a member of room ops" in refusal
    assert "notes, scout" in refusal
    assert (
        rooms.refuse_send(m.view, D.node_id, room, None) == "this node is not a member of room ops"
    )
    reads = rooms.reads(m.view, B.node_id, "scout")
    assert reads is not None
    assert reads(room_id)
    assert rooms.reads(m.view, B.node_id, None) is None  # the node reads every room
    stale = agent_msg(m, B, "scout")  # sent at version 1
    update(A, m, room, members=rooms.removed(room, f"scout@{B.node_id}"), now_ms=T0 + 20)
    room2 = m.view.rooms[room_id]
    assert room2.members == (A.node_id, f"notes@{B.node_id}")
    assert rooms.refuse_send(m.view, B.node_id, room2, "scout") is not None
    reads = rooms.reads(m.view, B.node_id, "scout")
    assert reads is not None
    assert not reads(room_id)
    other = rooms.reads(m.view, B.node_id, "notes")
    assert other is not None
    assert other(room_id)
    # what scout sent before its removal and arrives after it is refused too
    check = rooms.check_message(m.view, A.node_id, stale)
    assert check.verdict is RoomVerdict.REJECT
    assert "is not in room" in check.reason


def test_adding_and_removing_members(m: Membership) -> None:
    record = create(A, m, name="ops", members=[C.node_id, f"scout@{B.node_id}"], now_ms=T0 + 10)
    room = m.view.rooms[record.body["room"]]
    with pytest.raises(KeelError, match="already"):
        rooms.added(room, f"scout@{B.node_id}")
    with pytest.raises(KeelError, match="as a whole node, so intruder is in already"):
        rooms.added(room, f"intruder@{C.node_id}")
    assert set(rooms.added(room, f"notes@{B.node_id}")) == {*room.members, f"notes@{B.node_id}"}
    # a node listed by its agents becomes a whole member
    assert set(rooms.added(room, B.node_id)) == {A.node_id, B.node_id, C.node_id}
    with pytest.raises(KeelError, match="to keep intruder out, remove"):
        rooms.removed(room, f"intruder@{C.node_id}")
    with pytest.raises(KeelError, match="is not in room"):
        rooms.removed(room, f"notes@{B.node_id}")
    with pytest.raises(KeelError, match="is not in room"):
        rooms.removed(room, D.node_id)
    # a node id takes the node out with its agents
    assert rooms.removed(room, B.node_id) == [A.node_id, C.node_id]
    with pytest.raises(UsageError, match="owner cannot leave"):
        rooms.removed(room, A.node_id)
    own = create(A, m, name="mine", members=[f"ops@{A.node_id}"], now_ms=T0 + 12)
    with pytest.raises(UsageError, match="owner cannot leave"):
        rooms.removed(m.view.rooms[own.body["room"]], f"ops@{A.node_id}")


def test_an_agent_must_have_been_in_the_version_its_message_claims(m: Membership) -> None:
    record = create(A, m, name="ops", members=[f"notes@{B.node_id}"], now_ms=T0 + 10)
    room = m.view.rooms[record.body["room"]]
    early = agent_msg(m, B, "scout")  # claims version 1, where scout was not in the room
    update(A, m, room, members=rooms.added(room, f"scout@{B.node_id}"), now_ms=T0 + 20)
    check = rooms.check_message(m.view, A.node_id, early)
    assert check.verdict is RoomVerdict.REJECT
    assert check.reason == (
        f"author scout@{B.node_id} was not in room {room.id} at version 1, as it claims"
    )
    assert rooms.check_message(m.view, A.node_id, agent_msg(m, B, "scout")).verdict is (
        RoomVerdict.ACCEPT
    )


def test_an_agent_reaches_through_a_room_only_members_its_send_to_covers(m: Membership) -> None:
    # A's room: B as a whole node, notes and scout of C, and A itself (the sender's node)
    b, c = B.node_id, C.node_id
    record = create(A, m, name="crew", members=[b, f"notes@{c}", f"scout@{c}"], now_ms=T0 + 10)
    room = m.view.rooms[record.body["room"]]
    others = [n for n in m.view.room_recipients(room.id) if n != A.node_id]
    members = rooms.recipients(room, others)
    assert sorted(members, key=str) == sorted([(b, None), (c, "notes"), (c, "scout")], key=str)
    grants = {
        "everyone": ("*",),
        "nodes": (b, c),  # whole nodes cover their agents
        "precise": (b, f"notes@{c}", f"scout@{c}"),
        "agents_of_c": (b, f"*@{c}"),
        "one_short": (b, f"notes@{c}"),  # not scout of C
        "agents_only": (f"*@{b}", f"*@{c}"),  # B is in as a whole: its node needs B or *
        "none": (),
    }
    policy = Agents(
        {
            name: AgentEntry(name, 2000 + i, 1, MeshGrant(send_to, ("chat",)))
            for i, (name, send_to) in enumerate(grants.items())
        }
    )
    desc = f"crew ({room.id})"

    def refusal(name: str) -> str | None:
        caller = policy.caller(Peer(1, policy.entries[name].uid, 1))
        return policy.refuse_room(caller, desc, members)

    for name in ("everyone", "nodes", "precise", "agents_of_c"):
        assert refusal(name) is None, name
    assert refusal("one_short") == (
        f"agent one_short (tier 1, uid 2004) may not send to room {desc}: its member "
        f"scout@{c} is not covered by its mesh.sendTo, '{b}', 'notes@{c}'"
    )
    text = refusal("agents_only")
    assert text is not None
    assert text.endswith(f"its member {b} is not covered by its mesh.sendTo, '*@{b}', '*@{c}'")
    text = refusal("none")
    assert text is not None
    assert text.endswith("is not covered by its mesh.sendTo, empty")
    # the node itself (root) is no agent: no grant to check
    assert policy.refuse_room(policy.caller(Peer(1, 0, 0)), desc, members) is None
    # the room's own node is no recipient: a room of this node alone reaches no one
    assert rooms.recipients(room, []) == []
