"""``keel mesh serve``: the asyncio shell around the mesh cores.

It feeds bytes from TCP into one :class:`~keel.mesh.session.Session` per
connection (``asyncio.Protocol``: no task per read), turns session events
into packets (:mod:`keel.mesh.packets`), and carries out what the pure cores
decide: :class:`~keel.mesh.delivery.Outbox` (what to send, retry, expire),
:class:`~keel.mesh.membership.Membership` (who is in), :mod:`keel.mesh.rooms`,
:class:`~keel.mesh.connections.Dialer` (whom to dial). State lives in
``DIR/state.db`` (:mod:`keel.mesh.store`); agents and the CLI use the
control socket ``DIR/control.sock``. A peer that breaks the protocol loses
its connection and a log line; nothing a peer sends stops the daemon.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel import sd
from keel.api import ControlServer, Peer, Upgrade
from keel.errors import KeelError, UsageError
from keel.ledger import AsyncLedger, LedgerError
from keel.mesh import arguments, local, packets, rooms
from keel.mesh.access import guard
from keel.mesh.connections import Dial, Dialer, Link, preferred
from keel.mesh.delivery import (
    Backpressure,
    InboxMessage,
    Incoming,
    Outbox,
    OutboxRow,
    Queued,
    Receipt,
    keep_seen_until,
    receipt,
)
from keel.mesh.directory import IDENTITY_FILE, STATE_FILE, load_or_create_identity, prepare
from keel.mesh.encoding import split_address
from keel.mesh.errors import InviteError, MeshError, ProtocolError, RemoteProtocolError
from keel.mesh.hello import MAX_ADMISSION_CHAIN, make_hello, parse_hello
from keel.mesh.identity import NodeIdentity
from keel.mesh.ids import check_topic, is_node_id
from keel.mesh.intake import Intake, TokenBucket
from keel.mesh.invite import MAX_USES, InviteRecord, InviteToken, new_invite
from keel.mesh.kem import Kem, get_kem
from keel.mesh.listener import Listener, listening_socket, quiet_resource_errors
from keel.mesh.membership import Membership, MembershipError, Room, SignedRecord, View
from keel.mesh.packets import Ack, Msg, Msgs, Records, RoomStamp
from keel.mesh.session import (
    Closed,
    HandshakeComplete,
    Message,
    NeedData,
    Session,
    State,
)
from keel.mesh.settings import (
    Settings,
    advertised_addresses,
    control_path,
    load_settings,
    parse_listen,
)
from keel.mesh.store import Store

log = logging.getLogger("keel.mesh")

MAX_UNIX_PATH = 107
HOUSEKEEPING = 30.0
PAYLOAD_CACHE_BYTES = 64 << 20
REFUSALS_BURST = 30
# A MSGS packet may reach 1 MiB; smaller ones let the receiver store and
# acknowledge one while the next is still on its way.
BATCH_TARGET = 256 << 10
HANDOFF_BASE = local.STREAM_RECEIPTS
STREAM_SEND_WAIT = 5.0  # s a stream's SEND waits for room in a full outbox before "busy"
HANDOFF_HOLD = 1.0  # s an agent may hold a handed-off message before it is stored anyway
DELIVER_FRAME = 1 << 20  # a local stream's DELIVER frames are about this big at most
MAX_STREAM_UNACKED = 100_000


def _close_code(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


class PeerConnection(asyncio.Protocol):
    """One TCP connection and its session; events go to the node."""

    _serials = itertools.count(1)

    def __init__(
        self,
        node: MeshNode,
        session: Session,
        *,
        dial: Dial | None = None,
        joining: asyncio.Future[dict[str, Any]] | None = None,
        admitted: tuple[Listener[PeerConnection], int] | None = None,
    ) -> None:
        self.node = node
        self.session = session
        self.dial = dial
        self.joining = joining
        self.admitted = admitted  # an inbound connection: its listener and intake ticket
        self.serial = next(self._serials)
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.peer: str | None = None  # set once the node accepts the peer
        self.registered = False
        self.closing = False
        self.batching = False  # the peer takes MSGS packets (application revision >= 2)
        self.join_records: list[SignedRecord] = []
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.closing:  # dropped before its transport was made
            transport.abort()
            return
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple):
            self.address = f"{peername[0]}:{peername[1]}"
        self.node.connections.add(self)
        if self.session.role.value == "initiator":
            self._guarded(lambda: self._write(self.session.start()))
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        self._guarded(lambda: self._feed(data))

    def eof_received(self) -> bool:
        self._guarded(lambda: self._feed(b""))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.closing = True
        self.node.connection_lost(self)
        if self.admitted is not None:
            listener, ticket = self.admitted
            listener.closed(ticket)

    # -- plumbing

    @property
    def initiator_id(self) -> str:
        if self.session.role.value == "initiator":
            return self.node.identity.node_id
        assert self.peer is not None
        return self.peer

    @property
    def link(self) -> Link:
        assert self.peer is not None
        return Link(self.peer, self.initiator_id, self.serial)

    def describe(self) -> str:
        who = self.peer or (self.session.remote_node_id if self.session.remote else None)
        return f"{who or 'unauthenticated peer'} at {self.address}"

    def _write(self, data: bytes) -> None:
        """Queue bytes; everything written in one turn of the loop leaves in one syscall."""
        if not data:
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def _write_parts(self, parts: list[bytes]) -> None:
        """``_write`` for pieces: they are joined once, with the rest, when flushed."""
        self._out += parts
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _guarded(self, action: Callable[[], None]) -> None:
        """Run ``action``; a protocol error or a bug ends this connection, never the daemon."""
        if self.closing:
            return
        try:
            action()
        except ProtocolError as exc:
            self.node.refused(self, str(exc), exc.hint)
            self.abort()
        except Exception:
            log.exception("mesh: internal error on the connection with %s", self.describe())
            self.abort()

    def _feed(self, data: bytes) -> None:
        self.session.receive_data(data)
        incoming: list[Msg] = []  # stored and acknowledged together, one transaction
        try:
            self._events(incoming)
        except ProtocolError:
            if incoming and not self.closing:  # what arrived intact before the fault counts
                self.node.on_messages(self, incoming)
            raise
        if incoming and not self.closing:
            self.node.on_messages(self, incoming)
        if not data:
            self.abort()

    def _events(self, incoming: list[Msg]) -> None:
        while not self.closing:
            event = self.session.next_event()
            self._write(self.session.data_to_send())
            if isinstance(event, NeedData):
                return
            if isinstance(event, HandshakeComplete):
                if self.admitted is not None:
                    listener, ticket = self.admitted
                    listener.handshake_over(ticket)
                self.node.on_handshake(self, event)
                self._arm_timer()  # keepalives and rekeys run on their own deadlines now
            elif isinstance(event, Message):
                packet = packets.decode(event.data)
                if isinstance(packet, Msgs):
                    incoming.extend(packet.messages)
                    continue
                if isinstance(packet, Msg):
                    incoming.append(packet)
                    continue
                if incoming:
                    self.node.on_messages(self, incoming)
                    incoming.clear()
                self.node.on_packet(self, packet)
            elif isinstance(event, Closed):
                if incoming:
                    self.node.on_messages(self, incoming)
                    incoming.clear()
                self.node.on_closed(self, event)
                self.abort()
                return

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.closing:
            return
        deadline = self.session.next_deadline()
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - self.node.clock())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._guarded(lambda: self._write(self.session.tick()))
        self._arm_timer()

    # -- used by the node

    def send_packet(self, data: bytes) -> None:
        if self.closing or self.session.state is not State.OPEN:
            return
        self._guarded(lambda: self._write_parts(self.session.send_message_parts(data)))

    def close(self, reason: str) -> None:
        """Say why (a CLOSE record) and hang up."""
        if self.closing:
            return
        with contextlib.suppress(ProtocolError):
            self._write(self.session.close(reason[:200]))
        self.abort()

    def drop(self, reason: str, quietly: bool) -> None:
        """The listener gives up on this handshake (past its deadline, or evicted)."""
        if self.closing:
            return
        if not quietly:
            self.node.refused(self, reason, "slow or stalled peer")
        self.abort()

    def abort(self) -> None:
        if self.closing:
            return
        self.flush()  # a CLOSE record (or a last ACK) still goes out first
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()


class Batch:
    """Messages for one connection, sent as MSGS packets of at most the batch limits."""

    __slots__ = ("conn", "count", "parts", "size")

    def __init__(self, conn: PeerConnection) -> None:
        self.conn = conn
        self.parts: list[bytes] = [packets.MSGS_HEADER]  # entry heads and payloads, in order
        self.count = 0
        self.size = len(packets.MSGS_HEADER)

    def add(self, message: Msg) -> None:
        head = packets.msgs_entry_head(message)
        size = len(head) + len(message.payload)
        if self.count and (
            self.size + size > BATCH_TARGET or self.count == packets.MAX_BATCH_MESSAGES
        ):
            self.flush()
        self.parts += (head, message.payload)
        self.count += 1
        self.size += size

    def flush(self) -> None:
        if self.count:
            self.conn.send_packet(b"".join(self.parts))  # the payloads' one copy on this side
        self.parts = [packets.MSGS_HEADER]
        self.count = 0
        self.size = len(packets.MSGS_HEADER)


@dataclass(slots=True, eq=False)
class Handoff:
    """A message handed to an agent's stream from memory, not stored, not yet answered."""

    receipt: int
    item: Incoming
    peer: str  # whose connection brought it: the ACK goes to that node
    stream: LocalStream
    since: float
    seq: int | None = None  # its inbox seq once stored (still the agent's to acknowledge)


