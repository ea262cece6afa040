"""How watch follows one systemd unit: events in, reports and jobs out, no I/O.

The systemd backend (:mod:`keel.watch.systemd_backend`) feeds a
:class:`UnitState` what it hears over D-Bus (the unit's properties changed, a
job was queued, refused or removed, a refresh came back) and what the daemon
asks (start, stop, hold), and carries out what it answers: a report for the
policy (:class:`Started`, :class:`Exited`, :class:`StoppedExternally`), a
systemd job to issue (:class:`IssueJob`), a start-limit reset
(:class:`ResetFailed`), or a question (:class:`ConfirmStart`: read the unit
again, then send :class:`StartConfirmed`). Time (systemd's start-limit
horizon) comes from the clock it is given.

Watch's view of a unit is one :class:`UnitPhase`. What a state change of the
unit means depends on that phase, and all of it is the table
:data:`ON_SEEN`: the unit's ``ActiveState``/``SubState`` (and, for two of
them, its main PID, ``Result`` and ``InactiveExitTimestampMonotonic``) are
first read as one :class:`Seen`, then ``ON_SEEN[phase][seen]`` gives the next
phase and the reports; a pair that is not in the table changes nothing.
Requests and job events are short methods below the table; the one special
case of the table (``START_ASKED`` seeing ``AUTO_RESTART``) is in
:meth:`UnitState._follow`.

Things systemd does that the table answers for:

- Signals coalesce: a quick failed -> activating -> failed may arrive as one
  "failed". A start is then judged by ``InactiveExitTimestampMonotonic``, the
  last time the unit left the inactive state: if it moved since the start was
  asked, the start happened and failed (``DOWN_SINCE_START``). It is 0 on a
  unit object systemd has just re-created (``ResetFailedUnit`` lets it
  collect the old one), which does not count as a move. Entering
  ``auto-restart`` also moves it without any start of watch's.
- A unit with ``Restart=`` is held down (back-off, quarantine) by a
  ``StopUnit`` that cancels systemd's own restart timer; if that timer fired
  first, the unit runs until the stop ends it, and watch does not report it.
- Someone else's ``systemctl stop`` is seen as "deactivating" while the main
  process still lives and ``Result`` is "success" (a crash leaves no live
  main process, a watchdog kill a failed result): the agent was stopped on
  purpose, not crashed.
- A start job can end "done" without the unit ever activating (a failed
  ``Condition…=``): watch reads the unit again (the reply comes after any
  signal still in flight) and only then calls the start failed.
- Back-off is watch's job, not systemd's: a start that could hit
  ``StartLimitBurst=`` is preceded by ``ResetFailedUnit``.
"""

from __future__ import annotations

import enum
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

RUNNING_STATES = ("active", "reloading")
JobKind = Literal["start", "stop"]
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


class UnitPhase(enum.Enum):
    DOWN = "down"  # not running as far as the policy was told, and nothing asked of systemd
    START_ASKED = "start asked"  # watch asked for a start; no sign of it yet
    START_SEEN = "start seen"  # ...and the unit has been seen activating since
    RUNNING = "running"  # reported started
    STOPPING = "stopping"  # reported started; watch asked systemd to stop it
    STOPPED_ELSEWHERE = "stopped elsewhere"  # reported started; someone else is stopping it
    CANCELLING = "cancelling"  # watch asked for a stop before the start was reported
    HOLDING = "holding"  # held down: watch's StopUnit cancels systemd's own restart


class Seen(enum.Enum):
    """What a state change of the unit shows, read from its properties (see :func:`seen`)."""

    ACTIVE = "active"  # active or reloading: it runs
    ACTIVATING = "activating"  # a start is under way
    DEACTIVATING = "deactivating"  # a stop or a crash is under way
    STOPPED_ON_PURPOSE = "stopped on purpose"  # deactivating, main process alive, no failure
    AUTO_RESTART = "auto-restart"  # down, waiting for systemd's own Restart= timer
    DOWN = "down"  # inactive or failed
    DOWN_SINCE_START = "down since the start"  # ...after leaving "inactive" since watch's start
    OTHER = "other"  # no state yet, or one watch does not act on (maintenance)


class Report(enum.Enum):
    STARTED = "started"
    EXITED = "exited"
    STOPPED_EXTERNALLY = "stopped externally"


P, S, R = UnitPhase, Seen, Report
_GONE = (S.DOWN, S.AUTO_RESTART, S.DOWN_SINCE_START)
Step = tuple[UnitPhase, tuple[Report, ...]]  # the next phase, and what the policy hears


def _on(seens: tuple[Seen, ...], step: Step) -> dict[Seen, Step]:
    return dict.fromkeys(seens, step)


