"""Rooms: owner-signed membership, per-sender signed messages. Pure.

A room is a ``room`` record (:mod:`keel.mesh.membership`) signed by its
owner: id, name, a version that only grows, and the member list. Its id is
``BLAKE2s-256("keel-mesh/1 room-id" || 0x00 || owner || 0x00 || nonce)[:16]``
in hex, so only the owner can sign a valid record for it. The highest
version wins.

A room message is fanned out by its author over the pairwise sessions, one
copy per member. Each copy carries a ``RoomStamp``: the room id, the author,
the room version the author saw, and the author's Ed25519 signature
(domain ``room-message``) over::

    canonical_json({"room", "id", "from", "topic", "exp", "rv",
                    "digest": base64url(SHA-256(payload))})

so whichever peer hands the copy over, a receiver checks the author itself:
a relaying or malicious member cannot forge another member's message.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from keel.errors import UsageError
from keel.mesh.encoding import b64u_encode
from keel.mesh.identity import NodeIdentity, verify_signature
from keel.mesh.ids import is_node_id
from keel.mesh.membership import (
    MAX_ROOM_MEMBERS,
    MAX_ROOM_NAME,
    ROOM_NONCE_SIZE,
    Room,
    View,
    room_id_of,
)
from keel.mesh.packets import Msg, RoomStamp, canonical_json

MESSAGE_DOMAIN = "room-message"


def create(
    identity: NodeIdentity,
    *,
    name: str,
    members: Iterable[str],
    random: Callable[[int], bytes] = secrets.token_bytes,
) -> dict[str, Any]:
    """The fields of a new ``room`` record owned by ``identity`` (always a member of it)."""
    check_name(name)
    nonce = random(ROOM_NONCE_SIZE)
    return {
        "room": room_id_of(identity.node_id, nonce),
        "nonce": b64u_encode(nonce),
        "name": name,
        "version": 1,
        "members": _member_list(identity.node_id, members),
    }


def update(identity: NodeIdentity, room: Room, *, members: Iterable[str]) -> dict[str, Any]:
    """The fields of the room's next version, with ``members``; only its owner may sign it."""
    if room.owner != identity.node_id:
        raise UsageError(
            f"room {room.name} ({room.id}) belongs to {room.owner}; only its owner changes it"
        )
    return {
        "room": room.id,
        "nonce": room.record.body["nonce"],
        "name": room.name,
        "version": room.version + 1,
        "members": _member_list(identity.node_id, members),
    }


def check_name(name: str) -> None:
    if not 0 < len(name) <= MAX_ROOM_NAME or not name.isprintable():
        raise UsageError(f"room name must be 1 to {MAX_ROOM_NAME} printable characters")


def _member_list(owner: str, members: Iterable[str]) -> list[str]:
    members = list(members)
    for member in members:
        if not is_node_id(member):
            raise UsageError(f"{member!r} is not a node id (32 characters of a-z and 2-7)")
    result = sorted({owner, *members})
    if len(result) > MAX_ROOM_MEMBERS:
        raise UsageError(f"a room has at most {MAX_ROOM_MEMBERS} members")
    return result


def _signed(
    room: str,
    message_id: str,
    author: str,
    *,
    topic: str,
    expires: int,
    version: int,
    payload: bytes,
) -> bytes:
    return canonical_json(
        {
            "room": room,
            "id": message_id,
            "from": author,
            "topic": topic,
            "exp": expires,
            "rv": version,
            "digest": b64u_encode(hashlib.sha256(payload).digest()),
        }
    )


def stamp(
    identity: NodeIdentity,
    room: Room,
    message_id: str,
    *,
    topic: str,
    expires: int,
    payload: bytes,
) -> RoomStamp:
    """The author's stamp for one room message (the same on every member's copy)."""
    signed = _signed(
        room.id,
        message_id,
        identity.node_id,
        topic=topic,
        expires=expires,
        version=room.version,
        payload=payload,
    )
    return RoomStamp(room.id, identity.node_id, room.version, identity.sign(MESSAGE_DOMAIN, signed))


class RoomVerdict(enum.Enum):
    ACCEPT = "accept"
    BUSY = "busy"  # not yet: the receiver lacks the room version the author saw
    REJECT = "reject"


@dataclass(frozen=True)
class Check:
    verdict: RoomVerdict
    reason: str = ""


def check_message(view: View, local: str, message: Msg) -> Check:
    """Whether ``local`` takes a room message: room known, both in it, signature good."""
    stamp_ = message.room
    assert stamp_ is not None
    room = view.rooms.get(stamp_.room)
    if room is None or room.version < stamp_.version:
        return Check(RoomVerdict.BUSY, f"room {stamp_.room} version {stamp_.version} not known yet")
    author = view.admitted.get(stamp_.author)
    if author is None or not view.is_member(stamp_.author):
        return Check(RoomVerdict.REJECT, f"author {stamp_.author} is not a mesh member")
    recipients = view.room_recipients(room.id)
    if stamp_.author not in recipients:
        return Check(RoomVerdict.REJECT, f"author {stamp_.author} is not in room {room.id}")
    if local not in recipients:
        return Check(RoomVerdict.REJECT, f"this node is not in room {room.id}")
    signed = _signed(
        room.id,
        message.id,
        stamp_.author,
        topic=message.topic,
        expires=message.expires,
        version=stamp_.version,
        payload=message.payload,
    )
    if not verify_signature(author.node.signing_key, MESSAGE_DOMAIN, signed, stamp_.signature):
        return Check(RoomVerdict.REJECT, f"signature of {stamp_.author} does not verify")
    return Check(RoomVerdict.ACCEPT)
