"""Processes a test starts, ended when the test ends, whatever happened in it.

Two layers (see the README's "Processes"):

- :class:`Processes` (the ``processes`` fixture): ``processes.popen(argv, ...)``
  is :class:`subprocess.Popen` plus a new session (so its whole process group
  can be signalled), ``PR_SET_PDEATHSIG`` = SIGKILL (so it dies with pytest,
  even a pytest killed with SIGKILL), and a finalizer that stops every process
  group it started (SIGTERM, SIGKILL after a grace period) when the test ends,
  pass or fail.
- :func:`children` and :func:`kill_trees`: the safety net the plugin runs after
  every test, for processes a test started with a bare ``subprocess.Popen``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.harness.common import terminate

_PR_SET_PDEATHSIG = 1
# Loaded here, in the parent: the child between fork and exec only calls it.
_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """In a child before ``exec``: SIGKILL it when the thread that forked it ends."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Processes:
    """Starts processes for one test and stops them all at its end."""

    def __init__(self, grace: float = 5.0) -> None:
        self.grace = grace
        self.started: list[subprocess.Popen[Any]] = []

    def popen(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        preexec_fn: Callable[[], object] | None = None,
        **options: Any,
    ) -> subprocess.Popen[Any]:
        """:class:`subprocess.Popen` in a new session, dying with pytest, stopped at test end.

        ``preexec_fn`` runs in the child after the parent-death signal is set
        (e.g. to start it with SIGINT ignored, as a background job would).
        """

        def setup() -> None:
            die_with_parent()
            if preexec_fn is not None:
                preexec_fn()

        options["start_new_session"] = True  # stop_all() signals the whole group
        process = subprocess.Popen(list(argv), preexec_fn=setup, **options)  # noqa: PLW1509
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        """SIGTERM every process group started, SIGKILL what is left after the grace."""
        for process in reversed(self.started):
            try:
                terminate(process, grace=self.grace)
            finally:
                for stream in (process.stdin, process.stdout, process.stderr):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()


def _direct_children(pid: int) -> set[int]:
    """Children of ``pid`` from ``/proc/PID/task/*/children``, zombies left out."""
    found: set[int] = set()
    try:
        tasks = list(os.scandir(f"/proc/{pid}/task"))
    except OSError:
        return found
    for task in tasks:
        try:
            found.update(int(child) for child in Path(task.path, "children").read_text().split())
        except OSError:
            continue
    return {child for child in found if _alive(child)}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int | None = None) -> set[int]:
    """The live child processes of ``pid`` (default: this process)."""
    return _direct_children(os.getpid() if pid is None else pid)


def kill_trees(roots: Iterable[int]) -> list[str]:
    """SIGKILL each process in ``roots`` and all its descendants; what was killed, named."""
    doomed: list[int] = []
    pending = list(roots)
    while pending:
        pid = pending.pop()
        doomed.append(pid)
        pending.extend(_direct_children(pid))
    own = _direct_children(os.getpid())  # before the kill: zombies are not listed
    named = []
    for pid in doomed:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        named.append(f"{pid} ({command.decode(errors='replace')[:120]})")
    # Reap the ones that are this process's own children, or they stay zombies
    # that later tests counting children would find.
    for pid in doomed:
        if pid in own:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return named


class Lines:
    """Lines from a child's binary pipe, each waited for with a deadline (never forever).

    Reads the file descriptor itself, so nothing sits unseen in a Python
    buffer while ``select`` says there is nothing to read.
    """

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        self._buffer = b""

    def next(self, timeout: float = 60.0) -> str:
        """The next line without its newline; :class:`EOFError` if the pipe closed first."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line within {timeout:g} s (got {self._buffer[-200:]!r})")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise EOFError(f"the pipe closed (after {self._buffer[-200:]!r})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()
