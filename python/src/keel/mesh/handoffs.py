"""Who holds which received message, and who may be handed more. Pure, clocked.

A received message reaches an agent in one of two ways:

- **handed off** straight from memory to a subscribed stream that has room
  (not stored, not yet answered to its sender), under a *stream receipt*
  (top bit set, a random epoch: valid on that stream only, never again after
  a restart);
- **stored** in the inbox first, then handed to a stream under its inbox seq,
  or leased to a ``recv`` caller until a time.

Every handed message is a :class:`Hold` of a stream, in one of two phases,
and what happens to it is one transition of this table (in the manner of
h11's ``_state.py``), nowhere else::

    phase    event           next     what the shell does (Do)
    HANDED   ACKED           -        TAKE: store its dedup key, answer ok to its sender
    HANDED   HELD_TOO_LONG   STORED   STORE_KEPT: store it, answer ok; still the stream's
    HANDED   STREAM_CLOSED   -        STORE_FREED: store it, answer ok (up for grabs);
                                      if the inbox is full, forget it unanswered
                                      (its sender sends it again)
    STORED   ACKED           -        CONSUME: delete the stored copy
    STORED   STREAM_CLOSED   -        RELEASE: the stored copy is up for grabs again

A stream also has a window (at most ``max_unacked`` messages and, but for
the first, ``max_bytes`` bytes handed and not acknowledged) and a *backlog*
flag (the inbox may hold messages on its topic it was not handed). The
shell asks :meth:`Handoffs.holding` which stored seqs not to hand out again
(held by a stream, or leased by ``recv``), and carries out each step's
:class:`Steps`. Time comes from ``clock`` (monotonic seconds).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from keel.mesh.delivery import Incoming
from keel.mesh.errors import LocalProtocolError
from keel.mesh.local import STREAM_RECEIPTS

HOLD: Final = 1.0  # s an agent may hold a handed-off message before it is stored anyway
MAX_UNACKED: Final = 100_000  # the most a stream may ask to hold


class Phase(enum.Enum):
    HANDED = "handed"  # from memory: not stored, not answered
    STORED = "stored"  # in the inbox, answered; the stream's until it acknowledges


class Event(enum.Enum):
    ACKED = "acked"
    HELD_TOO_LONG = "held too long"
    STREAM_CLOSED = "stream closed"


class Do(enum.Enum):
    TAKE = "take"
    STORE_KEPT = "store, kept"
    STORE_FREED = "store, freed"
    CONSUME = "consume"
    RELEASE = "release"


TRANSITIONS: Final[Mapping[tuple[Phase, Event], tuple[Phase | None, Do]]] = {
    (Phase.HANDED, Event.ACKED): (None, Do.TAKE),
    (Phase.HANDED, Event.HELD_TOO_LONG): (Phase.STORED, Do.STORE_KEPT),
    (Phase.HANDED, Event.STREAM_CLOSED): (None, Do.STORE_FREED),
    (Phase.STORED, Event.ACKED): (None, Do.CONSUME),
    (Phase.STORED, Event.STREAM_CLOSED): (None, Do.RELEASE),
}


def step(phase: Phase, event: Event) -> tuple[Phase | None, Do]:
    """The next phase (None: the hold ends) and what to do; ``LocalProtocolError`` if none."""
    try:
        return TRANSITIONS[phase, event]
    except KeyError:
        raise LocalProtocolError(f"a {phase.value} message cannot be {event.value}") from None


@dataclass(slots=True, eq=False)
class Hold:
    """One message a stream holds."""

    receipt: int  # what the stream knows it by
    stream: int
    phase: Phase
    size: int
    since: float  # when it was handed
    item: Incoming | None = None  # HANDED: the message itself
    peer: str | None = None  # HANDED: whose connection brought it (the answer goes there)
    seq: int | None = None  # STORED: its inbox seq


class Window(NamedTuple):
    """A subscriber as a batch plan sees it (:mod:`keel.mesh.inbound`)."""

    stream: int
    pending: int
    pending_bytes: int
    max_unacked: int
    max_bytes: int
    backlog: bool
    reader: str | None = None  # the subscribing agent (None: the node itself)
    senders: Sequence[str] | None = None  # the agent's receiveFrom (None: everyone)


def has_room(pending: int, pending_bytes: int, max_unacked: int, max_bytes: int) -> bool:
    """Whether a stream may be handed one more message (the first always fits)."""
    return pending < max_unacked and (pending == 0 or pending_bytes < max_bytes)


@dataclass(slots=True, eq=False)
class _Stream:
    topic: str | None = None
    reader: str | None = None  # the agent that subscribed (None: the node itself)
    senders: Sequence[str] | None = None  # whose messages it may read (None: everyone's)
    max_unacked: int = 0
    max_bytes: int = 0
    backlog: bool = False  # the inbox may hold messages for it that it was not handed
    held: dict[int, Hold] = field(default_factory=dict)  # receipt -> hold
    bytes: int = 0


@dataclass
class Steps:
    """What the shell carries out after an event, grouped by :class:`Do`."""

    take: list[Hold] = field(default_factory=list)  # store dedup keys, answer ok
    store_kept: list[Hold] = field(default_factory=list)  # store, answer ok, then stored()
    store_freed: list[Hold] = field(default_factory=list)  # store (room allowing), answer ok
    consume: list[int] = field(default_factory=list)  # inbox seqs to delete
    release: list[int] = field(default_factory=list)  # inbox seqs up for grabs again

    def add(self, do: Do, hold: Hold) -> None:
        if do is Do.TAKE:
            self.take.append(hold)
        elif do is Do.STORE_KEPT:
            self.store_kept.append(hold)
        elif do is Do.STORE_FREED:
            self.store_freed.append(hold)
        elif do is Do.CONSUME:
            assert hold.seq is not None
            self.consume.append(hold.seq)
        else:
            assert hold.seq is not None
            self.release.append(hold.seq)


class Handoffs:
    """Streams, what each holds, and ``recv``'s leases (see the module's docstring)."""

    def __init__(self, *, clock: Callable[[], float], epoch: int, hold: float = HOLD) -> None:
        self.clock = clock
        self.hold = hold
        self._receipts = itertools.count(STREAM_RECEIPTS | (epoch & 0x7FFF_FFFF) << 32)
        self._streams: dict[int, _Stream] = {}
        self._topics: dict[str, list[int]] = {}  # subscribers by topic, in subscription order
        self._handed: dict[tuple[str, str], Hold] = {}  # HANDED, by (author, id)
        self._stored: dict[int, Hold] = {}  # STORED, by inbox seq
        self._leases: dict[int, float] = {}  # inbox seq -> end of its recv lease

    # -- streams

    def open(self, stream: int) -> None:
        """A new stream (it subscribes later, or never: a sender)."""
        self._streams[stream] = _Stream()

    def subscribe(
        self,
        stream: int,
        topic: str,
        *,
        max_unacked: int,
        max_bytes: int,
        reader: str | None = None,
        senders: Sequence[str] | None = None,
    ) -> None:
        """``stream`` takes ``topic``'s messages from now on (once per stream): those for no
        agent and, if ``reader`` is an agent, those for it; from ``senders`` only (the
        agent's receiveFrom, None: everyone)."""
        state = self._streams[stream]
        if state.topic is not None:
            raise LocalProtocolError("a stream subscribes once")
        state.topic = topic
        state.reader = reader
        state.senders = senders
        state.max_unacked = max(1, min(max_unacked, MAX_UNACKED))
        state.max_bytes = max(1, max_bytes)
        state.backlog = True
        self._topics.setdefault(topic, []).append(stream)

    def topic(self, stream: int) -> str | None:
        return self._streams[stream].topic

    def subscribers(self, topic: str) -> list[int]:
        return list(self._topics.get(topic, ()))

    def has_room(self, stream: int) -> bool:
        state = self._streams[stream]
        return has_room(len(state.held), state.bytes, state.max_unacked, state.max_bytes)

    def room(self, stream: int) -> int:
        """How many more messages the stream may be handed (by count alone)."""
        state = self._streams[stream]
        return max(0, state.max_unacked - len(state.held))

    def backlog(self, stream: int) -> bool:
        return self._streams[stream].backlog

    def set_backlog(self, streams: Iterable[int], backlog: bool = True) -> None:
        for stream in streams:
            self._streams[stream].backlog = backlog

    def windows(self, topics: Iterable[str]) -> dict[str, list[Window]]:
        """The subscribers of ``topics`` as a batch plan needs them."""
        out: dict[str, list[Window]] = {}
        for topic in topics:
            subscribed = self._topics.get(topic)
            if subscribed:
                out[topic] = [self._window(stream) for stream in subscribed]
        return out

    def _window(self, stream: int) -> Window:
        state = self._streams[stream]
        return Window(
            stream,
            len(state.held),
            state.bytes,
            state.max_unacked,
            state.max_bytes,
            state.backlog,
            state.reader,
            state.senders,
        )

    def reader(self, stream: int) -> str | None:
        """The agent that subscribed ``stream`` (None: the node itself)."""
        return self._streams[stream].reader

    # -- handing out

    def hand(self, stream: int, item: Incoming, peer: str) -> int:
        """Hand ``item`` (from memory) to ``stream``; its stream receipt."""
        receipt = next(self._receipts)
        hold = Hold(receipt, stream, Phase.HANDED, len(item.payload), self.clock(), item, peer)
        self._handed[item.sender, item.id] = hold
        self._keep(hold)
        return hold.receipt

    def hand_all(self, pairs: Sequence[tuple[int, Incoming]], peer: str) -> list[int]:
        """:meth:`hand` each ``(stream, item)`` of a batch from ``peer``; their receipts."""
        receipts = self._receipts
        handed = self._handed
        streams = self._streams
        now = self.clock()
        out: list[int] = []
        for stream, item in pairs:
            receipt = next(receipts)
            size = len(item.payload)
            hold = Hold(receipt, stream, Phase.HANDED, size, now, item, peer)
            handed[item.sender, item.id] = hold
            state = streams[stream]
            state.held[receipt] = hold
            state.bytes += size
            out.append(receipt)
        return out

    def hand_stored(self, stream: int, seq: int, size: int) -> int:
        """Hand the stored message ``seq`` to ``stream``; its receipt is its seq."""
        hold = Hold(seq, stream, Phase.STORED, size, self.clock(), seq=seq)
        self._stored[seq] = hold
        self._keep(hold)
        return seq

    def _keep(self, hold: Hold) -> None:
        state = self._streams[hold.stream]
        state.held[hold.receipt] = hold
        state.bytes += hold.size

    def handed(self) -> Container[tuple[str, str]]:
        """The (author, id) of messages streams hold from memory (a copy is answered with them)."""
        return self._handed.keys()

    def holds(self, seq: int, now: float) -> bool:
        """Whether the stored message ``seq`` is not to be handed out at ``now``."""
        if seq in self._stored:
            return True
        end = self._leases.get(seq)
        return end is not None and end > now

    def holding(self) -> Container[int]:
        """Stored seqs not to hand out now (:meth:`holds`), for the store's ``take``."""
        return _Holding(self, self.clock())

    def lease(self, seqs: Iterable[int], until: float) -> None:
        for seq in seqs:
            self._leases[seq] = until

    def expire_leases(self) -> bool:
        """Forget leases that ran out; True if any did (their messages are up for grabs)."""
        now = self.clock()
        before = len(self._leases)
        self._leases = {seq: end for seq, end in self._leases.items() if end > now}
        return len(self._leases) != before

    # -- events

    def acked(self, stream: int, receipts: Sequence[int]) -> Steps:
        """An agent's ACK on ``stream``.

        A receipt below :data:`STREAM_RECEIPTS` names a stored message: it is
        consumed whoever held it (receipts stay valid across reconnects). A
        stream receipt counts only on the stream it was handed on.
        """
        steps = Steps()
        state = self._streams[stream]
        held, handed, take = state.held, self._handed, steps.take
        for receipt in receipts:
            hold = held.get(receipt)
            if hold is None:
                if receipt < STREAM_RECEIPTS:
                    steps.consume.append(receipt)
                continue  # another stream's, or stale: not this agent's to acknowledge
            if hold.phase is Phase.HANDED:  # the table's (HANDED, ACKED) row, written out:
                item = hold.item  # forgotten (as _forget does), then TAKE
                if item is not None:
                    handed.pop((item.sender, item.id), None)
                del held[receipt]
                state.bytes -= hold.size
                take.append(hold)
                continue
            self._apply(hold, Event.ACKED, steps)
        return steps

    def due(self) -> Steps:
        """Messages handed from memory and held for ``hold`` seconds: to store, still held."""
        steps = Steps()
        deadline = self.clock() - self.hold
        for hold in list(self._handed.values()):  # in the order they were handed
            if hold.since > deadline:
                break
            self._apply(hold, Event.HELD_TOO_LONG, steps)
        return steps

    def next_deadline(self) -> float | None:
        """When :meth:`due` has something (None: nothing handed from memory)."""
        for hold in self._handed.values():  # the first is the oldest
            return hold.since + self.hold
        return None

    def closed(self, stream: int) -> Steps:
        """``stream`` went away: what it held goes back (or is stored)."""
        steps = Steps()
        state = self._streams.pop(stream)
        for hold in list(state.held.values()):
            self._apply(hold, Event.STREAM_CLOSED, steps)
        if state.topic is not None:
            subscribed = self._topics[state.topic]
            subscribed.remove(stream)
            if not subscribed:
                del self._topics[state.topic]
        return steps

    def _apply(self, hold: Hold, event: Event, steps: Steps) -> None:
        after, do = TRANSITIONS.get((hold.phase, event)) or step(hold.phase, event)
        if after is None:
            self._forget(hold)
        # else STORE_KEPT: it becomes STORED once the shell stored it (stored()); until
        # then (the inbox is full) it stays handed and is due again.
        steps.add(do, hold)

    # -- what the shell reports back

    def stored(self, hold: Hold, seq: int) -> None:
        """A STORE_KEPT message is in the inbox now, as ``seq``: the stream holds it STORED."""
        if hold.phase is not Phase.HANDED or hold.item is None:
            raise LocalProtocolError(f"receipt {hold.receipt} is not a message handed from memory")
        del self._handed[hold.item.sender, hold.item.id]
        hold.phase, hold.seq, hold.item, hold.peer = Phase.STORED, seq, None, None
        self._stored[seq] = hold

    def consumed(self, seqs: Iterable[int]) -> None:
        """Stored messages deleted (acknowledged): no hold or lease on them is left."""
        for seq in seqs:
            self._leases.pop(seq, None)
            hold = self._stored.get(seq)
            if hold is not None:
                self._forget(hold)

    def _forget(self, hold: Hold) -> None:
        if hold.item is not None:
            self._handed.pop((hold.item.sender, hold.item.id), None)
        if hold.seq is not None and self._stored.get(hold.seq) is hold:
            del self._stored[hold.seq]
        state = self._streams.get(hold.stream)
        if state is not None and state.held.pop(hold.receipt, None) is hold:
            state.bytes -= hold.size


class _Holding(Container[int]):
    __slots__ = ("handoffs", "now")

    def __init__(self, handoffs: Handoffs, now: float) -> None:
        self.handoffs = handoffs
        self.now = now

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, int) and self.handoffs.holds(seq, self.now)
