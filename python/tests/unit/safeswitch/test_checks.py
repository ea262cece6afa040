"""How the gate judges watch's status and systemd's state, and how checks are named."""

from __future__ import annotations

from keel.safeswitch import checks
from keel.safeswitch.checks import WatchBaseline, judge_system, judge_watch
from keel.watch.httpwire import parse_url


def agent(state: str, restarts: int = 0, error: str | None = None) -> dict[str, object]:
    return {"state": state, "restarts": restarts, "last_error": error}


def test_every_agent_healthy_passes() -> None:
    status = {"agents": {"web": agent("healthy"), "db": agent("healthy", 3)}}
    assert judge_watch(status, WatchBaseline()) == ("pass", "2 agents healthy")


def test_starting_is_pending_and_stopped_is_left_alone() -> None:
    status = {"agents": {"web": agent("starting"), "old": agent("stopped")}}
    assert judge_watch(status, WatchBaseline()) == ("pending", "web starting")
    status = {"agents": {"web": agent("healthy"), "old": agent("stopped")}}
    assert judge_watch(status, WatchBaseline()) == ("pass", "1 agent healthy, 1 held stopped")


def test_unhealthy_backoff_and_quarantine_fail_with_the_last_error() -> None:
    status = {
        "agents": {
            "a": agent("backoff", error="exited with status 1"),
            "b": agent("quarantined"),
            "c": agent("unhealthy"),
            "d": agent("starting"),
        }
    }
    verdict, detail = judge_watch(status, WatchBaseline())
    assert verdict == "fail"
    assert detail == "a backoff (exited with status 1); b quarantined; c unhealthy"


def test_a_restart_between_two_polls_is_a_failure() -> None:
    baseline = WatchBaseline()
    assert judge_watch({"agents": {"web": agent("healthy", 2)}}, baseline)[0] == "pass"
    verdict, detail = judge_watch(
        {"agents": {"web": agent("healthy", 3, "killed by signal 9 (SIGKILL)")}}, baseline
    )
    assert verdict == "fail"
    assert detail == (
        "web restarted during the gate (2 -> 3 restarts; last error: killed by signal 9 (SIGKILL))"
    )


def test_a_restarted_watch_or_a_new_agent_sets_a_new_baseline() -> None:
    baseline = WatchBaseline()
    judge_watch({"agents": {"web": agent("healthy", 5)}}, baseline)
    # watch restarted with the new configuration: its counts start again at 0.
    assert judge_watch({"agents": {"web": agent("healthy", 0)}}, baseline)[0] == "pass"
    assert baseline.restarts == {"web": 0}
    both = {"agents": {"web": agent("healthy", 0), "new": agent("healthy", 1)}}
    assert judge_watch(both, baseline)[0] == "pass"
    assert baseline.restarts == {"web": 0, "new": 1}


def test_a_malformed_status_fails() -> None:
    assert judge_watch(None, WatchBaseline()) == ("fail", "watch sent a status without agents")
    assert judge_watch({"agents": []}, WatchBaseline())[0] == "fail"
    assert judge_watch({"agents": {"x": "healthy"}}, WatchBaseline()) == (
        "fail",
        "x: malformed status",
    )


def test_system_states() -> None:
    assert judge_system("running\n", [], [], allow_degraded=False) == ("pass", "running")
    assert judge_system("starting", [], [], allow_degraded=False) == ("pending", "starting")
    assert judge_system("", [], [], allow_degraded=False) == ("fail", "unknown")
    assert judge_system("maintenance", [], [], allow_degraded=False) == ("fail", "maintenance")


def test_degraded_fails_only_for_units_that_failed_since_the_switch() -> None:
    before = ["old-broken.service"]
    assert judge_system("degraded", ["old-broken.service"], before, allow_degraded=False) == (
        "pass",
        "degraded as before the switch: old-broken.service",
    )
    assert judge_system(
        "degraded", ["old-broken.service", "web.service"], before, allow_degraded=False
    ) == ("fail", "degraded: failed units: web.service")
    assert judge_system("degraded", ["web.service"], [], allow_degraded=True) == (
        "pass",
        "degraded (allowed): web.service",
    )
    # The failed unit was restarted between is-system-running and list-units.
    assert judge_system("degraded", [], before, allow_degraded=False) == (
        "pending",
        "degraded a moment ago, no unit failed now",
    )


def test_failed_units_are_read_from_systemctl() -> None:
    output = (
        "web.service loaded failed failed The web agent\n"
        "● db.service loaded failed failed Database\n"
        "\n"
    )
    assert checks.parse_failed_units(output) == {"web.service", "db.service"}


def test_checks_get_readable_unique_names() -> None:
    specs: list[checks.CheckSpec] = [
        checks.WatchCheck("/run/keel/watch.sock"),
        checks.TcpCheck("127.0.0.1", 22),
        checks.TcpCheck("::1", 22),
        checks.HttpCheck(parse_url("http://127.0.0.1:8080/health")),
        checks.CommandCheck("curl -fsS   http://x/"),
        checks.CommandCheck("curl -fsS   http://x/"),
        checks.CommandCheck("true", name="mine"),
        checks.CommandCheck("x" * 100),
    ]
    names = [name for name, _ in checks.named(specs)]
    assert names == [
        "watch",
        "tcp 127.0.0.1:22",
        "tcp [::1]:22",
        "http http://127.0.0.1:8080/health",
        "command `curl -fsS http://x/`",
        "command `curl -fsS http://x/` #2",
        "mine",
        "command `" + "x" * 59 + "…`",
    ]
