"""The gateway's side of the mesh: calling tools on other nodes, and hosting calls from them.

The asyncio shell around :mod:`keel.mcp.remote`, speaking to the node's mesh
daemon on its control socket as the node itself (the gateway is keel's
daemon, no agent):

- **calling** (``remote`` in mcp.json): a call to ``LABEL.SERVER.TOOL`` is a
  mesh message to the label's node on ``keel.mcp.call``, sent *as the calling
  agent* (the mesh's ``as_agent``, so the agent's ``sendTo`` decides whether
  it may reach that node at all), expiring at the deadline; the gateway waits
  for the answer on ``keel.mcp.answer`` until the deadline, and an
  unreachable or silent node is an error naming it, never a hang. A caller
  that gives up (the agent cancels or disconnects, or the deadline passes)
  makes the gateway send a ``cancel`` for the request, as the same agent.
  ``tools/list`` of a remote node is cached per (node, agent) for
  ``list_ttl``.
- **hosting** (a server shares tools with ``nodes``): the gateway reads
  ``keel.mcp.call``, takes the caller's node and agent from the mesh message
  (never from the payload), acknowledges the request *before* running it
  (at most once: a request handed out again after a crash is not run twice),
  refuses one whose deadline passed, and answers with the result or the
  error of :meth:`~keel.mcp.gateway.McpGateway.call_from_node`. A ``cancel``
  stops a call still running, if it comes from the node and agent that
  sent the request (running calls are keyed by the sending node and the
  request's id, so no other node can even name them); any other cancel is
  ignored. The host gives a call until the deadline plus
  :data:`ANSWER_GRACE`: a live caller cancels at its deadline, and the
  host's own timeout is the backstop for a caller that cannot (its gateway
  died, the mesh between them is cut).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import mcp_types as types
from mcp import MCPError

from keel.api import AsyncConnection
from keel.errors import ApiError, Forbidden
from keel.mcp import remote
from keel.mcp.config import McpConfig, Remote
from keel.mcp.remote import Answer, BadPayload, Request
from keel.mcp.spec import check_tool
from keel.mcp.upstream import TIMEOUT, UNAVAILABLE
from keel.mesh.ids import new_message_id

if TYPE_CHECKING:
    from keel.mcp.gateway import McpGateway

log = logging.getLogger("keel.mcp")

FORBIDDEN = -32050  # as keel.mcp.gateway.FORBIDDEN
RECV_WAIT: Final = 30.0  # s one recv waits for a message
RECV_BATCH: Final = 32
RETRY_AFTER: Final = 1.0  # s before reading again after the mesh daemon failed
MAX_HOSTED: Final = 64  # remote calls run at once on the hosting side
ANSWER_GRACE: Final = 5.0  # s an answer may outlive the caller's deadline in the outbox


class MeshLink:
    """One gateway's mesh: its pending remote calls, its hosted ones, its list cache."""

    def __init__(
        self,
        gateway: McpGateway,
        config: McpConfig,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self.gateway = gateway
        self.config = config
        self.remote = config.remote
        self.socket = config.mesh.socket
        self.deadline = config.mesh.deadline
        self.list_ttl = config.mesh.list_ttl
        self.clock = clock
        self.wall = wall
        self._send = AsyncConnection(self.socket, service="mesh", timeout=self.deadline)
        self._pending: dict[str, tuple[str, asyncio.Future[Answer]]] = {}  # id -> (node, answer)
        self._parts: dict[str, remote.Parts] = {}  # id -> the parts of its answer so far
        self.max_message = config.max_message
        self._lists: dict[tuple[str, str], tuple[float, list[types.Tool]]] = {}
        self._hosted = asyncio.Semaphore(MAX_HOSTED)
        self._tasks: set[asyncio.Task[None]] = set()
        # (calling node, request id) -> the call from that node running here
        self._running: dict[tuple[str, str], _Hosted] = {}
        self.sent = 0
        self.answered = 0
        self.hosted = 0
        self.cancels_sent = 0
        self.cancelled = 0
        self.cancels_ignored = 0

    # --- reading the mesh -----------------------------------------------------------------

    async def read(self, topic: str, handle: Callable[[dict[str, Any]], None]) -> None:
        """Forever: receive on ``topic``, acknowledge at once, then hand each message over."""
        connection = AsyncConnection(self.socket, service="mesh", timeout=RECV_WAIT + 10)
        failing = False
        try:
            while True:
                try:
                    found = await connection.call(
                        "recv", {"topic": topic, "max": RECV_BATCH, "wait": RECV_WAIT}
                    )
                    messages = found["messages"]
                    if messages:
                        receipts = [m["receipt"] for m in messages]
                        await connection.call("ack", {"receipts": receipts})
                except ApiError as exc:
                    if not failing:
                        log.warning("reading %s from the mesh at %s: %s", topic, self.socket, exc)
                    failing = True
                    await asyncio.sleep(RETRY_AFTER)
                    continue
                if failing:
                    log.info("reading %s from the mesh again", topic)
                failing = False
                for message in messages:
                    if message.get("room") is None:
                        handle(message)
        finally:
            await connection.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, future in self._pending.values():
            future.cancel()
        await self._send.close()

    async def _mesh_send(
        self, node: str, topic: str, payload: bytes, ttl: float, as_agent: str | None
    ) -> None:
        args: dict[str, Any] = {
            "id": new_message_id(),
            "to": node,
            "topic": topic,
            "data": base64.b64encode(payload).decode(),
            "ttl": max(ttl, 1.0),
        }
        if as_agent is not None:
            args["as_agent"] = as_agent
        # Shielded: a caller that goes away mid-request must not leave the shared
        # connection with an answer nobody read (the next request would get it).
        # The connection's own timeout (the deadline) bounds the wait.
        await asyncio.shield(self._send.call("send", args))

    # --- calling: this node's agents use other nodes' tools -----------------------------------

    def on_answer(self, message: dict[str, Any]) -> None:
        try:
            found = remote.decode_answer_or_part(base64.b64decode(message["data"]))
        except (BadPayload, ValueError) as exc:
            log.warning("an answer from %s that keel cannot read: %s", message.get("from"), exc)
            return
        pending = self._pending.get(found.id)
        if pending is None:
            log.debug("answer %s came after its caller stopped waiting", found.id)
            return
        node, future = pending
        if message.get("from") != node:
            log.warning(
                "answer %s came from %s, not from %s, which was asked: dropped",
                found.id,
                message.get("from"),
                node,
            )
            return
        if future.done():
            return
        if isinstance(found, remote.Part):
            parts = self._parts.setdefault(found.id, remote.Parts(found.id, self.max_message))
            try:
                joined = parts.add(found)
            except BadPayload as exc:
                log.warning("answer %s from %s in parts: %s", found.id, node, exc)
                self._parts.pop(found.id, None)
                future.set_result(
                    Answer(
                        found.id,
                        None,
                        types.INTERNAL_ERROR,
                        f"node {node} sent an answer in parts keel cannot use: {exc}",
                    )
                )
                return
            if joined is None:
                return  # more parts to come (or the deadline)
            self._parts.pop(found.id, None)
            found = joined
        future.set_result(found)

    async def ask(
        self,
        target: Remote,
        agent: str,
        kind: remote.Kind,
        *,
        server: str = "",
        tool: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> Answer:
        """Send one request to ``target`` as ``agent`` and wait for its answer until the deadline.

        :class:`MCPError` when there is no answer: the mesh refused the send
        (the agent's grant), the mesh daemon is down, or the node is silent.
        """
        node = target.node
        where = f"node {node} ({target.label})"
        request = Request(
            new_message_id(), kind, self.wall() + self.deadline, server, tool, arguments or {}
        )
        try:
            payload = remote.encode(request)
        except BadPayload as exc:
            raise MCPError(types.INVALID_PARAMS, f"cannot call {where}: {exc}") from None
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = (node, future)
        started = self.clock()
        cancels = kind == "call"  # a list runs at once on the host: nothing to cancel
        try:
            try:
                await self._mesh_send(node, remote.CALL_TOPIC, payload, self.deadline, agent)
            except Forbidden as exc:
                raise MCPError(
                    FORBIDDEN,
                    f"the mesh refused to carry the call to {where}: {exc}",
                    data={"keel": "forbidden", "node": node},
                ) from None
            except (ApiError, TimeoutError) as exc:
                raise MCPError(
                    UNAVAILABLE,
                    f"cannot send the call to {where} through the mesh ({self.socket}): {exc}",
                    data={"keel": "unavailable", "node": node},
                ) from None
            self.sent += 1
            left = self.deadline - (self.clock() - started)
            try:
                return await asyncio.wait_for(future, max(left, 0.0))
            except TimeoutError:
                if cancels:
                    self._cancel(node, agent, request)
                raise MCPError(
                    TIMEOUT,
                    f"{where} did not answer within {self.deadline:g} s "
                    "(it is down, unreachable, or its gateway is not running)",
                    data={"keel": "timeout", "node": node},
                ) from None
        except asyncio.CancelledError:
            # The agent cancelled its request or went away (even during the
            # send, which is shielded and may have reached the host).
            if cancels:
                self._cancel(node, agent, request)
            raise
        finally:
            self._pending.pop(request.id, None)
            self._parts.pop(request.id, None)  # an answer whose parts did not all come

    def _cancel(self, node: str, agent: str, request: Request) -> None:
        """Tell ``node`` to stop ``request``, as ``agent`` (in the background: nobody waits)."""
        cancel = Request(request.id, "cancel", request.deadline)
        ttl = request.deadline - self.wall() + ANSWER_GRACE

        async def send() -> None:
            try:
                await self._mesh_send(node, remote.CALL_TOPIC, remote.encode(cancel), ttl, agent)
            except (ApiError, TimeoutError) as exc:
                log.info("cannot send the cancel of %s to %s: %s", request.id, node, exc)
                return
            self.cancels_sent += 1

        self._spawn(send())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def tools(self, agent: str) -> list[types.Tool]:
        """The remote tools ``agent`` sees, as ``LABEL.SERVER.TOOL``, label by label."""
        labels = sorted(self.remote)
        found = await asyncio.gather(
            *(self._tools_of(self.remote[label], agent) for label in labels)
        )
        return [tool for tools in found for tool in tools]

    async def _tools_of(self, target: Remote, agent: str) -> list[types.Tool]:
        key = (target.node, agent)
        cached = self._lists.get(key)
        now = self.clock()
        if cached is not None and now < cached[0]:
            listed = cached[1]
        else:
            try:
                answer = await self.ask(target, agent, "list")
                listed = _tools(answer)
            except MCPError as exc:
                log.info("no tools from %s for agent %s: %s", target.label, agent, exc.message)
                listed = []  # kept for list_ttl too: a down node does not slow every list
            if len(self._lists) >= 4096:
                self._lists.clear()
            self._lists[key] = (self.clock() + self.list_ttl, listed)
        out = []
        for tool in listed:
            parts = tool.name.split(".", 1)
            if len(parts) != 2 or not target.offers(parts[0]):
                continue
            shown = remote.remote_name(target.label, parts[0], parts[1])
            if check_tool(shown) is None:
                out.append(tool.model_copy(update={"name": shown}))
        return out

    # --- hosting: other nodes' agents use this node's tools -----------------------------------

    def on_request(self, message: dict[str, Any]) -> None:
        try:
            node, agent = message["from"], message.get("agent")
            data = base64.b64decode(message["data"])
        except (KeyError, ValueError) as exc:  # not from keel's mesh daemon: never fatal here
            log.warning("a mesh message keel cannot read on %s: %r", remote.CALL_TOPIC, exc)
            return
        try:
            request = remote.decode_request(data)
        except BadPayload as exc:
            log.warning("a request from %s that keel cannot read: %s", node, exc)
            request_id = remote.request_id_of(data)
            if request_id is not None:
                bad = Answer(request_id, None, types.INVALID_REQUEST, str(exc))
                self._spawn(self._guarded(node, self._answer(node, bad, ANSWER_GRACE)))
            return
        key = (node, request.id)
        if request.kind == "cancel":
            self._cancel_hosted(key, agent)
            return
        if key in self._running:
            log.warning("request %s from %s is running already: the copy is dropped", *key[::-1])
            return
        hosted = _Hosted(agent)
        task = asyncio.get_running_loop().create_task(self._host(node, agent, request, hosted))
        hosted.task = task
        self._tasks.add(task)
        self._running[key] = hosted

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._forget(key, task)
            if task.cancelled() and not hosted.recorded and request.kind == "call":
                # cancelled before the gateway took the call (queued, or not yet started)
                self.gateway.record_not_run(node, agent, request, "cancelled")

        task.add_done_callback(done)

    def _forget(self, key: tuple[str, str], task: asyncio.Task[Any] | None) -> None:
        found = self._running.get(key)
        if found is not None and found.task is task:
            del self._running[key]

    def _cancel_hosted(self, key: tuple[str, str], agent: str | None) -> None:
        node, request_id = key
        found = self._running.get(key)
        if found is None or found.task is None:
            self.cancels_ignored += 1
            log.debug(
                "cancel of %s from %s: no such call running (finished or unknown)", *key[::-1]
            )
            return
        if found.agent != agent:
            self.cancels_ignored += 1
            log.warning(
                "cancel of %s from %s as agent %s, not as %s, which sent it: ignored",
                request_id,
                node,
                agent,
                found.agent,
            )
            return
        self.cancelled += 1
        found.task.cancel()

    async def _guarded(self, node: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:  # one request's failure is never the gateway's
            log.exception("a request from %s failed", node)

    async def _host(self, node: str, agent: str | None, request: Request, hosted: _Hosted) -> None:
        # Not _guarded(node, self._host_one(...)): a task cancelled before it
        # starts would leave that inner coroutine never awaited.
        try:
            await self._host_one(node, agent, request, hosted)
        except Exception:  # one request's failure is never the gateway's
            log.exception("a request from %s failed", node)

    async def _host_one(
        self, node: str, agent: str | None, request: Request, hosted: _Hosted
    ) -> None:
        async with self._hosted:
            self.hosted += 1
            left = request.deadline - self.wall()
            hosted.recorded = True  # from here the gateway writes the call's ledger entry
            if left <= 0:
                self.gateway.record_not_run(node, agent, request, "expired")
                await self._answer(
                    node,
                    Answer(
                        request.id,
                        None,
                        TIMEOUT,
                        f"the request reached node {self.gateway.config.node or 'the host'} "
                        "after its deadline; not run",
                    ),
                    ANSWER_GRACE,
                )
                return
            answer = await self._run(node, agent, request, left + ANSWER_GRACE)
        self._forget((node, request.id), asyncio.current_task())  # finished: a cancel is too late
        await self._answer(node, answer, left + ANSWER_GRACE)

    async def _run(self, node: str, agent: str | None, request: Request, left: float) -> Answer:
        if request.kind == "list":
            tools = [] if agent is None else self.gateway.tools_for_node(node, agent)
            dumped = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools]
            return Answer(request.id, {"tools": dumped})
        name = f"{request.server}.{request.tool}"
        try:
            result = await self.gateway.call_from_node(
                node, agent, name, request.arguments, timeout=left
            )
        except MCPError as exc:
            return Answer(request.id, None, exc.code, exc.message)
        return Answer(request.id, result.model_dump(mode="json", by_alias=True, exclude_none=True))

    async def _answer(self, node: str, answer: Answer, ttl: float) -> None:
        try:
            payloads = remote.encode_answer(answer, limit=self.max_message)
        except BadPayload as exc:
            payloads = [remote.encode(Answer(answer.id, None, types.INTERNAL_ERROR, str(exc)))]
        try:
            for payload in payloads:
                await self._mesh_send(node, remote.ANSWER_TOPIC, payload, ttl, None)
        except ApiError as exc:
            log.warning("cannot send the answer to %s's request %s: %s", node, answer.id, exc)
            return
        self.answered += 1

    def status(self) -> Mapping[str, Any]:
        return {
            "socket": str(self.socket),
            "deadline": self.deadline,
            "remote": {
                label: {
                    "node": r.node,
                    "servers": "*" if r.servers is None else sorted(r.servers),
                }
                for label, r in sorted(self.remote.items())
            },
            "pending": len(self._pending),
            "assembling": len(self._parts),
            "sent": self.sent,
            "cancels_sent": self.cancels_sent,
            "hosted": self.hosted,
            "running": len(self._running),
            "cancelled": self.cancelled,
            "cancels_ignored": self.cancels_ignored,
            "answered": self.answered,
        }


@dataclass
class _Hosted:
    """A call from another node this gateway runs: who sent it, its task, whether it is recorded."""

    agent: str | None
    task: asyncio.Task[None] | None = None
    recorded: bool = False


def _tools(answer: Answer) -> list[types.Tool]:
    if answer.result is None:
        raise MCPError(answer.code, answer.message)
    raw = answer.result.get("tools")
    if not isinstance(raw, list):
        raise MCPError(types.INTERNAL_ERROR, "a tools answer without a list of tools")
    tools = []
    for item in raw:
        try:
            tools.append(types.Tool.model_validate(item))
        except ValueError:
            continue  # a tool keel cannot read is not offered
    return tools
