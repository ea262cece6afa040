"""The shell around :class:`~keel.mesh.audit.MessageBatches`: records their entries on time.

:class:`~keel.mesh.outbound.Outbound` and :class:`~keel.mesh.inbox.Inbox`
tell it each message's stage; it records the entries of the batches whose
window is over on a timer of the event loop, with those of the batches that
filled up meanwhile (so the recorder writes them in one transaction: a few a
second, whatever the rate), and every batch when the node stops
(:meth:`AuditLog.close`, before the recorder closes: a SIGTERM loses
nothing). A SIGKILL loses the batches not yet recorded with the recorder's
unwritten queue: at most :data:`~keel.mesh.audit.WINDOW` of events more than
before batching.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from keel.mesh.audit import Entry, Message, MessageBatches

Record = Callable[[str, str, Mapping[str, Any]], None]


class AuditLog:
    def __init__(self, batches: MessageBatches, record: Record) -> None:
        self.batches = batches
        self.record = record
        self._ready: list[Entry] = []  # full batches, recorded together on the next tick
        self._ready_since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, stage: str, items: Iterable[Message], reason: str | None = None) -> None:
        """Messages ``(id, peer, topic, room, size, agent, to)`` reached ``stage``.

        ``sent``, ``delivered``, ``dead-letter`` (with its ``reason``) or ``received``.
        """
        done = self.batches.add_many(stage, items, reason)
        if done:
            if not self._ready:
                self._ready_since = self.batches.clock()
            self._ready += done
        if self._timer is None:
            self._arm()

    def close(self) -> None:
        """Record every batch now, full or not (the node stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._record(self._ready + self.batches.flush())
        self._ready = []

    def _arm(self) -> None:
        """Wake when the oldest batch's window is over (one tick records all that is ready)."""
        deadline = self.batches.next_deadline()
        if self._ready:
            due = self._ready_since + self.batches.window
            deadline = due if deadline is None else min(deadline, due)
        if deadline is not None:
            delay = max(0.0, deadline - self.batches.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        ready, self._ready = self._ready, []
        self._record(ready + self.batches.due())
        self._arm()

    def _record(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.record(entry.kind, entry.subject, entry.data)
