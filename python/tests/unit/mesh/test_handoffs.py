"""Who holds which received message: the handoff table, windows, leases (fake clock)."""

from __future__ import annotations

import pytest
from keel.mesh.delivery import Incoming
from keel.mesh.errors import LocalProtocolError
from keel.mesh.handoffs import (
    TRANSITIONS,
    Do,
    Event,
    Handoffs,
    Phase,
    Window,
    has_room,
    step,
)
from keel.mesh.local import STREAM_RECEIPTS
from keel.testing import FakeClock

PEER = "p" * 32
AUTHOR = "a" * 32


def message(n: int, size: int = 10, topic: str = "jobs") -> Incoming:
    return Incoming(AUTHOR, f"{n:032x}", None, topic, b"x" * size, 9e9)


def handoffs(clock: FakeClock, epoch: int = 7) -> Handoffs:
    return Handoffs(clock=clock, epoch=epoch, hold=1.0)


def subscribed(clock: FakeClock, *streams: int, max_unacked: int = 10) -> Handoffs:
    made = handoffs(clock)
    for stream in streams:
        made.open(stream)
        made.subscribe(stream, "jobs", max_unacked=max_unacked, max_bytes=1 << 20)
    return made


def test_the_table_has_every_transition_and_nothing_else() -> None:
    assert TRANSITIONS == {
        (Phase.HANDED, Event.ACKED): (None, Do.TAKE),
        (Phase.HANDED, Event.HELD_TOO_LONG): (Phase.STORED, Do.STORE_KEPT),
        (Phase.HANDED, Event.STREAM_CLOSED): (None, Do.STORE_FREED),
        (Phase.STORED, Event.ACKED): (None, Do.CONSUME),
        (Phase.STORED, Event.STREAM_CLOSED): (None, Do.RELEASE),
    }
    with pytest.raises(LocalProtocolError, match="a stored message cannot be held too long"):
        step(Phase.STORED, Event.HELD_TOO_LONG)


def test_an_acknowledged_handoff_is_taken_and_frees_its_place() -> None:
    clock = FakeClock()
    core = subscribed(clock, 1, max_unacked=1)
    receipt = core.hand(1, message(1), PEER)
    assert receipt >= STREAM_RECEIPTS
    assert (AUTHOR, f"{1:032x}") in core.handed()
    assert not core.has_room(1)
    steps = core.acked(1, [receipt])
    assert [(h.item, h.peer) for h in steps.take] == [(message(1), PEER)]
    assert (AUTHOR, f"{1:032x}") not in core.handed()
    assert core.has_room(1)
    assert core.acked(1, [receipt]).take == []  # twice: stale, ignored


def test_a_batch_handed_at_once_is_held_as_if_handed_one_by_one() -> None:
    clock = FakeClock()
    one, batch = subscribed(clock, 1, 2), subscribed(clock, 1, 2)
    pairs = [(1, message(1, size=5)), (2, message(2, size=7)), (1, message(3, size=11))]
    receipts = [one.hand(stream, item, PEER) for stream, item in pairs]
    assert batch.hand_all(pairs, PEER) == receipts
    for core in (one, batch):
        assert [w[:3] for w in core.windows(["jobs"])["jobs"]] == [(1, 2, 16), (2, 1, 7)]
        assert {(AUTHOR, f"{n:032x}") for n in (1, 2, 3)} <= core.handed()  # type: ignore[operator]
        steps = core.acked(1, [receipts[0], receipts[2], receipts[1]])  # the last: stream 2's
        assert [h.item for h in steps.take] == [pairs[0][1], pairs[2][1]]
        assert [w[:3] for w in core.windows(["jobs"])["jobs"]] == [(1, 0, 0), (2, 1, 7)]
        assert (AUTHOR, f"{1:032x}") not in core.handed()
        assert (AUTHOR, f"{2:032x}") in core.handed()


def test_stream_receipts_count_only_on_their_stream_and_seqs_anywhere() -> None:
    clock = FakeClock()
    core = subscribed(clock, 1, 2)
    receipt = core.hand(1, message(1), PEER)
    seq = core.hand_stored(1, 40, 5)
    steps = core.acked(2, [receipt, seq, 41])
    assert steps.take == []
    assert steps.consume == [40, 41]  # stored receipts stay valid across streams
    assert (AUTHOR, f"{1:032x}") in core.handed()


