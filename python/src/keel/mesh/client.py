"""The Python client agents use to talk through their local mesh daemon.

::

    from keel.mesh.client import MeshClient

    mesh = MeshClient("/var/lib/keel/mesh")
    message_id = mesh.send(peer_id, "jobs", b"hello")
    for message in mesh.recv("jobs", wait=5):
        print(message.sender, message.data)

    with mesh.sender() as out:             # pipelined: many messages per request
        for item in work:
            out.send(peer_id, "jobs", item)  # queued durably once the block ends
    with mesh.subscribe("jobs") as inbox:  # pushed as they arrive
        for message in inbox.recv(wait=5):
            handle(message)

Payloads travel as raw bytes on a binary stream (``keel.mesh.local``);
status, membership and rooms use the JSON control verbs.

**Exactly once.** The daemon hands out received messages under a lease and
deletes them only when the client acknowledges them. ``recv`` acknowledges
the previous batch when it fetches the next one (or call :meth:`ack`), and
the client remembers the ids it has returned: a message the daemon hands out
again (its daemon was killed before the acknowledgement arrived, or a lease
ran out) is acknowledged and not returned a second time. So, for the
lifetime of one client, every message is returned once. A client that dies
between receiving and acknowledging gets the message again in its next life
(at-least-once across client crashes: keep the id if that matters).
"""

from __future__ import annotations

import base64
import collections
import json
import math
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.errors import ApiError
from keel.mesh import local
from keel.mesh.arguments import MAX_TTL, too_big
from keel.mesh.ids import new_message_id
from keel.mesh.packets import MAX_PAYLOAD
from keel.mesh.settings import control_path

DEFAULT_TIMEOUT = 30.0
REMEMBERED_IDS = 1 << 17
SEND_BATCH = 1000  # messages per SEND frame of a pipelined sender
SEND_BATCH_BYTES = 1 << 20
SEND_WINDOW = 4  # SEND frames a pipelined sender has in flight


@dataclass(frozen=True)
class Received:
    id: str
    sender: str
    topic: str
    room: str | None
    data: bytes = field(repr=False)
    received: float


class _Channel:
    """One Unix-socket connection to the daemon, JSON lines, kept open between calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buffer = bytearray()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.buffer.clear()

    def request(self, verb: str, args: dict[str, Any], timeout: float) -> Any:
        line = json.dumps({"verb": verb, "args": args}, separators=(",", ":")).encode() + b"\n"
        if self.sock is not None and not self._alive(self.sock):
            self.close()  # the daemon restarted since the last call: a fresh connection
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                raise ApiError(
                    f"cannot reach the mesh daemon at {self.path}: "
                    f"{exc.strerror or type(exc).__name__} "
                    "(is `keel mesh serve` running, and may you open its socket?)"
                ) from None
            self.sock = sock
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(line)
            raw = self._read_line()
        except TimeoutError:
            self.close()
            raise ApiError(f"{self.path}: no answer to {verb!r} within {timeout:g} s") from None
        except OSError as exc:
            self.close()
            raise ApiError(
                f"{self.path}: connection failed during {verb!r}: {exc.strerror or exc}"
            ) from None
        try:
            response = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.close()
            raise ApiError(
                f"{self.path}: the daemon sent a malformed response to {verb!r}"
            ) from None
        if not isinstance(response, dict) or "ok" not in response:
            raise ApiError(f"{self.path}: the daemon sent a malformed response to {verb!r}")
        if not response["ok"]:
            raise ApiError(str(response.get("error", "request failed")))
        return response.get("result")

    @staticmethod
    def _alive(sock: socket.socket) -> bool:
        """False if the daemon's end is closed (EOF or error waiting to be read)."""
        timeout = sock.gettimeout()
        sock.setblocking(False)  # with a timeout set, recv would first wait for data
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            sock.settimeout(timeout)
        return bool(data)

    def _read_line(self) -> bytes:
        assert self.sock is not None
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return line
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError(0, "the daemon closed the connection")
            self.buffer += chunk


