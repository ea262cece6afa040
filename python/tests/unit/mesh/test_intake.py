"""The intake: handshakes in progress per source and in all, eviction, deadlines (fake clock)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.mesh.intake import Admitted, Intake, Refused, TokenBucket, source_of
from keel.testing import FakeClock


def intake(
    clock: FakeClock, *, total: int = 4, per_source: int = 2, timeout: float = 10.0
) -> Intake:
    return Intake(total=total, per_source=per_source, timeout=timeout, clock=clock)


def admitted(verdict: Admitted | Refused) -> Admitted:
    assert isinstance(verdict, Admitted), verdict
    return verdict


def test_sources_are_addresses_and_ipv6_slash_64s() -> None:
    assert source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("not an address") == "not an address"


def test_per_source_limit_refuses_and_frees_when_a_handshake_ends(clock: FakeClock) -> None:
    gate = intake(clock)
    first = admitted(gate.offer("a"))
    admitted(gate.offer("a"))
    refused = gate.offer("a")
    assert isinstance(refused, Refused)
    assert "at most 2 per address" in refused.reason
    assert "\n" not in refused.reason
    admitted(gate.offer("b"))  # another address is not affected
    gate.finished(first.ticket)
    admitted(gate.offer("a"))
    assert gate.in_progress("a") == 2


def test_when_full_a_quieter_source_takes_the_busiest_sources_oldest_place(
    clock: FakeClock,
) -> None:
    gate = intake(clock, total=4, per_source=3)
    a1 = admitted(gate.offer("a"))
    clock.advance(1)
    admitted(gate.offer("a"))
    admitted(gate.offer("a"))
    admitted(gate.offer("b"))
    assert len(gate) == 4
    newcomer = admitted(gate.offer("c"))  # c holds none, a holds 3: a's oldest goes
    assert newcomer.evicted == a1.ticket
    assert (gate.in_progress("a"), gate.in_progress("b"), gate.in_progress("c")) == (2, 1, 1)
    gate.finished(a1.ticket)  # the evicted connection's close arrives later: ignored
    assert len(gate) == 4


def test_when_full_a_source_as_busy_as_any_other_is_refused(clock: FakeClock) -> None:
    gate = intake(clock, total=4, per_source=4)
    for source in "abcd":
        admitted(gate.offer(source))
    again = gate.offer("a")  # a would hold 2 while the others hold 1: no
    assert isinstance(again, Refused)
    assert "4 handshakes are in progress (at most 4)" in again.reason
    fresh = admitted(gate.offer("e"))  # e holds none: takes the oldest of the 1s (a's)
    assert fresh.evicted is not None
    assert gate.in_progress("a") == 0


def test_ties_evict_the_oldest_handshake(clock: FakeClock) -> None:
    gate = intake(clock, total=4, per_source=2)
    oldest_b = admitted(gate.offer("b"))
    clock.advance(1)
    admitted(gate.offer("a"))
    clock.advance(1)
    admitted(gate.offer("b"))
    admitted(gate.offer("a"))
    assert admitted(gate.offer("c")).evicted == oldest_b.ticket


def test_every_handshake_has_a_deadline(clock: FakeClock) -> None:
    gate = intake(clock, timeout=10)
    assert gate.next_deadline() is None
    first = admitted(gate.offer("a"))
    clock.advance(4)
    second = admitted(gate.offer("b"))
    assert gate.next_deadline() == pytest.approx(clock.now + 6)
    clock.advance(5.9)
    assert gate.overdue() == []
    clock.advance(0.1)
    assert gate.overdue() == [first.ticket]
    assert gate.next_deadline() == pytest.approx(clock.now + 4)
    gate.finished(second.ticket)
    assert gate.next_deadline() is None
    assert len(gate) == 0


def test_a_finished_handshake_has_no_deadline(clock: FakeClock) -> None:
    gate = intake(clock)
    ticket = admitted(gate.offer("a")).ticket
    gate.finished(ticket)
    clock.advance(100)
    assert gate.overdue() == []


def test_bad_limits_are_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Intake(total=0, timeout=1, clock=clock)
    with pytest.raises(ValueError, match="positive"):
        Intake(timeout=float("nan"), clock=clock)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("offer"), st.sampled_from("abcdefgh")),
            st.tuples(st.just("finish"), st.integers(0, 40)),
            st.tuples(st.just("wait"), st.floats(0, 5)),
        ),
        max_size=80,
    )
)
def test_the_limits_hold_whatever_happens(steps: list[tuple[str, object]]) -> None:
    """Never more than the limits; a source with nothing in progress is never locked out."""
    clock = FakeClock()
    gate = intake(clock, total=5, per_source=2, timeout=8)
    tickets: list[int] = []
    live: dict[int, str] = {}
    for kind, value in steps:
        if kind == "offer":
            assert isinstance(value, str)
            holds = gate.in_progress(value)
            verdict = gate.offer(value)
            if holds == 0:
                assert isinstance(verdict, Admitted)
            if isinstance(verdict, Admitted):
                tickets.append(verdict.ticket)
                live[verdict.ticket] = value
                if verdict.evicted is not None:  # only ever from a busier source
                    victim = live.pop(verdict.evicted)
                    assert victim != value
                    assert list(live.values()).count(victim) + 1 > holds
        elif kind == "finish" and tickets:
            assert isinstance(value, int)
            ticket = tickets[value % len(tickets)]
            gate.finished(ticket)
            live.pop(ticket, None)
        elif kind == "wait":
            assert isinstance(value, float)
            clock.advance(value)
            for ticket in gate.overdue():
                live.pop(ticket)
        assert len(gate) == len(live) <= 5
        for source in set(live.values()):
            assert gate.in_progress(source) == list(live.values()).count(source) <= 2
        deadline = gate.next_deadline()
        assert (deadline is None) == (not live)


def test_the_token_bucket_lets_a_burst_through_then_its_rate(clock: FakeClock) -> None:
    bucket = TokenBucket(3, 2.0, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)  # one token back at 2 a second
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.advance(100)  # never more than the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
