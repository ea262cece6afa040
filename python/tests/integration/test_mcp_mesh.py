"""keel mcp across the mesh: an agent on node A calls a tool hosted on node B, through both gateways.

Everything is real: two ``keel mesh serve`` processes joined into one mesh
(Noise sessions on loopback), two gateways (each with watch running its MCP
servers), and agents under their own uids (setpriv) on A. B's share grants
are applied to the node and agent the mesh authenticated; A's mesh applies
the agent's own ``sendTo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from keel import api, service
from keel.errors import ApiError
from keel.mcp import remote
from keel.mcp.gateway import FORBIDDEN
from keel.mcp.remote import Answer, Request
from keel.mcp.upstream import TIMEOUT
from keel.mcp.wire import digest
from keel.mesh.ids import new_message_id
from keel.mesh.kem import available_backends
from keel.watch import config as watch_config
from keel.watch.children import pidfd_supported
from keel.watch.daemon import Watch
from keel.watch.process_backend import ProcessBackend

from tests.integration.mcp_support import (
    FOREVER,
    KEEL,
    UIDS,
    World,
    agent,
    needs_root,
    outcomes,
    release,
    running_world,
    sleeping,
    start_giving_up,
    text_of,
    toolbox,
    until_sleeping,
    world_directory,
    write_world,
)
from tests.integration.mesh.nodes import FAST, Node
from tests.integration.watch_support import until

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not pidfd_supported(),
    reason="watch's process backend needs Linux 5.3+ (pidfd_open)",
)

world_dir = pytest.fixture(world_directory, name="world_dir")

DEADLINE = 4.0
BLOB = 1_100_000


@pytest.fixture
def mesh_pair() -> Iterator[tuple[Node, Node]]:
    """Nodes a and b, joined and connected; a knows agents scout (may reach b) and idle (no mesh)."""
    needs_root()
    if all(reason is not None for reason in available_backends().values()):
        pytest.skip(f"no ML-KEM-768 backend: {available_backends()}")
    tmp = Path(tempfile.mkdtemp(prefix="kmm-"))
    made: list[Node] = []
    try:
        b = Node(tmp / "b", name="b")
        made.append(b)
        b.start()
        roster = {
            "scout": {"uid": UIDS["scout"], "tier": 2, "mesh": {"sendTo": [b.node_id]}},
            "notes": {"uid": UIDS["notes"], "tier": 1},  # the tier's default: every node
            "idle": {"uid": UIDS["idle"], "tier": 2},  # tier 2 without a grant: no mesh
        }
        a = Node(tmp / "a", name="a", config={**FAST, "agents": roster})
        made.append(a)
        a.start()
        b.join(a)
        a.wait_connected(b)
        b.wait_connected(a)
        yield a, b
    finally:
        for node in made:
            node.kill()
            node.client.close()
        for node in made:
            assert "Traceback" not in node.log(), node.log()[-4000:]
        shutil.rmtree(tmp, ignore_errors=True)


def hosted(a: str) -> list[dict[str, Any]]:
    """B's servers: toolbox shared with a's scout (echo, add) and a's every agent (echo)."""
    return [
        toolbox(
            share=[
                {"nodes": [a], "agents": ["scout"], "tools": ["echo", "add", "sleep", "blob"]},
                {"nodes": [a], "agents": "*", "tools": ["echo"]},
            ]
        ),
        toolbox("vault", share=[{"agents": ["notes"], "tools": ["pid"]}]),  # b's own agents only
    ]


def test_an_agent_calls_a_tool_on_another_node_within_the_hosts_grants(
    mesh_pair: tuple[Node, Node], world_dir: Path
) -> None:
    a, b = mesh_pair
    (world_dir / "a").mkdir(mode=0o755)
    (world_dir / "b").mkdir(mode=0o755)

    async def scenario() -> None:
        async with running_world(
            world_dir / "b",
            hosted(a.node_id),
            agents={"notes": 1},
            node=b.node_id,
            mesh={"socket": str(b.socket), "deadline": DEADLINE},
        ) as host:
            await raw_requests(a, b, host)
            await calls_from_a(a, b, host, world_dir)

    asyncio.run(scenario())


def ask_raw(a: Node, b: Node, request: Request, as_agent: str | None) -> Answer:
    """``request`` sent to b by a's node itself (root), as ``as_agent``; b's answer."""
    a.client.send(b.node_id, remote.CALL_TOPIC, remote.encode(request), as_agent=as_agent)
    while True:
        for message in a.client.recv(remote.ANSWER_TOPIC, wait=20):
            assert message.sender == b.node_id
            answer = remote.decode_answer(message.data)
            if answer.id == request.id:
                a.client.ack()
                return answer