class _Stream:
    """A control connection upgraded to the binary stream (``keel.mesh.local``), blocking."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        channel = _Channel(path)
        channel.request("stream", {}, timeout)  # unknown verb: an ApiError the caller handles
        assert channel.sock is not None
        self.sock = channel.sock
        local.widen(self.sock)
        self.buffer = channel.buffer  # whatever followed the reply line already
        self.request = 0

    def close(self) -> None:
        self.sock.close()

    def _broken(self, what: str, exc: BaseException) -> ApiError:
        self.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ApiError(f"{self.path}: connection failed during {what}: {reason}")

    def write(self, data: bytes, what: str) -> None:
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(data)
        except OSError as exc:
            raise self._broken(what, exc) from None

    def frame(self, timeout: float | None, what: str) -> tuple[int, bytes] | None:
        """The next frame; ``None`` if none is complete within ``timeout`` (None: block)."""
        head = local.FRAME.size
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if len(self.buffer) >= head:
                kind, length = local.read_frame_head(bytes(self.buffer[:head]))
                if len(self.buffer) >= head + length:
                    with memoryview(self.buffer) as view:  # one copy, not two
                        body = bytes(view[head : head + length])
                    del self.buffer[: head + length]
                    if kind == local.Kind.ERROR:
                        self.close()
                        raise ApiError(f"{self.path}: {body.decode(errors='replace')}")
                    return kind, body
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                self.sock.settimeout(left if left is not None else self.timeout)
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                if left is None:
                    raise self._broken(what, TimeoutError("no answer")) from None
                continue
            except OSError as exc:
                raise self._broken(what, exc) from None
            if not chunk:
                raise self._broken(what, ConnectionResetError("the daemon closed the connection"))
            self.buffer += chunk

    def finish(self) -> None:
        """Hang up cleanly: say so (EOF), and read until the daemon hung up too.

        Closing a Unix socket with data still unread makes the daemon's side
        fail at once (``ECONNRESET``), losing the frames it had not read yet,
        such as the last ACK; this way it reads them all first.
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(self.timeout)
            while self.sock.recv(1 << 16):
                pass
        except OSError:
            pass  # it is gone already: nothing more to do

    def readable(self) -> bool:
        if self.buffer:
            return True
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def sent(self, what: str) -> tuple[int, local.Status, str]:
        """Wait for the next SENT."""
        while True:
            got = self.frame(None, what)
            assert got is not None
            kind, body = got
            if kind == local.Kind.SENT:
                return local.decode_sent(body)


class SendRefused(ApiError):
    """The daemon refused a batch (a full outbox, a bad recipient...); ``ids`` were not queued."""

    def __init__(self, message: str, ids: Sequence[str], *, busy: bool = False) -> None:
        super().__init__(message)
        self.ids = list(ids)
        self.busy = busy  # back-pressure: the same messages may be sent again later


@dataclass
class _Batch:
    ids: list[str]
    entries: list[bytes]  # SEND entries' heads and payloads, in order
    request: int = 0


