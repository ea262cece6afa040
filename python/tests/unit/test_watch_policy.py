"""The watch policy core, driven with a fake clock: every transition."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.watch.policy import (
    TRANSITIONS,
    Action,
    AgentPolicy,
    AgentRules,
    AlertRules,
    HoldAgent,
    LedgerRecord,
    Phase,
    ProbeRules,
    Restarted,
    RestartRules,
    SendAlert,
    StartAgent,
    StopAgent,
)

from tests.fuzz import examples


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def make(
    *,
    probes: tuple[ProbeRules, ...] = (),
    restart: RestartRules | None = None,
    alerts: AlertRules | None = None,
) -> AgentPolicy:
    rules = AgentRules(
        "web",
        probes=probes,
        restart=restart or RestartRules(),
        alerts=alerts or AlertRules(routes=("ops",)),
    )
    return AgentPolicy(rules, rng=random.Random(7))


def starts(actions: list[Action]) -> list[StartAgent]:
    return [a for a in actions if isinstance(a, StartAgent)]


def stops(actions: list[Action]) -> list[StopAgent]:
    return [a for a in actions if isinstance(a, StopAgent)]


def alerts(actions: list[Action]) -> list[SendAlert]:
    return [a for a in actions if isinstance(a, SendAlert)]


def records(actions: list[Action], kind: str) -> list[LedgerRecord]:
    return [a for a in actions if isinstance(a, LedgerRecord) and a.kind == kind]


def running(policy: AgentPolicy, clock: Clock, pid: int = 100) -> list[Action]:
    """Start a stopped policy and report the process up."""
    actions = policy.supervise(clock.now)
    assert starts(actions)
    return actions + policy.started(clock.now, pid)


def crash(policy: AgentPolicy, clock: Clock, pid: int = 101) -> list[Action]:
    """Crash, then report the restarted process up when a start was issued."""
    actions = policy.exited(clock.now, "exited with status 1")
    if starts(actions):
        actions += policy.started(clock.now, pid)
    return actions


# --- start, health, states ----------------------------------------------------


def test_supervise_starts_and_reports_running_without_probes_as_healthy() -> None:
    clock = Clock()
    policy = make()
    assert policy.state() == "stopped"
    actions = policy.supervise(clock.now)
    assert actions == [StartAgent("web", 1)]
    assert policy.state() == "starting"
    assert policy.supervise(clock.now) == []  # only once
    assert policy.started(clock.now, 42) == []
    assert policy.state() == "healthy"
    assert policy.status().pid == 42
    assert policy.status().running_since == clock.now


def test_with_probes_starting_until_every_probe_passes() -> None:
    clock = Clock()
    policy = make(probes=(ProbeRules("http"), ProbeRules("tcp")))
    running(policy, clock)
    assert policy.state() == "starting"
    policy.probe_result(clock.now, policy.instance, "http", True)
    assert policy.state() == "starting"
    policy.probe_result(clock.now, policy.instance, "tcp", True)
    assert policy.state() == "healthy"


def test_probe_results_of_an_older_instance_or_unknown_probe_are_ignored() -> None:
    clock = Clock()
    policy = make(probes=(ProbeRules("http", failures=1),))
    running(policy, clock)
    old = policy.instance
    crash(policy, clock)
    assert policy.probe_result(clock.now, old, "http", False, "timeout") == []
    assert policy.probe_result(clock.now, policy.instance, "nope", False) == []
    assert policy.state() == "starting"


def test_probe_results_while_not_running_are_ignored() -> None:
    clock = Clock()
    policy = make(probes=(ProbeRules("http", failures=1),))
    policy.supervise(clock.now)  # STARTING, not yet running
    assert policy.probe_result(clock.now, policy.instance, "http", False) == []


# --- crashes and back-off -------------------------------------------------------


def test_first_crash_restarts_at_once_and_counts_a_restart() -> None:
    clock = Clock()
    policy = make()
    running(policy, clock)
    clock.advance(100)
    actions = policy.exited(clock.now, "exited with status 3")
    assert starts(actions) == [StartAgent("web", 2)]
    assert policy.restarts == 1
    assert policy.state() == "starting"
    (failure,) = records(actions, "failure")
    assert failure.data == {
        "cause": "exited with status 3",
        "failures_in_a_row": 1,
        "decision": "restart",
    }
    (restart,) = records(actions, "restart")
    assert restart.data["cause"] == "exited with status 3"
    assert restart.data["waited"] == 0
    assert policy.status().last_error == "exited with status 3"
    clock.advance(0.05)
    (restarted,) = policy.started(clock.now, 7)
    assert isinstance(restarted, Restarted)
    assert restarted.downtime == pytest.approx(0.05)
    assert policy.state() == "healthy"


def test_repeated_crashes_back_off_exponentially_up_to_the_cap() -> None:
    clock = Clock()
    policy = make(restart=RestartRules(backoff_initial=1, backoff_factor=2, backoff_max=8))
    running(policy, clock)
    delays = []
    for _ in range(7):
        clock.advance(0.5)
        actions = policy.exited(clock.now, "killed by signal 9 (SIGKILL)")
        if starts(actions):
            delays.append(0.0)
        else:
            assert policy.state() == "backoff"
            deadline = policy.next_deadline()
            assert deadline is not None
            delays.append(deadline - clock.now)
            # Nothing happens before the deadline...
            assert policy.tick(deadline - 0.001) == []
            clock.now = deadline
            assert starts(policy.tick(clock.now))
        policy.started(clock.now, 200)
    assert delays == [0, 1, 2, 4, 8, 8, 8]
    assert policy.restarts == 7


def test_backing_off_or_quarantining_a_crashed_agent_holds_it_down() -> None:
    clock = Clock()
    policy = make(restart=RestartRules(quarantine_after=3))
    running(policy, clock)
    assert not any(isinstance(a, HoldAgent) for a in crash(policy, clock))  # immediate restart
    actions = policy.exited(clock.now, "exited with status 1")
    assert HoldAgent("web") in actions
    assert policy.state() == "backoff"
    clock.now = policy.next_deadline() or 0
    policy.tick(clock.now)
    policy.started(clock.now, 5)
    actions = policy.exited(clock.now, "exited with status 1")
    assert HoldAgent("web") in actions
    assert policy.state() == "quarantined"


def test_backoff_resets_after_a_stable_period() -> None:
    clock = Clock()
    policy = make(restart=RestartRules(stable_after=30))
    running(policy, clock)
    crash(policy, clock)
    clock.advance(1)
    assert not starts(policy.exited(clock.now, "exited with status 1"))  # second: back off
    assert policy.failures_in_a_row == 2
    clock.advance(1)
    policy.tick(clock.now)
    policy.started(clock.now, 300)
    assert policy.next_deadline() == clock.now + 30
    clock.advance(29.9)
    policy.tick(clock.now)
    assert policy.failures_in_a_row == 2
    clock.advance(0.1)
    policy.tick(clock.now)
    assert policy.failures_in_a_row == 0
    # The next crash is a first crash again: immediate.
    assert starts(policy.exited(clock.now, "exited with status 1"))


def test_stable_period_counts_from_healthy_not_from_started() -> None:
    clock = Clock()
    policy = make(
        probes=(ProbeRules("http", failures=2),),
        restart=RestartRules(stable_after=10),
    )
    running(policy, clock)
    crash(policy, clock)
    assert policy.failures_in_a_row == 1
    clock.advance(20)  # running, but no probe has passed yet
    policy.tick(clock.now)
    assert policy.failures_in_a_row == 1
    policy.probe_result(clock.now, policy.instance, "http", True)
    clock.advance(10)
    policy.tick(clock.now)
    assert policy.failures_in_a_row == 0


def test_never_gives_up_without_quarantine() -> None:
    clock = Clock()
    policy = make(restart=RestartRules(backoff_initial=1, backoff_max=60))
    running(policy, clock)
    for _ in range(500):
        actions = policy.exited(clock.now, "exited with status 1")
        if not starts(actions):
            deadline = policy.next_deadline()
            assert deadline is not None
            clock.now = deadline
            actions = policy.tick(clock.now)
        assert starts(actions)
        policy.started(clock.now, 1)
    assert policy.restarts == 500
    assert policy.state() == "healthy"


def test_crash_while_starting_is_a_failure() -> None:
    clock = Clock()
    policy = make()
    policy.supervise(clock.now)
    actions = policy.exited(clock.now, "failed to start: No such file or directory")
    assert starts(actions)
    assert policy.failures_in_a_row == 1


def test_exit_code_zero_is_still_a_failure_to_supervise() -> None:
    clock = Clock()
    policy = make()
    running(policy, clock)
    actions = policy.exited(clock.now, "exited with status 0")
    assert starts(actions)


def test_exits_while_stopped_or_backing_off_are_ignored() -> None:
    clock = Clock()
    policy = make()
    assert policy.exited(clock.now, "exited with status 1") == []
    running(policy, clock)
    crash(policy, clock)
    policy.exited(clock.now, "exited with status 1")  # second crash: backoff
    assert policy.state() == "backoff"
    assert policy.exited(clock.now, "exited with status 1") == []
    assert policy.failures_in_a_row == 2


def test_watchdog_kill_is_reported_like_any_failure() -> None:
    clock = Clock()
    policy = make()
    running(policy, clock)
    actions = policy.exited(clock.now, "watchdog timeout (killed by signal 6, SIGABRT)")
    assert starts(actions)
    (alert,) = alerts(actions)
    assert "watchdog timeout" in alert.text


# --- probes: thresholds and grace ------------------------------------------------


def test_probe_threshold_stops_a_hung_agent_then_restarts_it() -> None:
    clock = Clock()
    policy = make(probes=(ProbeRules("http", failures=3),))
    running(policy, clock)
    policy.probe_result(clock.now, policy.instance, "http", True)
    assert policy.state() == "healthy"
    first = policy.probe_result(clock.advance(1), policy.instance, "http", False, "timeout")
    assert records(first, "probe")[0].data == {
        "probe": "http",
        "state": "failing",
        "detail": "timeout",
    }
    assert policy.state() == "unhealthy"
    assert policy.probe_result(clock.advance(1), policy.instance, "http", False, "timeout") == []
    actions = policy.probe_result(clock.advance(1), policy.instance, "http", False, "timeout")
    (stop,) = stops(actions)
    assert "probe http failed 3 times in a row: timeout" in stop.reason
    assert policy.state() == "unhealthy"
    assert not starts(actions)
    # The stop lands: first failure, so the restart is immediate.
    actions = policy.exited(clock.advance(0.01), "killed by signal 15 (SIGTERM)")
    assert starts(actions)
    (restart,) = records(actions, "restart")
    assert "probe http failed" in restart.data["cause"]
    (restarted,) = policy.started(clock.advance(0.01), 9)
    assert isinstance(restarted, Restarted)
    assert restarted.downtime == pytest.approx(0.02)


def test_a_pass_resets_the_probe_count_and_records_recovery() -> None:
    clock = Clock()
    policy = make(probes=(ProbeRules("http", failures=2),))
    running(policy, clock)
    policy.probe_result(clock.now, policy.instance, "http", False, "503")
    actions = policy.probe_result(clock.advance(1), policy.instance, "http", True)
    assert records(actions, "probe")[0].data == {"probe": "http", "state": "passing"}
    policy.probe_result(clock.advance(1), policy.instance, "http", False, "503")
    assert not stops(policy.probe_result(clock.advance(1), policy.instance, "http", True))
    assert policy.state() == "healthy"


def test_failures_during_grace_do_not_count() -> None:
    clock = Clock()
    policy = make(probes=(ProbeRules("http", failures=1, grace=5),))
    running(policy, clock)
    for _ in range(4):
        assert policy.probe_result(clock.advance(1), policy.instance, "http", False) == []
    assert policy.state() == "starting"
    actions = policy.probe_result(clock.advance(1), policy.instance, "http", False, "refused")
    assert stops(actions)


def test_grace_restarts_with_every_instance() -> None:
    clock = Clock()
    policy = make(probes=(ProbeRules("http", failures=1, grace=5),))
    running(policy, clock)
    clock.advance(100)
    crash(policy, clock)
    assert policy.probe_result(clock.advance(1), policy.instance, "http", False) == []


def test_second_hang_in_a_row_backs_off_after_the_stop() -> None:
    clock = Clock()
    policy = make(
        probes=(ProbeRules("http", failures=1),),
        restart=RestartRules(backoff_initial=2),
    )
    running(policy, clock)
    policy.probe_result(clock.now, policy.instance, "http", False, "timeout")
    policy.exited(clock.now, "killed")
    policy.started(clock.now, 5)
    policy.probe_result(clock.advance(1), policy.instance, "http", False, "timeout")
    assert policy.failures_in_a_row == 2
    assert not starts(policy.exited(clock.now, "killed"))
    assert policy.state() == "backoff"
    assert policy.next_deadline() == clock.now + 2


# --- quarantine -------------------------------------------------------------------


def test_quarantine_after_configured_failures_in_a_row() -> None:
    clock = Clock()
    policy = make(restart=RestartRules(backoff_initial=1, quarantine_after=3))
    running(policy, clock)
    crash(policy, clock)
    policy.exited(clock.now, "exited with status 1")
    clock.now = policy.next_deadline() or 0
    policy.tick(clock.now)
    policy.started(clock.now, 3)
    actions = policy.exited(clock.now, "exited with status 1")
    assert policy.state() == "quarantined"
    assert not starts(actions)
    kinds = [a.kind for a in alerts(actions)]
    assert kinds == ["quarantine"]
    assert "keel watch start web" in alerts(actions)[0].text
    assert records(actions, "quarantine")
    assert policy.next_deadline() is None
    assert policy.tick(clock.advance(10_000)) == []
    # The operator lifts it.
    actions = policy.request_start(clock.now)
    assert starts(actions)
    assert policy.failures_in_a_row == 0


def test_quarantine_of_a_hung_agent_stops_it() -> None:
    clock = Clock()
    policy = make(
        probes=(ProbeRules("http", failures=1),),
        restart=RestartRules(quarantine_after=1),
    )
    running(policy, clock)
    actions = policy.probe_result(clock.now, policy.instance, "http", False, "timeout")
    assert stops(actions)
    assert policy.state() == "quarantined"
    assert policy.exited(clock.now, "killed") == []
    assert policy.state() == "quarantined"


# --- operator start and stop, external changes -------------------------------------


def test_operator_stop_and_start() -> None:
    clock = Clock()
    policy = make()
    running(policy, clock)
    actions = policy.request_stop(clock.now)
    assert stops(actions)
    assert policy.state() == "stopped"
    actions = policy.exited(clock.now, "killed by signal 15 (SIGTERM)")
    assert not starts(actions)
    assert records(actions, "exit")[0].data["expected"] is True
    assert policy.request_stop(clock.now) == []
    assert starts(policy.request_start(clock.now))
    assert policy.request_start(clock.now) == []  # already starting


def test_operator_stop_during_backoff_and_start_during_backoff() -> None:
    clock = Clock()
    policy = make()
    running(policy, clock)
    crash(policy, clock)
    policy.exited(clock.now, "exited with status 1")
    assert policy.state() == "backoff"
    actions = policy.request_start(clock.now)
    assert starts(actions)  # the operator does not want to wait
    policy.started(clock.now, 1)
    policy.exited(clock.now, "exited with status 1")
    assert policy.state() == "backoff"
    actions = policy.request_stop(clock.now)
    assert not stops(actions)
    assert policy.state() == "stopped"
    assert policy.next_deadline() is None


def test_operator_stop_cancels_a_pending_restart_of_a_hung_agent() -> None:
    clock = Clock()
    policy = make(probes=(ProbeRules("http", failures=1),))
    running(policy, clock)
    policy.probe_result(clock.now, policy.instance, "http", False)
    policy.request_stop(clock.now)
    assert not starts(policy.exited(clock.now, "killed"))
    assert policy.state() == "stopped"


def test_stop_outside_watch_is_respected() -> None:
    clock = Clock()
    policy = make()
    running(policy, clock)
    crash(policy, clock)
    actions = policy.stopped_externally(clock.now)
    assert policy.state() == "stopped"
    assert records(actions, "stop")[0].data == {"by": "systemd"}
    assert [a.kind for a in alerts(actions)] == ["resolve"]
    assert policy.stopped_externally(clock.now) == []


def test_adopting_a_running_agent_and_external_start() -> None:
    clock = Clock()
    policy = make(probes=(ProbeRules("http"),))
    assert policy.adopt(clock.now, 55, clock.now - 100) == []
    assert policy.status().running_since == clock.now - 100
    assert policy.status().pid == 55
    assert policy.adopt(clock.now, 56, clock.now) == []  # already running
    policy.request_stop(clock.now)
    policy.exited(clock.now, "killed")
    # systemctl start behind watch's back: supervise what runs.
    policy.started(clock.now, 77)
    assert policy.running
    assert policy.status().pid == 77
    policy.started(clock.now, 78)  # main pid learned later
    assert policy.status().pid == 78


def test_operator_start_while_a_stop_is_under_way_starts_it_after_the_exit() -> None:
    # Before: the start was dropped (phase "stopping" ignored it) and the agent
    # stayed stopped although the operator's last word was "start".
    clock = Clock()
    policy = make()
    running(policy, clock)
    policy.request_stop(clock.now)
    actions = policy.request_start(clock.now)
    assert records(actions, "start")[0].data == {"by": "operator"}
    assert not starts(actions)  # not while the old instance still runs
    assert policy.phase is Phase.RESTARTING
    assert policy.state() == "starting"
    assert policy.request_start(clock.now) == []
    actions = policy.exited(clock.now, "killed by signal 15 (SIGTERM)")
    assert records(actions, "exit")[0].data["expected"] is True
    assert starts(actions)
    assert policy.restarts == 0  # the operator's start, not a failure's restart
    policy.started(clock.now, 300)
    assert policy.state() == "healthy"


def test_operator_stop_after_the_start_wins() -> None:
    clock = Clock()
    policy = make()
    running(policy, clock)
    policy.request_stop(clock.now)
    policy.request_start(clock.now)
    actions = policy.request_stop(clock.now)
    assert not stops(actions)  # the first stop is still under way
    assert not starts(policy.exited(clock.now, "killed"))
    assert policy.state() == "stopped"


# --- every phase against every input ---------------------------------------------------

INPUTS = (
    "supervise",
    "adopt",
    "operator start",
    "operator stop",
    "started",
    "exited",
    "stopped elsewhere",
    "probes failed",
    "time passes",
)
_: None = None  # no change
ST, GO, RUN, KILL, STOP, RE, BACK, QUAR = (
    Phase.STOPPED,
    Phase.STARTING,
    Phase.RUNNING,
    Phase.KILLING,
    Phase.STOPPING,
    Phase.RESTARTING,
    Phase.BACKOFF,
    Phase.QUARANTINED,
)
# The rules written out once more, by hand, as a reader would state them (an
# exit in STARTING/RUNNING/KILLING is a first failure: restart at once).
# fmt: off
EXPECTED: dict[Phase, tuple[Phase | None, ...]] = {
    #      supervise adopt start  stop  started exited ext-stop probes time
    ST:   (GO,       RUN,  GO,    _,    RUN,    _,     _,       _,     _),
    GO:   (_,        RUN,  _,     STOP, RUN,    GO,    ST,      _,     _),
    RUN:  (_,        _,    _,     STOP, _,      GO,    ST,      KILL,  _),
    KILL: (_,        _,    _,     STOP, _,      GO,    ST,      _,     _),
    STOP: (_,        _,    RE,    _,    _,      ST,    ST,      _,     _),
    RE:   (_,        _,    _,     STOP, _,      GO,    ST,      _,     _),
    BACK: (_,        RUN,  GO,    ST,   RUN,    _,     ST,      _,     GO),
    QUAR: (_,        RUN,  GO,    ST,   RUN,    _,     _,       _,     _),
}
# fmt: on


def policy_at(phase: Phase, clock: Clock) -> AgentPolicy:
    """A policy brought to ``phase`` by the inputs that lead there in practice."""
    policy = make(
        probes=(ProbeRules("http", failures=1),),
        restart=RestartRules(quarantine_after=1 if phase is QUAR else None),
    )
    if phase is ST:
        return policy
    policy.supervise(clock.now)
    if phase is GO:
        return policy
    policy.started(clock.now, 100)
    if phase is KILL:
        policy.probe_result(clock.now, policy.instance, "http", False)
    elif phase in (STOP, RE):
        policy.request_stop(clock.now)
        if phase is RE:
            policy.request_start(clock.now)
    elif phase is BACK:
        policy.exited(clock.now, "exited with status 1")  # first: restart at once
        policy.exited(clock.now, "exited with status 1")  # second: back off
    elif phase is QUAR:
        policy.exited(clock.now, "exited with status 1")
    return policy


def feed(policy: AgentPolicy, clock: Clock, what: str) -> list[Action]:
    now = clock.now
    if what == "supervise":
        return policy.supervise(now)
    if what == "adopt":
        return policy.adopt(now, 200, now)
    if what == "operator start":
        return policy.request_start(now)
    if what == "operator stop":
        return policy.request_stop(now)
    if what == "started":
        return policy.started(now, 200)
    if what == "exited":
        return policy.exited(now, "exited with status 1")
    if what == "stopped elsewhere":
        return policy.stopped_externally(now)
    if what == "probes failed":
        return policy.probe_result(now, policy.instance, "http", False)
    return policy.tick(clock.advance(3600))


@pytest.mark.parametrize("phase", list(Phase))
def test_each_phase_is_reached_by_real_inputs(phase: Phase) -> None:
    assert policy_at(phase, Clock()).phase is phase


@pytest.mark.parametrize(
    ("phase", "what"), [(phase, what) for phase in EXPECTED for what in INPUTS]
)
def test_every_input_in_every_phase(phase: Phase, what: str) -> None:
    clock = Clock()
    policy = policy_at(phase, clock)
    actions = feed(policy, clock, what)
    expected = EXPECTED[phase][INPUTS.index(what)]
    assert policy.phase is (expected or phase)
    if expected is None and what != "time passes":
        # Ignored inputs change nothing and ask for nothing (a "started" may
        # still tell the pid of what runs).
        assert not starts(actions)
        assert not stops(actions)


def test_the_table_has_every_phase_and_no_dead_end() -> None:
    assert set(TRANSITIONS) == set(Phase)
    for phase, moves in TRANSITIONS.items():
        assert moves, phase
        assert all(target in TRANSITIONS for target in moves.values())


# --- incidents, alerts and flap suppression ----------------------------------------


def test_one_open_and_one_resolve_per_incident_however_many_restarts() -> None:
    clock = Clock()
    policy = make(alerts=AlertRules(resolve_after=30, flap_threshold=100))
    running(policy, clock)
    sent: list[SendAlert] = []
    for _ in range(10):
        actions = policy.exited(clock.advance(0.1), "exited with status 1")
        if not starts(actions):
            clock.now = policy.next_deadline() or 0
            actions += policy.tick(clock.now)
        actions += policy.started(clock.now, 1)
        sent += alerts(actions)
    assert [a.kind for a in sent] == ["open"]
    assert sent[0].text == "web failed: exited with status 1; restarting it now"
    incident = sent[0].incident
    assert policy.status().incident == incident
    deadline = policy.next_deadline()
    assert deadline is not None
    clock.now = deadline
    actions = policy.tick(clock.now)
    # The failure count resets at 30 s as well (stable_after defaults to 30 s).
    assert [a.kind for a in alerts(actions)] == ["resolve"]
    assert alerts(actions)[0].incident == incident
    assert "after 10 restarts" in alerts(actions)[0].text
    assert policy.status().incident is None


def test_incident_does_not_resolve_while_unhealthy() -> None:
    clock = Clock()
    policy = make(probes=(ProbeRules("http", failures=5),), alerts=AlertRules(resolve_after=10))
    running(policy, clock)
    crash(policy, clock)
    for _ in range(30):
        policy.probe_result(clock.advance(1), policy.instance, "http", False, "503")
        if policy.phase.value != "running":
            break
        assert not alerts(policy.tick(clock.now))
    assert policy.status().incident is not None


def test_flapping_alerts_once_then_stays_quiet_until_stable() -> None:
    clock = Clock()
    rules = AlertRules(resolve_after=5, flap_window=100, flap_threshold=3)
    policy = make(alerts=rules, restart=RestartRules(stable_after=5))
    running(policy, clock)
    kinds: list[str] = []
    for _ in range(6):  # crash, recover for 5 s (incident resolves), repeat
        kinds += [a.kind for a in alerts(crash(policy, clock))]
        clock.advance(5)
        kinds += [a.kind for a in alerts(policy.tick(clock.now))]
    assert kinds == ["open", "resolve", "open", "resolve", "flapping"]
    assert policy.status().flapping
    # Quiet for the window after the last incident: "stable".
    deadline = policy.next_deadline()
    assert deadline is not None
    assert policy.tick(deadline - 0.1) == []
    clock.now = deadline
    actions = policy.tick(clock.now)
    assert [a.kind for a in alerts(actions)] == ["stable"]
    assert not policy.status().flapping
    # Afterwards a new incident alerts normally again... until the window fills.
    assert [a.kind for a in alerts(crash(policy, clock))] == ["open"]


def test_quarantine_is_announced_even_while_flapping() -> None:
    clock = Clock()
    policy = make(
        alerts=AlertRules(resolve_after=1, flap_window=1000, flap_threshold=1),
        restart=RestartRules(quarantine_after=1),
    )
    running(policy, clock)
    actions = policy.exited(clock.now, "exited with status 1")
    assert [a.kind for a in alerts(actions)] == ["flapping", "quarantine"]


def test_operator_stop_closes_the_incident_with_a_reason() -> None:
    clock = Clock()
    policy = make()
    running(policy, clock)
    crash(policy, clock)
    actions = policy.request_stop(clock.now)
    (alert,) = alerts(actions)
    assert alert.kind == "resolve"
    assert "stopped by the operator" in alert.text


def test_incident_ids_differ_between_incidents() -> None:
    clock = Clock()
    policy = make(
        alerts=AlertRules(resolve_after=1, flap_threshold=100),
        restart=RestartRules(stable_after=1),
    )
    running(policy, clock)
    ids = []
    for _ in range(3):
        ids.append(alerts(crash(policy, clock))[0].incident)
        clock.advance(1)
        policy.tick(clock.now)
    assert len(set(ids)) == 3


# --- the back-off formula and a model check -------------------------------------------


@settings(deadline=None)  # a loaded machine is slow, not wrong
@given(
    initial=st.floats(0.01, 100),
    factor=st.floats(1, 10),
    cap=st.floats(0.01, 10_000),
    n=st.integers(1, 10_000),
)
def test_delay_is_zero_first_then_monotonic_and_capped(
    initial: float, factor: float, cap: float, n: int
) -> None:
    rules = RestartRules(backoff_initial=initial, backoff_factor=factor, backoff_max=cap)
    assert rules.delay(1) == 0
    assert 0 <= rules.delay(n) <= cap
    assert rules.delay(n) <= rules.delay(n + 1) or n == 1


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0, 50)),
        st.tuples(st.just("exit"), st.just(0)),
        st.tuples(st.just("started"), st.just(0)),
        st.tuples(st.just("probe"), st.booleans()),
        st.tuples(st.just("stop"), st.just(0)),
        st.tuples(st.just("start"), st.just(0)),
        st.tuples(st.just("external_stop"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=examples(300), deadline=None)
@given(events=EVENTS, quarantine=st.sampled_from([None, 2, 5]))
def test_random_event_sequences_keep_the_invariants(
    events: list[tuple[str, object]], quarantine: int | None
) -> None:
    clock = Clock()
    policy = make(
        probes=(ProbeRules("http", failures=2, grace=1),),
        restart=RestartRules(backoff_initial=1, backoff_max=8, quarantine_after=quarantine),
        alerts=AlertRules(resolve_after=3, flap_window=30, flap_threshold=3),
    )
    policy.supervise(clock.now)
    opened: set[str] = set()
    resolved: set[str] = set()
    for event, arg in events:
        if event == "advance":
            assert isinstance(arg, float)
            clock.advance(arg)
            actions = policy.tick(clock.now)
        elif event == "exit":
            actions = policy.exited(clock.now, "exited with status 1")
        elif event == "started":
            actions = policy.started(clock.now, 1)
        elif event == "probe":
            actions = policy.probe_result(clock.now, policy.instance, "http", bool(arg))
        elif event == "stop":
            actions = policy.request_stop(clock.now)
        elif event == "start":
            actions = policy.request_start(clock.now)
        else:
            actions = policy.stopped_externally(clock.now)
        for alert in alerts(actions):
            if alert.kind == "open":
                assert alert.incident not in opened  # one open per incident
                opened.add(alert.incident)
            if alert.kind == "resolve":
                assert alert.incident in opened
                assert alert.incident not in resolved  # one resolve per incident
                resolved.add(alert.incident)
        state = policy.state()
        assert state in ("starting", "healthy", "unhealthy", "backoff", "quarantined", "stopped")
        if state == "backoff":
            deadline = policy.next_deadline()
            assert deadline is not None
            assert deadline <= clock.now + 8
        if quarantine is None:
            assert state != "quarantined"
        if policy.phase in (Phase.STOPPED, Phase.BACKOFF, Phase.QUARANTINED):
            assert policy.status().pid is None
        assert policy.failures_in_a_row >= 0