async def raw_requests(a: Node, b: Node, host: World) -> None:
    """What b's gateway does with requests no gateway of a would send (before a's gateway runs)."""
    late = Request(new_message_id(), "call", time.time() - 1, "toolbox", "echo", {"text": "late"})
    answer = await asyncio.to_thread(ask_raw, a, b, late, "scout")
    assert (answer.result, answer.code) == (None, TIMEOUT)
    assert "after its deadline; not run" in answer.message
    # a process of a that is no agent (here root, without as_agent) gets nothing
    call = Request(new_message_id(), "call", time.time() + 30, "toolbox", "echo", {"text": "x"})
    answer = await asyncio.to_thread(ask_raw, a, b, call, None)
    assert answer.code == FORBIDDEN
    assert f"a process of node {a.node_id} that is no agent may use no tool" in answer.message
    listed = await asyncio.to_thread(
        ask_raw, a, b, Request(new_message_id(), "list", time.time() + 30), None
    )
    assert listed.result == {"tools": []}
    entries = [e for e in await host.settled_ledger() if e["kind"] == "mcp_call"]
    assert [(e["data"]["caller"]["agent"], e["data"]["outcome"]) for e in entries] == [
        ("scout", "expired"),
        (None, "refused"),
    ]
    assert entries[0]["data"]["caller"]["node"] == a.node_id


