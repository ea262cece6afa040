"""The safe switch as a state machine: events in, actions out, no I/O.

One switch moves a host from the running system (*old*) to a built one
(*new*). The shell (:mod:`keel.safeswitch.switcher`) tells the machine what
happened and carries out the actions it answers with, in order; every method
takes ``now`` (monotonic seconds), so tests drive time instead of sleeping.

The phases and what moves between them, all in :data:`TRANSITIONS`::

    preflight --PreflightPassed--> arming --Armed--> activating
        |                            |                  |  ActivationSucceeded
        +--Refused--> refused <------+                  v
                                                     gating --GateHeld--> committing --CommitDone--> committed
    activating: ActivationFailed, DeadlinePassed, Interrupted --> rolling-back
    gating:     CheckFailed, DeadlinePassed, Interrupted      --> rolling-back
    committing: CommitFailed, DeadlinePassed                  --> rolling-back (the profile restored)
    rolling-back: RolledBack --> rolled-back; RollbackFailed, DeadlinePassed --> needs-operator
    any phase in progress: TakenOver --> rolling-back  (a rollback by the timer or an operator
                                                        after the switcher died)

The rules:

- Nothing is touched before the rollback timer is armed (``Arm`` is the first
  action); the boot default changes only in ``Commit``, after the gate held.
- The *deadline* (``Limits.deadline`` seconds after arming) bounds activation
  and gate together; the external timer fires at the same moment, so the
  switcher and the timer agree on when a switch is too late.
- The *gate* opens when activation succeeds and holds when every check's
  latest result passed and ``Limits.gate`` seconds went by since it opened.
  A check that fails fails the gate at once ("pass continuously"); a check
  that is pending (an agent still starting, systemd still booting units)
  delays the commit, and the deadline ends the wait.
- Committing and rolling back are bounded too (``commit_timeout``,
  ``rollback_timeout``): a commit that fails or hangs is rolled back with
  the profile restored; a rollback that fails or hangs needs an operator.
- An interrupt (SIGINT/SIGTERM to the switcher) rolls back while activating
  or gating, and is ignored while committing or rolling back: both are short
  and must not be left half done.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

MAX_REASON = 2000  # characters of a reason in a ledger entry or an alert


def clip(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters with a mark where it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- phases -------------------------------------------------------------------


class Phase(enum.StrEnum):
    PREFLIGHT = "preflight"
    ARMING = "arming"
    ACTIVATING = "activating"
    GATING = "gating"
    COMMITTING = "committing"
    ROLLING_BACK = "rolling-back"
    REFUSED = "refused"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    NEEDS_OPERATOR = "needs-operator"


IN_PROGRESS: Final = frozenset(
    {Phase.ARMING, Phase.ACTIVATING, Phase.GATING, Phase.COMMITTING, Phase.ROLLING_BACK}
)
FINISHED: Final = frozenset(
    {Phase.REFUSED, Phase.COMMITTED, Phase.ROLLED_BACK, Phase.NEEDS_OPERATOR}
)

EXIT_CODES: Final[Mapping[Phase, int]] = {
    Phase.COMMITTED: 0,
    Phase.ROLLED_BACK: 1,
    Phase.REFUSED: 2,
    Phase.NEEDS_OPERATOR: 3,
}
"""What ``keel switch`` exits with, by the phase it ends in (docs/safeswitch.md)."""


class LocalProtocolError(Exception):
    """The shell fed the machine an event its phase does not accept (a bug in the shell)."""


# --- events (what happened) -----------------------------------------------------


@dataclass(frozen=True)
class PreflightPassed:
    """The target is a system, the lock is ours, the running system is known."""


@dataclass(frozen=True)
class Refused:
    """The switch cannot start; nothing was changed (or what arming did was undone)."""

    reason: str


@dataclass(frozen=True)
class Armed:
    """The GC roots exist and the rollback timer is armed outside the switcher."""


@dataclass(frozen=True)
class ActivationSucceeded:
    pass


@dataclass(frozen=True)
class ActivationFailed:
    detail: str


@dataclass(frozen=True)
class CheckPassed:
    name: str
    detail: str = ""


@dataclass(frozen=True)
class CheckPending:
    name: str
    detail: str = ""


@dataclass(frozen=True)
class CheckFailed:
    name: str
    detail: str = ""


@dataclass(frozen=True)
class GateHeld:
    """Derived by :meth:`Switch.tick`: every check passed for the whole gate."""


@dataclass(frozen=True)
class DeadlinePassed:
    """Derived by :meth:`Switch.tick`: the current phase ran out of time."""


@dataclass(frozen=True)
class Interrupted:
    signal: str


@dataclass(frozen=True)
class CommitDone:
    pass


@dataclass(frozen=True)
class CommitFailed:
    detail: str


@dataclass(frozen=True)
class RolledBack:
    pass


@dataclass(frozen=True)
class RollbackFailed:
    detail: str


@dataclass(frozen=True)
class TakenOver:
    """Someone else (the rollback timer, an operator) rolls back a switch whose switcher died."""

    by: str
    reason: str


Event = (
    PreflightPassed
    | Refused
    | Armed
    | ActivationSucceeded
    | ActivationFailed
    | CheckPassed
    | CheckPending
    | CheckFailed
    | GateHeld
    | DeadlinePassed
    | Interrupted
    | CommitDone
    | CommitFailed
    | RolledBack
    | RollbackFailed
    | TakenOver
)

# --- the transition table: every legal (phase, event) pair, and nothing else -----

TRANSITIONS: Final[Mapping[Phase, Mapping[type[Event], Phase]]] = {
    Phase.PREFLIGHT: {
        PreflightPassed: Phase.ARMING,
        Refused: Phase.REFUSED,
    },
    Phase.ARMING: {
        Armed: Phase.ACTIVATING,
        Refused: Phase.REFUSED,
        TakenOver: Phase.ROLLING_BACK,
    },
    Phase.ACTIVATING: {
        ActivationSucceeded: Phase.GATING,
        ActivationFailed: Phase.ROLLING_BACK,
        DeadlinePassed: Phase.ROLLING_BACK,
        Interrupted: Phase.ROLLING_BACK,
        TakenOver: Phase.ROLLING_BACK,
    },
    Phase.GATING: {
        CheckPassed: Phase.GATING,
        CheckPending: Phase.GATING,
        CheckFailed: Phase.ROLLING_BACK,
        GateHeld: Phase.COMMITTING,
        DeadlinePassed: Phase.ROLLING_BACK,
        Interrupted: Phase.ROLLING_BACK,
        TakenOver: Phase.ROLLING_BACK,
    },
    Phase.COMMITTING: {
        CommitDone: Phase.COMMITTED,
        CommitFailed: Phase.ROLLING_BACK,
        DeadlinePassed: Phase.ROLLING_BACK,
        Interrupted: Phase.COMMITTING,
        TakenOver: Phase.ROLLING_BACK,
    },
    Phase.ROLLING_BACK: {
        RolledBack: Phase.ROLLED_BACK,
        RollbackFailed: Phase.NEEDS_OPERATOR,
        DeadlinePassed: Phase.NEEDS_OPERATOR,
        Interrupted: Phase.ROLLING_BACK,
        TakenOver: Phase.ROLLING_BACK,
    },
    Phase.REFUSED: {},
    Phase.COMMITTED: {},
    Phase.ROLLED_BACK: {},
    Phase.NEEDS_OPERATOR: {},
}

# --- actions (what the shell must do, in order) -----------------------------------


@dataclass(frozen=True)
class Arm:
    """Keep old and new alive (GC roots) and arm the rollback timer; then feed Armed or Refused."""


@dataclass(frozen=True)
class Activate:
    """``NEW/bin/switch-to-configuration test`` in its own unit; feed its outcome."""


@dataclass(frozen=True)
class StopActivation:
    """Stop the activation if it still runs (a hang, an interrupt, a takeover)."""


@dataclass(frozen=True)
class OpenGate:
    """Start running every check; feed CheckPassed/CheckPending/CheckFailed."""


@dataclass(frozen=True)
class CloseGate:
    """Stop running the checks."""


@dataclass(frozen=True)
class Commit:
    """Add the new generation to the profile, ``switch-to-configuration boot``; feed the outcome."""


@dataclass(frozen=True)
class StopCommit:
    pass


@dataclass(frozen=True)
class RollBack:
    """``OLD/bin/switch-to-configuration test``; with ``restore_profile`` also the profile
    and the boot default as they were; feed RolledBack or RollbackFailed."""

    restore_profile: bool


@dataclass(frozen=True)
class StopRollback:
    pass


@dataclass(frozen=True)
class Disarm:
    """Stop the rollback timer: the switch is decided."""


@dataclass(frozen=True)
class ReleaseRoots:
    """Drop the switch's GC roots (the old system stays alive where a rollback still needs it)."""


