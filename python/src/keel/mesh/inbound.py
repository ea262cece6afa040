"""What to do with a batch of messages a peer sent. Pure.

Messages that arrive together (in one read of a connection) are decided
together, so the shell stores them in one transaction and answers them in
one ACK. For each message, in order:

- a room message is checked (:func:`keel.mesh.rooms.check_message`): refused
  for good (``rejected``, with the reason), or not yet (``busy``: this node
  lacks the room version its author saw);
- a message for an agent (``to``) is refused for good (``rejected``) if this
  node has no such agent, or the agent may not read its topic or receive
  from its sender (``addressable``);
- its dedup key is the author (the room message's author, else the peer) and
  the id; a copy of a message a local agent holds from memory is left
  unanswered (it is answered with the one held);
- seen before (stored earlier, or earlier in this batch): ``ok``, nothing
  stored again; the inbox full: ``busy`` (the sender backs off);
- new: handed straight to a subscriber of its topic (the agent it is for,
  if it names one; for a room message, an agent in the room) that has room
  and no backlog and may receive from its sender (the subscribing agent's
  ``receiveFrom``; answered once the agent
  took it: :mod:`keel.mesh.handoffs`), or else stored (``store``) and
  answered ``ok``.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field

from keel.agents.meshgrant import matches
from keel.mesh import rooms
from keel.mesh.delivery import InboxLimits, Incoming
from keel.mesh.handoffs import Window, has_room
from keel.mesh.membership import View
from keel.mesh.packets import Msg

Key = tuple[str, str]  # (author, message id)
Sender = tuple[str, "str | None"]  # (node, agent or None: the node itself)
Addressable = Callable[[str, str, Sender], "str | None"]  # (agent, topic, sender) -> why not


@dataclass
class Plan:
    ok: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    store: list[Incoming] = field(default_factory=list)  # new: store, then ``ok`` (listed)
    hand: list[tuple[int, Incoming]] = field(default_factory=list)  # (stream, message)
    backlogged: set[int] = field(default_factory=set)  # streams that have more waiting, stored
    inbox_messages: int = 0  # the inbox once ``store`` is stored
    inbox_bytes: int = 0


def keys(messages: Sequence[Msg], peer: str) -> list[Key]:
    """The dedup keys of ``messages`` from ``peer`` (for the store's ``seen_among``)."""
    return [(msg.room.author if msg.room else peer, msg.id) for msg in messages]


def plan(
    messages: Sequence[Msg],
    *,
    peer: str,
    me: str,
    view: View,
    seen: Container[Key],
    handed: Container[Key],
    inbox: tuple[int, int],
    limits: InboxLimits,
    windows: Mapping[str, Sequence[Window]],
    wall: float,
    addressable: Addressable | None = None,
    room_reads: Callable[[str, str], bool] | None = None,
    taken: Container[Key] = frozenset(),
) -> Plan:
    """Decide on ``messages`` from ``peer`` (see the module's docstring).

    ``seen``: the keys among them stored before; ``handed``: the keys of
    messages local agents hold from memory; ``taken``: those they took from
    memory, not yet marked seen (both left unanswered); ``inbox``: (messages, bytes) stored now;
    ``windows``: the subscribers of the batch's topics; ``addressable``:
    why a message for an agent cannot be taken (None: it can), None: no
    agent here takes any; ``room_reads(room, agent)``: whether a subscribed agent may
    read the room's messages (None: every agent may).
    """
    out = Plan()
    count, size = inbox
    this_batch: set[Key] = set()
    takers = _Takers(windows, room_reads)
    # Per message only what differs between messages: the limits, lists and lookups are
    # bound once (receipt() and keep_seen_until() are written out below, as they are).
    max_messages, max_bytes, grace = limits.max_messages, limits.max_bytes, limits.dedup_grace
    ok, busy, rejected, store, hand = out.ok, out.busy, out.rejected, out.store, out.hand
    take = takers.take if windows else None
    new_item = tuple.__new__  # Incoming(...) without its Python-level __new__
    for msg in messages:
        message_id, topic, expires, payload, stamp, agent, to = msg
        author = peer
        if stamp is not None:
            check = rooms.check_message(view, me, msg)
            if check.verdict is rooms.RoomVerdict.REJECT:
                rejected.append((message_id, check.reason))
                continue
            if check.verdict is rooms.RoomVerdict.BUSY:
                busy.append(message_id)
                continue
            author = stamp.author
        if to is not None:
            refusal = (
                f"no agent {to} here"
                if addressable is None
                else addressable(to, topic, (author, agent))
            )
            if refusal is not None:
                rejected.append((message_id, refusal))
                continue
        key = (author, message_id)
        if key in handed or key in taken:
            continue
        length = len(payload)
        if key in this_batch or key in seen:  # Receipt.DUPLICATE
            ok.append(message_id)
            continue
        if count >= max_messages or size + length > max_bytes:  # Receipt.BUSY
            busy.append(message_id)
            continue
        this_batch.add(key)
        room = stamp.room if stamp is not None else None
        item: Incoming = new_item(
            Incoming,
            (author, message_id, room, topic, payload, max(expires, wall) + grace, agent, to),
        )
        stream = take(topic, length, to, (author, agent), room) if take is not None else None
        if stream is not None:
            hand.append((stream, item))
            continue
        ok.append(message_id)
        store.append(item)
        count += 1
        size += length
        if topic in windows:
            out.backlogged.update(takers.could_take(topic, to, (author, agent), room))
    out.inbox_messages, out.inbox_bytes = count, size
    return out


class _Takers:
    """The subscribers of each topic, filled as the plan hands them messages."""

    def __init__(
        self,
        windows: Mapping[str, Sequence[Window]],
        room_reads: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.windows = windows
        self.room_reads = room_reads  # (room, agent) -> whether the agent reads the room
        self.held: dict[int, list[int]] = {}  # stream -> [messages, bytes] held, this batch's too
        # The subscribers without backlog that may take a message, by (topic, to, sender,
        # room): the same for the batch's every message alike (a batch is mostly one kind).
        self._takers: dict[tuple[str, str | None, Sender | None, str | None], list[Window]] = {}

    def take(
        self,
        topic: str,
        size: int,
        to: str | None = None,
        sender: Sender | None = None,
        room: str | None = None,
    ) -> int | None:
        """The first subscriber of ``topic`` (the agent ``to``, if not None; an agent in
        ``room``, if not None) with room and no backlog that may receive from ``sender``,
        charged ``size``."""
        kind = (topic, to, sender, room)
        takers = self._takers.get(kind)
        if takers is None:
            takers = self._takers[kind] = [
                w
                for w in self.windows.get(topic, ())
                if not w.backlog and self._may_take(w, to, sender, room)
            ]
        for window in takers:
            held = self.held.get(window.stream)
            if held is None:
                held = self.held[window.stream] = [window.pending, window.pending_bytes]
            if has_room(held[0], held[1], window.max_unacked, window.max_bytes):
                held[0] += 1
                held[1] += size
                return window.stream
        return None

    def could_take(
        self, topic: str, to: str | None, sender: Sender, room: str | None = None
    ) -> list[int]:
        """The subscribers of ``topic`` that may read a message for ``to`` from ``sender``
        (of ``room``): those to fill from the inbox once they have room (a message one of
        them may not read leaves it as it was, or it would wait on a backlog it cannot take)."""
        return [
            w.stream for w in self.windows.get(topic, ()) if self._may_take(w, to, sender, room)
        ]

    def _may_take(
        self, window: Window, to: str | None, sender: Sender | None, room: str | None
    ) -> bool:
        """``_may_take``, and for a room message: the window's agent is in the room."""
        if not _may_take(window, to, sender):
            return False
        return (
            room is None
            or window.reader is None
            or self.room_reads is None
            or self.room_reads(room, window.reader)
        )


def _may_take(window: Window, to: str | None, sender: Sender | None) -> bool:
    """Whether ``window``'s reader may read a message for ``to`` (None: the topic's
    readers) from ``sender`` (its receiveFrom)."""
    if to is not None and window.reader != to:
        return False
    return window.senders is None or sender is None or matches(window.senders, *sender)
