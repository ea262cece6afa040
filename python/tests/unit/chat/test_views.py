"""What the read-only commands answer, from the verbs' views (pure)."""

from __future__ import annotations

from keel.chat import views
from keel.chat.verbs import AgentView, HostView, LogLine, describe, fingerprint

NOW = 1_800_000_000.0


def agent(name: str, state: str = "healthy", **fields: object) -> AgentView:
    values: dict[str, object] = {
        "pid": 100,
        "uptime": 3725.0,
        "restarts": 0,
        "last_error": None,
        "last_error_at": None,
        "backoff_until": None,
    }
    values.update(fields)
    return AgentView(name, state, **values)  # type: ignore[arg-type]


def host(*agents: AgentView) -> HostView:
    return HostView("box", agents, 7200.0, "ok")


def test_status_when_all_is_well() -> None:
    assert views.status(host(agent("a"), agent("b")), NOW) == (
        "box: all 2 agents healthy.\nLedger: ok, watch up 2h0m."
    )


def test_status_names_what_is_down_and_why() -> None:
    down = agent(
        "worker",
        "backoff",
        pid=None,
        uptime=None,
        restarts=5,
        last_error="probe http failed 3 times in a row: connection refused",
        last_error_at=NOW - 125,
        backoff_until=NOW + 40,
    )
    assert views.status(host(agent("web"), down), NOW).splitlines() == [
        "box: 1 of 2 agents not healthy.",
        "worker: backoff, 5 restarts, next start in 40s",
        "  last error (2m5s ago): probe http failed 3 times in a row: connection refused",
        "Ledger: ok, watch up 2h0m.",
    ]


def test_status_without_agents() -> None:
    assert views.status(host(), NOW) == "box: watch supervises no agents. Ledger: ok."
    assert views.agents(host(), NOW) == "box: watch supervises no agents."


def test_agents_lists_every_agent_and_clips_long_errors() -> None:
    text = views.agents(host(agent("web"), agent("db", "unhealthy", last_error="x" * 1000)), NOW)
    lines = text.splitlines()
    assert lines[0] == "box, 2 agents:"
    assert lines[1] == "web: healthy, pid 100, up 1h2m, 0 restarts"
    assert lines[2] == "db: unhealthy, pid 100, up 1h2m, 0 restarts"
    assert lines[3].startswith("  last error: xxx")
    assert lines[3].endswith("…")
    assert len(lines[3]) == len("  last error: ") + views.ERROR_WIDTH


def test_log_lines() -> None:
    lines = [
        LogLine(41, "2026-05-01T12:00:03.123456Z", "watch", "restart", "web", {"restarts": 2}),
        LogLine(42, "2026-05-01T12:00:04.000000Z", "chat", "chat_start", "", {}),
    ]
    assert views.log(lines, "box").splitlines() == [
        "box: ledger entries 41 to 42:",
        '#41 2026-05-01 12:00:03 watch restart web {"restarts":2}',
        "#42 2026-05-01 12:00:04 chat chat_start {}",
    ]
    assert views.log([], "box") == "box: the ledger is empty."


def test_the_state_a_confirmation_is_bound_to() -> None:
    a = agent("web", pid=100, restarts=2)
    assert fingerprint(a) == "healthy/100/2"
    assert fingerprint(agent("web", "backoff", pid=None, restarts=3)) == "backoff/-/3"
    assert fingerprint(agent("web", uptime=1.0, pid=100, restarts=2)) == fingerprint(a)
    assert describe(a) == "healthy, pid 100, 2 restarts"
    assert describe(agent("w", "stopped", pid=None, restarts=1)) == "stopped, 1 restart"
    assert views.restarted(a) == "Restarted web: now healthy, pid 100, 2 restarts."
