"""What survives the switcher: the state file and the lock.

``RUN_DIR/state.json`` (``/run/keel/safeswitch``; ``./.keel/run/safeswitch``
in dev mode) says which switch is in progress or ended last: its phase, both
systems, the rollback timer, the activation running, the checks. It is
written atomically (a temporary file renamed over it) at every change, so
``keel switch status`` and ``keel switch rollback`` read a whole state from
any process, also after the switcher was killed. ``/run`` is emptied by a
reboot, as it should be: after a reboot no switch is in progress.

``RUN_DIR/lock`` is held with ``flock(2)`` by the process that acts on the
host (the switcher, or a rollback). The kernel releases it when that process
dies, however it dies, so a lock is never left stale. Its descriptor is
close-on-exec: no activation or timer inherits it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from keel.config import parse_json
from keel.errors import ConfigError, KeelError
from keel.safeswitch.machine import FINISHED, IN_PROGRESS, Limits, Phase
from keel.watch.children import process_start_ticks

STATE_VERSION = 1
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot's id (a state file from another boot describes nothing that runs)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


class DamagedState(Exception):
    """The state file is not what keel writes; the message names the field."""


# --- processes named by pid and start time ---------------------------------------------


@dataclass(frozen=True)
class ProcessRef:
    """A process as another process can find it again: pid plus start time.

    A pid alone may be reused after the process died; the start time (clock
    ticks since boot) makes the reference unambiguous.
    """

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        start = process_start_ticks(pid)
        return None if start is None else cls(pid, start)

    def alive(self) -> bool:
        """Still running (a zombie waiting to be reaped has ended: it counts as gone)."""
        if process_start_ticks(self.pid) != self.start:
            return False
        try:
            raw = Path(f"/proc/{self.pid}/stat").read_bytes()
        except OSError:
            return False
        return raw[raw.rindex(b")") + 2 : raw.rindex(b")") + 3] != b"Z"

    def signal(self, sig: int, *, group: bool = False) -> bool:
        """Send ``sig`` if it is still the same process; False if it is gone.

        A zombie still counts: until it is reaped its pid (and group id) cannot
        be reused, and what is left of its group may still run.
        """
        if process_start_ticks(self.pid) != self.start:
            return False
        try:
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True


# --- the state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    """Where something runs: a systemd unit, or a process (and its group)."""

    kind: str  # "systemd" | "process"
    unit: str | None = None
    process: ProcessRef | None = None
    log: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.unit is not None:
            out["unit"] = self.unit
        if self.process is not None:
            out["pid"], out["start"] = self.process.pid, self.process.start
        if self.log is not None:
            out["log"] = self.log
        return out

    @classmethod
    def from_json(cls, value: Any, where: str) -> Runner:
        if not isinstance(value, dict) or value.get("kind") not in ("systemd", "process"):
            raise DamagedState(f"{where}: expected a runner object")
        process = None
        if "pid" in value:
            pid, start = value.get("pid"), value.get("start")
            if not isinstance(pid, int) or not isinstance(start, int):
                raise DamagedState(f"{where}: pid and start must be integers")
            process = ProcessRef(pid, start)
        unit, log = value.get("unit"), value.get("log")
        if unit is not None and not isinstance(unit, str):
            raise DamagedState(f"{where}.unit: expected a string")
        if log is not None and not isinstance(log, str):
            raise DamagedState(f"{where}.log: expected a string")
        return cls(value["kind"], unit, process, log)


@dataclass
class SwitchState:
    id: str
    phase: Phase
    old: str
    new: str
    profile: str
    current: str
    limits: Limits
    started_at: float  # wall clock
    deadline_at: float  # wall clock, for people; the timer itself counts on the monotonic clock
    armed_monotonic: float | None = None
    switcher: ProcessRef | None = None
    timer: Runner | None = None
    activation: Runner | None = None
    profile_before: str | None = None  # the profile's link target before the commit
    generation_added: str | None = None  # the generation link the commit made
    restore_profile: bool = False
    gcroots: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    rolled_back_by: str = ""
    ledger: str | None = None
    alerts: dict[str, Any] | None = None
    host: str = ""
    run_dir: str = ""
    state_dir: str | None = None  # where its evidence lives (evidence.py); None: none kept
    boot_id: str = field(default_factory=boot_id)
    updated_at: float = 0.0

    @property
    def interrupted_by_reboot(self) -> bool:
        """In progress when the host went down: the old boot default started again."""
        return self.phase in IN_PROGRESS and self.boot_id != boot_id()

    @property
    def in_progress(self) -> bool:
        return self.phase in IN_PROGRESS and not self.interrupted_by_reboot

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": STATE_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Phase):
                value = value.value
            elif isinstance(value, Limits):
                value = asdict(value)
            elif isinstance(value, ProcessRef):
                value = {"pid": value.pid, "start": value.start}
            elif isinstance(value, Runner):
                value = value.to_json()
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, value: Any) -> SwitchState:
        """Check every field; ValueError names the one that is wrong."""
        if not isinstance(value, dict):
            raise DamagedState("expected an object")
        if value.get("version") != STATE_VERSION:
            raise DamagedState(f"version: expected {STATE_VERSION}, got {value.get('version')!r}")
        known = {f.name for f in fields(cls)} | {"version"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise DamagedState(f"{unknown[0]}: unknown key")
        try:
            phase = Phase(str(value.get("phase")))
        except ValueError:
            raise DamagedState(f"phase: not a phase: {value.get('phase')!r}") from None
        limits_raw = value.get("limits")
        if not isinstance(limits_raw, dict) or set(limits_raw) != {f.name for f in fields(Limits)}:
            raise DamagedState("limits: expected gate, deadline, commit_timeout, rollback_timeout")
        for name, number in limits_raw.items():
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise DamagedState(f"limits.{name}: expected a number")
        switcher_raw = value.get("switcher")
        switcher = None
        if switcher_raw is not None:
            if not isinstance(switcher_raw, dict) or not all(
                isinstance(switcher_raw.get(k), int) for k in ("pid", "start")
            ):
                raise DamagedState("switcher: expected {pid, start}")
            switcher = ProcessRef(switcher_raw["pid"], switcher_raw["start"])
        return cls(
            id=_string(value, "id"),
            phase=phase,
            old=_string(value, "old"),
            new=_string(value, "new"),
            profile=_string(value, "profile"),
            current=_string(value, "current"),
            limits=Limits(**{k: float(v) for k, v in limits_raw.items()}),
            started_at=_number(value, "started_at"),
            deadline_at=_number(value, "deadline_at"),
            armed_monotonic=_number(value, "armed_monotonic", optional=True),
            switcher=switcher,
            timer=None if value.get("timer") is None else Runner.from_json(value["timer"], "timer"),
            activation=None
            if value.get("activation") is None
            else Runner.from_json(value["activation"], "activation"),
            profile_before=_string(value, "profile_before", optional=True),
            generation_added=_string(value, "generation_added", optional=True),
            restore_profile=bool(value.get("restore_profile", False)),
            gcroots=_strings(value, "gcroots"),
            checks=_objects(value, "checks"),
            reason=_string(value, "reason", optional=True) or "",
            rolled_back_by=_string(value, "rolled_back_by", optional=True) or "",
            ledger=_string(value, "ledger", optional=True),
            alerts=value.get("alerts") if isinstance(value.get("alerts"), dict) else None,
            host=_string(value, "host", optional=True) or "",
            run_dir=_string(value, "run_dir", optional=True) or "",
            state_dir=_string(value, "state_dir", optional=True),
            boot_id=_string(value, "boot_id", optional=True) or "",
            updated_at=_number(value, "updated_at", optional=True) or 0.0,
        )


def _string(value: Mapping[str, Any], key: str, *, optional: bool = False) -> Any:
    item = value.get(key)
    if item is None and optional:
        return None
    if not isinstance(item, str):
        raise DamagedState(f"{key}: expected a string, got {type(item).__name__}")
    return item


def _number(value: Mapping[str, Any], key: str, *, optional: bool = False) -> Any:
    item = value.get(key)
    if item is None and optional:
        return None
    if isinstance(item, bool) or not isinstance(item, int | float):
        raise DamagedState(f"{key}: expected a number, got {type(item).__name__}")
    return float(item)


def _strings(value: Mapping[str, Any], key: str) -> list[str]:
    items = value.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise DamagedState(f"{key}: expected a list of strings")
    return list(items)


def _objects(value: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    items = value.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise DamagedState(f"{key}: expected a list of objects")
    return list(items)


# --- the file ----------------------------------------------------------------------------


class StateFile:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "state.json"

    def read(self) -> SwitchState | None:
        """The state, or None when no switch ran since boot; a damaged file is an error."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeelError(f"{self.path}: cannot read the switch state: {exc.strerror}") from None
        try:
            return SwitchState.from_json(parse_json(raw, source=str(self.path)))
        except ConfigError as exc:
            raise KeelError(f"{exc} (the switch state file is damaged)") from None
        except DamagedState as exc:
            raise KeelError(
                f"{self.path}: {exc} (the switch state file is damaged; see docs/safeswitch.md, "
                "'when the state file is damaged')"
            ) from None

    def write(self, state: SwitchState) -> None:
        """Atomically replace the state (readers see the old or the new, never half).

        No fsync: the state describes this boot only (``/run`` is a tmpfs, and a
        state from an earlier boot is recognised by its boot id), so what a
        power loss would take is worthless anyway; the rename is what readers need.
        """
        state.updated_at = time.time()
        data = json.dumps(state.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        tmp = self.path.with_name(f".state.json.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


# --- the lock --------------------------------------------------------------------------------


class Lock:
    """``flock(2)`` on ``RUN_DIR/lock``: one process acts on the host at a time."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "lock"
        self._fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock (tested without taking it)."""
        if self._fd is not None:
            return False
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)
        return False

    @contextlib.contextmanager
    def holding(self) -> Iterator[bool]:
        acquired = self.try_acquire()
        try:
            yield acquired
        finally:
            if acquired:
                self.release()
