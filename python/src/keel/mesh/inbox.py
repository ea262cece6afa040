"""The receiving side of a node: messages from peers until a local agent takes them.

A batch from a peer is planned by :mod:`keel.mesh.inbound` (pure), then
carried out here: new messages stored with their dedup keys in one
transaction, or handed straight to a subscribed agent's stream
(:mod:`keel.mesh.handoffs` keeps who holds what), and the batch answered in
one ACK. Agents take messages by ``recv`` (a long poll; what it returns is
leased until acknowledged) or by a subscription on their binary stream
(:mod:`keel.mesh.agent_streams`); an acknowledgement deletes them.

When the state database fails (a full disk), nothing is answered that is not
stored: the sender keeps the message and sends it again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence

from keel.mesh import inbound, local, rooms
from keel.mesh.agent_streams import LocalStream
from keel.mesh.audit_log import AuditLog
from keel.mesh.delivery import InboxLimits, InboxMessage, Incoming, Receipt, receipt
from keel.mesh.handoffs import Handoffs, Hold, Steps
from keel.mesh.membership import View
from keel.mesh.packets import Msg
from keel.mesh.peer_link import PeerLink
from keel.mesh.store import StateError, Store, state_failed

log = logging.getLogger("keel.mesh")

MIN_HOLD_CHECK = 0.05  # s between two looks at what agents hold, at the least
TAKE_DELAY = 0.01  # s: agents' acknowledgements of messages handed from memory gathered
TAKE_BATCH = 1024  # (or this many of them) before their dedup keys are stored and answered
REFUSED_CHECK = 60.0  # s: how often a reader's kept-back senders on a topic are looked up

Senders = Callable[[str | None], "Sequence[str] | None"]  # a reader's receiveFrom (None: all)
Refused = Callable[[str, str, Sequence[tuple[str, str | None]]], None]  # agent, topic, senders

Answer = Callable[[str, Sequence[str]], None]  # ok for these ids to a peer, if it is connected


class Inbox:
    def __init__(
        self,
        *,
        store: Store,
        handoffs: Handoffs,
        limits: InboxLimits,
        lease: float,
        me: str,
        view: Callable[[], View],
        answer: Answer,
        audit: AuditLog | None,
        clock: Callable[[], float],
        wall: Callable[[], float],
        addressable: inbound.Addressable | None = None,
        senders: Senders | None = None,
        refused: Refused | None = None,
    ) -> None:
        self.store = store
        self.addressable = addressable  # why a message for an agent cannot be taken here
        self.senders: Senders = senders or _everyone  # whose messages an agent may read
        self.refused = refused  # told of messages kept from an agent (its receiveFrom)
        self._refused_checked: dict[tuple[str, str], float] = {}  # (agent, topic) -> when
        self.handoffs = handoffs
        self.limits = limits
        self.lease = lease
        self.me = me
        self.view = view
        self.answer = answer
        self.audit = audit  # None: no ledger (and no metadata gathered for it)
        self.clock = clock
        self.wall = wall
        self.count, self.bytes = store.inbox_totals()
        self.answered_busy = 0  # messages senders were told to send again later
        self._streams: dict[int, LocalStream] = {}
        self._waiters: dict[str, asyncio.Event] = {}  # recv calls waiting on a topic
        self._hold_timer: asyncio.TimerHandle | None = None
        # Messages agents acknowledged straight from memory, their dedup keys not stored yet:
        # gathered (TAKE_DELAY, TAKE_BATCH) so that one transaction and one ACK to each peer
        # cover many of the agents' ACKs; until then a copy that arrives is left unanswered,
        # as while an agent holds the message.
        self._taking: list[Hold] = []
        self._taking_keys: set[tuple[str, str]] = set()
        self._take_timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        self._flush_takes()

    # -- batches from peers

    def arrived(self, link: PeerLink, messages: Sequence[Msg]) -> None:
        """Decide on a batch from ``link``'s peer, store what is new, answer it."""
        peer = link.peer
        assert peer is not None
        wall = self.wall()
        try:
            seen = self.store.seen_among(inbound.keys(messages, peer))
        except StateError as exc:
            state_failed(f"cannot look up {len(messages)} message(s) from {peer}", exc)
            return  # unanswered: sent again later
        plan = inbound.plan(
            messages,
            peer=peer,
            me=self.me,
            view=self.view(),
            seen=seen,
            handed=self.handoffs.handed(),
            taken=self._taking_keys,
            inbox=(self.count, self.bytes),
            limits=self.limits,
            windows=self.handoffs.windows({m.topic for m in messages}),
            wall=wall,
            addressable=self.addressable,
            room_reads=self._agent_reads_room,
        )
        for message_id, reason in plan.rejected:
            log.warning(
                "mesh: refusing message %s from %s: %s", message_id, link.describe(), reason
            )
        ok = plan.ok
        if plan.store:
            try:
                self.store.receive(plan.store, wall)
            except StateError as exc:
                state_failed(f"cannot store {len(plan.store)} message(s) from {peer}", exc)
                ok = []
            else:
                self.count, self.bytes = plan.inbox_messages, plan.inbox_bytes
                self._received(plan.store)
        self.handoffs.set_backlog(plan.backlogged)
        if plan.hand:
            streams = self._streams
            handed: dict[int, LocalStream] = {}
            receipts = self.handoffs.hand_all(plan.hand, peer)
            for (number, item), receipt_number in zip(plan.hand, receipts, strict=True):
                stream = handed.get(number)
                if stream is None:
                    stream = handed[number] = streams[number]
                stream.deliver(_head(receipt_number, item, wall), item.payload)
            self._arm_hold_check()
            for stream in handed.values():
                stream.flush()
        self.answered_busy += len(plan.busy)
        if ok or plan.busy or plan.rejected:  # what was handed is answered once taken
            link.answer(ok, plan.busy, plan.rejected)

    def _agent_reads_room(self, room: str, agent: str) -> bool:
        readable = rooms.reads(self.view(), self.me, agent)
        return readable is None or readable(room)

    def _received(self, items: Sequence[Incoming]) -> None:
        """Messages are this node's now (stored, or taken by an agent): wake readers, record them."""
        if self._waiters:
            for item in items:
                waiter = self._waiters.pop(item.topic, None)
                if waiter is not None:
                    waiter.set()
        if self.audit is not None:
            self.audit.add(
                "received",
                ((i.id, i.sender, i.topic, i.room, len(i.payload), i.agent, i.to) for i in items),
            )

    # -- recv and ack (the JSON verbs)

    async def recv(
        self,
        topic: str,
        limit: int,
        *,
        wait: float,
        lease: float | None,
        reader: str | None = None,
    ) -> list[InboxMessage]:
        """Up to ``limit`` messages on ``topic`` for ``reader`` (an agent; None: the node),
        waiting up to ``wait`` s for one; leased."""
        deadline = self.clock() + wait
        while True:
            found = self.store.take(
                topic,
                limit,
                self.handoffs.holding(),
                reader,
                self.senders(reader),
                rooms=self.room_reads(reader),
            )
            self._check_refused(reader, topic)
            remaining = deadline - self.clock()
            if found or remaining <= 0:
                break
            waiter = self._waiters.setdefault(topic, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await waiter.wait()
        self.handoffs.lease([m.seq for m in found], self.clock() + (lease or self.lease))
        return found

    def room_reads(self, reader: str | None) -> Callable[[str], bool] | None:
        """The rooms whose messages ``reader`` (an agent; None: the node) may read, now."""
        return rooms.reads(self.view(), self.me, reader)

    def consume(
        self,
        receipts: Iterable[int],
        reads: Callable[[str], bool] | None = None,
        *,
        reader: str | None = None,
    ) -> int:
        """Delete acknowledged messages (on the topics ``reads`` allows; for the agent
        ``reader``: those for no agent or for it, from the senders it may read, of the
        rooms it is in); how many there were."""
        gone = self.store.consume(
            receipts, reads, self.senders(reader), rooms=self.room_reads(reader), reader=reader
        )
        self.handoffs.consumed(seq for seq, _ in gone)
        for _, size in gone:
            self.count -= 1
            self.bytes -= size
        return len(gone)

    def expire_leases(self) -> None:
        """Leases that ran out: their messages go to subscribers again."""
        if self.handoffs.expire_leases():
            for number, stream in self._streams.items():
                self.handoffs.set_backlog([number])
                self._fill(stream)
                stream.flush()

    # -- agents' streams (keel.mesh.agent_streams.Subscriptions)

    def stream_opened(self, stream: LocalStream) -> None:
        self._streams[stream.number] = stream
        self.handoffs.open(stream.number)

    def subscribe(self, stream: LocalStream, topic: str, max_unacked: int, max_bytes: int) -> None:
        self.handoffs.subscribe(
            stream.number,
            topic,
            max_unacked=max_unacked,
            max_bytes=max_bytes,
            reader=stream.reader,
            senders=self.senders(stream.reader),
        )
        self._fill(stream)
        stream.flush(always=True)  # the answer: subscribed (with whatever waited)

    def stream_acked(self, stream: LocalStream, receipts: Sequence[int]) -> None:
        self._carry_out(self.handoffs.acked(stream.number, receipts), stream.reads, stream.reader)
        self._fill(stream)
        stream.flush()

    def stream_closed(self, stream: LocalStream) -> None:
        """What it held goes to the topic's other subscribers (and ``recv`` callers)."""
        stream.close()
        del self._streams[stream.number]
        topic = self.handoffs.topic(stream.number)
        steps = self.handoffs.closed(stream.number)
        self._carry_out(steps)
        if topic is None or not (steps.release or steps.store_freed):
            return
        waiter = self._waiters.pop(topic, None)
        if waiter is not None:
            waiter.set()
        others = self.handoffs.subscribers(topic)
        self.handoffs.set_backlog(others)
        for number in others:
            other = self._streams[number]
            self._fill(other)
            other.flush()

    def _fill(self, stream: LocalStream) -> None:
        """Hand ``stream`` what waits in the inbox for its topic, while it has room."""
        number = stream.number
        topic = self.handoffs.topic(number)
        handoffs = self.handoffs
        while (
            topic is not None
            and not stream.closed
            and handoffs.backlog(number)
            and handoffs.has_room(number)
        ):
            room = handoffs.room(number)
            reader = handoffs.reader(number)
            try:
                found = self.store.take(
                    topic,
                    room,
                    handoffs.holding(),
                    reader,
                    self.senders(reader),
                    rooms=self.room_reads(reader),
                )
            except StateError as exc:
                state_failed(f"cannot read the inbox for a subscriber of {topic}", exc)
                return
            self._check_refused(reader, topic)
            if len(found) < room:
                handoffs.set_backlog([number], False)
            for message in found:
                handoffs.hand_stored(number, message.seq, len(message.payload))
                head = local.deliver_entry_head(
                    message.seq,
                    message.id,
                    sender=message.sender,
                    received=message.received,
                    room=message.room,
                    size=len(message.payload),
                    agent=message.agent,
                )
                stream.deliver(head, message.payload)
            if not found:
                return

    def _check_refused(self, reader: str | None, topic: str) -> None:
        """Tell ``refused`` whose messages on ``topic`` wait that ``reader`` may not read
        (its receiveFrom): once per :data:`REFUSED_CHECK` per agent and topic."""
        if reader is None or self.refused is None:
            return
        senders = self.senders(reader)
        if senders is None:
            return
        key = (reader, topic)
        now = self.clock()
        last = self._refused_checked.get(key)
        if last is not None and now - last < REFUSED_CHECK:
            return
        if len(self._refused_checked) >= 4096:
            self._refused_checked.clear()
        self._refused_checked[key] = now
        try:
            kept = self.store.refused_senders(topic, reader, senders)
        except StateError as exc:
            state_failed(f"cannot look up the senders kept from agent {reader}", exc)
            return
        if kept:
            self.refused(reader, topic, kept)

    # -- what handoffs decide (keel.mesh.handoffs.Steps)

    def _arm_hold_check(self) -> None:
        if self._hold_timer is not None:
            return
        deadline = self.handoffs.next_deadline()
        if deadline is not None:
            delay = max(MIN_HOLD_CHECK, deadline - self.clock())
            self._hold_timer = asyncio.get_running_loop().call_later(delay, self._hold_check)

    def _hold_check(self) -> None:
        """Store what agents held too long (still theirs), then answer it."""
        self._hold_timer = None
        self._carry_out(self.handoffs.due())
        self._arm_hold_check()

    def _carry_out(
        self, steps: Steps, reads: Callable[[str], bool] | None = None, reader: str | None = None
    ) -> None:
        """Do what ``steps`` say; ``reads`` bounds the topics an agent's ACK may delete,
        ``reader`` (the agent) the senders and rooms."""
        if steps.take:
            self._defer_take(steps.take)
        if steps.store_kept:
            self._store(steps.store_kept, keep=True)
        if steps.store_freed:
            self._store(steps.store_freed, keep=False)
        if steps.consume:
            try:
                self.consume(steps.consume, reads, reader=reader)
            except StateError as exc:
                state_failed(f"cannot delete {len(steps.consume)} acknowledged message(s)", exc)

    def _defer_take(self, holds: Sequence[Hold]) -> None:
        """Store the dedup keys of and answer ``holds`` (agents took them) with the others
        taken within :data:`TAKE_DELAY` (or once there are :data:`TAKE_BATCH`)."""
        self._taking += holds
        self._taking_keys.update((h.item.sender, h.item.id) for h in holds if h.item is not None)
        if len(self._taking) >= TAKE_BATCH:
            self._flush_takes()
        elif self._take_timer is None:
            loop = asyncio.get_running_loop()
            self._take_timer = loop.call_later(TAKE_DELAY, self._flush_takes)

    def _flush_takes(self) -> None:
        if self._take_timer is not None:
            self._take_timer.cancel()
            self._take_timer = None
        holds, self._taking = self._taking, []
        self._taking_keys = set()
        if holds:
            self._take(holds)

    def _take(self, holds: Sequence[Hold]) -> None:
        """Agents took these from memory: store their dedup keys, then answer ``ok``."""
        items = [h.item for h in holds if h.item is not None]
        try:
            self.store.mark_seen([(i.sender, i.id, i.keep_until) for i in items])
        except StateError as exc:
            state_failed(f"cannot record {len(items)} message(s) as taken", exc)
            return  # unanswered: the sender sends them again (the agent may see them twice)
        self._answer(holds)
        self._received(items)

    def _store(self, holds: Sequence[Hold], *, keep: bool) -> None:
        """Store handed messages in the inbox and answer ``ok`` for them.

        ``keep``: the agent still holds them (its acknowledgement consumes the
        stored copy). What the inbox has no room for stays unanswered (the
        sender sends it again later) and, if kept, handed.
        """
        fits: list[Hold] = []
        count, size = self.count, self.bytes
        for hold in holds:
            if (
                receipt(
                    seen=False,
                    inbox_messages=count,
                    inbox_bytes=size,
                    size=hold.size,
                    limits=self.limits,
                )
                is Receipt.BUSY
            ):
                continue
            count += 1
            size += hold.size
            fits.append(hold)
        if not fits:
            return
        items = [h.item for h in fits if h.item is not None]
        try:
            seqs = self.store.receive(items, self.wall())
        except StateError as exc:
            state_failed(f"cannot store {len(items)} message(s) agents held", exc)
            return
        self.count, self.bytes = count, size
        self._answer(fits)
        if keep:
            for hold, seq in zip(fits, seqs, strict=True):
                self.handoffs.stored(hold, seq)
        self._received(items)

    def _answer(self, holds: Sequence[Hold]) -> None:
        by_peer: dict[str, list[str]] = {}
        for hold in holds:
            if hold.peer is not None and hold.item is not None:
                by_peer.setdefault(hold.peer, []).append(hold.item.id)
        for peer, ids in by_peer.items():
            self.answer(peer, ids)


def _everyone(reader: str | None) -> None:
    return None


def _head(receipt_number: int, item: Incoming, received: float) -> bytes:
    if item.room is None and item.agent is None:  # the usual entry: one pack, no keywords
        return local.DELIVER_PLAIN.pack(
            receipt_number,
            bytes.fromhex(item.id),
            item.sender.encode("ascii"),
            received,
            0,
            len(item.payload),
        )
    return local.deliver_entry_head(
        receipt_number,
        item.id,
        sender=item.sender,
        received=received,
        room=item.room,
        size=len(item.payload),
        agent=item.agent,
    )
