"""A client of one node's daemon: its control verbs, and sends over its binary stream."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from keel import paths
from keel.api import Connection
from keel.errors import BadRequest, Refused, Unavailable, UsageError
from keel.mesh import local
from keel.mesh.client.messages import Received, Returned, check_message, check_size, ttl_ms
from keel.mesh.client.sender import SEND_BATCH, SEND_WINDOW, Sender
from keel.mesh.client.subscription import Subscription
from keel.mesh.client.transport import Retrying, Stream
from keel.mesh.ids import new_message_id

DEFAULT_TIMEOUT: Final = 30.0
AGENTS_SOCKET: Final = Path("/run/keel-mesh/agents.sock")  # NixOS's agent_socket (docs/mesh.md)


def default_socket() -> Path:
    """The node's control socket, or the agents' socket for a process that cannot reach it.

    A tier-2 agent's sandbox hides ``/run/keel``, and only keel's group may
    open the control socket; agents connect on the agents' socket instead
    (``agent_socket``; NixOS: ``/run/keel-mesh/agents.sock``). So a process
    that may not open the control socket, where the agents' socket exists,
    gets that one. Dev mode always uses ``./.keel/run/mesh.sock``.
    """
    control = paths.socket_file("mesh")
    if paths.dev_mode() or os.access(control, os.W_OK) or not os.path.exists(AGENTS_SOCKET):
        return control
    return AGENTS_SOCKET


class MeshClient:
    """A client of the node's daemon at ``socket`` (default: :func:`default_socket`).

    One control connection and one stream per thread. ``recv``'s bookkeeping
    (what to acknowledge) belongs to the client: receive on one thread at a
    time; what was returned is remembered across all of them.
    """

    def __init__(
        self, socket: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.path = Path(socket) if socket is not None else default_socket()
        if self.path.is_dir():
            raise UsageError(
                f"{self.path} is a directory: MeshClient takes the node's control socket "
                f"(default {paths.socket_file('mesh')}), which is no longer in the node's "
                "directory (docs/mesh.md, upgrading)"
            )
        self.timeout = timeout
        self.returned = Returned()
        self._local = threading.local()  # .connection, .stream: this thread's
        self._unacked: list[int] = []

    def call(
        self, verb: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """One control request; :class:`~keel.errors.ApiError` (typed) if it fails."""
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = Connection(
                self.path, service="mesh", timeout=self.timeout
            )
        return connection.call(verb, args, timeout=timeout)

    def close(self) -> None:
        """Close this thread's connections (the next call opens new ones)."""
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
        stream: Stream | None = getattr(self._local, "stream", None)
        if stream is not None:
            stream.close()
            self._local.stream = None

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the node and its mesh

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status")
        return result

    def node_id(self) -> str:
        return str(self.status()["node"])

    def invite(self, *, ttl: float = 3600, uses: int = 1) -> str:
        return str(self.call("invite", {"ttl": ttl, "uses": uses})["token"])

    def invites(self) -> list[dict[str, Any]]:
        """The invites this node issued and still holds: ``id``, ``state``, ``uses_left``..."""
        result: list[dict[str, Any]] = self.call("invites")
        return result

    def revoke_invite(self, invite_id: str) -> dict[str, Any]:
        """Revoke an invite by its id (this node must be an operator node of the mesh)."""
        result: dict[str, Any] = self.call("revoke_invite", {"invite": invite_id})
        return result

    def join(self, token: str, *, timeout: float = 30.0) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "join", {"token": token, "timeout": timeout}, timeout=timeout + 5
        )
        return result

    def peers(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("peers")
        return result

    def whoami(self) -> dict[str, Any]:
        """Who the node takes this process for: an agent (and its mesh grant), or the node."""
        result: dict[str, Any] = self.call("whoami")
        return result

    def agents(self) -> list[dict[str, Any]]:
        """The agents this node tells apart, with their mesh grants."""
        result: list[dict[str, Any]] = self.call("agents")
        return result

    def remove(self, node_id: str) -> None:
        """Revoke a node for good (this node must be an operator node of the mesh)."""
        self.call("remove", {"node": node_id})

    def operator(self, node_id: str, *, grant: bool) -> dict[str, Any]:
        """Grant a member the operator role, or take it back (from an operator node)."""
        result: dict[str, Any] = self.call("operator", {"node": node_id, "grant": grant})
        return result

    def dead_letters(self, *, limit: int = 100) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("dead_letters", {"limit": limit})
        return result

    # -- sending

    def send(
        self,
        to: str,
        topic: str,
        data: bytes,
        *,
        ttl: float | None = None,
        retry: float = 0.0,
        as_agent: str | None = None,
    ) -> str:
        """Queue ``data`` for node ``to`` durably; returns the message id.

        The id is chosen here, so a send that failed halfway (the daemon died
        before it answered) can be repeated as the same message: with
        ``retry`` > 0 the client does that itself for up to ``retry`` seconds.
        ``as_agent``: a caller that is the node itself (root, keel's daemons)
        sends on behalf of that agent of the node, within its ``sendTo``
        (docs/mesh.md, Agents); an agent that tries is refused.
        """
        agent, node = check_message(to, topic, data)
        message_id = new_message_id()
        entry = local.SendEntry(message_id, node, topic, data, ttl_ms(ttl), agent)
        retrying = Retrying(retry)
        while True:
            try:
                if as_agent is None:
                    self._queue([entry])
                else:
                    self._send_as(entry, to, as_agent)
            except Unavailable:
                if not retrying.again():
                    raise
                continue
            return message_id

    def _send_as(self, entry: local.SendEntry, to: str, as_agent: str) -> None:
        """One message sent for ``as_agent``: the ``send`` verb (the stream has no such field)."""
        args: dict[str, Any] = {
            "id": entry.id,
            "to": to,
            "topic": entry.topic,
            "data": base64.b64encode(entry.payload).decode(),
            "as_agent": as_agent,
        }
        if entry.ttl_ms:
            args["ttl"] = entry.ttl_ms / 1000
        self.call("send", args)

    def send_many(
        self, messages: Iterable[tuple[str, str, bytes]], *, ttl: float | None = None
    ) -> list[str]:
        """Queue several ``(to, topic, data)`` messages in one transaction (all or none)."""
        entries = []
        for to, topic, data in messages:
            agent, node = check_message(to, topic, data)
            entries.append(local.SendEntry(new_message_id(), node, topic, data, ttl_ms(ttl), agent))
        self._queue(entries)
        return [entry.id for entry in entries]

    def _queue(self, entries: Sequence[local.SendEntry]) -> None:
        """One SEND frame on this thread's stream, and its SENT."""
        to_agents = any(entry.to_agent is not None for entry in entries)
        try:
            parts = [
                part
                for entry in entries
                for part in (local.send_entry_head(entry, to_agents=to_agents), entry.payload)
            ]
        except (local.LocalStreamError, UnicodeEncodeError, ValueError) as exc:
            raise BadRequest(f"cannot send: {exc}") from None
        stream: Stream | None = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = Stream(self.path, self.timeout)
        stream.request += 1
        try:
            frame = local.encode_send_parts(stream.request, parts, to_agents=to_agents)
            stream.write_parts(frame, "send")
            request, status, error = stream.sent("send")
        except local.LocalStreamError as exc:  # the frame would be too big
            raise BadRequest(f"cannot send {len(entries)} message(s) at once: {exc}") from None
        except (Unavailable, BadRequest):
            self._local.stream = None
            raise
        if request != stream.request:
            stream.close()
            self._local.stream = None
            raise Unavailable(f"{self.path}: the daemon confirmed {request}, not {stream.request}")
        if status is not local.Status.QUEUED:
            raise Refused(error)

    def sender(
        self,
        *,
        ttl: float | None = None,
        retry: float = 0.0,
        window: int = SEND_WINDOW,
        batch: int = SEND_BATCH,
    ) -> Sender:
        """A pipelined :class:`Sender` (its own connection); use it in a ``with`` block."""
        return Sender(
            self.path, timeout=self.timeout, ttl=ttl, retry=retry, window=window, batch=batch
        )

    # -- receiving

    def subscribe(
        self, topic: str, *, max_unacked: int = 1000, max_bytes: int = 16 << 20
    ) -> Subscription:
        """Messages on ``topic`` pushed as they arrive (its own connection): a :class:`Subscription`."""
        return Subscription(
            self.path,
            topic,
            timeout=self.timeout,
            returned=self.returned,
            max_unacked=max_unacked,
            max_bytes=max_bytes,
        )

    def recv(self, topic: str, *, max: int = 100, wait: float = 0.0) -> list[Received]:
        """Up to ``max`` new messages on ``topic``, waiting up to ``wait`` seconds for one."""
        args = {"topic": topic, "max": max, "wait": wait, "ack": self._unacked}
        result = self.call("recv", args, timeout=wait + self.timeout)
        self._unacked = []
        out = []
        for item in result["messages"]:
            self._unacked.append(int(item["receipt"]))
            if not self.returned.first_time(item["from"], item["id"]):
                continue
            out.append(
                Received(
                    id=item["id"],
                    sender=item["from"],
                    topic=item["topic"],
                    room=item.get("room"),
                    data=base64.b64decode(item["data"]),
                    received=float(item["received"]),
                    agent=item.get("agent"),
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
        """A room owned by the node: ``members`` are node ids or ``AGENT@NODE_ID``."""
        result: dict[str, Any] = self.call("room_create", {"name": name, "members": list(members)})
        return result

    def room_add(self, room: str, node_id: str) -> dict[str, Any]:
        """Add ``node_id`` (a node id, or ``AGENT@NODE_ID``) to a room the node owns."""
        result: dict[str, Any] = self.call("room_add", {"room": room, "node": node_id})
        return result

    def room_remove(self, room: str, node_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("room_remove", {"room": room, "node": node_id})
        return result

    def room_members(self, room: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("room_members", {"room": room})
        return result

    def room_send(self, room: str, topic: str, data: bytes, *, ttl: float | None = None) -> str:
        check_size(data)
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
