"""One TCP connection to a peer and its secure session: the asyncio side.

A :class:`PeerLink` feeds bytes from TCP into its
:class:`~keel.mesh.session.Session` (``asyncio.Protocol``: no task per
read), turns session events into packets (:mod:`keel.mesh.packets`) and
reports them to its :class:`LinkEvents` (the node); the node writes through
:meth:`PeerLink.send_packet` and hangs up with :meth:`PeerLink.close`. It
knows nothing of membership or delivery: it only tells, and does what it is
told. Messages that arrive in one read are reported together (one batch:
one transaction, one ACK), and so are the ACKs of one read (one ACK: one
transaction deleting what they acknowledge). Outgoing packets are sealed
from their pieces into one buffer each and written without joining them;
incoming messages are borrowed from the session (``Session.lend_messages``)
and decoded at once. A peer that breaks the protocol
(:class:`~keel.mesh.errors.ProtocolError`) loses its connection and the node
hears why; nothing a peer sends stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Protocol

from keel.mesh import packets
from keel.mesh.dialing import Dial, Link
from keel.mesh.errors import ProtocolError
from keel.mesh.hello import Hello
from keel.mesh.membership import SignedRecord
from keel.mesh.packets import Ack, Msg, Msgs, Records, canonical_json
from keel.mesh.session import Closed, HandshakeComplete, Message, NeedData, Session, State

# A MSGS packet may reach 1 MiB (packets.MAX_BATCH_BYTES) and is filled up
# to that: each packet costs both daemons a transaction, an ACK and Python
# bookkeeping, which 64 KiB messages four to a packet paid four times as
# often (about 10 % of their CPU in all).
BATCH_TARGET = packets.MAX_BATCH_BYTES
# Frames queued in one turn of the loop are joined into one write when they
# come to at most this much; above it each large buffer is written as it is
# (a sealed MSGS packet is up to 1 MiB: joining would copy it once more).
JOIN_LIMIT = 64 * 1024
MAX_CLOSE_REASON = 200


class LinkEvents(Protocol):
    """What a link reports to the node that owns it."""

    def link_made(self, link: PeerLink) -> None: ...

    def handshake_done(self, link: PeerLink, event: HandshakeComplete) -> None: ...

    def messages_arrived(self, link: PeerLink, messages: list[Msg]) -> None: ...

    def packet_arrived(self, link: PeerLink, packet: Ack | Records) -> None: ...

    def closed_by_peer(self, link: PeerLink, event: Closed) -> None: ...

    def refused(self, link: PeerLink, reason: str, hint: str = "") -> None: ...

    def link_lost(self, link: PeerLink) -> None: ...


class Intake(Protocol):
    """The listener that admitted an inbound link (:class:`keel.mesh.listener.Listener`)."""

    def handshake_over(self, ticket: int) -> None: ...

    def closed(self, ticket: int) -> None: ...


class PeerLink(asyncio.Protocol):
    """One connection; what it is for (a dial, a join, an inbound peer) the node says."""

    _serials = itertools.count(1)

    def __init__(
        self,
        events: LinkEvents,
        session: Session,
        *,
        local_id: str,
        clock: Callable[[], float],
        dial: Dial | None = None,
        joining: asyncio.Future[dict[str, Any]] | None = None,
        admitted: tuple[Intake, int] | None = None,
    ) -> None:
        self.events = events
        self.session = session
        session.lend_messages = True  # each message is decoded (its payloads copied) at once
        self.local_id = local_id
        self.clock = clock
        self.dial = dial  # an outbound connection to a member
        self.joining = joining  # an outbound connection that joins a mesh by invite
        self.admitted = admitted  # an inbound connection: its listener and intake ticket
        self.serial = next(self._serials)
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.peer: str | None = None  # set once the node accepts the peer
        self.registered = False
        self.closing = False
        self.batching = False  # the peer takes MSGS packets (application revision >= 2)
        self.agents = False  # the peer reads agent fields (application revision >= 3)
        self.room_agents = False  # it verifies a room message's signed agent (revision >= 4)
        self.announced: tuple[str, ...] = ()  # the peer's agents that may use the mesh

        self.join_records: list[SignedRecord] = []  # a joining link: the inviter's records so far
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes | bytearray | memoryview] = []  # frames to write, in order
        self._flush_scheduled = False

    def hello(self, hello: Hello) -> None:
        """What the peer said of itself: which packets it reads, which agents it has."""
        self.batching = hello.app >= 2
        self.agents = hello.app >= packets.AGENTS_REVISION
        self.room_agents = hello.app >= packets.ROOM_AGENTS_REVISION
        self.announced = hello.agents

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
        self.events.link_made(self)
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
        self.events.link_lost(self)
        if self.admitted is not None:
            listener, ticket = self.admitted
            listener.closed(ticket)

    # -- who is on the other end

    @property
    def initiator_id(self) -> str:
        if self.session.role.value == "initiator":
            return self.local_id
        assert self.peer is not None
        return self.peer

    @property
    def link(self) -> Link:
        assert self.peer is not None
        return Link(self.peer, self.initiator_id, self.serial)

    def describe(self) -> str:
        who = self.peer or (self.session.remote_node_id if self.session.remote else None)
        return f"{who or 'unauthenticated peer'} at {self.address}"

    # -- reading

    def _guarded(self, action: Callable[[], None]) -> None:
        """Run ``action``; a protocol error ends this connection (a bug is asyncio's to log)."""
        if self.closing:
            return
        try:
            action()
        except ProtocolError as exc:
            self.events.refused(self, str(exc), exc.hint)
            self.abort()

    def _feed(self, data: bytes) -> None:
        self.session.receive_data(data)
        incoming: list[Msg] = []  # stored and acknowledged together, one transaction
        answers: list[Ack] = []  # what the peer acknowledged: taken together, one transaction
        try:
            self._events(incoming, answers)
        finally:  # what arrived intact before a fault counts
            if not self.closing:
                self._report(incoming, answers)
        if not data:
            self.abort()

    def _report(self, incoming: list[Msg], answers: list[Ack]) -> None:
        """Tell the node what came in so far, and empty the lists."""
        if incoming:
            self.events.messages_arrived(self, incoming[:])
            incoming.clear()
        if answers:
            self.events.packet_arrived(self, merge_acks(answers))
            answers.clear()

    def _events(self, incoming: list[Msg], answers: list[Ack]) -> None:
        while not self.closing:
            event = self.session.next_event()
            self._write(self.session.data_to_send())
            if isinstance(event, NeedData):
                return
            if isinstance(event, HandshakeComplete):
                if self.admitted is not None:
                    listener, ticket = self.admitted
                    listener.handshake_over(ticket)
                self.events.handshake_done(self, event)
                self._arm_timer()  # keepalives and rekeys run on their own deadlines now
            elif isinstance(event, Message):
                packet = packets.decode(event.data)  # copies what it keeps: the data is lent
                if isinstance(packet, Msgs):
                    incoming.extend(packet.messages)
                elif isinstance(packet, Msg):
                    incoming.append(packet)
                elif isinstance(packet, Ack):
                    answers.append(packet)
                else:
                    self._report(incoming, answers)
                    self.events.packet_arrived(self, packet)
            elif isinstance(event, Closed):
                self._report(incoming, answers)
                self.events.closed_by_peer(self, event)
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
        delay = max(0.0, deadline - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._guarded(lambda: self._write(self.session.tick()))
        self._arm_timer()

    # -- writing

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes; everything written in one turn of the loop leaves in this order, together."""
        if data:
            self._out.append(data)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued: small pieces joined, each large one as it is (no copy)."""
        self._flush_scheduled = False
        out = self._out
        if out and self.transport is not None and not self.transport.is_closing():
            if len(out) == 1:
                self.transport.write(memoryview(out[0]))  # a view: a partial send copies no rest
            elif sum(len(piece) for piece in out) <= JOIN_LIMIT:
                self.transport.write(b"".join(out))
            else:
                small: list[bytes | bytearray | memoryview] = []
                for piece in out:
                    if len(piece) < JOIN_LIMIT:
                        small.append(piece)
                        continue
                    if small:
                        self.transport.write(b"".join(small))
                        small.clear()
                    self.transport.write(memoryview(piece))
                if small:
                    self.transport.write(b"".join(small))
        out.clear()

    def send_packet(self, data: bytes) -> None:
        """An encoded packet, once the session is open (dropped otherwise: the node resends)."""
        self.send_pieces((data,))

    def send_pieces(self, pieces: Sequence[bytes | memoryview]) -> None:
        """``send_packet`` for a packet given as pieces: sealed from them, never joined."""
        if self.closing or self.session.state is not State.OPEN:
            return
        self._guarded(lambda: self._write(self.session.seal_message(pieces)))

    def send_records(self, records: list[dict[str, Any]]) -> None:
        for batch in packets.split_records(records):
            self.send_packet(packets.encode(batch))

    def answer(
        self,
        ok: Sequence[str],
        busy: Sequence[str] = (),
        rejected: Sequence[tuple[str, str]] = (),
    ) -> None:
        """ACK packets, each under the header limit (reasons cut to 200 characters)."""
        for packet in ack_packets(ok, busy, rejected):
            self.send_packet(packet)

    # -- hanging up

    def close(self, reason: str) -> None:
        """Say why (a CLOSE record) and hang up."""
        if self.closing:
            return
        with contextlib.suppress(ProtocolError):
            self._write(self.session.close(reason[:MAX_CLOSE_REASON]))
        self.abort()

    def drop(self, reason: str, quietly: bool) -> None:
        """The listener gives up on this handshake (past its deadline, or evicted)."""
        if self.closing:
            return
        if not quietly:
            self.events.refused(self, reason, "slow or stalled peer")
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
    """Messages for one link, sent as MSGS packets of at most the batch limits."""

    __slots__ = ("count", "link", "parts", "size")

    def __init__(self, link: PeerLink) -> None:
        self.link = link
        self.parts: list[bytes | memoryview] = [packets.MSGS_HEADER]  # entry heads, payloads
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
            self.link.send_pieces(self.parts)  # sealed from the pieces: no joined packet
        self.parts = [packets.MSGS_HEADER]
        self.count = 0
        self.size = len(packets.MSGS_HEADER)


def merge_acks(answers: Sequence[Ack]) -> Ack:
    """The ACKs of one read as one: its lists are theirs end to end, in order.

    The node then deletes what they acknowledge in one transaction, not one
    per ACK (about 30 us each on the sending daemon). It treats a merged ACK
    as one ACK carrying all three lists: ``ok`` first, then ``busy``, then
    ``rejected``, whichever ACK said what.
    """
    if len(answers) == 1:
        return answers[0]
    return Ack(
        tuple(i for a in answers for i in a.ok),
        tuple(i for a in answers for i in a.busy),
        tuple(r for a in answers for r in a.rejected),
    )


ACK_HEADER_BUDGET: Final = 60_000  # bytes of ids and reasons in one ACK (the header's limit: 65535)
OK_ID_COST: Final = 35  # what ``acks`` counts for a message id in an ok list (32 + 3)


def ack_packets(
    ok: Sequence[str], busy: Sequence[str] = (), rejected: Sequence[tuple[str, str]] = ()
) -> Iterator[bytes]:
    """:func:`acks`, encoded; the usual answer (ok message ids only) written without
    the JSON encoder (:func:`keel.mesh.packets.encode_ok_ack`), in the same packets."""
    if not busy and not rejected:
        step = min(packets.MAX_ACK_IDS, ACK_HEADER_BUDGET // OK_ID_COST)
        for at in range(0, len(ok), step):
            packet = packets.encode_ok_ack(ok[at : at + step])
            if packet is None:  # not all message ids: the general way from here
                ok = ok[at:]
                break
            yield packet
        else:
            return
    for reply in acks(ok, busy, rejected):
        yield packets.encode(reply)


def acks(
    ok: Sequence[str], busy: Sequence[str] = (), rejected: Sequence[tuple[str, str]] = ()
) -> Iterator[Ack]:
    """The ACK packets that answer these ids: as few as fit the header limit.

    At most :data:`~keel.mesh.packets.MAX_ACK_IDS` per list and
    :data:`ACK_HEADER_BUDGET` bytes of JSON in all (4096 message ids alone
    take 143 KB: an ACK must be split by size, not only by count).
    """
    lists: tuple[list[str], list[str], list[tuple[str, str]]] = ([], [], [])
    used = 0
    cut = [(i, reason[: packets.MAX_REASON]) for i, reason in rejected]
    for number, items in enumerate((ok, busy, cut)):
        for item in items:
            if isinstance(item, str) and item.isascii() and item.isalnum():
                cost = len(item) + 3
            else:
                cost = len(canonical_json(item)) + 1
            if used + cost > ACK_HEADER_BUDGET or len(lists[number]) >= packets.MAX_ACK_IDS:
                yield Ack(tuple(lists[0]), tuple(lists[1]), tuple(lists[2]))
                lists = ([], [], [])
                used = 0
            lists[number].append(item)  # type: ignore[arg-type]
            used += cost
    if any(lists):
        yield Ack(tuple(lists[0]), tuple(lists[1]), tuple(lists[2]))