class Sender:
    """Pipelined sending on one stream: batches of messages, several in flight.

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
        client: MeshClient,
        *,
        ttl: float | None = None,
        retry: float = 0.0,
        window: int = SEND_WINDOW,
        batch: int = SEND_BATCH,
        batch_bytes: int = SEND_BATCH_BYTES,
    ) -> None:
        self.client = client
        self.ttl_ms = _ttl_ms(ttl)
        self.retry = retry
        self.window = max(1, window)
        self.batch = max(1, batch)
        self.batch_bytes = batch_bytes
        self._stream: _Stream | None = None
        self._next = _Batch([], [])
        self._size = 0
        self._in_flight: collections.deque[_Batch] = collections.deque()
        self._backoff = 0.0
        self._deadline: float | None = None  # while retrying

    def send(self, to: str, topic: str, data: bytes, *, id: str | None = None) -> str:
        _check_size(data)
        message_id = id or new_message_id()
        entry = local.SendEntry(message_id, to, topic, data, self.ttl_ms)
        try:
            self._next.entries += (local.send_entry_head(entry), data)
        except (local.LocalStreamError, UnicodeEncodeError, ValueError) as exc:
            raise ApiError(f"cannot send to {to!r} on topic {topic!r}: {exc}") from None
        self._next.ids.append(message_id)
        self._size += len(data)
        if len(self._next.ids) >= self.batch or self._size >= self.batch_bytes:
            self._write_batch()
        return message_id

    def _write_batch(self) -> None:
        if not self._next.ids:
            return
        batch, self._next, self._size = self._next, _Batch([], []), 0
        self._in_flight.append(batch)
        self._transmit(batch)
        while len(self._in_flight) >= self.window:
            self._confirm()

    def _transmit(self, batch: _Batch) -> None:
        """Write ``batch`` (a new request number); a broken connection is ``_broken``'s."""
        try:
            if self._stream is None:
                self._stream = _Stream(self.client.path, self.client.timeout)
            self._stream.request += 1
            batch.request = self._stream.request
            self._stream.write(local.encode_send(batch.request, batch.entries), "send")
        except ApiError as exc:
            self._broken(exc)

    def _confirm(self) -> None:
        """Wait for the oldest batch's SENT (sending batches again while retrying)."""
        if self._stream is None:
            self._broken(ApiError(f"{self.client.path}: not connected"))
            return
        try:
            request, status, error = self._stream.sent("send")
        except ApiError as exc:
            self._broken(exc)
            return
        batch = self._in_flight.popleft()
        if request != batch.request:
            self._in_flight.appendleft(batch)
            self._broken(
                ApiError(f"{self.client.path}: the daemon confirmed {request}, not {batch.request}")
            )
            return
        if status is local.Status.QUEUED:
            self._backoff = 0.0
            self._deadline = None
            return
        busy = status is local.Status.BUSY
        if busy and self._may_retry():
            self._in_flight.append(batch)  # behind the others: SENTs come in order
            self._transmit(batch)
            return
        raise SendRefused(f"{len(batch.ids)} message(s) not queued: {error}", batch.ids, busy=busy)

    def _may_retry(self) -> bool:
        """True (after a pause that doubles, 5 ms to 0.5 s) while the retry time lasts."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.retry
        if now >= self._deadline:
            self._deadline = None
            return False
        self._backoff = min(0.5, max(0.005, self._backoff * 2))
        time.sleep(min(self._backoff, self._deadline - now))
        return True

    def _broken(self, error: ApiError) -> None:
        """The connection failed: reconnect and send what is unconfirmed again, or give up."""
        while True:
            if self._stream is not None:
                self._stream.close()
            self._stream = None
            if not (self._in_flight and _transient(error) and self._may_retry()):
                break
            try:
                stream = self._stream = _Stream(self.client.path, self.client.timeout)
                for batch in self._in_flight:
                    stream.request += 1
                    batch.request = stream.request
                    stream.write(local.encode_send(batch.request, batch.entries), "send")
            except ApiError as exc:
                error = exc
                continue
            return
        doubtful = [i for batch in self._in_flight for i in batch.ids]
        self._in_flight.clear()
        if not doubtful:
            raise error
        raise SendRefused(
            f"{error}; {len(doubtful)} message(s) unconfirmed (sending them again with the "
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


class Subscription:
    """Messages on one topic, pushed by the daemon as they arrive (a binary stream).

    ``recv`` acknowledges what the previous ``recv`` returned, so (as with
    :meth:`MeshClient.recv`) every message is returned once in the client's
    life, across daemon restarts; what the client had not acknowledged when
    the connection ended is handed out again. A broken connection raises
    :class:`ApiError` from ``recv``; the next ``recv`` reconnects.
    """

    def __init__(
        self, client: MeshClient, topic: str, *, max_unacked: int = 1000, max_bytes: int = 16 << 20
    ) -> None:
        self.client = client
        self.topic = topic
        self.max_unacked = max_unacked
        self.max_bytes = max_bytes
        self._stream: _Stream | None = None
        self._unacked: list[int] = []
        self._ready: collections.deque[_Pending] = collections.deque()

    def _connect(self) -> _Stream:
        if self._stream is None:
            # receipts of messages handed over from memory died with the old connection
            self._unacked = [r for r in self._unacked if r < local.STREAM_RECEIPTS]
            stream = _Stream(self.client.path, self.client.timeout)
            try:
                stream.write(
                    local.encode_subscribe(self.topic, self.max_unacked, self.max_bytes),
                    "subscribe",
                )
                while True:  # the daemon answers with a DELIVER frame: subscribed
                    got = stream.frame(None, "subscribe")
                    if got is not None and got[0] == local.Kind.DELIVER:
                        self._take(got[1])
                        break
            except (local.LocalStreamError, UnicodeEncodeError) as exc:
                stream.close()
                raise ApiError(f"cannot subscribe to topic {self.topic!r}: {exc}") from None
            self._stream = stream
        return self._stream

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
            while not self._ready or stream.readable():
                got = stream.frame(0 if self._ready else max_wait(deadline), "recv")
                if got is None:
                    break
                kind, body = got
                if kind == local.Kind.DELIVER:
                    self._take(body)
        except ApiError:
            self._stream = None
            raise
        except local.LocalStreamError as exc:
            stream.close()
            self._stream = None
            raise ApiError(f"{self.client.path}: malformed frame from the daemon: {exc}") from None
        count = len(self._ready) if max is None else min(max, len(self._ready))
        out = [self._ready.popleft() for _ in range(count)]
        self._unacked += [m.receipt for m in out]
        return [m.message for m in out]

    def _take(self, body: bytes) -> None:
        for item in local.decode_deliver(body):
            key = (item.sender, item.id)
            if self.client._seen(key):
                self._unacked.append(item.receipt)  # handed out again: acknowledge, skip
                continue
            self._ready.append(
                _Pending(
                    item.receipt,
                    Received(
                        id=item.id,
                        sender=item.sender,
                        topic=self.topic,
                        room=item.room,
                        data=item.payload,
                        received=item.received,
                    ),
                )
            )

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


@dataclass(frozen=True)
class _Pending:
    receipt: int
    message: Received


def max_wait(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class MeshClient:
    """A client of one node's daemon (``DIR/control.sock``), one connection per thread.

    ``recv``'s bookkeeping (what to acknowledge, what was returned) is shared:
    receive on one thread at a time.
    """

    def __init__(self, directory: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT):
        self.directory = Path(directory)
        self.path = control_path(self.directory)
        self.timeout = timeout
        self._local = threading.local()
        self._unacked: list[int] = []
        self._returned: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._binary = True  # the daemon speaks the binary stream (until it says otherwise)
        self._lock = threading.Lock()

    def _seen(self, key: tuple[str, str]) -> bool:
        """Whether ``key`` (sender, id) was returned before; remembers it if not."""
        with self._lock:
            if key in self._returned:
                return True
            self._returned[key] = None
            if len(self._returned) > REMEMBERED_IDS:
                self._returned.popitem(last=False)
            return False

    def call(
        self, verb: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """One request; ``ApiError`` with a readable message if it fails."""
        channel: _Channel | None = getattr(self._local, "channel", None)
        if channel is None:
            channel = self._local.channel = _Channel(self.path)
        return channel.request(verb, args or {}, timeout or self.timeout)

    def close(self) -> None:
        """Close this thread's connections (the next call opens new ones)."""
        channel: _Channel | None = getattr(self._local, "channel", None)
        if channel is not None:
            channel.close()
        stream: _Stream | None = getattr(self._local, "stream", None)
        if stream is not None:
            stream.close()
            self._local.stream = None

    def _send_binary(self, messages: Sequence[local.SendEntry]) -> bool:
        """Queue ``messages`` over this thread's stream; False if the daemon has no streams."""
        if not self._binary:
            return False
        try:
            entries = [local.send_entry(m) for m in messages]
        except (local.LocalStreamError, UnicodeEncodeError, ValueError):
            return False  # the daemon's checks word the error (JSON path)
        stream: _Stream | None = getattr(self._local, "stream", None)
        if stream is None:
            try:
                stream = self._local.stream = _Stream(self.path, self.timeout)
            except ApiError as exc:
                if "unknown verb" in str(exc):
                    self._binary = False
                    return False
                raise
        stream.request += 1
        try:
            stream.write(local.encode_send(stream.request, entries), "send")
            request, status, error = stream.sent("send")
        except ApiError:
            self._local.stream = None
            raise
        if request != stream.request:
            stream.close()
            self._local.stream = None
            raise ApiError(f"{self.path}: the daemon confirmed {request}, not {stream.request}")
        if status is not local.Status.QUEUED:
            raise ApiError(error)
        return True

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- node and membership

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status")
        return result

    def node_id(self) -> str:
        return str(self.status()["node"])

    def invite(self, *, ttl: float = 3600, uses: int = 1) -> str:
        return str(self.call("invite", {"ttl": ttl, "uses": uses})["token"])

    def join(self, token: str, *, timeout: float = 30.0) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "join", {"token": token, "timeout": timeout}, timeout=timeout + 5
        )
        return result

    def peers(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("peers")
        return result

    def remove(self, node_id: str) -> None:
        self.call("remove", {"node": node_id})

    # -- messages

    @staticmethod
    def _message(to: str, topic: str, data: bytes, ttl: float | None) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": new_message_id(),
            "to": to,
            "topic": topic,
            "data": base64.b64encode(data).decode(),
        }
        if ttl is not None:
            message["ttl"] = ttl
        return message

    def send(
        self, to: str, topic: str, data: bytes, *, ttl: float | None = None, retry: float = 0.0
    ) -> str:
        """Queue ``data`` for node ``to`` durably; returns the message id.

        The id is chosen here, so a send that failed halfway (the daemon died
        before it answered) can be repeated as the same message: with
        ``retry`` > 0 the client does that itself for up to ``retry`` seconds.
        """
        _check_size(data)
        message_id = new_message_id()
        binary = local.SendEntry(message_id, to, topic, data, _ttl_ms(ttl))
        deadline = time.monotonic() + retry
        while True:
            try:
                if self._send_binary([binary]):
                    return message_id
                message = self._message(to, topic, data, ttl)  # an older daemon: JSON
                message["id"] = message_id
                left = max(0.0, deadline - time.monotonic())
                return str(self._retrying("send", message, left)["id"])
            except ApiError as exc:
                if time.monotonic() >= deadline or not _transient(exc):
                    raise
                time.sleep(0.1)

    def _retrying(self, verb: str, args: dict[str, Any], retry: float) -> Any:
        deadline = time.monotonic() + retry
        while True:
            try:
                return self.call(verb, args)
            except ApiError as exc:
                if time.monotonic() >= deadline or not _transient(exc):
                    raise
                time.sleep(0.1)

    def send_many(
        self, messages: Iterable[tuple[str, str, bytes]], *, ttl: float | None = None
    ) -> list[str]:
        """Queue several ``(to, topic, data)`` messages in one transaction."""
        listed = list(messages)
        for _, _, data in listed:
            _check_size(data)
        ids = [new_message_id() for _ in listed]
        binary = [
            local.SendEntry(i, to, topic, data, _ttl_ms(ttl))
            for i, (to, topic, data) in zip(ids, listed, strict=True)
        ]
        if self._send_binary(binary):
            return ids
        batch = [self._message(to, topic, data, ttl) for to, topic, data in listed]
        for item, message_id in zip(batch, ids, strict=True):
            item["id"] = message_id
        return [str(i) for i in self.call("send_many", {"messages": batch})["ids"]]

    def sender(
        self,
        *,
        ttl: float | None = None,
        retry: float = 0.0,
        window: int = SEND_WINDOW,
        batch: int = SEND_BATCH,
    ) -> Sender:
        """A pipelined :class:`Sender` (its own connection); use it in a ``with`` block."""
        return Sender(self, ttl=ttl, retry=retry, window=window, batch=batch)

    def subscribe(
        self, topic: str, *, max_unacked: int = 1000, max_bytes: int = 16 << 20
    ) -> Subscription:
        """Messages on ``topic`` pushed as they arrive (its own connection): a :class:`Subscription`."""
        return Subscription(self, topic, max_unacked=max_unacked, max_bytes=max_bytes)

    def recv(self, topic: str, *, max: int = 100, wait: float = 0.0) -> list[Received]:
        """Up to ``max`` new messages on ``topic``, waiting up to ``wait`` seconds for one."""
        args = {"topic": topic, "max": max, "wait": wait, "ack": self._unacked}
        result = self.call("recv", args, timeout=wait + self.timeout)
        self._unacked = []
        out = []
        for item in result["messages"]:
            self._unacked.append(int(item["receipt"]))
            if self._seen((item["from"], item["id"])):
                continue
            out.append(
                Received(
                    id=item["id"],
                    sender=item["from"],
                    topic=item["topic"],
                    room=item.get("room"),
                    data=base64.b64decode(item["data"]),
                    received=float(item["received"]),
                )
            )
        return out

    def ack(self) -> None:
        """Acknowledge what ``recv`` returned so far (``recv`` does it on its next call)."""
        if self._unacked:
            self.call("ack", {"receipts": self._unacked})
            self._unacked = []

    def messages(self, topic: str, *, wait: float = 30.0) -> Iterator[Received]:
        """Every message on ``topic`` as it arrives, forever."""
        while True:
            yield from self.recv(topic, wait=wait)

    # -- rooms

    def room_create(self, name: str, members: Sequence[str] = ()) -> dict[str, Any]:
        result: dict[str, Any] = self.call("room_create", {"name": name, "members": list(members)})
        return result

    def room_add(self, room: str, node_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("room_add", {"room": room, "node": node_id})
        return result

    def room_remove(self, room: str, node_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("room_remove", {"room": room, "node": node_id})
        return result

    def room_members(self, room: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("room_members", {"room": room})
        return result

    def room_send(self, room: str, topic: str, data: bytes, *, ttl: float | None = None) -> str:
        _check_size(data)
        args: dict[str, Any] = {
            "room": room,
            "topic": topic,
            "data": base64.b64encode(data).decode(),
        }
        if ttl is not None:
            args["ttl"] = ttl
        return str(self.call("room_send", args)["id"])

    def rooms(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("rooms")
        return result


def _ttl_ms(ttl: float | None) -> int:
    """The binary stream's TTL: milliseconds, 0 for the daemon's default."""
    if ttl is None:
        return 0
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL):
        raise ApiError(f"ttl must be a positive number of seconds, at most {MAX_TTL}, got {ttl!r}")
    return max(1, round(ttl * 1000))


def _check_size(data: bytes) -> None:
    """Refuse a payload the daemon would refuse, before sending any of it."""
    if len(data) > MAX_PAYLOAD:
        raise ApiError(too_big(len(data)))


def _transient(error: ApiError) -> bool:
    """The daemon could not be reached or went away mid-request (it may be restarting)."""
    text = str(error)
    return text.startswith("cannot reach") or "connection" in text or "no answer" in text
