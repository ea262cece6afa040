"""Safe switches a node runs for an operator: started outside the fleet daemon, observed by id.

A switch asked for by another node is ``keel switch`` (or ``keel rebuild
switch --flake``) run with ``--json`` in its own transient systemd unit
(``systemd-run``; a detached process with the ``process`` runner, for hosts
and tests without systemd), so that it outlives the fleet daemon, which the
new configuration may well restart. What it prints goes to
``<state>/switches/<id>.json`` and its exit code to ``<id>.exit``; the
record of the run (what was asked, by whom, the system running before) to
``<id>.run``. A switch back is ``keel switch rollback --to OLD``, run the
same way under ``<id>-back``.

The outcome is read from the files: the exit code says committed (0), rolled
back (1), refused (2) or needs an operator (3), as ``keel switch`` documents;
a run that ended without writing its exit code, or whose unit or process is
gone, is ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.errors import BadRequest, Refused
from keel.fleet import rollout

RUNNERS = ("systemd", "process")
# Writes what the switch prints and then its exit code, each complete or not at all.
SCRIPT = (
    '"$@" > "$KEEL_FLEET_OUT.tmp" 2>> "$KEEL_FLEET_LOG"; code=$?; '
    'mv "$KEEL_FLEET_OUT.tmp" "$KEEL_FLEET_OUT"; '
    'echo "$code" > "$KEEL_FLEET_EXIT.tmp" && mv "$KEEL_FLEET_EXIT.tmp" "$KEEL_FLEET_EXIT"'
)
_ID = re.compile(r"[a-z0-9]{16}(-back)?")
_SPECIALISATION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
EXIT_OUTCOMES = {
    0: rollout.COMMITTED,
    1: rollout.ROLLED_BACK,
    2: rollout.REFUSED,
    3: rollout.NEEDS_OPERATOR,
}


@dataclass(frozen=True)
class Target:
    """What to switch to: a flake (built on the node), a built system, or a specialisation."""

    kind: str  # "flake" | "system" | "specialisation"
    value: str

    def to_json(self) -> dict[str, str]:
        return {self.kind: self.value}

    def describe(self) -> str:
        return f"{self.kind} {self.value}"


def parse_target(value: Any) -> Target:
    """A target from a request; :class:`BadRequest` naming what is wrong."""
    if not isinstance(value, dict) or len(value) != 1:
        raise BadRequest(
            "target must be one of {flake: REF#HOST}, {system: PATH}, {specialisation: NAME}"
        )
    ((kind, text),) = value.items()
    if kind not in ("flake", "system", "specialisation") or not isinstance(text, str):
        raise BadRequest(f"unknown target {str(kind)[:40]!r} (flake, system or specialisation)")
    if not text or len(text) > 4096 or not text.isprintable():
        raise BadRequest(f"the {kind} must be 1 to 4096 printable characters")
    if kind == "flake":
        from keel.safeswitch.rebuild import parse_flake

        parse_flake(text, default_host="host")  # its UsageError says what is wrong
    elif kind == "system" and not text.startswith("/"):
        raise BadRequest(f"the system must be an absolute path, got {text[:60]!r}")
    elif kind == "specialisation" and not _SPECIALISATION.fullmatch(text):
        raise BadRequest(f"{text[:60]!r} is not a specialisation name")
    return Target(kind, text)


def check_id(value: Any) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise BadRequest("a switch id is 16 lower-case letters and digits (and -back)")
    return value


def limits(body: Mapping[str, Any]) -> list[str]:
    """``--gate``/``--deadline`` for ``keel switch`` from a request, checked."""
    out = []
    for key in ("gate", "deadline"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86400:
            raise BadRequest(f"{key} must be a number of seconds from 0 to 86400")
        out += [f"--{key}", f"{float(value):g}"]
    return out


@dataclass(frozen=True)
class Run:
    """One switch (or switch back) a node started, as recorded in ``<id>.run``."""

    id: str
    kind: str  # "switch" | "revert"
    argv: list[str]
    old: str | None  # the system running before
    by: str
    runner: str
    unit: str | None
    pid: int | None
    pid_start: int | None
    started: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Switches:
    """The switches of this node, in ``directory`` (the fleet's state)."""

    def __init__(
        self,
        directory: Path,
        *,
        keel: Sequence[str],
        runner: str,
        safeswitch_config: Path | None,
        current_system: Path,
    ) -> None:
        self.directory = directory
        self.keel = list(keel)
        self.runner = runner
        self.safeswitch_config = safeswitch_config
        self.current_system = current_system
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def _path(self, run_id: str, suffix: str) -> Path:
        return self.directory / f"{run_id}.{suffix}"

    def _config_args(self) -> list[str]:
        return [] if self.safeswitch_config is None else ["--config", str(self.safeswitch_config)]

    def unrecorded(self) -> list[Run]:
        """The runs whose outcome is not in the ledger yet."""
        return [run for run in self._runs() if not self._path(run.id, "recorded").exists()]

    def mark_recorded(self, run: Run) -> None:
        _write(self._path(run.id, "recorded"), "")

    def running(self) -> list[Run]:
        return [run for run in self._runs() if self.state(run)["state"] == "running"]

    def _runs(self) -> list[Run]:
        runs = []
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self.directory.glob("*.run")):
                with contextlib.suppress(OSError, ValueError, TypeError):
                    runs.append(Run(**json.loads(path.read_text())))
        return runs

    async def start_switch(self, target: Target, extra: list[str], by: str, now: float) -> Run:
        old = _realpath(self.current_system)
        options = [*self._config_args(), *extra, "--json"]
        if target.kind == "flake":
            argv = [*self.keel, "rebuild", "switch", "--flake", target.value, *options]
        else:
            system: str | None = target.value
            if target.kind == "specialisation":
                system = _realpath(self.current_system / "specialisation" / target.value)
                if system is None:
                    raise Refused(f"the running system has no specialisation {target.value!r}")
            argv = [*self.keel, "switch", *options, str(system)]
        return await self._start(secrets.token_hex(8), "switch", argv, old=old, by=by, now=now)

    async def start_revert(self, switch_id: str, by: str, now: float) -> Run:
        original = self.run(switch_id)
        if original.kind != "switch":
            raise BadRequest(f"{switch_id} is not a switch")
        if original.old is None:
            raise Refused(f"switch {switch_id} did not know the system it replaced")
        argv = [
            *self.keel,
            "switch",
            "rollback",
            *self._config_args(),
            "--to",
            original.old,
            "--json",
        ]
        return await self._start(
            f"{switch_id}-back", "revert", argv, old=original.old, by=by, now=now
        )

    def run(self, run_id: str) -> Run:
        path = self._path(check_id(run_id), "run")
        try:
            return Run(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise Refused(f"no switch {run_id} on this node") from None
        except (OSError, ValueError, TypeError) as exc:
            raise Refused(f"the record of switch {run_id} is unreadable: {exc}") from None

    async def _start(
        self, run_id: str, kind: str, argv: list[str], *, old: str | None, by: str, now: float
    ) -> Run:
        busy = self.running()
        if busy:
            raise Refused(f"a switch runs on this node already ({busy[0].id}); wait for it")
        if self._path(run_id, "run").exists():
            raise Refused(f"{run_id} was started already")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        shell = shutil.which("sh") or "/bin/sh"
        env = {
            "KEEL_FLEET_OUT": str(self._path(run_id, "json")),
            "KEEL_FLEET_EXIT": str(self._path(run_id, "exit")),
            "KEEL_FLEET_LOG": str(self._path(run_id, "log")),
        }
        unit = pid = pid_start = None
        if self.runner == "systemd":
            unit = f"keel-fleet-{kind}-{run_id}"
            systemd_run = shutil.which("systemd-run")
            if systemd_run is None:
                raise Refused("systemd-run is not installed (set switch_runner to process)")
            command = [
                systemd_run, f"--unit={unit}", "--service-type=exec", "--collect", "--quiet",
                *(f"--setenv={k}={v}" for k, v in env.items()),
                shell, "-c", SCRIPT, "sh", *argv,
            ]  # fmt: skip
            done = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, text=True, check=False, timeout=60
            )
            if done.returncode != 0:
                raise Refused(f"systemd-run failed: {done.stderr.strip()[:300]}")
        else:
            from keel.safeswitch.state import ProcessRef

            child = subprocess.Popen(
                [shell, "-c", SCRIPT, "sh", *argv],
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            self._children[run_id] = child
            ref = ProcessRef.of(child.pid)
            pid, pid_start = child.pid, (ref.start if ref else None)
        run = Run(run_id, kind, argv, old, by, self.runner, unit, pid, pid_start, now)
        _write(self._path(run_id, "run"), json.dumps(run.to_json()))
        return run

    def state(self, run: Run) -> dict[str, Any]:
        """``running``, or ``done`` with the exit code and what the switch printed, or ``lost``."""
        exit_path = self._path(run.id, "exit")
        if not exit_path.exists() and self._alive(run):
            return {"id": run.id, "state": "running"}
        self._reap(run.id)
        try:
            code = int(exit_path.read_text().strip())
        except (OSError, ValueError):
            return {"id": run.id, "state": "lost", "reason": "it ended without an outcome"}
        result: Any = None
        with contextlib.suppress(OSError, ValueError):
            result = json.loads(self._path(run.id, "json").read_text())
        out: dict[str, Any] = {"id": run.id, "state": "done", "exit_code": code}
        if isinstance(result, dict):
            out["result"] = {
                k: result[k]
                for k in ("outcome", "reason", "old", "new", "generation", "id", "message")
                if k in result
            }
        return out

    def _reap(self, run_id: str) -> None:
        """Wait for our child of ``run_id`` (it exits right after writing its outcome):
        no zombie is left behind."""
        child = self._children.get(run_id)
        if child is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
        if child.returncode is not None:
            del self._children[run_id]

    def _alive(self, run: Run) -> bool:
        if run.runner == "systemd" and run.unit:
            systemctl = shutil.which("systemctl") or "systemctl"
            done = subprocess.run(
                [systemctl, "is-active", run.unit], capture_output=True, text=True, check=False
            )
            return done.stdout.strip() in ("active", "activating", "reloading")
        if run.pid is None or run.pid_start is None:
            return False
        from keel.safeswitch.state import ProcessRef

        return ProcessRef(run.pid, run.pid_start).alive()


def outcome_of(state: Mapping[str, Any], kind: str) -> tuple[str, str]:
    """A finished run's outcome for the rollout (and why), from :meth:`Switches.state`."""
    if state.get("state") == "lost":
        return (rollout.LOST if kind == "switch" else rollout.REVERT_FAILED), str(
            state.get("reason", "")
        )
    result = state.get("result") or {}
    reason = str(result.get("reason") or result.get("message") or "")
    code = state.get("exit_code")
    if kind == "revert":
        return (rollout.REVERTED if code == 0 else rollout.REVERT_FAILED), reason
    return EXIT_OUTCOMES.get(code, rollout.LOST) if isinstance(code, int) else rollout.LOST, reason


def _realpath(path: Path) -> str | None:
    try:
        return str(path.resolve(strict=True))
    except (OSError, RuntimeError):
        return None


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)