@dataclass(frozen=True)
class Record:
    """A ledger entry (source ``safeswitch``, subject the switch id)."""

    kind: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class SendAlert:
    kind: str
    text: str


Action = (
    Arm
    | Activate
    | StopActivation
    | OpenGate
    | CloseGate
    | Commit
    | StopCommit
    | RollBack
    | StopRollback
    | Disarm
    | ReleaseRoots
    | Record
    | SendAlert
)

# --- the gate -----------------------------------------------------------------------

Verdict = Literal["pass", "pending", "fail"]


@dataclass
class CheckState:
    name: str
    verdict: Verdict | None = None  # None: no result yet
    detail: str = ""
    at: float | None = None
    results: int = 0


class Gate:
    """The health gate: every check passing, continuously, for ``hold`` seconds.

    Used by :class:`Switch` and alone by ``keel switch check``.
    """

    def __init__(self, checks: Sequence[str], hold: float) -> None:
        if len(set(checks)) != len(checks):
            raise ValueError(f"check names must be unique: {list(checks)}")
        if hold < 0:
            raise ValueError("the gate cannot hold for a negative time")
        self.hold = hold
        self.checks = {name: CheckState(name) for name in checks}
        self.opened_at: float | None = None
        self.failure: CheckState | None = None

    def open(self, now: float) -> None:
        self.opened_at = now

    @property
    def holds_at(self) -> float | None:
        """The earliest time the gate can hold."""
        return None if self.opened_at is None else self.opened_at + self.hold

    def report(self, name: str, verdict: Verdict, detail: str, now: float) -> None:
        if self.opened_at is None:
            raise LocalProtocolError(f"check {name!r} reported before the gate opened")
        state = self.checks.get(name)
        if state is None:
            raise LocalProtocolError(f"unknown check {name!r} (known: {sorted(self.checks)})")
        state.verdict, state.detail, state.at = verdict, detail, now
        state.results += 1
        if verdict == "fail" and self.failure is None:
            self.failure = replace(state)  # as it failed, whatever it says later

    def held(self, now: float) -> bool:
        holds_at = self.holds_at
        return (
            holds_at is not None
            and self.failure is None
            and now >= holds_at
            and all(state.verdict == "pass" for state in self.checks.values())
        )

    def waiting_on(self) -> list[CheckState]:
        """The checks that keep the gate from holding (no result, pending, failed)."""
        return [state for state in self.checks.values() if state.verdict != "pass"]

    def summary(self) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "verdict": s.verdict, "detail": s.detail, "results": s.results}
            for s in self.checks.values()
        ]


