"""The shell around :class:`~keel.safeswitch.machine.Switch`: it feeds the machine and obeys it.

Three entry points share one executor (:class:`Executor`):

- :func:`switch` (``keel switch TOPLEVEL``): preflight, then the whole switch;
- :func:`take_over` (``keel switch rollback`` of a switch whose switcher is
  gone, run by the rollback timer or an operator): the machine resumed from
  the state file, rolled back from wherever it was;
- the loop in :meth:`Executor.drive`: wait for an event (an activation ended,
  a check answered, a signal) or for the machine's next deadline, feed it,
  persist the state file, carry out the actions.

Long actions (activations, the commit, the rollback, the checks) run as tasks
that post their outcome as events; an event the machine's phase no longer
accepts (a check that answers after the gate closed) is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from keel import paths
from keel.errors import ConfigError, KeelError
from keel.ledger.recorder import LedgerUnavailable, Recorder
from keel.safeswitch import machine as m
from keel.safeswitch.checks import CheckSpec, SystemCheck, WatchCheck, named
from keel.safeswitch.config import AlertSettings, SafeswitchConfig
from keel.safeswitch.evidence import RECORD_TIMEOUT, SOURCE, Evidence, Unfinished
from keel.safeswitch.generations import (
    SWITCH,
    GcRoots,
    Profile,
    nix_env_for,
    resolve_system,
    system_problem,
)
from keel.safeswitch.machine import Verdict, clip
from keel.safeswitch.probing import Prober, failed_units
from keel.safeswitch.report import HostFacts, Output, host_state, short
from keel.safeswitch.runners import Activation, Runners, runners
from keel.safeswitch.state import Lock, ProcessRef, StateFile, SwitchState
from keel.watch.children import describe_status

log = logging.getLogger("keel.safeswitch")

LOG_TAIL = 5  # lines of an activation's log shown when it fails
ALERT_DRAIN = 30.0  # seconds the switch waits for its alerts to be delivered


@dataclass(frozen=True)
class Result:
    """How a switch (or a rollback) ended, for the CLI."""

    phase: m.Phase
    exit_code: int
    state: SwitchState | None
    message: str
    details: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "outcome": self.phase.value,
            "exit_code": self.exit_code,
            "message": self.message,
        }
        if self.details:
            out["host"] = self.details
        if self.state is not None:
            s = self.state
            out.update(
                id=s.id,
                old=s.old,
                new=s.new,
                reason=s.reason or None,
                checks=s.checks,
                generation=s.generation_added,
            )
        return out


def self_command() -> list[str]:
    """How to run this keel again from another process (the rollback timer)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "keel" and os.access(argv0, os.X_OK):
        return [os.path.realpath(argv0)]
    return [sys.executable, "-m", "keel"]


def new_switch_id(wall: float, rng: random.Random) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(wall))
    return f"{stamp}-{rng.getrandbits(24):06x}"


