"""Denials aggregated for the ledger (fake clock), observations and suggestions."""

from __future__ import annotations

from keel.egress.allowlist import Allowlist
from keel.egress.denials import Aggregator, BlockedFlow, DeniedName, Observations, suggest
from keel.testing import FakeClock


def name(n: str = "evil.test", agent: str = "scout") -> DeniedName:
    return DeniedName(agent, n, "A", True)


def test_the_first_denial_is_recorded_at_once_and_repeats_when_the_window_closes() -> None:
    clock = FakeClock()
    aggregator = Aggregator(clock=clock, window=60)
    first = aggregator.observe(name())
    assert [(e.kind, e.subject, e.data) for e in first] == [
        (
            "egress.denied",
            "scout",
            {"name": "evil.test", "type": "A", "mode": "enforce", "count": 1},
        )
    ]
    for _ in range(999):
        clock.advance(0.01)
        assert aggregator.observe(name()) == []
    assert aggregator.flush() == []
    clock.advance(60)
    [summary] = aggregator.flush()
    assert summary.data["count"] == 999
    assert summary.data["repeated"] is True
    assert summary.data["last"] > summary.data["first"]
    assert aggregator.flush() == []


def test_a_new_window_records_the_first_again() -> None:
    clock = FakeClock()
    aggregator = Aggregator(clock=clock, window=10)
    aggregator.observe(name())
    clock.advance(11)
    entries = aggregator.observe(name())
    assert [e.data["count"] for e in entries] == [1]  # the old window had no repeats


def test_a_flood_of_distinct_denials_is_bounded() -> None:
    clock = FakeClock()
    aggregator = Aggregator(clock=clock, window=60, max_keys=5)
    entries = []
    for i in range(10_000):
        entries += aggregator.observe(name(f"n{i}.test"))
        entries += aggregator.observe(BlockedFlow("scout", "tcp", "192.0.2.1", 1 + i, True))
    entries += aggregator.flush(force=True)
    assert len(entries) <= 2 * 5 + 1
    [suppressed] = [e for e in entries if e.kind == "egress.suppressed"]
    assert suppressed.data["count"] == 20_000 - 5


def test_agents_have_their_own_budget() -> None:
    clock = FakeClock()
    aggregator = Aggregator(clock=clock, max_keys=1)
    assert aggregator.observe(name("a.test", "one"))
    assert aggregator.observe(name("a.test", "two"))


def test_blocked_flows_describe_themselves() -> None:
    flow = BlockedFlow("scout", "udp", "2001:db8::1", 443, False)
    assert flow.describe() == "udp [2001:db8::1]:443"
    assert flow.data() == {
        "protocol": "udp",
        "address": "2001:db8::1",
        "port": 443,
        "mode": "audit",
    }
    assert BlockedFlow("s", "icmp", "192.0.2.1", None, True).describe() == "icmp 192.0.2.1"


def test_observations_remember_recent_and_bounded() -> None:
    clock = FakeClock()
    seen = Observations(clock=clock, max_names=2)
    for n in ("a.test", "b.test", "c.test", "a.test"):
        seen.asked("scout", n)
    seen.denied(name("x.test"))
    summary = seen.summary("scout")
    assert summary["names"] == {"a.test": 2, "b.test": 1}
    assert summary["overflow"] == 1
    assert seen.recent("scout")[0]["detail"] == "x.test (A)"
    assert seen.recent("nobody") == []


def test_suggest_exact_names_beyond_the_current_list() -> None:
    current = Allowlist.parse(["api.example.com"])
    names = ["api.example.com", "cdn.example.com", "192.0.2.1", "bad_name.test", "b.test"]
    assert suggest(names, current=current) == ["cdn.example.com", "b.test"]  # by domain


def test_suggest_collapses_siblings_into_a_wildcard() -> None:
    names = [
        "a.img.example.com",
        "b.img.example.com",
        "c.img.example.com",
        "www.example.com",
        "x.com",
    ]
    assert suggest(names, collapse=3) == ["*.img.example.com", "www.example.com", "x.com"]
    assert suggest(["a.com", "b.com", "c.com"], collapse=2) == ["a.com", "b.com", "c.com"]
