"""The systemd backend: agents are units; systemd runs them, watch decides.

Starts, stops and restarts are systemd jobs (``StartUnit``, ``StopUnit``,
``RestartUnit``): there is never a second process manager beside systemd.
Unit state is followed as it changes, through the ``PropertiesChanged``
signals systemd emits for each unit object, so a crash is seen the moment
systemd itself notices it, not at the next poll. A ``WatchdogSec`` kill is a
unit failure with ``Result=watchdog`` and reaches the policy as any other.

Agent units are best written with ``Restart=no``: watch restarts them. Units
with ``Restart=always`` also work (keep ``RestartSec=`` of a second or more
as the safety net for when watch itself is down): watch preempts systemd's
timer with ``RestartUnit`` when it restarts at once, and cancels it with
``StopUnit`` when it backs off. Watch resets a unit's failed state (and so
systemd's own start rate limit) before starting it.

``systemctl stop`` (or ``restart``) is respected: a unit that goes
"deactivating" while its main process still lives, without a failed result and
without watch asking, is being stopped on purpose; the agent is marked stopped
and stays so until it is started again by either side.
Watch does not own the units: if it dies they keep running, and the next
watch adopts them as it finds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jeepney.low_level import Message

from keel.errors import KeelError
from keel.watch import dbus
from keel.watch.backend import Events, Found
from keel.watch.config import AgentConfig, BusChoice

log = logging.getLogger("keel.watch.systemd")

UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
RUNNING_STATES = ("active", "reloading")

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

CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


@dataclass
class UnitState:
    name: str  # the agent
    unit: str
    path: str = ""
    props: dict[str, Any] = field(default_factory=dict)
    reported_running: bool = False
    start_pending: bool = False  # we asked for a start...
    inactive_exit_before: Any = None  # ...when InactiveExitTimestampMonotonic was this
    activation_seen: bool = False  # ...and have seen the unit activating since
    holding: bool = False  # keep it down (back-off, quarantine) until our next start
    our_stop: bool = False
    external_stop: bool = False
    our_jobs: dict[str, str] = field(default_factory=dict)  # job path -> "start" / "stop"
    starts: deque[float] = field(default_factory=deque)  # our recent starts (monotonic)

    @property
    def active(self) -> str:
        return str(self.props.get("ActiveState", ""))

    @property
    def sub(self) -> str:
        return str(self.props.get("SubState", ""))

    @property
    def running(self) -> bool:
        return self.active in RUNNING_STATES

    @property
    def down(self) -> bool:
        return self.active in ("inactive", "failed") or (
            self.active == "activating" and self.sub == "auto-restart"
        )

    @property
    def start_seen(self) -> bool:
        """The unit began activating after our start request.

        Signals coalesce (a quick failed -> activating -> failed may arrive as
        one "failed"), so the states seen cannot always tell; the time the unit
        last left the inactive state can. It is 0 on a unit object systemd has
        just re-created (``ResetFailedUnit`` lets it collect the old one).
        """
        if self.activation_seen:
            return True
        stamp = self.props.get("InactiveExitTimestampMonotonic")
        return stamp not in (self.inactive_exit_before, 0, None)

    @property
    def main_pid(self) -> int | None:
        pid = self.props.get("MainPID")
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
    if result == "exit-code" and how:
        return how
    if result in ("signal", "core-dump") and how:
        return how
    if how:
        return how
    if result == "success":
        return "stopped (the unit went inactive without a failure)"
    return f"failed ({result or 'no result'})"


class SystemdBackend:
    def __init__(self, agents: Mapping[str, AgentConfig], *, bus: BusChoice = "auto") -> None:
        self.agents = dict(agents)
        self.bus_choice = bus
        self.units = {name: UnitState(name, agent.unit) for name, agent in self.agents.items()}
        self._by_path: dict[str, UnitState] = {}
        self._events: Events | None = None
        self._conn: dbus.Connection | None = None
        self._use_bus = True
        self._address = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._reconnecting: asyncio.Task[None] | None = None

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
        for state in self.units.values():
            await self._refresh(state, initial=True)

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
        for state in self.units.values():
            try:
                (path,) = await conn.call(dbus.manager_call("LoadUnit", "s", state.unit))
            except dbus.DBusError as exc:
                raise KeelError(
                    f"systemd cannot load unit {state.unit} of agent {state.name}: {exc}"
                ) from None
            state.path = str(path)
            self._by_path[state.path] = state
        log.info(
            "following %d units through %s",
            len(self.units),
            "the system bus" if self._use_bus else "systemd's private socket",
        )

    async def _refresh(self, state: UnitState, *, initial: bool = False) -> None:
        conn = self._require_conn()
        (unit_props,) = await conn.call(dbus.get_all(state.path, UNIT))
        service_props: dict[str, Any] = {}
        if state.unit.endswith(".service"):
            (service_props,) = await conn.call(dbus.get_all(state.path, SERVICE))
        props = dbus.unwrap(service_props) | dbus.unwrap(unit_props)
        if props.get("LoadState") not in ("loaded", None):
            raise KeelError(
                f"unit {state.unit} of agent {state.name} is {props.get('LoadState')} "
                f"({props.get('LoadError', ('', ''))[1] or 'check `systemctl status`'})"
            )
        state.props.update(props)
        if not initial:
            self._follow(state)

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
                for state in self.units.values():
                    await self._refresh(state)
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
        state = self.units[name]
        if not state.running:
            return None
        state.reported_running = True
        since_usec = state.props.get("ActiveEnterTimestampMonotonic")
        since = since_usec / 1e6 if isinstance(since_usec, int) and since_usec > 0 else 0.0
        # systemd's monotonic clock is CLOCK_MONOTONIC, as is time.monotonic().
        return Found(state.main_pid, since)

    # --- start and stop --------------------------------------------------------------------

    def start(self, name: str) -> None:
        state = self.units[name]
        state.start_pending = True
        state.holding = False
        state.our_stop = False
        state.activation_seen = False
        state.inactive_exit_before = state.props.get("InactiveExitTimestampMonotonic")
        state.external_stop = False
        if state.running:
            # systemd's own Restart= got there first: what runs is the restart.
            asyncio.get_running_loop().call_soon(self._follow, state)
            return
        if state.active == "activating" and state.sub != "auto-restart":
            self._job(state, "StartUnit", "start")  # a start is under way: join it
            return
        # Back-off is watch's job, not systemd's start rate limit: when this
        # start could hit StartLimitBurst=, ResetFailedUnit clears the count
        # first. (Not always: it lets systemd drop and reload the unit, which
        # costs a restart a few milliseconds.) RestartUnit for a unit with
        # Restart=: it may be waiting for its own restart timer, which a start
        # job would wait for and a restart job cancels. StartUnit otherwise (one
        # job step fewer).
        if self._near_start_limit(state):
            self._call_quietly(dbus.manager_call("ResetFailedUnit", "s", state.unit))
            state.starts.clear()
        state.starts.append(time.monotonic())
        restarts_itself = state.sub == "auto-restart" or state.props.get("Restart", "no") != "no"
        self._job(state, "RestartUnit" if restarts_itself else "StartUnit", "start")

    @staticmethod
    def _near_start_limit(state: UnitState) -> bool:
        interval = state.props.get("StartLimitIntervalUSec")
        burst = state.props.get("StartLimitBurst")
        if not isinstance(interval, int) or not isinstance(burst, int) or interval <= 0:
            return False
        if state.props.get("Result") == "start-limit-hit":
            return True
        horizon = time.monotonic() - interval / 1e6
        while state.starts and state.starts[0] < horizon:
            state.starts.popleft()
        # systemd's own Restart= starts count too and are not in this list: keep a margin.
        return len(state.starts) >= max(1, burst - 2)

    def hold(self, name: str) -> None:
        state = self.units[name]
        state.holding = True
        # A unit with Restart= goes from "failed" to "auto-restart" at once (the
        # signals for both arrive together): cancel systemd's own restart timer,
        # watch decides when it comes back.
        if state.sub == "auto-restart" or state.props.get("Restart", "no") != "no":
            # Cancel systemd's own Restart= timer: watch decides when it comes back.
            log.info(
                "agent %s: holding %s down (cancelling its automatic restart)", name, state.unit
            )
            state.our_stop = True
            self._job(state, "StopUnit", "stop")

    def stop(self, name: str, reason: str, *, timeout: float) -> None:
        state = self.units[name]
        state.start_pending = False
        state.our_stop = True
        log.info("agent %s: stopping %s: %s", name, state.unit, reason)
        self._job(state, "StopUnit", "stop")

    def _job(self, state: UnitState, method: str, what: str) -> None:
        try:
            future = self._require_conn().send(
                dbus.manager_call(method, "ss", state.unit, "replace")
            )
        except dbus.ConnectionLost as exc:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)

        def done(f: asyncio.Future[Message]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if exc is None:
                state.our_jobs[str(f.result().body[0])] = what
                return
            log.warning("agent %s: systemd refused to %s %s: %s", state.name, what, state.unit, exc)
            if what == "start" and state.start_pending:
                state.start_pending = False
                self._require_events().agent_exited(
                    state.name, f"systemd refused to start {state.unit}: {exc}"
                )
            elif what == "stop" and state.our_stop and state.down:
                state.our_stop = False
                self._require_events().agent_exited(state.name, "stopped")

        future.add_done_callback(done)

    def _call_quietly(self, message: Message) -> None:
        with contextlib.suppress(dbus.ConnectionLost):
            future = self._require_conn().send(message)
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

    # --- following systemd ----------------------------------------------------------------

    def _signal(self, signal: dbus.Signal) -> None:
        member = signal.member
        if member == "PropertiesChanged":
            state = self._by_path.get(signal.path or "")
            if state is None:
                return  # another unit: its body is never parsed
            interface, changed = dbus.properties_changed(signal, WANTED)
            state.props.update(changed)
            if interface == UNIT and ("ActiveState" in changed or "SubState" in changed):
                self._follow(state)
        elif member == "JobRemoved":
            _job_id, job_path, unit, result = signal.body()
            for state in self.units.values():
                if state.unit == unit:
                    self._job_removed(state, str(job_path), str(result))

    def _follow(self, state: UnitState) -> None:
        """Turn a unit's state change into started / exited / stopped events."""
        events = self._require_events()
        log.debug(
            "unit %s: %s/%s pid=%s result=%s reported_running=%s start_pending=%s "
            "start_seen=%s our_stop=%s external_stop=%s",
            state.unit,
            state.active,
            state.sub,
            state.main_pid,
            state.props.get("Result"),
            state.reported_running,
            state.start_pending,
            state.start_seen,
            state.our_stop,
            state.external_stop,
        )
        if (
            state.active == "deactivating"
            and state.main_pid is not None
            and state.props.get("Result") == "success"
            and state.reported_running
            and not state.our_stop
        ):
            # Someone else's stop job: systemd publishes "deactivating" while the
            # main process still lives (it sent SIGTERM a moment ago). A crash
            # shows no live main process, and a watchdog kill a failed Result.
            state.external_stop = True
        auto_restart = state.active == "activating" and state.sub == "auto-restart"
        if state.start_pending and not state.activation_seen and auto_restart:
            # Entering auto-restart counts as leaving "failed" for systemd's
            # timestamps; it is not the start we asked for.
            state.inactive_exit_before = state.props.get("InactiveExitTimestampMonotonic")
        if state.start_pending and (
            state.active in ("active", "reloading", "deactivating")
            or (state.active == "activating" and not auto_restart)
        ):
            state.activation_seen = True
        if state.running and state.holding and state.our_stop and not state.reported_running:
            # systemd's Restart= timer beat our StopUnit; that stop will end it.
            return
        if state.running and not state.reported_running:
            state.reported_running = True
            state.start_pending = False
            events.agent_started(state.name, state.main_pid)
            return
        if not state.down:
            return
        if state.reported_running:
            state.reported_running = False
            if state.our_stop:
                state.our_stop = False
                events.agent_exited(state.name, describe_result(state.props))
            elif state.external_stop:
                state.external_stop = False
                events.agent_stopped_externally(state.name)
            else:
                events.agent_exited(state.name, describe_result(state.props))
        elif state.start_pending and state.start_seen:
            # Our start failed before the unit ever ran (exec failed, start timeout...).
            state.start_pending = False
            events.agent_exited(state.name, describe_result(state.props))
        elif state.our_stop and not state.holding:
            state.our_stop = False

    def _job_removed(self, state: UnitState, job_path: str, result: str) -> None:
        what = state.our_jobs.pop(job_path, None)
        if what is None:
            return
        if what == "stop" and state.holding:
            state.our_stop = False  # the hold's stop is done: the unit is down for good
            return
        if what != "start" or not state.start_pending or state.start_seen:
            return  # the unit's own state changes tell the story
        if result not in ("done", "skipped"):
            state.start_pending = False
            self._require_events().agent_exited(
                state.name, f"start job {result} ({describe_result(state.props)})"
            )
            return

        async def confirm() -> None:
            # "done" yet not seen activating: ask (the reply comes after any
            # signal still in flight), then judge.
            with contextlib.suppress(dbus.DBusError, dbus.ConnectionLost, TimeoutError, KeelError):
                await self._refresh(state)
            if state.start_pending and not state.start_seen and not state.running:
                state.start_pending = False
                self._require_events().agent_exited(
                    state.name, f"{state.unit} did not start (did a Condition...= check fail?)"
                )

        task = asyncio.get_running_loop().create_task(confirm())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
