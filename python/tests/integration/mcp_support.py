"""keel mcp's integration world: watch supervising real MCP servers, the gateway, agents under other uids.

Everything is real: the MCP servers are ``tests/mcp_server.py`` on the SDK,
run by watch's process backend through ``keel mcp exec --listen`` (the dev
form of the socket units), the gateway runs in this process on
:mod:`keel.service`, and agents are ``tests/mcp_agent.py`` processes started
with ``setpriv --reuid`` so the kernel names them by uid. Agents' uids have
no passwd entry: the gateway's config names them by uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from keel import service
from keel.api import Peer
from keel.mcp import config as mcp_config
from keel.mcp.gateway import McpGateway
from keel.mcp.policy import Principal
from keel.mcp.spec import parse_server_spec
from keel.mcp.units import watch_entries
from keel.watch import config as watch_config
from keel.watch.daemon import Watch
from keel.watch.process_backend import ProcessBackend
from mcp_types import TextContent

from tests.integration.watch_support import until

TESTS = Path(__file__).resolve().parents[1]
SERVER = TESTS / "mcp_server.py"
AGENT = TESTS / "mcp_agent.py"
KEEL = str(Path(sys.executable).parent / "keel")

# Numeric uids with no passwd entry, apart per test process.
BASE_UID = 61000 + (os.getpid() % 400) * 8
UIDS = {"scout": BASE_UID, "notes": BASE_UID + 1, "stranger": BASE_UID + 2, "idle": BASE_UID + 3}


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("agents under other uids need root (setpriv --reuid)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not found (util-linux)")


def world_directory() -> Iterator[Path]:
    """A directory other uids can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="keel-mcp-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def toolbox(
    name: str = "toolbox", share: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "command": [sys.executable, str(SERVER), "--name", name],
        "tier": 2,
        "share": share if share is not None else [],
        **extra,
    }


@dataclass
class World:
    root: Path
    gateway: McpGateway
    watch: Watch
    config: mcp_config.McpConfig

    @property
    def listen(self) -> Path:
        return self.config.listen

    def ledger(self) -> list[dict[str, Any]]:
        from tests.integration.watch_support import ledger_entries

        return [entry.as_dict() for entry in ledger_entries(self.root / "ledger.db")]

    async def settled_ledger(self) -> list[dict[str, Any]]:
        """The ledger once the gateway's recorder has written all it was given so far.

        The gateway records a call before it answers, and the recorder writes
        in the background: an answer the test holds has its entry queued, not
        yet on disk.
        """
        assert self.gateway.shell is not None
        assert await self.gateway.shell.recorder.flush(), "the gateway's ledger writes are stuck"
        return self.ledger()

    def server_pid(self, name: str = "toolbox") -> int | None:
        pid = self.watch.status()["agents"][f"keel-mcp-{name}"]["pid"]
        return int(pid) if pid else None

    async def ready(self, name: str = "toolbox") -> None:
        upstream = self.gateway.upstreams[name]
        await until(lambda: upstream.state == "ready", what=f"MCP server {name} ready")


def write_world(
    root: Path,
    servers: list[dict[str, Any]],
    *,
    agents: dict[str, int] | None = None,
    **gateway: Any,
) -> tuple[Path, Path, list[Any]]:
    """watch.json (running the servers) and mcp.json under ``root``; the servers' specs."""
    sockets = root / "servers"
    specs = [parse_server_spec(server, source=server["name"]) for server in servers]
    entries = watch_entries(specs, backend="process", sockets=sockets, program=KEEL)
    for name, entry in entries.items():
        entry.update(
            stop_timeout=2,
            log=str(root / f"{name}.log"),
            restart={"backoff_initial": 0.1, "backoff_max": 1.0, "stable_after": 5},
        )
    watch_file = root / "watch.json"
    watch_file.write_text(
        json.dumps(
            {
                "backend": "process",
                "socket": str(root / "watch.sock"),
                "ledger": str(root / "ledger.db"),
                "state_file": str(root / "processes.json"),
                "agents": entries,
            }
        )
    )
    tiers = agents if agents is not None else {"scout": 2, "notes": 1}
    mcp_file = root / "mcp.json"
    mcp_file.write_text(
        json.dumps(
            {
                "socket": str(root / "mcp.sock"),
                "ledger": str(root / "ledger.db"),
                "listen": str(root / "agents.sock"),
                "sockets": str(sockets),
                "servers": {server["name"]: server for server in servers},
                "agents": {name: {"uid": UIDS[name], "tier": tier} for name, tier in tiers.items()},
                **gateway,
            }
        )
    )
    return watch_file, mcp_file, specs


