"""keel mcp end to end: real MCP servers under watch, the gateway, agents under their own uids."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from keel.api import acall
from keel.mcp.gateway import FORBIDDEN
from keel.mcp.upstream import UNAVAILABLE
from keel.mcp.wire import digest
from keel.watch.children import pidfd_supported
from mcp import MCPError

from tests.integration.mcp_support import (
    FOREVER,
    KEEL,
    TESTS,
    UIDS,
    agent,
    fd_table,
    needs_root,
    open_fds,
    outcomes,
    process_count,
    release,
    running_world,
    start_giving_up,
    text_of,
    toolbox,
    until_sleeping,
    world_directory,
)
from tests.integration.watch_support import until, zombie_children

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not pidfd_supported(),
    reason="watch's process backend needs Linux 5.3+ (pidfd_open)",
)

world_dir = pytest.fixture(world_directory, name="world_dir")

SHARE: list[dict[str, Any]] = [
    {"agents": ["scout"], "tools": ["echo", "add", "pid", "crash", "sleep"]},
    {"agents": "*", "tools": ["echo"]},
]


def test_each_agent_sees_and_may_call_only_its_tools(world_dir: Path) -> None:
    needs_root()

    async def scenario() -> None:
        servers = [
            toolbox(share=SHARE),
            toolbox("vault", share=[{"agents": ["notes"], "tools": ["pid"]}]),
        ]
        async with running_world(world_dir, servers, http=str(world_dir / "http.sock")) as world:
            for mode in ("legacy", "2026-07-28"):
                scout = await agent(
                    world,
                    "scout",
                    "list",
                    'call:toolbox.add:{"a": 2, "b": 40}',
                    "call:vault.pid:{}",
                    mode=mode,
                )
                assert scout[0]["tools"] == [
                    "toolbox.echo",
                    "toolbox.add",
                    "toolbox.pid",
                    "toolbox.sleep",
                    "toolbox.crash",
                ]
                assert text_of(scout[1]) == "42"
                assert scout[2]["error"]["code"] == FORBIDDEN
                assert "vault.pid is not shared with agent scout" in scout[2]["error"]["message"]

            notes = await agent(
                world, "notes", "list", 'call:toolbox.add:{"a": 1, "b": 1}', "call:vault.pid:{}"
            )
            assert notes[0]["tools"] == ["toolbox.echo", "vault.pid"]
            assert notes[1]["error"]["code"] == FORBIDDEN
            assert text_of(notes[2]).isdigit()

            # A uid the gateway knows no agent for: nothing, whatever the grants say.
            stranger = await agent(world, "stranger", "list", 'call:toolbox.echo:{"text": "hi"}')
            assert stranger[0]["tools"] == []
            assert stranger[1]["error"]["code"] == FORBIDDEN
            assert f"uid {UIDS['stranger']} (not a keel agent)" in stranger[1]["error"]["message"]

            # Streamable HTTP on a Unix socket: the same decisions, from the same credentials.
            over_http = await agent(
                world, "notes", "list", 'call:toolbox.echo:{"text": "via http"}', http=True
            )
            assert over_http[0]["tools"] == ["toolbox.echo", "vault.pid"]
            assert text_of(over_http[1]) == "via http"
            refused = await agent(world, "notes", "call:toolbox.add:{}", http=True)
            assert refused[0]["error"]["code"] == FORBIDDEN

            # A name that is no tool gets the JSON-RPC error MCP asks for; a tool name no
            # grant covers is refused without saying whether the tool exists.
            unknown = await agent(world, "scout", "call:nothing:{}", "call:toolbox.nothing:{}")
            assert [answer["error"]["code"] for answer in unknown] == [-32602, FORBIDDEN]

            calls = [e for e in await world.settled_ledger() if e["kind"] == "mcp_call"]
        first = next(
            e for e in calls if e["data"]["tool"] == "add" and e["data"]["outcome"] == "ok"
        )
        assert first["source"] == "mcp"
        assert first["subject"] == "toolbox.add"
        assert first["data"]["caller"] == {"node": None, "agent": "scout", "uid": UIDS["scout"]}
        assert first["data"]["arguments_sha256"] == digest({"a": 2, "b": 40})
        assert len(first["data"]["result_sha256"]) == 64
        assert first["data"]["duration_ms"] >= 0
        outcomes = {e["data"]["outcome"] for e in calls}
        assert {"ok", "refused", "unknown_tool"} <= outcomes
        # Hashes, never content.
        assert not any("via http" in json.dumps(e) for e in calls)

    asyncio.run(scenario())


def test_one_server_process_serves_every_agent(world_dir: Path) -> None:
    needs_root()

    async def scenario() -> None:
        share = [{"agents": "*", "tools": ["pid"]}]
        async with running_world(world_dir, [toolbox(share=share)]) as world:
            answers = await asyncio.gather(
                *(
                    agent(world, who, "call:toolbox.pid:{}", "call:toolbox.pid:{}")
                    for who in ("scout", "notes") * 3
                )
            )
            pids = {text_of(answer) for batch in answers for answer in batch}
            assert pids == {str(world.server_pid())}
            assert world.gateway.upstreams["toolbox"].connections == 1
            server = world.server_pid()
            assert server is not None
            assert process_count(server) == 1  # the server itself: keel mcp exec became it

    asyncio.run(scenario())


def test_a_server_that_dies_mid_call_fails_the_call_and_comes_back(world_dir: Path) -> None:
    needs_root()

    async def scenario() -> None:
        async with running_world(world_dir, [toolbox(share=SHARE)]) as world:
            before = world.server_pid()
            crashed = await agent(world, "scout", "call:toolbox.crash:{}")
            # The connection's end fails the call (UNAVAILABLE), not the call timeout (60 s).
            assert crashed[0]["error"]["code"] == UNAVAILABLE
            assert "went away during the call" in crashed[0]["error"]["message"]

            # watch restarts it; the agent's next calls work, with nothing done by anyone.
            await until(lambda: world.server_pid() not in (None, before), what="server restarted")
            await world.ready()
            again = await agent(world, "scout", "call:toolbox.pid:{}")
            assert text_of(again[0]) == str(world.server_pid())
            assert world.watch.status()["agents"]["keel-mcp-toolbox"]["restarts"] >= 1

            # Stopped on purpose: calls fail at once (UNAVAILABLE), and work once it is back.
            await acall(world.root / "watch.sock", "stop", {"agent": "keel-mcp-toolbox"})
            await until(
                lambda: world.gateway.upstreams["toolbox"].state != "ready", what="server down"
            )
            down = await agent(world, "scout", 'call:toolbox.echo:{"text": "x"}')
            assert down[0]["error"]["code"] == UNAVAILABLE
            assert "restarting or down" in down[0]["error"]["message"]
            await acall(world.root / "watch.sock", "start", {"agent": "keel-mcp-toolbox"})
            await world.ready()
            back = await agent(world, "scout", 'call:toolbox.echo:{"text": "back"}')
            assert text_of(back[0]) == "back"
            outcomes = [
                e["data"]["outcome"]
                for e in await world.settled_ledger()
                if e["kind"] == "mcp_call"
            ]
            assert outcomes.count("unavailable") == 2

    asyncio.run(scenario())


def test_an_agent_that_gives_up_stops_the_call_in_the_server(world_dir: Path) -> None:
    """notifications/cancelled, or the agent's connection ending, stops the server's tool."""
    needs_root()

    async def scenario() -> None:
        async with running_world(world_dir, [toolbox(share=SHARE)]) as world:
            for n, verb in enumerate(("cancel", "drop"), start=1):
                proc = await start_giving_up(
                    world, f"{verb}:toolbox.sleep:{FOREVER}", "toolbox.sleep"
                )
                await until_sleeping(world, 1)
                await release(proc)
                expected = ["cancelled"] * n

                def recorded(expected: list[str] = expected) -> bool:
                    return outcomes(world, "sleep") == expected

                await until(recorded, what=f"{verb}: the call recorded cancelled")
                await until_sleeping(world, 0)
            assert world.server_pid() is not None  # the same server, still serving
            done = await agent(world, "scout", 'call:toolbox.sleep:{"seconds": 0}')
            assert text_of(done[0]) == "slept"

    asyncio.run(scenario())


def test_a_thousand_killed_clients_leave_nothing_behind(world_dir: Path) -> None:
    needs_root()
    per_process, processes = 250, 4

    async def scenario() -> None:
        async with running_world(world_dir, [toolbox(share=SHARE)], max_connections=2048) as world:
            gateway = world.gateway
            server = world.server_pid()
            assert server is not None
            await agent(world, "scout", "list")  # warm: every lazy import and task in place
            await until(lambda: not gateway.connections, what="warm-up connection closed")
            fds_before, tasks_before = fd_table(), len(asyncio.all_tasks())
            server_fds_before = open_fds(server)
            children_before = process_count(os.getpid())
            zombies_before = set(zombie_children())

            floods = []
            for _ in range(processes):
                uid = UIDS["scout"]
                proc = await asyncio.create_subprocess_exec(
                    "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                    sys.executable, str(TESTS / "mcp_flood.py"), str(world.listen), str(per_process), "1",
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                floods.append(proc)
            for proc in floods:
                assert proc.stdout is not None
                assert await asyncio.wait_for(proc.stdout.readline(), 120) == b"ready\n"
            total = per_process * processes
            await until(lambda: gateway.accepted >= total + 1, what="every connection accepted")
            assert len(gateway.connections) == total
            for proc in floods:
                proc.send_signal(signal.SIGKILL)
            for proc in floods:
                await proc.wait()

            await until(lambda: not gateway.connections, what="every connection closed", timeout=60)

            # Nothing opened since: a descriptor of an earlier test closed meanwhile (by
            # the garbage collector, say) is not this test's business.
            def new_fds() -> dict[int, str]:
                return {fd: what for fd, what in fd_table().items() if fds_before.get(fd) != what}

            with contextlib.suppress(AssertionError):
                await until(lambda: not new_fds(), what="descriptors closed", timeout=60)
            assert not new_fds(), f"descriptors left open: {new_fds()} (before: {fds_before})"
            await until(
                lambda: len(asyncio.all_tasks()) <= tasks_before, what="tasks back", timeout=60
            )
            assert process_count(os.getpid()) == children_before
            assert world.server_pid() == server  # the server never noticed
            assert open_fds(server) == server_fds_before
            # No zombies among our children either.
            assert set(zombie_children()) <= zombies_before
            again = await agent(world, "scout", 'call:toolbox.echo:{"text": "still here"}')
            assert text_of(again[0]) == "still here"

    asyncio.run(scenario())


async def _exchange(path: Path, data: bytes) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 22)
    writer.write(data)
    await writer.drain()
    answers = []
    for _ in range(data.count(b"\n")):
        line = await asyncio.wait_for(reader.readline(), 30)
        if not line:
            break
        answers.append(json.loads(line))
    writer.close()
    return answers


def test_hostile_clients_get_errors_and_nobody_else_notices(world_dir: Path) -> None:
    needs_root()

    async def scenario() -> None:
        async with running_world(
            world_dir, [toolbox(share=SHARE)], max_message=65536, write_timeout=1
        ) as world:
            listen = world.listen
            ping = b'{"jsonrpc": "2.0", "id": 9, "method": "ping"}\n'
            answers = await _exchange(
                listen,
                b"this is not json\n"
                + b'{"hello": "world", "id": 4}\n'
                + b"[1, 2, 3]\n"
                + b"[" * 50_000
                + b"\n"
                + ping,
            )
            assert [a.get("error", {}).get("code") for a in answers[:4]] == [
                -32700,
                -32600,
                -32600,
                -32700,
            ]
            assert answers[1]["id"] == 4
            assert answers[4] == {"jsonrpc": "2.0", "id": 9, "result": {}}

            # A message over the limit: an error, then the connection ends.
            reader, writer = await asyncio.open_unix_connection(str(listen))
            writer.write(b'{"jsonrpc": "2.0", "id": 1, "method": "' + b"x" * 100_000 + b'"}\n')
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 30)
            assert "larger than 65536 bytes" in json.loads(line)["error"]["message"]
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()

            # A client that sends and never reads is cut off after write_timeout.
            reader, writer = await asyncio.open_unix_connection(str(listen))
            cut_off = False
            for _ in range(20_000):
                writer.write(ping * 50)
                try:
                    await asyncio.wait_for(writer.drain(), 30)
                except (ConnectionError, TimeoutError):
                    cut_off = True
                    break
                if writer.transport.is_closing() or reader.at_eof():
                    cut_off = True
                    break
            if not cut_off:
                # Everything was sent: the gateway's answers are what never got read.
                await until(lambda: not world.gateway.connections, what="slow reader dropped")
                cut_off = True
            assert cut_off
            writer.transport.abort()

            # Meanwhile and after: other agents are served as always.
            fine = await agent(world, "notes", "list", 'call:toolbox.echo:{"text": "fine"}')
            assert fine[0]["tools"] == ["toolbox.echo"]
            assert text_of(fine[1]) == "fine"
            assert world.gateway.upstreams["toolbox"].state == "ready"

    asyncio.run(scenario())


def test_operators_list_and_call_through_the_control_socket(world_dir: Path) -> None:
    needs_root()

    async def scenario() -> None:
        async with running_world(world_dir, [toolbox(share=SHARE)]) as world:
            sock = str(world.root / "mcp.sock")

            def keel(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [KEEL, "mcp", *args, "--socket", sock],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )

            listing = await asyncio.to_thread(keel, "list", "--json")
            status = json.loads(listing.stdout)["servers"]["toolbox"]
            assert status["state"] == "ready"
            assert status["agents"] == ["notes", "scout"]
            assert "crash" in status["tools"]
            table = await asyncio.to_thread(keel, "list")
            assert "toolbox" in table.stdout
            assert "scout: " in table.stdout

            tools = await asyncio.to_thread(keel, "tools", "notes", "--json")
            assert [t["name"] for t in json.loads(tools.stdout)["tools"]] == ["toolbox.echo"]

            called = await asyncio.to_thread(
                keel, "call", "toolbox.add", "--arg", "a=20", "--arg", "b=22"
            )
            assert called.returncode == 0, called.stderr
            assert called.stdout.strip() == "42"
            refused = await asyncio.to_thread(
                keel, "call", "toolbox.add", "--as", "notes", "--json-args", '{"a": 1, "b": 2}'
            )
            assert refused.returncode == 1
            assert "toolbox.add is not shared with agent notes" in refused.stderr
            assert "Traceback" not in refused.stderr
            failed = await asyncio.to_thread(keel, "call", "toolbox.fail", "--arg", "message=boom")
            assert failed.returncode == 1
            assert "Error executing tool fail" in failed.stdout  # the SDK's words; no traceback
            unknown = await asyncio.to_thread(keel, "tools", "ghost")
            assert unknown.returncode == 2
            assert "no agent named 'ghost'" in unknown.stderr
            entries = [e for e in await world.settled_ledger() if e["kind"] == "mcp_call"]
            assert any(
                e["data"].get("operator_uid") == 0 and e["data"]["outcome"] == "ok" for e in entries
            )
            assert any(e["data"]["outcome"] == "tool_error" for e in entries)

    asyncio.run(scenario())


def test_calls_from_other_nodes_meet_the_hosting_node_s_grants(world_dir: Path) -> None:
    """The seam the mesh transport will use: node and agent as the mesh authenticated them."""
    needs_root()
    node_a, node_b = "a" * 32, "b" * 32
    share = [
        {"agents": ["scout"], "tools": ["echo"]},
        {"nodes": [node_a], "agents": ["scout"], "tools": ["add"]},
    ]

    async def scenario() -> None:
        async with running_world(world_dir, [toolbox(share=share)]) as world:
            gateway = world.gateway
            assert [t.name for t in gateway.tools_for_node(node_a, "scout")] == ["toolbox.add"]
            assert gateway.tools_for_node(node_b, "scout") == []
            result = await gateway.call_from_node(node_a, "scout", "toolbox.add", {"a": 1, "b": 2})
            assert result.content[0].text == "3"  # type: ignore[union-attr]
            for node, name in ((node_b, "toolbox.add"), (node_a, "toolbox.echo")):
                with pytest.raises(MCPError) as refused:
                    await gateway.call_from_node(node, "scout", name, {"text": "x"})
                assert refused.value.code == FORBIDDEN
                assert f"scout@{node}" in refused.value.message
            # A local agent named like the remote one has only its own grants.
            local = await agent(world, "scout", 'call:toolbox.add:{"a": 1, "b": 1}')
            assert local[0]["error"]["code"] == FORBIDDEN
            entries = [e for e in await world.settled_ledger() if e["kind"] == "mcp_call"]
        remote = [e["data"] for e in entries if e["data"]["caller"]["node"] == node_a]
        assert [(e["tool"], e["outcome"]) for e in remote] == [("add", "ok"), ("echo", "refused")]

    asyncio.run(scenario())
