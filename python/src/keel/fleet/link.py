"""The fleet daemon's one way to the mesh: the local mesh daemon's public client.

Everything the fleet says to other nodes goes through
:class:`~keel.mesh.client.MeshClient` (send to a node id and topic, messages
pushed on a topic, the member list); the fleet knows nothing of the mesh's
insides. The client is blocking, so sends run in worker threads and one
thread receives, handing each message to the event loop.

The mesh tells the receiver which node sent a message (authenticated by the
Noise session between the nodes); the fleet trusts that and nothing a message
says about its sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from keel.errors import ApiError, KeelError

log = logging.getLogger("keel.fleet.link")

RECEIVE_WAIT = 0.5  # seconds one receive call waits (how soon a stop is noticed)
RETRY = 1.0  # seconds between attempts while the mesh daemon cannot be reached


@dataclass(frozen=True)
class Incoming:
    sender: str  # the node id, as the mesh authenticated it
    data: bytes


class Link(Protocol):
    """What the fleet daemon needs of the mesh (:class:`MeshLink` is the real one)."""

    node_id: str | None
    problem: str | None

    def start(self, deliver: Callable[[Incoming], None]) -> None: ...
    async def wait_ready(self, timeout: float) -> bool: ...
    async def send(self, messages: Sequence[tuple[str, bytes]], *, ttl: float) -> None: ...
    async def peers(self) -> list[dict[str, Any]]: ...
    async def status(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class MeshUnavailable(KeelError):
    """The local mesh daemon cannot be reached (or this node is in no mesh yet)."""


class MeshLink:
    def __init__(self, socket: Path, topic: str, *, timeout: float = 10.0) -> None:
        from keel.mesh.client import MeshClient

        self.socket = socket
        self.topic = topic
        self.client = MeshClient(socket, timeout=timeout)
        self.node_id: str | None = None
        self.problem: str | None = "not started"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # --- receiving ---------------------------------------------------------------

    def start(self, deliver: Callable[[Incoming], None]) -> None:
        """Receive on the topic in a thread; ``deliver`` runs in the calling loop."""
        loop = asyncio.get_running_loop()

        def hand_over(message: Incoming) -> None:
            loop.call_soon_threadsafe(deliver, message)

        self._thread = threading.Thread(
            target=self._receive, args=(hand_over,), name="fleet-mesh-recv", daemon=True
        )
        self._thread.start()

    async def wait_ready(self, timeout: float) -> bool:
        """True once the mesh answered (the node id is known) within ``timeout``."""
        return await asyncio.to_thread(self._ready.wait, timeout)

    def _receive(self, hand_over: Callable[[Incoming], None]) -> None:
        subscription = None
        while not self._stop.is_set():
            try:
                if self.node_id is None:
                    self.node_id = str(self.client.status()["node"])
                if subscription is None:
                    subscription = self.client.subscribe(self.topic)
                messages = subscription.recv(wait=RECEIVE_WAIT)
            except (ApiError, KeyError, TypeError) as exc:
                self._failed(str(exc) or type(exc).__name__)
                if subscription is not None:
                    self._close_quietly(subscription)
                    subscription = None
                self._stop.wait(RETRY)
                continue
            if self.problem is not None:
                log.info("fleet: receiving on %s through the mesh as %s", self.topic, self.node_id)
                self.problem = None
                self._ready.set()
            for message in messages:
                hand_over(Incoming(message.sender, message.data))
        if subscription is not None:
            self._close_quietly(subscription)

    @staticmethod
    def _close_quietly(subscription: Any) -> None:
        with contextlib.suppress(ApiError, OSError):
            subscription.close()

    def _failed(self, reason: str) -> None:
        if self.problem != reason:
            log.warning(
                "fleet: the mesh daemon at %s cannot be reached (%s); retrying every %g s",
                self.socket,
                reason,
                RETRY,
            )
        self.problem = reason

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=RECEIVE_WAIT + 5)
            self._thread = None
        self.client.close()

    # --- sending and asking ---------------------------------------------------------

    async def send(self, messages: Sequence[tuple[str, bytes]], *, ttl: float) -> None:
        """Queue ``(node, data)`` messages on the topic in one mesh transaction."""
        if not messages:
            return
        batch = [(node, self.topic, data) for node, data in messages]
        try:
            await asyncio.to_thread(self.client.send_many, batch, ttl=ttl)
        except ApiError as exc:
            raise MeshUnavailable(f"the mesh did not take the message: {exc}") from None

    async def peers(self) -> list[dict[str, Any]]:
        """The other members of the mesh (``id``, ``connected``, ``last_seen``, ...)."""
        try:
            peers: list[dict[str, Any]] = await asyncio.to_thread(self.client.peers)
        except ApiError as exc:
            raise MeshUnavailable(f"cannot list the mesh's members: {exc}") from None
        return [p for p in peers if isinstance(p, dict) and isinstance(p.get("id"), str)]

    async def status(self) -> dict[str, Any]:
        try:
            status: dict[str, Any] = await asyncio.to_thread(self.client.status)
        except ApiError as exc:
            raise MeshUnavailable(f"the mesh daemon does not answer: {exc}") from None
        return status