def test_a_handoff_held_too_long_is_stored_and_stays_the_streams() -> None:
    clock = FakeClock()
    core = subscribed(clock, 1)
    receipt = core.hand(1, message(1), PEER)
    assert core.next_deadline() == clock() + 1.0
    clock.advance(0.5)
    assert core.due().store_kept == []
    clock.advance(0.5)
    [hold] = core.due().store_kept
    assert hold.receipt == receipt
    assert 40 not in core.holding()
    core.stored(hold, 40)
    assert hold.phase is Phase.STORED
    assert 40 in core.holding()
    assert core.next_deadline() is None
    assert (AUTHOR, f"{1:032x}") not in core.handed()  # a copy now finds it stored: a duplicate
    steps = core.acked(1, [receipt])  # the agent acknowledges it by its stream receipt
    assert steps.consume == [40]
    assert 40 not in core.holding()


def test_a_handoff_the_inbox_cannot_take_stays_handed_and_is_due_again() -> None:
    clock = FakeClock()
    core = subscribed(clock, 1)
    core.hand(1, message(1), PEER)
    clock.advance(1.0)
    assert len(core.due().store_kept) == 1  # the shell found no room: it stays handed
    assert (AUTHOR, f"{1:032x}") in core.handed()
    assert len(core.due().store_kept) == 1


def test_a_closed_stream_gives_back_what_it_held() -> None:
    clock = FakeClock()
    core = subscribed(clock, 1, 2)
    first = core.hand(1, message(1), PEER)
    core.hand_stored(1, 40, 5)
    core.hand(1, message(2), PEER)
    clock.advance(1.0)
    for hold in core.due().store_kept:
        core.stored(hold, 42 if hold.receipt == first else 41)
    steps = core.closed(1)
    assert [h.item for h in steps.store_freed] == []  # both memory handoffs were stored by now
    assert sorted(steps.release) == [40, 41, 42]
    assert core.subscribers("jobs") == [2]
    assert not any(seq in core.holding() for seq in (40, 41, 42))


def test_a_closed_stream_hands_unstored_messages_back_to_the_shell_to_store() -> None:
    clock = FakeClock()
    core = subscribed(clock, 1)
    core.hand(1, message(1), PEER)
    steps = core.closed(1)
    assert [(h.item, h.peer) for h in steps.store_freed] == [(message(1), PEER)]
    assert (AUTHOR, f"{1:032x}") not in core.handed()  # forgotten: stored now, or sent again
    assert core.subscribers("jobs") == []
    assert core.next_deadline() is None


def test_windows_count_messages_and_bytes_the_first_always_fits() -> None:
    assert has_room(0, 0, 1, 1)
    assert not has_room(1, 0, 1, 100)
    assert has_room(1, 99, 5, 100)
    assert not has_room(1, 100, 5, 100)
    clock = FakeClock()
    core = handoffs(clock)
    core.open(1)
    core.subscribe(1, "jobs", max_unacked=3, max_bytes=15)
    core.hand(1, message(1, size=20), PEER)  # the first fits whatever its size
    assert not core.has_room(1)
    assert core.room(1) == 2
    assert core.windows(["jobs", "other"]) == {"jobs": [Window(1, 1, 20, 3, 15, True)]}
    core.set_backlog([1], False)
    assert not core.backlog(1)
    with pytest.raises(LocalProtocolError, match="subscribes once"):
        core.subscribe(1, "jobs", max_unacked=1, max_bytes=1)


def test_a_stream_cannot_ask_for_unbounded_windows() -> None:
    core = handoffs(FakeClock())
    core.open(1)
    core.subscribe(1, "jobs", max_unacked=1 << 40, max_bytes=0)
    assert core.windows(["jobs"])["jobs"][0][3:5] == (100_000, 1)


def test_leases_hold_stored_messages_until_they_run_out() -> None:
    clock = FakeClock()
    core = handoffs(clock)
    core.lease([5, 6], until=clock() + 30)
    assert 5 in core.holding()
    assert not core.expire_leases()
    clock.advance(30)
    assert 5 not in core.holding()
    assert core.expire_leases()
    core.lease([7], until=clock() + 30)
    core.consumed([7])
    assert 7 not in core.holding()


def test_stream_receipts_of_two_daemons_differ_by_their_epoch() -> None:
    clock = FakeClock()
    first, second = handoffs(clock, epoch=1), handoffs(clock, epoch=2)
    for core in (first, second):
        core.open(1)
        core.subscribe(1, "jobs", max_unacked=5, max_bytes=100)
    assert first.hand(1, message(1), PEER) != second.hand(1, message(1), PEER)


def test_a_message_is_stored_once() -> None:
    clock = FakeClock()
    core = subscribed(clock, 1)
    core.hand(1, message(1), PEER)
    clock.advance(1.0)
    [hold] = core.due().store_kept
    core.stored(hold, 40)
    with pytest.raises(LocalProtocolError, match="not a message handed from memory"):
        core.stored(hold, 41)
