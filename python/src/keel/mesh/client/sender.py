"""Pipelined sending on one binary stream, riding out back-pressure and restarts."""

from __future__ import annotations

import collections
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

from keel.errors import ApiError, BadRequest, Refused, Unavailable
from keel.mesh import local
from keel.mesh.arguments import too_big
from keel.mesh.client.messages import check_message, ttl_ms
from keel.mesh.client.transport import Retrying, Stream
from keel.mesh.ids import new_message_id_bytes
from keel.mesh.packets import MAX_PAYLOAD

SEND_BATCH: Final = 1000  # messages per SEND frame
SEND_BATCH_BYTES: Final = 1 << 20
SEND_WINDOW: Final = 4  # SEND frames in flight
CHECKED_PAIRS: Final = 4096  # (recipient, topic) pairs remembered as well-formed
_SIZE: Final = struct.Struct(">I")  # a SEND entry's payload size, after its head


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


class _Route(NamedTuple):
    """A checked (recipient, topic) pair: its agent, and its entries' heads between the
    id and the size in a SEND frame and in a SEND_TO frame."""

    agent: str | None
    plain: bytes
    to_agents: bytes


def _raw_id(message_id: str, to: str, topic: str) -> bytes:
    """A caller's id (32 hex digits) as its 16 bytes; ``BadRequest`` if it is not one."""
    try:
        if len(message_id) == 32:
            return bytes.fromhex(message_id)
    except (TypeError, ValueError):
        pass
    raise BadRequest(
        f"cannot send to {to!r} on topic {topic!r}: the id {message_id!r} is not 32 hex digits"
    )


@dataclass
class _Batch:
    ids: list[str] = field(default_factory=list)
    entries: list[bytes] = field(default_factory=list)  # SEND entries' heads and payloads
    size: int = 0  # bytes of its entries (heads and payloads)
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
        self._routes: dict[tuple[str, str], _Route] = {}  # checked (recipient, topic) pairs
        self._next = _Batch()
        self._in_flight: collections.deque[_Batch] = collections.deque()

    def send(self, to: str, topic: str, data: bytes, *, id: str | None = None) -> str:
        route = self._routes.get((to, topic))  # the same few pairs, again and again
        if route is None:
            route = self._route(to, topic)
        if len(data) > MAX_PAYLOAD:
            raise BadRequest(too_big(len(data)))
        batch = self._next
        if route.agent is not None and not batch.to_agents:
            self._write_batch()  # what is batched goes as SEND; this and the rest as SEND_TO
            batch = self._next
            batch.to_agents = True
        if not id:
            raw_id = new_message_id_bytes()
            message_id = raw_id.hex()
        else:
            raw_id = _raw_id(id, to, topic)
            message_id = id
        head = (
            raw_id + (route.to_agents if batch.to_agents else route.plain) + _SIZE.pack(len(data))
        )
        if batch.ids and batch.size + len(head) + len(data) > self.batch_bytes:
            # This one would take the frame past batch_bytes: it begins the next. So a frame's
            # messages fit one MSGS packet (1 MiB) on the daemon's side, where sixteen 64 KiB
            # messages (just over 1 MiB) went as a packet of 15 and one of 1.
            to_agents = batch.to_agents
            self._write_batch()
            batch = self._next
            batch.to_agents = to_agents
        batch.entries += (head, data)
        batch.ids.append(message_id)
        batch.size += len(head) + len(data)
        if len(batch.ids) >= self.batch or batch.size >= self.batch_bytes:
            self._write_batch()
        return message_id

    def _route(self, to: str, topic: str) -> _Route:
        """Check a (recipient, topic) pair once, and encode its part of the entries' heads."""
        agent, node = check_message(to, topic, b"")
        try:
            plain = (
                local.send_entry_route(node, topic, self.ttl_ms, to_agents=False)
                if agent is None
                else b""  # never in a SEND frame
            )
            to_agents = local.send_entry_route(node, topic, self.ttl_ms, agent, to_agents=True)
        except (local.LocalStreamError, UnicodeEncodeError, ValueError) as exc:
            raise BadRequest(f"cannot send to {to!r} on topic {topic!r}: {exc}") from None
        if len(self._routes) >= CHECKED_PAIRS:
            self._routes.clear()
        route = self._routes[to, topic] = _Route(agent, plain, to_agents)
        return route

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
