"""Messages on one topic, pushed by the daemon as they arrive (a binary stream)."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from keel.errors import ApiError, BadRequest, Unavailable
from keel.mesh import local
from keel.mesh.client.messages import Received, Returned, received
from keel.mesh.client.transport import Stream


class _Ready(NamedTuple):
    receipt: int
    message: Received


class Subscription:
    """Messages on ``topic`` as they arrive, on a connection of its own.

    ``recv`` acknowledges what the previous ``recv`` returned, so (as with
    :meth:`~keel.mesh.client.MeshClient.recv`) every message is returned
    once in the client's life, across daemon restarts (``returned`` is the
    client's memory of what it returned); what was not acknowledged when the
    connection ended is handed out again. A broken connection raises
    :class:`~keel.errors.Unavailable` from ``recv``; the next ``recv``
    connects again.
    """

    def __init__(
        self,
        path: Path,
        topic: str,
        *,
        timeout: float,
        returned: Returned,
        max_unacked: int = 1000,
        max_bytes: int = 16 << 20,
    ) -> None:
        self.path = path
        self.topic = topic
        self.timeout = timeout
        self.returned = returned
        self.max_unacked = max_unacked
        self.max_bytes = max_bytes
        self._stream: Stream | None = None
        self._unacked: list[int] = []
        self._ready: collections.deque[_Ready] = collections.deque()

    def _connect(self) -> Stream:
        if self._stream is not None:
            return self._stream
        # receipts of messages handed over from memory died with the old connection
        self._unacked = [r for r in self._unacked if r < local.STREAM_RECEIPTS]
        try:
            request = local.encode_subscribe(self.topic, self.max_unacked, self.max_bytes)
        except (local.LocalStreamError, UnicodeEncodeError, ValueError) as exc:
            raise BadRequest(f"cannot subscribe to topic {self.topic!r}: {exc}") from None
        stream = Stream(self.path, self.timeout)
        stream.write(request, "subscribe")
        while True:  # the daemon answers with a DELIVER frame: subscribed
            got = stream.frame(None, "subscribe")
            if got is not None and got[0] == local.Kind.DELIVER:
                self._take(stream, got[1])
                break
        self._stream = stream
        return stream

    def ack(self) -> None:
        """Acknowledge what ``recv`` returned so far (the next ``recv`` does it too)."""
        if self._unacked:
            stream = self._connect()
            try:
                stream.write(local.encode_ack(self._unacked), "ack")
            except ApiError:
                self._stream = None
                raise
            self._unacked = []

    def recv(self, *, wait: float = 0.0, max: int | None = None) -> list[Received]:
        """The messages that arrived (up to ``max``), waiting up to ``wait`` s for one."""
        self.ack()
        stream = self._connect()
        deadline = time.monotonic() + wait
        try:
            # what came already (whole frames), or the first that comes within ``wait``
            while not self._ready or stream.buffered():
                got = stream.frame(0.0 if self._ready else _left(deadline), "recv")
                if got is None:
                    break
                kind, body = got
                if kind == local.Kind.DELIVER:
                    self._take(stream, body)
        except ApiError:
            self._stream = None
            raise
        ready = self._ready
        count = len(ready) if max is None else min(max, len(ready))
        if count == len(ready):
            out, self._ready = ready, collections.deque()
        else:
            out = collections.deque(ready.popleft() for _ in range(count))
        self._unacked += [item.receipt for item in out]
        return [item.message for item in out]

    def _take(self, stream: Stream, body: memoryview) -> None:
        try:
            delivered = local.decode_deliver(body)
        except local.LocalStreamError as exc:
            stream.close()
            self._stream = None
            raise Unavailable(f"{self.path}: malformed frame from the daemon: {exc}") from exc
        fresh = self.returned.first_times([(item.sender, item.id) for item in delivered])
        topic, ready = self.topic, self._ready
        for item, first in zip(delivered, fresh, strict=True):
            if not first:
                self._unacked.append(item.receipt)  # handed out again: acknowledge, skip
                continue
            ready.append(_Ready(item.receipt, received(item, topic)))

    def __iter__(self) -> Iterator[Received]:
        while True:
            yield from self.recv(wait=30.0)

    def close(self) -> None:
        """Acknowledge what was returned, then hang up (the rest is handed out again)."""
        stream = self._stream
        try:
            if stream is not None:
                self.ack()
                stream.finish()
        finally:
            if stream is not None:
                stream.close()
            self._stream = None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