async def calls_from_a(a: Node, b: Node, host: World, world_dir: Path) -> None:
    """An agent on a lists and calls b's tools through a's gateway."""
    async with running_world(
        world_dir / "a",
        [toolbox("local", share=[{"agents": ["scout"], "tools": ["echo"]}])],
        agents={"scout": 2, "notes": 1, "idle": 2},
        node=a.node_id,
        mesh={"socket": str(a.socket), "deadline": DEADLINE, "list_ttl": 30},
        remote={"b": {"node": b.node_id, "servers": "*"}},
    ) as caller:
        scout = await agent(
            caller,
            "scout",
            "list",
            'call:b.toolbox.add:{"a": 2, "b": 40}',
            'call:b.toolbox.echo:{"text": "across"}',
            "call:b.vault.pid:{}",
            "call:b.toolbox.pid:{}",
            "call:b.nothing:{}",
        )
        # its own node's tools, then b's as the host shares them with scout@a
        assert scout[0]["tools"] == [
            "local.echo",
            "b.toolbox.echo",
            "b.toolbox.add",
            "b.toolbox.sleep",
            "b.toolbox.blob",
        ]
        assert text_of(scout[1]) == "42"
        assert text_of(scout[2]) == "across"
        # vault shares nothing with a; toolbox.pid is not scout@a's: refused by b
        for refused, tool in ((scout[3], "vault.pid"), (scout[4], "toolbox.pid")):
            assert refused["error"]["code"] == FORBIDDEN, refused
            assert (
                f"{tool} is not shared with agent scout@{a.node_id}"
                in (refused["error"]["message"])
            )
        assert scout[5]["error"]["code"] == -32602  # not LABEL.SERVER.TOOL

        # a result larger than one mesh message (960 KiB) comes back in parts: 2.2 MB of
        # JSON (the SDK's server sends the text twice, as content and structuredContent)
        big = await agent(caller, "scout", f'call:b.toolbox.blob:{{"size": {BLOB}}}')
        assert text_of(big[0]) == "x" * BLOB
        assert len(json.dumps(big[0]["result"])) > 2 * 1024 * 1024
        blob_entries = [
            e["data"]
            for w in (host, caller)
            for e in await w.settled_ledger()
            if e["data"].get("tool") == "blob"
        ]
        assert [e["outcome"] for e in blob_entries] == ["ok", "ok"]
        assert blob_entries[0]["result_sha256"] == blob_entries[1]["result_sha256"]

        notes = await agent(caller, "notes", "list", "call:b.toolbox.add:{}")
        assert notes[0]["tools"] == ["b.toolbox.echo"]  # the host's "*" grant only
        assert notes[1]["error"]["code"] == FORBIDDEN

        # a tier-2 agent without a mesh grant: a's mesh will not carry its call
        idle = await agent(caller, "idle", "list", 'call:b.toolbox.echo:{"text": "x"}')
        assert idle[0]["tools"] == []
        assert idle[1]["error"]["code"] == FORBIDDEN
        message = idle[1]["error"]["message"]
        assert "the mesh refused to carry the call" in message
        assert f"agent idle (tier 2, uid {UIDS['idle']}) may not send to {b.node_id}" in message

        # the hosting ledger names the calling agent as the mesh authenticated it
        calls = [e for e in await host.settled_ledger() if e["kind"] == "mcp_call"]
        add = next(e for e in calls if e["data"]["tool"] == "add" and e["data"]["outcome"] == "ok")
        assert add["subject"] == "toolbox.add"
        assert add["data"]["caller"] == {"node": a.node_id, "agent": "scout", "uid": None}
        assert add["data"]["arguments_sha256"] == digest({"a": 2, "b": 40})
        refusals = {
            (e["data"]["caller"]["agent"], e["subject"])
            for e in calls
            if e["data"]["outcome"] == "refused"
        }
        assert refusals == {
            (None, "toolbox.echo"),  # raw_requests' call from a's root
            ("scout", "vault.pid"),
            ("scout", "toolbox.pid"),
            ("notes", "toolbox.add"),
        }
        assert not any(e["data"]["caller"]["agent"] == "idle" for e in calls)
        # the calling side records its remote calls too, with the target node
        mine = [e for e in await caller.settled_ledger() if e["kind"] == "mcp_call"]
        remote_add = next(e for e in mine if e["subject"] == "b.toolbox.add")
        assert remote_add["data"]["remote"] == {"label": "b", "node": b.node_id}
        assert remote_add["data"]["caller"]["agent"] == "scout"
        assert remote_add["data"]["outcome"] == "ok"
        assert remote_add["data"]["result_sha256"] == add["data"]["result_sha256"]
        idle_entry = next(e for e in mine if e["data"]["caller"]["agent"] == "idle")
        assert idle_entry["data"]["outcome"] == "refused"

        # the operator's commands show them too
        def keel(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [KEEL, "mcp", *args, "--socket", str(caller.config.common.socket)],
                check=False, capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        tools = await asyncio.to_thread(keel, "tools", "scout", "--json")
        assert tools.returncode == 0, tools.stderr
        assert [t["name"] for t in json.loads(tools.stdout)["tools"]] == scout[0]["tools"]
        listing = await asyncio.to_thread(keel, "list")
        assert listing.returncode == 0, listing.stderr
        assert "b.*" in listing.stdout
        assert f"node {b.node_id}" in listing.stdout
        status = json.loads((await asyncio.to_thread(keel, "list", "--json")).stdout)
        assert status["mesh"]["remote"] == {"b": {"node": b.node_id, "servers": "*"}}
        called = await asyncio.to_thread(
            keel, "call", "b.toolbox.add", "--json-args", '{"a": 1, "b": 2}', "--as", "scout"
        )
        assert called.returncode == 0, called.stderr
        assert "3" in called.stdout
        unnamed = await asyncio.to_thread(keel, "call", "b.toolbox.echo", "--arg", "text=x")
        assert unnamed.returncode != 0
        assert "use `keel mcp call --as AGENT`" in unnamed.stderr

        # at most once: b's gateway acknowledged the request before it runs the tool
        before = host.gateway.calls
        slow = asyncio.create_task(agent(caller, "scout", 'call:b.toolbox.sleep:{"seconds": 1}'))
        await until(lambda: host.gateway.calls > before, what="b running the call")
        assert (await asyncio.to_thread(b.status))["inbox"] == 0
        assert text_of((await slow)[0]) == "slept"

        # b goes down: a call gets an error naming the node, within the deadline
        b.kill()
        down = await agent(caller, "scout", 'call:b.toolbox.echo:{"text": "anyone?"}')
        assert down[0]["error"]["code"] == TIMEOUT, down
        assert (
            f"node {b.node_id} (b) did not answer within {DEADLINE:g} s"
            in (down[0]["error"]["message"])
        )
        # the list it had is still cached (list_ttl), so tools/list does not wait on b
        listed = await agent(caller, "scout", "list")
        assert listed[0]["tools"] == [
            "local.echo",
            "b.toolbox.echo",
            "b.toolbox.add",
            "b.toolbox.sleep",
            "b.toolbox.blob",
        ]


# --- a caller that gives up stops the call on the host ---------------------------------------


def test_a_call_its_caller_gives_up_on_is_cancelled_on_the_host(
    mesh_pair: tuple[Node, Node], world_dir: Path
) -> None:
    a, b = mesh_pair
    (world_dir / "a").mkdir(mode=0o755)
    (world_dir / "b").mkdir(mode=0o755)

    async def scenario() -> None:
        async with running_world(
            world_dir / "b",
            hosted(a.node_id),
            agents={"notes": 1},
            node=b.node_id,
            mesh={"socket": str(b.socket), "deadline": DEADLINE},
        ) as host:
            await cancels_only_from_the_caller(a, b, host)
            async with running_world(
                world_dir / "a",
                [toolbox("local")],
                agents={"scout": 2, "notes": 1, "idle": 2},
                node=a.node_id,
                mesh={"socket": str(a.socket), "deadline": DEADLINE},
                remote={"b": {"node": b.node_id, "servers": "*"}},
            ) as caller:
                await callers_giving_up(caller, host)

    asyncio.run(scenario())


async def cancels_only_from_the_caller(a: Node, b: Node, host: World) -> None:
    """A cancel counts only from the node and agent that sent the request; others are ignored."""
    link = host.gateway.link
    assert link is not None
    call = Request(
        new_message_id(), "call", time.time() + 60, "toolbox", "sleep", {"seconds": 3600}
    )
    cancel = remote.encode(Request(call.id, "cancel", call.deadline))
    await asyncio.to_thread(
        a.client.send, b.node_id, remote.CALL_TOPIC, remote.encode(call), as_agent="scout"
    )
    await until_sleeping(host, 1)
    # the same id from another agent of a, and from a process of a that is no agent: ignored
    await asyncio.to_thread(a.client.send, b.node_id, remote.CALL_TOPIC, cancel, as_agent="notes")
    await asyncio.to_thread(a.client.send, b.node_id, remote.CALL_TOPIC, cancel, as_agent=None)
    # a cancel of a request b never got: ignored
    other = remote.encode(Request(new_message_id(), "cancel", call.deadline))
    await asyncio.to_thread(a.client.send, b.node_id, remote.CALL_TOPIC, other, as_agent="scout")
    await until(lambda: link.cancels_ignored == 3, what="b ignoring three cancels")
    assert link.status()["running"] == 1
    assert await sleeping(host) == 1
    assert outcomes(host, "sleep") == []
    # the caller's own cancel stops it, on b and in the server
    await asyncio.to_thread(a.client.send, b.node_id, remote.CALL_TOPIC, cancel, as_agent="scout")
    await until(lambda: outcomes(host, "sleep") == ["cancelled"], what="b recording the cancel")
    await until_sleeping(host, 0)
    assert link.status()["running"] == 0
    entry = next(
        e for e in host.ledger() if e["kind"] == "mcp_call" and e["subject"] == "toolbox.sleep"
    )
    assert entry["data"]["caller"] == {"node": a.node_id, "agent": "scout", "uid": None}


async def callers_giving_up(caller: World, host: World) -> None:
    """The agent cancels, the agent goes away, a's deadline passes: each stops the call on b."""
    for n, verb in enumerate(("cancel", "drop"), start=2):
        proc = await start_giving_up(caller, f"{verb}:b.toolbox.sleep:{FOREVER}", "b.toolbox.sleep")
        await until_sleeping(host, 1)
        said = await release(proc)
        if verb == "cancel":
            assert said[-1] == {"cancelled": "b.toolbox.sleep"}
        on_b, on_a = ["cancelled"] * n, ["cancelled"] * (n - 1)

        def cancelled_on_b(expected: list[str] = on_b) -> bool:
            return outcomes(host, "sleep") == expected

        def cancelled_on_a(expected: list[str] = on_a) -> bool:
            return outcomes(caller, "sleep") == expected

        await until(cancelled_on_b, what=f"{verb}: b recording the call cancelled")
        await until_sleeping(host, 0)  # the server's call is gone, not only b's gateway's wait
        await until(cancelled_on_a, what=f"{verb}: a recording the call cancelled")
    # a's deadline passes: the agent gets a's timeout, and b stops the call
    late = await agent(caller, "scout", f"call:b.toolbox.sleep:{FOREVER}")
    assert late[0]["error"]["code"] == TIMEOUT, late
    await until(lambda: outcomes(host, "sleep") == ["cancelled"] * 4, what="the deadline's cancel")
    await until_sleeping(host, 0)
    assert outcomes(caller, "sleep") == ["cancelled", "cancelled", "timeout"]
    # the server is free: the next call runs at once
    done = await agent(caller, "scout", 'call:b.toolbox.sleep:{"seconds": 0}')
    assert text_of(done[0]) == "slept"


# --- the hosting gateway dies mid-call ------------------------------------------------------


class GatewayProcess:
    """b's gateway as its own process (``keel mcp serve``), to be killed and started again."""

    def __init__(self, mcp_file: Path, root: Path) -> None:
        self.mcp_file = mcp_file
        self.socket = root / "mcp.sock"
        self.log = root / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None

    def status(self) -> dict[str, Any]:
        result = api.call(self.socket, "status", service="mcp", timeout=10)
        assert isinstance(result, dict)
        return result

    def ready(self) -> bool:
        try:
            return bool(self.status()["servers"]["toolbox"]["state"] == "ready")
        except ApiError:
            return False

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [KEEL, "mcp", "serve", "--config", str(self.mcp_file)],
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        process = self.process

        async def ready() -> bool:
            assert process.poll() is None, self.log.read_text()[-4000:]
            return await asyncio.to_thread(self.ready)

        await until(ready, what="b's gateway ready")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)

    def call(self, tool: str) -> str:
        result = api.call(
            self.socket, "call", {"tool": tool, "arguments": {}}, service="mcp", timeout=30
        )
        return str(result["content"][0]["text"])


