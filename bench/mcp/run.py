"""Benchmark of keel mcp: the gateway's cost, its sharing, and what sharing saves.

    sudo .venv/bin/python bench/mcp/run.py [--calls 2000] [--seconds 10] [--servers 3] [--agents 10]

Everything in one run on this machine, with real MCP servers on the official
SDK (``python/tests/mcp_server.py``) and keel's real gateway (``keel mcp
serve`` as its own process, the servers run by ``keel mcp exec`` as in dev
mode):

1. ``tools/call`` round trip, one client, one call at a time: directly to a
   stdio server the client started itself (the baseline: an agent without
   keel), then through the gateway: p50, p99 and the ratio;
2. calls per second with ``--agents`` agents (each its own uid when run as
   root) sharing one server through the gateway, against as many agents each
   with a private server of its own (agents x servers, the baseline);
3. memory (PSS) of ``--servers`` servers run once and shared (plus the
   gateway), against agents x servers private copies.

4. across the mesh: ``tools/call`` round trip of one agent on node A calling
   a tool hosted on node B (two ``keel mesh serve`` processes joined on
   loopback, a gateway on each, the call and its answer as mesh messages),
   against the same call to a server of its own node's gateway (item 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SERVER = REPO / "python" / "tests" / "mcp_server.py"
CLIENT = HERE / "client.py"
KEEL = str(Path(sys.executable).parent / "keel")
BASE_UID = 62000


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (/proc/PID/stat)."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_kib(pid: int) -> int:
    """Proportional set size of one process (shared pages split among their users)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def as_agent(index: int) -> list[str]:
    """Run a command as agent ``index``'s uid when root; as ourselves otherwise."""
    if os.geteuid() != 0:
        return []
    uid = BASE_UID + index
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def agent_uid(index: int) -> int:
    return BASE_UID + index if os.geteuid() == 0 else os.getuid()


