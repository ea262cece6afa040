"""The chat's way to other hosts: the local fleet daemon (``keel fleet``) and its socket.

``/fleet`` shows the fleet's view (every node of the mesh, each answering for
itself; a silent one is unreachable with its last report), and
``/restart AGENT@NODE`` restarts an agent on another node through the fleet's
``command`` verb: the fleet daemon carries it over the mesh, the node that
acts checks that this node is one of its operators, and both sides record
it. ``AGENT@NODE`` splits at the *last* ``@`` (watch allows ``@`` in agent
names); NODE is a node id, a prefix of at least four characters of one, or
a host name, as ``keel fleet`` takes them.

A confirmation is bound to what the person was shown, as on this host: the
agent's state and restart count in the node's report (a remote report
carries no pid). Just before acting the node is asked again; if either
changed, nothing is done. Between that look and the restart on the other
node there is the round trip over the mesh: that window is the fleet's, and
is said in ``docs/chat.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.api import AsyncConnection
from keel.chat.verbs import AgentView, StateChanged, VerbError, fingerprint
from keel.errors import ApiError, Refused, Unavailable

MIN_PREFIX = 4  # as keel.fleet.daemon: shorter prefixes could name anyone
STATUS_TIMEOUT = 2.0  # seconds the fleet waits for the other nodes' reports
COMMAND_TIMEOUT = 60.0  # seconds for a command carried over the mesh and its answer


@dataclass(frozen=True)
class NodeRow:
    node: str
    host: str | None
    state: str  # healthy, degraded, unreachable
    stale: bool  # an unreachable node's report is the last one seen
    last_seen: float | None
    error: str | None
    problems: tuple[str, ...]
    agents: tuple[AgentView, ...]


@dataclass(frozen=True)
class FleetView:
    me: str
    nodes: tuple[NodeRow, ...]


def split_target(target: str) -> tuple[str, str | None]:
    """``"web@db1"`` -> ``("web", "db1")``; ``"web"`` -> ``("web", None)``. At the last ``@``."""
    agent, at, node = target.rpartition("@")
    if not at:
        return target, None
    if not agent or not node:
        raise VerbError(f"{target!r} is not AGENT@NODE (both parts are needed)")
    return agent, node


def _agents(report: Mapping[str, Any] | None) -> tuple[AgentView, ...]:
    raw = report.get("agents") if report is not None else None
    out = []
    for name, agent in sorted((raw if isinstance(raw, dict) else {}).items()):
        if not isinstance(agent, dict):
            continue
        restarts = agent.get("restarts")
        error = agent.get("last_error")
        at = agent.get("last_error_at")
        out.append(
            AgentView(
                name=str(name),
                state=str(agent.get("state") or "unknown"),
                pid=None,
                uptime=None,
                restarts=restarts
                if isinstance(restarts, int) and not isinstance(restarts, bool)
                else 0,
                last_error=str(error) if error else None,
                last_error_at=float(at)
                if isinstance(at, int | float) and not isinstance(at, bool)
                else None,
                backoff_until=None,
            )
        )
    return tuple(out)


def parse_view(answer: Any) -> FleetView:
    """The fleet daemon's ``fleet_status`` answer, checked."""
    if not isinstance(answer, dict) or not isinstance(answer.get("nodes"), list):
        raise VerbError("the fleet daemon sent an unreadable status")
    rows = []
    for row in answer["nodes"]:
        if not isinstance(row, dict) or not isinstance(row.get("node"), str):
            continue
        report = row.get("report") if isinstance(row.get("report"), dict) else None
        host = report.get("host") if report is not None else None
        problems = report.get("problems") if report is not None else None
        seen = row.get("last_seen")
        error = row.get("error")
        rows.append(
            NodeRow(
                node=row["node"],
                host=host if isinstance(host, str) else None,
                state=str(row.get("state", "unknown")),
                stale=bool(row.get("stale")),
                last_seen=float(seen) if isinstance(seen, int | float) else None,
                error=str(error) if error else None,
                problems=tuple(str(p) for p in problems) if isinstance(problems, list) else (),
                agents=_agents(report),
            )
        )
    return FleetView(str(answer.get("node", "?")), tuple(rows))


def resolve(view: FleetView, ref: str) -> NodeRow:
    """The node ``ref`` names: its id, else its host name, else a unique id prefix."""
    for row in view.nodes:
        if row.node == ref:
            return row
    found = [row for row in view.nodes if row.host == ref]
    if not found and len(ref) >= MIN_PREFIX:
        found = [row for row in view.nodes if row.node.startswith(ref)]
    if len(found) == 1:
        return found[0]
    if not found:
        return _unknown(view, ref)
    names = ", ".join(row.host or row.node[:12] for row in found)
    raise VerbError(f"{ref!r} names {len(found)} nodes ({names}); use more of the node id")


def _unknown(view: FleetView, ref: str) -> NodeRow:
    known = ", ".join(row.host or row.node[:12] for row in view.nodes) or "none"
    raise VerbError(
        f"no node of the fleet is {ref!r} (by id, id prefix of {MIN_PREFIX} or more characters, "
        f"or host name; known: {known})"
    )


class FleetVerbs:
    """The fleet daemon's control socket, for ``/fleet`` and ``AGENT@NODE``."""

    def __init__(
        self,
        socket: Path,
        *,
        timeout: float = COMMAND_TIMEOUT,
        status_timeout: float = STATUS_TIMEOUT,
    ) -> None:
        self.socket = socket
        self.fleet = AsyncConnection(socket, service="fleet", timeout=timeout)
        self.status_timeout = status_timeout

    async def close(self) -> None:
        await self.fleet.close()

    async def _call(self, verb: str, args: dict[str, Any]) -> Any:
        try:
            return await self.fleet.call(verb, args)
        except Unavailable as exc:
            raise VerbError(
                f"the fleet daemon is not answering on {self.socket} ({exc}); is keel fleet "
                "running on this host?"
            ) from exc
        except Refused as exc:
            raise VerbError(f"the fleet refused: {exc}") from exc
        except ApiError as exc:
            raise VerbError(f"the fleet daemon failed: {exc}") from exc

    async def view(self) -> FleetView:
        answer = await self._call("fleet_status", {"timeout": self.status_timeout})
        return parse_view(answer)

    async def agent(self, agent: str, node: str) -> tuple[NodeRow, AgentView]:
        """The node ``node`` names and its agent ``agent``, as the node's report has them."""
        row = resolve(await self.view(), node)
        if row.state == "unreachable":
            why = f": {row.error}" if row.error else ""
            raise VerbError(f"node {row.host or row.node} is unreachable{why}")
        for view in row.agents:
            if view.name == agent:
                return row, view
        known = ", ".join(a.name for a in row.agents) or "none"
        raise VerbError(f"node {row.host or row.node} has no agent {agent} (it has: {known})")

    async def restart(self, agent: str, node: str, *, expect: str) -> str:
        """Restart ``agent`` on ``node`` if it is still in state ``expect``; the node's answer."""
        row, before = await self.agent(agent, node)
        if fingerprint(before) != expect:
            raise StateChanged(
                f"{agent} on {row.host or row.node} changed since you were asked "
                f"(now {before.state}, {before.restarts} restarts)"
            )
        answer = await self._call("command", {"node": row.node, "verb": "restart", "agent": agent})
        state = answer.get("state") if isinstance(answer, dict) else None
        after = f": now {state}" if isinstance(state, str) else ""
        return f"Restarted {agent} on {row.host or row.node}{after}."
