"""The switch state machine, driven with a fake clock: every transition of the table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.safeswitch import machine as m
from keel.safeswitch.machine import Phase
from keel.testing import FakeClock

from tests.fuzz import examples

LIMITS = m.Limits(gate=10, deadline=60, commit_timeout=20, rollback_timeout=30)
PLAN = m.Plan("s1", "/nix/store/old", "/nix/store/new", ("watch", "health"))


def fresh(plan: m.Plan = PLAN, limits: m.Limits = LIMITS) -> m.Switch:
    return m.Switch(plan, limits)


def reach(phase: Phase, clock: FakeClock) -> m.Switch:
    """A switch brought to ``phase`` through the real transitions."""
    sw = fresh()
    if phase is Phase.PREFLIGHT:
        return sw
    sw.handle(m.PreflightPassed(), clock())
    if phase is Phase.ARMING:
        return sw
    sw.handle(m.Armed(), clock())
    if phase is Phase.ACTIVATING:
        return sw
    clock.advance(5)
    sw.handle(m.ActivationSucceeded(), clock())
    if phase is Phase.GATING:
        return sw
    for name in PLAN.checks:
        sw.handle(m.CheckPassed(name, "ok"), clock())
    clock.advance(LIMITS.gate)
    sw.tick(clock())
    if phase is Phase.COMMITTING:
        return sw
    if phase is Phase.COMMITTED:
        sw.handle(m.CommitDone(), clock())
        return sw
    sw.handle(m.CommitFailed("boot loader"), clock())
    if phase is Phase.ROLLING_BACK:
        return sw
    if phase is Phase.ROLLED_BACK:
        sw.handle(m.RolledBack(), clock())
        return sw
    if phase is Phase.NEEDS_OPERATOR:
        sw.handle(m.RollbackFailed("exit 1"), clock())
        return sw
    assert phase is Phase.REFUSED
    refused = fresh()
    refused.handle(m.Refused("not a system"), clock())
    return refused


def kinds(actions: list[m.Action]) -> list[str]:
    out = []
    for action in actions:
        name = type(action).__name__
        if isinstance(action, m.Record | m.SendAlert):
            name += f"({action.kind})"
        if isinstance(action, m.RollBack):
            name += "(restore)" if action.restore_profile else "()"
        out.append(name)
    return out


def deadline_passed(sw: m.Switch, clock: FakeClock) -> list[m.Action]:
    deadline = sw.deadline()
    assert deadline is not None
    clock.set(deadline)
    return sw.tick(clock())


def gate_held(sw: m.Switch, clock: FakeClock) -> list[m.Action]:
    holds_at = sw.gate.holds_at
    assert holds_at is not None
    for name in PLAN.checks:
        sw.handle(m.CheckPassed(name, "ok"), clock())
    clock.set(holds_at)
    return sw.tick(clock())


Feed = Callable[[m.Switch, FakeClock], list[m.Action]]


def event(ev: m.Event) -> Feed:
    return lambda sw, clock: sw.handle(ev, clock())


TAKEN = m.TakenOver("timer", "the switcher is gone")

# (phase, event type) -> how to feed it, the phase after, the actions in order.
EXPECTED: dict[tuple[Phase, type[m.Event]], tuple[Feed, Phase, list[str]]] = {
    (Phase.PREFLIGHT, m.PreflightPassed): (event(m.PreflightPassed()), Phase.ARMING, ["Arm"]),
    (Phase.PREFLIGHT, m.Refused): (event(m.Refused("x")), Phase.REFUSED, []),
    (Phase.ARMING, m.Armed): (event(m.Armed()), Phase.ACTIVATING, ["Activate"]),
    (Phase.ARMING, m.Refused): (event(m.Refused("no timer")), Phase.REFUSED, []),
    (Phase.ARMING, m.TakenOver): (
        event(TAKEN),
        Phase.ROLLING_BACK,
        ["StopActivation", "RollBack()"],
    ),
    (Phase.ACTIVATING, m.ActivationSucceeded): (
        event(m.ActivationSucceeded()),
        Phase.GATING,
        ["OpenGate"],
    ),
    (Phase.ACTIVATING, m.ActivationFailed): (
        event(m.ActivationFailed("exit 1")),
        Phase.ROLLING_BACK,
        ["RollBack()"],
    ),
    (Phase.ACTIVATING, m.DeadlinePassed): (
        deadline_passed,
        Phase.ROLLING_BACK,
        ["StopActivation", "RollBack()"],
    ),
    (Phase.ACTIVATING, m.Interrupted): (
        event(m.Interrupted("SIGINT")),
        Phase.ROLLING_BACK,
        ["StopActivation", "RollBack()"],
    ),
    (Phase.ACTIVATING, m.TakenOver): (
        event(TAKEN),
        Phase.ROLLING_BACK,
        ["StopActivation", "RollBack()"],
    ),
    (Phase.GATING, m.CheckPassed): (event(m.CheckPassed("watch")), Phase.GATING, []),
    (Phase.GATING, m.CheckPending): (event(m.CheckPending("watch")), Phase.GATING, []),
    (Phase.GATING, m.CheckFailed): (
        event(m.CheckFailed("health", "exit 1")),
        Phase.ROLLING_BACK,
        ["CloseGate", "RollBack()"],
    ),
    (Phase.GATING, m.GateHeld): (gate_held, Phase.COMMITTING, ["CloseGate", "Commit"]),
    (Phase.GATING, m.DeadlinePassed): (
        deadline_passed,
        Phase.ROLLING_BACK,
        ["CloseGate", "RollBack()"],
    ),
    (Phase.GATING, m.Interrupted): (
        event(m.Interrupted("SIGTERM")),
        Phase.ROLLING_BACK,
        ["CloseGate", "RollBack()"],
    ),
    (Phase.GATING, m.TakenOver): (event(TAKEN), Phase.ROLLING_BACK, ["CloseGate", "RollBack()"]),
    (Phase.COMMITTING, m.CommitDone): (
        event(m.CommitDone()),
        Phase.COMMITTED,
        ["Disarm", "Record(committed)", "ReleaseRoots"],
    ),
    (Phase.COMMITTING, m.CommitFailed): (
        event(m.CommitFailed("boot")),
        Phase.ROLLING_BACK,
        ["RollBack(restore)"],
    ),
    (Phase.COMMITTING, m.DeadlinePassed): (
        deadline_passed,
        Phase.ROLLING_BACK,
        ["StopCommit", "RollBack(restore)"],
    ),
    (Phase.COMMITTING, m.Interrupted): (event(m.Interrupted("SIGINT")), Phase.COMMITTING, []),
    (Phase.COMMITTING, m.TakenOver): (
        event(TAKEN),
        Phase.ROLLING_BACK,
        ["StopCommit", "RollBack(restore)"],
    ),
    (Phase.ROLLING_BACK, m.RolledBack): (
        event(m.RolledBack()),
        Phase.ROLLED_BACK,
        ["Disarm", "Record(rolled-back)", "SendAlert(rolled-back)", "ReleaseRoots"],
    ),
    (Phase.ROLLING_BACK, m.RollbackFailed): (
        event(m.RollbackFailed("exit 1")),
        Phase.NEEDS_OPERATOR,
        ["Disarm", "Record(rollback-failed)", "SendAlert(rollback-failed)"],
    ),
    (Phase.ROLLING_BACK, m.DeadlinePassed): (
        deadline_passed,
        Phase.NEEDS_OPERATOR,
        ["StopRollback", "Disarm", "Record(rollback-failed)", "SendAlert(rollback-failed)"],
    ),
    (Phase.ROLLING_BACK, m.Interrupted): (event(m.Interrupted("SIGINT")), Phase.ROLLING_BACK, []),
    (Phase.ROLLING_BACK, m.TakenOver): (
        event(TAKEN),
        Phase.ROLLING_BACK,
        ["StopRollback", "RollBack(restore)"],
    ),
}

ALL_PAIRS = [(phase, ev) for phase, table in m.TRANSITIONS.items() for ev in table]
EVENT_TYPES = sorted(
    {ev for table in m.TRANSITIONS.values() for ev in table}, key=lambda t: t.__name__
)


def test_every_transition_of_the_table_is_tested_here() -> None:
    assert set(EXPECTED) == set(ALL_PAIRS)


@pytest.mark.parametrize(
    ("phase", "event_type"), ALL_PAIRS, ids=[f"{p.value}-{e.__name__}" for p, e in ALL_PAIRS]
)
def test_transition(phase: Phase, event_type: type[m.Event]) -> None:
    clock = FakeClock()
    sw = reach(phase, clock)
    assert sw.phase is phase
    feed, target, actions = EXPECTED[(phase, event_type)]
    assert target is m.TRANSITIONS[phase][event_type]
    assert kinds(feed(sw, clock)) == actions
    assert sw.phase is target


ILLEGAL = [(phase, ev) for phase in Phase for ev in EVENT_TYPES if ev not in m.TRANSITIONS[phase]]


def _instance(event_type: type[m.Event]) -> m.Event:
    samples: dict[type[m.Event], m.Event] = {
        m.Refused: m.Refused("x"),
        m.ActivationFailed: m.ActivationFailed("x"),
        m.CheckPassed: m.CheckPassed("watch"),
        m.CheckPending: m.CheckPending("watch"),
        m.CheckFailed: m.CheckFailed("watch"),
        m.Interrupted: m.Interrupted("SIGINT"),
        m.CommitFailed: m.CommitFailed("x"),
        m.RollbackFailed: m.RollbackFailed("x"),
        m.TakenOver: TAKEN,
    }
    return samples.get(event_type) or event_type()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("phase", "event_type"), ILLEGAL, ids=[f"{p.value}-{e.__name__}" for p, e in ILLEGAL]
)
def test_an_event_the_phase_does_not_accept_is_a_local_error(
    phase: Phase, event_type: type[m.Event]
) -> None:
    clock = FakeClock()
    sw = reach(phase, clock)
    with pytest.raises(m.LocalProtocolError):
        sw.handle(_instance(event_type), clock())
    assert sw.phase is phase


@pytest.mark.parametrize(
    ("phase", "code"),
    [(Phase.COMMITTED, 0), (Phase.ROLLED_BACK, 1), (Phase.REFUSED, 2), (Phase.NEEDS_OPERATOR, 3)],
)
def test_exit_codes(phase: Phase, code: int) -> None:
    sw = reach(phase, FakeClock())
    assert sw.finished
    assert sw.exit_code == code
    assert sw.next_wakeup(0.0) is None


# --- time -----------------------------------------------------------------------------------


def test_nothing_happens_before_a_deadline() -> None:
    clock = FakeClock()
    sw = reach(Phase.ACTIVATING, FakeClock(clock()))
    armed = sw.timeline.armed_at
    assert armed is not None
    assert sw.next_wakeup(clock()) == armed + LIMITS.deadline
    assert sw.tick(armed + LIMITS.deadline - 0.001) == []
    assert sw.phase is Phase.ACTIVATING
    assert kinds(sw.tick(armed + LIMITS.deadline)) == ["StopActivation", "RollBack()"]
    assert "did not finish within the deadline (60 s)" in sw.reason


def test_the_gate_holds_only_when_every_check_passed_after_the_whole_gate() -> None:
    clock = FakeClock()
    sw = reach(Phase.GATING, clock)
    opened = clock()
    assert sw.next_wakeup(clock()) == opened + LIMITS.gate
    sw.handle(m.CheckPassed("watch", "2 agents healthy"), clock())
    clock.advance(LIMITS.gate)
    # health has no result yet: the gate waits (no commit at the hold time)...
    assert sw.tick(clock()) == []
    sw.handle(m.CheckPending("health", "starting"), clock())
    assert sw.phase is Phase.GATING
    # ...and holds at the first result that completes it, not at the next tick.
    clock.advance(1)
    assert kinds(sw.handle(m.CheckPassed("health"), clock())) == ["CloseGate", "Commit"]
    assert sw.phase.value == "committing"


def test_a_pending_check_keeps_the_gate_open_until_the_deadline() -> None:
    clock = FakeClock()
    sw = reach(Phase.GATING, clock)
    sw.handle(m.CheckPassed("watch"), clock())
    sw.handle(m.CheckPending("health", "agent web starting"), clock())
    clock.advance(LIMITS.gate)
    assert sw.tick(clock()) == []
    assert sw.next_wakeup(clock()) == sw.deadline()
    actions = deadline_passed(sw, clock)
    assert kinds(actions) == ["CloseGate", "RollBack()"]
    assert "the gate did not hold before the deadline" in sw.reason
    assert "health (pending: agent web starting)" in sw.reason
    assert sw.failed_checks == [{"name": "health", "detail": "agent web starting"}]


def test_a_check_that_passed_and_then_failed_rolls_back() -> None:
    clock = FakeClock()
    sw = reach(Phase.GATING, clock)
    sw.handle(m.CheckPassed("health"), clock())
    clock.advance(3)
    sw.handle(m.CheckFailed("health", "exited with status 1"), clock())
    assert sw.phase is Phase.ROLLING_BACK
    assert sw.reason == "check health failed: exited with status 1"
    record = next(a for a in _finish_rollback(sw, clock) if isinstance(a, m.Record))
    assert record.kind == "rolled-back"
    assert record.data["failed_checks"] == [{"name": "health", "detail": "exited with status 1"}]
    assert record.data["old"] == PLAN.old
    assert record.data["new"] == PLAN.new
    assert record.data["by"] == "switcher"


def _finish_rollback(sw: m.Switch, clock: FakeClock) -> list[m.Action]:
    return sw.handle(m.RolledBack(), clock())


def test_a_gate_without_checks_is_a_wait_and_a_zero_gate_commits_at_once() -> None:
    clock = FakeClock()
    waiting = m.Switch(m.Plan("s", "o", "n"), m.Limits(gate=5, deadline=10))
    waiting.handle(m.PreflightPassed(), clock())
    waiting.handle(m.Armed(), clock())
    assert kinds(waiting.handle(m.ActivationSucceeded(), clock())) == ["OpenGate"]
    clock.advance(5)
    assert kinds(waiting.tick(clock())) == ["CloseGate", "Commit"]

    instant = m.Switch(m.Plan("s", "o", "n"), m.Limits(gate=0, deadline=10))
    instant.handle(m.PreflightPassed(), clock())
    instant.handle(m.Armed(), clock())
    assert kinds(instant.handle(m.ActivationSucceeded(), clock())) == [
        "OpenGate",
        "CloseGate",
        "Commit",
    ]


def test_an_activation_that_ends_after_the_deadline_rolls_back_at_once() -> None:
    clock = FakeClock()
    sw = reach(Phase.ACTIVATING, clock)
    clock.advance(LIMITS.deadline + 1)  # the event is handled before any tick
    actions = sw.handle(m.ActivationSucceeded(), clock())
    assert kinds(actions) == ["OpenGate", "CloseGate", "RollBack()"]
    assert sw.phase is Phase.ROLLING_BACK


def test_commit_and_rollback_have_their_own_limits() -> None:
    clock = FakeClock()
    sw = reach(Phase.COMMITTING, clock)
    assert sw.deadline() == clock() + LIMITS.commit_timeout
    deadline_passed(sw, clock)
    assert sw.reason == "commit did not finish within 20 s"
    assert sw.restore_profile
    assert sw.deadline() == clock() + LIMITS.rollback_timeout
    deadline_passed(sw, clock)
    assert sw.phase is Phase.NEEDS_OPERATOR
    assert sw.reason.endswith("then the rollback failed: the rollback did not finish within 30 s")


def test_interrupts_while_committing_or_rolling_back_are_counted_not_obeyed() -> None:
    clock = FakeClock()
    sw = reach(Phase.COMMITTING, clock)
    sw.handle(m.Interrupted("SIGINT"), clock())
    sw.handle(m.CommitFailed("x"), clock())
    sw.handle(m.Interrupted("SIGINT"), clock())
    assert sw.interrupts_ignored == 2
    assert sw.phase is Phase.ROLLING_BACK


def test_a_takeover_records_who_rolled_back() -> None:
    clock = FakeClock()
    sw = m.Switch.resume(PLAN, LIMITS, Phase.GATING)
    sw.handle(m.TakenOver("operator", "rolled back by an operator"), clock())
    record = next(a for a in sw.handle(m.RolledBack(), clock()) if isinstance(a, m.Record))
    assert record.data["by"] == "operator"
    assert record.data["reason"] == "rolled back by an operator"


def test_a_resumed_rollback_keeps_the_profile_restore() -> None:
    sw = m.Switch.resume(PLAN, LIMITS, Phase.ROLLING_BACK, restore_profile=True)
    assert kinds(sw.handle(TAKEN, 0.0)) == ["StopRollback", "RollBack(restore)"]


def test_a_finished_switch_cannot_be_resumed() -> None:
    with pytest.raises(m.LocalProtocolError):
        m.Switch.resume(PLAN, LIMITS, Phase.COMMITTED)


def test_the_committed_record_carries_both_systems_and_timings() -> None:
    clock = FakeClock()
    sw = reach(Phase.COMMITTING, clock)
    record = next(a for a in sw.handle(m.CommitDone(), clock()) if isinstance(a, m.Record))
    assert record.kind == "committed"
    assert record.data == {
        "old": PLAN.old,
        "new": PLAN.new,
        "seconds": 15.0,
        "activation_seconds": 5.0,
        "checks": ["watch", "health"],
    }


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        (m.Limits(gate=30, deadline=30), "must be longer than the gate"),
        (m.Limits(gate=-1, deadline=30), "gate must be a number of seconds >= 0"),
        (m.Limits(gate=1, deadline=30, commit_timeout=0), "must be > 0"),
        (m.Limits(gate=float("nan"), deadline=30), "gate must be"),
    ],
)
def test_limits_that_cannot_work_are_refused(limits: m.Limits, problem: str) -> None:
    assert problem in (limits.problem() or "")
    with pytest.raises(ValueError, match=r"\w"):
        m.Switch(PLAN, limits)


# --- the gate alone ---------------------------------------------------------------------------


def test_gate_reports_before_opening_or_for_unknown_checks_are_errors() -> None:
    gate = m.Gate(["a"], 1)
    with pytest.raises(m.LocalProtocolError):
        gate.report("a", "pass", "", 0)
    gate.open(0)
    with pytest.raises(m.LocalProtocolError):
        gate.report("b", "pass", "", 0)
    with pytest.raises(ValueError, match="unique"):
        m.Gate(["a", "a"], 1)


def test_the_first_failure_is_kept() -> None:
    gate = m.Gate(["a", "b"], 1)
    gate.open(0)
    gate.report("a", "fail", "first", 0.5)
    gate.report("b", "fail", "second", 0.6)
    gate.report("a", "pass", "", 2)
    assert gate.failure is not None
    assert gate.failure.detail == "first"
    assert not gate.held(5)


# --- properties over any order of events --------------------------------------------------------

EVENTS = st.sampled_from(
    [
        m.ActivationSucceeded(),
        m.ActivationFailed("x"),
        m.CheckPassed("watch"),
        m.CheckPassed("health"),
        m.CheckPending("health"),
        m.CheckFailed("watch", "x"),
        m.Interrupted("SIGINT"),
        m.CommitDone(),
        m.CommitFailed("x"),
        m.RolledBack(),
        m.RollbackFailed("x"),
        m.TakenOver("timer", "x"),
    ]
)
STEPS = st.lists(st.tuples(EVENTS, st.floats(min_value=0, max_value=40)), max_size=40)


@settings(max_examples=examples(300), deadline=None)
@given(STEPS)
def test_any_run_keeps_the_promises(steps: list[tuple[m.Event, float]]) -> None:
    clock = FakeClock()
    sw = fresh()
    actions = sw.handle(m.PreflightPassed(), clock()) + sw.handle(m.Armed(), clock())
    failed_check = False
    for ev, wait in steps:
        clock.advance(wait)
        actions += sw.tick(clock())
        if type(ev) in m.TRANSITIONS[sw.phase]:
            if isinstance(ev, m.CheckFailed) and sw.phase is Phase.GATING:
                failed_check = True
            before = sw.phase
            new = sw.handle(ev, clock())
            if any(isinstance(a, m.Commit) for a in new):
                # A commit only ever follows a held gate.
                assert before is Phase.GATING
                assert sw.gate.failure is None
                assert all(c.verdict == "pass" for c in sw.gate.checks.values())
                hold = sw.gate.holds_at
                assert hold is not None
                assert clock() >= hold
            actions += new
    if failed_check:
        assert sw.phase is not Phase.COMMITTED
        assert not any(isinstance(a, m.Commit) for a in actions)
    disarms = sum(isinstance(a, m.Disarm) for a in actions)
    if sw.finished:
        assert disarms == 1  # every decided switch stops its timer, once
        records = [a.kind for a in actions if isinstance(a, m.Record)]
        assert len(records) == 1
        assert (
            records[0]
            == {
                Phase.COMMITTED: "committed",
                Phase.ROLLED_BACK: "rolled-back",
                Phase.NEEDS_OPERATOR: "rollback-failed",
            }[sw.phase]
        )
        # The old system stays rooted when the host needs an operator.
        released = any(isinstance(a, m.ReleaseRoots) for a in actions)
        assert released == (sw.phase is not Phase.NEEDS_OPERATOR)
    else:
        assert disarms == 0


def test_records_stay_metadata_however_long_the_reason() -> None:
    clock = FakeClock()
    sw = reach(Phase.ACTIVATING, clock)
    sw.handle(m.ActivationFailed("x" * 100_000), clock())
    record = next(a for a in sw.handle(m.RolledBack(), clock()) if isinstance(a, m.Record))
    assert len(record.data["reason"]) == m.MAX_REASON
    assert record.data["reason"].endswith("…")
