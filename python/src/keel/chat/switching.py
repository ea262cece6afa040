"""``/switch TARGET``: a safe switch of this host from the chat, through root's template unit.

keel chat runs as ``keel-chat`` with no capabilities; it never becomes root.
What it may do is start ``keel-switch@INSTANCE.service`` (one polkit rule),
whose instance names a target root declared (``targets`` in
``safeswitch.json``) and binds the request to the running system and the
target's store path as the person was shown them
(:mod:`keel.safeswitch.requests`). Root checks all of it again and runs the
switch behind safeswitch's gate; the chat reads the outcome from the
request's result file (``RUN_DIR/requests/REQUEST.json``, the ``keel``
group's) and the state file, both of which it may read and neither of which
it may write.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keel.chat.verbs import StateChanged, VerbError
from keel.errors import KeelError
from keel.safeswitch import requests, targets
from keel.safeswitch.config import SafeswitchConfig
from keel.safeswitch.generations import resolve_system
from keel.safeswitch.report import short
from keel.safeswitch.state import StateFile
from keel.safeswitch.targets import Target

MARGIN = 120.0  # seconds beyond safeswitch's own limits before the chat stops waiting


@dataclass(frozen=True)
class SwitchView:
    """A target as a person is asked to confirm it: from what, to what."""

    target: Target
    running: str  # the running system's store path
    wanted: str  # the target's store path

    @property
    def fingerprint(self) -> str:
        """What the confirmation is bound to: both store paths (their digests)."""
        return f"{requests.digest(self.running)}:{requests.digest(self.wanted)}"

    def describe(self) -> str:
        return (
            f"running {short(self.running)}; {self.target.name} ({self.target.describe()}) is "
            f"{self.wanted}"
        )


@dataclass(frozen=True)
class Listing:
    running: str | None
    in_progress: str | None  # the switch in progress, described
    targets: list[tuple[Target, str | None, str | None]]  # (target, store path, problem)


class Switching:
    """The switch verbs of this host's chat: look a target up, ask root, wait for the outcome."""

    def __init__(
        self,
        config: SafeswitchConfig,
        starter: requests.Starter,
        *,
        poll: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.starter = starter
        self.results = requests.Results(config.run_dir)
        self.poll = poll
        self.clock = clock

    def _running(self) -> str:
        try:
            return resolve_system(self.config.current)
        except KeelError as exc:
            raise VerbError(f"the running system is unknown: {exc}") from None

    def _in_progress(self) -> str | None:
        try:
            state = StateFile(self.config.run_dir).read()
        except KeelError as exc:
            return f"the switch state cannot be read ({exc})"
        if state is None or not state.in_progress:
            return None
        return f"switch {state.id} to {short(state.new)} is {state.phase.value}"

    def listing(self) -> Listing:
        rows: list[tuple[Target, str | None, str | None]] = []
        for target in self.config.targets.values():
            try:
                rows.append((target, targets.resolve(target, self.config.current), None))
            except targets.Unavailable as exc:
                rows.append((target, None, str(exc)))
        running = None
        if self.config.current.exists():
            running = os.path.realpath(self.config.current)
        return Listing(running, self._in_progress(), rows)

    def view(self, name: str) -> SwitchView:
        """The target ``name`` now; :class:`VerbError` when it cannot be offered."""
        target = self.config.targets.get(name)
        if target is None:
            declared = ", ".join(sorted(self.config.targets)) or "none"
            raise VerbError(f"no target named {name} is declared here (targets: {declared})")
        busy = self._in_progress()
        if busy is not None:
            raise VerbError(f"a switch is under way ({busy}); wait for its outcome")
        running = self._running()
        try:
            wanted = targets.resolve(target, self.config.current)
        except targets.Unavailable as exc:
            raise VerbError(f"{name} ({target.describe()}) is not available: {exc}") from None
        if wanted == running:
            raise VerbError(f"{name} is what runs already ({short(running)})")
        return SwitchView(target, running, wanted)

    def limit(self) -> float:
        """How long a switch may take, at most, before the chat stops waiting."""
        limits = self.config.limits
        return limits.deadline + limits.commit_timeout + limits.rollback_timeout + MARGIN

    async def switch(self, name: str, *, expect: str, request: str) -> dict[str, Any]:
        """Ask root to switch to ``name`` if it is still what was shown; the request's result."""
        try:
            view = self.view(name)
        except VerbError as exc:  # it was offered: what changed since is why nothing is done
            raise StateChanged(str(exc)) from None
        if view.fingerprint != expect:
            raise StateChanged(f"{view.describe()}, which is not what you confirmed")
        old, new = expect.split(":")
        instance = requests.Instance(name, old, new, request)
        try:
            await self.starter.start(instance)
            return await requests.wait_for_result(
                instance, self.results, self.starter, limit=self.limit(), poll=self.poll,
                clock=self.clock,
            )  # fmt: skip
        except KeelError as exc:
            raise VerbError(str(exc)) from None
