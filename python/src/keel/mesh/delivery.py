"""Delivery: the outbox state machine and the receiver's decision. Pure.

The shell stores every outgoing (message, recipient) pair durably *before*
it hands it to :class:`Outbox`, deletes it when the recipient acknowledges,
and moves it to the dead letters when :class:`Outbox` says it expired or was
refused for good. The outbox decides what to send when:

- per peer, in ``seq`` order, while the peer is connected and its window
  (messages and bytes in flight) has room;
- a message in flight gets an ack deadline; if it passes (or the session
  drops) the message is sent again, after a jittered exponential back-off;
- a ``busy`` answer (the receiver's inbox is full, or it lacks the room
  version) is retried after the same back-off: back-pressure across the mesh;
- past its TTL (wall clock) a message expires: a dead letter;
- the queue is bounded per peer and in total (messages and bytes): ``add``
  refuses with :class:`Backpressure` and the sender retries later.

The receiver stores a message and its id (the dedup key is the author and
the id) in one transaction *before* acknowledging it, and acknowledges a
duplicate without storing it again: each message reaches the receiving
application once, however often it is sent.

Two clocks come in as parameters: ``clock`` (monotonic seconds, for
timers) and ``wall`` (Unix seconds, for TTLs, which survive restarts).
"""

from __future__ import annotations

import enum
import heapq
import random as random_module
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from keel.errors import KeelError
from keel.mesh.packets import RoomStamp

DEFAULT_TTL: Final = 24 * 3600.0


class Backpressure(KeelError):
    """The outbox is full; the sender should slow down and retry."""


@dataclass(frozen=True)
class Limits:
    max_per_peer: int = 10_000
    max_total: int = 100_000
    max_bytes: int = 256 << 20
    window_messages: int = 4096
    window_bytes: int = 16 << 20
    ack_timeout: float = 10.0
    retry_base: float = 1.0
    retry_cap: float = 60.0

    def __post_init__(self) -> None:
        if min(self.max_per_peer, self.max_total, self.max_bytes) < 1:
            raise ValueError("outbox limits must be positive")
        if self.window_messages < 1 or self.window_bytes < 1:
            raise ValueError("window limits must be positive")
        if not 0 < self.retry_base <= self.retry_cap or self.ack_timeout <= 0:
            raise ValueError("retry_base, retry_cap and ack_timeout must be positive, base <= cap")


# Tuples, not dataclasses: one of each is made per message on the hot path.


class Queued(NamedTuple):
    """One message for one recipient: everything the outbox needs but the payload (a tuple)."""

    seq: int
    id: str
    peer: str
    topic: str
    room: str | None
    expires: float
    size: int
    agent: str | None = None  # the sending agent (None: the node itself), for the ledger
    to: str | None = None  # the agent it is for on the recipient (None: the topic's readers)


class OutboxRow(NamedTuple):
    id: str
    peer: str
    room: str | None
    topic: str
    expires: float
    stamp: RoomStamp | None  # a room message's, the same for every recipient
    payload: bytes | memoryview
    agent: str | None = None  # the sending agent (None: the node itself)
    to: str | None = None  # the agent it is for on the recipient (None: the node's topic)

    def __repr__(self) -> str:  # never the payload
        return f"OutboxRow(id={self.id!r}, peer={self.peer!r}, topic={self.topic!r})"

    def queued(self, seq: int) -> Queued:
        """What the outbox keeps of this row once it is stored as ``seq``."""
        return Queued(
            seq,
            self.id,
            self.peer,
            self.topic,
            self.room,
            self.expires,
            len(self.payload),
            self.agent,
            self.to,
        )


class Envelope(NamedTuple):
    """What the pump needs of a queued message besides its :class:`Queued` (cached or stored)."""

    payload: bytes | memoryview  # a view: of an agent's SEND frame (local.decode_send)
    stamp: RoomStamp | None
    agent: str | None = None
    to: str | None = None

    def __repr__(self) -> str:  # never the payload
        return f"Envelope(agent={self.agent!r}, to={self.to!r})"


