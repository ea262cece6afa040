"""What the chat can ask of keel: the verbs, and their implementation on this host.

The command layer (:mod:`keel.chat.core` and the daemon) is a thin front on
:class:`Verbs`. :class:`LocalVerbs` answers for this host: watch's control
socket (through :class:`keel.api.AsyncConnection`) and the ledger. The fleet
(issue "fleet") will answer the same verbs for other nodes over the mesh; that
is where it plugs in: another :class:`Verbs`, chosen by the daemon's
``make_verbs``, with targets that name a node. Nothing here pretends to be it.

A mutating verb takes the state fingerprint the person was shown
(:func:`fingerprint`) and compares it with the target's state just before it
acts, where the state lives: if the agent changed since, :class:`StateChanged`
and nothing is done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from keel.api import AsyncConnection
from keel.errors import ApiError, KeelError, Refused

if TYPE_CHECKING:
    from keel.chat.switching import Listing, Switching, SwitchView

RESTART_TIMEOUT = 60.0  # seconds an agent may take to stop and come back


class VerbError(KeelError):
    """A verb could not be carried out; the message says why, for the person."""


class NoSuchAgent(VerbError):
    pass


class StateChanged(VerbError):
    """The target is no longer in the state the person confirmed; nothing was done."""


@dataclass(frozen=True)
class AgentView:
    name: str
    state: str  # watch's: starting, healthy, unhealthy, backoff, quarantined, stopped
    pid: int | None
    uptime: float | None
    restarts: int
    last_error: str | None
    last_error_at: float | None  # wall clock
    backoff_until: float | None  # wall clock


@dataclass(frozen=True)
class HostView:
    host: str
    agents: tuple[AgentView, ...]
    watch_uptime: float | None
    ledger: str  # the ledger's state as watch's recorder sees it: ok, degraded, off...


@dataclass(frozen=True)
class LogLine:
    index: int
    ts: str  # as the ledger writes it: 2026-05-01T12:00:03.123456Z
    source: str
    kind: str
    subject: str
    data: dict[str, Any]


class Verbs(Protocol):
    """The verbs the chat calls; one implementation per place they act."""

    async def host(self) -> HostView:
        """The host and its agents, as watch sees them."""
        ...

    async def agent(self, name: str) -> AgentView:
        """One agent (:class:`NoSuchAgent` if watch does not supervise it)."""
        ...

    async def log(self, count: int) -> list[LogLine]:
        """The last ``count`` ledger entries, oldest first."""
        ...

    async def restart(self, name: str, *, expect: str) -> AgentView:
        """Restart ``name`` if it is still in state ``expect`` (a :func:`fingerprint`)."""
        ...

    async def switch_targets(self) -> Listing:
        """The targets this host may be switched to from the chat (:mod:`keel.chat.switching`)."""
        ...

    async def switch_target(self, name: str) -> SwitchView:
        """What switching to ``name`` would do now (:class:`VerbError` if it cannot)."""
        ...

    async def switch(self, name: str, *, expect: str, request: str) -> dict[str, Any]:
        """Switch to ``name`` if it is still what ``expect`` fingerprints; the outcome."""
        ...

    async def close(self) -> None: ...


def fingerprint(agent: AgentView) -> str:
    """What a confirmation is bound to: the agent's state, process and restart count.

    A restart by watch, a new pid, a change of state all change it; time
    passing alone does not.
    """
    return f"{agent.state}/{agent.pid if agent.pid is not None else '-'}/{agent.restarts}"


def _agent_view(name: str, raw: Any) -> AgentView:
    if not isinstance(raw, dict):
        raise VerbError(f"watch sent an unreadable status for {name}")

    def number(key: str) -> float | None:
        value = raw.get(key)
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    pid = raw.get("pid")
    restarts = raw.get("restarts")
    error = raw.get("last_error")
    return AgentView(
        name=name,
        state=str(raw.get("state", "unknown")),
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        uptime=number("uptime"),
        restarts=restarts if isinstance(restarts, int) and not isinstance(restarts, bool) else 0,
        last_error=str(error) if error else None,
        last_error_at=number("last_error_at"),
        backoff_until=number("backoff_until"),
    )


class LocalVerbs:
    """The verbs on this host: watch's control socket and the ledger file."""

    def __init__(
        self,
        watch_socket: Path,
        ledger: Path | None,
        *,
        switching: Switching | None = None,
        timeout: float = 10.0,
        restart_timeout: float = RESTART_TIMEOUT,
        poll: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watch = AsyncConnection(watch_socket, service="watch", timeout=timeout)
        self.ledger = ledger
        self.switching = switching
        self.restart_timeout = restart_timeout
        self.poll = poll
        self.clock = clock

    async def close(self) -> None:
        await self.watch.close()

    async def _watch(self, verb: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self.watch.call(verb, args)
        except Refused as exc:
            raise VerbError(f"watch refused: {exc}") from exc
        except ApiError as exc:
            raise VerbError(f"watch is not answering: {exc}") from exc

    async def host(self) -> HostView:
        status = await self._watch("status")
        agents = status.get("agents") if isinstance(status, dict) else None
        if not isinstance(agents, dict):
            raise VerbError("watch sent a status without agents")
        service = status.get("service")
        service = service if isinstance(service, dict) else {}
        ledger = service.get("ledger")
        ledger = ledger if isinstance(ledger, dict) else {}
        uptime = service.get("uptime")
        return HostView(
            host=str(status.get("host", "?")),
            agents=tuple(_agent_view(name, raw) for name, raw in sorted(agents.items())),
            watch_uptime=float(uptime) if isinstance(uptime, int | float) else None,
            ledger=str(ledger.get("state", "unknown")),
        )

    async def agent(self, name: str) -> AgentView:
        host = await self.host()
        for agent in host.agents:
            if agent.name == name:
                return agent
        known = ", ".join(a.name for a in host.agents) or "none"
        raise NoSuchAgent(f"watch supervises no agent named {name} (it has: {known})")

    async def restart(self, name: str, *, expect: str) -> AgentView:
        """Ask watch to restart the agent, then wait until it runs as a new process.

        The state is compared first, in this call, right before watch is asked;
        from then on watch drives the agent (its ``restart`` verb is one step:
        the start follows the exit, whatever happens to keel chat meanwhile).
        """
        before = await self.agent(name)
        if fingerprint(before) != expect:
            raise StateChanged(f"{name} changed since you were asked (now {describe(before)})")
        await self._watch("restart", {"agent": name})
        deadline = self.clock() + self.restart_timeout
        while True:
            agent = await self.agent(name)
            if agent.pid is not None and agent.pid != before.pid:
                return agent
            if self.clock() >= deadline:
                raise VerbError(
                    f"watch was asked to restart {name}, but it is not running again after "
                    f"{self.restart_timeout:g} s (now {describe(agent)}); /status shows more"
                )
            await asyncio.sleep(self.poll)

    def _switching(self) -> Switching:
        if self.switching is None:
            raise VerbError("switching is not set up on this host (switch is not in commands)")
        return self.switching

    async def switch_targets(self) -> Listing:
        return await asyncio.to_thread(self._switching().listing)

    async def switch_target(self, name: str) -> SwitchView:
        return await asyncio.to_thread(self._switching().view, name)

    async def switch(self, name: str, *, expect: str, request: str) -> dict[str, Any]:
        return await self._switching().switch(name, expect=expect, request=request)

    async def log(self, count: int) -> list[LogLine]:
        if self.ledger is None:
            raise VerbError("this host keeps no ledger (the chat config sets ledger to null)")
        path = self.ledger
        return await asyncio.get_running_loop().run_in_executor(None, _tail, path, count)


def _tail(path: Path, count: int) -> list[LogLine]:
    from keel.ledger import Ledger
    from keel.ledger.errors import LedgerError

    try:
        ledger = Ledger.open(path, create=False)
    except LedgerError as exc:
        raise VerbError(f"cannot read the ledger: {exc}") from None
    try:
        entries = ledger.tail(count)
    except LedgerError as exc:
        raise VerbError(f"cannot read the ledger: {exc}") from None
    finally:
        ledger.close()
    return [
        LogLine(index, entry.ts, entry.source, entry.kind, entry.subject, dict(entry.data))
        for index, entry in entries
    ]


def describe(agent: AgentView) -> str:
    """``unhealthy, pid 1234, 3 restarts``: what a person is asked to confirm against."""
    parts = [agent.state]
    if agent.pid is not None:
        parts.append(f"pid {agent.pid}")
    parts.append(f"{agent.restarts} restart{'s' if agent.restarts != 1 else ''}")
    return ", ".join(parts)
