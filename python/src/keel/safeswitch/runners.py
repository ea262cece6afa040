"""Where the rollback timer and the activations run: systemd units, or detached processes.

Both outlive the switcher, which is the point: an SSH session that drops or
a ``kill -9`` of ``keel switch`` leaves the activation finishing on its own
and the timer counting down to the rollback.

- ``systemd`` (the default on a host): the timer is a transient timer unit
  (``systemd-run --on-active=…``, ``AccuracySec=100ms``) whose service runs
  ``keel switch rollback --switch-id ID``, started up to 2 s early and
  waiting for the deadline itself, so keel's own start-up does not delay the
  rollback; each activation runs as its own
  transient service (``systemd-run --wait``), its output appended to a log
  file. Transient units live in ``/run/systemd/transient``: no generation
  declares them, so ``switch-to-configuration`` neither stops nor restarts
  them, whatever the new configuration does to keel's own units, and they
  survive ``daemon-reload`` and ``daemon-reexec``.
- ``process`` (hosts and tests without systemd): the timer is a detached
  process in its own session that waits for the deadline on the monotonic
  clock, then runs the same rollback; activations run as children in their
  own sessions, so a terminal hangup reaches none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from keel.errors import KeelError
from keel.safeswitch.state import ProcessRef, Runner
from keel.watch.children import Child

STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL after this many seconds
EARLY_START = 2.0  # seconds the rollback timer's keel starts before the deadline, at most

# Detached timer processes: kept referenced so that no Popen is collected (and
# warned about) while its process still runs.
_detached: list[subprocess.Popen[bytes]] = []


def _reap_detached(kill: int | None = None) -> None:
    """Collect timers of this process that ended (``kill``: that pid is ended first).

    A switcher is a short-lived command, so its timers' exit statuses would be
    collected at its exit anyway; a long-lived caller (fleet, the tests) must
    not gather zombies.
    """
    for process in list(_detached):
        if kill is not None and process.pid == kill and process.poll() is None:
            process.kill()
            process.wait()
        if process.poll() is not None:
            _detached.remove(process)


class Activation(Protocol):
    runner: Runner

    async def wait(self) -> int:
        """The exit status (negative: killed by that signal)."""
        ...

    async def stop(self) -> None: ...

    def detach(self) -> None:
        """Leave it running, watched no longer by this process (the timer deals with it)."""
        ...


class Runners(Protocol):
    kind: str

    def available(self) -> str | None:
        """Why this runner cannot work on this host, or None."""
        ...

    async def arm(self, switch_id: str, delay: float, argv: Sequence[str], log: Path) -> Runner:
        """Start the rollback timer: ``argv`` runs ``delay`` seconds from now."""
        ...

    async def disarm(self, timer: Runner, *, own: bool) -> None:
        """Stop the timer (``own``: the caller is the timer's rollback: do not stop that)."""
        ...

    async def start(self, name: str, argv: Sequence[str], log: Path) -> Activation: ...

    async def stop(self, runner: Runner) -> None:
        """Stop an activation known only from the state file (a takeover)."""
        ...


async def capture(argv: Sequence[str], *, timeout: float) -> tuple[int, str, str]:
    """Run ``argv`` (no stdin, its own session) and return its status, stdout and stderr.

    TimeoutError after ``timeout`` seconds, the process killed.
    """
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    return process.returncode or 0, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


async def _run(argv: Sequence[str], *, timeout: float = 60.0) -> tuple[int, str]:
    """A systemctl or systemd-run call: its status and what it said."""
    try:
        code, out, err = await capture(argv, timeout=timeout)
    except TimeoutError:
        return -1, f"{argv[0]} did not answer within {timeout:g} s"
    return code, (out + err).strip()


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KeelError(f"{name} not found in PATH")
    # A store path on NixOS: it stays valid whichever system becomes current.
    return os.path.realpath(path)


# --- systemd ---------------------------------------------------------------------------


class SystemdActivation:
    def __init__(self, runner: Runner, client: asyncio.subprocess.Process, systemctl: str) -> None:
        self.runner = runner
        self._client = client
        self._systemctl = systemctl

    async def wait(self) -> int:
        assert self._client.stderr is not None
        said = await self._client.stderr.read()
        code = await self._client.wait()
        if code != 0 and said:
            # systemd-run itself failed (a unit of that name exists, no bus...): not an
            # exit status of the activation; say so in the log.
            with contextlib.suppress(OSError), open(self.runner.log or os.devnull, "ab") as log:
                log.write(b"systemd-run: " + said)
        return code

    def detach(self) -> None:
        pass  # the unit is systemd's; the systemd-run client is collected by asyncio

    async def stop(self) -> None:
        if self.runner.unit:
            await _run([self._systemctl, "stop", self.runner.unit], timeout=STOP_TIMEOUT + 30)
        with contextlib.suppress(ProcessLookupError):
            self._client.kill()
        await self._client.wait()


class SystemdRunners:
    kind = "systemd"

    def available(self) -> str | None:
        if not Path("/run/systemd/system").is_dir():
            return "systemd is not running this host (use --timer process)"
        for tool in ("systemd-run", "systemctl"):
            if shutil.which(tool) is None:
                return f"{tool} not found in PATH (use --timer process)"
        return None

    def _environment(self) -> list[str]:
        systemctl = _tool("systemctl")
        path = os.pathsep.join(
            [os.path.dirname(systemctl), os.environ.get("PATH", "/usr/bin:/bin")]
        )
        env = [f"--setenv=PATH={path}"]
        if "LOCALE_ARCHIVE" in os.environ:
            env.append(f"--setenv=LOCALE_ARCHIVE={os.environ['LOCALE_ARCHIVE']}")
        return env

    async def arm(self, switch_id: str, delay: float, argv: Sequence[str], log: Path) -> Runner:
        unit = f"keel-safeswitch-rollback-{switch_id}"
        # The timer fires a little early and the rollback waits for the deadline on
        # the monotonic clock (the same for every process of this boot): starting
        # keel takes a moment, and that moment should not come after the deadline.
        not_before = time.monotonic() + delay
        early = min(EARLY_START, delay / 2)
        code, said = await _run(
            [
                _tool("systemd-run"),
                f"--unit={unit}",
                f"--description=keel safeswitch: roll back switch {switch_id} unless it commits",
                f"--on-active={delay - early:.3f}s",
                "--timer-property=AccuracySec=100ms",
                "--timer-property=RemainAfterElapse=no",
                f"--property=StandardOutput=append:{log}",
                f"--property=StandardError=append:{log}",
                *self._environment(),
                "--quiet",
                "--",
                *argv,
                "--not-before",
                f"{not_before:.6f}",
            ]
        )
        if code != 0:
            raise KeelError(f"systemd-run could not arm the rollback timer: {said or code}")
        return Runner("systemd", unit=f"{unit}.timer", log=str(log))

    async def disarm(self, timer: Runner, *, own: bool) -> None:
        if not timer.unit:
            return
        units = [timer.unit]
        if not own:
            # A rollback the timer started that waits for the lock has done nothing yet.
            units.append(timer.unit.removesuffix(".timer") + ".service")
        await _run([_tool("systemctl"), "stop", *units])

    async def start(self, name: str, argv: Sequence[str], log: Path) -> SystemdActivation:
        unit = name
        client = await asyncio.create_subprocess_exec(
            _tool("systemd-run"),
            f"--unit={unit}",
            f"--description=keel safeswitch: {' '.join(argv[-2:])}",
            "--service-type=exec",
            "--wait",
            "--collect",
            "--quiet",
            f"--property=StandardOutput=append:{log}",
            f"--property=StandardError=append:{log}",
            f"--property=TimeoutStopSec={STOP_TIMEOUT:g}s",
            *self._environment(),
            "--",
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Its own session: a hangup of the operator's terminal does not reach it.
            start_new_session=True,
        )
        runner = Runner("systemd", unit=f"{unit}.service", log=str(log))
        return SystemdActivation(runner, client, _tool("systemctl"))

    async def stop(self, runner: Runner) -> None:
        if runner.unit:
            await _run([_tool("systemctl"), "stop", runner.unit], timeout=STOP_TIMEOUT + 30)


# --- processes ---------------------------------------------------------------------------


class ProcessActivation:
    def __init__(self, runner: Runner, child: Child) -> None:
        self.runner = runner
        self._child = child

    async def wait(self) -> int:
        code = await self._child.wait()
        return -1 if code is None else code

    async def stop(self) -> None:
        await self._child.terminate(STOP_TIMEOUT)

    def detach(self) -> None:
        self._child.detach()


class ProcessRunners:
    kind = "process"

    def available(self) -> str | None:
        return None

    async def arm(self, switch_id: str, delay: float, argv: Sequence[str], log: Path) -> Runner:
        _reap_detached()
        not_before = time.monotonic() + delay
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            try:
                process = subprocess.Popen(
                    [*argv, "--not-before", f"{not_before:.6f}"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise KeelError(
                    f"cannot start the rollback timer {argv[0]}: {exc.strerror}"
                ) from None
        _detached.append(process)
        # The timer outlives the switch that armed it. Whoever is its parent when it
        # exits collects it: init after a `keel switch` that exited, and this thread in
        # a caller that lives on (a daemon, a test process, a switcher that died of a
        # bug), which would otherwise keep a zombie until its next switch.
        threading.Thread(target=process.wait, name=f"timer {process.pid}", daemon=True).start()
        ref = ProcessRef.of(process.pid)
        if ref is None:
            raise KeelError(f"the rollback timer (pid {process.pid}) died at once; see {log}")
        return Runner("process", process=ref, log=str(log))

    async def disarm(self, timer: Runner, *, own: bool) -> None:
        ref = timer.process
        if ref is None or own or ref.pid == os.getpid():
            _reap_detached()
            return
        ref.signal(signal.SIGKILL)
        _reap_detached(kill=ref.pid)

    async def start(self, name: str, argv: Sequence[str], log: Path) -> ProcessActivation:
        log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            child = Child.spawn(argv, stdout=fd, stderr=fd)
        except OSError as exc:
            raise KeelError(f"cannot run {argv[0]}: {exc.strerror}") from None
        finally:
            os.close(fd)
        ref = ProcessRef.of(child.pid) or ProcessRef(child.pid, -1)
        return ProcessActivation(Runner("process", process=ref, log=str(log)), child)

    async def stop(self, runner: Runner) -> None:
        ref = runner.process
        if ref is None or not ref.signal(signal.SIGTERM, group=True):
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        while ref.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ref.signal(signal.SIGKILL, group=True)


def runners(kind: str) -> Runners:
    return SystemdRunners() if kind == "systemd" else ProcessRunners()
