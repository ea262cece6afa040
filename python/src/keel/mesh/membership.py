"""Signed membership records and the view they add up to. Pure.

A mesh is a grow-only set of records, each signed with the Ed25519 key of
the member that made it (``NodeIdentity.sign``, domain ``membership``, or
``room`` for room records). Nodes gossip the set; the membership *view* is a
deterministic function of the set alone, so two nodes holding the same
records agree, whatever order the records arrived in (a G-set CRDT).

Record kinds (every record has ``kind``, ``by`` = signer node id, ``at`` =
hybrid logical time in milliseconds, and ``sig``):

- ``genesis`` (``node``, ``addrs``): the mesh's founder, self-signed. A node
  holds exactly one; the mesh id is its record id.
- ``join`` (``node``, ``addrs``): ``by`` admits the node whose ``NodeRecord``
  is ``node`` (made when it redeemed one of ``by``'s invites).
- ``remove`` (``node``): ``by`` revokes node id ``node``, for good.
- ``operator`` (``node``, ``grant``): ``by`` makes member ``node`` an
  operator of the mesh (``grant`` true) or takes the role back (false).
- ``revoke-invite`` (``invite``): ``by`` revokes the invite whose id
  (:func:`keel.mesh.invite.invite_id_of`, 32 hex digits; never its secret)
  is ``invite``: the node that issued it refuses it from then on.
- ``addr`` (``addrs``): ``by``'s own listening addresses (latest wins).
- ``room``: an owner-signed room state (see :mod:`keel.mesh.rooms`).

The view: walk the records in ``(at, id)`` order starting from the genesis
member. A ``join`` takes effect only if its signer is a member (admitted,
not removed) at that point of the walk and its signature verifies with the
signer's admitted signing key; a ``remove``, ``operator`` or
``revoke-invite`` record only if its signer is, besides, an *operator* at
that point. The founder is the first operator; an operator grants the role to another member (never to
itself: a node cannot promote itself), and a removed node loses it. Removal
wins: a removed node is never admitted again, whatever joins follow. ``at`` is a hybrid logical
clock (``next_at``): a node stamps a new record later than every record it
already holds, so a record always sorts after the records that made its
signer a member, even between hosts whose clocks disagree.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from keel.mesh.encoding import b64u_decode, b64u_encode, is_address
from keel.mesh.errors import RemoteProtocolError
from keel.mesh.identity import NodeIdentity, NodeRecord, verify_signature
from keel.mesh.ids import SIGNATURE_SIZE, is_agent_name, is_message_id, is_node_id
from keel.mesh.packets import canonical_json

KINDS: Final = ("genesis", "join", "remove", "operator", "revoke-invite", "addr", "room")
DOMAINS: Final = {kind: "room" if kind == "room" else "membership" for kind in KINDS}
MAX_ADDRESSES: Final = 16
MAX_ROOM_NAME: Final = 64
MAX_ROOM_MEMBERS: Final = 1024
MAX_AT: Final = 2**53
ROOM_NONCE_SIZE: Final = 16
ROOM_ID_LABEL: Final = b"keel-mesh/1 room-id\x00"
RECORD_ID_LABEL: Final = b"keel-mesh/1 record-id\x00"

_FIELDS: Final[Mapping[str, frozenset[str]]] = {
    "genesis": frozenset({"node", "addrs"}),
    "join": frozenset({"node", "addrs"}),
    "remove": frozenset({"node"}),
    "operator": frozenset({"node", "grant"}),
    "revoke-invite": frozenset({"invite"}),
    "addr": frozenset({"addrs"}),
    "room": frozenset({"room", "nonce", "name", "version", "members"}),
}


def _bad(problem: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"membership record: {problem}", hint="forged or corrupted record")


def room_id_of(owner: str, nonce: bytes) -> str:
    """A room's id: it names its owner, so nobody else can sign the room's records."""
    return hashlib.blake2s(ROOM_ID_LABEL + owner.encode() + b"\x00" + nonce).digest()[:16].hex()


@dataclass(frozen=True)
class SignedRecord:
    """One signed record: ``body`` (every field but ``sig``) and the signature."""

    body: Mapping[str, Any]
    signature: bytes = field(repr=False)
    id: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.blake2s(RECORD_ID_LABEL + self.signed_bytes() + self.signature)
        object.__setattr__(self, "id", digest.digest()[:16].hex())
        object.__setattr__(self, "body", MappingProxyType(dict(self.body)))

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def by(self) -> str:
        return str(self.body["by"])

    @property
    def at(self) -> int:
        return int(self.body["at"])

    def signed_bytes(self) -> bytes:
        return canonical_json(dict(self.body))

    def verify_with(self, signing_key: bytes) -> bool:
        return verify_signature(
            signing_key, DOMAINS[self.kind], self.signed_bytes(), self.signature
        )

    def to_json(self) -> dict[str, Any]:
        return {**self.body, "sig": b64u_encode(self.signature)}

    def node_record(self) -> NodeRecord:
        """The admitted node of a ``genesis``/``join`` record (already checked by ``from_json``)."""
        return NodeRecord.from_json(self.body["node"])

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(self.body.get("addrs", ()))

    @classmethod
    def make(cls, identity: NodeIdentity, kind: str, at: int, **fields: Any) -> SignedRecord:
        body = {"kind": kind, "by": identity.node_id, "at": at, **fields}
        signature = identity.sign(DOMAINS[kind], canonical_json(body))
        return cls.from_json({**body, "sig": b64u_encode(signature)})

    @classmethod
    def from_json(cls, data: object) -> SignedRecord:
        """Parse and check a record's shape (not its signature: that needs the view)."""
        if not isinstance(data, Mapping):
            raise _bad("not a JSON object")
        kind = data.get("kind")
        if kind not in KINDS:
            raise _bad(f"unknown kind {kind!r}")
        expected = _FIELDS[kind] | {"kind", "by", "at", "sig"}
        if set(data) != expected:
            raise _bad(f"a {kind} record has exactly the fields {sorted(expected)}")
        if not is_node_id(data["by"]):
            raise _bad("by is not a node id")
        at = data["at"]
        if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at < MAX_AT:
            raise _bad("at must be an integer of milliseconds")
        try:
            signature = b64u_decode(data["sig"], "sig", SIGNATURE_SIZE)
        except ValueError as exc:
            raise _bad(str(exc)) from None
        body = {k: v for k, v in data.items() if k != "sig"}
        if "addrs" in body:
            addrs = body["addrs"]
            if (
                not isinstance(addrs, list)
                or len(addrs) > MAX_ADDRESSES
                or not all(is_address(a) for a in addrs)
            ):
                raise _bad(f"addrs must list at most {MAX_ADDRESSES} host:port strings")
        if kind in ("genesis", "join"):
            node = NodeRecord.from_json(body["node"])  # verifies id and binding
            if kind == "genesis" and node.node_id != body["by"]:
                raise _bad("a genesis record is signed by the node it founds")
            if kind == "join" and node.node_id == body["by"]:
                raise _bad("a node cannot admit itself")
        elif kind in ("remove", "operator"):
            if not is_node_id(body["node"]):
                raise _bad("node is not a node id")
            if kind == "operator":
                if not isinstance(body["grant"], bool):
                    raise _bad("grant must be true or false")
                if body["node"] == body["by"]:
                    raise _bad("a node cannot grant or take back its own operator role")
        elif kind == "revoke-invite":
            if not is_message_id(body["invite"]):
                raise _bad("invite is not an invite id (32 lowercase hex digits)")
        elif kind == "room":
            _check_room(body)
        return cls(body, signature)


