"""Where the process backend keeps an agent's processes, so that stopping it stops all of them.

A process group is not enough: an agent's child may call ``setsid`` (or
double-fork like a daemon) and leave it, and then neither ``killpg`` nor the
agent's own exit reaches it. So each agent runs in a :class:`Scope`:

- :class:`Cgroup`: a child cgroup (cgroup v2) per agent under watch's own,
  when one can be had (a cgroup2 file system, and a cgroup watch may create
  children in and move processes between: root, or a delegated subtree such as
  ``systemd-run --user --scope -p Delegate=yes``). Every process an agent
  starts stays in it whatever it does, short of being moved out by someone
  allowed to write cgroups. ``cgroup.kill`` (Linux 5.14+) kills them all at
  once, forks in flight included; without it, watch kills what
  ``cgroup.procs`` lists until it is empty.
- :class:`Marked`: otherwise, the agent's process group plus every process
  whose environment carries ``KEEL_AGENT_INSTANCE=<token>`` (inherited by
  everything the agent starts, found by reading ``/proc/PID/environ``). A
  process that starts with a fresh environment (``env -i``, ``sudo``,
  ``su -``, daemons that clean theirs) and left the process group escapes it,
  as does one watch may not read (another user's, or a setuid program's).
- :class:`ProcessGroup`: just the process group (exec probes).

Watch places a new process in a cgroup race-free by moving itself into the
agent's cgroup for the instant of the fork (the child is born there, before
it can fork anything) and back out again; it never kills a cgroup it sits in.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("keel.watch.process")

MARKER = "KEEL_AGENT_INSTANCE"
KILL_ROUNDS = 20  # without cgroup.kill: rounds of "list, SIGKILL" before giving up


class Scope(Protocol):
    def attach(self, leader: int) -> None:
        """The scope's first process was started (in its own session and process group)."""

    def environment(self) -> dict[str, str]:
        """Variables every process of the agent is started with."""

    def hosting(self) -> contextlib.AbstractContextManager[None]:
        """Within this, a process that is started belongs to the scope from birth."""

    def signal(self, sig: int) -> int:
        """Send ``sig`` to every process of the scope; how many there were."""

    def kill(self) -> None:
        """SIGKILL every process of the scope (as atomically as the system allows)."""

    def record(self) -> dict[str, Any]:
        """What the state file keeps, to find the scope again after watch restarts."""

    def describe(self) -> str: ...


def _send(pids: list[int], sig: int) -> int:
    sent = 0
    for pid in pids:
        if pid == os.getpid():
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            sent += 1
    return sent


# --- process groups ---------------------------------------------------------------------


