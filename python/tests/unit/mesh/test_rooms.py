"""Rooms: owner-only changes, per-sender signatures, removed members."""

from __future__ import annotations

import dataclasses

import pytest
from keel.errors import UsageError
from keel.mesh import rooms
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
