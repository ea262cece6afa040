"""How watch follows a systemd unit (keel.watch.unit_state), without D-Bus: every transition.

Property sets below are what systemd 252 publishes for a unit in that state
(the values watch reads: ActiveState, SubState, MainPID, Result, ExecMain*,
InactiveExitTimestampMonotonic, Restart, StartLimit*).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.testing import FakeClock
from keel.watch.unit_state import (
    ON_SEEN,
    Changed,
    ConfirmStart,
    Event,
    Exited,
    HoldRequested,
    IssueJob,
    JobQueued,
    JobRefused,
    JobRemoved,
    Loaded,
    Output,
    Refreshed,
    Report,
    ResetFailed,
    Seen,
    StartConfirmed,
    Started,
    StartRequested,
    StoppedExternally,
    StopRequested,
    UnitPhase,
    UnitState,
    describe_result,
    seen,
)

from tests.fuzz import examples

P = UnitPhase
UNIT = "agent-web.service"
START = IssueJob("StartUnit", "start")
RESTART = IssueJob("RestartUnit", "start")
STOP = IssueJob("StopUnit", "stop")


def props(active: str, sub: str, stamp: int = 1_000, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "ActiveState": active,
        "SubState": sub,
        "InactiveExitTimestampMonotonic": stamp,
        "MainPID": 0,
        "Result": "success",
    }
    values.update(extra)
    return values


INACTIVE = props("inactive", "dead")
ACTIVATING = props("activating", "start", stamp=2_000, MainPID=41)
ACTIVE = props("active", "running", stamp=2_000, MainPID=42)
KILLED = props("failed", "failed", stamp=2_000, Result="signal", ExecMainCode=2, ExecMainStatus=9)
STOPPED_BY_SOMEONE = props("deactivating", "stop-sigterm", stamp=2_000, MainPID=42)


def phase(state: UnitState) -> UnitPhase:
    """The phase, read through a call (mypy would narrow ``state.phase`` across events)."""
    return state.phase


def unit(*, clock: FakeClock | None = None, **loaded: Any) -> UnitState:
    state = UnitState(UNIT, clock=clock or FakeClock())
    assert state.handle(Loaded(INACTIVE | loaded)) == []
    return state


def change(state: UnitState, values: dict[str, Any]) -> list[Output]:
    return state.handle(Changed(values))


# --- getting to each phase -------------------------------------------------------------------


def at(phase: UnitPhase) -> UnitState:
    """A unit brought to ``phase`` by the events that lead there in practice."""
    if phase is P.HOLDING:
        state = unit(Restart="always")
        assert state.handle(HoldRequested()) == [STOP]
        return state
    state = unit()
    if phase is P.DOWN:
        return state
    assert state.handle(StartRequested()) == [START]
    if phase is P.START_ASKED:
        return state
    if phase is P.CANCELLING:
        assert state.handle(StopRequested()) == [STOP]
        return state
    assert change(state, ACTIVATING) == []
    if phase is P.START_SEEN:
        return state
    assert change(state, ACTIVE) == [Started(42)]
    if phase is P.STOPPING:
        assert state.handle(StopRequested()) == [STOP]
    elif phase is P.STOPPED_ELSEWHERE:
        assert change(state, STOPPED_BY_SOMEONE) == []
    return state


@pytest.mark.parametrize("phase", list(UnitPhase))
def test_every_phase_is_reached_by_real_events(phase: UnitPhase) -> None:
    assert at(phase).phase is phase


# Property sets that read as each Seen (DOWN_SINCE_START needs a start: see below).
SHOWING = {
    Seen.ACTIVE: ACTIVE,
    Seen.ACTIVATING: ACTIVATING,
    Seen.DEACTIVATING: props("deactivating", "stop-sigterm", stamp=2_000, Result="signal"),
    Seen.STOPPED_ON_PURPOSE: STOPPED_BY_SOMEONE,
    Seen.AUTO_RESTART: props("activating", "auto-restart", stamp=1_000, Restart="always"),
    Seen.DOWN: INACTIVE,
    Seen.OTHER: props("maintenance", "maintenance"),
}


@pytest.mark.parametrize("what", list(SHOWING))
def test_properties_read_as_what_they_show(what: Seen) -> None:
    assert seen(SHOWING[what]) is what


def test_down_since_the_start_needs_a_moved_stamp() -> None:
    assert seen(KILLED) is Seen.DOWN  # no start asked
    assert seen(KILLED, 1_000) is Seen.DOWN_SINCE_START
    assert seen(KILLED, 2_000) is Seen.DOWN  # left "inactive" before the start was asked
    assert seen(KILLED | {"InactiveExitTimestampMonotonic": 0}, 1_000) is Seen.DOWN
    assert seen(KILLED, None) is Seen.DOWN_SINCE_START


@pytest.mark.parametrize(
    ("phase", "what"),
    [(phase, what) for phase in UnitPhase for what in SHOWING],
)
def test_each_state_change_in_each_phase_follows_the_table(phase: UnitPhase, what: Seen) -> None:
    state = at(phase)
    outputs = change(state, SHOWING[what])
    if phase is P.START_ASKED and what is Seen.AUTO_RESTART:
        assert (state.phase, outputs) == (P.START_ASKED, [])  # the special case (see below)
        return
    expected_phase, reports = ON_SEEN[phase].get(what, (phase, ()))
    assert state.phase is expected_phase
    assert [type(o) for o in outputs] == [
        {
            Report.STARTED: Started,
            Report.EXITED: Exited,
            Report.STOPPED_EXTERNALLY: StoppedExternally,
        }[r]
        for r in reports
    ]


# --- starting ------------------------------------------------------------------------------


def test_a_start_is_reported_once_the_unit_runs() -> None:
    state = unit()
    assert state.handle(StartRequested()) == [START]
    assert state.handle(JobQueued("/job/1", "start")) == []
    assert change(state, ACTIVATING) == []
    assert phase(state) is P.START_SEEN
    assert change(state, ACTIVE) == [Started(42)]
    assert state.handle(JobRemoved("/job/1", "done")) == []
    assert phase(state) is P.RUNNING


def test_a_unit_with_restart_is_started_with_a_restart_job() -> None:
    # RestartUnit cancels systemd's pending restart timer; StartUnit would wait for it.
    assert unit(Restart="always").handle(StartRequested()) == [RESTART]
    waiting = unit()
    change(waiting, props("activating", "auto-restart"))
    assert waiting.handle(StartRequested()) == [RESTART]


def test_a_start_joins_a_start_under_way_without_counting_it() -> None:
    state = unit(StartLimitIntervalUSec=10_000_000, StartLimitBurst=3)
    change(state, ACTIVATING)
    for _ in range(5):
        assert state.handle(StartRequested()) == [START]  # never a ResetFailed


def test_a_start_while_systemd_already_restarted_it_reports_what_runs() -> None:
    state = unit(Restart="always")
    change(state, ACTIVE)  # systemd's Restart= got there first (reported as adopted)
    assert state.handle(StartRequested()) == [Started(42)]
    assert phase(state) is P.RUNNING


def test_a_start_that_fails_before_running_is_an_exit() -> None:
    state = at(P.START_SEEN)
    failed = props("failed", "failed", stamp=2_000, Result="exit-code", ExecMainCode=1)
    assert change(state, failed | {"ExecMainStatus": 203}) == [Exited("exited with status 203")]
    assert phase(state) is P.DOWN


def test_coalesced_failed_activating_failed_is_judged_by_the_inactive_exit_stamp() -> None:
    # The unit was failed (stamp 1000) when the start was asked; it then started
    # and failed again between two signals: only "failed" arrives, with a new stamp.
    state = unit(**props("failed", "failed", stamp=1_000, Result="exit-code"))
    assert state.handle(StartRequested()) == [START]
    assert change(state, KILLED) == [Exited("killed by signal 9 (SIGKILL)")]
    assert phase(state) is P.DOWN


def test_a_stale_failed_signal_does_not_fail_the_start() -> None:
    # "failed" with the stamp the unit had when the start was asked: our start has
    # not acted yet (the signal was sent before it).
    state = unit(**props("failed", "failed", stamp=1_000, Result="exit-code"))
    state.handle(StartRequested())
    assert change(state, props("failed", "failed", stamp=1_000, Result="exit-code")) == []
    assert phase(state) is P.START_ASKED
    assert change(state, ACTIVE) == [Started(42)]


def test_a_unit_object_recreated_after_reset_failed_has_stamp_zero() -> None:
    state = unit(**props("failed", "failed", stamp=1_000, Result="exit-code"))
    state.handle(StartRequested())
    assert change(state, props("inactive", "dead", stamp=0)) == []
    assert phase(state) is P.START_ASKED


def test_entering_auto_restart_is_not_the_start_watch_asked_for() -> None:
    # Entering auto-restart moves the stamp (the unit leaves "failed"); a failed
    # signal with that stamp must not count as our start failing.
    state = unit(Restart="always", **props("failed", "failed", stamp=1_000))
    assert state.handle(StartRequested()) == [RESTART]
    assert change(state, props("activating", "auto-restart", stamp=1_500)) == []
    assert phase(state) is P.START_ASKED
    assert change(state, props("failed", "failed", stamp=1_500)) == []
    assert phase(state) is P.START_ASKED
    assert change(state, props("failed", "failed", stamp=1_800, Result="exit-code")) == [
        Exited("failed (exit-code)")
    ]


def test_after_the_start_is_seen_auto_restart_is_the_start_failing() -> None:
    state = unit(Restart="always")
    state.handle(StartRequested())
    change(state, ACTIVATING)
    outputs = change(state, props("activating", "auto-restart", stamp=2_500, Result="exit-code"))
    assert outputs == [Exited("failed (exit-code)")]


def test_a_start_job_done_yet_never_seen_activating_is_confirmed_first() -> None:
    state = at(P.START_ASKED)
    state.handle(JobQueued("/job/7", "start"))
    assert state.handle(JobRemoved("/job/7", "done")) == [ConfirmStart()]
    assert phase(state) is P.START_ASKED
    assert state.handle(Refreshed(INACTIVE)) == []
    assert state.handle(StartConfirmed()) == [
        Exited(f"{UNIT} did not start (did a Condition...= check fail?)")
    ]
    assert phase(state) is P.DOWN


def test_a_confirmation_that_finds_the_unit_running_reports_it() -> None:
    state = at(P.START_ASKED)
    state.handle(JobQueued("/job/7", "start"))
    assert state.handle(JobRemoved("/job/7", "done")) == [ConfirmStart()]
    assert state.handle(Refreshed(ACTIVE)) == [Started(42)]
    assert state.handle(StartConfirmed()) == []
    assert phase(state) is P.RUNNING


def test_a_confirmation_that_cannot_read_the_unit_still_judges() -> None:
    state = at(P.START_ASKED)
    state.handle(JobQueued("/job/7", "start"))
    state.handle(JobRemoved("/job/7", "skipped"))
    assert [type(o) for o in state.handle(StartConfirmed())] == [Exited]


def test_a_failed_start_job_is_an_exit_with_its_result() -> None:
    state = at(P.START_ASKED)
    state.handle(JobQueued("/job/8", "start"))
    assert state.handle(JobRemoved("/job/8", "dependency")) == [
        Exited("start job dependency (stopped (the unit went inactive without a failure))")
    ]


def test_a_start_job_ending_after_the_unit_was_seen_changes_nothing() -> None:
    state = at(P.START_SEEN)
    state.handle(JobQueued("/job/9", "start"))
    assert state.handle(JobRemoved("/job/9", "failed")) == []
    assert phase(state) is P.START_SEEN


def test_jobs_watch_did_not_queue_are_ignored() -> None:
    state = at(P.START_ASKED)
    assert state.handle(JobRemoved("/job/other", "failed")) == []
    assert phase(state) is P.START_ASKED


def test_a_refused_start_is_an_exit() -> None:
    state = at(P.START_ASKED)
    outputs = state.handle(JobRefused("start", "org.freedesktop.systemd1.NoSuchUnit: no"))
    assert outputs == [
        Exited(f"systemd refused to start {UNIT}: org.freedesktop.systemd1.NoSuchUnit: no")
    ]
    assert phase(state) is P.DOWN
    assert at(P.RUNNING).handle(JobRefused("start", "late")) == []


# --- systemd's start limit -------------------------------------------------------------------


def test_reset_failed_only_when_a_start_could_hit_the_start_limit() -> None:
    clock = FakeClock()
    limits = {"StartLimitIntervalUSec": 10_000_000, "StartLimitBurst": 5}
    state = unit(clock=clock, **limits)
    # A margin of two below the burst: systemd's own Restart= starts count too.
    for _ in range(3):
        assert state.handle(StartRequested()) == [START]
        change(state, KILLED | {"InactiveExitTimestampMonotonic": 5_000 + _})
        clock.advance(1)
    assert state.handle(StartRequested()) == [ResetFailed(), START]
    # The count starts again after the reset.
    change(state, KILLED | {"InactiveExitTimestampMonotonic": 9_000})
    assert state.handle(StartRequested()) == [START]


def test_starts_older_than_the_interval_do_not_count() -> None:
    clock = FakeClock()
    state = unit(clock=clock, StartLimitIntervalUSec=10_000_000, StartLimitBurst=5)
    for n in range(10):
        assert state.handle(StartRequested()) == [START]
        change(state, KILLED | {"InactiveExitTimestampMonotonic": 5_000 + n})
        clock.advance(4)  # three starts span 8 s < 10 s; the fourth is 12 s after the first


def test_a_unit_that_hit_the_start_limit_is_reset_before_the_start() -> None:
    state = unit(StartLimitIntervalUSec=10_000_000, StartLimitBurst=5, Result="start-limit-hit")
    assert state.handle(StartRequested()) == [ResetFailed(), START]


def test_no_start_limit_no_reset() -> None:
    state = unit(StartLimitIntervalUSec=0, StartLimitBurst=5)
    for n in range(10):
        assert state.handle(StartRequested()) == [START]
        change(state, KILLED | {"InactiveExitTimestampMonotonic": 5_000 + n})


# --- running, crashing, being stopped ---------------------------------------------------------


def test_a_crash_is_an_exit_with_its_cause() -> None:
    state = at(P.RUNNING)
    # systemd publishes "deactivating" without a main process while it cleans up.
    assert change(state, props("deactivating", "stop-sigterm", stamp=2_000, Result="signal")) == []
    assert change(state, KILLED) == [Exited("killed by signal 9 (SIGKILL)")]
    assert phase(state) is P.DOWN


def test_a_watchdog_kill_is_not_mistaken_for_a_stop() -> None:
    # The main process still lives while systemd kills it, but Result says why.
    state = at(P.RUNNING)
    dying = props("deactivating", "stop-watchdog", stamp=2_000, MainPID=42, Result="watchdog")
    assert change(state, dying) == []
    assert phase(state) is P.RUNNING
    dead = props("failed", "failed", stamp=2_000, Result="watchdog", ExecMainCode=2)
    assert change(state, dead | {"ExecMainStatus": 6}) == [
        Exited("watchdog timeout: no WATCHDOG=1 within WatchdogSec (killed by signal 6 (SIGABRT))")
    ]


def test_systemctl_stop_is_seen_by_the_live_main_pid_and_a_success_result() -> None:
    state = at(P.RUNNING)
    assert change(state, STOPPED_BY_SOMEONE) == []
    assert phase(state) is P.STOPPED_ELSEWHERE
    assert change(state, INACTIVE | {"InactiveExitTimestampMonotonic": 2_000}) == [
        StoppedExternally()
    ]
    assert phase(state) is P.DOWN
    # ...and a later systemctl start is adopted.
    assert change(state, ACTIVE | {"MainPID": 50}) == [Started(50)]


def test_a_restart_whose_inactive_state_was_never_seen_is_a_stop_then_a_start() -> None:
    # Without this the phase would stay "stopped elsewhere", and the next crash
    # would be reported as a stop (and the agent left down).
    state = at(P.STOPPED_ELSEWHERE)
    assert change(state, ACTIVE | {"MainPID": 77}) == [StoppedExternally(), Started(77)]
    assert phase(state) is P.RUNNING
    assert change(state, KILLED) == [Exited("killed by signal 9 (SIGKILL)")]


def test_watchs_own_stop_is_an_exit_not_an_external_stop() -> None:
    state = at(P.RUNNING)
    assert state.handle(StopRequested()) == [STOP]
    assert change(state, STOPPED_BY_SOMEONE) == []  # looks like a stop: it is ours
    assert phase(state) is P.STOPPING
    assert change(state, INACTIVE) == [Exited("stopped (the unit went inactive without a failure)")]


def test_stopping_a_unit_stopped_elsewhere_makes_the_stop_ours() -> None:
    state = at(P.STOPPED_ELSEWHERE)
    assert state.handle(StopRequested()) == [STOP]
    assert change(state, INACTIVE)[0] == Exited(
        "stopped (the unit went inactive without a failure)"
    )


def test_a_stop_before_the_start_was_reported_ends_in_an_exit() -> None:
    # Before: the phase went back to "down" without any report, and the policy
    # waited for an exit for ever (keel watch start then did nothing).
    state = at(P.START_SEEN)  # e.g. a Type=notify agent not yet READY=1
    assert state.handle(StopRequested()) == [STOP]
    assert phase(state) is P.CANCELLING
    assert change(state, props("deactivating", "stop-sigterm", stamp=2_000, MainPID=41)) == []
    assert change(state, INACTIVE | {"InactiveExitTimestampMonotonic": 2_000}) == [
        Exited("stopped (the unit went inactive without a failure)")
    ]
    assert phase(state) is P.DOWN


def test_a_stop_of_a_start_still_queued_ends_with_its_job() -> None:
    # The start job had not run: StopUnit replaces it and the unit never changes
    # state, so no signal comes; the stop job's removal is the end.
    state = at(P.START_ASKED)
    state.handle(JobQueued("/job/1", "start"))
    assert state.handle(StopRequested()) == [STOP]
    state.handle(JobQueued("/job/2", "stop"))
    assert state.handle(JobRemoved("/job/1", "canceled")) == []
    assert state.handle(JobRemoved("/job/2", "done")) == [Exited("stopped before it started")]
    assert phase(state) is P.DOWN


def test_a_unit_that_comes_up_while_its_start_is_cancelled_is_reported_then_stopped() -> None:
    state = at(P.CANCELLING)
    assert change(state, ACTIVE) == [Started(42)]
    assert phase(state) is P.STOPPING
    assert [type(o) for o in change(state, INACTIVE)] == [Exited]


def test_a_refused_stop_of_a_unit_that_is_down_ends_the_cancelling() -> None:
    state = at(P.CANCELLING)
    assert state.handle(JobRefused("stop", "connection lost")) == [Exited("stopped")]
    assert phase(state) is P.DOWN


def test_a_stop_when_nothing_runs_changes_nothing_but_asks_systemd() -> None:
    state = at(P.DOWN)
    assert state.handle(StopRequested()) == [STOP]
    assert phase(state) is P.DOWN
    assert state.handle(JobRefused("stop", "whatever")) == []


# --- holding down -------------------------------------------------------------------------


def test_holding_a_unit_without_restart_needs_no_job() -> None:
    state = at(P.DOWN)
    assert state.handle(HoldRequested()) == []
    assert phase(state) is P.DOWN


def test_holding_a_unit_with_restart_cancels_systemds_timer() -> None:
    state = unit(Restart="always")
    state.handle(StartRequested())
    change(state, ACTIVE)
    assert [type(o) for o in change(state, props("activating", "auto-restart", Restart="always"))]
    assert state.handle(HoldRequested()) == [STOP]
    assert phase(state) is P.HOLDING


def test_systemds_restart_timer_beating_the_hold_is_not_reported() -> None:
    state = at(P.HOLDING)
    state.handle(JobQueued("/job/3", "stop"))
    assert change(state, ACTIVE) == []  # Restart= fired first; the stop ends it
    assert change(state, STOPPED_BY_SOMEONE) == []  # our stop, not someone's
    assert change(state, INACTIVE) == []
    assert phase(state) is P.HOLDING
    assert state.handle(JobRemoved("/job/3", "done")) == []
    assert phase(state) is P.DOWN
    # Down for good: only a new start (anyone's) brings it back, and it is reported.
    assert change(state, ACTIVE | {"MainPID": 60}) == [Started(60)]


def test_a_refused_hold_stop_of_a_unit_that_is_down_ends_the_hold() -> None:
    state = at(P.HOLDING)
    change(state, props("failed", "failed", Restart="always"))
    assert state.handle(JobRefused("stop", "no")) == []
    assert phase(state) is P.DOWN


def test_a_hold_after_systemd_restarted_the_unit_leaves_it_running() -> None:
    # The policy asked for a hold after hearing the exit; systemd's timer fired
    # meanwhile and the start was reported: its restart stands.
    state = unit(Restart="always")
    change(state, ACTIVE)
    assert state.handle(HoldRequested()) == []
    assert phase(state) is P.RUNNING


def test_a_start_after_a_hold_replaces_the_holds_stop() -> None:
    state = at(P.HOLDING)
    state.handle(JobQueued("/job/4", "stop"))
    assert state.handle(StartRequested()) == [RESTART]
    assert phase(state) is P.START_ASKED
    assert state.handle(JobRemoved("/job/4", "canceled")) == []
    assert phase(state) is P.START_ASKED


# --- reading properties -----------------------------------------------------------------------


def test_loading_and_adopting() -> None:
    state = UnitState(UNIT, clock=FakeClock())
    assert state.handle(Loaded(ACTIVE)) == []  # no report before watch decides to adopt
    assert state.adopt()
    assert phase(state) is P.RUNNING
    assert state.main_pid == 42
    assert not unit().adopt()


def test_a_service_property_change_is_not_a_state_change() -> None:
    state = at(P.RUNNING)
    assert change(state, {"MainPID": 43, "Result": "success"}) == []
    assert state.main_pid == 43


def test_a_refresh_after_reconnecting_reports_what_happened_meanwhile() -> None:
    state = at(P.RUNNING)
    assert state.handle(Refreshed(KILLED)) == [Exited("killed by signal 9 (SIGKILL)")]


# --- any sequence ---------------------------------------------------------------------------

PROPERTY_SETS = [*SHOWING.values(), KILLED, props("failed", "failed", stamp=0)]
EVENTS = st.one_of(
    st.sampled_from(PROPERTY_SETS).map(Changed),
    st.sampled_from(PROPERTY_SETS).map(Refreshed),
    st.sampled_from([StartRequested(), StopRequested(), HoldRequested(), StartConfirmed()]),
    st.builds(JobQueued, st.sampled_from(["/j/1", "/j/2"]), st.sampled_from(["start", "stop"])),
    st.builds(JobRefused, st.sampled_from(["start", "stop"]), st.just("no")),
    st.builds(JobRemoved, st.sampled_from(["/j/1", "/j/2"]), st.sampled_from(["done", "failed"])),
)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(EVENTS, max_size=40))
def test_reports_alternate_started_and_down(events: list[Event]) -> None:
    """The policy hears "started", then one "exited" or "stopped", then "started"...

    It asks for a start or a hold only after hearing that the agent is down (as
    the policy does); an exit is then either the end of what was reported
    running or the answer to a start.
    """
    state = unit(Restart="always", StartLimitIntervalUSec=1_000_000, StartLimitBurst=3)
    up = False
    start_asked = False
    for event in events:
        if up and isinstance(event, StartRequested | HoldRequested):
            continue
        start_asked = start_asked or isinstance(event, StartRequested)
        for output in state.handle(event):
            if isinstance(output, Started):
                assert not up
                up, start_asked = True, False
            elif isinstance(output, Exited | StoppedExternally):
                assert up or start_asked
                up, start_asked = False, False
        assert (state.phase in (P.RUNNING, P.STOPPING, P.STOPPED_ELSEWHERE)) == up


# --- describing results -----------------------------------------------------------------------


def test_describe_result() -> None:
    assert describe_result({"Result": "exit-code", "ExecMainCode": 1, "ExecMainStatus": 3}) == (
        "exited with status 3"
    )
    assert describe_result({"Result": "signal", "ExecMainCode": 2, "ExecMainStatus": 9}) == (
        "killed by signal 9 (SIGKILL)"
    )
    assert describe_result({"Result": "core-dump", "ExecMainCode": 3, "ExecMainStatus": 11}) == (
        "killed by signal 11 (SIGSEGV) (core dumped)"
    )
    assert describe_result({"Result": "watchdog", "ExecMainCode": 2, "ExecMainStatus": 6}) == (
        "watchdog timeout: no WATCHDOG=1 within WatchdogSec (killed by signal 6 (SIGABRT))"
    )
    assert describe_result({"Result": "oom-kill"}) == "killed by the OOM killer"
    assert describe_result({"Result": "start-limit-hit"}).startswith("systemd's start rate limit")
    assert describe_result({"Result": "timeout"}).startswith("timed out")
    assert describe_result({"Result": "success"}).startswith("stopped")
    assert describe_result({"Result": "resources"}) == "failed (resources)"
    assert describe_result({"ExecMainCode": 2, "ExecMainStatus": 99}) == (
        "killed by signal 99 (signal 99)"
    )