ON_SEEN: dict[UnitPhase, dict[Seen, Step]] = {
    # Started by someone else (systemctl start, or systemd itself): adopt it.
    P.DOWN: {S.ACTIVE: (P.RUNNING, (R.STARTED,))},
    P.START_ASKED: {
        S.ACTIVE: (P.RUNNING, (R.STARTED,)),
        S.ACTIVATING: (P.START_SEEN, ()),
        S.DEACTIVATING: (P.START_SEEN, ()),
        S.STOPPED_ON_PURPOSE: (P.START_SEEN, ()),
        # It started and failed between two signals.
        S.DOWN_SINCE_START: (P.DOWN, (R.EXITED,)),
        # DOWN: the start job has not acted yet. AUTO_RESTART: see _follow.
    },
    P.START_SEEN: {
        S.ACTIVE: (P.RUNNING, (R.STARTED,)),
        # The start failed before the unit ever ran (exec failed, start timeout...).
        **_on(_GONE, (P.DOWN, (R.EXITED,))),
    },
    P.RUNNING: {
        S.STOPPED_ON_PURPOSE: (P.STOPPED_ELSEWHERE, ()),
        **_on(_GONE, (P.DOWN, (R.EXITED,))),
    },
    P.STOPPING: _on(_GONE, (P.DOWN, (R.EXITED,))),
    P.STOPPED_ELSEWHERE: {
        **_on(_GONE, (P.DOWN, (R.STOPPED_EXTERNALLY,))),
        # Stopped and started again (systemctl restart) with "inactive" lost
        # between two signals: what runs is a new instance.
        S.ACTIVE: (P.RUNNING, (R.STOPPED_EXTERNALLY, R.STARTED)),
    },
    P.CANCELLING: {
        # It came up before the stop took effect: report it (the stop ends it).
        S.ACTIVE: (P.STOPPING, (R.STARTED,)),
        **_on(_GONE, (P.DOWN, (R.EXITED,))),
    },
    # Whatever the unit does, watch's StopUnit has the last word (JobRemoved ends it):
    # systemd's Restart= timer may beat the stop, and that run is not reported.
    P.HOLDING: {},
}


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """The unit's properties as watch first reads them: no report follows."""

    properties: Mapping[str, Any]


@dataclass(frozen=True)
class Changed:
    """``PropertiesChanged``: some properties; a state change when ActiveState/SubState is in."""

    properties: Mapping[str, Any]


@dataclass(frozen=True)
class Refreshed:
    """All properties read again (after reconnecting, or to confirm a start)."""

    properties: Mapping[str, Any]


@dataclass(frozen=True)
class StartRequested:
    pass


@dataclass(frozen=True)
class StopRequested:
    pass


@dataclass(frozen=True)
class HoldRequested:
    """The agent exited and must stay down until the next start."""


@dataclass(frozen=True)
class JobQueued:
    path: str
    kind: JobKind


@dataclass(frozen=True)
class JobRefused:
    kind: JobKind
    error: str


@dataclass(frozen=True)
class JobRemoved:
    path: str
    result: str  # done, canceled, timeout, failed, dependency, skipped


@dataclass(frozen=True)
class StartConfirmed:
    """The read asked for by :class:`ConfirmStart` came back (or could not be had)."""


Event = (
    Loaded
    | Changed
    | Refreshed
    | StartRequested
    | StopRequested
    | HoldRequested
    | JobQueued
    | JobRefused
    | JobRemoved
    | StartConfirmed
)


# --- outputs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    pid: int | None


@dataclass(frozen=True)
class Exited:
    cause: str


@dataclass(frozen=True)
class StoppedExternally:
    pass


@dataclass(frozen=True)
class IssueJob:
    method: Literal["StartUnit", "RestartUnit", "StopUnit"]
    kind: JobKind


@dataclass(frozen=True)
class ResetFailed:
    """``ResetFailedUnit``: clear the failed state and systemd's start-limit count."""


@dataclass(frozen=True)
class ConfirmStart:
    """Read the unit's properties again (feed :class:`Refreshed`), then :class:`StartConfirmed`."""


Output = Started | Exited | StoppedExternally | IssueJob | ResetFailed | ConfirmStart
ReportOutput = Started | Exited | StoppedExternally


_NO_START = object()


