"""Pipelined sending on one binary stream, riding out back-pressure and restarts."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from keel.errors import ApiError, BadRequest, Refused, Unavailable
from keel.mesh import local
from keel.mesh.client.messages import check_message, check_size, ttl_ms
from keel.mesh.client.transport import Retrying, Stream
from keel.mesh.ids import new_message_id

SEND_BATCH: Final = 1000  # messages per SEND frame
SEND_BATCH_BYTES: Final = 1 << 20
SEND_WINDOW: Final = 4  # SEND frames in flight
CHECKED_PAIRS: Final = 4096  # (recipient, topic) pairs remembered as well-formed


class SendRefused(Refused):
    """The daemon refused a batch (a full outbox, a bad recipient...); ``ids`` were not queued.

    Also raised, naming the ids that were never confirmed, when the
    connection broke and could not be made again in time: sending those
    again with the same ids is safe (each is delivered once).
    """

    def __init__(self, message: str, ids: Sequence[str], *, busy: bool = False) -> None:
        super().__init__(message)
        self.ids = list(ids)
        self.busy = busy  # back-pressure: the same messages may be sent again later


@dataclass
class _Batch:
    ids: list[str] = field(default_factory=list)
    entries: list[bytes] = field(default_factory=list)  # SEND entries' heads and payloads
    size: int = 0
    request: int = 0
    to_agents: bool = False  # a SEND_TO frame (some entry is for an agent)


class Sender:
    """Batches of messages, several in flight on one stream (its own connection).

    ``send`` returns the id at once; the message is durably queued once the
    daemon confirmed its batch, which ``flush`` (and leaving the ``with``
    block) waits for. With ``retry`` > 0 the sender rides out back-pressure
    (a full outbox) and a daemon restart for that many seconds, sending the
    same batches (same ids: delivered once) again. Otherwise, or past that, a
    refused batch raises :class:`SendRefused` (from ``send`` or ``flush``)
    naming the ids that were not queued; batches before and after it are
    unaffected.
    """

    def __init__(
        self,
        path: Path,
        *,
        timeout: float,
        ttl: float | None = None,
        retry: float = 0.0,
        window: int = SEND_WINDOW,
        batch: int = SEND_BATCH,
        batch_bytes: int = SEND_BATCH_BYTES,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.ttl_ms = ttl_ms(ttl)
        self.retrying = Retrying(retry)
        self.window = max(1, window)
        self.batch = max(1, batch)
        self.batch_bytes = batch_bytes
        self._stream: Stream | None = None
        self._checked: dict[tuple[str, str], tuple[str | None, str]] = {}  # -> (agent, node)
        self._next = _Batch()
        self._in_flight: collections.deque[_Batch] = collections.deque()

    def send(self, to: str, topic: str, data: bytes, *, id: str | None = None) -> str:
        address = self._checked.get((to, topic))  # the same few pairs, again and again
        if address is None:
            address = check_message(to, topic, b"")
            if len(self._checked) >= CHECKED_PAIRS:
                self._checked.clear()
            self._checked[to, topic] = address
        check_size(data)
        agent, node = address
        if agent is not None and not self._next.to_agents:
            self._write_batch()  # what is batched goes as SEND; this and the rest as SEND_TO
            self._next.to_agents = True
        message_id = id or new_message_id()
        entry = local.SendEntry(message_id, node, topic, data, self.ttl_ms, agent)
        try:
            self._next.entries += (
                local.send_entry_head(entry, to_agents=self._next.to_agents),
                data,
            )
        except (local.LocalStreamError, UnicodeEncodeError, ValueError) as exc:
            raise BadRequest(f"cannot send to {to!r} on topic {topic!r}: {exc}") from None
        self._next.ids.append(message_id)
        self._next.size += len(data)
        if len(self._next.ids) >= self.batch or self._next.size >= self.batch_bytes:
            self._write_batch()
        return message_id

    def _write_batch(self) -> None:
        if not self._next.ids:
            return
        batch, self._next = self._next, _Batch()
        self._in_flight.append(batch)
        self._transmit(batch)
        while len(self._in_flight) >= self.window:
            self._confirm()

    def _transmit(self, batch: _Batch) -> None:
        """Write ``batch`` (a new request number); a broken connection is ``_broken``'s."""
        try:
            if self._stream is None:
                self._stream = Stream(self.path, self.timeout)
            self._stream.request += 1
            batch.request = self._stream.request
            self._stream.write_parts(
                local.encode_send_parts(batch.request, batch.entries, to_agents=batch.to_agents),
                "send",
            )
        except Unavailable as exc:
            self._broken(exc)

    def _confirm(self) -> None:
        """Wait for the oldest batch's SENT (sending batches again while retrying)."""
        if self._stream is None:
            self._broken(Unavailable(f"{self.path}: not connected"))
            return
        try:
            request, status, error = self._stream.sent("send")
        except Unavailable as exc:
            self._broken(exc)
            return
        batch = self._in_flight.popleft()
        if request != batch.request:
            self._in_flight.appendleft(batch)
            self._broken(
                Unavailable(f"{self.path}: the daemon confirmed {request}, not {batch.request}")
            )
            return
        if status is local.Status.QUEUED:
            self.retrying.reset()
            return
        busy = status is local.Status.BUSY
        if busy and self.retrying.again():
            self._in_flight.append(batch)  # behind the others: SENTs come in order
            self._transmit(batch)
            return
        raise SendRefused(f"{len(batch.ids)} message(s) not queued: {error}", batch.ids, busy=busy)

    def _broken(self, error: Unavailable) -> None:
        """The connection failed: connect again and resend what is unconfirmed, or give up."""
        failure: ApiError = error
        while True:
            if self._stream is not None:
                self._stream.close()
            self._stream = None
            if not (self._in_flight and isinstance(failure, Unavailable) and self.retrying.again()):
                break
            try:
                stream = self._stream = Stream(self.path, self.timeout)
                for batch in self._in_flight:
                    stream.request += 1
                    batch.request = stream.request
                    frame = local.encode_send_parts(
                        batch.request, batch.entries, to_agents=batch.to_agents
                    )
                    stream.write_parts(frame, "send")
            except ApiError as exc:
                failure = exc
                continue
            return
        doubtful = [i for batch in self._in_flight for i in batch.ids]
        self._in_flight.clear()
        if not doubtful:
            raise failure
        raise SendRefused(
            f"{failure}; {len(doubtful)} message(s) unconfirmed (sending them again with the "
            "same ids is safe)",
            doubtful,
        )

    def flush(self) -> None:
        """Send what is batched and wait until every batch is confirmed."""
        self._write_batch()
        while self._in_flight:
            self._confirm()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._stream is not None:
                self._stream.close()
            self._stream = None

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self._stream is not None:
            self._stream.close()
            self._stream = None
