"""The health checks of the gate: what each one is, and how its answers are judged.

Five kinds, each with a name that appears in the switch's output, the state
file and the ledger:

- ``watch``: watch's control socket ``status`` verb; every agent must be
  healthy (see :func:`judge_watch`);
- ``system``: ``systemctl is-system-running``; ``degraded`` fails unless the
  failed units were already failed before the switch, or ``allow_degraded``
  (see :func:`judge_system`);
- ``tcp``: a connection to HOST:PORT (``ssh answers on 22``);
- ``http``: a GET whose status is 2xx/3xx or one of ``expect_status``;
- ``command``: a shell command that exits 0.

Judging is pure (this module); running is :mod:`keel.safeswitch.probing`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keel.safeswitch.machine import Verdict
from keel.watch.httpwire import Url


@dataclass(frozen=True)
class WatchCheck:
    socket: str
    name: str = "watch"
    timeout: float = 5.0


@dataclass(frozen=True)
class SystemCheck:
    allow_degraded: bool = False
    name: str = "system"
    timeout: float = 10.0


@dataclass(frozen=True)
class TcpCheck:
    host: str
    port: int
    name: str = ""
    timeout: float = 5.0


@dataclass(frozen=True)
class HttpCheck:
    url: Url
    expect_status: tuple[int, ...] = ()
    name: str = ""
    timeout: float = 5.0


@dataclass(frozen=True)
class RunAs:
    """The user a command check runs as (root when none is given), resolved at load."""

    user: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class CommandCheck:
    command: str
    name: str = ""
    timeout: float = 30.0
    run_as: RunAs | None = None  # None: root, as the switcher


CheckSpec = WatchCheck | SystemCheck | TcpCheck | HttpCheck | CommandCheck


def default_name(spec: CheckSpec) -> str:
    """The name a check goes by when the config gives none."""
    if spec.name:
        return spec.name
    if isinstance(spec, TcpCheck):
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        return f"tcp {host}:{spec.port}"
    if isinstance(spec, HttpCheck):
        return f"http {spec.url.scheme}://{spec.url.authority}{spec.url.target}"
    if isinstance(spec, CommandCheck):
        text = " ".join(spec.command.split())
        return f"command `{text if len(text) <= 60 else text[:59] + '…'}`"
    return spec.name  # pragma: no cover - watch and system always have one


def named(specs: Iterable[CheckSpec]) -> list[tuple[str, CheckSpec]]:
    """Each check with its name, made unique by a ``#2``, ``#3``... suffix."""
    seen: dict[str, int] = {}
    out: list[tuple[str, CheckSpec]] = []
    for spec in specs:
        base = default_name(spec)
        seen[base] = seen.get(base, 0) + 1
        out.append((base if seen[base] == 1 else f"{base} #{seen[base]}", spec))
    return out


# --- watch ---------------------------------------------------------------------------


@dataclass
class WatchBaseline:
    """Restart counts per agent, from watch's first answer during the gate."""

    restarts: dict[str, int] = field(default_factory=dict)


def judge_watch(status: Any, baseline: WatchBaseline) -> tuple[Verdict, str]:
    """Every agent healthy, none restarted since the gate opened.

    ``starting`` is pending (an agent the activation restarted comes up);
    ``stopped`` is skipped (an operator holds it stopped, before and after);
    ``unhealthy``, ``backoff`` and ``quarantined`` fail, and so does a restart
    count that grew: a crash between two polls is still a crash.
    """
    if not isinstance(status, dict) or not isinstance(status.get("agents"), dict):
        return "fail", "watch sent a status without agents"
    agents: dict[str, Any] = status["agents"]
    failing: list[str] = []
    pending: list[str] = []
    healthy = stopped = 0
    for name in sorted(agents):
        agent = agents[name]
        if not isinstance(agent, dict):
            failing.append(f"{name}: malformed status")
            continue
        state = agent.get("state")
        restarts = agent.get("restarts")
        if isinstance(restarts, int) and not isinstance(restarts, bool):
            before = baseline.restarts.get(name)
            if before is None or restarts < before:  # new agent, or watch restarted
                baseline.restarts[name] = restarts
            elif restarts > before:
                error = agent.get("last_error")
                failing.append(
                    f"{name} restarted during the gate ({before} -> {restarts} restarts"
                    + (f"; last error: {error}" if error else "")
                    + ")"
                )
                continue
        if state == "healthy":
            healthy += 1
        elif state == "stopped":
            stopped += 1
        elif state == "starting":
            pending.append(f"{name} starting")
        else:
            error = agent.get("last_error")
            failing.append(f"{name} {state}" + (f" ({error})" if error else ""))
    if failing:
        return "fail", "; ".join(failing)
    if pending:
        return "pending", "; ".join(pending)
    detail = f"{healthy} agent{'s' if healthy != 1 else ''} healthy"
    if stopped:
        detail += f", {stopped} held stopped"
    return "pass", detail


# --- systemd ---------------------------------------------------------------------------

SYSTEM_PENDING = frozenset({"initializing", "starting"})


def parse_failed_units(output: str) -> frozenset[str]:
    """Unit names from ``systemctl list-units --state=failed --plain --no-legend``."""
    units: set[str] = set()
    for line in output.splitlines():
        fields = line.split()
        if fields and fields[0] not in ("●", "*"):
            units.add(fields[0])
        elif len(fields) > 1:
            units.add(fields[1])
    return frozenset(units)


def judge_system(
    state: str,
    failed_units: Iterable[str],
    failed_before: Iterable[str],
    *,
    allow_degraded: bool,
) -> tuple[Verdict, str]:
    """``systemctl is-system-running`` (and, when degraded, which units failed)."""
    state = state.strip() or "unknown"
    if state == "running":
        return "pass", "running"
    if state in SYSTEM_PENDING:
        return "pending", state
    if state == "degraded":
        failed = sorted(set(failed_units))
        new = sorted(set(failed) - set(failed_before))
        if allow_degraded:
            return "pass", f"degraded (allowed): {', '.join(failed) or 'no unit listed'}"
        if not failed:
            # The failed unit recovered (restarted) between the two questions: ask
            # again; one that keeps failing is caught failed, or the deadline ends it.
            return "pending", "degraded a moment ago, no unit failed now"
        if not new:
            return "pass", f"degraded as before the switch: {', '.join(failed)}"
        return "fail", f"degraded: failed units: {', '.join(new)}"
    return "fail", state


def describe_checks(checks: Mapping[str, CheckSpec]) -> str:
    return ", ".join(checks) if checks else "no checks (the gate is a wait)"
