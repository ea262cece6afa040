"""What a reboot must not erase: the switches (and rollbacks) that were not decided yet.

The state file lives in ``/run``, which a reboot empties, so a switch cut short
by a reboot or a power loss left only its ``started`` entry in the ledger.
Beside it, ``STATE_DIR/unfinished/ID.json`` (``/var/lib/keel/safeswitch``;
``./.keel/safeswitch`` in dev mode) is written durably (fsync, rename, the
directory fsynced) before a switch touches anything, kept up to date as its
phase and GC roots change, and removed once the switch is decided, whoever
decides it (the switcher, the rollback timer, an operator). A rollback to an
older generation (``keel switch rollback`` with no switch in progress) leaves
one too while it runs.

At the next boot ``keel switch reconcile`` (``keel-safeswitch-reconcile.service``)
finds those of an earlier boot: each gets an ``interrupted`` entry in the
ledger the switch recorded to (the phase it was in, both systems, the system
that booted and runs now), its GC roots are dropped (nothing will roll back
to it any more), and the file is removed. A file keel cannot read is moved
aside (``ID.json.damaged``) and reported, never trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keel.config import parse_json
from keel.errors import ConfigError
from keel.files import write_durably
from keel.ledger.recorder import LedgerUnavailable, Recorder
from keel.safeswitch.generations import GcRoots
from keel.safeswitch.report import Output
from keel.safeswitch.state import DamagedState, boot_id

VERSION = 1
KINDS = ("switch", "rollback")


@dataclass(frozen=True)
class Unfinished:
    """A switch (or a rollback) not decided yet, as the next boot will read it."""

    id: str
    kind: str  # "switch" | "rollback"
    phase: str
    old: str
    new: str
    started_at: float  # wall clock
    ledger: str | None
    gcroots: tuple[str, ...] = ()
    boot_id: str = field(default_factory=boot_id)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["gcroots"] = list(self.gcroots)
        out["version"] = VERSION
        return out

    @classmethod
    def from_json(cls, value: Any) -> Unfinished:
        """Check every field; :class:`DamagedState` names the one that is wrong."""
        if not isinstance(value, dict):
            raise DamagedState("expected an object")
        if value.get("version") != VERSION:
            raise DamagedState(f"version: expected {VERSION}, got {value.get('version')!r}")
        known = {"version", "id", "kind", "phase", "old", "new", "started_at", "ledger",
                 "gcroots", "boot_id"}  # fmt: skip
        unknown = sorted(set(value) - known)
        if unknown:
            raise DamagedState(f"{unknown[0]}: unknown key")
        for key in ("id", "kind", "phase", "old", "new", "boot_id"):
            if not isinstance(value.get(key), str):
                raise DamagedState(f"{key}: expected a string")
        if value["kind"] not in KINDS:
            raise DamagedState(f"kind: expected switch or rollback, got {value['kind']!r}")
        started = value.get("started_at")
        if isinstance(started, bool) or not isinstance(started, int | float):
            raise DamagedState("started_at: expected a number")
        ledger = value.get("ledger")
        if ledger is not None and not isinstance(ledger, str):
            raise DamagedState("ledger: expected a string or null")
        roots = value.get("gcroots", [])
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise DamagedState("gcroots: expected a list of strings")
        return cls(
            id=value["id"],
            kind=value["kind"],
            phase=value["phase"],
            old=value["old"],
            new=value["new"],
            started_at=float(started),
            ledger=ledger,
            gcroots=tuple(roots),
            boot_id=value["boot_id"],
        )

    def entry(self, *, booted: str | None, running: str | None) -> dict[str, Any]:
        """The data of its ``interrupted`` ledger entry."""
        return {
            "kind": self.kind,
            "phase": self.phase,
            "old": self.old,
            "new": self.new,
            "booted": booted,
            "running": running,
            "by": "reboot",
            "reason": f"the {self.kind} was not decided when the host went down ({self.phase})",
        }


class Evidence:
    """``STATE_DIR/unfinished``: one durable file per undecided switch."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "unfinished"

    def path(self, switch_id: str) -> Path:
        return self.dir / f"{switch_id}.json"

    def write(self, unfinished: Unfinished) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        data = json.dumps(unfinished.to_json(), sort_keys=True).encode() + b"\n"
        write_durably(self.path(unfinished.id), data, mode=0o640, replace=True)

    def remove(self, switch_id: str) -> None:
        path = self.path(switch_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        with contextlib.suppress(OSError):
            directory = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def left(self) -> list[tuple[Path, Unfinished | str]]:
        """Every file here, read: the switch, or what is wrong with the file."""
        found: list[tuple[Path, Unfinished | str]] = []
        try:
            paths = sorted(self.dir.glob("*.json"))
        except OSError:
            return found
        for path in paths:
            try:
                value = parse_json(path.read_bytes(), source=str(path))
                found.append((path, Unfinished.from_json(value)))
            except (OSError, ConfigError, DamagedState) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                found.append((path, reason))
        return found

    def set_aside(self, path: Path) -> Path:
        """Move a damaged file out of the way (kept as evidence, never read again)."""
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        return aside


SOURCE = "safeswitch"
RECORD_TIMEOUT = 10.0


def _system(link: Path) -> str | None:
    return os.path.realpath(link) if link.exists() else None


async def reconcile(
    evidence: Evidence,
    *,
    current: Path,
    booted: Path,
    out: Output,
    this_boot: str | None = None,
) -> list[dict[str, Any]]:
    """Record every switch a reboot interrupted; what was done, one dict per file."""
    this_boot = boot_id() if this_boot is None else this_boot
    done: list[dict[str, Any]] = []
    for path, found in evidence.left():
        if isinstance(found, str):
            aside = evidence.set_aside(path)
            out.line(f"{path}: unreadable ({found}); moved to {aside}, not trusted")
            done.append({"file": str(path), "outcome": "damaged", "problem": found})
            continue
        if found.boot_id == this_boot:
            continue  # of this boot: still in progress, or its timer decides it
        data = found.entry(booted=_system(booted), running=_system(current))
        if found.ledger is not None and not await _record(found, data, out):
            done.append({"id": found.id, "outcome": "kept", "reason": "the ledger did not take it"})
            continue  # kept for the next run: the evidence is not lost
        GcRoots.remove(list(found.gcroots))
        evidence.remove(found.id)
        out.line(
            f"{found.kind} {found.id} to {found.new} was interrupted by a reboot while "
            f"{found.phase}; the host booted {data['booted'] or 'an unknown system'}"
        )
        done.append({"id": found.id, "outcome": "interrupted", **data})
    return done


async def _record(found: Unfinished, data: dict[str, Any], out: Output) -> bool:
    assert found.ledger is not None
    recorder = Recorder(Path(found.ledger), SOURCE)
    await recorder.start()
    try:
        await recorder.record_durable("interrupted", found.id, data, timeout=RECORD_TIMEOUT)
    except LedgerUnavailable as exc:
        out.line(f"{found.kind} {found.id}: the ledger did not take the 'interrupted' entry: {exc}")
        return False
    finally:
        await recorder.close()
    return True
