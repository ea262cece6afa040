"""Processes watched through pidfds: death seen at once, everything they started killed.

A :class:`Child` is started in its own session and watched through
``pidfd_open(2)``: the pidfd becomes readable the moment the process exits,
which the event loop sees like any socket. No SIGCHLD handler, no polling, no
thread per child. What it started is reached through its
:class:`~keel.watch.scopes.Scope`: its process group by default, a cgroup or
a marker for agents (see :mod:`keel.watch.scopes`).

A pidfd also works for a process that is not our child, which is how a
restarted watch adopts the agents its previous incarnation started: it learns
when they die, though not their exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from keel.watch.scopes import ProcessGroup, Scope


def describe_status(code: int | None) -> str:
    """``exited with status 3``, ``killed by signal 9 (SIGKILL)``, from a returncode."""
    if code is None:
        return "exited (status unknown: the process was adopted, not started, by this watch)"
    if code >= 0:
        return f"exited with status {code}"
    number = -code
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"killed by signal {number} ({name})"


def process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def seconds_since_start(ticks: int) -> float:
    """How long ago a process with start time ``ticks`` (since boot) started."""
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / hz)


class Child:
    """One process (and what it started) whose exit is reported through a pidfd.

    When it exits, the rest of its scope is killed, as systemd's
    ``KillMode=control-group`` does.
    """

    def __init__(
        self,
        pid: int,
        *,
        loop: asyncio.AbstractEventLoop,
        on_exit: Callable[[Child, int | None], None] | None = None,
        popen: subprocess.Popen[bytes] | None = None,
        scope: Scope | None = None,
    ) -> None:
        self.pid = pid
        self.scope: Scope = scope if scope is not None else ProcessGroup(pid)
        self.returncode: int | None = None
        self.exited = False
        self._popen = popen
        self._loop = loop
        self._on_exit = on_exit
        self._done: asyncio.Future[int | None] = loop.create_future()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None
            self._reap()
            return
        loop.add_reader(self._pidfd, self._reap)

    # --- construction ------------------------------------------------------------

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdout: int | IO[bytes] | None = None,
        stderr: int | IO[bytes] | None = None,
        on_exit: Callable[[Child, int | None], None] | None = None,
        scope: Scope | None = None,
    ) -> Child:
        """Start ``argv`` in a new session (and in ``scope``); OSError if it cannot be."""
        loop = asyncio.get_running_loop()
        extra = scope.environment() if scope is not None else {}
        if extra:
            env = {**(os.environ if env is None else env), **extra}
        with scope.hosting() if scope is not None else contextlib.nullcontext():
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        if scope is not None:
            scope.attach(popen.pid)
        return cls(popen.pid, loop=loop, on_exit=on_exit, popen=popen, scope=scope)

    @classmethod
    def adopt(
        cls,
        pid: int,
        *,
        on_exit: Callable[[Child, int | None], None] | None = None,
        scope: Scope | None = None,
    ) -> Child:
        """Watch a process we did not start (exit status will be unknown)."""
        loop = asyncio.get_running_loop()
        if scope is None:
            try:
                scope = ProcessGroup(os.getpgid(pid))
            except ProcessLookupError:
                scope = ProcessGroup(pid)
        return cls(pid, loop=loop, on_exit=on_exit, scope=scope)

    # --- exit --------------------------------------------------------------------

    def _reap(self) -> None:
        if self.exited:
            return
        code: int | None = None
        # The leader is a zombie until reaped, so its pid (the group id) cannot
        # have been reused yet: what is left of its scope goes with it.
        self.scope.kill()
        if self._popen is not None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid == 0:
                return  # readable but not yet reapable: wait for the next wakeup
            code = os.waitstatus_to_exitcode(status)
            # Keep subprocess from reaping (or warning about) this pid itself.
            self._popen.returncode = code
        self.exited = True
        self.returncode = code
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if not self._done.done():
            self._done.set_result(code)
        if self._on_exit is not None:
            self._on_exit(self, code)

    async def wait(self) -> int | None:
        """The returncode (negative: killed by that signal; None: adopted, unknown)."""
        return await asyncio.shield(self._done)

    # --- signals -----------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the process and everything in its scope."""
        self.scope.kill()

    async def terminate(self, timeout: float) -> int | None:
        """SIGTERM the scope, SIGKILL it after ``timeout`` seconds, wait for the exit.

        Whatever is left of the scope is killed when the process exits (``_reap``).
        """
        if not self.exited:
            self.scope.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.scope.signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.wait()
        if not self.exited:
            self.scope.kill()
        return await self.wait()

    def detach(self) -> None:
        """Stop watching and leave the process running; a thread collects our child when it exits.

        For a caller that leaves a process behind and lives on: no pidfd and no
        zombie stay with it (the process is not ours to wait for if we did not start it).
        """
        self.close()
        popen = self._popen
        if popen is not None and not self.exited:
            threading.Thread(target=popen.wait, name=f"reap {self.pid}", daemon=True).start()

    def close(self) -> None:
        """Stop watching (the process itself is left alone)."""
        if self._pidfd is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if not self._done.done():
            self._done.cancel()


def pidfd_supported() -> bool:
    """True when this kernel has pidfd_open (Linux 5.3+)."""
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return False
        raise
    os.close(fd)
    return True
