"""Connection policy: both sides keep the same connection; dials back off with jitter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from keel.mesh.dialing import Dial, Dialer, Link, preferred
from keel.testing import FakeClock

LOW, HIGH = "a" * 32, "b" * 32


def test_simultaneous_dial_resolves_the_same_way_on_both_sides() -> None:
    # LOW dialed HIGH (serial 1 at LOW, 2 at HIGH), HIGH dialed LOW (2 at LOW, 1 at HIGH)
    at_low = preferred(LOW, Link(HIGH, LOW, 1), Link(HIGH, HIGH, 2))
    at_high = preferred(HIGH, Link(LOW, LOW, 2), Link(LOW, HIGH, 1))
    assert at_low.initiator == at_high.initiator == LOW


@given(st.integers(1, 100), st.integers(1, 100), st.booleans(), st.booleans())
def test_preferred_agrees_whatever_the_serials(
    s1: int, s2: int, first_low: bool, second_low: bool
) -> None:
    if first_low == second_low:
        return  # same initiator: each side keeps its newer one (covered below)
    ours = [Link(HIGH, LOW if first_low else HIGH, s1), Link(HIGH, LOW if second_low else HIGH, s2)]
    theirs = [Link(LOW, link.initiator, 200 - link.serial) for link in ours]
    assert preferred(LOW, *ours).initiator == preferred(HIGH, *theirs).initiator == LOW
    assert preferred(LOW, *ours) == preferred(LOW, *reversed(ours))


def test_same_initiator_keeps_the_newer_connection() -> None:
    old, new = Link(HIGH, HIGH, 3), Link(HIGH, HIGH, 9)
    assert preferred(LOW, old, new) == new
    assert preferred(LOW, new, old) == new
    with pytest.raises(ValueError, match="same peer"):
        preferred(LOW, Link(HIGH, LOW, 1), Link("c" * 32, LOW, 2))


def test_dialer_dials_each_member_once_and_rotates_addresses() -> None:
    clock = FakeClock()
    dialer = Dialer(LOW, clock=clock, random=lambda: 0.0, base=1.0, cap=8.0)
    dialer.update({HIGH: ["10.0.0.2:1", "10.0.0.3:1"], LOW: ["ignored:1"], "c" * 32: []})
    assert dialer.due() == [Dial(HIGH, "10.0.0.2:1")]
    assert dialer.due() == []  # dialing already
    dialer.failed(HIGH)
    assert dialer.due() == []
    assert dialer.next_deadline() == pytest.approx(clock.now + 0.5)
    clock.advance(0.5)
    assert dialer.due() == [Dial(HIGH, "10.0.0.3:1")]
    dialer.failed(HIGH)
    clock.advance(0.99)
    assert dialer.due() == []
    clock.advance(0.01)
    assert dialer.due() == [Dial(HIGH, "10.0.0.2:1")]


def test_backoff_grows_caps_and_is_jittered() -> None:
    clock = FakeClock()
    dialer = Dialer(LOW, clock=clock, random=lambda: 0.5, base=0.5, cap=30.0)
    delays = [dialer.backoff(n) for n in range(1, 10)]
    assert delays[:4] == pytest.approx([0.375, 0.75, 1.5, 3.0])
    assert delays[-1] == pytest.approx(22.5)
    low = Dialer(LOW, clock=clock, random=lambda: 0.0, base=0.5, cap=30.0).backoff(4)
    high = Dialer(LOW, clock=clock, random=lambda: 0.9999, base=0.5, cap=30.0).backoff(4)
    assert low == pytest.approx(2.0)
    assert high < 4.0


def test_a_connection_that_lasted_resets_the_backoff() -> None:
    clock = FakeClock()
    dialer = Dialer(LOW, clock=clock, random=lambda: 0.0, base=1.0, cap=64.0, stable_after=10)
    dialer.update({HIGH: ["h:1"]})
    for _ in range(5):
        dialer.due()
        dialer.failed(HIGH)
        clock.advance(100)
    dialer.due()
    dialer.connected(HIGH)
    clock.advance(1)
    dialer.disconnected(HIGH)  # short-lived: back-off keeps growing
    assert dialer.next_deadline() == pytest.approx(clock.now + 16)  # 32 s, jitter 0.5
    clock.advance(16)
    dialer.due()
    dialer.connected(HIGH)
    assert dialer.due() == []
    clock.advance(60)
    dialer.disconnected(HIGH)  # lasted: back to the first step
    assert dialer.next_deadline() == pytest.approx(clock.now + 0.5)


def test_removed_members_are_forgotten_and_addresses_learnt() -> None:
    clock = FakeClock()
    dialer = Dialer(LOW, clock=clock, random=lambda: 0.0)
    dialer.update({HIGH: []})
    assert dialer.due() == []  # no address yet
    dialer.learn(HIGH, "10.9.9.9:7400")
    assert dialer.due() == [Dial(HIGH, "10.9.9.9:7400")]
    dialer.update({})
    assert dialer.state(HIGH) is None
    dialer.failed(HIGH)
    dialer.disconnected(HIGH)
    assert dialer.next_deadline() is None