@contextlib.asynccontextmanager
async def running_world(
    root: Path,
    servers: list[dict[str, Any]],
    *,
    agents: dict[str, int] | None = None,
    **gateway: Any,
) -> AsyncIterator[World]:
    """watch running the servers, the gateway serving them; agents by tier (uids from UIDS)."""
    watch_file, mcp_file, specs = write_world(root, servers, agents=agents, **gateway)
    wconfig = watch_config.load(watch_file)
    watch = Watch(wconfig, ProcessBackend(wconfig.agents, state_file=wconfig.state_file))
    config = mcp_config.load(mcp_file)
    daemon = McpGateway(config)
    async with (
        service.running("watch", watch, wconfig.common),
        service.running("mcp", daemon, config.common),
    ):
        world = World(root, daemon, watch, config)
        for spec in specs:
            await world.ready(spec.name)
        yield world


async def agent(
    world: World, who: str, *ops: str, http: bool = False, mode: str = "legacy"
) -> list[dict[str, Any]]:
    """Run the test agent as ``who`` (its uid from UIDS); one parsed JSON line per op."""
    uid = UIDS[who]
    target = world.config.http if http else world.listen
    argv = [
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        sys.executable, str(AGENT), str(target), "--mode", mode, *(["--http"] if http else []), *ops,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


def text_of(answer: dict[str, Any]) -> str:
    assert "result" in answer, answer
    return str(answer["result"]["content"][0]["text"])


def process_count(root_pid: int) -> int:
    """Processes whose parent chain reaches ``root_pid`` (including it), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    count = 0
    for pid in parents:
        current = pid
        for _ in range(64):
            if current == root_pid:
                count += 1
                break
            current = parents.get(current, 0)
            if current <= 1:
                break
    return count


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_table(pid: int | str = "self") -> dict[int, str]:
    """Each open descriptor of ``pid`` and what it is (``socket:[inode]``, a path...)."""
    table = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            table[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return table


# --- callers that give up ---------------------------------------------------------------

OPERATOR = Peer(pid=0, uid=0, gid=0)
FOREVER = '{"seconds": 3600}'


async def sleeping(host: World) -> int:
    """How many ``sleep`` calls the world's toolbox server is running (asked as its operator)."""
    result = await host.gateway.call(Principal(None), "toolbox.sleeping", {}, operator=OPERATOR)
    block = result.content[0]
    assert isinstance(block, TextContent), result
    return int(block.text)


async def until_sleeping(host: World, count: int) -> None:
    async def reached() -> bool:
        return await sleeping(host) == count

    await until(reached, what=f"the server running {count} sleep calls")


def outcomes(world: World, tool: str) -> list[str]:
    return [
        e["data"]["outcome"]
        for e in world.ledger()
        if e["kind"] == "mcp_call" and e["data"]["tool"] == tool
    ]


async def start_giving_up(caller: World, op: str, name: str) -> asyncio.subprocess.Process:
    """Agent scout starts the call ``op`` (cancel:... or drop:...), to give it up on cue."""
    argv = [
        "setpriv", f"--reuid={UIDS['scout']}", f"--regid={UIDS['scout']}", "--clear-groups",
        sys.executable, str(AGENT), str(caller.listen), op,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert json.loads(first) == {"calling": name}, first
    return proc


async def release(proc: asyncio.subprocess.Process) -> list[dict[str, Any]]:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]
