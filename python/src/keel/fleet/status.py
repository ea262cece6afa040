"""A node's status report, and the fleet view made of every node's report.

Pure: the shell asks watch, keel's services and the system, then hands the
answers here; what comes back is the report a node sends for itself
(:func:`node_report`), checked on arrival (:func:`check_report`), and the
fleet's table (:func:`fleet_view`), in which a node that did not answer is
``unreachable`` with its last report and when it was last seen: never healthy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HEALTHY = "healthy"
DEGRADED = "degraded"
UNREACHABLE = "unreachable"
# Agent states that need nobody's attention: running and passing its probes,
# or held down by an operator (`keel watch stop`).
QUIET_AGENT_STATES = ("healthy", "stopped")
MAX_AGENTS = 1000
MAX_TEXT = 500


@dataclass(frozen=True)
class ServiceAnswer:
    """What one keel service said to ``status`` (``error`` set when it did not answer)."""

    name: str
    status: Mapping[str, Any] | None
    error: str | None = None


def node_report(
    *,
    node: str,
    host: str,
    version: str,
    now: float,
    watch: ServiceAnswer | None,
    services: Sequence[ServiceAnswer],
    system: Mapping[str, Any],
    switch: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """This node's report: agents (from watch), services, system generation, last switch."""
    problems: list[str] = []
    agents: dict[str, Any] = {}
    if watch is not None:
        if watch.status is None:
            problems.append(f"watch does not answer: {watch.error}")
        else:
            raw = watch.status.get("agents")
            for name, agent in sorted((raw if isinstance(raw, dict) else {}).items()):
                if not isinstance(agent, dict):
                    continue
                summary = {
                    "state": _text(agent.get("state")),
                    "restarts": agent.get("restarts") if _is_int(agent.get("restarts")) else None,
                    "last_error": _text(agent.get("last_error")),
                    "last_error_at": _number(agent.get("last_error_at")),
                }
                agents[str(name)] = summary
                if summary["state"] not in QUIET_AGENT_STATES:
                    problems.append(f"agent {name} is {summary['state']}")
    service_rows: dict[str, Any] = {}
    for answer in services:
        if answer.status is None:
            service_rows[answer.name] = {"state": "down", "error": _text(answer.error)}
            problems.append(f"{answer.name} does not answer: {answer.error}")
            continue
        shell = answer.status.get("service")
        shell = shell if isinstance(shell, dict) else {}
        ledger = shell.get("ledger")
        ledger_state = ledger.get("state") if isinstance(ledger, dict) else None
        service_rows[answer.name] = {
            "state": "up",
            "version": _text(shell.get("version")),
            "uptime": _number(shell.get("uptime")),
            "ledger": _text(ledger_state),
        }
        if ledger_state == "degraded":
            problems.append(f"{answer.name}'s ledger is degraded")
    if switch is not None and switch.get("outcome") == "needs-operator":
        problems.append("the last switch needs an operator (its rollback failed)")
    return {
        "node": node,
        "host": host,
        "version": version,
        "time": now,
        "health": DEGRADED if problems else HEALTHY,
        "problems": problems,
        "agents": agents,
        "services": service_rows,
        "system": dict(system),
        "switch": None if switch is None else dict(switch),
    }


class ReportError(ValueError):
    pass


def check_report(report: Any, node: str) -> dict[str, Any]:
    """A report received from ``node``, checked for shape; :class:`ReportError` if not one."""
    if not isinstance(report, dict):
        raise ReportError("the status is not an object")
    if report.get("node") != node:
        raise ReportError(f"the status is about node {str(report.get('node'))[:40]!r}")
    for key, kind in (
        ("host", str),
        ("version", str),
        ("health", str),
        ("problems", list),
        ("agents", dict),
        ("services", dict),
        ("system", dict),
    ):
        if not isinstance(report.get(key), kind):
            raise ReportError(f"the status's {key!r} is missing or of the wrong type")
    if not _is_number(report.get("time")):
        raise ReportError("the status has no time")
    if report["health"] not in (HEALTHY, DEGRADED):
        raise ReportError(f"unknown health {report['health'][:40]!r}")
    if len(report["agents"]) > MAX_AGENTS:
        raise ReportError(f"more than {MAX_AGENTS} agents")
    for name, agent in report["agents"].items():
        if not isinstance(agent, dict) or not isinstance(agent.get("state"), str | None):
            raise ReportError(f"agent {str(name)[:40]!r} is malformed")
    if report.get("switch") is not None and not isinstance(report.get("switch"), dict):
        raise ReportError("the status's 'switch' is not an object")
    return report


@dataclass(frozen=True)
class Seen:
    """The last report of a node and when it arrived (this node's clock)."""

    report: Mapping[str, Any]
    at: float


def fleet_view(
    members: Sequence[str],
    answers: Mapping[str, Mapping[str, Any]],
    last: Mapping[str, Seen],
    *,
    now: float,
    errors: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per member: its fresh report, or ``unreachable`` with the last one."""
    errors = errors or {}
    rows = []
    for node in members:
        answer = answers.get(node)
        if answer is not None:
            rows.append(
                {
                    "node": node,
                    "state": answer["health"],
                    "last_seen": now,
                    "stale": False,
                    "error": None,
                    "report": dict(answer),
                }
            )
            continue
        seen = last.get(node)
        rows.append(
            {
                "node": node,
                "state": UNREACHABLE,
                "last_seen": None if seen is None else seen.at,
                "stale": seen is not None,
                "error": errors.get(node, "no answer"),
                "report": None if seen is None else dict(seen.report),
            }
        )
    return rows


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    return float(value) if _is_number(value) else None
