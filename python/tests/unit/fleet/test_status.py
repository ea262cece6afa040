"""A node's report and the fleet view: a silent node is never healthy."""

from __future__ import annotations

from typing import Any

import pytest
from keel.fleet.status import (
    DEGRADED,
    HEALTHY,
    UNREACHABLE,
    ReportError,
    Seen,
    ServiceAnswer,
    check_report,
    fleet_view,
    node_report,
)

WATCH = {
    "agents": {
        "web": {"state": "healthy", "restarts": 2, "last_error": "exited 1", "last_error_at": 5.0},
        "db": {"state": "stopped", "restarts": 0, "last_error": None, "last_error_at": None},
    }
}
SHELL = {"service": {"version": "0.1.0", "uptime": 12.5, "ledger": {"state": "ok"}}}


def report(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "node": "n1",
        "host": "web1",
        "version": "0.1.0",
        "now": 100.0,
        "watch": ServiceAnswer("watch", WATCH),
        "services": [ServiceAnswer("watch", {**WATCH, **SHELL}), ServiceAnswer("mesh", {})],
        "system": {"current": "/nix/store/abc-nixos", "generation": 42},
        "switch": None,
    }
    args.update(changes)
    return node_report(**args)


def test_a_healthy_node() -> None:
    out = report()
    assert out["health"] == HEALTHY
    assert out["problems"] == []
    assert out["agents"]["web"] == {
        "state": "healthy",
        "restarts": 2,
        "last_error": "exited 1",
        "last_error_at": 5.0,
    }
    assert out["services"]["watch"] == {
        "state": "up",
        "version": "0.1.0",
        "uptime": 12.5,
        "ledger": "ok",
    }
    assert out["system"] == {"current": "/nix/store/abc-nixos", "generation": 42}
    assert check_report(out, "n1") == out


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"watch": ServiceAnswer("watch", None, "refused")}, "watch does not answer: refused"),
        (
            {"watch": ServiceAnswer("watch", {"agents": {"web": {"state": "backoff"}}})},
            "agent web is backoff",
        ),
        ({"services": [ServiceAnswer("egress", None, "gone")]}, "egress does not answer: gone"),
        (
            {"services": [ServiceAnswer("mesh", {"service": {"ledger": {"state": "degraded"}}})]},
            "mesh's ledger is degraded",
        ),
        ({"switch": {"outcome": "needs-operator"}}, "needs an operator"),
    ],
)
def test_what_degrades_a_node(changes: dict[str, Any], problem: str) -> None:
    out = report(**changes)
    assert out["health"] == DEGRADED
    assert any(problem in p for p in out["problems"]), out["problems"]


def test_a_hostile_watch_answer_is_summarised_not_trusted() -> None:
    weird = {
        "agents": {
            "x": "not an object",
            "y": {"state": 3, "restarts": "many", "last_error": "e" * 5000},
        }
    }
    out = report(watch=ServiceAnswer("watch", weird))
    assert "x" not in out["agents"]
    assert out["agents"]["y"]["restarts"] is None
    assert len(out["agents"]["y"]["last_error"]) == 500
    assert out["health"] == DEGRADED


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (lambda r: [], "not an object"),
        (lambda r: {**r, "node": "other"}, "about node"),
        (lambda r: {**r, "health": "great"}, "unknown health"),
        (lambda r: {**r, "agents": []}, "'agents'"),
        (lambda r: {**r, "time": "now"}, "no time"),
        (lambda r: {**r, "agents": {"a": {"state": 1}}}, "agent 'a'"),
        (lambda r: {**r, "agents": {str(i): {} for i in range(1001)}}, "more than 1000"),
        (lambda r: {**r, "switch": "yes"}, "'switch'"),
    ],
)
def test_check_report_refuses_what_is_not_a_report(mangle: Any, problem: str) -> None:
    with pytest.raises(ReportError, match=problem):
        check_report(mangle(report()), "n1")


def test_the_view_shows_silent_nodes_unreachable_with_their_last_report() -> None:
    fresh = report()
    old = {**report(node="n2", host="db1"), "health": HEALTHY}
    rows = fleet_view(
        ["n1", "n2", "n3"],
        {"n1": fresh},
        {"n2": Seen(old, 50.0)},
        now=100.0,
        errors={"n2": "no answer within 1.5 s"},
    )
    n1, n2, n3 = rows
    assert (n1["state"], n1["last_seen"], n1["stale"]) == (HEALTHY, 100.0, False)
    assert n2["state"] == UNREACHABLE  # although its last report said healthy
    assert (n2["last_seen"], n2["stale"], n2["error"]) == (50.0, True, "no answer within 1.5 s")
    assert n2["report"]["host"] == "db1"
    assert (n3["state"], n3["report"], n3["last_seen"], n3["error"]) == (
        UNREACHABLE,
        None,
        None,
        "no answer",
    )