class ProcessGroup:
    def __init__(self, pgid: int) -> None:
        self.pgid = pgid

    def attach(self, leader: int) -> None:
        self.pgid = leader

    def environment(self) -> dict[str, str]:
        return {}

    def hosting(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def signal(self, sig: int) -> int:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            return 0
        return 1

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def record(self) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return f"process group {self.pgid}"


# --- marked processes -------------------------------------------------------------------


def marked_pids(token: str) -> list[int]:
    """Processes whose environment holds ``KEEL_AGENT_INSTANCE=token`` (those watch may read)."""
    needle = f"\0{MARKER}={token}\0".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = b"\0" + f.read() + b"\0"
        except OSError:
            continue  # gone, or not ours to read
        if needle in environ:
            found.append(int(entry.name))
    return found


class Marked:
    """The agent's process group and every process carrying its marker."""

    def __init__(self, pgid: int | None, token: str) -> None:
        self.pgid = pgid  # set once the leader runs
        self.token = token

    @classmethod
    def new(cls, agent: str) -> Marked:
        return cls(None, f"{agent}.{secrets.token_hex(8)}")

    def attach(self, leader: int) -> None:
        self.pgid = leader

    def environment(self) -> dict[str, str]:
        return {MARKER: self.token}

    def hosting(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def signal(self, sig: int) -> int:
        sent = ProcessGroup(self.pgid).signal(sig) if self.pgid is not None else 0
        return sent + _send(marked_pids(self.token), sig)

    def kill(self) -> None:
        if self.pgid is not None:
            ProcessGroup(self.pgid).kill()
        for _ in range(KILL_ROUNDS):  # a forking process may add one between a scan and a kill
            if not _send(marked_pids(self.token), signal.SIGKILL):
                return
        log.warning("processes marked %s=%s keep appearing; giving up", MARKER, self.token)

    def record(self) -> dict[str, Any]:
        return {"marker": self.token}

    def describe(self) -> str:
        return f"process group {self.pgid} and processes marked {MARKER}={self.token}"


# --- cgroups ----------------------------------------------------------------------------


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``.../unified``)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        separator = fields.index("-")
        if len(fields) > separator + 1 and fields[separator + 1] == "cgroup2":
            return Path(fields[4].replace("\\040", " "))
    return None


def cgroup_of(pid: int | str = "self") -> str | None:
    """The cgroup v2 path of a process (``/user.slice/...``), or None."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return None


class Cgroup:
    """One agent's cgroup: ``<watch's cgroup>/keel-watch.<pid>.<hex>/<agent>``."""

    def __init__(self, path: Path, *, mount: Path, home: Path) -> None:
        self.path = path
        self.mount = mount  # of the cgroup2 hierarchy
        self.home = home  # watch's own cgroup, where it returns after each fork

    def attach(self, leader: int) -> None:
        pass

    def environment(self) -> dict[str, str]:
        return {}

    @contextlib.contextmanager
    def hosting(self) -> Iterator[None]:
        self.path.mkdir(exist_ok=True)
        (self.path / "cgroup.procs").write_text("0")  # "0": the writing process, all threads
        try:
            yield
        finally:
            (self.home / "cgroup.procs").write_text("0")

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(pid) for pid in text.split()]

    def signal(self, sig: int) -> int:
        return _send(self.pids(), sig)

    def kill(self) -> None:
        if self._contains_watch():
            # Only if moving back out failed: never kill ourselves with the agent.
            log.error("watch itself is in %s; killing the agent's processes one by one", self.path)
        elif _write_quietly(self.path / "cgroup.kill", "1"):
            return
        for _ in range(KILL_ROUNDS):
            if not self.signal(signal.SIGKILL):
                return
        log.warning("processes keep appearing in %s; giving up", self.path)

    def empty(self) -> bool:
        try:
            events = (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return True
        return "populated 0" in events.splitlines()

    async def remove(self, *, timeout: float = 5.0) -> bool:
        """Remove the cgroup once the processes killed in it are gone; False if they stay."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while not self.empty():
            if time.monotonic() > deadline:
                log.warning("%s is not empty after %gs; left in place", self.path, timeout)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        _rmdir_quietly(self.path)
        return True

    def record(self) -> dict[str, Any]:
        return {"cgroup": str(self.path)}

    def describe(self) -> str:
        return f"cgroup {self.path}"

    def _contains_watch(self) -> bool:
        own = cgroup_of()
        if own is None:
            return False
        watch = self.mount / own.lstrip("/")
        return watch == self.path or self.path in watch.parents


def _write_quietly(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
    except OSError:
        return False
    return True


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            log.warning("cannot remove %s: %s", path, exc.strerror)


class CgroupTree:
    """This watch's cgroup for its agents: one child per agent, made as they start."""

    def __init__(self, path: Path, *, mount: Path, home: Path) -> None:
        self.path = path
        self.mount = mount
        self.home = home

    @classmethod
    def create(cls) -> tuple[CgroupTree | None, str]:
        """Make this watch's tree, or say why there is none (the reason is for the log)."""
        mount = cgroup2_mount()
        if mount is None:
            return None, "no cgroup2 file system is mounted"
        own = cgroup_of()
        if own is None:
            return None, "watch is in no cgroup v2 hierarchy"
        home = mount / own.lstrip("/")
        if not (home / "cgroup.procs").exists():
            return None, f"watch's cgroup {home} is not visible here"
        path = home / f"keel-watch.{os.getpid()}.{secrets.token_hex(3)}"
        try:
            path.mkdir()
            # A round trip proves what a start needs: moving ourselves in and out.
            (path / "cgroup.procs").write_text("0")
            (home / "cgroup.procs").write_text("0")
        except OSError as exc:
            _rmdir_quietly(path)
            return None, f"cannot use a child of {home}: {exc.strerror or exc}"
        tree = cls(path, mount=mount, home=home)
        tree.sweep()
        return tree, f"agents run in cgroups under {path}"

    def agent(self, name: str) -> Cgroup:
        return self._cgroup(self.path / name)

    def adopt(self, path: str, pid: int) -> Cgroup | None:
        """The cgroup a previous watch recorded, if ``pid`` is in it still."""
        own = cgroup_of(pid)
        if own is None or self.mount / own.lstrip("/") != Path(path):
            return None
        return self._cgroup(Path(path))

    async def remove(self) -> None:
        for child in list(self._children()):
            await self._cgroup(child).remove()
        _rmdir_quietly(self.path)

    def _cgroup(self, path: Path) -> Cgroup:
        return Cgroup(path, mount=self.mount, home=self.home)

    def sweep(self) -> None:
        """Remove what dead watches left here: empty agent cgroups and their trees."""
        for tree in self.home.glob("keel-watch.*"):
            pid = tree.name.split(".")[1] if tree.name.count(".") == 2 else ""
            if tree == self.path or not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            for child in (c for c in tree.iterdir() if c.is_dir()):
                if self._cgroup(child).empty():
                    _rmdir_quietly(child)
            _rmdir_quietly(tree)

    def _children(self) -> Iterator[Path]:
        with contextlib.suppress(FileNotFoundError):
            yield from (child for child in self.path.iterdir() if child.is_dir())
