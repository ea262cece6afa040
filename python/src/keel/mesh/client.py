"""The Python client agents use to talk through their local mesh daemon.

::

    from keel.mesh.client import MeshClient

    mesh = MeshClient("/var/lib/keel/mesh")
    message_id = mesh.send(peer_id, "jobs", b"hello")
    for message in mesh.recv("jobs", wait=5):
        print(message.sender, message.data)

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
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.errors import ApiError
from keel.mesh.packets import new_message_id
from keel.mesh.settings import control_path

DEFAULT_TIMEOUT = 30.0
REMEMBERED_IDS = 1 << 17


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

    def call(
        self, verb: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """One request; ``ApiError`` with a readable message if it fails."""
        channel: _Channel | None = getattr(self._local, "channel", None)
        if channel is None:
            channel = self._local.channel = _Channel(self.path)
        return channel.request(verb, args or {}, timeout or self.timeout)

    def close(self) -> None:
        """Close this thread's connection (the next call opens a new one)."""
        channel: _Channel | None = getattr(self._local, "channel", None)
        if channel is not None:
            channel.close()

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
        message = self._message(to, topic, data, ttl)
        return str(self._retrying("send", message, retry)["id"])

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
        batch = [self._message(to, topic, data, ttl) for to, topic, data in messages]
        return [str(i) for i in self.call("send_many", {"messages": batch})["ids"]]

    def recv(self, topic: str, *, max: int = 100, wait: float = 0.0) -> list[Received]:
        """Up to ``max`` new messages on ``topic``, waiting up to ``wait`` seconds for one."""
        args = {"topic": topic, "max": max, "wait": wait, "ack": self._unacked}
        result = self.call("recv", args, timeout=wait + self.timeout)
        self._unacked = []
        out = []
        for item in result["messages"]:
            self._unacked.append(int(item["receipt"]))
            key = (item["from"], item["id"])
            if key in self._returned:
                continue
            self._returned[key] = None
            if len(self._returned) > REMEMBERED_IDS:
                self._returned.popitem(last=False)
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


def _transient(error: ApiError) -> bool:
    """The daemon could not be reached or went away mid-request (it may be restarting)."""
    text = str(error)
    return text.startswith("cannot reach") or "connection" in text or "no answer" in text
