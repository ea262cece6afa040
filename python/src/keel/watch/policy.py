"""The supervision policy of one agent: events in, actions out, no I/O.

An :class:`AgentPolicy` is told what happened (the agent started, exited, a
probe passed or failed, time went by) and answers with what to do: start it,
stop it, send an alert, write a ledger record. Every method takes ``now``, a
monotonic time in seconds, so tests drive time instead of sleeping; the daemon
calls :meth:`AgentPolicy.tick` at :meth:`AgentPolicy.next_deadline`.

The rules, in one place:

- A failure is the agent exiting by itself (any exit code or signal, a systemd
  watchdog kill) or a probe failing ``failures`` times in a row after its
  ``grace`` period. A hung agent is stopped first, then handled like a crash.
- The first failure after a stable period restarts at once. Each further
  failure in a row waits ``backoff_initial * backoff_factor ** (n - 2)``
  seconds, at most ``backoff_max``. Being healthy for ``stable_after`` seconds
  resets the count. The policy never gives up, unless ``quarantine_after`` is
  set: then that many failures in a row stop the agent for good (until an
  operator starts it again) and say so loudly.
- An incident opens at the first failure and resolves after the agent has been
  healthy for ``resolve_after`` seconds; each route hears "open" and "resolve"
  once per incident, however many restarts happen in between. When
  ``flap_threshold`` incidents open within ``flap_window`` seconds the agent is
  flapping: one "flapping" alert, then silence until no incident has opened for
  ``flap_window`` seconds ("stable"). Quarantine is always announced.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# --- rules (from the config) ------------------------------------------------


@dataclass(frozen=True)
class RestartRules:
    backoff_initial: float = 1.0
    backoff_factor: float = 2.0
    backoff_max: float = 60.0
    stable_after: float = 30.0
    quarantine_after: int | None = None

    def delay(self, failures_in_a_row: int) -> float:
        """Seconds to wait before the restart that follows the n-th failure in a row."""
        if failures_in_a_row <= 1:
            return 0.0
        exponent = failures_in_a_row - 2
        # Cap the exponent first so a long crash loop cannot overflow a float.
        if exponent > 64:
            return self.backoff_max
        return float(min(self.backoff_max, self.backoff_initial * self.backoff_factor**exponent))


@dataclass(frozen=True)
class ProbeRules:
    name: str
    failures: int = 3
    grace: float = 0.0


@dataclass(frozen=True)
class AlertRules:
    routes: tuple[str, ...] = ()
    resolve_after: float = 30.0
    flap_window: float = 600.0
    flap_threshold: int = 3


@dataclass(frozen=True)
class AgentRules:
    name: str
    probes: tuple[ProbeRules, ...] = ()
    restart: RestartRules = field(default_factory=RestartRules)
    alerts: AlertRules = field(default_factory=AlertRules)


# --- actions (what the daemon must do) --------------------------------------


@dataclass(frozen=True)
class StartAgent:
    """Start the agent (a new instance: probe results of older ones are stale)."""

    agent: str
    instance: int


@dataclass(frozen=True)
class StopAgent:
    """Stop the running agent; an ``exited`` event is expected back."""

    agent: str
    reason: str


@dataclass(frozen=True)
class HoldAgent:
    """Keep the (exited) agent down: it must not come back until a StartAgent.

    systemd's own ``Restart=`` would otherwise bring it back behind a back-off
    or a quarantine.
    """

    agent: str


AlertKind = Literal["open", "resolve", "quarantine", "flapping", "stable"]


@dataclass(frozen=True)
class SendAlert:
    agent: str
    incident: str
    kind: AlertKind
    text: str


@dataclass(frozen=True)
class LedgerRecord:
    """A ledger entry: ``kind`` and metadata about the agent (never secrets)."""

    agent: str
    kind: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class Restarted:
    """The agent runs again ``downtime`` seconds after its failure was seen.

    ``backoff`` tells whether a back-off wait was part of that time.
    """

    agent: str
    downtime: float
    backoff: bool = False


Action = StartAgent | StopAgent | HoldAgent | SendAlert | LedgerRecord | Restarted


# --- state --------------------------------------------------------------------


class Phase(enum.Enum):
    STOPPED = "stopped"  # not running and not wanted (operator stop, or not yet begun)
    STARTING = "starting"  # start issued, not yet reported running
    RUNNING = "running"
    KILLING = "killing"  # stop issued because it failed its probes; restart follows
    STOPPING = "stopping"  # stop issued by the operator
    RESTARTING = "restarting"  # stop issued by the operator, who asked for a start since
    BACKOFF = "backoff"
    QUARANTINED = "quarantined"


class Event(enum.Enum):
    """What moves an agent from one phase to another (see :data:`TRANSITIONS`)."""

    SUPERVISE = "supervise"  # watch begins supervising an agent that does not run
    ADOPT = "adopt"  # found running (watch restarted), or started behind watch's back
    OPERATOR_START = "operator start"
    OPERATOR_STOP = "operator stop"
    STARTED = "started"  # the instance watch started runs
    EXITED = "exited"  # it ended after a stop the operator asked for
    RESTART = "restart"  # it failed (or a killed hung agent ended): start it again now
    BACK_OFF = "back off"  # it failed: start it again after a wait
    QUARANTINE = "quarantine"  # it failed once too often in a row: keep it down
    KILL = "kill"  # its probes failed while it runs: stop it, then restart or back off
    STOPPED_ELSEWHERE = "stopped elsewhere"  # systemctl stop
    BACKOFF_OVER = "back-off over"


# Every phase change, in one place; a pair not in the table is an event that
# means nothing in that phase (a late exit, a start of what already runs) and
# is ignored. Which of RESTART, BACK_OFF and QUARANTINE a failure is, the
# restart rules decide (``AgentPolicy._fail``).
TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    Phase.STOPPED: {
        Event.SUPERVISE: Phase.STARTING,
        Event.OPERATOR_START: Phase.STARTING,
        Event.ADOPT: Phase.RUNNING,
    },
    Phase.STARTING: {
        Event.STARTED: Phase.RUNNING,
        Event.ADOPT: Phase.RUNNING,
        Event.OPERATOR_STOP: Phase.STOPPING,
        Event.RESTART: Phase.STARTING,
        Event.BACK_OFF: Phase.BACKOFF,
        Event.QUARANTINE: Phase.QUARANTINED,
        Event.STOPPED_ELSEWHERE: Phase.STOPPED,
    },
    Phase.RUNNING: {
        Event.STARTED: Phase.RUNNING,  # the main pid became known later (forking units)
        Event.OPERATOR_STOP: Phase.STOPPING,
        Event.RESTART: Phase.STARTING,
        Event.BACK_OFF: Phase.BACKOFF,
        Event.QUARANTINE: Phase.QUARANTINED,
        Event.KILL: Phase.KILLING,
        Event.STOPPED_ELSEWHERE: Phase.STOPPED,
    },
    Phase.KILLING: {
        Event.OPERATOR_STOP: Phase.STOPPING,
        Event.RESTART: Phase.STARTING,
        Event.BACK_OFF: Phase.BACKOFF,
        Event.STOPPED_ELSEWHERE: Phase.STOPPED,
    },
    Phase.STOPPING: {
        Event.EXITED: Phase.STOPPED,
        Event.OPERATOR_STOP: Phase.STOPPING,
        Event.OPERATOR_START: Phase.RESTARTING,
        Event.STOPPED_ELSEWHERE: Phase.STOPPED,
    },
    Phase.RESTARTING: {
        Event.EXITED: Phase.STARTING,
        Event.OPERATOR_STOP: Phase.STOPPING,
        Event.STOPPED_ELSEWHERE: Phase.STOPPED,
    },
    Phase.BACKOFF: {
        Event.BACKOFF_OVER: Phase.STARTING,
        Event.OPERATOR_START: Phase.STARTING,
        Event.OPERATOR_STOP: Phase.STOPPED,
        Event.ADOPT: Phase.RUNNING,
        Event.STOPPED_ELSEWHERE: Phase.STOPPED,
    },
    Phase.QUARANTINED: {
        Event.OPERATOR_START: Phase.STARTING,
        Event.OPERATOR_STOP: Phase.STOPPED,
        Event.ADOPT: Phase.RUNNING,
    },
}


State = Literal["starting", "healthy", "unhealthy", "backoff", "quarantined", "stopped"]


@dataclass
class ProbeState:
    rules: ProbeRules
    passing: bool | None = None  # None: no counted result since the agent started
    failures_in_a_row: int = 0
    last_ok: bool | None = None
    last_at: float | None = None
    last_detail: str = ""
    grace_until: float = 0.0


@dataclass
class Incident:
    id: str
    opened_at: float
    announced: bool  # an "open" alert went out, so a "resolve" must follow
    restarts_at_open: int


@dataclass(frozen=True)
class ProbeStatus:
    name: str
    ok: bool | None
    at: float | None
    detail: str


@dataclass(frozen=True)
class AgentStatus:
    """A read-only view of one agent for status, metrics and the health gate."""

    name: str
    state: State
    pid: int | None
    running_since: float | None
    restarts: int
    failures_in_a_row: int
    last_error: str | None
    last_error_at: float | None
    backoff_until: float | None
    incident: str | None
    flapping: bool
    probes: tuple[ProbeStatus, ...]


class AgentPolicy:
    """The supervision state machine of one agent (see the module docstring)."""

    def __init__(self, rules: AgentRules, *, rng: random.Random) -> None:
        self.rules = rules
        self.name = rules.name
        self._rng = rng
        self.phase = Phase.STOPPED
        self.instance = 0
        self.pid: int | None = None
        self.running_since: float | None = None
        self.healthy_since: float | None = None
        self.probes = {p.name: ProbeState(p) for p in rules.probes}
        self.failures_in_a_row = 0
        self.restarts = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.failed_at: float | None = None  # the failure a pending restart answers
        self.backoff_until: float | None = None
        self._pending_delay = 0.0
        self._pending_cause = ""
        self._backed_off = False
        self.incident: Incident | None = None
        self._incident_opens: deque[float] = deque()
        self.flapping = False
        self._flap_incident = ""

    # --- inputs: the daemon and the operator -----------------------------------

    def supervise(self, now: float) -> list[Action]:
        """Begin supervising an agent that is not running: start it."""
        if not self._allows(Event.SUPERVISE):
            return []
        return self._start(now, Event.SUPERVISE, restart=False)

    def adopt(self, now: float, pid: int | None, since: float) -> list[Action]:
        """The agent was found running (watch restarted, or someone started it)."""
        if not self._allows(Event.ADOPT):
            return []
        self._move(Event.ADOPT)
        self.instance += 1
        self.backoff_until = None
        return self._now_running(now, pid, since)

    def request_start(self, now: float) -> list[Action]:
        """The operator asks for the agent to run (also lifts a quarantine)."""
        if not self._allows(Event.OPERATOR_START):
            return []
        if self.phase is Phase.BACKOFF:
            self.backoff_until = None
            return self._start(now, Event.OPERATOR_START, restart=True)
        self.failures_in_a_row = 0
        actions: list[Action] = [LedgerRecord(self.name, "start", {"by": "operator"})]
        if self.phase is Phase.STOPPING:
            self._move(Event.OPERATOR_START)  # the start follows the exit
            return actions
        return actions + self._start(now, Event.OPERATOR_START, restart=False)

    def request_stop(self, now: float) -> list[Action]:
        """The operator asks for the agent to stop and stay stopped."""
        if not self._allows(Event.OPERATOR_STOP):
            return []
        actions: list[Action] = [LedgerRecord(self.name, "stop", {"by": "operator"})]
        if self.phase in (Phase.STARTING, Phase.RUNNING, Phase.KILLING):
            actions.append(StopAgent(self.name, "stopped by the operator"))
        self._move(Event.OPERATOR_STOP)
        self.backoff_until = None
        self.healthy_since = None
        actions += self._close_incident(now, "stopped by the operator")
        return actions

    # --- inputs: the backend -------------------------------------------------------

    def started(self, now: float, pid: int | None) -> list[Action]:
        """The backend reports the agent running (process spawned, unit active)."""
        if self.phase is Phase.RUNNING:
            if pid is not None:
                self.pid = pid  # the main pid became known later (systemd forking units)
            return []
        if self._allows(Event.STARTED):
            self._move(Event.STARTED)
            return self._now_running(now, pid, now)
        # Started behind watch's back (systemctl start): supervise what runs.
        return self.adopt(now, pid, now)

    def exited(self, now: float, cause: str) -> list[Action]:
        """The agent's process ended (by itself, a watchdog kill, or our stop)."""
        phase = self.phase
        if phase in (Phase.STOPPING, Phase.RESTARTING):
            self._not_running()
            actions: list[Action] = [
                LedgerRecord(self.name, "exit", {"cause": cause, "expected": True})
            ]
            if phase is Phase.STOPPING:
                self._move(Event.EXITED)
                return actions
            return actions + self._start(now, Event.EXITED, restart=False)
        if phase is Phase.KILLING:
            self._not_running()
            return self._restart_after(now, self._pending_delay)
        if phase in (Phase.STARTING, Phase.RUNNING):
            self._not_running()
            return self._fail(now, cause, running=False)
        return []

    def stopped_externally(self, now: float) -> list[Action]:
        """The agent was stopped on purpose outside watch (``systemctl stop``)."""
        if not self._allows(Event.STOPPED_ELSEWHERE):
            return []
        self._not_running()
        self._move(Event.STOPPED_ELSEWHERE)
        self.backoff_until = None
        actions: list[Action] = [LedgerRecord(self.name, "stop", {"by": "systemd"})]
        return actions + self._close_incident(now, "stopped outside watch")

    def probe_result(
        self, now: float, instance: int, probe: str, ok: bool, detail: str = ""
    ) -> list[Action]:
        """A probe of ``instance`` finished; results of older instances are ignored."""
        state = self.probes.get(probe)
        if state is None or instance != self.instance or self.phase is not Phase.RUNNING:
            return []
        state.last_ok, state.last_at, state.last_detail = ok, now, detail
        actions: list[Action] = []
        if ok:
            state.failures_in_a_row = 0
            if state.passing is False:
                actions.append(
                    LedgerRecord(self.name, "probe", {"probe": probe, "state": "passing"})
                )
            state.passing = True
            self._update_health(now)
            return actions
        if now < state.grace_until:
            return actions  # start-up allowance: not counted
        state.failures_in_a_row += 1
        if state.passing is not False:
            actions.append(
                LedgerRecord(
                    self.name,
                    "probe",
                    {"probe": probe, "state": "failing", "detail": detail},
                )
            )
        state.passing = False
        self._update_health(now)
        if state.failures_in_a_row >= state.rules.failures:
            cause = f"probe {probe} failed {state.failures_in_a_row} times in a row: {detail}"
            actions += self._fail(now, cause, running=True)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Let time pass: end back-offs, reset the failure count, close incidents."""
        actions: list[Action] = []
        backoff_until = self.backoff_until
        if backoff_until is not None and now >= backoff_until and self._allows(Event.BACKOFF_OVER):
            self.backoff_until = None
            actions += self._start(now, Event.BACKOFF_OVER, restart=True)
        healthy = self.healthy_since
        if healthy is not None:
            if self.failures_in_a_row and now - healthy >= self.rules.restart.stable_after:
                self.failures_in_a_row = 0
            if self.incident is not None and now - healthy >= self.rules.alerts.resolve_after:
                actions += self._close_incident(now, "")
        if (
            self.flapping
            and self.incident is None
            and self._incident_opens
            and now - self._incident_opens[-1] >= self.rules.alerts.flap_window
        ):
            self.flapping = False
            window = _seconds(self.rules.alerts.flap_window)
            actions.append(
                SendAlert(
                    self.name,
                    self._flap_incident,
                    "stable",
                    f"{self.name} is stable again: no incident for {window}",
                )
            )
        return actions

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`tick` has something to do."""
        times: list[float] = []
        if self.phase is Phase.BACKOFF and self.backoff_until is not None:
            times.append(self.backoff_until)
        if self.healthy_since is not None:
            if self.failures_in_a_row:
                times.append(self.healthy_since + self.rules.restart.stable_after)
            if self.incident is not None:
                times.append(self.healthy_since + self.rules.alerts.resolve_after)
        if self.flapping and self.incident is None and self._incident_opens:
            times.append(self._incident_opens[-1] + self.rules.alerts.flap_window)
        return min(times) if times else None

    # --- observation -----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.phase is Phase.RUNNING

    def state(self) -> State:
        phase = self.phase
        if phase in (Phase.STOPPED, Phase.STOPPING):
            return "stopped"
        if phase is Phase.RESTARTING:
            return "starting"
        if phase is Phase.QUARANTINED:
            return "quarantined"
        if phase is Phase.BACKOFF:
            return "backoff"
        if phase is Phase.STARTING:
            return "starting"
        if phase is Phase.KILLING:
            return "unhealthy"
        if self.healthy_since is not None:
            return "healthy"
        if any(p.passing is False for p in self.probes.values()):
            return "unhealthy"
        return "starting"

    def status(self) -> AgentStatus:
        return AgentStatus(
            name=self.name,
            state=self.state(),
            pid=self.pid,
            running_since=self.running_since,
            restarts=self.restarts,
            failures_in_a_row=self.failures_in_a_row,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            backoff_until=self.backoff_until if self.phase is Phase.BACKOFF else None,
            incident=self.incident.id if self.incident else None,
            flapping=self.flapping,
            probes=tuple(
                ProbeStatus(name, p.last_ok, p.last_at, p.last_detail)
                for name, p in self.probes.items()
            ),
        )

    # --- transitions -----------------------------------------------------------

    def _allows(self, event: Event) -> bool:
        return event in TRANSITIONS[self.phase]

    def _move(self, event: Event) -> None:
        """The one place the phase changes: as :data:`TRANSITIONS` says."""
        self.phase = TRANSITIONS[self.phase][event]

    def _start(self, now: float, event: Event, *, restart: bool) -> list[Action]:
        self._move(event)
        self.instance += 1
        actions: list[Action] = [StartAgent(self.name, self.instance)]
        if restart:
            self.restarts += 1
            data: dict[str, Any] = {
                "cause": self._pending_cause,
                "failures_in_a_row": self.failures_in_a_row,
                "restarts": self.restarts,
            }
            if self.failed_at is not None:
                data["waited"] = round(now - self.failed_at, 6)
            actions.append(LedgerRecord(self.name, "restart", data))
        return actions

    def _now_running(self, now: float, pid: int | None, since: float) -> list[Action]:
        self.pid = pid
        self.running_since = since
        for probe in self.probes.values():
            probe.passing = None
            probe.failures_in_a_row = 0
            probe.grace_until = since + probe.rules.grace
        actions: list[Action] = []
        if self.failed_at is not None:
            actions.append(
                Restarted(self.name, max(0.0, now - self.failed_at), backoff=self._backed_off)
            )
            self.failed_at = None
        self._update_health(now)
        return actions

    def _not_running(self) -> None:
        self.pid = None
        self.running_since = None
        self.healthy_since = None

    def _update_health(self, now: float) -> None:
        healthy = self.phase is Phase.RUNNING and all(
            p.passing is True for p in self.probes.values()
        )
        if healthy and self.healthy_since is None:
            self.healthy_since = now
        elif not healthy:
            self.healthy_since = None

    def _fail(self, now: float, cause: str, *, running: bool) -> list[Action]:
        """Count a failure and decide: restart now, back off, or quarantine."""
        restarts_before = self.restarts
        self.failures_in_a_row += 1
        self.last_error = cause
        self.last_error_at = now
        self.failed_at = now
        self._pending_cause = cause
        self.healthy_since = None
        n = self.failures_in_a_row
        limit = self.rules.restart.quarantine_after
        quarantine = limit is not None and n >= limit
        delay = self.rules.restart.delay(n)
        if quarantine:
            decision = "quarantine"
        elif delay == 0:
            decision = "restart"
        else:
            decision = f"back off {_seconds(delay)}"
        # What to do comes first in the list: the daemon carries actions out in
        # order, and a restart must not wait behind alerts and records.
        actions: list[Action] = []
        if quarantine:
            if running:
                actions.append(StopAgent(self.name, f"quarantined: {cause}"))
            else:
                actions.append(HoldAgent(self.name))
            self._not_running()
            self._move(Event.QUARANTINE)
        elif running:
            self._pending_delay = delay
            self._move(Event.KILL)
            actions.append(StopAgent(self.name, cause))
        else:
            actions += self._restart_after(now, delay)
        # Records read in the order things happened: the failure, then the restart.
        start_records = [a for a in actions if isinstance(a, LedgerRecord)]
        actions = [a for a in actions if not isinstance(a, LedgerRecord)]
        actions.append(
            LedgerRecord(
                self.name,
                "failure",
                {"cause": cause, "failures_in_a_row": n, "decision": decision},
            )
        )
        actions += start_records
        actions += self._open_incident(now, cause, decision, restarts_before)
        if quarantine:
            incident = self.incident.id if self.incident else ""
            actions.append(
                SendAlert(
                    self.name,
                    incident,
                    "quarantine",
                    f"{self.name} quarantined after {n} failures in a row (last: {cause}); "
                    f"watch will not restart it until `keel watch start {self.name}`",
                )
            )
            actions.append(LedgerRecord(self.name, "quarantine", {"failures_in_a_row": n}))
        return actions

    def _restart_after(self, now: float, delay: float) -> list[Action]:
        self._backed_off = delay > 0
        if delay <= 0:
            return self._start(now, Event.RESTART, restart=True)
        self._move(Event.BACK_OFF)
        self.backoff_until = now + delay
        return [HoldAgent(self.name)]

    def _open_incident(
        self, now: float, cause: str, decision: str, restarts_before: int
    ) -> list[Action]:
        if self.incident is not None:
            return []
        incident_id = f"{self.name}-{self._rng.getrandbits(40):010x}"
        rules = self.rules.alerts
        opens = self._incident_opens
        opens.append(now)
        while opens and now - opens[0] > rules.flap_window:
            opens.popleft()
        actions: list[Action] = []
        announced = False
        if self.flapping:
            pass  # already announced; stay quiet until stable
        elif len(opens) >= rules.flap_threshold:
            self.flapping = True
            self._flap_incident = incident_id
            actions.append(
                SendAlert(
                    self.name,
                    incident_id,
                    "flapping",
                    f"{self.name} is flapping: {len(opens)} incidents within "
                    f"{_seconds(rules.flap_window)} (last: {cause}); alerts for it pause "
                    f"until it has been stable for {_seconds(rules.flap_window)}",
                )
            )
        else:
            announced = True
            actions.append(
                SendAlert(
                    self.name,
                    incident_id,
                    "open",
                    f"{self.name} failed: {cause}; {_decision_text(decision)}",
                )
            )
        self.incident = Incident(incident_id, now, announced, restarts_before)
        return actions

    def _close_incident(self, now: float, reason: str) -> list[Action]:
        incident = self.incident
        if incident is None:
            return []
        self.incident = None
        if not incident.announced:
            return []
        restarts = self.restarts - incident.restarts_at_open
        if reason:
            text = f"{self.name}: incident closed, {reason}"
        else:
            text = (
                f"{self.name} recovered: healthy for {_seconds(self.rules.alerts.resolve_after)} "
                f"after {restarts} restart{'s' if restarts != 1 else ''} "
                f"(incident lasted {_seconds(now - incident.opened_at)})"
            )
        return [SendAlert(self.name, incident.id, "resolve", text)]


def _decision_text(decision: str) -> str:
    if decision == "restart":
        return "restarting it now"
    if decision == "quarantine":
        return "quarantining it"
    return f"{decision} before restarting it"


def _seconds(value: float) -> str:
    """``0.5s``, ``30s``, ``10m``, ``1h30m``: short durations for alert texts."""
    if value < 10:
        return f"{value:g}s"
    total = round(value)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"