# --- the switch ------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    gate: float = 30.0
    deadline: float = 300.0
    commit_timeout: float = 120.0
    rollback_timeout: float = 120.0

    def problem(self) -> str | None:
        """Why these limits cannot work together, or None."""
        for name in ("gate", "deadline", "commit_timeout", "rollback_timeout"):
            value = getattr(self, name)
            if not value >= 0:
                return f"{name} must be a number of seconds >= 0, got {value}"
        if self.deadline <= self.gate:
            return (
                f"the deadline ({self.deadline:g} s) must be longer than the gate "
                f"({self.gate:g} s): it bounds activation and gate together"
            )
        if self.commit_timeout <= 0 or self.rollback_timeout <= 0:
            return "commit_timeout and rollback_timeout must be > 0"
        return None


@dataclass(frozen=True)
class Plan:
    """What one switch is about: its id, both systems, the checks of its gate."""

    id: str
    old: str
    new: str
    checks: tuple[str, ...] = ()


@dataclass
class Timeline:
    armed_at: float | None = None
    activated_at: float | None = None
    commit_started: float | None = None
    rollback_started: float | None = None
    finished_at: float | None = None


@dataclass
class Switch:
    """One switch. Feed :meth:`handle` events and :meth:`tick` the time; obey the actions."""

    plan: Plan
    limits: Limits
    phase: Phase = Phase.PREFLIGHT
    reason: str = ""
    rolled_back_by: str = "switcher"
    failed_checks: list[dict[str, str]] = field(default_factory=list)
    restore_profile: bool = False
    interrupts_ignored: int = 0
    timeline: Timeline = field(default_factory=Timeline)

    def __post_init__(self) -> None:
        problem = self.limits.problem()
        if problem is not None:
            raise ValueError(problem)
        self.gate = Gate(self.plan.checks, self.limits.gate)

    # --- reading ----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    @property
    def exit_code(self) -> int | None:
        return EXIT_CODES.get(self.phase)

    def deadline(self) -> float | None:
        """When the current phase runs out of time (None: no limit in this phase)."""
        t = self.timeline
        if self.phase in (Phase.ACTIVATING, Phase.GATING) and t.armed_at is not None:
            return t.armed_at + self.limits.deadline
        if self.phase is Phase.COMMITTING and t.commit_started is not None:
            return t.commit_started + self.limits.commit_timeout
        if self.phase is Phase.ROLLING_BACK and t.rollback_started is not None:
            return t.rollback_started + self.limits.rollback_timeout
        return None

    def next_wakeup(self, now: float) -> float | None:
        """The next time after ``now`` that :meth:`tick` can change anything (None: only
        events can). Once the gate's time is over, only a result or the deadline can."""
        times = [t for t in (self.deadline(),) if t is not None]
        holds_at = self.gate.holds_at
        if self.phase is Phase.GATING and holds_at is not None and holds_at > now:
            times.append(holds_at)
        return min(times) if times else None

    # --- feeding ----------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Let time pass: the gate may hold, a deadline may pass."""
        deadline = self.deadline()
        if deadline is not None and now >= deadline:
            return self.handle(DeadlinePassed(), now)
        if self.phase is Phase.GATING and self.gate.held(now):
            return self.handle(GateHeld(), now)
        return []

    def handle(self, event: Event, now: float) -> list[Action]:
        source = self.phase
        target = TRANSITIONS[source].get(type(event))
        if target is None:
            raise LocalProtocolError(
                f"{type(event).__name__} cannot happen while {source.value}"
                + (" (the switch is over)" if self.finished else "")
            )
        actions = self._effects(source, event, target, now)
        self.phase = target
        if target in FINISHED:
            self.timeline.finished_at = now
        if target is Phase.GATING:
            # A result (or an empty gate) may complete the gate: commit now, not at the next tick.
            actions += self.tick(now)
        return actions

    # --- what each transition does ------------------------------------------------

    def _effects(self, source: Phase, event: Event, target: Phase, now: float) -> list[Action]:
        t = self.timeline
        if isinstance(event, PreflightPassed):
            return [Arm()]
        if isinstance(event, Refused):
            self.reason = event.reason
            return []
        if isinstance(event, Armed):
            t.armed_at = now
            return [Activate()]
        if isinstance(event, ActivationSucceeded):
            t.activated_at = now
            self.gate.open(now)
            return [OpenGate()]
        if isinstance(event, CheckPassed | CheckPending | CheckFailed):
            verdict: Verdict = (
                "pass"
                if isinstance(event, CheckPassed)
                else "pending"
                if isinstance(event, CheckPending)
                else "fail"
            )
            self.gate.report(event.name, verdict, event.detail, now)
            if target is Phase.ROLLING_BACK:
                self.failed_checks = [{"name": event.name, "detail": event.detail}]
                return self._roll_back(
                    now, f"check {event.name} failed: {event.detail}", [CloseGate()]
                )
            return []
        if isinstance(event, GateHeld):
            t.commit_started = now
            return [CloseGate(), Commit()]
        if isinstance(event, CommitDone):
            return [Disarm(), self._record("committed", now), ReleaseRoots()]
        if isinstance(event, ActivationFailed):
            return self._roll_back(now, f"activation failed: {event.detail}", [])
        if isinstance(event, CommitFailed):
            self.restore_profile = True
            return self._roll_back(now, f"commit failed: {event.detail}", [])
        if isinstance(event, Interrupted):
            if target is source:  # committing or rolling back: finish it
                self.interrupts_ignored += 1
                return []
            return self._roll_back(
                now, f"interrupted by {event.signal}", self._stop_what_runs(source)
            )
        if isinstance(event, TakenOver):
            # A rollback the dead switcher began is redone from its start.
            if source is Phase.COMMITTING:
                self.restore_profile = True
            self.rolled_back_by = event.by
            return self._roll_back(now, event.reason, self._stop_what_runs(source))
        if isinstance(event, DeadlinePassed):
            return self._deadline_passed(source, now)
        if isinstance(event, RolledBack):
            return [
                Disarm(),
                self._record("rolled-back", now),
                SendAlert("rolled-back", self._alert_text("rolled back")),
                ReleaseRoots(),
            ]
        if isinstance(event, RollbackFailed):
            return self._rollback_failed(event.detail, now, [])
        raise LocalProtocolError(
            f"no effect defined for {type(event).__name__}"
        )  # pragma: no cover

    def _deadline_passed(self, source: Phase, now: float) -> list[Action]:
        if source is Phase.ACTIVATING:
            return self._roll_back(
                now,
                f"activation did not finish within the deadline ({self.limits.deadline:g} s)",
                [StopActivation()],
            )
        if source is Phase.GATING:
            waiting = self.gate.waiting_on()
            self.failed_checks = [
                {"name": s.name, "detail": s.detail or "no result yet"} for s in waiting
            ]
            names = ", ".join(
                f"{s.name} ({s.verdict or 'no result'}: {s.detail})" if s.detail else s.name
                for s in waiting
            )
            return self._roll_back(
                now,
                f"the gate did not hold before the deadline ({self.limits.deadline:g} s); "
                f"waiting on: {names or 'nothing'}",
                [CloseGate()],
            )
        if source is Phase.COMMITTING:
            self.restore_profile = True
            return self._roll_back(
                now,
                f"commit did not finish within {self.limits.commit_timeout:g} s",
                [StopCommit()],
            )
        # rolling back
        return self._rollback_failed(
            f"the rollback did not finish within {self.limits.rollback_timeout:g} s",
            now,
            [StopRollback()],
        )

    def _stop_what_runs(self, source: Phase) -> list[Action]:
        if source is Phase.ACTIVATING:
            return [StopActivation()]
        if source is Phase.GATING:
            return [CloseGate()]
        if source is Phase.COMMITTING:
            return [StopCommit()]
        if source is Phase.ROLLING_BACK:
            return [StopRollback()]
        return [StopActivation()]  # arming: an activation may have started

    def _roll_back(self, now: float, reason: str, before: list[Action]) -> list[Action]:
        self.reason = reason
        self.timeline.rollback_started = now
        return [*before, RollBack(restore_profile=self.restore_profile)]

    def _rollback_failed(self, detail: str, now: float, before: list[Action]) -> list[Action]:
        self.reason = f"{self.reason}; then the rollback failed: {detail}"
        return [
            *before,
            Disarm(),
            self._record("rollback-failed", now),
            SendAlert("rollback-failed", self._alert_text("could not be rolled back")),
        ]

    def _record(self, kind: str, now: float) -> Record:
        t = self.timeline
        data: dict[str, Any] = {"old": self.plan.old, "new": self.plan.new}
        if kind != "committed":
            # Metadata, bounded: a ledger entry is no place for a whole log.
            data["reason"] = clip(self.reason, MAX_REASON)
            data["by"] = self.rolled_back_by
            if self.failed_checks:
                data["failed_checks"] = [
                    {"name": clip(c["name"], 200), "detail": clip(c["detail"], 500)}
                    for c in self.failed_checks[:20]
                ]
        if t.armed_at is not None:
            data["seconds"] = round(now - t.armed_at, 3)
        if t.activated_at is not None and t.armed_at is not None:
            data["activation_seconds"] = round(t.activated_at - t.armed_at, 3)
        if self.plan.checks:
            data["checks"] = list(self.plan.checks)
        return Record(kind, data)

    def _alert_text(self, what: str) -> str:
        return f"switch {self.plan.id} to {self.plan.new} {what}: {clip(self.reason, MAX_REASON)}"

    # --- resuming from the state file ----------------------------------------------

    @classmethod
    def resume(
        cls,
        plan: Plan,
        limits: Limits,
        phase: Phase,
        *,
        restore_profile: bool = False,
        armed_at: float | None = None,
    ) -> Switch:
        """The machine of a switch whose switcher is gone, as its state file left it."""
        if phase not in IN_PROGRESS:
            raise LocalProtocolError(f"a {phase.value} switch cannot be resumed")
        switch = cls(plan, limits, phase=phase, restore_profile=restore_profile)
        switch.timeline.armed_at = armed_at
        return switch
