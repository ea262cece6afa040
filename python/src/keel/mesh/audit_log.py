"""The shell around :class:`~keel.mesh.audit.MessageBatches`: records their entries on time.

:class:`~keel.mesh.outbound.Outbound` and :class:`~keel.mesh.inbox.Inbox`
tell it each message's stage; it records a batch's entry when the batch is
full, when its window is over (a timer on the event loop) and, for what is
still open, when the node stops (:meth:`AuditLog.close`, before the
recorder closes: a SIGTERM loses nothing). A SIGKILL loses the open
batches with the recorder's unwritten queue: at most :data:`~keel.mesh.audit.WINDOW`
of events more than before batching.
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
        self._timer: asyncio.TimerHandle | None = None

    def add(self, stage: str, items: Iterable[Message], reason: str | None = None) -> None:
        """Messages ``(id, peer, topic, room, size)`` reached ``stage``.

        ``sent``, ``delivered``, ``dead-letter`` (with its ``reason``) or ``received``.
        """
        done = self.batches.add_many(stage, items, reason)
        if done:
            self._record(done)
        if self._timer is None:
            self._arm()

    def close(self) -> None:
        """Record every open batch now (the node stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._record(self.batches.flush())

    def _arm(self) -> None:
        deadline = self.batches.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self.batches.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        self._record(self.batches.due())
        self._arm()

    def _record(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.record(entry.kind, entry.subject, entry.data)
