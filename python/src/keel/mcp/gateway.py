"""``keel mcp serve``: the gateway between agents and the host's MCP servers.

The asyncio shell around :class:`~keel.mcp.policy.Policy` (run by
:func:`keel.service.main`, which gives it signals, sd_notify, the control
socket and the ledger):

- one :class:`~keel.mcp.upstream.Upstream` per server: one connection, one
  process, however many agents use it;
- a Unix socket where agents speak MCP (the SDK's server, stdio framing, both
  the handshake era and the 2026-07-28 per-request era); optionally
  Streamable HTTP on another Unix socket (:mod:`keel.mcp.http`). Who is
  calling is read from the kernel (``SO_PEERCRED``) when the connection is
  accepted, never from anything the client says;
- ``tools/list`` shows a caller only what the policy grants it, as
  ``SERVER.TOOL``; ``tools/call`` of anything else is refused with a JSON-RPC
  error saying why (:data:`FORBIDDEN`);
- every call, allowed or not, is one ledger entry: caller, server, tool,
  SHA-256 of the arguments and of the result (never their content),
  duration, outcome;
- control verbs for operators (``keel mcp list|tools|call``).

Across the mesh (:mod:`keel.mcp.meshlink`): agents call other nodes' tools as
``LABEL.SERVER.TOOL`` (mcp.json's ``remote``), and calls from other nodes'
agents arrive through :meth:`McpGateway.call_from_node`, with the node and
agent the mesh authenticated (``docs/mcp.md``, "Across the mesh").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from mcp import MCPError
from mcp.server.lowlevel import Server
from mcp.server.runner import serve_dual_era_loop

from keel import __version__
from keel.api import Handler, Peer, peer_of, remove_stale_socket
from keel.errors import BadRequest, Forbidden, KeelError
from keel.mcp import remote
from keel.mcp.config import McpConfig
from keel.mcp.meshlink import MeshLink
from keel.mcp.policy import Principal, qualified, split
from keel.mcp.spec import check_tool
from keel.mcp.upstream import TIMEOUT, UNAVAILABLE, CallFailed, Upstream
from keel.mcp.wire import digest, error_line, message_streams
from keel.service import Daemon, Shell

log = logging.getLogger("keel.mcp")

FORBIDDEN = -32050  # keel's JSON-RPC code: the caller may not use this tool
MAX_CALLS_PER_CONNECTION = 64

INSTRUCTIONS = (
    "keel's MCP gateway: the tools this host's MCP servers share with you, named SERVER.TOOL. "
    "You see only the tools you are granted."
)


@dataclass
class Connection:
    """One agent connection: who it is (from the kernel) and its limits."""

    principal: Principal
    peer: Peer
    calls: asyncio.Semaphore


class McpGateway(Daemon):
    def __init__(
        self,
        config: McpConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.policy = config.policy
        self.directory = config.directory
        self.clock = clock
        self.wall = wall
        self.upstreams = {
            name: Upstream(
                spec,
                socket_path=config.socket_of(name) if spec.transport == "stdio" else None,
                on_change=self._upstream_changed,
                max_message=config.max_message,
                unavailable_wait=config.unavailable_wait,
                wall=wall,
            )
            for name, spec in config.servers.items()
        }
        self.server: Server[Any] = Server(
            "keel-mcp",
            version=__version__,
            instructions=INSTRUCTIONS,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        # The SDK's default middleware is OpenTelemetry's, a no-op per message
        # until an exporter is installed; keel traces nothing, so it goes.
        self.server.middleware = []
        self.init_options = self.server.create_initialization_options()
        self.shell: Shell | None = None
        self.connections: set[asyncio.Task[Any]] = set()
        self.accepted = 0
        self.rejected = 0
        self.calls = 0
        self.refused = 0
        self._listener: asyncio.AbstractServer | None = None
        self._http: Any = None
        self.link = (
            MeshLink(self, config, clock=clock, wall=wall)
            if config.remote or config.hosts_for_mesh
            else None
        )

    # --- life cycle -------------------------------------------------------------------

    async def start(self, shell: Shell) -> None:
        self.shell = shell
        # The SDK logs every HTTP session and request at INFO; keel says what matters itself.
        logging.getLogger("mcp").setLevel(max(logging.WARNING, logging.getLogger().level))
        for name, upstream in self.upstreams.items():
            shell.spawn(upstream.run(), name=f"upstream:{name}")
        if self.link is not None:
            if self.config.remote:
                shell.spawn(
                    self.link.read(remote.ANSWER_TOPIC, self.link.on_answer), name="mesh:answers"
                )
            if self.config.hosts_for_mesh:
                shell.spawn(
                    self.link.read(remote.CALL_TOPIC, self.link.on_request), name="mesh:calls"
                )
        listen = self.config.listen
        try:
            listen.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_socket(listen)
            self._listener = await asyncio.start_unix_server(
                self._serve_agent, path=str(listen), limit=self.config.max_message + 1
            )
            # Any local process may connect; what it may do is decided by who it is.
            os.chmod(listen, 0o666)  # noqa: S103
        except OSError as exc:
            raise KeelError(f"cannot listen for agents at {listen}: {exc.strerror}") from None
        if self.config.http is not None:
            from keel.mcp.http import HttpFront

            self._http = HttpFront(self, self.config.http)
            await self._http.start(shell)
        self.record(
            "mcp_start",
            self.config.node or "",
            {"servers": sorted(self.upstreams), "agents": len(self.config.agents)},
        )
        log.info(
            "gateway for %d MCP servers and %d agents; agents connect to %s",
            len(self.upstreams),
            len(self.config.agents),
            listen,
        )

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.wait_closed()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.config.listen.unlink()
        if self._http is not None:
            await self._http.stop()
        if self.link is not None:
            await self.link.close()
        self.record("mcp_stop", self.config.node or "", {"calls": self.calls})

    def summary(self) -> str:
        return f"gateway for {len(self.upstreams)} MCP servers"

    def record(self, kind: str, subject: str, data: Mapping[str, Any]) -> None:
        if self.shell is not None:
            self.shell.record(kind, subject, data)

    def _upstream_changed(self, upstream: Upstream) -> None:
        if self.shell is not None:
            ready = sum(1 for u in self.upstreams.values() if u.state == "ready")
            self.shell.set_status(f"{ready} of {len(self.upstreams)} MCP servers ready")

    # --- agents -------------------------------------------------------------------------

    def principal_of(self, peer: Peer) -> Principal:
        return Principal(self.directory.agent_of(peer.uid), uid=peer.uid)

    async def _serve_agent(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self.connections) >= self.config.max_connections:
            self.rejected += 1
            writer.write(
                error_line(
                    types.INTERNAL_ERROR,
                    f"the gateway serves {self.config.max_connections} connections already; "
                    "try again later",
                )
            )
            writer.close()
            return
        self.connections.add(task)
        self.accepted += 1
        peer = peer_of(writer)
        connection = Connection(
            self.principal_of(peer), peer, asyncio.Semaphore(MAX_CALLS_PER_CONNECTION)
        )
        try:
            async with message_streams(
                reader,
                writer,
                max_message=self.config.max_message,
                write_timeout=self.config.write_timeout,
                answer_errors=True,
            ) as (read, write):
                await serve_dual_era_loop(
                    self.server,
                    read,
                    write,
                    lifespan_state=connection,
                    init_options=self.init_options,
                )
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # one connection's failure is never the gateway's
            log.debug("agent connection from %s ended: %r", connection.principal.describe(), exc)
        finally:
            self.connections.discard(task)
            writer.close()

    def _connection(self, ctx: Any) -> Connection:
        state = ctx.lifespan_context
        if isinstance(state, Connection):
            return state
        request = getattr(ctx, "request", None)
        scope = getattr(request, "scope", None)
        if isinstance(scope, dict):
            found = scope.get("keel.connection")
            if isinstance(found, Connection):
                return found
        # No identity from the kernel: nothing is granted.
        return Connection(Principal(None), Peer(-1, -1, -1), asyncio.Semaphore(1))

    # --- MCP handlers (the SDK calls these) ------------------------------------------------

    async def _list_tools(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=await self.all_tools_for(self._connection(ctx).principal)
        )

    async def all_tools_for(self, who: Principal) -> list[types.Tool]:
        """This node's tools ``who`` sees, then the other nodes' (``LABEL.SERVER.TOOL``)."""
        tools = self.tools_for(who)
        if self.link is not None and self.config.remote and who.agent and who.node is None:
            tools += await self.link.tools(who.agent)
        return tools

    def tools_for(self, who: Principal) -> list[types.Tool]:
        """The tools ``who`` sees, as ``SERVER.TOOL``, in server and listing order."""
        tools: list[types.Tool] = []
        for name in sorted(self.upstreams):
            upstream = self.upstreams[name]
            offered = {tool.name: tool for tool in upstream.tools}
            for tool_name in self.policy.visible(who, name, offered):
                shown = qualified(name, tool_name)
                if check_tool(shown) is not None:
                    continue  # a name MCP does not allow (too long): not offered
                tools.append(offered[tool_name].model_copy(update={"name": shown}))
        return tools

    async def _call_tool(
        self, ctx: Any, params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        connection = self._connection(ctx)
        async with connection.calls:
            return await self.call(connection.principal, params.name, params.arguments)

    async def call(
        self,
        who: Principal,
        name: str,
        arguments: dict[str, Any] | None,
        *,
        operator: Peer | None = None,
        timeout: float | None = None,
    ) -> types.CallToolResult:
        """Check, relay and record one call; :class:`MCPError` when it gets no result.

        ``operator`` is set for ``keel mcp call`` (the control socket), which
        may call any tool unless it asks to be checked as an agent.
        """
        started = self.clock()
        self.calls += 1
        if who.node is None and self.config.remote:
            found = remote.split_remote(name, self.config.remote)
            if found is not None:
                return await self._call_remote(who, found, arguments, operator=operator)
        parts = split(name)
        server, tool = parts if parts is not None else ("", name)

        record = self._call_recorder(
            who,
            server,
            tool,
            arguments,
            operator=operator,
            subject=qualified(server, tool) if server else tool,
            started=started,
        )

        if parts is None or server not in self.upstreams:
            record("unknown_tool", code=types.INVALID_PARAMS)
            raise MCPError(
                types.INVALID_PARAMS,
                f"unknown tool {name!r}: this gateway's tools are named SERVER.TOOL "
                f"(servers: {', '.join(sorted(self.upstreams)) or 'none'}); tools/list shows yours",
            )
        if operator is None or who.agent is not None:
            decision = self.policy.may_call(who, server, tool)
            if not decision.allowed:
                self.refused += 1
                record("refused", code=FORBIDDEN)
                raise MCPError(FORBIDDEN, decision.reason, data={"keel": "forbidden", "tool": name})
        upstream = self.upstreams[server]
        if upstream.state == "ready" and tool not in {t.name for t in upstream.tools}:
            record("unknown_tool", code=types.INVALID_PARAMS)
            raise MCPError(
                types.INVALID_PARAMS,
                f"unknown tool {name!r}: MCP server {server} has no tool {tool!r}",
            )
        try:
            result = await upstream.call(tool, arguments, timeout=timeout)
        except asyncio.CancelledError:
            # The caller gave up: the SDK's session has told the server (its
            # courtesy notifications/cancelled) as it abandoned the request.
            record("cancelled")
            raise
        except CallFailed as failure:
            record(failure.kind, code=failure.code)
            raise MCPError(
                failure.code, failure.message, data={"keel": failure.kind, "server": server}
            ) from None
        record(
            "tool_error" if result.is_error else "ok",
            result.model_dump(mode="json", by_alias=True, exclude_none=True),
        )
        return result

    # --- calls to other nodes ----------------------------------------------------------------

    def _call_recorder(
        self,
        who: Principal,
        server: str,
        tool: str,
        arguments: dict[str, Any] | None,
        *,
        operator: Peer | None,
        subject: str,
        started: float,
        remote: dict[str, str] | None = None,
    ) -> Callable[..., None]:
        """``record(outcome, result=None, code=None)``: the call's ``mcp_call`` ledger entry.

        Hashes of the arguments and the result, never their content; ``remote``
        (label and node) for a call this gateway sent to another node.
        """

        def record(outcome: str, result: Any = None, code: int | None = None) -> None:
            data: dict[str, Any] = {
                "caller": {
                    "node": who.node or self.config.node,
                    "agent": who.agent,
                    "uid": who.uid,
                },
                "server": server,
                "tool": tool,
            }
            if remote is not None:
                data["remote"] = remote
            data["arguments_sha256"] = digest(arguments or {})
            data["duration_ms"] = round((self.clock() - started) * 1000, 3)
            data["outcome"] = outcome
            if result is not None:
                data["result_sha256"] = digest(result)
            if code is not None:
                data["error_code"] = code
            if operator is not None:
                data["operator_uid"] = operator.uid
            self.record("mcp_call", subject, data)

        return record

    async def _call_remote(
        self,
        who: Principal,
        target: tuple[str, str, str],
        arguments: dict[str, Any] | None,
        *,
        operator: Peer | None,
    ) -> types.CallToolResult:
        """``LABEL.SERVER.TOOL``: sent to the label's node as the calling agent, and recorded."""
        assert self.link is not None
        label, server, tool = target
        entry = self.config.remote[label]
        name = remote.remote_name(label, server, tool)
        started = self.clock()

        record = self._call_recorder(
            who,
            server,
            tool,
            arguments,
            operator=operator,
            subject=name,
            started=started,
            remote={"label": label, "node": entry.node},
        )

        if who.agent is None:
            self.refused += 1
            record("refused", code=FORBIDDEN)
            raise MCPError(
                FORBIDDEN,
                f"{who.describe()} may use no tool of another node: the hosting node's share "
                "grants name agents (operators use `keel mcp call --as AGENT`)",
                data={"keel": "forbidden", "tool": name},
            )
        if not entry.offers(server):
            record("unknown_tool", code=types.INVALID_PARAMS)
            raise MCPError(
                types.INVALID_PARAMS,
                f"unknown tool {name!r}: this gateway offers no server {server!r} of {label} "
                "(mcp.json's remote)",
            )
        try:
            answer = await self.link.ask(
                entry, who.agent, "call", server=server, tool=tool, arguments=arguments
            )
        except asyncio.CancelledError:
            record("cancelled")  # and the link has sent the host a cancel
            raise
        except MCPError as exc:
            record(_outcome(exc.code), code=exc.code)
            if exc.code == FORBIDDEN:
                self.refused += 1
            raise
        if answer.result is None:
            record(_outcome(answer.code), code=answer.code)
            if answer.code == FORBIDDEN:
                self.refused += 1
            raise MCPError(answer.code, f"{label}: {answer.message}", data={"node": entry.node})
        try:
            result = types.CallToolResult.model_validate(answer.result)
        except ValueError:
            record("error", code=types.INTERNAL_ERROR)
            raise MCPError(
                types.INTERNAL_ERROR, f"node {entry.node} ({label}) sent a result keel cannot read"
            ) from None
        record("tool_error" if result.is_error else "ok", answer.result)
        return result

    # --- calls from other nodes (the mesh's seam) ---------------------------------------------

    async def call_from_node(
        self,
        node: str,
        agent: str | None,
        name: str,
        arguments: dict[str, Any] | None,
        *,
        timeout: float | None = None,
    ) -> types.CallToolResult:
        """A call relayed by the mesh from ``agent`` on ``node``, both as the mesh authenticated them.

        This node's ``share`` grants with ``nodes`` decide (``agent`` None, a
        process of that node that is no agent, is granted nothing); the answer
        (or the :class:`MCPError`) goes back to the calling gateway as it is.
        """
        return await self.call(Principal(agent, node=node), name, arguments, timeout=timeout)

    def tools_for_node(self, node: str, agent: str) -> list[types.Tool]:
        """What ``agent`` on ``node`` may see of this node's tools."""
        return self.tools_for(Principal(agent, node=node))

    def record_not_run(
        self, node: str, agent: str | None, request: remote.Request, outcome: str
    ) -> None:
        """A request from ``node`` not run: it arrived after its deadline (``expired``), or
        its caller cancelled it while it waited for its turn (``cancelled``)."""
        self.calls += 1
        name = qualified(request.server, request.tool) if request.kind == "call" else "tools/list"
        self.record(
            "mcp_call",
            name,
            {
                "caller": {"node": node, "agent": agent, "uid": None},
                "server": request.server,
                "tool": request.tool,
                "arguments_sha256": digest(request.arguments),
                "duration_ms": 0.0,
                "outcome": outcome,
                **({"error_code": types.REQUEST_TIMEOUT} if outcome == "expired" else {}),
            },
        )

    # --- control verbs ---------------------------------------------------------------------------

    def verbs(self) -> Mapping[str, Handler]:
        return {"tools": self._tools_verb, "call": self._call_verb}

    def status(self) -> dict[str, Any]:
        servers: dict[str, Any] = {}
        for name, upstream in sorted(self.upstreams.items()):
            spec = upstream.spec
            entry = upstream.status()
            entry["unit"] = spec.unit_name if spec.runs_here else None
            entry["tier"] = spec.tier
            entry["share"] = self.policy.shared_with(name)
            entry["agents"] = self.policy.agents_seeing(name)
            servers[name] = entry
        return {
            "servers": servers,
            "listen": str(self.config.listen),
            "http": str(self.config.http) if self.config.http else None,
            "node": self.config.node,
            "agents": sorted(self.config.agents),
            "connections": len(self.connections),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "calls": self.calls,
            "refused": self.refused,
            "mesh": None if self.link is None else self.link.status(),
        }

    async def _tools_verb(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        agent = args.get("agent")
        if not isinstance(agent, str) or agent not in self.config.agents:
            known = ", ".join(sorted(self.config.agents)) or "none"
            raise BadRequest(f"no agent named {agent!r} (the gateway knows: {known})")
        tools = await self.all_tools_for(Principal(agent))
        return {
            "agent": agent,
            "tools": [{"name": tool.name, "description": tool.description or ""} for tool in tools],
        }

    async def _call_verb(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        name = args.get("tool")
        arguments = args.get("arguments", {})
        as_agent = args.get("as")
        timeout = args.get("timeout")
        if not isinstance(name, str) or not name:
            raise BadRequest("call needs a tool: SERVER.TOOL")
        if not isinstance(arguments, dict):
            raise BadRequest("arguments must be a JSON object")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise BadRequest("timeout must be a number of seconds > 0")
        if as_agent is not None and (
            not isinstance(as_agent, str) or as_agent not in self.config.agents
        ):
            raise BadRequest(f"no agent named {as_agent!r} to call as")
        who = Principal(as_agent, uid=peer.uid) if as_agent else Principal(None, uid=peer.uid)
        try:
            result = await self.call(who, name, arguments, operator=peer, timeout=timeout)
        except MCPError as exc:
            if exc.code == FORBIDDEN:
                raise Forbidden(exc.message) from None
            raise KeelError(f"{exc.message} (JSON-RPC error {exc.code})") from None
        return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def _outcome(code: int) -> str:
    """The ledger's outcome for a JSON-RPC error code."""
    return {
        FORBIDDEN: "refused",
        types.INVALID_PARAMS: "unknown_tool",
        UNAVAILABLE: "unavailable",
        TIMEOUT: "timeout",
    }.get(code, "error")
