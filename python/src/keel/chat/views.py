"""What the read-only commands answer: the verbs' views as short plain text (pure).

Plain text, no Markdown or HTML: nothing from an agent or the ledger can
turn into formatting or a link, and :func:`keel.chat.outbox.plain` escapes
what could hide or reorder text before anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from keel.chat.core import Outcome
from keel.chat.fleet import FleetView
from keel.chat.switching import Listing
from keel.chat.verbs import AgentView, HostView, LogLine, describe
from keel.output import human_duration

ERROR_WIDTH = 300  # characters of an agent's last error in a status line


def _ago(at: float | None, now: float) -> str:
    return "" if at is None else f"{human_duration(max(0.0, now - at))} ago"


def clip_error(error: str) -> str:
    return error if len(error) <= ERROR_WIDTH else error[: ERROR_WIDTH - 1] + "…"


def _error(agent: AgentView, now: float) -> str:
    if not agent.last_error:
        return ""
    error = clip_error(agent.last_error)
    when = _ago(agent.last_error_at, now)
    return f"last error{f' ({when})' if when else ''}: {error}"


def agent_line(agent: AgentView, now: float) -> str:
    """``web: healthy, pid 1234, up 3h2m, 0 restarts``."""
    parts = [agent.state]
    if agent.pid is not None:
        parts.append(f"pid {agent.pid}")
    if agent.uptime is not None:
        parts.append(f"up {human_duration(agent.uptime)}")
    parts.append(f"{agent.restarts} restart{'s' if agent.restarts != 1 else ''}")
    if agent.backoff_until is not None:
        parts.append(f"next start in {human_duration(max(0.0, agent.backoff_until - now))}")
    return f"{agent.name}: {', '.join(parts)}"


def status(host: HostView, now: float) -> str:
    """/status: what is down, in a few lines."""
    total = len(host.agents)
    if not total:
        return f"{host.host}: watch supervises no agents. Ledger: {host.ledger}."
    down = [a for a in host.agents if a.state != "healthy"]
    if not down:
        head = f"{host.host}: all {total} agent{'s' if total != 1 else ''} healthy."
    else:
        head = f"{host.host}: {len(down)} of {total} agent{'s' if total != 1 else ''} not healthy."
    lines = [head]
    for agent in down:
        lines.append(agent_line(agent, now))
        if (error := _error(agent, now)) != "":
            lines.append(f"  {error}")
    uptime = f", watch up {human_duration(host.watch_uptime)}" if host.watch_uptime else ""
    lines.append(f"Ledger: {host.ledger}{uptime}.")
    return "\n".join(lines)


def agents(host: HostView, now: float) -> str:
    """/agents: every agent, one line each and its last error under it."""
    if not host.agents:
        return f"{host.host}: watch supervises no agents."
    lines = [f"{host.host}, {len(host.agents)} agent{'s' if len(host.agents) != 1 else ''}:"]
    for agent in host.agents:
        lines.append(agent_line(agent, now))
        if (error := _error(agent, now)) != "":
            lines.append(f"  {error}")
    return "\n".join(lines)


def log(lines: list[LogLine], host: str) -> str:
    """/log: one ledger entry a line, oldest first."""
    if not lines:
        return f"{host}: the ledger is empty."
    out = [f"{host}: ledger entries {lines[0].index} to {lines[-1].index}:"]
    for line in lines:
        when = line.ts[:19].replace("T", " ")
        data = json.dumps(line.data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        subject = f" {line.subject}" if line.subject else ""
        out.append(f"#{line.index} {when} {line.source} {line.kind}{subject} {data}")
    return "\n".join(out)


def restarted(agent: AgentView) -> str:
    return f"Restarted {agent.name}: now {describe(agent)}."


def switch_targets(listing: Listing, host: str) -> str:
    """/switch alone: what this host may be switched to, and what runs now."""
    lines = [f"{host} runs {listing.running or 'an unknown system'}."]
    if listing.in_progress:
        lines.append(f"A switch is under way: {listing.in_progress}.")
    lines.append("Targets (/switch NAME):")
    for target, path, problem in listing.targets:
        where = path if path is not None else f"not available: {problem}"
        lines.append(f"{target.name}: {target.describe()} -> {where}")
    return "\n".join(lines)


def switched(target: str, host: str, result: Mapping[str, Any]) -> Outcome:
    """The outcome of a switch from the chat, from its request's result (keel switch --json)."""
    outcome = str(result.get("outcome", ""))
    switch = result.get("id")
    ids = f" (switch {switch})" if switch else ""
    reason = str(result.get("reason") or result.get("message") or "no reason given")
    data = {"request": result.get("request"), "switch": switch, "outcome": outcome}
    if outcome == "committed":
        generation = result.get("generation")
        gen = f", generation {generation}" if generation else ""
        text = (
            f"Switched {host} to {target}: committed{ids}. {result.get('new')} runs and is "
            f"the boot default{gen}."
        )
        return Outcome("done", text, data)
    if outcome == "rolled-back":
        text = (
            f"Switch of {host} to {target} ROLLED BACK{ids}: {reason}. {result.get('old')} "
            "runs again."
        )
        return Outcome("failed", text, data)
    if outcome == "refused":
        return Outcome("refused", f"Not switched, nothing changed: {reason}.", data)
    text = (
        f"Switch of {host} to {target} NEEDS AN OPERATOR{ids}: {reason}. "
        "`keel switch status` on the host says what runs and what boots."
    )
    return Outcome("failed", text, data)


def fleet(view: FleetView, now: float) -> str:
    """/fleet: one line per node (this one first), what is down under it."""
    if not view.nodes:
        return "The fleet has no nodes yet."
    healthy = sum(1 for row in view.nodes if row.state == "healthy")
    total = len(view.nodes)
    lines = [f"Fleet: {healthy} of {total} node{'s' if total != 1 else ''} healthy."]
    for row in view.nodes:
        name = row.host or row.node[:12]
        me = " (this node)" if row.node == view.me else ""
        down = [a for a in row.agents if a.state not in ("healthy", "stopped")]
        agents = f", {len(row.agents)} agent{'s' if len(row.agents) != 1 else ''}"
        if row.state == "unreachable":
            seen = f", last seen {_ago(row.last_seen, now)}" if row.last_seen else ", never seen"
            why = f": {row.error}" if row.error else ""
            lines.append(f"{name}{me}: unreachable{seen}{why}")
            continue
        lines.append(f"{name}{me}: {row.state}{agents}, {len(down)} not healthy")
        for agent in down:
            lines.append(f"  {agent.name}@{name}: {agent.state}, {agent.restarts} restarts")
        for problem in row.problems:
            if not problem.startswith("agent "):  # the agents are listed above
                lines.append(f"  {problem}")
    return "\n".join(lines)
