"""The mesh's control verbs: each a typed request (:mod:`keel.mesh.verbs`) carried out by the node.

Every handler parses its request first (a one-line ``bad_request`` for bad
arguments), then asks the node's parts; the administrative verbs
(:data:`keel.mesh.access.ADMIN_VERBS`) are for operators only, and an agent
(:class:`keel.mesh.access.Agents`, known by its uid) sends and reads only
within its mesh grant: a refusal is a ``forbidden`` answer naming the grant,
and a ``mesh-refused`` ledger entry. ``status`` is the shell's
(:meth:`keel.mesh.node.MeshNode.status`).
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar

from keel.agents.identity import Caller
from keel.api import Handler, Peer, Upgrade
from keel.errors import KeelError, UsageError
from keel.mesh import agent_streams, arguments, local, packets, rooms, verbs
from keel.mesh.access import NotPermitted, guard
from keel.mesh.config import Settings
from keel.mesh.delivery import Backpressure
from keel.mesh.identity import NodeIdentity
from keel.mesh.ids import check_topic, is_agent_name, is_node_id
from keel.mesh.inbox import Inbox
from keel.mesh.invite import InviteRecord, InviteToken, new_invite
from keel.mesh.links import Links
from keel.mesh.local import SendEntry, Status
from keel.mesh.members import Members
from keel.mesh.membership import Room, split_member
from keel.mesh.outbound import NewMessage, Outbound
from keel.mesh.store import Store
from keel.service import Shell

STREAM_SEND_WAIT: Final = 5.0  # s a stream's SEND waits for room in a full outbox before "busy"
REFUSAL_QUIET: Final = 60.0  # s: the same refusal of the same agent is recorded once per this

R = TypeVar("R")


def _verb(parse: Callable[[Mapping[str, Any]], R], run: Callable[[R], Awaitable[Any]]) -> Handler:
    async def handle(args: dict[str, Any], peer: Peer) -> Any:
        return await run(parse(args))

    return handle


def _as_caller(
    parse: Callable[[Mapping[str, Any]], R], run: Callable[[R, Peer], Awaitable[Any]]
) -> Handler:
    """A verb whose answer depends on who asks (an agent, or the node itself)."""

    async def handle(args: dict[str, Any], peer: Peer) -> Any:
        return await run(parse(args), peer)

    return handle


class Node(Protocol):
    """What the verbs use of the node (:class:`keel.mesh.node.MeshNode`)."""

    me: str
    identity: NodeIdentity
    addresses: list[str]
    settings: Settings
    shell: Shell
    store: Store
    members: Members
    links: Links
    outbound: Outbound
    inbox: Inbox

    def wall(self) -> float: ...

    async def join(self, token: InviteToken, timeout: float) -> verbs.Joined: ...


class Control:
    """The verbs of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.agents = node.settings.agents
        self._refusals: dict[tuple[str, str], tuple[float, int]] = {}  # -> (recorded at, since)

    def handlers(self) -> dict[str, Handler]:
        table: dict[str, Handler] = {
            "invite": _verb(verbs.Invite.parse, self.invite),
            "invites": _verb(verbs.NoArgs.parse, self.invites),
            "revoke_invite": _verb(verbs.RevokeInvite.parse, self.revoke_invite),
            "join": _verb(verbs.Join.parse, self.join),
            "peers": _verb(verbs.NoArgs.parse, self.peers),
            "whoami": _as_caller(verbs.NoArgs.parse, self.whoami),
            "agents": _verb(verbs.NoArgs.parse, self.agents_known),
            "send": _as_caller(verbs.Direct.parse, self.send),
            "send_many": _as_caller(verbs.SendMany.parse, self.send_many),
            "recv": _as_caller(verbs.Recv.parse, self.recv),
            "stream": _as_caller(verbs.NoArgs.parse, self.stream),
            "ack": _as_caller(verbs.Ack.parse, self.ack),
            "remove": _verb(verbs.Remove.parse, self.remove),
            "operator": _verb(verbs.OperatorChange.parse, self.operator),
            "room_create": _verb(verbs.RoomCreate.parse, self.room_create),
            "room_add": _verb(
                verbs.RoomMember.parse, functools.partial(self.room_change, add=True)
            ),
            "room_remove": _verb(
                verbs.RoomMember.parse, functools.partial(self.room_change, add=False)
            ),
            "room_send": _as_caller(verbs.RoomSend.parse, self.room_send),
            "room_members": _verb(verbs.RoomRef.parse, self.room_members),
            "rooms": _verb(verbs.NoArgs.parse, self.rooms),
            "dead_letters": _as_caller(verbs.DeadLetters.parse, self.dead_letters),
        }
        return guard(table, self.node.settings.operators())

    def _member(self) -> None:
        verbs.require_member(self.node.members.view, self.node.me)

    # -- who is asking

    def _refuse(self, caller: Caller, verb: str, refusal: str | None) -> None:
        """Raise ``NotPermitted(refusal)`` (recorded in the ledger) unless it is None."""
        if refusal is None:
            return
        self._record_refusal(caller, verb, refusal)
        raise NotPermitted(refusal)

    def _record_refusal(self, caller: Caller, verb: str, refusal: str) -> None:
        """A ``mesh-refused`` ledger entry; the same one at most once a minute (with a count)."""
        self._record_refused(caller.agent or f"uid {caller.uid}", caller.uid, verb, refusal)

    def _record_refused(self, agent: str, uid: int, verb: str, refusal: str) -> None:
        key = (agent, refusal)
        now = self.node.wall()
        last = self._refusals.get(key)
        if last is not None and now - last[0] < REFUSAL_QUIET:
            self._refusals[key] = (last[0], last[1] + 1)
            return
        if len(self._refusals) >= 4096:
            self._refusals.clear()
        self._refusals[key] = (now, 0)
        data: dict[str, Any] = {"agent": agent, "uid": uid, "verb": verb, "reason": refusal}
        if last is not None and last[1]:
            data["repeats"] = last[1]  # refused this often since the last entry
        self.node.shell.record("mesh-refused", agent, data)

    def refused_read(
        self, agent: str, topic: str, senders: Sequence[tuple[str, str | None]]
    ) -> None:
        """Messages on ``topic`` from ``senders`` were kept from ``agent`` (its
        ``receiveFrom``): a ``mesh-refused`` entry (:meth:`keel.mesh.inbox.Inbox` asks)."""
        entry = self.agents.entries.get(agent)
        if entry is not None:
            refusal = self.agents.refuse_senders(agent, topic, senders)
            self._record_refused(agent, entry.uid, "read", refusal)

    async def whoami(self, request: verbs.NoArgs, peer: Peer) -> verbs.WhoAmI:
        caller = self.agents.caller(peer)
        grant = self.agents.grant(caller)
        tier = None if caller.agent is None else self.agents.entries[caller.agent].tier
        return {
            "node": self.node.me,
            "caller": caller.describe(),
            "uid": caller.uid,
            "agent": caller.agent,
            "tier": tier,
            "mesh": None if grant is None else grant.to_json(),
            "operator": self.node.settings.operators().permits(peer),
        }

    async def agents_known(self, request: verbs.NoArgs) -> list[verbs.AgentInfo]:
        """This node's agents (with their grants), then those its connected peers announced."""
        here: list[verbs.AgentInfo] = [
            {
                "agent": entry.name,
                "node": self.node.me,
                "uid": entry.uid,
                "tier": entry.tier,
                "mesh": entry.mesh.to_json(),
            }
            for entry in sorted(self.agents.entries.values(), key=lambda e: e.name)
        ]
        there: list[verbs.AgentInfo] = [
            {"agent": name, "node": peer, "uid": None, "tier": None, "mesh": None}
            for peer, link in sorted(self.node.links.by_peer.items())
            for name in link.announced
        ]
        return here + there

    # -- the node and its mesh

    async def invite(self, request: verbs.Invite) -> verbs.Invited:
        self._member()
        node = self.node
        wall = node.wall()
        token = new_invite(
            node.identity, node.addresses, now=wall, ttl=request.ttl, uses=request.uses
        )
        node.store.add_invite(InviteRecord.from_token(token), wall)
        node.shell.record(
            "invite", token.invite_id.hex(), {"expires": token.expires, "uses": token.uses}
        )
        return {
            "token": token.encode(),
            "id": token.invite_id.hex(),
            "expires": token.expires,
            "uses": token.uses,
        }

    async def invites(self, request: verbs.NoArgs) -> list[verbs.InviteInfo]:
        """The invites this node issued and still holds (expired ones go within a minute)."""
        node = self.node
        revoked = node.members.view.revoked_invites
        wall = node.wall()
        out: list[verbs.InviteInfo] = []
        for invite, created in node.store.list_invites():
            invite_id = invite.invite_id.hex()
            if invite_id in revoked:
                state = "revoked"
            elif wall >= invite.expires:
                state = "expired"
            elif invite.uses_left <= 0:
                state = "used-up"
            else:
                state = "open"
            out.append(
                {
                    "id": invite_id,
                    "created": created,
                    "expires": invite.expires,
                    "uses_left": invite.uses_left,
                    "state": state,
                }
            )
        return out

    async def revoke_invite(self, request: verbs.RevokeInvite) -> verbs.InviteRevoked:
        """Sign a ``revoke-invite`` record: the invite's issuer refuses it once the record arrives."""
        self._member()
        node, invite = self.node, request.invite
        view = node.members.view
        verbs.require_operator(view, node.me, "revoke an invite")
        if invite in view.revoked_invites:
            raise KeelError(f"invite {invite} was revoked already")
        record = node.members.sign("revoke-invite", invite=invite)
        node.shell.record("invite-revoke", invite, {"invite": invite, "by": node.me})
        issued_here = node.store.get_invite(bytes.fromhex(invite)) is not None
        return {"invite": invite, "record": record.id, "issued_here": issued_here}

    async def join(self, request: verbs.Join) -> verbs.Joined:
        return await self.node.join(request.token, request.timeout)

    async def peers(self, request: verbs.NoArgs) -> list[verbs.PeerInfo]:
        node = self.node
        seen = node.store.last_seen()
        now = node.wall()
        out: list[verbs.PeerInfo] = []
        for node_id, member in sorted(node.members.view.members.items()):
            if node_id == node.me:
                continue
            connected = node_id in node.links.by_peer
            out.append(
                {
                    "id": node_id,
                    "addresses": list(member.addresses),
                    "connected": connected,
                    "last_seen": now if connected else seen.get(node_id),
                    "queued": node.outbound.queued(node_id),
                    "operator": node_id in node.members.view.operators,
                }
            )
        return out

    async def remove(self, request: verbs.Remove) -> verbs.Removed:
        self._member()
        node, target = self.node, request.node
        view = node.members.view
        if target == node.me:
            raise UsageError(
                "a node cannot remove itself; run `keel mesh remove` on another member"
            )
        if target in view.removed:
            raise KeelError(f"{target} was removed already")
        if target not in view.admitted:
            raise KeelError(f"{target} is not a member of mesh {view.mesh_id}")
        verbs.require_operator(view, node.me, "remove a node")
        record = node.members.sign("remove", node=target)  # the removed node hears it too
        node.shell.record("member-remove", target, {"node": target, "by": node.me})
        return {"removed": target, "record": record.id}

    async def operator(self, request: verbs.OperatorChange) -> verbs.OperatorChanged:
        self._member()
        node, target, grant = self.node, request.node, request.grant
        view = node.members.view
        if target == node.me:
            raise UsageError(
                "a node cannot grant or take back its own operator role; "
                "another operator node does it"
            )
        if not view.is_member(target):
            raise KeelError(f"{target} is not a member of mesh {view.mesh_id}")
        verbs.require_operator(view, node.me, "grant or take back the operator role")
        if (target in view.operators) == grant:
            raise KeelError(f"{target} is {'an' if grant else 'not an'} operator already")
        record = node.members.sign("operator", node=target, grant=grant)
        node.shell.record(
            "member-operator", target, {"node": target, "grant": grant, "by": node.me}
        )
        return {"node": target, "operator": grant, "record": record.id}

    # -- messages

    def _message(self, r: verbs.Direct, caller: Caller) -> NewMessage:
        """``r`` as a message from ``caller`` (its agent stamped, if it is one)."""
        node = self.node
        verbs.recipient(node.members.view, node.me, r.to)
        expires = node.wall() + (r.ttl if r.ttl is not None else node.settings.default_ttl)
        return NewMessage(
            r.id, (r.to,), r.topic, r.payload, expires, agent=caller.agent, to=r.to_agent
        )

    def _sender(self, caller: Caller, r: verbs.Direct, verb: str) -> Caller:
        """Who sends ``r``: the caller, or the agent it sends for (``as_agent``); refused if not theirs."""
        if r.as_agent is None:
            refusal = self.agents.refuse_send(caller, (r.to,), r.topic, to_agent=r.to_agent)
            self._refuse(caller, verb, refusal)
            return caller
        behalf, refusal = self.agents.refuse_on_behalf(
            caller, r.as_agent, (r.to,), r.topic, to_agent=r.to_agent
        )
        self._refuse(behalf, verb, refusal)
        return behalf

    async def send(self, request: verbs.Direct, peer: Peer) -> verbs.Sent:
        self._member()
        r = request
        sender = self._sender(self.agents.caller(peer), r, "send")
        self.node.outbound.submit([self._message(r, sender)])
        return {"id": r.id}

    async def send_many(self, request: verbs.SendMany, peer: Peer) -> verbs.SentMany:
        self._member()
        caller = self.agents.caller(peer)
        senders = [self._sender(caller, r, "send_many") for r in request.messages]
        messages = [self._message(r, s) for r, s in zip(request.messages, senders, strict=True)]
        self.node.outbound.submit(messages)
        return {"ids": [m.id for m in messages]}

    async def recv(self, request: verbs.Recv, peer: Peer) -> verbs.Received:
        inbox = self.node.inbox
        caller = self.agents.caller(peer)
        self._refuse(caller, "recv", self.agents.refuse_topic(caller, request.topic))
        if request.ack:
            inbox.consume(request.ack, self.agents.reads(caller), reader=caller.agent)
        found = await inbox.recv(
            request.topic,
            request.max,
            wait=request.wait,
            lease=request.lease,
            reader=caller.agent,
        )
        return {
            "messages": [
                {
                    "receipt": m.seq,
                    "id": m.id,
                    "from": m.sender,
                    "agent": m.agent,
                    "to": m.to,
                    "topic": m.topic,
                    "room": m.room,
                    "received": m.received,
                    "data": base64.b64encode(m.payload).decode(),
                }
                for m in found
            ]
        }

    async def ack(self, request: verbs.Ack, peer: Peer) -> verbs.Acked:
        caller = self.agents.caller(peer)
        self._refuse(caller, "ack", self.agents.refuse_use(caller))
        acked = self.node.inbox.consume(
            request.receipts, self.agents.reads(caller), reader=caller.agent
        )
        return {"acked": acked}

    async def dead_letters(self, request: verbs.DeadLetters, peer: Peer) -> list[dict[str, Any]]:
        caller = self.agents.caller(peer)
        self._refuse(caller, "dead_letters", self.agents.refuse_use(caller))
        # an agent: only those it sent (or the node sent as it), on its topics; the node: all
        return self.node.store.dead_letters(
            request.limit, agent=caller.agent, reads=self.agents.reads(caller)
        )

    # -- the binary stream

    async def stream(self, request: verbs.NoArgs, peer: Peer) -> Upgrade:
        caller = self.agents.caller(peer)
        self._refuse(caller, "stream", self.agents.refuse_use(caller))

        def subscribing(topic: str) -> str | None:
            refusal = self.agents.refuse_topic(caller, topic)
            if refusal is not None:
                self._record_refusal(caller, "subscribe", refusal)
            return refusal

        serve = functools.partial(
            agent_streams.serve,
            inbox=self.node.inbox,
            submit=functools.partial(self._submit, caller),
            may_read=subscribing,
            reads=self.agents.reads(caller),
            agent=caller.agent,
        )
        return Upgrade({"stream": 1, "node": self.node.me}, serve, buffer_size=local.SOCKET_BUFFER)

    async def _submit(self, caller: Caller, entries: Sequence[SendEntry]) -> tuple[Status, str]:
        """A stream's SEND: queued, refused, or (the outbox full for a while) busy."""
        try:
            messages = self._entries(entries, caller)
            await self.node.outbound.submit_waiting(messages, STREAM_SEND_WAIT)
        except Backpressure as exc:
            return Status.BUSY, str(exc)
        except KeelError as exc:
            return Status.REFUSED, str(exc)
        return Status.QUEUED, ""

    def _entries(self, entries: Iterable[SendEntry], caller: Caller) -> list[NewMessage]:
        """A SEND's messages, after the same checks as ``send_many``'s."""
        self._member()
        checked: set[tuple[str, str | None]] = set()
        topics: set[str] = set()
        agents = self.agents
        default = self.node.settings.default_ttl
        wall = self.node.wall()
        sender = caller.agent
        largest, longest = packets.MAX_PAYLOAD, arguments.MAX_TTL
        messages: list[NewMessage] = []
        append = messages.append
        for message_id, to, topic, payload, ttl_ms, to_agent in entries:
            if (to, to_agent) not in checked:
                if not is_node_id(to):
                    raise UsageError(f"{to!r} is not a node id")
                verbs.recipient(self.node.members.view, self.node.me, to)
                if to_agent is not None and not is_agent_name(to_agent):
                    raise UsageError(f"{to_agent!r} is not an agent's name")
                refusal = agents.refuse_nodes(caller, (to,), to_agent=to_agent)
                self._refuse(caller, "send", refusal)
                checked.add((to, to_agent))
            if topic not in topics:
                try:
                    topics.add(check_topic(topic))
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
                self._refuse(caller, "send", agents.refuse_topic(caller, topic))
            if len(payload) > largest:
                arguments.check_size(len(payload))
            ttl = ttl_ms / 1000 if ttl_ms else default
            if ttl > longest:
                raise UsageError(f"ttl must be at most {arguments.MAX_TTL} s (ten years)")
            append(
                NewMessage(message_id, (to,), topic, payload, wall + ttl, None, sender, to_agent)
            )
        return messages

    # -- rooms

    def _room(self, ref: str) -> Room:
        view = self.node.members.view
        if ref in view.rooms:
            return view.rooms[ref]
        named = [r for r in view.rooms.values() if r.name == ref]
        if len(named) == 1:
            return named[0]
        if named:
            raise UsageError(f"{len(named)} rooms are named {ref!r}; use the room id")
        raise KeelError(f"no room {ref!r} is known to this node")

    def _room_info(self, room: Room) -> verbs.RoomInfo:
        node = self.node
        view = node.members.view
        members: list[verbs.RoomMemberInfo] = []
        for entry in room.members:
            agent, member = split_member(entry)
            members.append(
                {
                    "id": entry,
                    "node": member,
                    "agent": agent,
                    "connected": member in node.links.by_peer or member == node.me,
                    "member": view.is_member(member),
                }
            )
        return {
            "room": room.id,
            "name": room.name,
            "owner": room.owner,
            "version": room.version,
            "members": members,
        }

    def _mesh_members(self, entries: Iterable[str]) -> None:
        """``KeelError`` unless the node of every entry (``NODE_ID``, ``AGENT@NODE_ID``) is a
        mesh member."""
        view = self.node.members.view
        for entry in entries:
            member = split_member(entry)[1]
            if not view.is_member(member):
                raise KeelError(f"{member} is not a member of the mesh")

    async def room_create(self, request: verbs.RoomCreate) -> verbs.RoomInfo:
        self._member()
        node = self.node
        self._mesh_members(request.members)
        fields = rooms.create(node.identity, name=request.name, members=request.members)
        node.members.sign("room", **fields)
        return self._room_info(node.members.view.rooms[fields["room"]])

    async def room_change(self, request: verbs.RoomMember, *, add: bool) -> verbs.RoomInfo:
        self._member()
        node = self.node
        room = self._room(request.room)
        if room.owner != node.me:
            raise KeelError(
                f"room {room.name} ({room.id}) belongs to {room.owner}; only its owner changes it"
            )
        if add:
            self._mesh_members([request.node])
            members = rooms.added(room, request.node)
        else:
            members = rooms.removed(room, request.node)
        node.members.sign("room", **rooms.update(node.identity, room, members=members))
        kind = "room-add" if add else "room-remove"
        node.shell.record(kind, room.id, {"room": room.id, "node": request.node})
        return self._room_info(node.members.view.rooms[room.id])

    async def room_send(self, request: verbs.RoomSend, peer: Peer) -> verbs.RoomSent:
        self._member()
        node = self.node
        room = self._room(request.room)
        caller = self.agents.caller(peer)
        refusal = rooms.refuse_send(node.members.view, node.me, room, caller.agent)
        if refusal is not None and caller.agent is None:
            raise KeelError(refusal)
        self._refuse(caller, "room_send", refusal)
        recipients = node.members.view.room_recipients(room.id)
        others = [m for m in recipients if m != node.me]
        self._refuse(caller, "room_send", self.agents.refuse_topic(caller, request.topic))
        refusal = self.agents.refuse_room(
            caller, f"{room.name} ({room.id})", rooms.recipients(room, others)
        )
        self._refuse(caller, "room_send", refusal)
        ttl = request.ttl if request.ttl is not None else node.settings.default_ttl
        expires = int(node.wall() + ttl)
        stamp = rooms.stamp(
            node.identity,
            room,
            request.id,
            topic=request.topic,
            expires=expires,
            payload=request.payload,
            agent=caller.agent,
        )
        if others:
            message = NewMessage(
                request.id,
                others,
                request.topic,
                request.payload,
                expires,
                stamp,
                agent=caller.agent,
            )
            node.outbound.submit([message])
        return {"id": request.id, "recipients": others}

    async def room_members(self, request: verbs.RoomRef) -> verbs.RoomInfo:
        return self._room_info(self._room(request.room))

    async def rooms(self, request: verbs.NoArgs) -> list[verbs.RoomInfo]:
        view = self.node.members.view
        return [self._room_info(r) for r in sorted(view.rooms.values(), key=lambda r: r.name)]