def _check_room(body: Mapping[str, Any]) -> None:
    try:
        nonce = b64u_decode(body["nonce"], "nonce", ROOM_NONCE_SIZE)
    except ValueError as exc:
        raise _bad(str(exc)) from None
    if not is_message_id(body["room"]) or room_id_of(body["by"], nonce) != body["room"]:
        raise _bad("room id does not derive from its owner and nonce")
    name = body["name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_ROOM_NAME or not name.isprintable():
        raise _bad(f"room name must be 1 to {MAX_ROOM_NAME} printable characters")
    version = body["version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < MAX_AT:
        raise _bad("room version must be a positive integer")
    members = body["members"]
    if (
        not isinstance(members, list)
        or len(members) > MAX_ROOM_MEMBERS
        or not all(is_room_member(m) for m in members)
        or members != sorted(set(members))
    ):
        raise _bad(
            "room members must be sorted unique node ids or AGENT@NODE_ID entries, "
            f"at most {MAX_ROOM_MEMBERS}"
        )
    bare = {m for m in members if "@" not in m}
    scoped = {split_member(m)[1] for m in members if "@" in m}
    if bare & scoped:
        raise _bad("a room lists a node either as a whole or by its agents, not both")
    if body["by"] not in bare | scoped:
        raise _bad("a room's owner is one of its members (as a node or by its agents)")


def is_room_member(entry: object) -> bool:
    """A room record's member entry: a node id, or ``AGENT@NODE_ID``."""
    if not isinstance(entry, str):
        return False
    agent, sep, node = entry.partition("@")
    return is_node_id(entry) if not sep else is_agent_name(agent) and is_node_id(node)


def split_member(entry: str) -> tuple[str | None, str]:
    """A member entry as (agent or None for the whole node, node id)."""
    agent, sep, node = entry.partition("@")
    return (agent, node) if sep else (None, entry)


@dataclass(frozen=True)
class Member:
    node: NodeRecord
    addresses: tuple[str, ...]
    admitted_by: str | None  # None for the founder
    admitted_at: int
    removed_at: int | None = None

    @property
    def node_id(self) -> str:
        return self.node.node_id


@dataclass(frozen=True)
class Room:
    id: str
    name: str
    owner: str
    version: int
    members: tuple[str, ...]  # as the owner signed them (may name nodes since removed)
    record: SignedRecord = field(repr=False)

    @functools.cached_property
    def _by_node(self) -> dict[str, tuple[str, ...] | None]:
        """Each node in the room: None if listed as a whole, else its listed agents."""
        out: dict[str, tuple[str, ...] | None] = {}
        for entry in self.members:
            agent, node = split_member(entry)
            if agent is None:
                out[node] = None
            else:
                listed = out.get(node) or ()
                out[node] = (*listed, agent)
        return out

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes in the room: those listed as a whole and those of listed agents, sorted."""
        return tuple(sorted(self._by_node))

    def agents_of(self, node: str) -> tuple[str, ...] | None:
        """The agents of ``node`` in the room: None if it is in as a whole node (all its
        agents), () if it is not in at all."""
        return self._by_node.get(node, ())

    def admits(self, node: str, agent: str | None) -> bool:
        """Whether ``agent`` of ``node`` (None: the node itself) is in the room.

        A node listed as a whole is in with every agent of its; a node listed
        by agents is in (its node-level callers too) with those agents only.
        """
        agents = self.agents_of(node)
        if agents is None:
            return True
        return bool(agents) and (agent is None or agent in agents)


@dataclass(frozen=True)
class View:
    """What a record set means: who is in, who was removed, the rooms."""

    mesh_id: str
    founder: str
    admitted: Mapping[str, Member]  # everyone ever admitted (removed ones too)
    removed: Mapping[str, int]  # node id -> at of the removal that took effect
    operators: frozenset[str]  # the members that may remove nodes and grant the role
    revoked_invites: Mapping[str, int]  # invite id -> at of the revocation that took effect
    rooms: Mapping[str, Room]
    effective: frozenset[str]  # ids of the records that took effect
    room_versions: Mapping[tuple[str, int], Room]  # every effective version of every room

    def is_member(self, node_id: str) -> bool:
        return node_id in self.admitted and node_id not in self.removed

    @property
    def members(self) -> dict[str, Member]:
        return {n: m for n, m in self.admitted.items() if n not in self.removed}

    def room_recipients(self, room_id: str) -> tuple[str, ...]:
        """A room's members that are still mesh members."""
        room = self.rooms.get(room_id)
        if room is None:
            return ()
        return tuple(m for m in room.nodes if self.is_member(m))


class MembershipError(RemoteProtocolError):
    """A record cannot join this node's record set (another mesh, too many records)."""


class Membership:
    """A node's record set and its view. Time comes in as ``now_ms`` (wall clock)."""

    MAX_RECORDS: Final = 100_000

    def __init__(self, genesis: SignedRecord, records: Iterable[SignedRecord] = ()) -> None:
        if genesis.kind != "genesis":
            raise ValueError("a mesh starts from a genesis record")
        founder = genesis.node_record()
        if not genesis.verify_with(founder.signing_key):
            raise _bad("the genesis record's signature does not verify")
        self.genesis = genesis
        self._records: dict[str, SignedRecord] = {genesis.id: genesis}
        self._verified: dict[tuple[str, bytes], bool] = {}
        self._view: View | None = None
        self._max_at = genesis.at
        for record in records:
            self.add(record)

    @classmethod
    def found(cls, identity: NodeIdentity, addresses: Sequence[str], now_ms: int) -> Membership:
        """A new mesh of one: ``identity`` is its founder."""
        genesis = SignedRecord.make(
            identity, "genesis", now_ms, node=identity.record().to_json(), addrs=list(addresses)
        )
        return cls(genesis)

    @property
    def mesh_id(self) -> str:
        return self.genesis.id

    def records(self) -> list[SignedRecord]:
        return sorted(self._records.values(), key=lambda r: (r.at, r.id))

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def add(self, record: SignedRecord) -> bool:
        """Store ``record``; True if it is new. Whether it takes effect is up to the view."""
        if record.id in self._records:
            return False
        if record.kind == "genesis":
            raise MembershipError(
                f"record {record.id} founds another mesh (this node is in mesh {self.mesh_id})",
                hint="the peer belongs to a different mesh",
            )
        if len(self._records) >= self.MAX_RECORDS:
            raise MembershipError(
                f"refusing record {record.id}: {self.MAX_RECORDS} records held already",
                hint="record flood",
            )
        self._records[record.id] = record
        self._max_at = max(self._max_at, record.at)
        self._view = None
        return True

    def next_at(self, now_ms: int) -> int:
        """The time stamp for a new record: now, but after every record held."""
        return max(now_ms, self._max_at + 1)

    @property
    def view(self) -> View:
        if self._view is None:
            self._view = self._walk()
        return self._view

    def _verified_by(self, record: SignedRecord, signer: Member | None) -> bool:
        if signer is None:
            return False
        key = (record.id, signer.node.signing_key)
        if key not in self._verified:
            self._verified[key] = record.verify_with(signer.node.signing_key)
        return self._verified[key]

    def _walk(self) -> View:
        founder = self.genesis.node_record()
        admitted: dict[str, Member] = {
            founder.node_id: Member(founder, self.genesis.addresses, None, self.genesis.at)
        }
        removed: dict[str, int] = {}
        operators = {founder.node_id}
        revoked_invites: dict[str, int] = {}
        addresses: dict[str, tuple[str, ...]] = {}
        rooms: dict[str, Room] = {}
        room_versions: dict[tuple[str, int], Room] = {}
        effective = {self.genesis.id}
        for record in self.records():
            kind, by = record.kind, record.by
            if kind == "genesis":
                continue
            signer = admitted.get(by)
            in_good_standing = signer if by not in removed else None
            if kind == "join":
                node = record.node_record()
                if node.node_id in admitted or node.node_id in removed:
                    continue
                if not self._verified_by(record, in_good_standing):
                    continue
                admitted[node.node_id] = Member(node, record.addresses, by, record.at)
            elif kind == "remove":
                target = str(record.body["node"])
                if target in removed or by not in operators:
                    continue
                if not self._verified_by(record, in_good_standing):
                    continue
                removed[target] = record.at
                operators.discard(target)
            elif kind == "operator":
                target = str(record.body["node"])
                if by not in operators or target not in admitted or target in removed:
                    continue
                if not self._verified_by(record, in_good_standing):
                    continue
                if record.body["grant"]:
                    operators.add(target)
                else:
                    operators.discard(target)
            elif kind == "revoke-invite":
                invite = str(record.body["invite"])
                if invite in revoked_invites or by not in operators:
                    continue
                if not self._verified_by(record, in_good_standing):
                    continue
                revoked_invites[invite] = record.at
            elif kind == "addr":
                if not self._verified_by(record, signer):
                    continue
                addresses[by] = record.addresses
            else:
                if not self._verified_by(record, signer):
                    continue
                room = Room(
                    record.body["room"],
                    record.body["name"],
                    by,
                    record.body["version"],
                    tuple(record.body["members"]),
                    record,
                )
                current = rooms.get(room.id)
                # The walk is in (at, id) order, so on equal versions the later record wins.
                if current is None or room.version >= current.version:
                    rooms[room.id] = room
                room_versions[room.id, room.version] = room  # equal versions: the later
            effective.add(record.id)
        for node_id, addrs in addresses.items():
            member = admitted[node_id]
            admitted[node_id] = Member(member.node, addrs, member.admitted_by, member.admitted_at)
        for node_id, at in removed.items():
            if node_id in admitted:
                member = admitted[node_id]
                admitted[node_id] = Member(
                    member.node, member.addresses, member.admitted_by, member.admitted_at, at
                )
        return View(
            mesh_id=self.mesh_id,
            founder=founder.node_id,
            admitted=MappingProxyType(admitted),
            removed=MappingProxyType(removed),
            operators=frozenset(operators),
            revoked_invites=MappingProxyType(revoked_invites),
            rooms=MappingProxyType(rooms),
            room_versions=MappingProxyType(room_versions),
            effective=frozenset(effective),
        )

    # -- making records (the local node signs)

    def make(self, identity: NodeIdentity, kind: str, now_ms: int, **fields: Any) -> SignedRecord:
        """Sign a new record at ``next_at(now_ms)`` and add it."""
        record = SignedRecord.make(identity, kind, self.next_at(now_ms), **fields)
        self.add(record)
        return record
