"""The outbox state machine, the receiver's decision, and exactly-once over a hostile channel."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.errors import KeelError
from keel.mesh.delivery import (
    Backpressure,
    InboxLimits,
    Limits,
    Outbox,
    Queued,
    Receipt,
    keep_seen_until,
    receipt,
)
from keel.testing import FakeClock

WALL0 = 1_700_000_000.0


class Clocks:
    def __init__(self) -> None:
        self.mono = FakeClock(100.0)
        self.wall_clock = FakeClock(WALL0)

    def advance(self, seconds: float) -> None:
        self.mono.advance(seconds)
        self.wall_clock.advance(seconds)


def outbox(clocks: Clocks, **limits: int | float) -> Outbox:
    return Outbox(Limits(**limits), clock=clocks.mono, wall=clocks.wall_clock, random=lambda: 0.5)  # type: ignore[arg-type]


def item(
    seq: int, peer: str = "p", size: int = 10, ttl: float = 3600.0, room: str | None = None
) -> Queued:
    return Queued(seq, f"{seq:032x}", peer, "t", room, WALL0 + ttl, size)


def test_nothing_is_sent_until_the_peer_is_connected() -> None:
    clocks = Clocks()
    box = outbox(clocks)
    box.add(item(1))
    assert box.poll().sends == []
    box.connected("p")
    assert [i.seq for i in box.poll().sends] == [1]
    assert box.poll().sends == []  # in flight: not twice


def test_ack_removes_and_unknown_ids_are_ignored() -> None:
    clocks = Clocks()
    box = outbox(clocks)
    box.connected("p")
    box.add(item(1))
    box.add(item(2))
    box.poll()
    done = box.acked("p", [item(1).id, "f" * 32])
    assert [i.seq for i in done] == [1]
    assert len(box) == 1
    assert box.acked("other", [item(2).id]) == []


def test_window_limits_messages_in_flight() -> None:
    clocks = Clocks()
    box = outbox(clocks, window_messages=2)
    box.connected("p")
    for seq in range(1, 6):
        box.add(item(seq))
    assert [i.seq for i in box.poll().sends] == [1, 2]
    box.acked("p", [item(1).id])
    assert [i.seq for i in box.poll().sends] == [3]


def test_window_bytes_still_lets_one_big_message_through() -> None:
    clocks = Clocks()
    box = outbox(clocks, window_bytes=100)
    box.connected("p")
    box.add(item(1, size=500))
    box.add(item(2, size=10))
    assert [i.seq for i in box.poll().sends] == [1]
    assert box.poll().sends == []
    box.acked("p", [item(1).id])
    assert [i.seq for i in box.poll().sends] == [2]


def test_a_dropped_session_resends_in_flight_messages_in_order() -> None:
    clocks = Clocks()
    box = outbox(clocks)
    box.connected("p")
    for seq in (1, 2, 3):
        box.add(item(seq))
    box.poll()
    box.acked("p", [item(2).id])
    box.disconnected("p")
    assert box.poll().sends == []
    box.connected("p")
    assert [i.seq for i in box.poll().sends] == [1, 3]


def test_ack_timeout_resends_with_growing_delay() -> None:
    clocks = Clocks()
    box = outbox(clocks, ack_timeout=2.0, retry_cap=5.0)
    box.connected("p")
    box.add(item(1))
    assert box.poll().sends
    clocks.advance(1.9)
    assert box.poll().sends == []
    clocks.advance(0.2)
    assert [i.seq for i in box.poll().sends] == [1]  # second attempt, timeout now 4 s
    clocks.advance(3.9)
    assert box.poll().sends == []
    clocks.advance(0.2)
    assert box.poll().sends
    clocks.advance(5.1)  # capped at 5 s
    assert box.poll().sends


def test_busy_backs_off_then_retries() -> None:
    clocks = Clocks()
    box = outbox(clocks, retry_base=1.0)
    box.connected("p")
    box.add(item(1))
    box.poll()
    box.busy("p", [item(1).id])
    deadline = box.next_deadline()
    assert deadline is not None
    assert deadline == pytest.approx(clocks.mono() + 0.75)
    assert box.poll().sends == []
    clocks.advance(0.8)
    assert [i.seq for i in box.poll().sends] == [1]


def test_backoff_is_jittered_and_capped() -> None:
    clocks = Clocks()
    values = iter([0.0, 0.999, 0.0, 0.999])
    box = Outbox(
        Limits(retry_base=1.0, retry_cap=8.0),
        clock=clocks.mono,
        wall=clocks.wall_clock,
        random=lambda: next(values),
    )
    assert box.backoff(1) == pytest.approx(0.5)
    assert box.backoff(3) == pytest.approx(4 * 0.9995)
    assert box.backoff(10) == pytest.approx(4.0)
    assert box.backoff(10) == pytest.approx(8 * 0.9995)


def test_expired_messages_become_dead_letters_even_in_flight() -> None:
    clocks = Clocks()
    box = outbox(clocks)
    box.connected("p")
    box.add(item(1, ttl=10))
    box.add(item(2, ttl=100))
    box.poll()
    deadline = box.next_deadline()
    assert deadline is not None
    assert deadline <= clocks.mono() + 10
    clocks.advance(11)
    due = box.poll()
    assert [i.seq for i in due.expired] == [1]
    assert box.acked("p", [item(1).id]) == []  # a late ack changes nothing
    assert len(box) == 1


def test_backpressure_per_peer_total_and_bytes() -> None:
    clocks = Clocks()
    box = outbox(clocks, max_per_peer=2, max_total=3, max_bytes=1000)
    box.add(item(1, "p"))
    box.add(item(2, "p"))
    with pytest.raises(Backpressure, match="outbox for p is full"):
        box.add(item(3, "p"))
    box.add(item(4, "q"))
    with pytest.raises(Backpressure, match="3 messages waiting"):
        box.add(item(5, "r"))
    with pytest.raises(Backpressure, match="bytes"):
        box.check_batch({"r": 0}, 1000 - box.bytes + 1)
    # a batch that could never fit is refused for good, not "later"
    for counts, size in (({"r": 3}, 10), ({"r": 1, "s": 1, "t": 2}, 10), ({"r": 1}, 1001)):
        with pytest.raises(KeelError, match="more than the outbox holds") as never:
            box.check_batch(counts, size)
        assert not isinstance(never.value, Backpressure)
    box.acked("p", [item(1).id])
    box.add(item(6, "r"))
    box.add(item(7, "z", size=5), check=False)  # restoring at start is never refused
    assert len(box) == 4


def test_drop_removes_what_the_predicate_refuses() -> None:
    clocks = Clocks()
    box = outbox(clocks)
    box.connected("p")
    box.add(item(1, "p", room="r1"))
    box.add(item(2, "p"))
    box.add(item(3, "q", room="r1"))
    box.poll()
    dropped = box.drop(lambda i: i.room is None)
    assert sorted(i.seq for i in dropped) == [1, 3]
    assert [i.seq for i in box.items()] == [2]


def test_duplicates_are_refused_by_the_core() -> None:
    clocks = Clocks()
    box = outbox(clocks)
    box.add(item(1))
    with pytest.raises(ValueError, match="queued already"):
        box.add(item(1))


def test_next_deadline_idle_and_limits_validation() -> None:
    clocks = Clocks()
    box = outbox(clocks)
    assert box.next_deadline() is None
    with pytest.raises(ValueError):
        Limits(window_messages=0)
    with pytest.raises(ValueError):
        Limits(retry_base=10, retry_cap=1)


def test_receiver_decision_and_dedup_retention() -> None:
    limits = InboxLimits(max_messages=2, max_bytes=100, dedup_grace=50)
    assert (
        receipt(seen=True, inbox_messages=5, inbox_bytes=500, size=1, limits=limits)
        is Receipt.DUPLICATE
    )
    assert (
        receipt(seen=False, inbox_messages=2, inbox_bytes=0, size=1, limits=limits) is Receipt.BUSY
    )
    assert (
        receipt(seen=False, inbox_messages=0, inbox_bytes=90, size=20, limits=limits)
        is Receipt.BUSY
    )
    assert (
        receipt(seen=False, inbox_messages=1, inbox_bytes=10, size=20, limits=limits)
        is Receipt.STORE
    )
    assert keep_seen_until(200.0, 100.0, limits) == 250.0
    assert keep_seen_until(100.0, 300.0, limits) == 350.0  # expiry in the past: from now


# ------------------------------------------------------------ exactly once


@dataclass
class World:
    """A sender's outbox, a receiver with a durable dedup set and inbox, a lossy session."""

    clocks: Clocks
    box: Outbox
    rng: random.Random
    durable: dict[str, Queued] = field(default_factory=dict)  # the sender's SQLite outbox
    seen: set[str] = field(default_factory=set)  # the receiver's dedup table
    inbox: list[str] = field(default_factory=list)
    app: Counter[str] = field(default_factory=Counter)
    to_receiver: list[str] = field(default_factory=list)
    to_sender: list[tuple[str, str]] = field(default_factory=list)  # (id, "ok"|"busy")
    up: bool = False
    next_seq: int = 1
    sent_ids: list[str] = field(default_factory=list)

    def send(self) -> None:
        new = item(self.next_seq, ttl=10**6)
        self.next_seq += 1
        try:
            self.box.check_batch({"p": 1}, new.size)
        except Backpressure:
            return
        self.durable[new.id] = new
        self.box.add(new, check=False)
        self.sent_ids.append(new.id)

    def connect(self) -> None:
        if not self.up:
            self.up = True
            self.box.connected("p")

    def drop_session(self) -> None:
        if self.up:
            self.up = False
            self.to_receiver.clear()
            self.to_sender.clear()
            self.box.disconnected("p")

    def crash_sender(self) -> None:
        self.drop_session()
        self.box = outbox(self.clocks, max_per_peer=50, window_messages=8)
        for entry in sorted(self.durable.values(), key=lambda i: i.seq):
            self.box.add(entry, check=False)

    def pump(self) -> None:
        due = self.box.poll()
        assert not due.expired
        for sent in due.sends:
            assert self.up, "the outbox sent to a peer that is not connected"
            self.to_receiver.append(sent.id)

    def deliver(self, count: int) -> None:
        for _ in range(min(count, len(self.to_receiver))):
            message_id = self.to_receiver.pop(0)
            answer = receipt(
                seen=message_id in self.seen,
                inbox_messages=len(self.inbox),
                inbox_bytes=0,
                size=10,
                limits=InboxLimits(max_messages=5),
            )
            if answer is Receipt.STORE:
                self.seen.add(message_id)
                self.inbox.append(message_id)
            self.to_sender.append((message_id, "busy" if answer is Receipt.BUSY else "ok"))

    def acks(self, count: int) -> None:
        for _ in range(min(count, len(self.to_sender))):
            message_id, kind = self.to_sender.pop(0)
            if kind == "ok":
                for done in self.box.acked("p", [message_id]):
                    del self.durable[done.id]
            else:
                self.box.busy("p", [message_id])

    def consume(self) -> None:
        for message_id in self.inbox:
            self.app[message_id] += 1
        self.inbox.clear()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "send",
                "send",
                "send",
                "connect",
                "drop",
                "crash",
                "pump",
                "deliver",
                "acks",
                "consume",
                "tick",
                "tick_long",
            ]
        ),
        max_size=120,
    ),
    st.integers(0, 2**32),
)
def test_every_message_reaches_the_application_exactly_once(actions: list[str], seed: int) -> None:
    clocks = Clocks()
    world = World(clocks, outbox(clocks, max_per_peer=50, window_messages=8), random.Random(seed))
    for action in actions:
        if action == "send":
            world.send()
        elif action == "connect":
            world.connect()
        elif action == "drop":
            world.drop_session()
        elif action == "crash":
            world.crash_sender()
        elif action == "pump":
            world.pump()
        elif action == "deliver":
            world.deliver(world.rng.randint(1, 5))
        elif action == "acks":
            world.acks(world.rng.randint(1, 5))
        elif action == "consume":
            world.consume()
        elif action == "tick":
            clocks.advance(world.rng.uniform(0, 3))
        else:
            clocks.advance(world.rng.uniform(10, 100))
    # the network heals and stays up: everything drains
    world.connect()
    for _ in range(2000):
        world.pump()
        world.deliver(100)
        world.acks(100)
        world.consume()
        if not world.durable:
            break
        deadline = world.box.next_deadline()
        if deadline is not None and deadline > clocks.mono():
            clocks.advance(deadline - clocks.mono())
    assert not world.durable, "some messages were never acknowledged"
    assert set(world.app) == set(world.sent_ids)
    assert all(count == 1 for count in world.app.values())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("pqr"), st.integers(0, 100), st.booleans()), max_size=30))
def test_adding_many_at_once_is_adding_each(rows: list[tuple[str, int, bool]]) -> None:
    items = [item(seq, peer, size) for seq, (peer, size, _) in enumerate(rows, 1)]
    batch = [None if skipped else i for i, (_, _, skipped) in zip(items, rows, strict=True)]
    one_by_one, at_once = outbox(Clocks()), outbox(Clocks())
    for queued in batch:
        if queued is not None:
            one_by_one.add(queued, check=False)
    at_once.add_many(batch)
    for box in (one_by_one, at_once):
        box.connected("p")
        box.connected("q")
    assert (len(at_once), at_once.bytes) == (len(one_by_one), one_by_one.bytes)
    assert at_once.items() == one_by_one.items()
    assert [at_once.queued(p) for p in "pqr"] == [one_by_one.queued(p) for p in "pqr"]
    assert at_once.poll() == one_by_one.poll()


def test_adding_many_refuses_one_queued_already_and_counts_what_it_added() -> None:
    box = outbox(Clocks())
    box.add(item(2))
    with pytest.raises(ValueError, match="queued already"):
        box.add_many([item(1), item(2), item(3)])
    assert (len(box), box.bytes, box.queued("p")) == (2, 20, 2)
