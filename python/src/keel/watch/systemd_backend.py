"""The systemd backend: agents are units; systemd runs them, watch decides.

Starts, stops and restarts are systemd jobs (``StartUnit``, ``StopUnit``,
``RestartUnit``): there is never a second process manager beside systemd.
Unit state is followed as it changes, through the ``PropertiesChanged``
signals systemd emits for each unit object, so a crash is seen the moment
systemd itself notices it, not at the next poll. A ``WatchdogSec`` kill is a
unit failure with ``Result=watchdog`` and reaches the policy as any other.

This module is the D-Bus shell: it connects, reads and feeds each unit's
:class:`~keel.watch.unit_state.UnitState` (where every decision about what
a state change means is made, and tested without D-Bus), and carries out
what that answers: reports to the daemon, jobs to systemd.

Agent units are best written with ``Restart=no``: watch restarts them. Units
with ``Restart=always`` also work (keep ``RestartSec=`` of a second or more
as the safety net for when watch itself is down): watch preempts systemd's
timer with ``RestartUnit`` when it restarts at once, and cancels it with
``StopUnit`` when it backs off. ``systemctl stop`` (or ``restart``) is
respected: the agent is marked stopped and stays so until it is started
again by either side. Watch does not own the units: if it dies they keep
running, and the next watch adopts them as it finds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Mapping
from typing import Any

from jeepney.low_level import Message

from keel.errors import KeelError
from keel.watch import dbus
from keel.watch.backend import Events, Found
from keel.watch.config import AgentConfig, BusChoice
from keel.watch.unit_state import (
    Changed,
    ConfirmStart,
    Event,
    Exited,
    HoldRequested,
    IssueJob,
    JobKind,
    JobQueued,
    JobRefused,
    JobRemoved,
    Loaded,
    Output,
    Refreshed,
    ReportOutput,
    ResetFailed,
    StartConfirmed,
    Started,
    StartRequested,
    StoppedExternally,
    StopRequested,
    UnitPhase,
    UnitState,
)

log = logging.getLogger("keel.watch.systemd")

UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"

# What watch reads from PropertiesChanged (all emitted on change by systemd).
WANTED = {
    "ActiveState": "s",
    "SubState": "s",
    "LoadState": "s",
    "InactiveExitTimestampMonotonic": "t",
    "ActiveEnterTimestampMonotonic": "t",
    "MainPID": "u",
    "Result": "s",
    "ExecMainCode": "i",
    "ExecMainStatus": "i",
}


class _Unit:
    """One agent's unit: its D-Bus object path and watch's view of it."""

    def __init__(self, name: str, unit: str) -> None:
        self.name = name
        self.state = UnitState(unit)
        self.path = ""

    @property
    def unit(self) -> str:
        return self.state.unit


class SystemdBackend:
    def __init__(self, agents: Mapping[str, AgentConfig], *, bus: BusChoice = "auto") -> None:
        self.agents = dict(agents)
        self.bus_choice = bus
        self.units = {name: _Unit(name, agent.unit) for name, agent in self.agents.items()}
        self._by_path: dict[str, _Unit] = {}
        self._events: Events | None = None
        self._conn: dbus.Connection | None = None
        self._use_bus = True
        self._address = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._reconnecting: asyncio.Task[None] | None = None
        # Reports waiting for the event loop (see _report), in the order they were made.
        self._queued: deque[tuple[str, ReportOutput]] = deque()

    # --- connecting ---------------------------------------------------------------------

    def _choose_address(self) -> tuple[str, bool]:
        if self.bus_choice == "private":
            return dbus.SYSTEMD_PRIVATE, False
        if self.bus_choice == "auto" and os.geteuid() == 0 and os.path.exists(dbus.SYSTEMD_PRIVATE):
            return dbus.SYSTEMD_PRIVATE, False
        return dbus.system_bus_path(), True

    async def open(self, events: Events) -> None:
        self._events = events
        self._address, self._use_bus = self._choose_address()
        try:
            await self._connect()
        except (OSError, TimeoutError, dbus.DBusError, dbus.ConnectionLost) as exc:
            raise KeelError(
                f"cannot talk to systemd over D-Bus at {self._address}: {exc} "
                "(is this a systemd host, and is watch running as root?)"
            ) from None
        for unit in self.units.values():
            self._feed(unit, Loaded(await self._read(unit)))

    async def _connect(self) -> None:
        conn = await dbus.Connection.open(
            self._address, bus=self._use_bus, on_signal=self._signal, on_lost=self._lost
        )
        self._conn = conn
        if self._use_bus:
            for rule in (
                "type='signal',sender='org.freedesktop.systemd1',"
                "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',"
                "path_namespace='/org/freedesktop/systemd1/unit'",
                "type='signal',sender='org.freedesktop.systemd1',"
                "interface='org.freedesktop.systemd1.Manager'",
            ):
                await conn.call(dbus.add_match(rule))
        await conn.call(dbus.manager_call("Subscribe"))
        for unit in self.units.values():
            try:
                (path,) = await conn.call(dbus.manager_call("LoadUnit", "s", unit.unit))
            except dbus.DBusError as exc:
                raise KeelError(
                    f"systemd cannot load unit {unit.unit} of agent {unit.name}: {exc}"
                ) from None
            unit.path = str(path)
            self._by_path[unit.path] = unit
        log.info(
            "following %d units through %s",
            len(self.units),
            "the system bus" if self._use_bus else "systemd's private socket",
        )

    async def _read(self, unit: _Unit) -> dict[str, Any]:
        """All the unit's properties (Unit and, for services, Service)."""
        conn = self._require_conn()
        (unit_props,) = await conn.call(dbus.get_all(unit.path, UNIT))
        service_props: dict[str, Any] = {}
        if unit.unit.endswith(".service"):
            (service_props,) = await conn.call(dbus.get_all(unit.path, SERVICE))
        props = dbus.unwrap(service_props) | dbus.unwrap(unit_props)
        if props.get("LoadState") not in ("loaded", None):
            raise KeelError(
                f"unit {unit.unit} of agent {unit.name} is {props.get('LoadState')} "
                f"({props.get('LoadError', ('', ''))[1] or 'check `systemctl status`'})"
            )
        return props

    def _lost(self) -> None:
        if self._closing:
            return
        log.warning("lost the D-Bus connection to systemd; reconnecting")
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.05
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self._connect()
                for unit in self.units.values():
                    self._feed(unit, Refreshed(await self._read(unit)))
            except (OSError, TimeoutError, dbus.DBusError, dbus.ConnectionLost, KeelError) as exc:
                log.warning("reconnecting to systemd failed: %s", exc)
                delay = min(delay * 2, 5.0)
                continue
            log.info("reconnected to systemd; unit states refreshed")
            return

    def _require_conn(self) -> dbus.Connection:
        if self._conn is None:
            raise dbus.ConnectionLost("not connected to systemd")
        return self._conn

    def _require_events(self) -> Events:
        if self._events is None:
            raise RuntimeError("SystemdBackend.open() was not called")
        return self._events

    # --- adoption -------------------------------------------------------------------------

    async def find(self, name: str) -> Found | None:
        state = self.units[name].state
        if not state.adopt():
            return None
        since_usec = state.props.get("ActiveEnterTimestampMonotonic")
        since = since_usec / 1e6 if isinstance(since_usec, int) and since_usec > 0 else 0.0
        # systemd's monotonic clock is CLOCK_MONOTONIC, as is time.monotonic().
        return Found(state.main_pid, since)

    # --- requests from the daemon -------------------------------------------------------------

    def start(self, name: str) -> None:
        self._feed(self.units[name], StartRequested(), requested=True)

    def stop(self, name: str, reason: str, *, timeout: float) -> None:
        unit = self.units[name]
        log.info("agent %s: stopping %s: %s", name, unit.unit, reason)
        self._feed(unit, StopRequested(), requested=True)

    def hold(self, name: str) -> None:
        self._feed(self.units[name], HoldRequested(), requested=True)

    # --- feeding the core and carrying out what it says -----------------------------------

    def _feed(self, unit: _Unit, event: Event, *, requested: bool = False) -> None:
        state = unit.state
        before = state.phase
        outputs = state.handle(event)
        if state.phase is not before or outputs:
            log.debug(
                "unit %s: %s on %s -> %s: %s (%s/%s pid=%s result=%s)",
                unit.unit,
                before.value,
                type(event).__name__,
                state.phase.value,
                outputs,
                state.props.get("ActiveState"),
                state.props.get("SubState"),
                state.main_pid,
                state.props.get("Result"),
            )
        for output in outputs:
            self._carry_out(unit, output, requested=requested)

    def _carry_out(self, unit: _Unit, output: Output, *, requested: bool) -> None:
        if isinstance(output, Started | Exited | StoppedExternally):
            self._report(unit.name, output, deferred=requested)
        elif isinstance(output, IssueJob):
            if output.method == "StopUnit" and unit.state.phase is UnitPhase.HOLDING:
                # systemd's own restart timer is pending: watch decides when it comes back.
                log.info(
                    "agent %s: holding %s down (cancelling its automatic restart)",
                    unit.name,
                    unit.unit,
                )
            self._job(unit, output.method, output.kind)
        elif isinstance(output, ResetFailed):
            self._call_quietly(dbus.manager_call("ResetFailedUnit", "s", unit.unit))
        elif isinstance(output, ConfirmStart):
            self._spawn(self._confirm_start(unit))

    def _report(self, name: str, report: ReportOutput, *, deferred: bool) -> None:
        """Tell the daemon, in order.

        A report made while the daemon asks for something (start, stop, hold)
        waits for the event loop: the daemon is in the middle of carrying out
        its policy's actions and must not be re-entered. Later reports queue
        behind it, so the daemon hears them in the order they were made.
        """
        if deferred or self._queued:
            if not self._queued:
                asyncio.get_running_loop().call_soon(self._deliver_queued)
            self._queued.append((name, report))
            return
        self._deliver(name, report)

    def _deliver_queued(self) -> None:
        while self._queued:
            self._deliver(*self._queued.popleft())

    def _deliver(self, name: str, report: ReportOutput) -> None:
        events = self._require_events()
        if isinstance(report, Started):
            events.agent_started(name, report.pid)
        elif isinstance(report, Exited):
            events.agent_exited(name, report.cause)
        else:
            events.agent_stopped_externally(name)

    def _job(self, unit: _Unit, method: str, kind: JobKind) -> None:
        try:
            future = self._require_conn().send(
                dbus.manager_call(method, "ss", unit.unit, "replace")
            )
        except dbus.ConnectionLost as exc:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)

        def done(f: asyncio.Future[Message]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if exc is None:
                self._feed(unit, JobQueued(str(f.result().body[0]), kind))
                return
            log.warning("agent %s: systemd refused to %s %s: %s", unit.name, kind, unit.unit, exc)
            self._feed(unit, JobRefused(kind, str(exc)))

        future.add_done_callback(done)

    def _call_quietly(self, message: Message) -> None:
        with contextlib.suppress(dbus.ConnectionLost):
            future = self._require_conn().send(message)
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _confirm_start(self, unit: _Unit) -> None:
        # Ask (the reply comes after any signal still in flight), then judge.
        with contextlib.suppress(dbus.DBusError, dbus.ConnectionLost, TimeoutError, KeelError):
            self._feed(unit, Refreshed(await self._read(unit)))
        self._feed(unit, StartConfirmed())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- following systemd ----------------------------------------------------------------

    def _signal(self, signal: dbus.Signal) -> None:
        member = signal.member
        if member == "PropertiesChanged":
            unit = self._by_path.get(signal.path or "")
            if unit is None:
                return  # another unit: its body is never parsed
            _interface, changed = dbus.properties_changed(signal, WANTED)
            self._feed(unit, Changed(changed))
        elif member == "JobRemoved":
            _job_id, job_path, unit_name, result = signal.body()
            for unit in self.units.values():
                if unit.unit == unit_name:
                    self._feed(unit, JobRemoved(str(job_path), str(result)))

    async def close(self) -> None:
        # The units stay as they are: watch does not own them.
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