def log_tail(path: str | None, lines: int = LOG_TAIL) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [clip(line.strip(), 200) for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


async def start_system(
    runner: Runners, run_dir: Path, switch_id: str, *, verb: str, system: str, name: str
) -> tuple[Activation, Path]:
    """Start ``SYSTEM/bin/switch-to-configuration VERB`` as ``keel-safeswitch-ID-NAME``."""
    log_path = run_dir / f"{switch_id}-{name}.log"
    activation = await runner.start(
        f"keel-safeswitch-{switch_id}-{name}", [f"{system}/{SWITCH}", verb], log_path
    )
    return activation, log_path


def failure_detail(verb: str, code: int, log_path: Path) -> str:
    tail = log_tail(str(log_path))
    detail = f"switch-to-configuration {verb} {describe_status(code)}"
    return detail + (f": {tail}" if tail else "") + f" (log: {log_path})"


async def check_loop(
    prober: Prober,
    name: str,
    spec: CheckSpec,
    interval: float,
    post: Callable[[Verdict, str], None],
) -> None:
    """Run one check every ``interval`` seconds, posting each verdict, until it fails."""
    while True:
        try:
            verdict, detail = await prober.run(name, spec)
        except Exception as exc:  # a bug: a check that cannot run must not look passed
            log.exception("check %s", name)
            verdict, detail = "fail", f"keel could not run the check: {type(exc).__name__}: {exc}"
        post(verdict, detail)
        if verdict == "fail":
            return
        await asyncio.sleep(interval)


async def gate_check(
    specs: Sequence[tuple[str, CheckSpec]],
    *,
    hold: float,
    deadline: float,
    interval: float,
    clock: Callable[[], float] = time.monotonic,
) -> m.Gate:
    """Hold the gate now, without switching (``keel switch check``, the boot check).

    Returns the gate: ``gate.failure`` is the check that failed, or the gate
    held (``gate.held``), or neither by ``deadline`` seconds.
    """
    gate = m.Gate([name for name, _ in specs], hold)
    system = any(isinstance(spec, SystemCheck) for _, spec in specs)
    prober = Prober(failed_before=await failed_units() if system else frozenset())
    results: asyncio.Queue[tuple[str, Verdict, str]] = asyncio.Queue()
    opened = clock()
    gate.open(opened)

    def poster(name: str) -> Callable[[Verdict, str], None]:
        return lambda verdict, detail: results.put_nowait((name, verdict, detail))

    tasks = [
        asyncio.create_task(check_loop(prober, name, spec, interval, poster(name)))
        for name, spec in specs
    ]
    end = opened + deadline
    try:
        while True:
            now = clock()
            if gate.failure is not None or gate.held(now) or now >= end:
                break
            holds_at = gate.holds_at or end
            wake = holds_at if now < holds_at < end else end
            try:
                name, verdict, detail = await asyncio.wait_for(results.get(), wake - now)
            except TimeoutError:
                continue
            gate.report(name, verdict, detail, clock())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return gate


# --- alerts ---------------------------------------------------------------------------------


class Alerter:
    """Alerts through watch's routes (keel.watch.alert_router), delivered before the switch exits."""

    def __init__(
        self, settings: dict[str, Any] | None, *, host: str, record: Any, out: Output
    ) -> None:
        self.settings = settings
        self.host = host
        self.record = record
        self.out = out
        self._router: Any = None

    def send(self, switch_id: str, kind: str, text: str) -> None:
        if not self.settings:
            return
        try:
            router, names = self._open()
        except ConfigError as exc:
            self.out.line(f"  alert not sent: {exc}")
            return
        if not names:
            return
        from keel.watch.alert_routes import Alert

        alert = Alert(
            SOURCE, switch_id, kind, text, self.host, time.time(), source="keel-safeswitch"
        )
        router.send(alert, names)

    def _open(self) -> tuple[Any, tuple[str, ...]]:
        from keel.telegram import read_token
        from keel.watch.alert_router import AlertRouter
        from keel.watch.alert_routes import TelegramRoute
        from keel.watch.config import load_routes

        assert self.settings is not None
        routes = load_routes(Path(self.settings["watch_config"]))
        wanted = self.settings.get("routes")
        names = tuple(routes) if wanted is None else tuple(wanted)
        missing = [n for n in names if n not in routes]
        if missing:
            raise ConfigError(
                f"{self.settings['watch_config']}: no alert route {missing[0]!r} "
                f"(safeswitch alerts.routes names watch's routes: {', '.join(routes) or 'none'})"
            )
        if self._router is None:
            tokens = {
                name: read_token(route.token_file)
                for name, route in routes.items()
                if isinstance(route, TelegramRoute) and name in names
            }
            self._router = AlertRouter({n: routes[n] for n in names}, tokens, record=self.record)
            self._router.start()
        return self._router, names

    async def close(self) -> None:
        if self._router is not None:
            await self._router.drain(ALERT_DRAIN)
            await self._router.close()


# --- the executor ------------------------------------------------------------------------------

Event = m.Event


class Executor:
    """Carries out one switch machine's actions on this host."""

    def __init__(
        self,
        machine: m.Switch,
        state: SwitchState,
        *,
        files: StateFile,
        runner: Runners,
        profile: Profile,
        specs: Sequence[tuple[str, CheckSpec]],
        prober: Prober,
        recorder: Recorder,
        alerter: Alerter,
        out: Output,
        interval: float,
        own_timer: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.machine = machine
        self.state = state
        self.files = files
        self.runner = runner
        self.profile = profile
        self.specs = list(specs)
        self.prober = prober
        self.recorder = recorder
        self.alerter = alerter
        self.out = out
        self.interval = interval
        self.own_timer = own_timer
        self.clock = clock
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._activation: Activation | None = None
        self._task: asyncio.Task[None] | None = None  # activation, commit or rollback
        self._checks: list[asyncio.Task[None]] = []
        self._evidence: tuple[str, tuple[str, ...]] | None = None  # (phase, roots) last kept
        self._evidence_failed = False

    # --- the loop -----------------------------------------------------------------------

    def post(self, event: Event) -> None:
        self.events.put_nowait(event)

    async def drive(self, actions: list[m.Action]) -> None:
        self.persist()
        await self.execute(actions)
        while not self.machine.finished:
            wake = self.machine.next_wakeup(self.clock())
            timeout = None if wake is None else max(0.0, wake - self.clock())
            try:
                event = await asyncio.wait_for(self.events.get(), timeout)
            except TimeoutError:
                actions = self.machine.tick(self.clock())
            else:
                if type(event) not in m.TRANSITIONS[self.machine.phase]:
                    continue  # the answer of something already stopped
                actions = self.machine.handle(event, self.clock())
            self.persist()
            await self.execute(actions)
        self.persist()

    def persist(self) -> None:
        s, sw = self.state, self.machine
        phase_changed = s.phase is not sw.phase
        s.phase = sw.phase
        s.reason = sw.reason
        s.restore_profile = sw.restore_profile
        s.rolled_back_by = (
            sw.rolled_back_by
            if sw.phase
            in (
                m.Phase.ROLLED_BACK,
                m.Phase.NEEDS_OPERATOR,
                m.Phase.ROLLING_BACK,
            )
            else ""
        )
        if sw.gate.opened_at is not None or not s.checks:
            s.checks = sw.gate.summary()
        self.files.write(s)
        self.keep_evidence()
        if phase_changed:
            self.announce(sw.phase)

    def keep_evidence(self) -> None:
        """The durable trace a reboot leaves of this switch (evidence.py), kept in step."""
        s = self.state
        if s.state_dir is None:
            return
        evidence = Evidence(Path(s.state_dir))
        try:
            if s.phase in m.FINISHED:
                if self._evidence != ("", ()):
                    evidence.remove(s.id)
                    self._evidence = ("", ())
                return
            key = (s.phase.value, tuple(s.gcroots))
            if key != self._evidence:
                unfinished = Unfinished(
                    id=s.id,
                    kind="switch",
                    phase=s.phase.value,
                    old=s.old,
                    new=s.new,
                    started_at=s.started_at,
                    ledger=s.ledger,
                    gcroots=tuple(s.gcroots),
                    boot_id=s.boot_id,
                )
                evidence.write(unfinished)
                self._evidence = key
        except OSError as exc:
            if not self._evidence_failed:
                self._evidence_failed = True
                self.out.line(
                    f"  note: cannot keep the switch's trace in {evidence.dir} ({exc.strerror}); "
                    "a reboot now would leave it undecided in the ledger"
                )

    def announce(self, phase: m.Phase) -> None:
        sw, say = self.machine, self.out.line
        if phase is m.Phase.GATING:
            at = sw.timeline.activated_at
            took = f" in {at - sw.timeline.armed_at:.1f} s" if at and sw.timeline.armed_at else ""
            checks = ", ".join(sw.plan.checks) or "no checks: the gate is a wait"
            say(f"activated{took}; holding the gate for {sw.limits.gate:g} s ({checks})")
        elif phase is m.Phase.COMMITTING:
            say("gate held: committing (new profile generation, boot default)")
        elif phase is m.Phase.ROLLING_BACK:
            say(f"ROLLING BACK to {self.state.old}: {sw.reason}")

    async def execute(self, actions: list[m.Action]) -> None:
        for action in actions:
            await self._do(action)

    async def _do(self, action: m.Action) -> None:
        if isinstance(action, m.Activate):
            self._start(self._activate(), m.ActivationFailed)
        elif isinstance(action, m.OpenGate):
            for name, spec in self.specs:
                self._checks.append(asyncio.create_task(self._check_loop(name, spec)))
        elif isinstance(action, m.CloseGate):
            await self.close_gate()
        elif isinstance(action, m.Commit):
            self._start(self._commit(), m.CommitFailed)
        elif isinstance(action, m.RollBack):
            self._start(self._roll_back(action.restore_profile), m.RollbackFailed)
        elif isinstance(action, m.StopActivation | m.StopCommit | m.StopRollback):
            await self._stop_running()
        elif isinstance(action, m.Disarm):
            await self._disarm()
        elif isinstance(action, m.ReleaseRoots):
            GcRoots.remove(self.state.gcroots)
        elif isinstance(action, m.Record):
            await self._record(action)
        elif isinstance(action, m.SendAlert):
            self.alerter.send(self.state.id, action.kind, action.text)
        elif isinstance(action, m.Arm):  # pragma: no cover - done by switch() before the loop
            raise m.LocalProtocolError("Arm is carried out by the preflight")

    def _start(self, coro: Coroutine[Any, Any, None], failed: Callable[[str], Event]) -> None:
        """Run a long action; a bug in it is its failure, not a switch left waiting."""

        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                log.exception("switch %s", self.state.id)
                self.post(failed(f"internal error in keel: {type(exc).__name__}: {exc}"))

        self._task = asyncio.create_task(guarded())
        # Cancelled before it ran (a stop, or the switcher's end): the action never starts.
        self._task.add_done_callback(lambda _: coro.close())

    async def _cancel_action(self) -> Activation | None:
        """Cancel the long action in progress; the activation it started, now the caller's."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        activation, self._activation = self._activation, None
        return activation

    async def _stop_running(self) -> None:
        activation = await self._cancel_action()
        if activation is not None:
            await activation.stop()
        elif self.state.activation is not None:
            # Taking over from a dead switcher: its activation may still run.
            await self.runner.stop(self.state.activation)

    async def abandon(self) -> None:
        """A bug ends this switcher: it starts nothing more, and leaves what runs to the timer.

        The action in progress is cancelled (as it would be when the process exits);
        an activation already running keeps running, watched no longer from here.
        """
        activation = await self._cancel_action()
        if activation is not None:
            activation.detach()

    async def close_gate(self) -> None:
        tasks, self._checks = self._checks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _disarm(self) -> None:
        if self.state.timer is None:
            return
        try:
            await self.runner.disarm(self.state.timer, own=self.own_timer)
        except KeelError as exc:
            # It will fire, find the switch decided, and do nothing.
            self.out.line(f"  note: could not stop the rollback timer ({exc}); it will do nothing")

    async def _record(self, action: m.Record) -> None:
        try:
            await self.recorder.record_durable(
                action.kind, self.state.id, action.data, timeout=RECORD_TIMEOUT
            )
        except LedgerUnavailable as exc:
            self.out.line(f"  note: the ledger did not take the {action.kind!r} entry: {exc}")

    # --- the long actions -------------------------------------------------------------------

    async def _run_system(self, verb: str, system: str, name: str) -> tuple[int, str]:
        """``SYSTEM/bin/switch-to-configuration VERB`` in its own unit or session."""
        activation, log_path = await start_system(
            self.runner, self.files.run_dir, self.state.id, verb=verb, system=system, name=name
        )
        self._activation = activation
        self.state.activation = activation.runner
        self.files.write(self.state)
        code = await activation.wait()
        self._activation = None
        self.state.activation = None
        return code, "" if code == 0 else failure_detail(verb, code, log_path)

    async def _activate(self) -> None:
        self.out.line(f"activating {self.state.new} (switch-to-configuration test)")
        try:
            code, detail = await self._run_system("test", self.state.new, "activate")
        except KeelError as exc:
            self.post(m.ActivationFailed(str(exc)))
            return
        self.post(m.ActivationSucceeded() if code == 0 else m.ActivationFailed(detail))

    async def _check_loop(self, name: str, spec: CheckSpec) -> None:
        def post(verdict: Verdict, detail: str) -> None:
            if verdict == "pass":
                self.post(m.CheckPassed(name, detail))
            elif verdict == "pending":
                self.post(m.CheckPending(name, detail))
            else:
                self.post(m.CheckFailed(name, detail))

        await check_loop(self.prober, name, spec, self.interval, post)

    async def _commit(self) -> None:
        s = self.state
        try:
            s.profile_before = self.profile.target()
            self.files.write(s)
            nix_env = nix_env_for(self.profile, s.new)
            s.generation_added = await asyncio.to_thread(self.profile.add, s.new, nix_env=nix_env)
            self.files.write(s)
            code, detail = await self._run_system("boot", s.new, "boot")
        except (KeelError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.post(m.CommitFailed(reason))
            return
        self.post(m.CommitDone() if code == 0 else m.CommitFailed(detail))

    async def _roll_back(self, restore_profile: bool) -> None:
        s = self.state
        try:
            code, detail = await self._run_system("test", s.old, "rollback")
            if code != 0:
                self.post(m.RollbackFailed(detail))
                return
            if restore_profile:
                detail = await self._restore_profile()
                if detail:
                    self.post(m.RollbackFailed(detail))
                    return
        except (KeelError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.post(m.RollbackFailed(reason))
            return
        self.post(m.RolledBack())

    async def _restore_profile(self) -> str:
        """The profile and boot default as before the commit; an error text, or ''."""
        s = self.state
        added, before = s.generation_added, s.profile_before
        if added is None:
            return ""  # the commit never changed the profile
        if before is not None:
            self.profile.point_to(before)
        else:  # there was no profile before this switch
            with contextlib.suppress(FileNotFoundError):
                self.profile.path.unlink()
        if added != (os.path.basename(before) if before else None):
            self.profile.remove(added)
        s.generation_added = None
        self.files.write(s)
        code, detail = await self._run_system("boot", s.old, "boot-restore")
        return "" if code == 0 else detail


# --- starting a switch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    toplevel: Path
    config: SafeswitchConfig
    extra_checks: tuple[CheckSpec, ...] = ()


def choose_checks(config: SafeswitchConfig, extra: Sequence[CheckSpec]) -> list[CheckSpec]:
    """The configured checks, or (no ``checks`` key) those that apply to this host."""
    if config.checks is not None:
        chosen = list(config.checks)
    else:
        chosen = []
        watch_socket = paths.socket_file("watch")
        if watch_socket.exists():
            chosen.append(WatchCheck(str(watch_socket)))
        if Path("/run/systemd/system").is_dir():
            chosen.append(SystemCheck())
    return chosen + list(extra)


class Refusal(Exception):
    """Preflight said no: nothing was changed."""


async def switch(
    request: Request,
    out: Output,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> Result:
    config = request.config
    rng = rng or random.Random()
    switch_id = new_switch_id(wall(), rng)
    files = StateFile(config.run_dir)
    lock = Lock(config.run_dir)
    runner = runners(config.timer)
    profile = Profile(config.profile)
    specs = named(choose_checks(config, request.extra_checks))
    try:
        old, new = _preflight(request, runner, profile, lock, files)
    except Refusal as exc:
        lock.release()
        out.line(f"refused: {exc}")
        return Result(m.Phase.REFUSED, 2, None, f"refused, nothing changed: {exc}")

    plan = m.Plan(switch_id, old, new, tuple(name for name, _ in specs))
    sw = m.Switch(plan, config.limits)
    now_wall = wall()
    state = SwitchState(
        id=switch_id,
        phase=sw.phase,
        old=old,
        new=new,
        profile=str(config.profile),
        current=str(config.current),
        limits=config.limits,
        started_at=now_wall,
        deadline_at=now_wall + config.limits.deadline,
        switcher=ProcessRef.of(os.getpid()),
        ledger=str(config.ledger) if config.ledger else None,
        alerts=_alert_settings(config.alerts),
        host=config.host,
        run_dir=str(config.run_dir),
        state_dir=str(config.state_dir),
    )
    recorder = Recorder(config.ledger, SOURCE)
    alerter = Alerter(state.alerts, host=config.host, record=recorder.record, out=out)
    failed_before = (
        await failed_units() if any(isinstance(s, SystemCheck) for _, s in specs) else frozenset()
    )
    executor = Executor(
        sw,
        state,
        files=files,
        runner=runner,
        profile=profile,
        specs=specs,
        prober=Prober(failed_before=failed_before),
        recorder=recorder,
        alerter=alerter,
        out=out,
        interval=config.interval,
        clock=clock,
    )
    out.line(f"switch {switch_id}: {short(old)} -> {short(new)}")
    out.line(f"  old: {old}")
    out.line(f"  new: {new}")
    loop = asyncio.get_running_loop()
    installed = _install_signals(loop, executor)
    await recorder.start()
    try:
        actions = sw.handle(m.PreflightPassed(), clock())
        assert actions == [m.Arm()]
        actions = await _arm(executor, config, clock)
        await executor.drive(actions)
    except Exception:  # a bug in keel: leave the host to the timer, say so plainly
        trace = traceback.format_exc()
        with contextlib.suppress(Exception):  # the first bug is the one to report
            await executor.abandon()
        return _internal_error(executor, trace)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await executor.close_gate()
        await alerter.close()
        await recorder.close()
        lock.release()
    return _result(executor)


def _internal_error(executor: Executor, text: str) -> Result:
    state = executor.state
    trace = Path(executor.files.run_dir) / f"{state.id}-error.log"
    with contextlib.suppress(OSError):
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text(text)
    if state.timer is not None and not executor.machine.finished:
        fate = (
            f"the rollback timer rolls the switch back at "
            f"{time.strftime('%H:%M:%S', time.localtime(state.deadline_at))} "
            "(or run `keel switch rollback` now)"
        )
    else:
        fate = "see `keel switch status`"
    message = f"internal error in keel (a bug; the traceback is in {trace}): {fate}"
    executor.out.line(message)
    return Result(m.Phase.NEEDS_OPERATOR, 3, state, message)


def _preflight(
    request: Request, runner: Runners, profile: Profile, lock: Lock, files: StateFile
) -> tuple[str, str]:
    config = request.config
    if (problem := runner.available()) is not None:
        raise Refusal(problem)
    if (problem := system_problem(request.toplevel)) is not None:
        raise Refusal(problem)
    new = os.path.realpath(request.toplevel)
    try:
        old = resolve_system(config.current)
    except KeelError as exc:
        raise Refusal(f"the running system is unknown: {exc} (--current)") from None
    if (problem := profile.problem()) is not None:
        raise Refusal(problem)
    if not lock.try_acquire():
        raise Refusal(f"another switch is in progress{_describe_holder(files)}")
    try:
        previous = files.read()
    except KeelError as exc:
        raise Refusal(str(exc)) from None
    if previous is not None and previous.in_progress:
        raise Refusal(
            f"switch {previous.id} to {previous.new} was interrupted ({previous.phase.value}) "
            "and is not rolled back yet; its timer rolls it back at "
            f"{time.strftime('%H:%M:%S', time.localtime(previous.deadline_at))}, or run "
            "`keel switch rollback` now"
        )
    return old, new


def _describe_holder(files: StateFile) -> str:
    with contextlib.suppress(KeelError):
        state = files.read()
        if state is not None and state.in_progress:
            pid = f"pid {state.switcher.pid}, " if state.switcher else ""
            return f" ({pid}switch {state.id} to {state.new}, {state.phase.value}; see `keel switch status`)"
    return " (see `keel switch status`)"


def _alert_settings(alerts: AlertSettings | None) -> dict[str, Any] | None:
    if alerts is None:
        return None
    return {
        "watch_config": str(alerts.watch_config),
        "routes": list(alerts.routes) if alerts.routes is not None else None,
    }


async def _arm(
    executor: Executor, config: SafeswitchConfig, clock: Callable[[], float]
) -> list[m.Action]:
    """GC roots for both systems and the rollback timer, before anything is touched."""
    state, sw = executor.state, executor.machine
    armed_at = clock()
    state.armed_monotonic = armed_at
    executor.persist()
    try:
        roots = GcRoots(config.gcroots)
        state.gcroots = [
            roots.add(f"{state.id}-old", state.old),
            roots.add(f"{state.id}-new", state.new),
        ]
        executor.persist()
        command = [
            *(config.keel or self_command()),
            "switch",
            "rollback",
            "--switch-id",
            state.id,
            "--run-dir",
            str(config.run_dir),
        ]
        log_path = config.run_dir / f"{state.id}-timer.log"
        state.timer = await executor.runner.arm(state.id, config.limits.deadline, command, log_path)
    except (KeelError, OSError) as exc:
        GcRoots.remove(state.gcroots)
        state.gcroots = []
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        executor.out.line(f"refused: cannot arm the rollback: {reason}")
        return sw.handle(m.Refused(f"cannot arm the rollback: {reason}"), clock())
    timer = state.timer
    where = timer.unit or (f"pid {timer.process.pid}" if timer.process else "?")
    executor.out.line(
        f"rollback armed: {timer.kind} timer {where} fires in {config.limits.deadline:g} s "
        "unless the switch commits"
    )
    executor.recorder.record(
        "started",
        state.id,
        {
            "old": state.old,
            "new": state.new,
            "gate": config.limits.gate,
            "deadline": config.limits.deadline,
            "timer": timer.kind,
            "checks": list(sw.plan.checks),
        },
    )
    return sw.handle(m.Armed(), armed_at)


def _install_signals(loop: asyncio.AbstractEventLoop, executor: Executor) -> list[int]:
    # A hangup (the SSH session dropped) must not stop a switch half way: it goes on,
    # silently if its terminal is gone. SIGINT and SIGTERM ask for a rollback.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    installed: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, executor.post, m.Interrupted(signal.Signals(signum).name))
        installed.append(signum)
    return installed


def host_facts(state: SwitchState) -> HostFacts:
    profile = Profile(Path(state.profile))
    current = Path(state.current)
    return HostFacts(
        running=os.path.realpath(current) if current.exists() else None,
        current_link=state.current,
        profile=state.profile,
        profile_system=profile.system(),
        profile_link=profile.target(),
    )


def _result(executor: Executor) -> Result:
    sw, state = executor.machine, executor.state
    phase = sw.phase
    code = sw.exit_code if sw.exit_code is not None else 3
    if phase is m.Phase.COMMITTED:
        message = (
            f"committed: {state.new} is running and is the boot default "
            f"(profile generation {state.generation_added})"
        )
        executor.out.line(message)
        return Result(phase, code, state, message)
    if phase is m.Phase.ROLLED_BACK:
        message = f"rolled back: {state.old} is running again ({sw.reason})"
        executor.out.line(message)
        return Result(phase, code, state, message)
    if phase is m.Phase.REFUSED:
        return Result(phase, code, state, f"refused, nothing changed: {sw.reason}")
    root = next((r for r in state.gcroots if r.endswith("-old")), None)
    details = host_state(host_facts(state), old=state.old, gcroot=root, log=_last_log(executor))
    message = f"ROLLBACK FAILED, the host needs an operator: {sw.reason}"
    executor.out.line(message)
    for line in details:
        executor.out.line("  " + line)
    return Result(phase, code, state, message, details)


def _last_log(executor: Executor) -> str | None:
    run_dir = Path(executor.files.run_dir)
    for name in ("boot-restore", "rollback"):
        path = run_dir / f"{executor.state.id}-{name}.log"
        if path.exists():
            return str(path)
    return None


# --- taking over a switch whose switcher is gone ----------------------------------------------------


async def take_over(
    files: StateFile,
    *,
    switch_id: str | None,
    by: str,
    out: Output,
    clock: Callable[[], float] = time.monotonic,
) -> Result | None:
    """Roll back the switch in progress whose switcher is dead (or hung past all its limits).

    Returns None when there is nothing to roll back (no switch in progress, or
    not the one ``switch_id`` names: it committed or was rolled back already).
    """
    lock = Lock(files.run_dir)
    state = await _acquire_for(files, lock, switch_id=switch_id, out=out, clock=clock)
    if state is None:
        lock.release()
        return None
    try:
        return await _roll_back_taken(files, state, by=by, out=out, clock=clock)
    finally:
        lock.release()


async def _acquire_for(
    files: StateFile,
    lock: Lock,
    *,
    switch_id: str | None,
    out: Output,
    clock: Callable[[], float],
) -> SwitchState | None:
    """The lock and the state of the switch to roll back, or None when there is none."""
    killed = False
    while True:
        state = files.read()
        if state is None or not state.in_progress or (switch_id and state.id != switch_id):
            return None
        if lock.try_acquire():
            state = files.read()
            if state is None or not state.in_progress or (switch_id and state.id != switch_id):
                return None
            return state
        # A live switcher holds the lock. It decides by itself within its limits; one that
        # still holds it after all of them is hung (stopped, stuck in a syscall): kill it.
        limits = state.limits
        give_up = (state.armed_monotonic or clock()) + (
            limits.deadline + limits.commit_timeout + limits.rollback_timeout + 10.0
        )
        if clock() >= give_up and state.switcher is not None and not killed:
            out.line(
                f"the switcher (pid {state.switcher.pid}) is hung past every limit: killing it"
            )
            state.switcher.signal(signal.SIGKILL)
            killed = True
        await asyncio.sleep(0.05)


async def _roll_back_taken(
    files: StateFile,
    state: SwitchState,
    *,
    by: str,
    out: Output,
    clock: Callable[[], float],
) -> Result:
    switcher = state.switcher
    pid = f"pid {switcher.pid}" if switcher else "unknown pid"
    if by == "timer":
        reason = f"the switcher ({pid}) is gone without deciding ({state.phase.value}); the rollback timer fired"
    else:
        reason = f"rolled back by an operator: the switcher ({pid}) is gone ({state.phase.value})"
    plan = m.Plan(state.id, state.old, state.new, tuple(c["name"] for c in state.checks))
    sw = m.Switch.resume(
        plan,
        state.limits,
        state.phase,
        restore_profile=state.restore_profile,
        armed_at=None,
    )
    ledger = Path(state.ledger) if state.ledger else None
    recorder = Recorder(ledger, SOURCE)
    alerter = Alerter(state.alerts, host=state.host, record=recorder.record, out=out)
    timer_kind = state.timer.kind if state.timer else "process"
    executor = Executor(
        sw,
        state,
        files=files,
        runner=runners(timer_kind),
        profile=Profile(Path(state.profile)),
        specs=(),
        prober=Prober(),
        recorder=recorder,
        alerter=alerter,
        out=out,
        interval=1.0,
        own_timer=by == "timer",
        clock=clock,
    )
    out.line(f"switch {state.id}: {reason}")
    await recorder.start()
    try:
        actions = sw.handle(m.TakenOver(by, reason), clock())
        await executor.drive(actions)
    finally:
        await alerter.close()
        await recorder.close()
    return _result(executor)


def with_overrides(config: SafeswitchConfig, **changes: Any) -> SafeswitchConfig:
    """The config with the command line's options applied (None: keep the file's)."""
    kept = {k: v for k, v in changes.items() if v is not None}
    limits = config.limits
    if "gate" in kept or "deadline" in kept:
        limits = replace(
            limits,
            gate=kept.pop("gate", limits.gate),
            deadline=kept.pop("deadline", limits.deadline),
        )
        if (problem := limits.problem()) is not None:
            raise ConfigError(f"--gate/--deadline: {problem}")
    return replace(config, limits=limits, **kept)