def seen(props: Mapping[str, Any], start_baseline: object = _NO_START) -> Seen:
    """What the unit's properties show.

    ``start_baseline`` is ``InactiveExitTimestampMonotonic`` as it was when watch
    asked for a start; without it, "inactive" and "failed" are plain ``DOWN``.
    """
    active = props.get("ActiveState", "")
    if active in RUNNING_STATES:
        return S.ACTIVE
    if active == "activating":
        return S.AUTO_RESTART if props.get("SubState") == "auto-restart" else S.ACTIVATING
    if active == "deactivating":
        if _main_pid(props) is not None and props.get("Result") == "success":
            return S.STOPPED_ON_PURPOSE
        return S.DEACTIVATING
    if active in ("inactive", "failed"):
        stamp = props.get("InactiveExitTimestampMonotonic")
        if start_baseline is not _NO_START and stamp not in (start_baseline, 0, None):
            return S.DOWN_SINCE_START
        return S.DOWN
    return S.OTHER


class UnitState:
    """Watch's view of one unit (see the module docstring)."""

    def __init__(self, unit: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.unit = unit
        self.clock = clock
        self.phase = P.DOWN
        self.props: dict[str, Any] = {}
        self._baseline: object = _NO_START  # the inactive-exit stamp when a start was asked
        self._jobs: dict[str, JobKind] = {}  # job path -> what it is for
        self._starts: deque[float] = deque()  # watch's recent starts, for the start limit

    # --- reading ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.props.get("ActiveState") in RUNNING_STATES

    @property
    def down(self) -> bool:
        return seen(self.props) in _GONE

    @property
    def main_pid(self) -> int | None:
        return _main_pid(self.props)

    @property
    def restarts_itself(self) -> bool:
        """systemd would restart it (``Restart=``), or is about to (auto-restart)."""
        return (
            self.props.get("SubState") == "auto-restart" or self.props.get("Restart", "no") != "no"
        )

    def adopt(self) -> bool:
        """Watch starts supervising: True (and reported running) if the unit runs."""
        if self.running:
            self.phase = P.RUNNING
            return True
        return False

    # --- events ----------------------------------------------------------------------

    def handle(self, event: Event) -> list[Output]:
        if isinstance(event, Loaded):
            self.props.update(event.properties)
            return []
        if isinstance(event, Changed):
            self.props.update(event.properties)
            if "ActiveState" in event.properties or "SubState" in event.properties:
                return self._follow()
            return []
        if isinstance(event, Refreshed):
            self.props.update(event.properties)
            return self._follow()
        if isinstance(event, StartRequested):
            return self._start()
        if isinstance(event, StopRequested):
            return self._stop()
        if isinstance(event, HoldRequested):
            return self._hold()
        if isinstance(event, JobQueued):
            self._jobs[event.path] = event.kind
            return []
        if isinstance(event, JobRefused):
            return self._refused(event)
        if isinstance(event, JobRemoved):
            return self._removed(event)
        return self._confirmed()

    def _follow(self) -> list[Output]:
        what = seen(self.props, self._baseline if self.phase is P.START_ASKED else _NO_START)
        if self.phase is P.START_ASKED and what is S.AUTO_RESTART:
            # Entering auto-restart moves the inactive-exit stamp too; it is not
            # the start watch asked for.
            self._baseline = self.props.get("InactiveExitTimestampMonotonic")
            return []
        step = ON_SEEN[self.phase].get(what)
        if step is None:
            return []
        phase, reports = step
        self._enter(phase)
        return [self._report(report) for report in reports]

    def _report(self, report: Report) -> ReportOutput:
        if report is R.STARTED:
            return Started(self.main_pid)
        if report is R.EXITED:
            return Exited(describe_result(self.props))
        return StoppedExternally()

    def _enter(self, phase: UnitPhase) -> None:
        self.phase = phase
        if phase not in (P.START_ASKED, P.START_SEEN):
            self._baseline = _NO_START

    # --- requests --------------------------------------------------------------------

    def _start(self) -> list[Output]:
        self._enter(P.START_ASKED)
        self._baseline = self.props.get("InactiveExitTimestampMonotonic")
        if self.running:
            # systemd's own Restart= got there first: what runs is the restart.
            return self._follow()
        if seen(self.props) is S.ACTIVATING:
            return [IssueJob("StartUnit", "start")]  # a start is under way: join it
        outputs: list[Output] = []
        # ResetFailedUnit is not free (systemd may drop and reload the unit, a
        # few milliseconds of a restart): only when this start could hit the limit.
        if self._near_start_limit():
            outputs.append(ResetFailed())
            self._starts.clear()
        self._starts.append(self.clock())
        # RestartUnit for a unit with Restart=: it may be waiting for its own
        # restart timer, which a start job would wait for and a restart job
        # cancels. StartUnit otherwise (one job step fewer).
        method: Literal["StartUnit", "RestartUnit"] = (
            "RestartUnit" if self.restarts_itself else "StartUnit"
        )
        outputs.append(IssueJob(method, "start"))
        return outputs

    def _near_start_limit(self) -> bool:
        interval = self.props.get("StartLimitIntervalUSec")
        burst = self.props.get("StartLimitBurst")
        if not isinstance(interval, int) or not isinstance(burst, int) or interval <= 0:
            return False
        if self.props.get("Result") == "start-limit-hit":
            return True
        horizon = self.clock() - interval / 1e6
        while self._starts and self._starts[0] < horizon:
            self._starts.popleft()
        # systemd's own Restart= starts count too and are not in this list: keep a margin.
        return len(self._starts) >= max(1, burst - 2)

    def _stop(self) -> list[Output]:
        if self.phase in (P.RUNNING, P.STOPPED_ELSEWHERE, P.STOPPING):
            self._enter(P.STOPPING)
        elif self.phase in (P.START_ASKED, P.START_SEEN, P.CANCELLING):
            self._enter(P.CANCELLING)
        # DOWN, HOLDING: nothing runs that the policy waits for; the job makes sure.
        return [IssueJob("StopUnit", "stop")]

    def _hold(self) -> list[Output]:
        if self.phase is not P.DOWN:
            return []  # it runs again (systemd's Restart= won): the policy hears Started
        if self.restarts_itself:
            self._enter(P.HOLDING)
            return [IssueJob("StopUnit", "stop")]
        return []

    # --- jobs ------------------------------------------------------------------------

    def _refused(self, event: JobRefused) -> list[Output]:
        if event.kind == "start" and self.phase in (P.START_ASKED, P.START_SEEN):
            self._enter(P.DOWN)
            return [Exited(f"systemd refused to start {self.unit}: {event.error}")]
        if event.kind == "stop" and self.down:
            if self.phase is P.CANCELLING:
                self._enter(P.DOWN)
                return [Exited("stopped")]
            if self.phase is P.HOLDING:
                self._enter(P.DOWN)
        return []

    def _removed(self, event: JobRemoved) -> list[Output]:
        kind = self._jobs.pop(event.path, None)
        if kind == "stop":
            if self.phase is P.HOLDING:
                self._enter(P.DOWN)  # the hold's stop is done: the unit is down for good
            elif self.phase is P.CANCELLING:
                # The start never got reported and the stop is over: nothing runs
                # (or, if the stop was overtaken by someone's start, the unit's own
                # signals report that next).
                self._enter(P.DOWN)
                return [Exited("stopped before it started")]
            return []
        if kind != "start" or self.phase is not P.START_ASKED or self._start_evident():
            return []  # the unit's own state changes tell the story
        if event.result not in ("done", "skipped"):
            self._enter(P.DOWN)
            return [Exited(f"start job {event.result} ({describe_result(self.props)})")]
        # "done" yet never seen activating: ask first (see the module docstring).
        return [ConfirmStart()]

    def _confirmed(self) -> list[Output]:
        if self.phase is P.START_ASKED and not self._start_evident() and not self.running:
            self._enter(P.DOWN)
            return [Exited(f"{self.unit} did not start (did a Condition...= check fail?)")]
        return []

    def _start_evident(self) -> bool:
        return seen(self.props, self._baseline) is S.DOWN_SINCE_START


def _main_pid(props: Mapping[str, Any]) -> int | None:
    pid = props.get("MainPID")
    return int(pid) if isinstance(pid, int) and pid > 0 else None


def describe_result(props: Mapping[str, Any]) -> str:
    """Why a unit went down, from its Service properties, for people."""
    result = str(props.get("Result", ""))
    code = props.get("ExecMainCode")
    status = props.get("ExecMainStatus")
    if code == CLD_EXITED and isinstance(status, int):
        how = f"exited with status {status}"
    elif code in (CLD_KILLED, CLD_DUMPED) and isinstance(status, int):
        try:
            name = signal.Signals(status).name
        except ValueError:
            name = f"signal {status}"
        how = f"killed by signal {status} ({name})" + (
            " (core dumped)" if code == CLD_DUMPED else ""
        )
    else:
        how = ""
    if result == "watchdog":
        return "watchdog timeout: no WATCHDOG=1 within WatchdogSec" + (f" ({how})" if how else "")
    if result == "oom-kill":
        return "killed by the OOM killer" + (f" ({how})" if how else "")
    if result == "timeout":
        return "timed out (start or stop took longer than its Timeout*Sec=)"
    if result == "start-limit-hit":
        return "systemd's start rate limit was hit (StartLimitBurst=)"
    if how:
        return how
    if result == "success":
        return "stopped (the unit went inactive without a failure)"
    return f"failed ({result or 'no result'})"