class Incoming(NamedTuple):
    sender: str  # the author (dedup key with id)
    id: str
    room: str | None
    topic: str
    payload: bytes
    keep_until: float
    agent: str | None = None  # the sending agent, as its node stamped it
    to: str | None = None  # the agent of this node it is for (None: the topic's readers)

    def __repr__(self) -> str:  # never the payload
        return f"Incoming(sender={self.sender!r}, id={self.id!r}, topic={self.topic!r})"


class InboxMessage(NamedTuple):
    seq: int
    id: str
    sender: str
    room: str | None
    topic: str
    received: float
    payload: bytes
    agent: str | None = None
    to: str | None = None

    def __repr__(self) -> str:  # never the payload
        return f"InboxMessage(seq={self.seq}, id={self.id!r}, sender={self.sender!r})"


class _Phase(enum.Enum):
    READY = "ready"
    INFLIGHT = "inflight"
    WAITING = "waiting"


@dataclass(slots=True)
class _Entry:
    item: Queued
    phase: _Phase = _Phase.READY
    attempts: int = 0
    deadline: float = 0.0  # INFLIGHT: ack deadline; WAITING: retry time


@dataclass
class _Peer:
    connected: bool = False
    entries: dict[int, _Entry] = field(default_factory=dict)
    by_id: dict[str, int] = field(default_factory=dict)
    ready: list[int] = field(default_factory=list)  # heap of seq
    timers: list[tuple[float, int]] = field(default_factory=list)  # heap (deadline, seq)
    inflight: int = 0
    inflight_bytes: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Due:
    sends: list[Queued]
    expired: list[Queued]


