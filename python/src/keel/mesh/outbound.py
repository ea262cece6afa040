"""The sending side of a node: the outbox pump, around the pure :class:`~keel.mesh.delivery.Outbox`.

A message is queued durably first (one outbox row per recipient, one
transaction for a whole batch, before the sender hears ``queued``), then the
pump sends what the outbox says is due on each peer's link: MSGS packets to
peers that take them, single MSG packets otherwise. Payloads (and room
stamps, as objects) stay in a bounded memory cache from the enqueue to the
acknowledgement, so the pump reads the store only after a restart or when
the cache is full. Acknowledged rows are deleted; expired and refused ones
become dead letters. Each message's ``sent``, ``delivered`` and
``dead-letter`` stage goes to the :class:`~keel.mesh.audit_log.AuditLog`
(metadata only, many messages to a ledger entry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

from keel.mesh import packets
from keel.mesh.audit import Message
from keel.mesh.audit_log import AuditLog
from keel.mesh.delivery import Backpressure, Envelope, Outbox, OutboxRow, Queued
from keel.mesh.packets import Msg, RoomStamp
from keel.mesh.peer_link import Batch, PeerLink
from keel.mesh.store import StateError, Store, state_failed

log = logging.getLogger("keel.mesh")

PAYLOAD_CACHE_BYTES = 64 << 20
RETRY_FAILED_PUMP = 1.0  # s: the state database failed; try again then


class NewMessage(NamedTuple):
    """A message to queue: one id, one or more recipients (a room's members)."""

    id: str
    recipients: Sequence[str]
    topic: str
    payload: bytes | memoryview  # a view: of an agent's SEND frame (local.decode_send)
    expires: float  # Unix seconds
    stamp: RoomStamp | None = None
    agent: str | None = None  # the sending agent (None: the node itself)
    to: str | None = None  # the agent it is for on each recipient (None: the topic's readers)

    def __repr__(self) -> str:  # never the payload
        return (
            f"NewMessage(id={self.id!r}, recipients={len(self.recipients)}, topic={self.topic!r})"
        )


class Outbound:
    def __init__(
        self,
        *,
        store: Store,
        outbox: Outbox,
        links: Mapping[str, PeerLink],
        me: str,
        audit: AuditLog | None,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.links = links
        self.me = me
        self.audit = audit  # None: no ledger (and no metadata gathered for it)
        self.clock = clock
        self.wall = wall
        self.room = asyncio.Event()  # set whenever messages leave the outbox
        self._payloads: dict[int, Envelope] = {}
        self._payload_bytes = 0  # what the cached payloads keep in memory
        # id(buffer) -> [cached payloads that are views of it, its size]: the frames they hold
        self._buffers: dict[int, list[int]] = {}
        self._pump_handle: asyncio.Handle | None = None
        self._pump_timer: asyncio.TimerHandle | None = None

    def load(self) -> None:
        """What the store still holds, after a restart."""
        for item in self.store.load_outbox():
            self.outbox.add(item, check=False)

    def close(self) -> None:
        for handle in (self._pump_handle, self._pump_timer):
            if handle is not None:
                handle.cancel()

    def __len__(self) -> int:
        return len(self.outbox)

    def queued(self, peer: str) -> int:
        return self.outbox.queued(peer)

    # -- queueing

    def submit(self, messages: Sequence[NewMessage]) -> None:
        """Queue ``messages`` durably, all or none, then send what is due at once.

        :class:`~keel.mesh.delivery.Backpressure` if the outbox is full (try
        later), another :class:`~keel.errors.KeelError` if it never could be.
        """
        counts: dict[str, int] = {}
        size = 0
        rows: list[OutboxRow] = []
        envelopes: list[Envelope] = []  # each row's: one per message, shared by its recipients
        for message_id, recipients, topic, payload, expires, stamp, agent, to in messages:
            room = stamp.room if stamp is not None else None
            envelope = Envelope(payload, stamp, agent, to)
            for peer in recipients:
                counts[peer] = counts.get(peer, 0) + 1
                rows.append(
                    OutboxRow(message_id, peer, room, topic, expires, stamp, payload, agent, to)
                )
                envelopes.append(envelope)
            size += len(payload) * len(recipients)
        self.outbox.check_batch(counts, size)
        items = self.store.enqueue(rows, self.wall())
        self.outbox.add_many(items)  # None: the same id for the same peer was queued already
        self._cache(items, envelopes)
        if self.audit is not None:
            self.audit.add("sent", _audited(i for i in items if i is not None))
        self.pump()  # now, not on the next turn of the loop: the frames leave before the reply

    async def submit_waiting(self, messages: Sequence[NewMessage], wait: float) -> None:
        """:meth:`submit`, waiting up to ``wait`` s for room in a full outbox."""
        deadline = self.clock() + wait
        while True:
            try:
                self.submit(messages)
            except Backpressure:
                left = deadline - self.clock()
                if left <= 0:
                    raise
            else:
                return
            self.room.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.room.wait()

    # -- the pump

    def kick(self) -> None:
        """Run the pump soon (coalesced)."""
        if self._pump_handle is None:
            self._pump_handle = asyncio.get_running_loop().call_soon(self.pump)

    def pump(self) -> None:
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        if self._pump_timer is not None:
            self._pump_timer.cancel()
            self._pump_timer = None
        try:
            self._send_due()
        except StateError as exc:
            state_failed(f"the outbox pump failed (trying again in {RETRY_FAILED_PUMP:g} s)", exc)
            self._pump_timer = asyncio.get_running_loop().call_later(RETRY_FAILED_PUMP, self.kick)
            return
        deadline = self.outbox.next_deadline()
        if deadline is not None:
            delay = max(deadline - self.clock(), 0.001)
            self._pump_timer = asyncio.get_running_loop().call_later(delay, self.kick)

    def _send_due(self) -> None:
        due = self.outbox.poll()
        if due.expired:
            self.dead_letter(due.expired, "expired")
        batches: dict[str, Batch] = {}
        too_old: list[Queued] = []
        too_old_rooms: list[Queued] = []
        links, cached = self.links, self._payloads
        peer: str | None = None
        link: PeerLink | None = None
        for item in due.sends:  # peer by peer (Outbox.poll): the link looked up once per run
            if item.peer != peer:
                peer = item.peer
                link = links.get(peer)
            if link is None:
                continue
            stored = cached.get(item.seq)
            if stored is None:
                stored = self.store.outbox_payload(item.seq)
                if stored is None:
                    continue
            payload, stamp, agent, to = stored
            if stamp is not None and agent is not None and not link.room_agents:
                too_old_rooms.append(item)  # its signature covers the agent: it cannot go without
                continue
            if not link.agents:  # a peer from before revision 3 reads no agent fields
                if to is not None:
                    too_old.append(item)
                    continue
                agent = None  # it sees the message as the node's, as it always did
            message = Msg(item.id, item.topic, int(item.expires), payload, stamp, agent, to)
            if link.batching and packets.batchable(message):
                batch = batches.get(item.peer)
                if batch is None:
                    batch = batches[item.peer] = Batch(link)
                batch.add(message)
            else:
                link.send_packet(packets.encode(message))
        for old, reason in (
            (
                too_old,
                "the recipient's keel is too old for messages to an agent (application "
                f"revision {packets.AGENTS_REVISION}): upgrade it, or send to its topic",
            ),
            (
                too_old_rooms,
                "the recipient's keel is too old for room messages from an agent (application "
                f"revision {packets.ROOM_AGENTS_REVISION}): upgrade it",
            ),
        ):
            if old:
                seqs = {item.seq for item in old}
                self.drop(lambda queued: queued.seq not in seqs, reason)  # noqa: B023 (used at once)
        for batch in batches.values():
            batch.flush()
        for peer in {item.peer for item in due.sends}:
            link = self.links.get(peer)
            if link is not None:
                link.flush()  # now: before the local reply (SENT) that follows a send

    # -- what peers answer

    def answered(self, peer: str, ack: packets.Ack) -> None:
        delivered = self.outbox.acked(peer, ack.ok)
        if delivered:
            self.room.set()
            self.store.delivered(delivered)
            for item in delivered:
                self._forget(item.seq)
            if self.audit is not None:
                self.audit.add("delivered", _audited(delivered))
        if ack.busy:
            self.outbox.busy(peer, ack.busy)
        for message_id, reason in ack.rejected:
            refused = self.outbox.rejected(peer, [message_id])
            if refused:
                log.warning("mesh: %s rejected message %s: %s", peer, message_id, reason)
                self.dead_letter(refused, f"rejected: {reason}")
        self.kick()

    def connected(self, peer: str) -> None:
        self.outbox.connected(peer)
        self.kick()

    def disconnected(self, peer: str) -> None:
        self.outbox.disconnected(peer)
        self.kick()

    def drop(self, keep: Callable[[Queued], bool], reason: str) -> None:
        """Dead-letter every queued message ``keep`` refuses (a recipient left)."""
        dropped = self.outbox.drop(keep)
        if dropped:
            self.dead_letter(dropped, reason)

    def dead_letter(self, items: Sequence[Queued], reason: str) -> None:
        self.room.set()
        self.store.dead_letter(items, reason, self.wall())
        for item in items:
            self._forget(item.seq)
            log.warning("mesh: message %s to %s is a dead letter: %s", item.id, item.peer, reason)
        if self.audit is not None:
            self.audit.add("dead-letter", _audited(items), reason)

    # -- the payload cache

    def _cache(self, items: Sequence[Queued | None], envelopes: Sequence[Envelope]) -> None:
        """Keep what fits of these payloads (``PAYLOAD_CACHE_BYTES`` in all).

        A payload that is a view (of an agent's SEND frame: ``local.decode_send``)
        keeps that whole buffer alive: the buffer counts, once, for as long as
        any payload of it is cached, and the payload itself adds nothing.
        """
        cached, cached_bytes, buffers = self._payloads, self._payload_bytes, self._buffers
        for item, envelope in zip(items, envelopes, strict=True):
            if item is None:
                continue
            payload = envelope.payload
            if type(payload) is not memoryview:
                if cached_bytes + item.size <= PAYLOAD_CACHE_BYTES:
                    cached[item.seq] = envelope
                    cached_bytes += item.size
                continue
            held = buffers.get(id(payload.obj))
            if held is not None:  # its buffer counts already
                cached[item.seq] = envelope
                held[0] += 1
                continue
            size = memoryview(payload.obj).nbytes
            if cached_bytes + size <= PAYLOAD_CACHE_BYTES:
                cached[item.seq] = envelope
                cached_bytes += size
                buffers[id(payload.obj)] = [1, size]
        self._payload_bytes = cached_bytes

    def _payload(self, seq: int) -> Envelope | None:
        cached = self._payloads.get(seq)
        if cached is not None:
            return cached
        return self.store.outbox_payload(seq)

    def _forget(self, seq: int) -> None:
        cached = self._payloads.pop(seq, None)
        if cached is None:
            return
        payload = cached[0]
        if type(payload) is not memoryview:
            self._payload_bytes -= len(payload)
            return
        key = id(payload.obj)  # alive: this view holds it
        held = self._buffers[key]
        held[0] -= 1
        if not held[0]:
            del self._buffers[key]
            self._payload_bytes -= held[1]


def _audited(items: Iterable[Queued]) -> Iterator[Message]:
    """What the ledger may know of queued messages (keel.mesh.audit): never their payload."""
    return ((i.id, i.peer, i.topic, i.room, i.size, i.agent, i.to) for i in items)
