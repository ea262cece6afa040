"""The control verbs' requests and results, typed. Pure.

Every verb's ``args`` (JSON from any process that may open the control
socket) becomes one frozen request here, its values checked by
:mod:`keel.mesh.arguments` (a :class:`~keel.errors.UsageError` naming the
key otherwise), before any of the node's logic sees it. What a request means
for the mesh (is the recipient a member, is this node a room's owner) is
checked against the membership view by :func:`recipient` and the node.
Results are :class:`typing.TypedDict`: the JSON the client reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypedDict

from keel.errors import KeelError, Refused, UsageError
from keel.mesh import arguments
from keel.mesh.ids import is_agent_name, is_message_id
from keel.mesh.invite import MAX_USES, InviteToken
from keel.mesh.membership import View

MAX_BATCH: Final = 10_000  # messages per send_many, messages per recv
MAX_WAIT: Final = 3600.0  # s a recv or a join may wait
MAX_LEASE: Final = 86_400.0


@dataclass(frozen=True)
class NoArgs:
    """status, peers, rooms, stream."""

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> NoArgs:
        return cls()


@dataclass(frozen=True)
class Invite:
    ttl: float
    uses: int

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Invite:
        return cls(
            arguments.ttl(args, 3600.0),
            arguments.integer(args, "uses", 1, minimum=1, maximum=MAX_USES),
        )


@dataclass(frozen=True)
class RevokeInvite:
    invite: str  # the invite id: 32 lowercase hex digits

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> RevokeInvite:
        invite = arguments.string(args, "invite")
        if not is_message_id(invite):
            raise UsageError(
                "invite must be an invite id (32 lowercase hex digits, "
                "as `keel mesh invites` lists them)"
            )
        return cls(invite)


@dataclass(frozen=True)
class Join:
    token: InviteToken
    timeout: float

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Join:
        token = InviteToken.decode(arguments.string(args, "token"))
        timeout = arguments.number(args, "timeout", 30.0, positive=True, maximum=MAX_WAIT)
        return cls(token, timeout)


def _message(args: Mapping[str, Any]) -> tuple[str, str, bytes, float | None]:
    """A message's id (the client's, or a new one), topic, payload and ttl (None: default)."""
    topic = arguments.topic(args)
    payload = arguments.data(args)
    ttl = arguments.ttl(args, 1.0) if "ttl" in args else None
    return arguments.message_id(args), topic, payload, ttl


@dataclass(frozen=True)
class Direct:
    """One message to one node, or to an agent there (``send``, an entry of ``send_many``).

    ``to`` is ``NODE_ID`` or ``AGENT@NODE_ID``."""

    id: str
    to: str  # the node
    topic: str
    payload: bytes
    ttl: float | None  # None: the node's default
    to_agent: str | None = None  # the agent on that node it is for
    as_agent: str | None = None  # the node's agent a node-level caller sends for

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Direct:
        agent, to = arguments.address(args, "to")
        message_id, topic, payload, ttl = _message(args)
        as_agent = args.get("as_agent")
        if as_agent is not None and not is_agent_name(as_agent):
            raise UsageError(
                "as_agent must be an agent's name (1 to 20 of a-z, 0-9, '_' and '-', "
                "starting with a letter)"
            )
        return cls(message_id, to, topic, payload, ttl, agent, as_agent)


@dataclass(frozen=True)
class SendMany:
    messages: tuple[Direct, ...]

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> SendMany:
        items = args.get("messages")
        if not isinstance(items, list) or not 0 < len(items) <= MAX_BATCH:
            raise UsageError(f"messages must be a list of 1 to {MAX_BATCH} messages")
        return cls(tuple(Direct.parse(item if isinstance(item, dict) else {}) for item in items))


@dataclass(frozen=True)
class Recv:
    topic: str
    max: int
    wait: float
    lease: float | None  # None: the node's default
    ack: tuple[int, ...]

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Recv:
        topic = arguments.topic(args)
        limit = arguments.integer(args, "max", 100, minimum=1, maximum=MAX_BATCH)
        wait = min(max(arguments.number(args, "wait", 0.0), 0.0), MAX_WAIT)
        lease = None
        if "lease" in args:
            lease = arguments.number(args, "lease", 1.0, positive=True, maximum=MAX_LEASE)
        return cls(topic, limit, wait, lease, tuple(arguments.receipts(args, "ack")))


@dataclass(frozen=True)
class Ack:
    receipts: tuple[int, ...]

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Ack:
        return cls(tuple(arguments.receipts(args, "receipts")))


@dataclass(frozen=True)
class Remove:
    node: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Remove:
        return cls(arguments.node_id(args, "node"))


@dataclass(frozen=True)
class OperatorChange:
    """``operator``: grant a member the operator role (``grant``) or take it back."""

    node: str
    grant: bool

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> OperatorChange:
        grant = args.get("grant")
        if not isinstance(grant, bool):
            raise UsageError("grant must be true or false")
        return cls(arguments.node_id(args, "node"), grant)


@dataclass(frozen=True)
class RoomCreate:
    name: str
    members: tuple[str, ...]

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> RoomCreate:
        name = arguments.string(args, "name")
        members = args.get("members", [])
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise UsageError("members must be a list of node ids (or AGENT@NODE_ID)")
        for member in members:
            arguments.address({"member": member}, "member")
        return cls(name, tuple(members))


@dataclass(frozen=True)
class RoomRef:
    """``room_members``: a room by id or name."""

    room: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> RoomRef:
        return cls(arguments.string(args, "room"))


@dataclass(frozen=True)
class RoomMember:
    """``room_add`` and ``room_remove``: ``node`` is a node id, or ``AGENT@NODE_ID``."""

    room: str
    node: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> RoomMember:
        room = arguments.string(args, "room")
        agent, node = arguments.address(args, "node")
        return cls(room, node if agent is None else f"{agent}@{node}")


@dataclass(frozen=True)
class RoomSend:
    id: str
    room: str
    topic: str
    payload: bytes
    ttl: float | None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> RoomSend:
        room = arguments.string(args, "room")
        message_id, topic, payload, ttl = _message(args)
        return cls(message_id, room, topic, payload, ttl)


@dataclass(frozen=True)
class DeadLetters:
    limit: int

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> DeadLetters:
        return cls(arguments.integer(args, "limit", 100, minimum=1, maximum=MAX_BATCH))


def recipient(view: View, me: str, to: str) -> str:
    """``to``, if this node may send it a message: another member of its mesh."""
    if to == me:
        raise UsageError("that is this node's own id; send to another member")
    if not view.is_member(to):
        state = "was removed from" if to in view.removed else "is not a member of"
        raise KeelError(f"{to} {state} mesh {view.mesh_id}")
    return to


def require_member(view: View, me: str) -> None:
    if not view.is_member(me):
        raise KeelError(f"this node was removed from mesh {view.mesh_id}")


def require_operator(view: View, me: str, what: str) -> None:
    """Membership changes are signed by operator nodes only; the others would not count them."""
    if me not in view.operators:
        named = ", ".join(sorted(view.operators)) or "none left"
        raise Refused(
            f"only an operator node of the mesh may {what}, and this node is not one "
            f"(operators: {named}); an operator grants the role with "
            "`keel mesh operator grant NODE_ID`"
        )


# ---------------------------------------------------------------- results


class Status(TypedDict):
    node: str
    mesh: str
    member: bool
    addresses: list[str]
    members: int
    operator: bool
    connected: list[str]
    outbox: int
    inbox: int
    answered_busy: int
    kem: str


class Invited(TypedDict):
    token: str
    id: str
    expires: int
    uses: int


class InviteInfo(TypedDict):
    id: str
    created: float
    expires: int
    uses_left: int
    state: str  # open, used-up, expired, revoked


class InviteRevoked(TypedDict):
    invite: str
    record: str
    issued_here: bool


class Joined(TypedDict, total=False):
    mesh: str
    node: str
    joined: bool
    via: str
    members: int


class PeerInfo(TypedDict):
    id: str
    addresses: list[str]
    connected: bool
    last_seen: float | None
    queued: int
    operator: bool


class Sent(TypedDict):
    id: str


class SentMany(TypedDict):
    ids: list[str]


ReceivedJson = TypedDict(
    "ReceivedJson",
    {
        "receipt": int,
        "id": str,
        "from": str,
        "agent": "str | None",  # the sending agent, as its node stamped it
        "to": "str | None",  # the agent of this node it was for
        "topic": str,
        "room": "str | None",
        "received": float,
        "data": str,
    },
)


class Received(TypedDict):
    messages: list[ReceivedJson]


class Acked(TypedDict):
    acked: int


class Removed(TypedDict):
    removed: str
    record: str


class OperatorChanged(TypedDict):
    node: str
    operator: bool
    record: str


class RoomMemberInfo(TypedDict):
    id: str  # as the room lists it: a node id, or AGENT@NODE_ID
    node: str
    agent: str | None  # None: the node as a whole (every agent of its)
    connected: bool
    member: bool


class RoomInfo(TypedDict):
    room: str
    name: str
    owner: str
    version: int
    members: list[RoomMemberInfo]


class RoomSent(TypedDict):
    id: str
    recipients: list[str]


class WhoAmI(TypedDict):
    """Who the node takes the caller for (``whoami``), from the kernel's credentials."""

    node: str
    caller: str  # "agent scout (uid 1001)", "root (pid 42)", "uid 1000 (not an agent)"
    uid: int
    agent: str | None  # None: no agent, the node itself
    tier: int | None
    mesh: dict[str, Any] | None  # its grant {"sendTo", "receiveFrom", "topics"}; None: all
    operator: bool  # may use the administrative verbs


class AgentInfo(TypedDict):
    """An agent this node tells apart (``agents``)."""

    agent: str
    node: str
    uid: int | None  # None: an agent another node announced (its uid, tier, grant are its own)
    tier: int | None
    mesh: dict[str, Any] | None