class Outbox:
    def __init__(
        self,
        limits: Limits | None = None,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        random: Callable[[], float] = random_module.random,
    ) -> None:
        self.limits = limits or Limits()
        self.clock = clock
        self.wall = wall
        self.random = random
        self._peers: dict[str, _Peer] = {}
        self._expiry: list[tuple[float, str, int]] = []  # heap (expires, peer, seq)
        self._total = 0
        self._bytes = 0
        self._first_ack_timeout = float(min(self.limits.retry_cap, self.limits.ack_timeout))

    # -- queue

    def _peer(self, peer: str) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer()
        return state

    def check_batch(self, counts: Mapping[str, int], size: int) -> None:
        """``Backpressure`` unless ``counts[peer]`` more messages per peer (``size`` bytes) fit."""
        limits = self.limits
        total = sum(counts.values())
        if total > limits.max_total or size > limits.max_bytes:
            raise KeelError(
                f"a batch of {total} messages ({size} bytes) is more than the outbox holds "
                f"({limits.max_total} messages, {limits.max_bytes} bytes); send fewer at a time"
            )
        for peer, count in counts.items():
            if count > limits.max_per_peer:
                raise KeelError(
                    f"a batch of {count} messages for {peer} is more than the outbox holds "
                    f"for one peer ({limits.max_per_peer}); send fewer at a time"
                )
            state = self._peers.get(peer)
            queued = len(state.entries) if state else 0
            if queued + count > limits.max_per_peer:
                raise Backpressure(
                    f"outbox for {peer} is full ({queued} messages waiting): the peer is slow "
                    "or unreachable; retry later"
                )
        if self._total + total > limits.max_total:
            raise Backpressure(f"outbox is full ({self._total} messages waiting); retry later")
        if self._bytes + size > limits.max_bytes:
            raise Backpressure(
                f"outbox is full ({self._bytes} bytes waiting, limit {limits.max_bytes}); "
                "retry later"
            )

    def add(self, item: Queued, *, check: bool = True) -> None:
        """Queue ``item`` (already stored durably); ``check=False`` when restoring at start."""
        if check:
            self.check_batch({item.peer: 1}, item.size)
        state = self._peer(item.peer)
        if item.seq in state.entries or item.id in state.by_id:
            raise ValueError(f"message {item.id} for {item.peer} is queued already")
        state.entries[item.seq] = _Entry(item)
        state.by_id[item.id] = item.seq
        state.bytes += item.size
        heapq.heappush(state.ready, item.seq)
        heapq.heappush(self._expiry, (item.expires, item.peer, item.seq))
        self._total += 1
        self._bytes += item.size

    def add_many(self, items: Iterable[Queued | None]) -> None:
        """``add`` without the limits' check for items stored durably just now (None: skipped,
        one that was queued already): one pass, the per-peer state looked up once per run."""
        expiry, push = self._expiry, heapq.heappush
        peer = None
        state = _Peer()
        count = size = 0
        for item in items:
            if item is None:
                continue
            if item.peer != peer:
                peer = item.peer
                state = self._peer(peer)
            seq = item.seq
            if seq in state.entries or item.id in state.by_id:
                self._total += count
                self._bytes += size
                raise ValueError(f"message {item.id} for {item.peer} is queued already")
            state.entries[seq] = _Entry(item)
            state.by_id[item.id] = seq
            state.bytes += item.size
            push(state.ready, seq)
            push(expiry, (item.expires, peer, seq))
            count += 1
            size += item.size
        self._total += count
        self._bytes += size

    def _remove(self, state: _Peer, seq: int) -> Queued:
        entry = state.entries.pop(seq)
        del state.by_id[entry.item.id]
        if entry.phase is _Phase.INFLIGHT:
            state.inflight -= 1
            state.inflight_bytes -= entry.item.size
        state.bytes -= entry.item.size
        self._total -= 1
        self._bytes -= entry.item.size
        return entry.item

    # -- peers

    def connected(self, peer: str) -> None:
        self._peer(peer).connected = True

    def disconnected(self, peer: str) -> None:
        """The session to ``peer`` is gone: whatever was in flight goes again next time."""
        state = self._peers.get(peer)
        if state is None:
            return
        state.connected = False
        for seq, entry in state.entries.items():
            if entry.phase is _Phase.INFLIGHT:
                entry.phase = _Phase.READY
                heapq.heappush(state.ready, seq)
        state.inflight = state.inflight_bytes = 0

    # -- answers

    def _find(self, peer: str, ids: Iterable[str]) -> Iterable[tuple[_Peer, int]]:
        state = self._peers.get(peer)
        if state is None:
            return
        for message_id in ids:
            seq = state.by_id.get(message_id)
            if seq is not None:
                yield state, seq

    def acked(self, peer: str, ids: Iterable[str]) -> list[Queued]:
        """Delivered: forget them (the shell deletes them). Unknown ids are ignored."""
        return [self._remove(state, seq) for state, seq in list(self._find(peer, ids))]

    def rejected(self, peer: str, ids: Iterable[str]) -> list[Queued]:
        """Refused for good by the recipient: dead letters."""
        return self.acked(peer, ids)

    def busy(self, peer: str, ids: Iterable[str]) -> None:
        """Not now: try again after a back-off."""
        now = self.clock()
        for state, seq in list(self._find(peer, ids)):
            entry = state.entries[seq]
            if entry.phase is _Phase.INFLIGHT:
                state.inflight -= 1
                state.inflight_bytes -= entry.item.size
            entry.phase = _Phase.WAITING
            entry.deadline = now + self.backoff(entry.attempts)
            heapq.heappush(state.timers, (entry.deadline, seq))

    def drop(self, keep: Callable[[Queued], bool]) -> list[Queued]:
        """Remove every queued message that ``keep`` refuses (a removed peer or room member)."""
        dropped = []
        for state in self._peers.values():
            for seq in [s for s, e in state.entries.items() if not keep(e.item)]:
                dropped.append(self._remove(state, seq))
        return dropped

    def backoff(self, attempts: int) -> float:
        """Jittered exponential back-off: base * 2^(attempts-1), capped, times 0.5 to 1."""
        limits = self.limits
        delay = min(limits.retry_cap, limits.retry_base * 2 ** min(max(attempts - 1, 0), 30))
        return float(delay * (0.5 + self.random() / 2))

    # -- time

    def poll(self) -> Due:
        """What to send now, and what expired (removed from the outbox: dead letters)."""
        now, wall = self.clock(), self.wall()
        expired = []
        while self._expiry and self._expiry[0][0] <= wall:
            _, peer, seq = heapq.heappop(self._expiry)
            state = self._peers.get(peer)
            if state is not None and seq in state.entries:
                expired.append(self._remove(state, seq))
        sends: list[Queued] = []
        append = sends.append
        window_messages, window_bytes = self.limits.window_messages, self.limits.window_bytes
        first_timeout = self._first_ack_timeout
        for state in self._peers.values():
            while state.timers and state.timers[0][0] <= now:
                deadline, seq = heapq.heappop(state.timers)
                entry = state.entries.get(seq)
                if entry is None or entry.deadline != deadline or entry.phase is _Phase.READY:
                    continue
                if entry.phase is _Phase.INFLIGHT:
                    state.inflight -= 1
                    state.inflight_bytes -= entry.item.size
                entry.phase = _Phase.READY
                heapq.heappush(state.ready, seq)
            if not state.connected:
                continue
            ready, timers, entries = state.ready, state.timers, state.entries
            inflight, inflight_bytes = state.inflight, state.inflight_bytes
            # while the window is open (``_window_open``, on the counts kept here)
            while (
                ready
                and inflight < window_messages
                and (inflight == 0 or inflight_bytes < window_bytes)
            ):
                seq = heapq.heappop(ready)
                entry = entries.get(seq)
                if entry is None or entry.phase is not _Phase.READY:
                    continue
                entry.phase = _Phase.INFLIGHT
                attempts = entry.attempts = entry.attempts + 1
                deadline = entry.deadline = now + (
                    first_timeout if attempts == 1 else self._ack_timeout(attempts)
                )
                heapq.heappush(timers, (deadline, seq))
                item = entry.item
                inflight += 1
                inflight_bytes += item.size
                append(item)
            state.inflight, state.inflight_bytes = inflight, inflight_bytes
        return Due(sends, expired)

    def _window_open(self, state: _Peer) -> bool:
        limits = self.limits
        return state.inflight < limits.window_messages and (
            state.inflight == 0 or state.inflight_bytes < limits.window_bytes
        )

    def _ack_timeout(self, attempts: int) -> float:
        if attempts == 1:  # the usual case, without the arithmetic
            return self._first_ack_timeout
        limits = self.limits
        return float(min(limits.retry_cap, limits.ack_timeout * 2 ** min(attempts - 1, 30)))

    def next_deadline(self) -> float | None:
        """The monotonic time at which ``poll`` has something to do (None: nothing queued)."""
        now, wall = self.clock(), self.wall()
        candidates = []
        if self._expiry:
            candidates.append(now + max(0.0, self._expiry[0][0] - wall))
        for state in self._peers.values():
            if state.timers:
                candidates.append(state.timers[0][0])
            if state.connected and state.ready and self._window_open(state):
                candidates.append(now)
        return min(candidates) if candidates else None

    # -- inspection

    def __len__(self) -> int:
        return self._total

    @property
    def bytes(self) -> int:
        return self._bytes

    def queued(self, peer: str) -> int:
        state = self._peers.get(peer)
        return len(state.entries) if state else 0

    def items(self) -> list[Queued]:
        return sorted(
            (e.item for s in self._peers.values() for e in s.entries.values()),
            key=lambda item: item.seq,
        )


# ---------------------------------------------------------------- receiving


class Receipt(enum.Enum):
    STORE = "store"  # new: store it, then ack ok
    DUPLICATE = "duplicate"  # seen before: ack ok, store nothing
    BUSY = "busy"  # inbox full: ack busy, the sender backs off
    REJECT = "reject"  # never: ack rejected, the sender dead-letters it


@dataclass(frozen=True)
class InboxLimits:
    max_messages: int = 100_000
    max_bytes: int = 256 << 20
    dedup_grace: float = 7 * 24 * 3600.0  # seen ids are kept this long past their expiry


def receipt(
    *, seen: bool, inbox_messages: int, inbox_bytes: int, size: int, limits: InboxLimits
) -> Receipt:
    """The receiver's answer to one (authenticated, well-formed) incoming message."""
    if seen:
        return Receipt.DUPLICATE
    if inbox_messages >= limits.max_messages or inbox_bytes + size > limits.max_bytes:
        return Receipt.BUSY
    return Receipt.STORE


def keep_seen_until(expires: float, wall: float, limits: InboxLimits) -> float:
    """How long the dedup entry of a message must live: past any retry of it."""
    return max(expires, wall) + limits.dedup_grace
