"""Element timeouts and the set book, with a fake clock."""

from __future__ import annotations

import ipaddress

from keel.egress.answers import Address
from keel.egress.sets import (
    EXPIRY_MARGIN,
    MAX_COMMENT,
    MAX_TIMEOUT,
    SetBook,
    comment_of,
    element_timeout,
    names_of,
)
from keel.testing import FakeClock

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("2001:db8::1")


def book(clock: FakeClock, min_ttl: int = 30, grace: int = 5) -> SetBook:
    return SetBook(clock=clock, min_ttl=min_ttl, grace=grace)


def test_timeout_is_the_floored_ttl_plus_grace() -> None:
    assert element_timeout(300, min_ttl=30, grace=5) == 305
    assert element_timeout(0, min_ttl=30, grace=5) == 35
    assert element_timeout(10, min_ttl=0, grace=0) == 10
    assert element_timeout(10**9, min_ttl=0, grace=5) == MAX_TIMEOUT + 5


def test_new_addresses_are_inserted_and_remembered() -> None:
    clock = FakeClock()
    sets = book(clock)
    plan = sets.plan("scout", [Address(A, 60, "a.test"), Address(B, 10, "a.test")])
    assert [(str(i.address), i.timeout, i.replace, i.family) for i in plan] == [
        ("192.0.2.1", 65, False, 4),
        ("2001:db8::1", 35, False, 6),
    ]
    sets.committed("scout", plan)
    assert sets.sizes("scout") == (1, 1)
    assert sets.entries("scout")[0] == (B, 35, ("a.test",))


def test_a_repeat_soon_after_writes_nothing_and_later_refreshes() -> None:
    clock = FakeClock()
    sets = book(clock, min_ttl=0, grace=0)
    sets.committed("scout", sets.plan("scout", [Address(A, 100, "a.test")]))
    clock.advance(10)  # 90 s left, the answer wants 100: within the slack
    assert sets.plan("scout", [Address(A, 100, "a.test")]) == []
    clock.advance(20)  # 70 s left, short of 100 - 25
    refresh = sets.plan("scout", [Address(A, 100, "a.test")])
    assert len(refresh) == 1
    assert refresh[0].replace is True
    sets.committed("scout", refresh)
    assert sets.entries("scout") == [(A, 100, ("a.test",))]


def test_a_cached_answer_with_less_ttl_left_still_extends_through_the_floor() -> None:
    """The dnsmasq hole: an answer from the cache must refresh the set too."""
    clock = FakeClock()
    sets = book(clock, min_ttl=60, grace=10)
    sets.committed("scout", sets.plan("scout", [Address(A, 60, "a.test")]))  # 70 s
    clock.advance(55)  # 15 s left in the set; the cache answers with TTL 5
    refresh = sets.plan("scout", [Address(A, 5, "a.test")])
    assert [(i.timeout, i.replace) for i in refresh] == [(70, True)]


def test_a_shorter_answer_never_shortens_an_element() -> None:
    clock = FakeClock()
    sets = book(clock, min_ttl=0, grace=0)
    sets.committed("scout", sets.plan("scout", [Address(A, 3000, "a.test")]))
    assert sets.plan("scout", [Address(A, 10, "a.test")]) == []
    # Another name for the same address: written with both, still for 3000 s.
    clock.advance(100)
    assert [
        (i.timeout, i.names, i.replace) for i in sets.plan("scout", [Address(A, 10, "b.test")])
    ] == [(2900, ("a.test", "b.test"), True)]


def test_every_name_an_address_was_opened_for_is_kept() -> None:
    clock = FakeClock()
    sets = book(clock, min_ttl=0, grace=0)
    sets.committed("scout", sets.plan("scout", [Address(A, 300, "a.test")]))
    sets.committed("scout", sets.plan("scout", [Address(A, 300, "b.test")]))
    sets.committed("scout", sets.plan("scout", [Address(A, 300, "a.test")]))  # fresh: no write
    assert sets.entries("scout") == [(A, 300, ("a.test", "b.test"))]
    # A refresh by the first name makes it the latest.
    clock.advance(200)
    sets.committed("scout", sets.plan("scout", [Address(A, 300, "a.test")]))
    assert sets.entries("scout") == [(A, 300, ("b.test", "a.test"))]


