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

plus ``"agent"`` when an agent of the author's node sent it (application
revision 4; without an agent the bytes are those of revision 2 and 3), so
whichever peer hands the copy over, a receiver checks the author itself:
a relaying or malicious member cannot forge another member's message, nor
strip, add or change its sending agent.

Members are nodes (``NODE_ID``: the node and every agent of its) or agents
(``AGENT@NODE_ID``: that node, its node-level callers, and only the agents
listed); a node is listed one way or the other, never both. An agent sends
to, and reads, a room only if :meth:`Room.admits` it, checked against the
room's current version each time: removing an agent takes effect for its
next message, and it reads nothing more of the room.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from keel.config import shorten
from keel.errors import KeelError, UsageError
from keel.mesh.encoding import b64u_encode
from keel.mesh.identity import NodeIdentity, verify_signature
from keel.mesh.membership import (
    MAX_ROOM_MEMBERS,
    MAX_ROOM_NAME,
    ROOM_NONCE_SIZE,
    Room,
    View,
    is_room_member,
    room_id_of,
    split_member,
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


def added(room: Room, entry: str) -> list[str]:
    """``room``'s members with ``entry`` (``NODE_ID`` or ``AGENT@NODE_ID``) added.

    Adding a node that the room lists by agents makes it a whole member
    (every agent of its); adding an agent of a node that is a whole member
    is refused (it is in already): to let only some agents of a node in,
    remove the node and add those agents.
    """
    if entry in room.members:
        raise KeelError(f"{entry} is in room {room.name} already")
    agent, node = split_member(entry)
    current = room.agents_of(node)
    if agent is None:
        return [m for m in room.members if split_member(m)[1] != node] + [node]
    if current is None:
        raise KeelError(
            f"{node} is in room {room.name} as a whole node, so {agent} is in already; to let "
            f"only some of its agents in, remove {node} from the room, then add those agents"
        )
    return [*room.members, entry]


def removed(room: Room, entry: str) -> list[str]:
    """``room``'s members without ``entry``: a node id takes the node out with its agents."""
    agent, node = split_member(entry)
    current = room.agents_of(node)
    if agent is not None and current is None:
        raise KeelError(
            f"{node} is in room {room.name} as a whole node (every agent of its): to keep "
            f"{agent} out, remove {node} and add the agents of it that stay"
        )
    if (agent is not None and agent not in (current or ())) or (agent is None and current == ()):
        raise KeelError(f"{entry} is not in room {room.name}")
    left = [
        m for m in room.members if m != entry and (agent is not None or split_member(m)[1] != node)
    ]
    if node == room.owner and all(split_member(m)[1] != node for m in left):
        raise UsageError("the owner cannot leave its own room")
    return left


def check_name(name: str) -> None:
    if not 0 < len(name) <= MAX_ROOM_NAME or not name.isprintable():
        raise UsageError(f"room name must be 1 to {MAX_ROOM_NAME} printable characters")


def _member_list(owner: str, members: Iterable[str]) -> list[str]:
    """The member entries, checked and sorted; the owner as a whole node unless it lists
    agents of its own."""
    entries = set(members)
    for member in entries:
        if not is_room_member(member):
            raise UsageError(
                f"{shorten(repr(member))} is not a node id or AGENT@NODE_ID (an agent's name is "
                "1 to 20 of a-z, 0-9, '_' and '-', starting with a letter)"
            )
    scoped = {split_member(m)[1] for m in entries if "@" in m}
    if owner not in scoped:
        entries.add(owner)
    both = sorted(scoped & entries)
    if both:
        raise UsageError(
            f"{both[0]} is listed both as a whole node and by its agents: a node is in a "
            "room either with every agent of its (NODE_ID) or with those listed (AGENT@NODE_ID)"
        )
    result = sorted(entries)
    if len(result) > MAX_ROOM_MEMBERS:
        raise UsageError(f"a room has at most {MAX_ROOM_MEMBERS} members")
    return result


def signed_bytes(
    room: str,
    message_id: str,
    author: str,
    *,
    topic: str,
    expires: int,
    version: int,
    payload: bytes | memoryview,
    agent: str | None = None,
) -> bytes:
    """What the author signs (domain ``room-message``): ``agent`` only when an agent sent it."""
    fields: dict[str, Any] = {
        "room": room,
        "id": message_id,
        "from": author,
        "topic": topic,
        "exp": expires,
        "rv": version,
        "digest": b64u_encode(hashlib.sha256(payload).digest()),
    }
    if agent is not None:
        fields["agent"] = agent
    return canonical_json(fields)


def stamp(
    identity: NodeIdentity,
    room: Room,
    message_id: str,
    *,
    topic: str,
    expires: int,
    payload: bytes | memoryview,
    agent: str | None = None,
) -> RoomStamp:
    """The author's stamp for one room message (the same on every member's copy), sent by
    ``agent`` of this node (None: the node itself)."""
    signed = signed_bytes(
        room.id,
        message_id,
        identity.node_id,
        topic=topic,
        expires=expires,
        version=room.version,
        payload=payload,
        agent=agent,
    )
    return RoomStamp(room.id, identity.node_id, room.version, identity.sign(MESSAGE_DOMAIN, signed))


def describe(node: str, agent: str | None) -> str:
    return node if agent is None else f"{agent}@{node}"


def refuse_send(view: View, me: str, room: Room, agent: str | None) -> str | None:
    """Why ``agent`` of this node (None: the node itself) may not send to ``room`` now, or None."""
    if me not in view.room_recipients(room.id):
        return f"this node is not a member of room {room.name}"
    if agent is None or room.admits(me, agent):
        return None
    listed = room.agents_of(me) or ()
    return (
        f"agent {agent} is not a member of room {room.name} ({room.id}, version "
        f"{room.version}): its members on this node are the agents " + ", ".join(listed)
    )


def recipients(room: Room, nodes: Iterable[str]) -> list[tuple[str, str | None]]:
    """The members of ``room`` on ``nodes``: (node, None) for a node in as a whole,
    (node, agent) for each agent listed of a node in by its agents."""
    out: list[tuple[str, str | None]] = []
    for node in nodes:
        agents = room.agents_of(node)
        out += [(node, None)] if agents is None else [(node, agent) for agent in agents]
    return out


def reads(view: View, me: str, agent: str | None) -> Callable[[str], bool] | None:
    """Which rooms' messages ``agent`` of this node may read and acknowledge (None: the node
    itself, every room), by the rooms' current versions."""
    if agent is None:
        return None

    def readable(room_id: str) -> bool:
        room = view.rooms.get(room_id)
        return room is not None and view.is_member(me) and room.admits(me, agent)

    return readable


class RoomVerdict(enum.Enum):
    ACCEPT = "accept"
    BUSY = "busy"  # not yet: the receiver lacks the room version the author saw
    REJECT = "reject"


@dataclass(frozen=True)
class Check:
    verdict: RoomVerdict
    reason: str = ""


def check_message(view: View, local: str, message: Msg) -> Check:
    """Whether ``local`` takes a room message: room known, author (and its agent) and this
    node in it, signature good."""
    stamp_ = message.room
    assert stamp_ is not None
    room = view.rooms.get(stamp_.room)
    if room is None or room.version < stamp_.version:
        return Check(RoomVerdict.BUSY, f"room {stamp_.room} version {stamp_.version} not known yet")
    author = view.admitted.get(stamp_.author)
    if author is None or not view.is_member(stamp_.author):
        return Check(RoomVerdict.REJECT, f"author {stamp_.author} is not a mesh member")
    if not room.admits(stamp_.author, message.agent):
        sender = describe(stamp_.author, message.agent)
        return Check(RoomVerdict.REJECT, f"author {sender} is not in room {room.id}")
    claimed = view.room_versions.get((room.id, stamp_.version), room)
    if not claimed.admits(stamp_.author, message.agent):
        sender = describe(stamp_.author, message.agent)
        return Check(
            RoomVerdict.REJECT,
            f"author {sender} was not in room {room.id} at version {stamp_.version}, as it claims",
        )
    if local not in view.room_recipients(room.id):
        return Check(RoomVerdict.REJECT, f"this node is not in room {room.id}")
    if message.to is not None:
        return Check(RoomVerdict.REJECT, "a room message is for the room, not for one agent (to)")
    signed = signed_bytes(
        room.id,
        message.id,
        stamp_.author,
        topic=message.topic,
        expires=message.expires,
        version=stamp_.version,
        payload=message.payload,
        agent=message.agent,
    )
    if not verify_signature(author.node.signing_key, MESSAGE_DOMAIN, signed, stamp_.signature):
        return Check(
            RoomVerdict.REJECT,
            f"signature of {describe(stamp_.author, message.agent)} does not verify",
        )
    return Check(RoomVerdict.ACCEPT)
