"""``keel switch status`` and ``keel switch history``: reading, never changing, the host.

Status comes from the state file, the lock and the timer itself (is the
transient timer unit still active, is the timer process alive); history from
the ledger's ``safeswitch`` entries. Neither needs root beyond reading those.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from keel.errors import KeelError
from keel.ledger import Ledger, LedgerError
from keel.safeswitch.config import SafeswitchConfig
from keel.safeswitch.generations import Profile
from keel.safeswitch.report import history
from keel.safeswitch.state import Lock, Runner, StateFile

HISTORY_SCAN = 4096  # entries read per step, backwards from the ledger's end


def _timer_armed(timer: Runner | None) -> bool:
    if timer is None:
        return False
    if timer.kind == "process":
        return timer.process is not None and timer.process.alive()
    systemctl = shutil.which("systemctl")
    if systemctl is None or not timer.unit:
        return False
    result = subprocess.run(
        [systemctl, "is-active", timer.unit], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() == "active"


def status(config: SafeswitchConfig, *, wall: float | None = None) -> dict[str, Any]:
    now = time.time() if wall is None else wall
    profile = Profile(config.profile)
    current = config.current
    out: dict[str, Any] = {
        "system": {
            "running": os.path.realpath(current) if current.exists() else None,
            "current": str(current),
            "profile": str(config.profile),
            "profile_link": profile.target(),
            "profile_system": profile.system(),
        },
        "switch": None,
    }
    state = StateFile(config.run_dir).read()
    if state is None:
        return out
    switch = state.to_json()
    switch.pop("version", None)
    switch["in_progress"] = state.in_progress
    switch["interrupted_by_reboot"] = state.interrupted_by_reboot
    if state.in_progress:
        switch["seconds_left"] = round(state.deadline_at - now, 3)
        switch["lock_held"] = Lock(config.run_dir).held_elsewhere()
        switch["switcher"] = {
            "pid": state.switcher.pid if state.switcher else None,
            "alive": bool(state.switcher and state.switcher.alive()),
        }
        switch["timer"] = (state.timer.to_json() if state.timer else {}) | {
            "armed": _timer_armed(state.timer)
        }
    out["switch"] = switch
    return out


def read_history(ledger_path: Path, *, limit: int, in_progress: str | None) -> list[dict[str, Any]]:
    """The last ``limit`` switches recorded in the ledger, oldest first."""
    try:
        ledger = Ledger.open(ledger_path, create=False)
    except LedgerError as exc:
        raise KeelError(f"cannot read the switch history: {exc}") from None
    entries: list[dict[str, Any]] = []
    try:
        end = ledger.size()
        subjects: set[str] = set()
        while end > 0 and len(subjects) < limit + 1:
            start = max(0, end - HISTORY_SCAN)
            chunk = [
                entry.as_dict()
                for _, entry in ledger.entries(start, end)
                if entry.source == "safeswitch"
            ]
            entries[:0] = chunk
            subjects.update(e["subject"] for e in chunk)
            end = start
    except LedgerError as exc:
        raise KeelError(f"cannot read the switch history: {exc}") from None
    finally:
        ledger.close()
    rows = history(entries, in_progress=in_progress)
    return rows[-limit:] if limit else rows
