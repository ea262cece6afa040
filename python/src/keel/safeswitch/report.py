"""What ``keel switch`` tells people: progress, the host's state, status, history (pure text).

The facts are gathered by the shell; these functions only shape them, so the
wording that an operator reads at 3 a.m. is tested like any other core.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from keel.output import human_duration


def short(path: str | None) -> str:
    """A store path without its hash (``/nix/store/abc-nixos-system-x`` -> ``nixos-system-x``)."""
    if not path:
        return "-"
    name = path.rstrip("/").rsplit("/", 1)[-1]
    head, sep, rest = name.partition("-")
    return rest if sep and len(head) == 32 and head.isalnum() else name


def wall_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Output:
    """Progress lines for a person; a terminal that went away (SSH dropped) is no error.

    With ``--json`` the progress goes to stderr, so stdout carries only the
    result. Once a write fails (EIO, EPIPE: the terminal is gone) nothing more
    is written: the switch goes on.
    """

    def __init__(self, *, json_mode: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or (sys.stderr if json_mode else sys.stdout)
        self.detached = False

    def line(self, text: str) -> None:
        if self.detached:
            return
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            self.detached = True


@dataclass(frozen=True)
class HostFacts:
    """What the host is doing now, as far as keel can tell."""

    running: str | None  # what the running-system link points at
    current_link: str
    profile: str
    profile_system: str | None  # what the profile points at: the next boot's default
    profile_link: str | None  # system-N-link


def host_state(facts: HostFacts, *, old: str, gcroot: str | None, log: str | None) -> list[str]:
    """The clearest account of a host whose rollback failed, and the ways out."""
    lines = [
        f"running now:   {facts.running or 'unknown'} ({facts.current_link})",
        f"boot default:  {facts.profile_system or 'unknown'} "
        f"({facts.profile} -> {facts.profile_link or '?'}; what the next boot starts)",
        f"old system:    {old}" + (f" (kept alive by {gcroot})" if gcroot else ""),
    ]
    if log:
        lines.append(f"rollback log:  {log}")
    back = "the old system" if facts.profile_system == old else "the boot default above"
    lines += [
        "to recover, any of:",
        "  keel switch rollback            (try the rollback again)",
        f"  {old}/bin/switch-to-configuration test",
        f"  reboot                          (starts {back})",
    ]
    return lines


def status_lines(status: Mapping[str, Any]) -> list[str]:
    """``keel switch status`` for a person (the same facts as ``--json``)."""
    lines: list[str] = []
    system = status.get("system") or {}
    lines.append(f"running:  {system.get('running') or 'unknown'}")
    lines.append(
        f"profile:  {system.get('profile_link') or '-'} -> {system.get('profile_system') or '-'}"
    )
    switch = status.get("switch")
    if not switch:
        lines.append("no switch since boot")
        return lines
    state = switch["phase"]
    if switch["in_progress"]:
        lines.append(f"switch {switch['id']}: IN PROGRESS ({state})")
    elif switch.get("interrupted_by_reboot"):
        lines.append(
            f"last switch {switch['id']}: interrupted by a reboot while {state} "
            "(the old boot default started)"
        )
    else:
        lines.append(f"last switch {switch['id']}: {state}")
    lines.append(f"  old:      {switch['old']}")
    lines.append(f"  new:      {switch['new']}")
    lines.append(f"  started:  {wall_time(switch['started_at'])}")
    if switch["in_progress"]:
        left = switch.get("seconds_left")
        lines.append(
            f"  deadline: {wall_time(switch['deadline_at'])} ({human_duration(left)} left)"
            if left is not None and left > 0
            else f"  deadline: {wall_time(switch['deadline_at'])} (passed)"
        )
        timer = switch.get("timer") or {}
        where = timer.get("unit") or (f"pid {timer['pid']}" if timer.get("pid") else "-")
        armed = "armed" if timer.get("armed") else "NOT ARMED"
        lines.append(f"  timer:    {timer.get('kind', '-')} {where} ({armed})")
        switcher = switch.get("switcher") or {}
        if switcher.get("alive"):
            lines.append(f"  switcher: pid {switcher.get('pid')} (running)")
        else:
            lines.append(
                f"  switcher: pid {switcher.get('pid')} is gone: the timer rolls back at the "
                "deadline, or run `keel switch rollback` now"
            )
    elif switch.get("reason"):
        lines.append(f"  reason:   {switch['reason']}")
    for check in switch.get("checks") or []:
        verdict = check.get("verdict") or "no result"
        detail = f": {check['detail']}" if check.get("detail") else ""
        lines.append(f"  check {check['name']}: {verdict}{detail}")
    return lines


# --- history ------------------------------------------------------------------------------------

OUTCOMES = {
    "committed": "committed",
    "rolled-back": "rolled back",
    "rollback-failed": "rollback FAILED",
    "interrupted": "interrupted by a reboot",
}


def history(
    entries: Iterable[Mapping[str, Any]], *, in_progress: str | None
) -> list[dict[str, Any]]:
    """One row per switch, oldest first, from the ledger's safeswitch entries.

    A ``started`` entry with no outcome is ``in progress`` when it is the
    switch in progress now, and ``interrupted`` otherwise (the host rebooted
    mid-switch before ``keel switch reconcile`` recorded it, or the ledger
    predates that). An ``interrupted`` entry (written at the next boot) says
    so for sure, with the system that booted.
    """
    switches: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for entry in entries:
        subject = str(entry.get("subject", ""))
        kind = entry.get("kind")
        data = entry.get("data") or {}
        row = switches.get(subject)
        if row is None:
            row = {"id": subject, "started": None, "ended": None, "outcome": None, "old": None,
                   "new": None, "reason": None, "by": None}  # fmt: skip
            switches[subject] = row
            order.append(subject)
        if kind == "started":
            row["started"] = entry.get("ts")
        elif kind in OUTCOMES:
            row["outcome"] = kind
            row["ended"] = entry.get("ts")
            row["reason"] = data.get("reason")
            row["by"] = data.get("by")
            if kind == "interrupted":
                row["booted"] = data.get("booted")
            if data.get("failed_checks"):
                row["failed_checks"] = data["failed_checks"]
        for key in ("old", "new"):
            if isinstance(data.get(key), str):
                row[key] = data[key]
    for row in switches.values():
        if row["outcome"] is None:
            row["outcome"] = "in-progress" if row["id"] == in_progress else "interrupted"
    return [switches[i] for i in order]


def history_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[object]]]:
    headers = ["started", "switch", "outcome", "old -> new", "reason"]
    table: list[list[object]] = []
    for row in rows:
        outcome = row["outcome"]
        label = OUTCOMES.get(outcome, outcome.replace("-", " "))
        if outcome == "interrupted" and row.get("ended") is None:
            label = "interrupted (no outcome recorded: reboot?)"
        table.append(
            [
                (row.get("started") or row.get("ended") or "-")[:19].replace("T", " "),
                row["id"],
                label,
                f"{short(row.get('old'))} -> {short(row.get('new'))}",
                row.get("reason"),
            ]
        )
    return headers, table
