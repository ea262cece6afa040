"""The mesh node: the daemon ``keel mesh serve`` runs, composed of its parts.

:class:`MeshNode` is a :class:`keel.service.Daemon`: the shell gives it its
config, logging, signals, ledger recorder and control socket. It opens the
node's directory (:mod:`keel.mesh.directory`: identity and state, locked
for this daemon), its listener, and wires the parts; it is the
:class:`~keel.mesh.peer_link.LinkEvents` of every connection and routes
what they report:

- a finished handshake to :mod:`keel.mesh.admission` (pure), then to
  :class:`~keel.mesh.links.Links` (one link per peer);
- membership records to :class:`~keel.mesh.members.Members`;
- messages to :class:`~keel.mesh.inbox.Inbox`, acknowledgements to
  :class:`~keel.mesh.outbound.Outbound`;
- after any membership change, connections, dials and queues are brought
  in line with the new view (:meth:`MeshNode.apply_view`).

Control verbs are :mod:`keel.mesh.control`'s. A peer that breaks the
protocol loses its connection and a log line; nothing a peer sends stops the
daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from keel.api import ControlServer, Handler
from keel.errors import KeelError, UsageError
from keel.mesh import admission, packets
from keel.mesh.access import agents_only
from keel.mesh.admission import Merge, Redeem, Refuse
from keel.mesh.audit import MessageBatches
from keel.mesh.audit_log import AuditLog
from keel.mesh.config import MeshConfig
from keel.mesh.control import Control
from keel.mesh.delivery import Outbox
from keel.mesh.dialing import Dialer
from keel.mesh.directory import (
    IDENTITY_FILE,
    LEGACY_CONFIG,
    STATE_FILE,
    load_or_create_identity,
    lock,
    prepare,
)
from keel.mesh.errors import InviteError, MeshError, RemoteProtocolError
from keel.mesh.handoffs import Handoffs
from keel.mesh.hello import Hello, parse_hello
from keel.mesh.identity import NodeIdentity
from keel.mesh.inbox import Inbox
from keel.mesh.intake import Intake
from keel.mesh.invite import InviteToken
from keel.mesh.kem import Kem, get_kem
from keel.mesh.links import Links
from keel.mesh.listener import Listener, advertised_addresses, listening_socket
from keel.mesh.members import Members
from keel.mesh.membership import SignedRecord
from keel.mesh.outbound import Outbound
from keel.mesh.packets import Ack, Msg, Records
from keel.mesh.peer_link import PeerLink
from keel.mesh.session import Closed, HandshakeComplete
from keel.mesh.store import StateError, Store, state_failed
from keel.mesh.verbs import Joined, Status
from keel.service import Daemon, Shell

log = logging.getLogger("keel.mesh")

HOUSEKEEPING = 30.0  # s between prunes of old dedup ids and invites, and lease expiries


class MeshNode(Daemon):
    """The daemon: one per node directory."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        kem: Kem | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.settings = config.settings
        self.clock = clock
        self.wall = wall
        self._kem = kem
        self._opened = contextlib.ExitStack()  # what start opened, closed in reverse by stop
        self._agents_server: ControlServer | None = None
        self._removed_logged = False

    # ------------------------------------------------------------ the daemon's life

    async def start(self, shell: Shell) -> None:
        self.shell = shell
        directory = self.config.directory
        prepare(directory, 0o750)  # 0750: the keel group may enter; every file inside is 0600
        self._opened.callback(os.close, lock(directory))  # before touching another's state
        legacy = directory / LEGACY_CONFIG
        if legacy.exists() or legacy.is_symlink():
            log.warning(
                "mesh: %s is not read any more: its settings belong in %s (docs/mesh.md, "
                "upgrading); remove it",
                legacy,
                self.config.source,
            )
        self.identity: NodeIdentity = load_or_create_identity(directory / IDENTITY_FILE)
        self.me = self.identity.node_id
        self.kem: Kem = self._kem or get_kem()
        sync = "FULL" if self.settings.durability == "full" else "NORMAL"
        self.store = Store(
            directory / STATE_FILE,
            synchronous=sync,
            keep_dead_letters=self.settings.keep_dead_letters,
        )
        self._opened.callback(self.store.close)
        record = shell.record
        audit = None  # message metadata, many messages to a ledger entry (keel.mesh.audit)
        if shell.common.ledger is not None:
            audit = AuditLog(MessageBatches(self.me, clock=self.clock, wall=self.wall), record)
            self._opened.callback(audit.close)  # after the parts that feed it, before the recorder
        sock = listening_socket(*self.config.listen)
        self._opened.callback(sock.close)
        self.addresses = advertised_addresses(self.config.listen[0], sock.getsockname()[1])
        self.members = Members(
            store=self.store,
            identity=self.identity,
            addresses=self.addresses,
            wall=self.wall,
            record=record,
            gossip=self._gossip,
            changed=self.apply_view,
            agents=self.settings.agents.announced(),
        )
        self.dialer = Dialer(
            self.me, clock=self.clock, base=self.settings.dial_base, cap=self.settings.dial_cap
        )
        self.links = Links(
            events=self,
            identity=self.identity,
            kem=self.kem,
            session=self.settings.session,
            connect_timeout=self.settings.connect_timeout,
            dialer=self.dialer,
            hello=self.members.hello,
            static_key=self._static_key,
            spawn=lambda coro: shell.spawn(coro, name="dial"),
            record=record,
            clock=self.clock,
        )
        outbox = Outbox(self.settings.limits, clock=self.clock, wall=self.wall)
        self.outbound = Outbound(
            store=self.store,
            outbox=outbox,
            links=self.links.by_peer,
            me=self.me,
            audit=audit,
            clock=self.clock,
            wall=self.wall,
        )
        epoch = int.from_bytes(os.urandom(4), "big")
        self._opened.callback(self.outbound.close)
        self.inbox = Inbox(
            store=self.store,
            handoffs=Handoffs(clock=self.clock, epoch=epoch),
            limits=self.settings.inbox,
            lease=self.settings.lease,
            me=self.me,
            view=lambda: self.members.view,
            answer=self._answer,
            audit=audit,
            clock=self.clock,
            wall=self.wall,
            addressable=self.settings.agents.refuse_delivery,
            senders=self.settings.agents.senders,
        )
        self._opened.callback(self.inbox.close)
        self.outbound.load()
        intake = Intake(
            total=self.settings.max_handshakes,
            per_source=self.settings.max_handshakes_per_address,
            timeout=self.settings.session.handshake_timeout,
            clock=self.clock,
        )
        listener = Listener(
            sock,
            intake,
            lambda ticket: self.links.inbound(listener, ticket),
            PeerLink.drop,
            reserve=shell.reserve,
        )
        self._opened.callback(listener.close)
        listener.start()
        self._opened.callback(self.links.close, "shutdown: the node is stopping")
        self.apply_view()
        self._control = Control(self)
        self.inbox.refused = self._control.refused_read  # mesh-refused: kept from an agent
        if self.config.agent_socket is not None:
            await self._serve_agents(self.config.agent_socket)
        shell.spawn(self._housekeeping(), name="housekeeping")
        log.info(
            "mesh: node %s listening on %s (mesh %s, %d members, KEM %s/%s)",
            self.me,
            ", ".join(self.addresses),
            self.members.membership.mesh_id,
            len(self.members.view.members),
            self.kem.name,
            self.kem.backend,
        )

    async def stop(self) -> None:
        """Close what start opened, the last first: agents' socket, links, listener, parts,
        store, lock."""
        if self._agents_server is not None:
            await self._agents_server.close()
            self._agents_server = None
        self._opened.close()

    async def _serve_agents(self, path: Path) -> None:
        """The agents' socket: the verbs for agents, open to every local user (mode 0666),
        each caller judged by its uid (:func:`keel.mesh.access.agents_only`)."""
        handlers = agents_only(self._control.handlers(), self.settings.agents)
        server = ControlServer(path, handlers, name="mesh", mode=0o666)
        try:
            await server.start()
        except OSError as exc:
            raise KeelError(f"cannot serve the agents' socket {path}: {exc.strerror}") from None
        self._agents_server = server
        log.info("mesh: agents connect on %s", path)

    def summary(self) -> str:
        return f"node {self.me}"

    def verbs(self) -> Mapping[str, Handler]:
        return self._control.handlers()

    def status(self) -> dict[str, Any]:
        view = self.members.view
        status: Status = {
            "node": self.me,
            "mesh": view.mesh_id,
            "member": view.is_member(self.me),
            "addresses": self.addresses,
            "members": len(view.members),
            "operator": self.me in view.operators,
            "connected": sorted(self.links.by_peer),
            "outbox": len(self.outbound),
            "inbox": self.inbox.count,
            "answered_busy": self.inbox.answered_busy,
            "kem": f"{self.kem.name}/{self.kem.backend}",
        }
        return dict(status)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING)
            wall = self.wall()
            try:
                self.store.prune_seen(wall)
                self.store.prune_invites(wall)
                self.store.touch_peers(self.links.by_peer, wall)
            except StateError as exc:
                state_failed("housekeeping of the state database failed", exc)
            self.inbox.expire_leases()

    # ------------------------------------------------------------ membership

    def apply_view(self) -> None:
        """Make connections, queues and dials agree with the current membership."""
        view = self.members.view
        me = self.me
        if not view.is_member(me):
            if not self._removed_logged and me in view.removed:
                log.error("mesh: this node was removed from mesh %s; it stays alone", view.mesh_id)
                self._removed_logged = True
            self.dialer.update({})
        else:
            self.dialer.update({n: m.addresses for n, m in view.members.items() if n != me})
        for link in self.links:
            if link.joining is None and link.peer is not None and not view.is_member(link.peer):
                link.close("removed: the node was removed from the mesh")
        self.outbound.drop(
            lambda item: (
                view.is_member(item.peer)
                and (item.room is None or item.peer in view.room_recipients(item.room))
            ),
            "recipient removed",
        )
        self.links.dial_due()
        self.outbound.kick()

    def _gossip(self, records: Sequence[SignedRecord], source: object | None) -> None:
        batches = [packets.encode(b) for b in packets.split_records([r.to_json() for r in records])]
        for link in list(self.links.by_peer.values()):
            if link is not source:
                for batch in batches:
                    link.send_packet(batch)

    def _static_key(self, peer: str) -> bytes | None:
        member = self.members.view.admitted.get(peer)
        return None if member is None else member.node.static_key

    def _answer(self, peer: str, ids: Sequence[str]) -> None:
        link = self.links.by_peer.get(peer)
        if link is not None:  # else the sender sends them again and hears ok then
            link.answer(ids)

    # ------------------------------------------------------------ what links report

    def link_made(self, link: PeerLink) -> None:
        self.links.connections.add(link)

    def handshake_done(self, link: PeerLink, event: HandshakeComplete) -> None:
        if link.joining is not None:
            link.peer = event.remote_node_id  # the inviter: accepted once its records admit us
            return
        remote = event.remote_node_id
        try:
            decision = self._admit(link, event)
            if isinstance(decision, Redeem):
                self.members.redeem(decision, remote)
        except StateError as exc:
            state_failed(f"cannot decide on {link.describe()}", exc)
            decision = Refuse("unavailable: this node cannot read or write its state")
        if isinstance(decision, Refuse):
            if decision.records:
                link.send_records([r.to_json() for r in decision.records])
            self.links.refuse(link, decision.reason)
            return
        link.peer = remote
        self._register(link, parse_hello(event.extra).addresses)

    def _admit(self, link: PeerLink, event: HandshakeComplete) -> admission.Decision:
        claim = event.invite
        invite = None
        if claim is not None and not self.members.view.is_member(event.remote_node_id):
            invite = self.store.get_invite(claim.invite_id)
        membership = self.members.membership
        decision = admission.decide(
            membership, self.identity, event, invite=invite, now=self.wall()
        )
        if isinstance(decision, Merge):
            self.members.merge(decision.records, link)
            decision = admission.decide(
                self.members.membership,
                self.identity,
                event,
                invite=None,
                now=self.wall(),
                merged=True,
            )
        return decision

    def _register(self, link: PeerLink, addresses: Sequence[str]) -> None:
        kept, replaced = self.links.register(link)
        peer = link.peer
        assert peer is not None
        if replaced:
            self.outbound.disconnected(peer)  # what was in flight on the old link goes again
        if not kept:
            return
        remote = link.session.remote
        link.hello(parse_hello(remote.extra) if remote is not None else Hello())
        for address in addresses:
            self.dialer.learn(peer, address)
        self._touch(peer)
        log.info("mesh: connected to %s at %s", peer, link.address)
        link.send_records([r.to_json() for r in self.members.membership.records()])
        self.outbound.connected(peer)

    def _touch(self, peer: str) -> None:
        try:
            self.store.touch_peers([peer], self.wall())
        except StateError as exc:
            state_failed(f"cannot note when {peer} was last seen", exc)

    def messages_arrived(self, link: PeerLink, messages: list[Msg]) -> None:
        if link.registered:
            self.inbox.arrived(link, messages)

    def packet_arrived(self, link: PeerLink, packet: Ack | Records) -> None:
        if link.joining is not None and not link.registered:
            if isinstance(packet, Records):
                self._join_records(link, packet)
            return
        if not link.registered:
            return
        assert link.peer is not None
        if isinstance(packet, Records):
            self.members.merge(packet.records, link)
            return
        try:
            self.outbound.answered(link.peer, packet)
        except StateError as exc:  # the rows stay: sent again after a restart, deduplicated
            state_failed(f"cannot record what {link.peer} acknowledged", exc)

    def closed_by_peer(self, link: PeerLink, event: Closed) -> None:
        if link.session.remote is None:  # a handshake cut short: anyone can make these, fast
            level = logging.DEBUG
        else:
            level = logging.INFO if event.clean or link.peer is None else logging.DEBUG
        log.log(level, "mesh: %s closed the connection: %s", link.describe(), event.reason)
        if link.joining is not None and not link.joining.done():
            link.joining.set_exception(_join_refusal(event.reason))

    def refused(self, link: PeerLink, reason: str, hint: str = "") -> None:
        if link.joining is not None and not link.joining.done():
            link.joining.set_exception(MeshError(f"{reason}{f' ({hint})' if hint else ''}"))
        self.links.refused(link, reason, hint)

    def link_lost(self, link: PeerLink) -> None:
        if link.joining is not None and not link.joining.done():
            link.joining.set_exception(
                KeelError(f"the inviter at {link.address} hung up before the join completed")
            )
        if self.links.lost(link):
            assert link.peer is not None
            self.outbound.disconnected(link.peer)
            self._touch(link.peer)
            log.info("mesh: disconnected from %s", link.peer)

    # ------------------------------------------------------------ joining another mesh

    async def join(self, token: InviteToken, timeout: float) -> Joined:
        token.check_fresh(self.wall())
        if token.node_id == self.me:
            raise UsageError("that invite was made by this very node")
        view = self.members.view
        if view.is_member(token.node_id):
            return {"mesh": view.mesh_id, "node": self.me, "joined": False, "via": token.node_id}
        others = [n for n in view.admitted if n != self.me]
        if others:
            raise KeelError(
                f"this node already belongs to mesh {view.mesh_id} with {len(others)} other "
                "member(s); a node joins one mesh: use another directory to join another"
            )
        problems = []
        for address in token.addresses:
            try:
                async with asyncio.timeout(timeout):
                    return await self._join_via(token, address)
            except (InviteError, UsageError):
                raise
            except TimeoutError:
                problems.append(f"{address}: no answer within {timeout:g} s")
            except (OSError, KeelError) as exc:
                problems.append(f"{address}: {exc}")
        raise KeelError(f"could not join through {token.node_id}: " + "; ".join(problems))

    async def _join_via(self, token: InviteToken, address: str) -> Joined:
        result = await self.links.join_via(token, address)
        return {
            "mesh": result["mesh"],
            "node": self.me,
            "joined": True,
            "via": result["via"],
            "members": result["members"],
        }

    def _join_records(self, link: PeerLink, packet: Records) -> None:
        """Records from the inviter: once they make this node a member, adopt them."""
        assert link.joining is not None
        for item in packet.records:
            try:
                link.join_records.append(SignedRecord.from_json(item))
            except RemoteProtocolError as exc:
                log.warning("mesh: ignoring a record from the inviter: %s", exc)
        try:
            adopted = admission.adopt(link.join_records, self.me)
        except RemoteProtocolError as exc:
            link.joining.set_exception(KeelError(f"the inviter sent a broken mesh: {exc}"))
            link.close("protocol: broken records")
            return
        if adopted is None:
            return
        assert link.peer is not None
        future, link.joining = link.joining, None
        try:
            self.members.adopt(adopted, via=link.peer)
        except StateError as exc:
            future.set_exception(exc)
            link.close("unavailable: the joiner cannot write its state")
            return
        self._removed_logged = False
        self._register(link, ())
        members = len(adopted.view.members)
        future.set_result({"mesh": adopted.mesh_id, "via": link.peer, "members": members})


def _join_refusal(reason: str) -> KeelError:
    code = reason.split(":", 1)[0].strip()
    if code.startswith("invite-"):
        kind = code.removeprefix("invite-")
        if kind in InviteError.REASONS:
            text = reason.split(":", 1)[-1].strip()
            return InviteError(f"the inviter refused the invite: {text}", kind)
    return MeshError(f"the inviter closed the connection: {reason}")
