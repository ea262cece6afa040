"""What a backend does for the daemon, and what it reports back.

A backend starts and stops agents and reports, as soon as it knows, that one
is running, has exited (with a cause a person can read), or was stopped on
purpose by someone other than watch. It decides nothing: the policy does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Found:
    """An agent found already running when watch starts (adopted, not restarted)."""

    pid: int | None
    since: float  # time.monotonic() at which it started


class Events(Protocol):
    """The daemon's side: called by backends from the event loop, never blocking."""

    def agent_started(self, name: str, pid: int | None) -> None: ...

    def agent_exited(self, name: str, cause: str) -> None: ...

    def agent_stopped_externally(self, name: str) -> None: ...


class Backend(Protocol):
    async def open(self, events: Events) -> None:
        """Connect (to systemd) or load state; after this, events flow."""

    async def find(self, name: str) -> Found | None:
        """Is the agent running already? Then it is adopted, not restarted."""

    def start(self, name: str) -> None:
        """Start the agent; report ``agent_started`` or ``agent_exited`` later."""

    def stop(self, name: str, reason: str, *, timeout: float) -> None:
        """Stop the agent (TERM, then KILL after ``timeout``); ``agent_exited`` follows."""

    def hold(self, name: str) -> None:
        """The agent exited and must stay down until the next ``start``."""

    async def close(self) -> None:
        """Watch is shutting down: release resources (agents are left as the backend says)."""