async def wait_for(path: Path, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not appear at {path}")
        await asyncio.sleep(0.05)


class Gateway:
    """The gateway and ``servers`` toolbox servers, as processes, in ``root``."""

    def __init__(self, root: Path, servers: int, agents: int) -> None:
        self.root = root
        self.names = ["toolbox"] + [f"toolbox{i}" for i in range(1, servers)]
        self.agents = agents
        self.processes: list[subprocess.Popen[bytes]] = []

    async def __aenter__(self) -> Gateway:
        sockets = self.root / "servers"
        share = [{"agents": "*", "tools": "*"}]
        config = {
            "socket": str(self.root / "mcp.sock"),
            "ledger": str(self.root / "ledger.db"),
            "listen": str(self.root / "agents.sock"),
            "sockets": str(sockets),
            "servers": {
                name: {
                    "name": name,
                    "command": [sys.executable, str(SERVER)],
                    "tier": 2,
                    "share": share,
                }
                for name in self.names
            },
            # One uid when not root: then a single agent, for every client.
            "agents": {
                f"agent{i}": {"uid": agent_uid(i), "tier": 2}
                for i in range(self.agents if os.geteuid() == 0 else 1)
            },
        }
        (self.root / "mcp.json").write_text(json.dumps(config))
        for name in self.names:
            self.processes.append(
                subprocess.Popen(
                    [
                        KEEL,
                        "mcp",
                        "exec",
                        "--listen",
                        str(sockets / f"{name}.sock"),
                        "--",
                        sys.executable,
                        str(SERVER),
                    ],
                    stderr=subprocess.DEVNULL,
                )
            )
        for name in self.names:
            await wait_for(sockets / f"{name}.sock", f"server {name}")
        self.gateway = subprocess.Popen(
            [KEEL, "mcp", "serve", "--config", str(self.root / "mcp.json")],
            stderr=(self.root / "gateway.log").open("wb"),
        )
        self.processes.append(self.gateway)
        await wait_for(self.root / "mcp.sock", "the gateway's control socket")
        from keel.api import acall

        deadline = time.monotonic() + 60
        while True:
            status = await acall(self.root / "mcp.sock", "status", service="mcp")
            if all(s["state"] == "ready" for s in status["servers"].values()):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: servers not ready: {status['servers']}")
            await asyncio.sleep(0.05)
        return self

    @property
    def server_pids(self) -> list[int]:
        return [p.pid for p in self.processes[: len(self.names)]]

    async def __aexit__(self, *exc: object) -> None:
        for proc in reversed(self.processes):
            proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Mesh:
    """Two mesh nodes on loopback (A knows agent 0, which may reach B) and a gateway on each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: list[subprocess.Popen[bytes]] = []

    def node(self, name: str, agents: dict[str, Any]) -> Path:
        directory = self.root / name
        directory.mkdir()
        config = self.root / f"{name}-mesh.json"
        config.write_text(
            json.dumps(
                {
                    "directory": str(directory),
                    "listen": "127.0.0.1:0",
                    "socket": str(directory / "mesh.sock"),
                    "ledger": None,
                    "agents": agents,
                }
            )
        )
        self.processes.append(
            subprocess.Popen(
                [KEEL, "mesh", "serve", "--config", str(config)],
                stderr=(self.root / f"{name}-mesh.log").open("wb"),
            )
        )
        return directory / "mesh.sock"

    async def gateway(self, name: str, config: dict[str, Any]) -> Path:
        directory = self.root / f"{name}-mcp"
        directory.mkdir(mode=0o755)
        sockets = directory / "servers"
        config = {
            "socket": str(directory / "mcp.sock"),
            "ledger": None,
            "listen": str(directory / "agents.sock"),
            "sockets": str(sockets),
            "agents": {"agent0": {"uid": agent_uid(0), "tier": 2}},
            **config,
        }
        (directory / "mcp.json").write_text(json.dumps(config))
        for server in config["servers"]:
            self.processes.append(
                subprocess.Popen(
                    [KEEL, "mcp", "exec", "--listen", str(sockets / f"{server}.sock"), "--",
                     sys.executable, str(SERVER)],
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
            await wait_for(sockets / f"{server}.sock", f"server {server}")
        self.processes.append(
            subprocess.Popen(
                [KEEL, "mcp", "serve", "--config", str(directory / "mcp.json")],
                stderr=(directory / "gateway.log").open("wb"),
            )
        )
        await wait_for(directory / "agents.sock", f"gateway {name}")
        return directory / "agents.sock"

    async def __aenter__(self) -> Path:
        """Start everything; the agents' socket of A's gateway."""
        from keel.mesh.client import MeshClient

        sock_b = self.node("b", {})
        await wait_for(sock_b, "node b's control socket")
        b = MeshClient(sock_b)
        node_b = await asyncio.to_thread(b.node_id)
        sock_a = self.node(
            "a", {"agent0": {"uid": agent_uid(0), "tier": 2, "mesh": {"sendTo": [node_b]}}}
        )
        await wait_for(sock_a, "node a's control socket")
        a = MeshClient(sock_a)
        node_a = await asyncio.to_thread(a.node_id)
        await asyncio.to_thread(b.join, await asyncio.to_thread(a.invite))
        deadline = time.monotonic() + 60
        while node_b not in (await asyncio.to_thread(a.status))["connected"]:
            if time.monotonic() > deadline:
                raise SystemExit("bench: the two mesh nodes did not connect")
            await asyncio.sleep(0.05)
        a.close()
        b.close()
        share = [{"nodes": [node_a], "agents": "*", "tools": "*"}]
        server = {"name": "toolbox", "command": [sys.executable, str(SERVER)], "tier": 2}
        await self.gateway(
            "b",
            {"servers": {"toolbox": {**server, "share": share}}, "mesh": {"socket": str(sock_b)}},
        )
        return await self.gateway(
            "a",
            {
                "servers": {},
                "mesh": {"socket": str(sock_a)},
                "remote": {"b": {"node": node_b, "servers": "*"}},
            },
        )

    async def __aexit__(self, *exc: object) -> None:
        for proc in reversed(self.processes):
            proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def client(index: int, mode: str, target: str, **options: Any) -> dict[str, Any]:
    # Through the gateway each client is an agent under its own uid; directly,
    # who runs the client does not matter (and the server it starts needs the
    # venv's interpreter, which only root may reach here).
    prefix = as_agent(index) if mode == "gateway" else []
    argv = [*prefix, sys.executable, str(CLIENT), mode, target]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"bench: client {mode} failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(out)
    return result


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    latencies = sorted(x for run in runs for x in run["latencies"])
    return {
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99) - 1] * 1e6,
    }


def line(what: str, value: str) -> None:
    print(f"  {what:<52} {value}")


async def bench(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="keel-mcp-bench-"))
    root.chmod(0o755)
    try:
        print(
            f"keel mcp benchmark ({os.cpu_count()} CPUs, {args.calls} calls, {args.agents} agents)"
        )
        async with Gateway(root, args.servers, args.agents) as gateway:
            listen = str(root / "agents.sock")

            print("1. tools/call round trip, one client, one call at a time")
            # Alternating rounds, so that load from elsewhere on the machine
            # falls on both sides alike.
            rounds = 4
            direct_runs, gateway_runs = [], []
            gateway_cpu = server_cpu = 0.0
            server_pid = gateway.server_pids[0]
            for _ in range(rounds):
                direct_runs.append(
                    await client(0, "direct", str(SERVER), calls=args.calls // rounds)
                )
                before = cpu_seconds(gateway.gateway.pid), cpu_seconds(server_pid)
                gateway_runs.append(await client(0, "gateway", listen, calls=args.calls // rounds))
                gateway_cpu += cpu_seconds(gateway.gateway.pid) - before[0]
                server_cpu += cpu_seconds(server_pid) - before[1]
            direct = summary(direct_runs)
            through = summary(gateway_runs)
            line(
                "directly to a stdio server (baseline) p50 / p99",
                f"{direct['p50_us']:8.0f} / {direct['p99_us']:8.0f} µs",
            )
            line(
                "through keel's gateway p50 / p99",
                f"{through['p50_us']:8.0f} / {through['p99_us']:8.0f} µs",
            )
            line(
                "ratio gateway / direct p50 / p99",
                f"{through['p50_us'] / direct['p50_us']:8.2f} / {through['p99_us'] / direct['p99_us']:8.2f} x",
            )
            line("added by the gateway p50", f"{through['p50_us'] - direct['p50_us']:8.0f} µs")
            calls = sum(run["calls"] + 20 for run in gateway_runs)  # with the warm-up calls
            line(
                "CPU per call: the gateway / the server itself",
                f"{gateway_cpu / calls * 1e6:8.0f} / {server_cpu / calls * 1e6:8.0f} µs",
            )

            print(f"2. calls per second, {args.agents} agents, {args.seconds:g} s")
            shared = await asyncio.gather(
                *(client(i, "gateway", listen, seconds=args.seconds) for i in range(args.agents))
            )
            private = await asyncio.gather(
                *(
                    client(i, "direct", str(SERVER), seconds=args.seconds)
                    for i in range(args.agents)
                )
            )
            shared_rate = sum(r["per_second"] for r in shared)
            private_rate = sum(r["per_second"] for r in private)
            line(f"{args.agents} agents x own server (baseline)", f"{private_rate:8.0f} calls/s")
            line(
                f"{args.agents} agents sharing one server via the gateway",
                f"{shared_rate:8.0f} calls/s",
            )
            line("ratio shared / private", f"{shared_rate / private_rate:8.2f} x")
            line(
                "p99 latency shared / private",
                f"{max(r['p99_us'] for r in shared):8.0f} / {max(r['p99_us'] for r in private):8.0f} µs",
            )

            print(
                f"3. memory (PSS): {args.servers} servers shared vs {args.agents} agents x {args.servers} servers"
            )
            one_server = sum(pss_kib(pid) for pid in gateway.server_pids) / len(gateway.server_pids)
            shared_kib = sum(pss_kib(pid) for pid in gateway.server_pids) + pss_kib(
                gateway.gateway.pid
            )
        private_kib = await private_servers(args.agents * args.servers)
        line(
            f"{args.agents * args.servers} private server processes (baseline)",
            f"{private_kib / 1024:8.1f} MiB",
        )
        line(f"{args.servers} shared servers + the gateway", f"{shared_kib / 1024:8.1f} MiB")
        line("ratio shared / private", f"{shared_kib / private_kib:8.3f} x")
        line("one idle server", f"{one_server / 1024:8.1f} MiB")
        print("4. across the mesh: tools/call from an agent on node A to a tool on node B")
        mesh_root = root / "mesh"
        mesh_root.mkdir(mode=0o755)
        async with Mesh(mesh_root) as listen_a:
            calls = max(args.calls // 4, 100)
            remote_runs = [
                await client(0, "gateway", str(listen_a), calls=calls, tool="b.toolbox.echo")
            ]
            across = summary(remote_runs)
        line(
            "same-node gateway (item 1, baseline) p50 / p99",
            f"{through['p50_us']:8.0f} / {through['p99_us']:8.0f} µs",
        )
        line(
            "A's gateway -> mesh -> B's gateway p50 / p99",
            f"{across['p50_us']:8.0f} / {across['p99_us']:8.0f} µs",
        )
        line(
            "ratio across / same node p50 / p99",
            f"{across['p50_us'] / through['p50_us']:8.2f} / {across['p99_us'] / through['p99_us']:8.2f} x",
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def private_servers(count: int) -> int:
    """PSS of ``count`` initialised stdio servers, each with a client of its own (then stopped)."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    total = 0
    ready = asyncio.Event()
    pids: list[int] = []
    done = asyncio.Event()

    async def one() -> None:
        params = StdioServerParameters(
            command=sys.executable, args=[str(SERVER), "--name", "private"]
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("pid", {})
            pids.append(int(result.content[0].text))  # type: ignore[union-attr]
            if len(pids) == count:
                ready.set()
            await done.wait()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.wait_for(ready.wait(), 300)
    total = sum(pss_kib(pid) for pid in pids)
    done.set()
    await asyncio.gather(*tasks)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--agents", type=int, default=10)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
