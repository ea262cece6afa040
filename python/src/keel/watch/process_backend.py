"""The process backend: agents as plain argv commands, for dev mode and hosts without systemd.

Each agent runs in its own session, and in a scope that holds every process it
starts (a cgroup of its own when watch can have one, else its process group and
a marker in the environment: :mod:`keel.watch.scopes`). Its exit is seen at
once through a pidfd (:mod:`keel.watch.children`), and whatever is left of its
scope is killed with it. Stopping sends SIGTERM to the scope and SIGKILL after
the agent's ``stop_timeout``.

The pids of running agents (with their start times, against pid reuse) are
kept in ``state_file``. A watch that was killed leaves its agents running; the
next one reads the file and adopts those that are still the same processes
with the same command, instead of starting second copies. A watch that is
stopped on purpose stops its agents (this backend is their only supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from keel.errors import KeelError
from keel.watch.backend import Events, Found
from keel.watch.children import (
    Child,
    describe_status,
    process_start_ticks,
    seconds_since_start,
)
from keel.watch.config import AgentConfig
from keel.watch.scopes import Cgroup, CgroupTree, Marked, ProcessGroup, Scope

log = logging.getLogger("keel.watch.process")


class ProcessBackend:
    def __init__(
        self,
        agents: Mapping[str, AgentConfig],
        *,
        state_file: Path,
        stop_agents_on_close: bool = True,
        cgroups: bool | None = None,
    ) -> None:
        self.agents = dict(agents)
        self.state_file = state_file
        self.stop_agents_on_close = stop_agents_on_close
        self.use_cgroups = cgroups  # None: when watch can have them; False: never; True: must
        self.cgroups: CgroupTree | None = None
        self._events: Events | None = None
        self._children: dict[str, Child] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._previous: dict[str, Any] = {}

    async def open(self, events: Events) -> None:
        self._events = events
        self._previous = self._load_state()
        if self.use_cgroups is False:
            log.info("agents tracked by process group and environment marker (no cgroups asked)")
            return
        self.cgroups, reason = CgroupTree.create()
        if self.cgroups is not None:
            log.info("%s", reason)
        elif self.use_cgroups:
            raise KeelError(f"cannot run agents in cgroups: {reason}")
        else:
            log.info(
                "no cgroups for agents (%s): tracking each by its process group and a marker "
                "in its environment; a process that drops both escapes (docs/watch.md)",
                reason,
            )

    def _new_scope(self, name: str) -> Scope:
        if self.cgroups is not None:
            return self.cgroups.agent(name)
        return Marked.new(name)

    def _recorded_scope(self, entry: dict[str, Any], pid: int) -> Scope:
        """The scope a previous watch ran ``pid`` in, as far as it can be found again."""
        cgroup, marker = entry.get("cgroup"), entry.get("marker")
        if isinstance(cgroup, str) and self.cgroups is not None:
            found = self.cgroups.adopt(cgroup, pid)
            if found is not None:
                return found
        if isinstance(marker, str):
            return Marked(pid, marker)
        try:
            return ProcessGroup(os.getpgid(pid))
        except ProcessLookupError:
            return ProcessGroup(pid)

    # --- adoption ----------------------------------------------------------------------

    async def find(self, name: str) -> Found | None:
        entry = self._previous.pop(name, None)
        if not isinstance(entry, dict):
            return None
        pid, ticks, argv = entry.get("pid"), entry.get("start_ticks"), entry.get("argv")
        if not isinstance(pid, int) or not isinstance(ticks, int) or pid <= 1:
            return None
        if process_start_ticks(pid) != ticks:
            return None  # gone, or the pid now belongs to someone else
        agent = self.agents[name]
        scope = self._recorded_scope(entry, pid)
        if argv != list(agent.command):
            log.info("agent %s: command changed since pid %d started; replacing it", name, pid)
            old = Child.adopt(pid, scope=scope)
            await old.terminate(agent.stop_timeout)
            self._forget(scope)
            return None
        child = Child.adopt(pid, on_exit=lambda c, code: self._exited(name, c, code), scope=scope)
        if child.exited:
            return None
        self._children[name] = child
        log.info("agent %s: adopted pid %d, left running by a previous watch", name, pid)
        return Found(pid, time.monotonic() - seconds_since_start(ticks))

    # --- start and stop ----------------------------------------------------------------

    def start(self, name: str) -> None:
        events = self._require_events()
        agent = self.agents[name]
        loop = asyncio.get_running_loop()
        old = self._children.get(name)
        if old is not None and not old.exited:
            # Never two copies: the policy only starts what it saw exit.
            log.warning("agent %s: start requested while pid %d runs; killing it", name, old.pid)
            old.kill()
        env = dict(os.environ)
        env.update(agent.environment)
        env["KEEL_AGENT"] = name
        output: IO[bytes] | None = None
        try:
            if agent.log is not None:
                agent.log.parent.mkdir(parents=True, exist_ok=True)
                output = agent.log.open("ab")
            child = Child.spawn(
                agent.command,
                env=env,
                cwd=agent.working_directory,
                stdout=output,
                stderr=output,
                on_exit=lambda c, code: self._exited(name, c, code),
                scope=self._new_scope(name),
            )
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            target = exc.filename or agent.command[0]
            loop.call_soon(events.agent_exited, name, f"failed to start: {target}: {reason}")
            return
        finally:
            if output is not None:
                output.close()
        self._children[name] = child
        self._save_state()
        if not child.exited:
            loop.call_soon(events.agent_started, name, child.pid)

    def stop(self, name: str, reason: str, *, timeout: float) -> None:
        child = self._children.get(name)
        if child is None or child.exited:
            return
        log.info("agent %s: stopping pid %d: %s", name, child.pid, reason)
        self._spawn(child.terminate(timeout))

    def hold(self, name: str) -> None:
        """Nothing to do: only watch starts these processes."""

    def _exited(self, name: str, child: Child, code: int | None) -> None:
        self._forget(child.scope)
        if self._children.get(name) is not child:
            return
        del self._children[name]
        self._save_state()
        self._require_events().agent_exited(name, describe_status(code))

    def _forget(self, scope: Scope) -> None:
        """An adopted agent's cgroup, made by an earlier watch, goes when it is empty."""
        if isinstance(scope, Cgroup) and (
            self.cgroups is None or scope.path.parent != self.cgroups.path
        ):

            async def remove() -> None:
                if await scope.remove():
                    with contextlib.suppress(OSError):
                        scope.path.parent.rmdir()  # that watch's tree, if it is empty now

            self._spawn(remove())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self.stop_agents_on_close:
            children = list(self._children.items())
            self._children.clear()
            await asyncio.gather(
                *(child.terminate(self.agents[name].stop_timeout) for name, child in children),
                return_exceptions=True,
            )
        else:
            for child in self._children.values():
                child.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cgroups is not None and self.stop_agents_on_close:
            await self.cgroups.remove()
        self._save_state()

    # --- the state file -------------------------------------------------------------------

    def _require_events(self) -> Events:
        if self._events is None:
            raise RuntimeError("ProcessBackend.open() was not called")
        return self._events

    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.state_file, exc)
            return {}
        agents = data.get("agents") if isinstance(data, dict) else None
        return dict(agents) if isinstance(agents, dict) else {}

    def _save_state(self) -> None:
        entries = {}
        for name, child in self._children.items():
            ticks = process_start_ticks(child.pid)
            if ticks is None or child.exited:
                continue
            entries[name] = {
                "pid": child.pid,
                "start_ticks": ticks,
                "argv": list(self.agents[name].command),
                **child.scope.record(),
            }
        text = json.dumps({"agents": entries}, sort_keys=True)
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.state_file.with_name(self.state_file.name + ".tmp")
            temporary.write_text(text, encoding="utf-8")
            temporary.replace(self.state_file)
        except OSError as exc:
            log.warning("cannot write state file %s: %s", self.state_file, exc)
        with contextlib.suppress(OSError):
            os.chmod(self.state_file, 0o600)