@contextlib.asynccontextmanager
async def hosted_by_process(root: Path, a: Node, b: Node) -> AsyncIterator[GatewayProcess]:
    """b's servers under watch (in this process) and b's gateway as a process of its own."""
    watch_file, mcp_file, _ = write_world(
        root,
        hosted(a.node_id),
        agents={"notes": 1},
        node=b.node_id,
        mesh={"socket": str(b.socket), "deadline": DEADLINE},
    )
    wconfig = watch_config.load(watch_file)
    watch = Watch(wconfig, ProcessBackend(wconfig.agents, state_file=wconfig.state_file))
    gateway = GatewayProcess(mcp_file, root)
    async with service.running("watch", watch, wconfig.common):
        try:
            await gateway.start()
            yield gateway
        finally:
            gateway.kill()


def test_the_hosting_gateway_dying_mid_call_fails_the_call_by_its_deadline(
    mesh_pair: tuple[Node, Node], world_dir: Path
) -> None:
    a, b = mesh_pair
    (world_dir / "a").mkdir(mode=0o755)
    (world_dir / "b").mkdir(mode=0o755)

    async def scenario() -> None:
        async with (
            hosted_by_process(world_dir / "b", a, b) as host,
            running_world(
                world_dir / "a",
                [toolbox("local", share=[{"agents": ["scout"], "tools": ["echo"]}])],
                agents={"scout": 2, "notes": 1, "idle": 2},
                node=a.node_id,
                mesh={"socket": str(a.socket), "deadline": DEADLINE},
                remote={"b": {"node": b.node_id, "servers": "*"}},
            ) as caller,
        ):
            call = asyncio.create_task(agent(caller, "scout", f"call:b.toolbox.sleep:{FOREVER}"))

            async def running() -> bool:
                return await asyncio.to_thread(host.call, "toolbox.sleeping") == "1"

            await until(running, what="b's server running the call")
            assert (await asyncio.to_thread(b.status))["inbox"] == 0  # acked before it ran
            host.kill()  # SIGKILL: no answer, no ledger entry, nothing said to a
            failed = await call
            assert failed[0]["error"]["code"] == TIMEOUT, failed
            assert (
                f"node {b.node_id} (b) did not answer within {DEADLINE:g} s"
                in failed[0]["error"]["message"]
            )
            # a's gateway is unharmed: its own tools work, nothing is left pending
            local = await agent(caller, "scout", 'call:local.echo:{"text": "still here"}')
            assert text_of(local[0]) == "still here"
            link = caller.gateway.link
            assert link is not None
            assert link.status()["pending"] == 0
            assert [
                e["data"]["outcome"]
                for e in await caller.settled_ledger()
                if e["subject"] == "b.toolbox.sleep"
            ] == ["timeout"]
            # b's gateway comes back; a does nothing, and the next call works
            await host.start()
            again = await agent(caller, "scout", 'call:b.toolbox.echo:{"text": "back"}')
            assert text_of(again[0]) == "back"
            # at most once: the acknowledged request was not handed out again (it would
            # be running now, for an hour, having come before the echo on the same topic)
            assert (await asyncio.to_thread(host.status))["mesh"]["running"] == 0
            assert await asyncio.to_thread(host.call, "toolbox.sleeping") == "0"
            assert not [e for e in _ledger(world_dir / "b") if e["subject"] == "toolbox.sleep"]

    asyncio.run(scenario())


def _ledger(root: Path) -> list[dict[str, Any]]:
    from tests.integration.watch_support import ledger_entries

    entries = [entry.as_dict() for entry in ledger_entries(root / "ledger.db")]
    return [e for e in entries if e["kind"] == "mcp_call"]