class LocalStream:
    """One agent's binary stream (``keel.mesh.local``): its subscription and what it holds."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.topic: str | None = None
        self.max_unacked = 0
        self.max_bytes = 0
        self.pending: dict[int, int] = {}  # receipts handed out, not acknowledged: size
        self.pending_bytes = 0
        self.backlog = False  # the inbox may hold messages for it that it was not handed
        self.closed = False
        self._out: list[bytes] = []
        self._out_bytes = 0

    def has_room(self) -> bool:
        return len(self.pending) < self.max_unacked and (
            not self.pending or self.pending_bytes < self.max_bytes
        )

    def hand(self, head: bytes, payload: bytes, seq: int) -> None:
        """Queue one DELIVER entry (its head, then its payload) for the next frame."""
        self.pending[seq] = len(payload)
        self.pending_bytes += len(payload)
        self._out += (head, payload)
        self._out_bytes += len(head) + len(payload)
        if self._out_bytes >= DELIVER_FRAME:
            self.flush()

    def release(self, seq: int) -> None:
        size = self.pending.pop(seq, None)
        if size is not None:
            self.pending_bytes -= size

    def write(self, data: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)

    def flush(self, *, always: bool = False) -> None:
        if self._out or always:
            if not self.closed and not self.writer.is_closing():
                head = local.FRAME.pack(local.Kind.DELIVER, self._out_bytes)
                self.writer.writelines([head, *self._out])  # one join, then the socket
            self._out = []
            self._out_bytes = 0


class MeshNode:
    """The daemon: one per node directory."""

    def __init__(
        self,
        directory: Path,
        listen: str,
        *,
        ledger_path: Path | None = None,
        settings: Settings | None = None,
        kem: Kem | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.listen_host, self.listen_port = parse_listen(listen)
        self.ledger_path = ledger_path
        self.settings = settings or load_settings(directory)
        self.clock = clock
        self.wall = wall
        self._kem = kem
        self.connections: set[PeerConnection] = set()
        self.links: dict[str, PeerConnection] = {}
        self.addresses: list[str] = []
        self._payloads: dict[int, tuple[bytes, RoomStamp | None]] = {}
        self._payload_bytes = 0
        self._leases: dict[int, float] = {}  # receipts handed out by ``recv``: lease end
        self._handed: dict[int, LocalStream] = {}  # receipts handed out on a local stream
        self._streams: dict[str, list[LocalStream]] = {}  # subscribers by topic
        self._handoffs: dict[int, Handoff] = {}  # messages handed to agents from memory
        self._held: dict[tuple[str, str], Handoff] = {}  # the same, by dedup key
        # Handoff receipts have the top bit set (valid only on their stream) and a
        # random epoch, so a stale one from an earlier daemon never matches.
        epoch = int.from_bytes(os.urandom(4), "big") & 0x7FFF_FFFF
        self._handoff_receipts = itertools.count(HANDOFF_BASE | epoch << 32)
        self._hold_timer: asyncio.TimerHandle | None = None
        self._outbox_room = asyncio.Event()  # set whenever messages leave the outbox
        self._inbox_waiters: dict[str, asyncio.Event] = {}
        self._pump_handle: asyncio.Handle | None = None
        self._pump_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ledger: AsyncLedger | None = None
        self._listener: Listener[PeerConnection] | None = None
        self._control: ControlServer | None = None
        self._stopped = asyncio.Event()
        self._removed_logged = False
        self._refusals = TokenBucket(REFUSALS_BURST, 1.0, clock=clock)
        self._refusals_untold = 0
        self.answered_busy = 0  # messages senders were told to send again later

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        directory = self.directory
        # 0750: the keel group may reach control.sock; every file inside is 0600.
        prepare(directory, 0o750, named="--dir")
        socket_path = control_path(directory)
        if len(str(socket_path.absolute())) > MAX_UNIX_PATH:
            raise UsageError(
                f"--dir {directory}: the control socket path {socket_path} is longer than "
                f"{MAX_UNIX_PATH} bytes; choose a shorter directory"
            )
        _refuse_if_served(socket_path)  # before touching the state another daemon owns
        self.identity: NodeIdentity = load_or_create_identity(directory / IDENTITY_FILE)
        self.kem: Kem = self._kem or get_kem()
        sync = "FULL" if self.settings.durability == "full" else "NORMAL"
        self.store = Store(directory / STATE_FILE, synchronous=sync)
        self.outbox = Outbox(self.settings.limits, clock=self.clock, wall=self.wall)
        self.dialer = Dialer(
            self.identity.node_id,
            clock=self.clock,
            base=self.settings.dial_base,
            cap=self.settings.dial_cap,
        )
        intake = Intake(
            total=self.settings.max_handshakes,
            per_source=self.settings.max_handshakes_per_address,
            timeout=self.settings.session.handshake_timeout,
            clock=self.clock,
        )
        self._listener = Listener(
            listening_socket(self.listen_host, self.listen_port),
            intake,
            self._inbound,
            PeerConnection.drop,
        )
        self.listen_port = self._listener.port
        self.addresses = advertised_addresses(self.listen_host, self.listen_port)
        self._load_membership()
        for item in self.store.load_outbox():
            self.outbox.add(item, check=False)
        self.inbox_count, self.inbox_bytes = self.store.inbox_totals()
        if self.ledger_path is not None:
            self._ledger = await self._open_ledger(self.ledger_path)
        handlers = guard(self._handlers(), self.settings.operators())
        self._control = ControlServer(socket_path, handlers, name="mesh")
        await self._control.start()
        self._listener.start()
        self._apply_view()
        self._spawn(self._housekeeping())
        self.kick()
        log.info(
            "mesh: node %s listening on %s (mesh %s, %d members, KEM %s/%s)",
            self.identity.node_id,
            ", ".join(self.addresses),
            self.membership.mesh_id,
            len(self.membership.view.members),
            self.kem.name,
            self.kem.backend,
        )
        sd.ready(f"node {self.identity.node_id}")

    async def _open_ledger(self, path: Path) -> AsyncLedger:
        try:
            return await AsyncLedger.open(path)
        except LedgerError as exc:
            raise KeelError(f"--ledger {path}: {exc}") from None

    async def stop(self) -> None:
        for conn in list(self.connections):
            conn.close("shutdown: the node is stopping")
        if self._listener is not None:
            self._listener.close()
        if self._control is not None:
            await self._control.close()
        for handle in (self._pump_handle, self._pump_timer, self._hold_timer):
            if handle is not None:
                handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ledger is not None:
            try:
                await self._ledger.aclose()
            except Exception:
                log.exception("mesh: closing the ledger failed")
        self.store.close()
        self._stopped.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_resource_errors(loop)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await self.start()
        watchdog = sd.watchdog_interval()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), watchdog or 3600)
                sd.watchdog_ping()
        finally:
            sd.stopping()
            await self.stop()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mesh: background task failed", exc_info=task.exception())

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING)
            try:
                wall = self.wall()
                self.store.prune_seen(wall)
                self.store.prune_invites(wall)
                now = self.clock()
                expired = len(self._leases)
                self._leases = {s: t for s, t in self._leases.items() if t > now}
                if expired != len(self._leases):  # those messages are up for grabs again
                    for streams in self._streams.values():
                        for stream in streams:
                            stream.backlog = True
                            self._fill(stream)
                            stream.flush()
                self.store.touch_peers(self.links, wall)
            except Exception:
                log.exception("mesh: housekeeping failed")

    def ledger(self, kind: str, subject: str, data: Mapping[str, Any]) -> None:
        """Append a metadata-only entry, in the background; a failure is logged, not fatal."""
        if self._ledger is None:
            return
        ledger = self._ledger

        async def append() -> None:
            try:
                await ledger.append(source="mesh", kind=kind, subject=subject, data=data)
            except Exception as exc:
                log.warning("mesh: ledger append (%s) failed: %s", kind, exc)

        self._spawn(append())

    # ------------------------------------------------------------ membership

    def _load_membership(self) -> None:
        raw = self.store.load_records()
        records = []
        for item in raw:
            try:
                records.append(SignedRecord.from_json(item))
            except RemoteProtocolError as exc:
                log.error("mesh: skipping a damaged stored record: %s", exc)  # noqa: TRY400 (no traceback wanted)
        mesh_id = self.store.get_meta("mesh")
        genesis = next((r for r in records if r.id == mesh_id and r.kind == "genesis"), None)
        if genesis is None:
            self.membership = Membership.found(self.identity, self.addresses, self._now_ms())
            self.store.replace_records(self.membership.records(), self.membership.mesh_id)
            log.info("mesh: founded mesh %s", self.membership.mesh_id)
            return
        self.membership = Membership(genesis)
        for record in records:
            if record.kind != "genesis":
                with contextlib.suppress(MembershipError):
                    self.membership.add(record)
        me = self.membership.view.admitted.get(self.identity.node_id)
        member = self.membership.view.is_member(self.identity.node_id)
        if me is not None and member and set(me.addresses) != set(self.addresses):
            record = self.membership.make(
                self.identity, "addr", self._now_ms(), addrs=self.addresses
            )
            self.store.add_records([record])

    def _now_ms(self) -> int:
        return int(self.wall() * 1000)

    @property
    def view(self) -> View:
        return self.membership.view

    def _handshake_extra(self) -> dict[str, Any]:
        chain: list[dict[str, Any]] = []
        view = self.view
        node = self.identity.node_id
        while len(chain) < MAX_ADMISSION_CHAIN:
            member = view.admitted.get(node)
            if member is None or member.admitted_by is None:
                break
            join = next(
                (
                    r
                    for r in self.membership.records()
                    if r.kind == "join"
                    and r.id in view.effective
                    and r.body["node"]["node_id"] == node
                ),
                None,
            )
            if join is None:
                break
            chain.append(join.to_json())
            node = member.admitted_by
        return make_hello(self.addresses, self.membership.mesh_id, chain)

    def _add_records(self, raw: Iterable[Any], source: PeerConnection | None) -> list[SignedRecord]:
        """Merge records from a peer (or local); persist, gossip and apply the new ones."""
        new = []
        for item in raw:
            try:
                record = SignedRecord.from_json(item)
                if self.membership.add(record):
                    new.append(record)
            except RemoteProtocolError as exc:
                where = source.describe() if source else "local"
                log.warning("mesh: ignoring a record from %s: %s", where, exc)
        if new:
            self.store.add_records(new)
            self._gossip(new, exclude=source)
            for record in new:
                if record.id in self.view.effective and record.kind in ("join", "remove"):
                    target = record.body["node"]
                    target = target["node_id"] if isinstance(target, dict) else target
                    log.info("mesh: %s %s (by %s)", record.kind, target, record.by)
                    self.ledger(f"member-{record.kind}", target, {"node": target, "by": record.by})
            self._apply_view()
        return new

    def _local_record(self, kind: str, **fields: Any) -> SignedRecord:
        record = self.membership.make(self.identity, kind, self._now_ms(), **fields)
        self.store.add_records([record])
        self._gossip([record], exclude=None)
        self._apply_view()
        return record

    def _gossip(self, records: Sequence[SignedRecord], exclude: PeerConnection | None) -> None:
        batches = [packets.encode(b) for b in packets.split_records([r.to_json() for r in records])]
        for conn in list(self.links.values()):
            if conn is not exclude:
                for batch in batches:
                    conn.send_packet(batch)

    def _apply_view(self) -> None:
        """Make connections, queues and dials agree with the current membership."""
        view = self.view
        me = self.identity.node_id
        if not view.is_member(me):
            if not self._removed_logged and me in view.removed:
                log.error("mesh: this node was removed from mesh %s; it stays alone", view.mesh_id)
                self._removed_logged = True
            self.dialer.update({})
        else:
            self.dialer.update({n: m.addresses for n, m in view.members.items() if n != me})
        for conn in list(self.connections):
            if conn.joining is None and conn.peer is not None and not view.is_member(conn.peer):
                conn.close("removed: the node was removed from the mesh")
        dropped = self.outbox.drop(
            lambda item: (
                view.is_member(item.peer)
                and (item.room is None or item.peer in view.room_recipients(item.room))
            )
        )
        if dropped:
            self._dead_letter(dropped, "recipient removed")
        self.kick()

    # ------------------------------------------------------------ connections

    def _inbound(self, ticket: int) -> PeerConnection:
        """The protocol of a connection the listener admitted."""
        assert self._listener is not None
        session = Session.responder(
            self.identity,
            kem=self.kem,
            clock=self.clock,
            config=self.settings.session,
            extra=self._handshake_extra(),
        )
        return PeerConnection(self, session, admitted=(self._listener, ticket))

    async def _dial(self, dial: Dial) -> None:
        member = self.view.admitted.get(dial.peer)
        if member is None:
            self.dialer.failed(dial.peer)
            return
        session = Session.initiator(
            self.identity,
            remote_static=member.node.static_key,
            kem=self.kem,
            clock=self.clock,
            config=self.settings.session,
            extra=self._handshake_extra(),
        )
        loop = asyncio.get_running_loop()
        try:
            host, port = split_address(dial.address)
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: PeerConnection(self, session, dial=dial), host, port
                ),
                self.settings.connect_timeout,
            )
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: IDNA, a bad address
            log.debug("mesh: dialing %s at %s failed: %s", dial.peer, dial.address, exc)
            self.dialer.failed(dial.peer)

    def refused(self, conn: PeerConnection, reason: str, hint: str = "") -> None:
        """Log (and record) why a connection is being dropped."""
        if conn.joining is not None and not conn.joining.done():
            conn.joining.set_exception(MeshError(f"{reason}{f' ({hint})' if hint else ''}"))
        # A flood of junk connections must not flood the log or the ledger: a
        # burst of REFUSALS_BURST refusals is told, then one a second, and the
        # next one told says how many were not.
        if not self._refusals.take():
            self._refusals_untold += 1
            return
        untold, self._refusals_untold = self._refusals_untold, 0
        log.warning(
            "mesh: dropping the connection with %s: %s%s%s",
            conn.describe(),
            reason,
            f" ({hint})" if hint else "",
            f" ({untold} more refusals since the last one logged)" if untold else "",
        )
        self.ledger(
            "refused",
            conn.peer or "",
            {"address": conn.address, "peer": conn.peer, "reason": reason[:200]},
        )

    def on_handshake(self, conn: PeerConnection, event: HandshakeComplete) -> None:
        remote = event.remote_node_id
        view = self.view
        if conn.joining is not None:
            conn.peer = remote  # the inviter: accepted once its records make us a member
            return
        if remote == self.identity.node_id:
            self._refuse(conn, "self: this is the node itself")
            return
        if remote in view.removed:
            removal = [
                r.to_json()
                for r in self.membership.records()
                if r.kind == "remove" and r.body["node"] == remote and r.id in view.effective
            ]
            for batch in packets.split_records(removal):
                conn.send_packet(packets.encode(batch))
            self._refuse(conn, f"removed: {remote} was removed from the mesh")
            return
        if not view.is_member(self.identity.node_id):
            self._refuse(conn, "removed: this node was removed from the mesh")
            return
        if event.invite is not None and not view.is_member(remote):
            problem = self._redeem(conn, event)
            if problem:
                self._refuse(conn, problem)
                return
        if not self.view.is_member(remote):
            hello = parse_hello(event.extra)
            if hello.mesh == self.membership.mesh_id:
                self._add_records(hello.admission, conn)
        if not self.view.is_member(remote):
            self._refuse(conn, f"unknown-node: {remote} is not a member of this mesh")
            return
        member = self.view.admitted[remote]
        if member.node.signing_key != event.remote_signing_key:
            self._refuse(conn, f"identity: {remote} presented another signing key")
            return
        conn.peer = remote
        self._register(conn, event)

    def _refuse(self, conn: PeerConnection, reason: str) -> None:
        self.refused(conn, reason)
        conn.close(reason)

    def _redeem(self, conn: PeerConnection, event: HandshakeComplete) -> str | None:
        """Admit the peer on its invite claim; the refusal reason, or None."""
        claim = event.invite
        assert claim is not None
        record = self.store.get_invite(claim.invite_id)
        if record is None:
            return "invite-unknown: this node issued no such invite (or it was pruned)"
        if not claim.verify(record.secret):
            return "invite-forged: the invite proof does not verify"
        try:
            redeemed = record.redeem(self.wall())
        except InviteError as exc:
            return f"invite-{exc.reason}: {exc}"
        addresses = list(parse_hello(event.extra).addresses)
        join = SignedRecord.make(
            self.identity,
            "join",
            self.membership.next_at(self._now_ms()),
            node=event.remote_record().to_json(),
            addrs=addresses,
        )
        self.store.redeem_invite(redeemed, join)
        self.membership.add(join)
        log.info("mesh: admitted %s by invite", event.remote_node_id)
        self.ledger(
            "member-join", event.remote_node_id, {"node": event.remote_node_id, "by": join.by}
        )
        self._gossip([join], exclude=None)
        self._apply_view()
        return None

    def _register(self, conn: PeerConnection, event: HandshakeComplete | None) -> None:
        peer = conn.peer
        assert peer is not None
        existing = self.links.get(peer)
        if existing is not None and existing is not conn:
            keep = preferred(self.identity.node_id, existing.link, conn.link)
            reason = f"duplicate: keeping the connection initiated by {keep.initiator}"
            if keep == conn.link:
                existing.registered = False
                existing.close(reason)
                self.outbox.disconnected(peer)
            else:
                conn.close(reason)
                if conn.dial is not None:
                    self.dialer.connected(peer)
                return
        self.links[peer] = conn
        conn.registered = True
        remote = conn.session.remote
        if remote is not None:
            conn.batching = parse_hello(remote.extra).app >= 2
        if event is not None:
            for address in parse_hello(event.extra).addresses:
                self.dialer.learn(peer, address)
        self.dialer.connected(peer)
        self.outbox.connected(peer)
        self.store.touch_peers([peer], self.wall())
        log.info("mesh: connected to %s at %s", peer, conn.address)
        everything = [r.to_json() for r in self.membership.records()]
        for batch in packets.split_records(everything):
            conn.send_packet(packets.encode(batch))
        self.kick()

    def on_closed(self, conn: PeerConnection, event: Closed) -> None:
        if conn.session.remote is None:  # a handshake cut short: anyone can make these, fast
            level = logging.DEBUG
        else:
            level = logging.INFO if event.clean or conn.peer is None else logging.DEBUG
        log.log(level, "mesh: %s closed the connection: %s", conn.describe(), event.reason)
        if conn.joining is not None and not conn.joining.done():
            conn.joining.set_exception(_join_refusal(event.reason))

    def connection_lost(self, conn: PeerConnection) -> None:
        self.connections.discard(conn)
        if conn.joining is not None and not conn.joining.done():
            conn.joining.set_exception(
                KeelError(f"the inviter at {conn.address} hung up before the join completed")
            )
        peer = conn.peer
        if peer is not None and self.links.get(peer) is conn:
            del self.links[peer]
            self.outbox.disconnected(peer)
            self.dialer.disconnected(peer)
            with contextlib.suppress(Exception):
                self.store.touch_peers([peer], self.wall())
            log.info("mesh: disconnected from %s", peer)
        elif conn.dial is not None and not conn.registered:
            self.dialer.failed(conn.dial.peer)
        self.kick()

    # ------------------------------------------------------------ packets

    def on_packet(self, conn: PeerConnection, packet: Ack | Records) -> None:
        if conn.joining is not None and not conn.registered:
            if isinstance(packet, Records):
                self._join_records(conn, packet)
            return
        if not conn.registered:
            return
        peer = conn.peer
        assert peer is not None
        if isinstance(packet, Records):
            self._add_records(packet.records, conn)
            return
        delivered = self.outbox.acked(peer, packet.ok)
        if delivered:
            self._outbox_room.set()
            self.store.delivered(delivered)
            for item in delivered:
                self._forget_payload(item.seq)
                if self._ledger is not None:
                    self.ledger("delivered", item.id, _metadata(self.identity.node_id, item))
        if packet.busy:
            self.outbox.busy(peer, packet.busy)
        for message_id, reason in packet.rejected:
            refused = self.outbox.rejected(peer, [message_id])
            if refused:
                log.warning("mesh: %s rejected message %s: %s", peer, message_id, reason)
                self._dead_letter(refused, f"rejected: {reason}")
        self.kick()

    def on_messages(self, conn: PeerConnection, messages: list[Msg]) -> None:
        """Decide on messages that arrived together; store them (one transaction), then ACK.

        A new message a subscribed local stream has room for is handed to it
        straight from memory instead (a *handoff*): it is answered once the
        agent acknowledged it (its dedup key stored) or, if the agent is slow
        or goes away, once it is stored like any other (``_hold_check``).
        """
        if not conn.registered:
            return
        peer = conn.peer
        assert peer is not None
        view = self.view
        me = self.identity.node_id
        wall = self.wall()
        ok: list[str] = []
        busy: list[str] = []
        rejected: list[tuple[str, str]] = []
        fresh: list[Incoming] = []
        batch_keys: set[tuple[str, str]] = set()
        count, size = self.inbox_count, self.inbox_bytes
        seen = self.store.seen_among(
            [(msg.room.author if msg.room else peer, msg.id) for msg in messages]
        )
        handed: dict[int, LocalStream] = {}
        backlogged: set[str] = set()
        takers: dict[str, LocalStream | None] = {}  # per topic, while it has room
        inbox_limits = self.settings.inbox
        for msg in messages:
            author = peer
            if msg.room is not None:
                check = rooms.check_message(view, me, msg)
                if check.verdict is rooms.RoomVerdict.REJECT:
                    log.warning(
                        "mesh: refusing room message %s from %s: %s",
                        msg.id,
                        conn.describe(),
                        check.reason,
                    )
                    rejected.append((msg.id, check.reason[: packets.MAX_REASON]))
                    continue
                if check.verdict is rooms.RoomVerdict.BUSY:
                    busy.append(msg.id)
                    continue
                author = msg.room.author
            key = (author, msg.id)
            if key in self._held:
                continue  # a copy of a message an agent holds: answered when that one is
            answer = receipt(
                seen=key in batch_keys or key in seen,
                inbox_messages=count,
                inbox_bytes=size,
                size=len(msg.payload),
                limits=self.settings.inbox,
            )
            if answer is Receipt.BUSY:
                busy.append(msg.id)
                continue
            if answer is Receipt.DUPLICATE:
                ok.append(msg.id)
                continue
            batch_keys.add(key)
            item = Incoming(
                author,
                msg.id,
                msg.room.room if msg.room else None,
                msg.topic,
                msg.payload,
                keep_seen_until(msg.expires, wall, inbox_limits),
            )
            stream = takers.get(msg.topic)
            if stream is None or not stream.has_room():
                stream = takers[msg.topic] = self._taker(msg.topic)
            if stream is not None:
                self._handoff(stream, item, peer, wall)
                handed[id(stream)] = stream
                continue
            ok.append(msg.id)
            count += 1
            size += len(msg.payload)
            fresh.append(item)
            if msg.topic in self._streams:
                backlogged.add(msg.topic)
        if fresh:
            self.store.receive(fresh, wall)
            self.inbox_count, self.inbox_bytes = count, size
            for item in fresh:
                self._received(item)
        for topic in backlogged:
            for stream in self._streams.get(topic, ()):
                stream.backlog = True
        for stream in handed.values():
            stream.flush()
        self._answer(conn, ok, busy, rejected)

    def _answer(
        self,
        conn: PeerConnection,
        ok: Sequence[str],
        busy: Sequence[str] = (),
        rejected: Sequence[tuple[str, str]] = (),
    ) -> None:
        """ACK packets (at most 4096 ids per list each)."""
        self.answered_busy += len(busy)
        step = packets.MAX_ACK_IDS
        for at in range(0, max(len(ok), len(busy), len(rejected)), step):
            reply = Ack(
                tuple(ok[at : at + step]),
                tuple(busy[at : at + step]),
                tuple(rejected[at : at + step]),
            )
            conn.send_packet(packets.encode(reply))

    def _received(self, item: Incoming) -> None:
        """A message is this node's now (stored, or taken by an agent): wake readers, record it."""
        waiter = self._inbox_waiters.pop(item.topic, None)
        if waiter is not None:
            waiter.set()
        if self._ledger is not None:
            self.ledger(
                "received",
                item.id,
                {
                    "id": item.id,
                    "from": item.sender,
                    "to": self.identity.node_id,
                    "room": item.room,
                    "topic": item.topic,
                    "size": len(item.payload),
                },
            )

    # ------------------------------------------------------------ the outbox pump

    def kick(self) -> None:
        """Run the pump soon (coalesced)."""
        if self._pump_handle is None:
            loop = asyncio.get_running_loop()
            self._pump_handle = loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_handle = None
        if self._pump_timer is not None:
            self._pump_timer.cancel()
            self._pump_timer = None
        try:
            due = self.outbox.poll()
            if due.expired:
                self._dead_letter(due.expired, "expired")
            batches: dict[str, Batch] = {}
            for item in due.sends:
                conn = self.links.get(item.peer)
                stored = self._payload(item.seq)
                if conn is None or stored is None:
                    continue
                payload, stamp = stored
                message = Msg(item.id, item.topic, int(item.expires), payload, stamp)
                if conn.batching and packets.batchable(message):
                    batch = batches.get(item.peer)
                    if batch is None:
                        batch = batches[item.peer] = Batch(conn)
                    batch.add(message)
                else:
                    conn.send_packet(packets.encode(message))
            for batch in batches.values():
                batch.flush()
            for conn in {
                id(c): c for c in (self.links.get(i.peer) for i in due.sends) if c
            }.values():
                conn.flush()  # now: before the local reply (SENT) that follows a send
            for dial in self.dialer.due():
                self._spawn(self._dial(dial))
        except Exception:
            log.exception("mesh: the outbox pump failed; retrying in a second")
            self._pump_timer = asyncio.get_running_loop().call_later(1.0, self.kick)
            return
        deadlines = [d for d in (self.outbox.next_deadline(), self.dialer.next_deadline()) if d]
        if deadlines:
            delay = max(0.0, min(deadlines) - self.clock())
            self._pump_timer = asyncio.get_running_loop().call_later(max(delay, 0.001), self.kick)

    def _payload(self, seq: int) -> tuple[bytes, RoomStamp | None] | None:
        cached = self._payloads.get(seq)
        if cached is not None:
            return cached
        return self.store.outbox_payload(seq)

    def _remember_payload(self, seq: int, payload: bytes, stamp: RoomStamp | None) -> None:
        if self._payload_bytes + len(payload) <= PAYLOAD_CACHE_BYTES:
            self._payloads[seq] = (payload, stamp)
            self._payload_bytes += len(payload)

    def _forget_payload(self, seq: int) -> None:
        cached = self._payloads.pop(seq, None)
        if cached is not None:
            self._payload_bytes -= len(cached[0])

    def _dead_letter(self, items: Sequence[Queued], reason: str) -> None:
        self._outbox_room.set()
        self.store.dead_letter(items, reason, self.wall())
        for item in items:
            self._forget_payload(item.seq)
            log.warning("mesh: message %s to %s is a dead letter: %s", item.id, item.peer, reason)
            self.ledger(
                "dead-letter", item.id, {**_metadata(self.identity.node_id, item), "reason": reason}
            )

    # ------------------------------------------------------------ local sending

    def enqueue(
        self,
        messages: Sequence[tuple[Sequence[str], str, bytes, float, RoomStamp | None]],
        *,
        message_ids: Sequence[str],
    ) -> None:
        """Queue messages durably: (recipients, topic, payload, expires, room stamp) each."""
        counts: dict[str, int] = {}
        size = 0
        for recipients, _, payload, _, _ in messages:
            for peer in recipients:
                counts[peer] = counts.get(peer, 0) + 1
            size += len(payload) * len(recipients)
        self.outbox.check_batch(counts, size)
        rows = []
        for message_id, (recipients, topic, payload, expires, stamp) in zip(
            message_ids, messages, strict=True
        ):
            rows += [
                OutboxRow(
                    message_id,
                    peer,
                    stamp.room if stamp else None,
                    topic,
                    expires,
                    stamp,
                    payload,
                )
                for peer in recipients
            ]
        items = self.store.enqueue(rows, self.wall())
        for row, item in zip(rows, items, strict=True):
            if item is None:
                continue  # the same id for the same peer is queued already: a retried send
            self.outbox.add(item, check=False)
            self._remember_payload(item.seq, row.payload, row.stamp)
            if self._ledger is not None:
                self.ledger("sent", item.id, _metadata(self.identity.node_id, item))
        self._pump()  # now, not on the next turn of the loop: the frames leave before the reply

    # ------------------------------------------------------------ joining

    async def join(self, token: InviteToken, timeout: float = 30.0) -> dict[str, Any]:
        me = self.identity.node_id
        token.check_fresh(self.wall())
        if token.node_id == me:
            raise UsageError("that invite was made by this very node")
        view = self.view
        if view.is_member(token.node_id):
            return {"mesh": view.mesh_id, "node": me, "joined": False, "via": token.node_id}
        others = [n for n in view.admitted if n != me]
        if others:
            raise KeelError(
                f"this node already belongs to mesh {view.mesh_id} with {len(others)} other "
                "member(s); a node joins one mesh: use a fresh --dir to join another"
            )
        problems = []
        for address in token.addresses:
            try:
                return await asyncio.wait_for(self._join_via(token, address), timeout)
            except (InviteError, UsageError):
                raise
            except TimeoutError:
                problems.append(f"{address}: no answer within {timeout:g} s")
            except (OSError, KeelError) as exc:
                problems.append(f"{address}: {exc}")
        raise KeelError(f"could not join through {token.node_id}: " + "; ".join(problems))

    async def _join_via(self, token: InviteToken, address: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, Any]] = loop.create_future()
        session = Session.initiator(
            self.identity,
            remote_static=token.static_key,
            kem=self.kem,
            clock=self.clock,
            config=self.settings.session,
            invite=token,
            extra=self._handshake_extra(),
        )
        try:
            host, port = split_address(address)
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: PeerConnection(self, session, joining=done), host, port
                ),
                self.settings.connect_timeout,
            )
        except (OSError, ValueError) as exc:  # ValueError: IDNA, a bad address
            raise KeelError(f"cannot connect: {getattr(exc, 'strerror', None) or exc}") from None
        return await done

    def _join_records(self, conn: PeerConnection, packet: Records) -> None:
        """Records from the inviter: once they make this node a member, adopt them."""
        assert conn.joining is not None
        for item in packet.records:
            try:
                conn.join_records.append(SignedRecord.from_json(item))
            except RemoteProtocolError as exc:
                log.warning("mesh: ignoring a record from the inviter: %s", exc)
        genesis = [r for r in conn.join_records if r.kind == "genesis"]
        if len(genesis) != 1:
            return
        try:
            adopted = Membership(genesis[0])
            for record in conn.join_records:
                if record.kind != "genesis":
                    adopted.add(record)
        except RemoteProtocolError as exc:
            conn.joining.set_exception(KeelError(f"the inviter sent a broken mesh: {exc}"))
            conn.close("protocol: broken records")
            return
        me = self.identity.node_id
        if not adopted.view.is_member(me):
            return
        self.store.replace_records(adopted.records(), adopted.mesh_id)
        self.membership = adopted
        if set(adopted.view.admitted[me].addresses) != set(self.addresses):
            self.membership.make(self.identity, "addr", self._now_ms(), addrs=self.addresses)
            self.store.add_records(self.membership.records())
        self._removed_logged = False
        log.info("mesh: joined mesh %s through %s", adopted.mesh_id, conn.peer)
        self.ledger("joined", adopted.mesh_id, {"mesh": adopted.mesh_id, "via": conn.peer})
        future = conn.joining
        conn.joining = None
        self._apply_view()
        self._register(conn, None)
        future.set_result(
            {
                "mesh": adopted.mesh_id,
                "node": me,
                "joined": True,
                "via": conn.peer,
                "members": len(adopted.view.members),
            }
        )

    # ------------------------------------------------------------ control API

    def _handlers(self) -> dict[str, Callable[[dict[str, Any], Peer], Any]]:
        return {
            "status": self._h_status,
            "invite": self._h_invite,
            "join": self._h_join,
            "peers": self._h_peers,
            "send": self._h_send,
            "send_many": self._h_send_many,
            "recv": self._h_recv,
            "stream": self._h_stream,
            "ack": self._h_ack,
            "remove": self._h_remove,
            "room_create": self._h_room_create,
            "room_add": self._h_room_add,
            "room_remove": self._h_room_remove,
            "room_send": self._h_room_send,
            "room_members": self._h_room_members,
            "rooms": self._h_rooms,
            "dead_letters": self._h_dead_letters,
        }

    def _require_member(self) -> None:
        if not self.view.is_member(self.identity.node_id):
            raise KeelError(f"this node was removed from mesh {self.view.mesh_id}")

    async def _h_status(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        view = self.view
        return {
            "node": self.identity.node_id,
            "mesh": view.mesh_id,
            "member": view.is_member(self.identity.node_id),
            "addresses": self.addresses,
            "members": len(view.members),
            "connected": sorted(self.links),
            "outbox": len(self.outbox),
            "inbox": self.inbox_count,
            "answered_busy": self.answered_busy,
            "kem": f"{self.kem.name}/{self.kem.backend}",
        }

    async def _h_invite(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self._require_member()
        ttl = arguments.ttl(args, 3600.0)
        uses = arguments.integer(args, "uses", 1, minimum=1, maximum=MAX_USES)
        wall = self.wall()
        token = new_invite(self.identity, self.addresses, now=wall, ttl=ttl, uses=uses)
        self.store.add_invite(InviteRecord.from_token(token), wall)
        self.ledger("invite", token.invite_id.hex(), {"expires": token.expires, "uses": token.uses})
        return {"token": token.encode(), "expires": token.expires, "uses": token.uses}

    async def _h_join(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        token = InviteToken.decode(arguments.string(args, "token"))
        return await self.join(
            token, arguments.number(args, "timeout", 30.0, positive=True, maximum=3600)
        )

    async def _h_peers(self, args: dict[str, Any], peer: Peer) -> list[dict[str, Any]]:
        view = self.view
        seen = self.store.last_seen()
        now = self.wall()
        out = []
        for node_id, member in sorted(view.members.items()):
            if node_id == self.identity.node_id:
                continue
            connected = node_id in self.links
            out.append(
                {
                    "id": node_id,
                    "addresses": list(member.addresses),
                    "connected": connected,
                    "last_seen": now if connected else seen.get(node_id),
                    "queued": self.outbox.queued(node_id),
                }
            )
        return out

    def _message_args(self, args: Mapping[str, Any]) -> tuple[str, bytes, float]:
        topic = arguments.topic(args)
        payload = arguments.data(args)
        return topic, payload, self.wall() + arguments.ttl(args, self.settings.default_ttl)

    def _direct(self, args: Mapping[str, Any]) -> tuple[Sequence[str], str, bytes, float, None]:
        to = arguments.node_id(args, "to")
        if to == self.identity.node_id:
            raise UsageError("that is this node's own id; send to another member")
        if not self.view.is_member(to):
            state = "was removed from" if to in self.view.removed else "is not a member of"
            raise KeelError(f"{to} {state} mesh {self.view.mesh_id}")
        topic, payload, expires = self._message_args(args)
        return [to], topic, payload, expires, None

    async def _h_send(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self._require_member()
        message = self._direct(args)
        message_id = arguments.message_id(args)
        self.enqueue([message], message_ids=[message_id])
        return {"id": message_id}

    async def _h_send_many(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self._require_member()
        items = args.get("messages")
        if not isinstance(items, list) or not 0 < len(items) <= 10_000:
            raise UsageError("messages must be a list of 1 to 10000 messages")
        messages = [self._direct(item if isinstance(item, dict) else {}) for item in items]
        ids = [arguments.message_id(item if isinstance(item, dict) else {}) for item in items]
        self.enqueue(messages, message_ids=ids)
        return {"ids": ids}

    async def _h_recv(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        topic = arguments.topic(args)
        limit = arguments.integer(args, "max", 100, minimum=1, maximum=10_000)
        wait = arguments.number(args, "wait", 0.0)
        lease = arguments.number(args, "lease", self.settings.lease, positive=True, maximum=86400)
        acks = arguments.receipts(args, "ack")
        if acks:
            self._consume(acks)
        deadline = self.clock() + max(0.0, min(wait, 3600.0))
        while True:
            now = self.clock()
            found = self.store.take(topic, limit, _Leased(self, now))
            remaining = deadline - now
            if found or remaining <= 0:
                break
            waiter = self._inbox_waiters.setdefault(topic, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await waiter.wait()
        until = self.clock() + lease
        for message in found:
            self._leases[message.seq] = until
        return {
            "messages": [
                {
                    "receipt": m.seq,
                    "id": m.id,
                    "from": m.sender,
                    "topic": m.topic,
                    "room": m.room,
                    "received": m.received,
                    "data": base64.b64encode(m.payload).decode(),
                }
                for m in found
            ]
        }

    def _consume(self, receipts: Iterable[int]) -> int:
        gone = self.store.consume(receipts)
        for seq, size in gone:
            self._leases.pop(seq, None)
            stream = self._handed.pop(seq, None)
            if stream is not None:
                stream.release(seq)
            self.inbox_count -= 1
            self.inbox_bytes -= size
        if gone:
            self.kick()
        return len(gone)

    # ------------------------------------------------------------ local streams

    async def _h_stream(self, args: dict[str, Any], peer: Peer) -> Upgrade:
        return Upgrade({"stream": 1, "node": self.identity.node_id}, self._serve_stream)

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Frames from one agent until it hangs up (``keel.mesh.local``)."""
        sock = writer.get_extra_info("socket")  # asyncio's TransportSocket
        if sock is not None:
            local.widen(sock)
        stream = LocalStream(writer)
        try:
            while True:
                kind, length = local.read_frame_head(await reader.readexactly(local.FRAME.size))
                body = await reader.readexactly(length) if length else b""
                if kind == local.Kind.SEND:
                    await self._stream_send(stream, body)
                else:
                    self._stream_frame(stream, kind, body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except local.LocalStreamError as exc:
            stream.write(local.frame(local.Kind.ERROR, f"malformed frame: {exc}".encode()))
        except Exception:
            log.exception("mesh: internal error on a local stream")
            stream.write(local.frame(local.Kind.ERROR, b"internal error; see the daemon's log"))
        finally:
            self._stream_closed(stream)

    async def _stream_send(self, stream: LocalStream, body: bytes) -> None:
        """A SEND: queued, refused, or (the outbox full for ``STREAM_SEND_WAIT`` s) busy.

        While it waits for room, this stream's later frames wait in the socket:
        the agent's pipeline slows to the pace the mesh delivers at.
        """
        request, messages = local.decode_send(body)
        deadline = self.clock() + STREAM_SEND_WAIT
        try:
            batch = self._local_batch(messages)
            while True:
                try:
                    self.enqueue(batch, message_ids=[m.id for m in messages])
                    break
                except Backpressure:
                    left = deadline - self.clock()
                    if left <= 0:
                        raise
                    self._outbox_room.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(left):
                            await self._outbox_room.wait()
                    self._require_member()
        except Backpressure as exc:
            stream.write(local.encode_sent(request, local.Status.BUSY, str(exc)))
        except KeelError as exc:
            stream.write(local.encode_sent(request, local.Status.REFUSED, str(exc)))
        except Exception:
            log.exception("mesh: a local SEND failed")
            error = "internal error; see the daemon's log"
            stream.write(local.encode_sent(request, local.Status.REFUSED, error))
        else:
            stream.write(local.encode_sent(request))

    def _stream_frame(self, stream: LocalStream, kind: int, body: bytes) -> None:
        if kind == local.Kind.ACK:
            self._stream_ack(stream, local.decode_ack(body))
            self._fill(stream)
            stream.flush()
        elif kind == local.Kind.SUBSCRIBE:
            topic, max_unacked, max_bytes = local.decode_subscribe(body)
            if stream.topic is not None:
                raise local.LocalStreamError("a stream subscribes once")
            try:
                stream.topic = check_topic(topic)
            except ValueError as exc:
                raise local.LocalStreamError(str(exc)) from None
            stream.max_unacked = max(1, min(max_unacked, MAX_STREAM_UNACKED))
            stream.max_bytes = max(1, max_bytes)
            stream.backlog = True
            self._streams.setdefault(topic, []).append(stream)
            self._fill(stream)
            stream.flush(always=True)  # the answer: subscribed (with whatever waited)
        else:
            raise local.LocalStreamError(f"unknown frame type 0x{kind:02x}")

    def _local_batch(
        self, messages: Sequence[local.SendEntry]
    ) -> list[tuple[Sequence[str], str, bytes, float, None]]:
        """A SEND's messages for ``enqueue``, after the same checks as ``send_many``."""
        self._require_member()
        me = self.identity.node_id
        view = self.view
        recipients: dict[str, list[str]] = {}
        topics: set[str] = set()
        wall = self.wall()
        batch: list[tuple[Sequence[str], str, bytes, float, None]] = []
        for message in messages:
            to = recipients.get(message.to)
            if to is None:
                if not is_node_id(message.to):
                    raise UsageError(f"{message.to!r} is not a node id")
                if message.to == me:
                    raise UsageError("that is this node's own id; send to another member")
                if not view.is_member(message.to):
                    state = (
                        "was removed from" if message.to in view.removed else "is not a member of"
                    )
                    raise KeelError(f"{message.to} {state} mesh {view.mesh_id}")
                to = recipients[message.to] = [message.to]
            if message.topic not in topics:
                try:
                    topics.add(check_topic(message.topic))
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
            arguments.check_size(len(message.payload))
            ttl = message.ttl_ms / 1000 if message.ttl_ms else self.settings.default_ttl
            if ttl > arguments.MAX_TTL:
                raise UsageError(f"ttl must be at most {arguments.MAX_TTL} s (ten years)")
            batch.append((to, message.topic, message.payload, wall + ttl, None))
        return batch

    def _taker(self, topic: str) -> LocalStream | None:
        """A stream subscribed to ``topic`` that can take a message now, if any."""
        for stream in self._streams.get(topic, ()):
            if not stream.backlog and stream.has_room():
                return stream
        return None

    def _handoff(self, stream: LocalStream, item: Incoming, peer: str, wall: float) -> None:
        receipt_number = next(self._handoff_receipts)
        held = Handoff(receipt_number, item, peer, stream, self.clock())
        self._handoffs[receipt_number] = held
        self._held[(item.sender, item.id)] = held
        head = local.deliver_entry_head(
            receipt_number,
            item.id,
            sender=item.sender,
            received=wall,
            room=item.room,
            size=len(item.payload),
        )
        stream.hand(head, item.payload, receipt_number)
        if self._hold_timer is None:
            self._hold_timer = asyncio.get_running_loop().call_later(HANDOFF_HOLD, self._hold_check)

    def _hold_check(self) -> None:
        """Store the handoffs agents have held for ``HANDOFF_HOLD`` s (still theirs), then ACK."""
        self._hold_timer = None
        now = self.clock()
        due = [
            h for h in self._handoffs.values() if h.seq is None and now - h.since >= HANDOFF_HOLD
        ]
        try:
            self._store_handoffs(due, keep=True)
        except Exception:
            log.exception("mesh: storing held messages failed; retrying")
        waiting = [h.since for h in self._handoffs.values() if h.seq is None]
        if waiting:
            delay = max(0.05, min(waiting) + HANDOFF_HOLD - now)
            self._hold_timer = asyncio.get_running_loop().call_later(delay, self._hold_check)

    def _store_handoffs(self, held: Sequence[Handoff], *, keep: bool) -> None:
        """Store handed-off messages in the inbox and answer ``ok`` for them.

        ``keep``: the agent still holds them (they stay leased to its stream
        and its acknowledgement consumes them); otherwise they are up for
        grabs again. What the inbox has no room for stays unanswered (the
        sender sends it again later) and, unless kept, is forgotten.
        """
        wall = self.wall()
        store: list[Handoff] = []
        count, size = self.inbox_count, self.inbox_bytes
        for handoff in held:
            length = len(handoff.item.payload)
            full = receipt(
                seen=False,
                inbox_messages=count,
                inbox_bytes=size,
                size=length,
                limits=self.settings.inbox,
            )
            if full is Receipt.BUSY:
                if not keep:
                    self._forget_handoff(handoff)
                continue
            count += 1
            size += length
            store.append(handoff)
        if not store:
            return
        seqs = self.store.receive([h.item for h in store], wall)
        self.inbox_count, self.inbox_bytes = count, size
        answers: dict[str, list[str]] = {}
        for handoff, seq in zip(store, seqs, strict=True):
            self._held.pop((handoff.item.sender, handoff.item.id), None)
            answers.setdefault(handoff.peer, []).append(handoff.item.id)
            self._received(handoff.item)
            if keep:
                handoff.seq = seq
                self._handed[seq] = handoff.stream
            else:
                self._forget_handoff(handoff)
        self._answer_peers(answers)

    def _forget_handoff(self, handoff: Handoff) -> None:
        self._handoffs.pop(handoff.receipt, None)
        self._held.pop((handoff.item.sender, handoff.item.id), None)
        handoff.stream.release(handoff.receipt)

    def _answer_peers(self, answers: Mapping[str, Sequence[str]]) -> None:
        """``ok`` for these ids to each peer, on its current connection (if any: else it resends)."""
        for peer, ids in answers.items():
            conn = self.links.get(peer)
            if conn is not None:
                self._answer(conn, ids)

    def _stream_ack(self, stream: LocalStream, receipts: Sequence[int]) -> None:
        """An agent's ACK: consume stored messages; store the keys of handed-off ones, then ``ok``."""
        stored: list[int] = []
        taken: list[Handoff] = []
        for number in receipts:
            if number < HANDOFF_BASE:
                stored.append(number)
                continue
            handoff = self._handoffs.get(number)
            if handoff is None or handoff.stream is not stream:
                continue  # another stream's, or stale: not this agent's to acknowledge
            if handoff.seq is not None:  # stored meanwhile: consume the stored copy
                stored.append(handoff.seq)
                self._handoffs.pop(number, None)
                stream.release(number)
            else:
                taken.append(handoff)
        if taken:
            self.store.mark_seen([(h.item.sender, h.item.id, h.item.keep_until) for h in taken])
            answers: dict[str, list[str]] = {}
            for handoff in taken:
                self._forget_handoff(handoff)
                answers.setdefault(handoff.peer, []).append(handoff.item.id)
                self._received(handoff.item)
            self._answer_peers(answers)
        if stored:
            self._consume(stored)

    def _hand(self, stream: LocalStream, message: InboxMessage) -> None:
        """Hand a stored message to ``stream`` (leased to it until acknowledged or closed)."""
        head = local.deliver_entry_head(
            message.seq,
            message.id,
            sender=message.sender,
            received=message.received,
            room=message.room,
            size=len(message.payload),
        )
        self._handed[message.seq] = stream
        stream.hand(head, message.payload, message.seq)

    def _fill(self, stream: LocalStream) -> None:
        """Hand ``stream`` what waits in the inbox for its topic, while it has room."""
        topic = stream.topic
        while topic is not None and not stream.closed and stream.backlog and stream.has_room():
            room_left = stream.max_unacked - len(stream.pending)
            found = self.store.take(topic, room_left, _Leased(self, self.clock()))
            if len(found) < room_left:
                stream.backlog = False
            for message in found:
                self._hand(stream, message)
            if not found:
                break

    def _stream_closed(self, stream: LocalStream) -> None:
        """What it held goes to the topic's other subscribers (and ``recv`` callers)."""
        stream.closed = True
        handoffs = [h for h in self._handoffs.values() if h.stream is stream]
        for handoff in handoffs:
            if handoff.seq is not None:
                self._handed.pop(handoff.seq, None)
                self._handoffs.pop(handoff.receipt, None)
        try:
            self._store_handoffs([h for h in handoffs if h.seq is None], keep=False)
        except Exception:
            log.exception("mesh: storing the messages a closed stream held failed")
            for handoff in handoffs:
                self._forget_handoff(handoff)  # unanswered: their senders send them again
        for seq in stream.pending:
            self._handed.pop(seq, None)
        topic = stream.topic
        if topic is None:
            return
        streams = self._streams.get(topic, [])
        if stream in streams:
            streams.remove(stream)
        if not streams:
            self._streams.pop(topic, None)
        if stream.pending or handoffs:
            waiter = self._inbox_waiters.pop(topic, None)
            if waiter is not None:
                waiter.set()
            for other in streams:
                other.backlog = True
                try:
                    self._fill(other)
                    other.flush()
                except Exception:
                    log.exception("mesh: handing messages to a local stream failed")
        stream.pending.clear()

    async def _h_ack(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return {"acked": self._consume(arguments.receipts(args, "receipts"))}

    async def _h_remove(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self._require_member()
        node = arguments.node_id(args, "node")
        view = self.view
        if node == self.identity.node_id:
            raise UsageError(
                "a node cannot remove itself; run `keel mesh remove` on another member"
            )
        if node in view.removed:
            raise KeelError(f"{node} was removed already")
        if node not in view.admitted:
            raise KeelError(f"{node} is not a member of mesh {view.mesh_id}")
        record = self.membership.make(self.identity, "remove", self._now_ms(), node=node)
        self.store.add_records([record])
        self._gossip([record], exclude=None)  # the removed node hears it too, then is cut off
        self.ledger("member-remove", node, {"node": node, "by": self.identity.node_id})
        log.info("mesh: removed %s", node)
        self._apply_view()
        return {"removed": node, "record": record.id}

    def _room(self, args: Mapping[str, Any]) -> Room:
        ref = arguments.string(args, "room")
        view = self.view
        if ref in view.rooms:
            return view.rooms[ref]
        named = [r for r in view.rooms.values() if r.name == ref]
        if len(named) == 1:
            return named[0]
        if named:
            raise UsageError(f"{len(named)} rooms are named {ref!r}; use the room id")
        raise KeelError(f"no room {ref!r} is known to this node")

    def _room_json(self, room: Room) -> dict[str, Any]:
        view = self.view
        return {
            "room": room.id,
            "name": room.name,
            "owner": room.owner,
            "version": room.version,
            "members": [
                {
                    "id": m,
                    "connected": m in self.links or m == self.identity.node_id,
                    "member": view.is_member(m),
                }
                for m in room.members
            ],
        }

    async def _h_room_create(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self._require_member()
        name = arguments.string(args, "name")
        members = args.get("members", [])
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise UsageError("members must be a list of node ids")
        for member in members:
            if not self.view.is_member(member):
                raise KeelError(f"{member} is not a member of the mesh")
        record = rooms.create(
            self.identity, self.membership, name=name, members=members, now_ms=self._now_ms()
        )
        self.store.add_records([record])
        self._gossip([record], exclude=None)
        self._apply_view()
        return self._room_json(self.view.rooms[record.body["room"]])

    async def _room_change(self, args: dict[str, Any], add: bool) -> dict[str, Any]:
        self._require_member()
        room = self._room(args)
        if room.owner != self.identity.node_id:
            raise UsageError(
                f"room {room.name} ({room.id}) belongs to {room.owner}; only its owner changes it"
            )
        node = arguments.node_id(args, "node")
        members = set(room.members)
        if add:
            if not self.view.is_member(node):
                raise KeelError(f"{node} is not a member of the mesh")
            members.add(node)
        else:
            if node == room.owner:
                raise UsageError("the owner cannot leave its own room")
            if node not in members:
                raise KeelError(f"{node} is not in room {room.name}")
            members.discard(node)
        record = rooms.update(
            self.identity, self.membership, room, members=sorted(members), now_ms=self._now_ms()
        )
        self.store.add_records([record])
        self._gossip([record], exclude=None)
        self._apply_view()
        self.ledger("room-add" if add else "room-remove", room.id, {"room": room.id, "node": node})
        return self._room_json(self.view.rooms[room.id])

    async def _h_room_add(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return await self._room_change(args, add=True)

    async def _h_room_remove(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return await self._room_change(args, add=False)

    async def _h_room_send(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self._require_member()
        room = self._room(args)
        me = self.identity.node_id
        recipients = self.view.room_recipients(room.id)
        if me not in recipients:
            raise KeelError(f"this node is not a member of room {room.name}")
        topic, payload, expires = self._message_args(args)
        message_id = arguments.message_id(args)
        stamp = rooms.stamp(
            self.identity, room, message_id, topic=topic, expires=int(expires), payload=payload
        )
        others = [m for m in recipients if m != me]
        if others:
            self.enqueue([(others, topic, payload, int(expires), stamp)], message_ids=[message_id])
        return {"id": message_id, "recipients": others}

    async def _h_room_members(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return self._room_json(self._room(args))

    async def _h_rooms(self, args: dict[str, Any], peer: Peer) -> list[dict[str, Any]]:
        return [self._room_json(r) for r in sorted(self.view.rooms.values(), key=lambda r: r.name)]

    async def _h_dead_letters(self, args: dict[str, Any], peer: Peer) -> list[dict[str, Any]]:
        return self.store.dead_letters(
            arguments.integer(args, "limit", 100, minimum=1, maximum=10_000)
        )


# ---------------------------------------------------------------- helpers


class _Leased:
    """Receipts not to hand out now: on a local stream, or leased by ``recv`` until later."""

    __slots__ = ("handed", "leases", "now")

    def __init__(self, node: MeshNode, now: float) -> None:
        self.handed = node._handed
        self.leases = node._leases
        self.now = now

    def __contains__(self, seq: object) -> bool:
        return seq in self.handed or self.leases.get(seq, 0.0) > self.now  # type: ignore[call-overload]


def _metadata(me: str, item: Queued) -> dict[str, Any]:
    """What the ledger may know of a message: never its payload."""
    return {
        "id": item.id,
        "from": me,
        "to": item.peer,
        "room": item.room,
        "topic": item.topic,
        "size": item.size,
    }


def _join_refusal(reason: str) -> KeelError:
    code = _close_code(reason)
    if code.startswith("invite-"):
        kind = code.removeprefix("invite-")
        if kind in InviteError.REASONS:
            text = reason.split(":", 1)[-1].strip()
            return InviteError(f"the inviter refused the invite: {text}", kind)
    return MeshError(f"the inviter closed the connection: {reason}")


def _refuse_if_served(path: Path) -> None:
    """``KeelError`` if a live daemon answers on ``path`` (its directory is taken)."""
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return  # a stale socket: the control server replaces it
    raise KeelError(
        f"{path}: another keel mesh daemon is already serving this directory; stop it first"
    )


def run(directory: Path, listen: str, ledger: Path | None) -> int:
    """``keel mesh serve``: run until SIGTERM/SIGINT."""
    sd.setup_logging("mesh")
    node = MeshNode(directory, listen, ledger_path=ledger)
    asyncio.run(node.serve_forever())
    return 0
