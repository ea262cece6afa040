"""keel mesh benchmark: handshake, throughput, latency and memory, against baselines.

Measured in one run, on this machine:

1. Handshake latency, hybrid XXhfs (X25519 + ML-KEM-768) against classical
   XX (``handshake.py``, both sides in one process). Goal: hybrid <= 3 ms.
2. Throughput and one-way p50/p99 latency, application to application, for
   256 B and 64 KiB messages between two hosts joined by a veth pair
   (network namespaces; loopback if namespaces are unavailable), for:
   keel mesh (agent -> daemon -> durable outbox -> encrypted session ->
   daemon -> agent, with acknowledgements; each agent its own process next
   to its node, ``meshpeer.py``, using ``MeshClient.sender`` and
   ``MeshClient.subscribe``), pyzmq with CURVE security (PUSH/PULL, the
   baseline), raw TCP (length-prefixed, no security) and keel's secure
   channel alone (``keel.mesh.session`` over TCP, no daemon), each side of
   each its own process (``peer.py``). One message at a time: the mesh's
   sender waits for a byte on a FIFO from the receiving agent, the others
   for a one-byte reply on their own connection. Goals: throughput >= pyzmq
   CURVE; 256 B p50 <= 1 ms. The mesh rows also give the CPU each of the
   four processes spends per message (the daemons run without a ledger: ``"ledger": null``).
3. Memory per connected peer: a daemon's RSS growth per open session.

Run: ``.venv/bin/python bench/mesh/run.py [--quick]`` (as root for veth).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python" / "src"))
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import handshake  # noqa: E402  (bench/mesh/handshake.py, the crypto engineer's)
from keel.api import call  # noqa: E402
from keel.errors import ApiError  # noqa: E402
from keel.mesh.client import MeshClient  # noqa: E402
from keel.mesh.identity import NodeIdentity  # noqa: E402
from keel.mesh.invite import InviteToken  # noqa: E402
from keel.mesh.kem import get_kem  # noqa: E402
from keel.mesh.session import Closed, NeedData, Session  # noqa: E402

STAMP = struct.Struct(">Q")
PEER = Path(__file__).with_name("peer.py")
AGENT = Path(__file__).with_name("meshpeer.py")
MESH_PORT, BASE_PORT = 7400, 7600


@dataclass
class Side:
    """One end: a network namespace (or none, for loopback) and its address."""

    address: str
    prefix: list[str]


@contextlib.contextmanager
def two_hosts(use_netns: bool) -> Iterator[tuple[Side, Side, str]]:
    if use_netns:
        try:
            from tests.harness.netns import Network, missing_prerequisite
        except ImportError as exc:
            reason: str | None = f"harness not importable: {exc}"
        else:
            reason = missing_prerequisite()
        if reason is None:
            workdir = Path(tempfile.mkdtemp(prefix="kmb-net-"))
            network = Network(workdir, name="bench")
            try:
                a, b = network.host("ma"), network.host("mb")
                network.connect(a, b)
                yield Side(a.address, a.argv([])), Side(b.address, b.argv([])), "veth (netns)"
            finally:
                network.close()
                shutil.rmtree(workdir, ignore_errors=True)
            return
        print(f"  (no network namespaces: {reason}; measuring on loopback)")
    yield Side("127.0.0.1", []), Side("127.0.0.1", []), "loopback"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# ---------------------------------------------------------------- keel mesh


class Daemon:
    def __init__(self, workdir: Path, name: str, side: Side, port: int) -> None:
        self.directory = workdir / name
        self.directory.mkdir(parents=True)
        self.socket = self.directory / "mesh.sock"
        self.log = (workdir / f"{name}.log").open("wb")
        config = workdir / f"{name}.json"
        config.write_text(
            json.dumps(
                {
                    "directory": str(self.directory),
                    "listen": f"{side.address}:{port}",
                    "socket": str(self.socket),
                    "ledger": None,  # the figures are the mesh's own (issue 13 adds the ledger's)
                }
            )
        )
        argv = [
            *side.prefix,
            sys.executable,
            "-m",
            "keel",
            "mesh",
            "serve",
            "--config",
            str(config),
        ]
        self.process = subprocess.Popen(
            argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "python" / "src")},
        )
        self.client = MeshClient(self.socket, timeout=60)
        self._node_id: str | None = None
        deadline = time.monotonic() + 30
        while True:
            try:
                call(self.socket, "status", timeout=2)
                break
            except ApiError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"daemon {name} did not start; see {self.log.name}"
                    ) from None
                time.sleep(0.05)

    @property
    def node_id(self) -> str:
        if self._node_id is None:
            self._node_id = self.client.node_id()
        return self._node_id

    def rss_kib(self) -> int:
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        for pid in reversed(pids):
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"keel" in cmdline and b"serve" in cmdline and b"netns" not in cmdline:
                for line in status.splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        raise RuntimeError("daemon process not found")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(v) for v in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def daemon_pid(daemon: Daemon) -> int:
    """The daemon itself, not ``ip netns exec`` in front of it."""
    pid = daemon.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return int(kids[-1]) if kids else pid


def mesh_run(
    da: Daemon, db: Daemon, a: Side, b: Side, mode: str, *, size: int, count: int
) -> dict[str, Any]:
    """Agent to agent through both daemons: two agent processes (``meshpeer.py``), one per host.

    Returns the rate, the receiver's one-way latencies (ms) and the CPU each
    process spent per message (agents and daemons) while it ran.
    """
    topic = f"{mode}{size}"
    pace = da.directory.parent / f"pace-{topic}"
    if mode == "pingpong" and not pace.exists():
        os.mkfifo(pace)
    common = ["--mode", mode, "--topic", topic, "--count", str(count), "--size", str(size),
              "--pace", str(pace)]  # fmt: skip
    receiver = subprocess.Popen(
        [*b.prefix, sys.executable, str(AGENT), "recv", "--socket", str(db.socket), *common],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert receiver.stdout is not None
    if receiver.stdout.readline().strip() != "ready":
        raise RuntimeError("mesh receiving agent did not start")
    pids = [daemon_pid(da), daemon_pid(db)]
    before = [cpu_seconds(pid) for pid in pids]
    sender = subprocess.run(
        [*a.prefix, sys.executable, str(AGENT), "send", "--socket", str(da.socket), *common,
         "--to", db.node_id],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    out, _ = receiver.communicate(timeout=600)
    daemons = [cpu_seconds(pid) - t for pid, t in zip(pids, before, strict=True)]
    got = json.loads(out.strip().splitlines()[-1])
    sent = json.loads(sender.stdout.strip().splitlines()[-1])
    return {
        "rate": count / ((got["last_ns"] - sent["start_ns"]) / 1e9),
        "latencies": [ns / 1e6 for ns in got["latencies_ns"]],
        "cpu_us": {
            "sending agent": 1e6 * sent["cpu_s"] / count,
            "sending daemon": 1e6 * daemons[0] / count,
            "receiving daemon": 1e6 * daemons[1] / count,
            "receiving agent": 1e6 * got["cpu_s"] / count,
        },
    }


# ---------------------------------------------------------------- baselines


def baseline(
    transport: str, mode: str, a: Side, b: Side, *, size: int, count: int, keys: str
) -> dict[str, Any]:
    address = f"{b.address}:{BASE_PORT}"
    common = [
        "--transport",
        transport,
        "--mode",
        mode,
        "--address",
        address,
        "--size",
        str(size),
        "--count",
        str(count),
        "--keys",
        keys,
    ]
    receiver = subprocess.Popen(
        [*b.prefix, sys.executable, str(PEER), "recv", *common], stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None
    if receiver.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{transport} receiver did not start")
    sender = subprocess.run(
        [*a.prefix, sys.executable, str(PEER), "send", *common],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    out, _ = receiver.communicate(timeout=300)
    got = json.loads(out.strip().splitlines()[-1])
    start = json.loads(sender.stdout.strip().splitlines()[-1])["start_ns"]
    return {
        "rate": count / ((got["last_ns"] - start) / 1e9),
        "latencies": [ns / 1e6 for ns in got["latencies_ns"]],
    }


def transport_keys() -> str:
    """CURVE key pairs for pyzmq, and the receiving side's identity for keel's channel."""
    import zmq

    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    receiver = NodeIdentity.generate()
    return json.dumps(
        {
            "server_public": server_public.decode(),
            "server_secret": server_secret.decode(),
            "client_public": client_public.decode(),
            "client_secret": client_secret.decode(),
            "keel_static": receiver.static_private.hex(),
            "keel_signing": receiver.signing_private.hex(),
            "keel_public": receiver.static_public.hex(),
        }
    )


# ---------------------------------------------------------------- memory


def memory_per_peer(workdir: Path, peers: int) -> tuple[int, int, float]:
    """(RSS with no session, RSS with ``peers`` sessions, KiB per session)."""
    daemon = Daemon(workdir, "mem", Side("127.0.0.1", []), 0)
    try:
        token = InviteToken.decode(daemon.client.invite(uses=peers))
        kem = get_kem()
        identities = [NodeIdentity.generate() for _ in range(peers)]

        def connect(identity: NodeIdentity, invite: InviteToken | None) -> Any:
            import socket

            host, _, port = token.addresses[0].rpartition(":")
            sock = socket.create_connection((host, int(port)))
            session = Session.initiator(
                identity,
                remote_static=token.static_key,
                kem=kem,
                clock=time.monotonic,
                invite=invite,
            )
            sock.sendall(session.start())
            sock.settimeout(0.3)
            opened = False
            while True:
                try:
                    data = sock.recv(1 << 16)
                except TimeoutError:
                    if opened:
                        return sock
                    continue
                session.receive_data(data)
                while not isinstance(event := session.next_event(), NeedData):
                    if isinstance(event, Closed):
                        raise ConnectionError(f"refused: {event.reason}")
                    opened = True
                sock.sendall(session.data_to_send())

        for identity in identities:  # admit everyone first, then measure with no session open
            connect(identity, token).close()
        time.sleep(1.5)
        before = daemon.rss_kib()
        sockets = [connect(identity, None) for identity in identities]
        time.sleep(1.5)
        after = daemon.rss_kib()
        for sock in sockets:
            sock.close()
        return before, after, (after - before) / peers
    finally:
        daemon.stop()


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    parser.add_argument("--no-netns", action="store_true", help="measure on loopback")
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0

    print("keel mesh benchmark (figures from this run; the machine may be shared and noisy)")
    print("\n1. handshake (both sides in one process)")
    figures = handshake.measure(int(300 * scale) or 20)
    classical, hybrid, session = (figures[k] for k in ("classical", "hybrid", "session"))
    assert isinstance(classical, dict)
    assert isinstance(hybrid, dict)
    assert isinstance(session, dict)
    print(f"   baseline classical XX      p50 {classical['p50_ms']:.3f} ms")
    print(
        f"   keel hybrid XXhfs          p50 {hybrid['p50_ms']:.3f} ms   "
        f"ratio {hybrid['p50_ms'] / classical['p50_ms']:.2f}x   "
        f"goal <= 3 ms: {'met' if hybrid['p50_ms'] <= 3 else 'MISSED'}"
    )
    print(
        f"   keel full session handshake p50 {session['p50_ms']:.3f} ms "
        "(hybrid + identity payloads + framing)"
    )

    workdir = Path(tempfile.mkdtemp(prefix="kmb-"))
    keys = transport_keys()
    try:
        with two_hosts(not args.no_netns) as (a, b, medium):
            print(f"\n2. messages between two hosts over {medium}")
            da = Daemon(workdir, "a", a, MESH_PORT)
            db = Daemon(workdir, "b", b, MESH_PORT)
            try:
                db.client.join(da.client.invite())
                time.sleep(1)
                for size, count, pings in (
                    (256, int(20000 * scale), int(500 * scale)),
                    (65536, int(1000 * scale), int(200 * scale)),
                ):
                    mesh_flood = mesh_run(da, db, a, b, "flood", size=size, count=count)
                    mesh_ping = mesh_run(da, db, a, b, "pingpong", size=size, count=pings)
                    mesh_rate, mesh_lat = mesh_flood["rate"], mesh_ping["latencies"]
                    zmq_flood = baseline("zmq", "flood", a, b, size=size, count=count, keys=keys)
                    zmq_ping = baseline("zmq", "pingpong", a, b, size=size, count=pings, keys=keys)
                    tcp_flood = baseline("tcp", "flood", a, b, size=size, count=count, keys=keys)
                    tcp_ping = baseline("tcp", "pingpong", a, b, size=size, count=pings, keys=keys)
                    chan_flood = baseline("keel", "flood", a, b, size=size, count=count, keys=keys)
                    chan_ping = baseline(
                        "keel", "pingpong", a, b, size=size, count=pings, keys=keys
                    )
                    label = "256 B" if size == 256 else "64 KiB"
                    print(f"\n   {label}: {count} messages flooded, {pings} one at a time")
                    print(
                        f"   {'':<36}{'msg/s':>9}{'MB/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
                        f"{'vs pyzmq':>10}{'vs TCP':>8}"
                    )
                    rows = (
                        ("raw TCP (no security)", tcp_flood, tcp_ping["latencies"]),
                        ("pyzmq CURVE (the baseline)", zmq_flood, zmq_ping["latencies"]),
                        ("keel channel (session only)", chan_flood, chan_ping["latencies"]),
                        ("keel mesh (agent to agent, durable)", mesh_flood, mesh_lat),
                    )
                    zmq_rate, tcp_rate = zmq_flood["rate"], tcp_flood["rate"]
                    for name, flood, lat in rows:
                        rate = flood["rate"]
                        print(
                            f"   {name:<36}{rate:>9.0f}{rate * size / 1e6:>8.1f}"
                            f"{statistics.median(lat):>8.3f}{percentile(lat, 0.99):>8.3f}"
                            f"{rate / zmq_rate:>9.2f}x{rate / tcp_rate:>7.2f}x"
                        )
                    zmq_p50 = statistics.median(zmq_ping["latencies"])
                    mesh_p50 = statistics.median(mesh_lat)
                    print(
                        f"   keel mesh vs pyzmq CURVE: throughput {mesh_rate / zmq_rate:.2f}x "
                        f"(goal >= 1: {'met' if mesh_rate >= zmq_rate else 'MISSED'}), "
                        f"p50 {mesh_p50 / zmq_p50:.2f}x"
                    )
                    if size == 256:
                        print(
                            f"   keel mesh 256 B p50 {mesh_p50:.3f} ms "
                            f"(goal <= 1 ms: {'met' if mesh_p50 <= 1 else 'MISSED'})"
                        )
                    cpu = mesh_flood["cpu_us"]
                    print(
                        "   keel mesh CPU per message in the flood (us): "
                        + ", ".join(f"{name} {value:.1f}" for name, value in cpu.items())
                        + f"; total {sum(cpu.values()):.1f} on {os.cpu_count()} cores"
                    )
            finally:
                da.stop()
                db.stop()
        peers = int(100 * scale) or 10
        print(f"\n3. memory: one daemon, {peers} connected peers (loopback)")
        before, after, per_peer = memory_per_peer(workdir, peers)
        print(
            f"   RSS idle {before / 1024:.1f} MiB, with {peers} sessions {after / 1024:.1f} MiB: "
            f"{per_peer:.0f} KiB per connected peer"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