def test_the_comment_lists_the_names_newest_first_as_many_as_fit() -> None:
    assert comment_of(("a.test", "b.test")) == "b.test a.test"
    assert names_of("b.test a.test") == (("a.test", "b.test"), False)
    assert names_of("a.test") == (("a.test",), False)  # as keel wrote them before
    many = tuple(f"host-{i:03d}.cdn.example.com" for i in range(10))
    comment = comment_of(many)
    assert len(comment) <= MAX_COMMENT
    kept, more = names_of(comment)
    assert more
    assert kept == many[-len(kept) :]
    assert len(kept) >= 4
    assert comment_of(("x" * 200,)) == "..."
    assert names_of("...") == ((), True)


def test_expired_elements_are_inserted_again_not_replaced() -> None:
    clock = FakeClock()
    sets = book(clock, min_ttl=0, grace=1)
    sets.committed("scout", sets.plan("scout", [Address(A, 1, "a.test")]))
    clock.advance(2)
    # Just expired by the book's clock (read to the second, the kernel's may
    # lag): replaced, since adding an element that is still there changes nothing.
    assert [i.replace for i in sets.plan("scout", [Address(A, 1, "a.test")])] == [True]
    clock.advance(EXPIRY_MARGIN)
    plan = sets.plan("scout", [Address(A, 1, "a.test")])
    assert [(i.replace, i.names) for i in plan] == [(False, ("a.test",))]
    assert sets.sizes("scout") == (0, 0)
    assert sets.prune() == 1


def test_agents_are_separate() -> None:
    clock = FakeClock()
    sets = book(clock)
    sets.committed("scout", sets.plan("scout", [Address(A, 60, "a.test")]))
    assert [i.replace for i in sets.plan("other", [Address(A, 60, "a.test")])] == [False]


def test_load_from_the_kernel_then_forget() -> None:
    clock = FakeClock()
    sets = book(clock, min_ttl=0, grace=0)
    sets.load("scout", [(A, 50.0, ("a.test",)), (B, 0.0, ("gone.test",))])
    assert sets.sizes("scout") == (1, 0)
    assert sets.plan("scout", [Address(A, 50, "a.test")]) == []
    sets.forget("scout", [A])
    assert sets.sizes("scout") == (0, 0)
    sets.load("scout", [(A, 50.0, ("a.test",))])
    sets.forget("scout")
    assert sets.entries("scout") == []


def test_after_a_restart_unknown_addresses_are_replaced_until_the_kernel_is_read() -> None:
    clock = FakeClock()
    sets = book(clock, min_ttl=0, grace=0)
    sets.expect("scout")
    assert [i.replace for i in sets.plan("scout", [Address(A, 60, "a.test")])] == [True]
    listed = clock()
    clock.advance(1)
    sets.committed("scout", sets.plan("scout", [Address(B, 60, "b.test")]))
    # The listing (begun before B was written) shows A, and B as it was then.
    sets.adopt("scout", [(A, 40.0, ("a.test",)), (B, 5.0, ("b.test",))], listed=listed)
    assert sets.entries("scout") == [(A, 40, ("a.test",)), (B, 60, ("b.test",))]
    assert sets.written_since("scout", B, listed)
    assert not sets.written_since("scout", A, listed)
    # Once adopted, an unknown address is simply added.
    c = ipaddress.ip_address("192.0.2.99")
    assert [i.replace for i in sets.plan("scout", [Address(c, 60, "c.test")])] == [False]


def test_after_a_restart_what_the_kernel_holds_is_read_before_it_is_rewritten() -> None:
    clock = FakeClock()
    sets = book(clock, min_ttl=0, grace=0)
    sets.expect("scout")
    c = ipaddress.ip_address("192.0.2.99")
    assert sets.unknown("scout", [A, c]) == [A, c]
    sets.learn("scout", A, (100.0, ("a.test",)))  # left by the previous daemon
    sets.learn("scout", c, None)  # not there
    assert sets.unknown("scout", [A, c]) == []
    plan = sets.plan("scout", [Address(A, 60, "b.test"), Address(c, 60, "b.test")])
    assert [(str(i.address), i.timeout, i.names, i.replace) for i in plan] == [
        ("192.0.2.1", 100, ("a.test", "b.test"), True),
        ("192.0.2.99", 60, ("b.test",), False),
    ]
    sets.adopt("scout", [], listed=clock())
    assert sets.unknown("scout", [B]) == []  # once the sets are read, nothing is unknown
