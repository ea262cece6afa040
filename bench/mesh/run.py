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
   ``MeshClient.subscribe``), once without a ledger (``"ledger": null``) and
   once with one (each daemon its own ledger file, as on a NixOS host where
   every daemon records); NATS JetStream, the durable baseline
   (``jetstream.py``: ``nats-server -js`` with file storage on the receiving
   host, acknowledged publishes, a durable pull consumer acknowledging each
   message); pyzmq with CURVE security (PUSH/PULL, not durable), raw TCP
   (length-prefixed, no security) and keel's secure channel alone
   (``keel.mesh.session`` over TCP, no daemon), each side of each its own
   process (``peer.py``). One message at a time: the mesh's sender waits for
   a byte on a FIFO from the receiving agent, the others for a one-byte
   reply on their own connection. The mesh's flood with a ledger counts until
   both daemons' ledger queues are written (a ledger that falls behind does
   not look fast). Goals: keel with its ledger >= 0.8x keel without it and
   >= 1x JetStream, at 256 B and at 64 KiB; 256 B p50 <= 1 ms. The mesh
   rows also give the CPU each of the four processes spends per message.
3. Memory per connected peer: a daemon's RSS growth per open session.

Run: ``.venv/bin/python bench/mesh/run.py [--quick] [--durable-only]
[--bulk N]`` (as root for veth). ``--durable-only`` measures only the
floods of keel with and without its ledger and of JetStream. ``--bulk N``
only the 64 KiB floods of raw TCP, keel's channel and keel mesh without a
ledger, N times in turn (the ratio to raw TCP of the same round, and the
mesh's CPU per message: on a shared machine the rates swing, the CPU less). The bench installs nothing itself; the
JetStream rows need ``apt-get install nats-server`` and
``.venv/bin/pip install nats-py`` (without them they are skipped, saying so).
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
JETSTREAM = Path(__file__).with_name("jetstream.py")
MESH_PORT, BASE_PORT, NATS_PORT = 7400, 7600, 7700


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
    def __init__(
        self, workdir: Path, name: str, side: Side, port: int, *, ledger: Path | None = None
    ) -> None:
        self.ledger = ledger
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
                    "ledger": str(ledger) if ledger else None,
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

    def ledger_status(self) -> dict[str, Any]:
        status = call(self.socket, "status", timeout=10)
        ledger: dict[str, Any] = status["service"]["ledger"]
        return ledger

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
    got = json.loads(out.strip().splitlines()[-1])
    sent = json.loads(sender.stdout.strip().splitlines()[-1])
    end = got["last_ns"]
    dropped = 0
    if da.ledger is not None or db.ledger is not None:
        # Done when both ledgers hold what was recorded: poll their queues.
        while True:
            ledgers = [d.ledger_status() for d in (da, db) if d.ledger is not None]
            if all(s["pending"] == 0 for s in ledgers):
                end = max(end, time.monotonic_ns())
                dropped = sum(s["dropped"] + s["refused"] for s in ledgers)
                break
            time.sleep(0.005)
    daemons = [cpu_seconds(pid) - t for pid, t in zip(pids, before, strict=True)]
    return {
        "rate": count / ((end - sent["start_ns"]) / 1e9),
        "ledger_lag_ms": (end - got["last_ns"]) / 1e6,
        "ledger_dropped": dropped,
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


def jetstream_missing() -> str | None:
    """Why JetStream cannot be measured here, or None."""
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (.venv/bin/pip install nats-py)"
    if shutil.which("nats-server") is None:
        return "nats-server is not installed (apt-get install nats-server)"
    return None


@contextlib.contextmanager
def nats_server(workdir: Path, side: Side) -> Iterator[str]:
    """``nats-server -js`` with file storage in ``workdir`` on ``side``; yields its address."""
    store = workdir / "jetstream"
    store.mkdir(exist_ok=True)
    log = workdir / "nats-server.log"
    server = subprocess.Popen(
        [*side.prefix, shutil.which("nats-server") or "nats-server", "-js", "-sd", str(store),
         "-a", side.address, "-p", str(NATS_PORT), "-l", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "Server is ready" in log.read_text()):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start; see {log}")
            time.sleep(0.05)
        yield f"{side.address}:{NATS_PORT}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def jetstream(address: str, a: Side, b: Side, *, size: int, count: int) -> dict[str, Any]:
    """A JetStream flood: publisher on ``a``, pull consumer on ``b`` (``jetstream.py``)."""
    common = ["--address", address, "--topic", f"t{size}", "--count", str(count),
              "--size", str(size)]  # fmt: skip
    receiver = subprocess.Popen(
        [*b.prefix, sys.executable, str(JETSTREAM), "recv", *common],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert receiver.stdout is not None
    if receiver.stdout.readline().strip() != "ready":
        raise RuntimeError("JetStream consumer did not start")
    sender = subprocess.run(
        [*a.prefix, sys.executable, str(JETSTREAM), "send", *common],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    out, _ = receiver.communicate(timeout=600)
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


def goal(met: bool) -> str:
    return "met" if met else "MISSED"


def durable_lines(size: int, plain: float, ledgered: float, js: float | None) -> None:
    """keel with its ledger against keel without, and both against JetStream."""
    print(
        f"   keel with ledger / without: {ledgered / plain:.2f}x "
        f"(goal >= 0.8: {goal(ledgered >= 0.8 * plain)})"
    )
    if js is None:
        return
    print(
        f"   vs JetStream: keel with ledger {ledgered / js:.2f}x "
        f"(goal >= 1: {goal(ledgered >= js)}), without {plain / js:.2f}x"
    )


def ledger_note(flood: dict[str, Any]) -> None:
    print(
        f"   (with ledger: both ledgers written {flood['ledger_lag_ms']:.0f} ms after the last "
        f"message arrived, counted in the rate; entries dropped or refused: "
        f"{flood['ledger_dropped']})"
    )


def bulk(rounds: int, count: int, use_netns: bool) -> int:
    """64 KiB floods: raw TCP, keel's channel, keel mesh (no ledger), ``rounds`` times."""
    size = 65536
    workdir = Path(tempfile.mkdtemp(prefix="kmb-"))
    keys = transport_keys()
    try:
        with contextlib.ExitStack() as stack:
            a, b, medium = stack.enter_context(two_hosts(use_netns))
            print(f"64 KiB floods over {medium}, {count} messages, MB/s (CPU per mesh message, us)")
            da = Daemon(workdir, "a", a, MESH_PORT)
            stack.callback(da.stop)
            db = Daemon(workdir, "b", b, MESH_PORT)
            stack.callback(db.stop)
            db.client.join(da.client.invite())
            time.sleep(1)
            mesh_run(da, db, a, b, "flood", size=size, count=min(count, 300))  # warm
            for n in range(rounds):
                tcp = baseline("tcp", "flood", a, b, size=size, count=count, keys=keys)["rate"]
                chan = baseline("keel", "flood", a, b, size=size, count=count, keys=keys)["rate"]
                mesh = mesh_run(da, db, a, b, "flood", size=size, count=count)
                cpu = mesh["cpu_us"]
                print(
                    f"   round {n + 1}: raw TCP {tcp * size / 1e6:.1f}, keel channel "
                    f"{chan * size / 1e6:.1f}, keel mesh {mesh['rate'] * size / 1e6:.1f} "
                    f"({mesh['rate'] / tcp:.2f}x TCP; goal >= 0.5: "
                    f"{goal(mesh['rate'] >= 0.5 * tcp)}); CPU "
                    + ", ".join(f"{name} {value:.0f}" for name, value in cpu.items())
                    + f", total {sum(cpu.values()):.0f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    parser.add_argument("--no-netns", action="store_true", help="measure on loopback")
    parser.add_argument(
        "--durable-only",
        action="store_true",
        help="only the floods of keel without and with its ledger and of JetStream",
    )
    parser.add_argument(
        "--bulk",
        type=int,
        metavar="N",
        help="only 64 KiB floods of raw TCP, keel's channel and keel mesh, N rounds",
    )
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    if args.bulk:
        return bulk(args.bulk, int(3000 * scale), not args.no_netns)
    full = not args.durable_only

    print("keel mesh benchmark (figures from this run; the machine may be shared and noisy)")
    if full:
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
            f"goal <= 3 ms: {goal(hybrid['p50_ms'] <= 3)}"
        )
        print(
            f"   keel full session handshake p50 {session['p50_ms']:.3f} ms "
            "(hybrid + identity payloads + framing)"
        )

    workdir = Path(tempfile.mkdtemp(prefix="kmb-"))
    keys = transport_keys()
    missing = jetstream_missing()
    try:
        with contextlib.ExitStack() as stack:
            a, b, medium = stack.enter_context(two_hosts(not args.no_netns))
            print(f"\n2. messages between two hosts over {medium}")
            if missing:
                print(f"   JetStream skipped: {missing}")
                nats_address = None
            else:
                nats_address = stack.enter_context(nats_server(workdir, b))
            da = Daemon(workdir, "a", a, MESH_PORT)
            stack.callback(da.stop)
            db = Daemon(workdir, "b", b, MESH_PORT)
            stack.callback(db.stop)
            la = Daemon(workdir, "la", a, MESH_PORT + 1, ledger=workdir / "la-ledger.db")
            stack.callback(la.stop)
            lb = Daemon(workdir, "lb", b, MESH_PORT + 1, ledger=workdir / "lb-ledger.db")
            stack.callback(lb.stop)
            db.client.join(da.client.invite())
            lb.client.join(la.client.invite())
            time.sleep(1)
            for size, count, pings in (
                (256, int(50000 * scale), int(500 * scale)),
                (65536, int(3000 * scale), int(200 * scale)),
            ):
                label = "256 B" if size == 256 else "64 KiB"
                mesh_flood = mesh_run(da, db, a, b, "flood", size=size, count=count)
                ledger_flood = mesh_run(la, lb, a, b, "flood", size=size, count=count)
                js_flood = (
                    jetstream(nats_address, a, b, size=size, count=count) if nats_address else None
                )
                js_rate = js_flood["rate"] if js_flood else None
                if not full:
                    print(f"\n   {label}: {count} messages flooded")
                    print(f"   {'':<40}{'msg/s':>9}{'MB/s':>8}{'vs JetStream':>14}")
                    rows = [
                        ("keel mesh, no ledger", mesh_flood),
                        ("keel mesh, ledger", ledger_flood),
                    ]
                    if js_flood:
                        rows.append(("NATS JetStream (file, acked)", js_flood))
                    for name, flood in rows:
                        rate = flood["rate"]
                        versus = f"{rate / js_rate:>13.2f}x" if js_rate else f"{'-':>14}"
                        print(f"   {name:<40}{rate:>9.0f}{rate * size / 1e6:>8.1f}{versus}")
                    ledger_note(ledger_flood)
                    durable_lines(size, mesh_flood["rate"], ledger_flood["rate"], js_rate)
                    continue
                mesh_ping = mesh_run(da, db, a, b, "pingpong", size=size, count=pings)
                ledger_ping = mesh_run(la, lb, a, b, "pingpong", size=size, count=pings)
                mesh_rate, mesh_lat = mesh_flood["rate"], mesh_ping["latencies"]
                zmq_flood = baseline("zmq", "flood", a, b, size=size, count=count, keys=keys)
                zmq_ping = baseline("zmq", "pingpong", a, b, size=size, count=pings, keys=keys)
                tcp_flood = baseline("tcp", "flood", a, b, size=size, count=count, keys=keys)
                tcp_ping = baseline("tcp", "pingpong", a, b, size=size, count=pings, keys=keys)
                chan_flood = baseline("keel", "flood", a, b, size=size, count=count, keys=keys)
                chan_ping = baseline("keel", "pingpong", a, b, size=size, count=pings, keys=keys)
                print(f"\n   {label}: {count} messages flooded, {pings} one at a time")
                print(
                    f"   {'':<40}{'msg/s':>9}{'MB/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
                    f"{'vs JetStream':>14}{'vs pyzmq':>10}{'vs TCP':>8}"
                )
                rows2: list[tuple[str, dict[str, Any], list[float] | None]] = [
                    ("raw TCP (no security)", tcp_flood, tcp_ping["latencies"]),
                    ("pyzmq CURVE (not durable)", zmq_flood, zmq_ping["latencies"]),
                    ("keel channel (session only)", chan_flood, chan_ping["latencies"]),
                ]
                if js_flood:
                    rows2.append(("NATS JetStream (durable, under load)", js_flood, None))
                rows2 += [
                    ("keel mesh, no ledger (durable)", mesh_flood, mesh_lat),
                    ("keel mesh, ledger (durable)", ledger_flood, ledger_ping["latencies"]),
                ]
                zmq_rate, tcp_rate = zmq_flood["rate"], tcp_flood["rate"]
                for name, flood, lat in rows2:
                    rate = flood["rate"]
                    latencies = lat if lat is not None else flood["latencies"]
                    versus = f"{rate / js_rate:>13.2f}x" if js_rate else f"{'-':>14}"
                    print(
                        f"   {name:<40}{rate:>9.0f}{rate * size / 1e6:>8.1f}"
                        f"{statistics.median(latencies):>8.3f}{percentile(latencies, 0.99):>8.3f}"
                        f"{versus}{rate / zmq_rate:>9.2f}x{rate / tcp_rate:>7.2f}x"
                    )
                ledger_note(ledger_flood)
                durable_lines(size, mesh_rate, ledger_flood["rate"], js_rate)
                zmq_p50 = statistics.median(zmq_ping["latencies"])
                mesh_p50 = statistics.median(mesh_lat)
                print(
                    f"   keel mesh vs pyzmq CURVE (not durable): throughput "
                    f"{mesh_rate / zmq_rate:.2f}x, p50 {mesh_p50 / zmq_p50:.2f}x"
                )
                if size == 256:
                    print(f"   keel mesh 256 B p50 {mesh_p50:.3f} ms (goal <= 1 ms: "
                          f"{goal(mesh_p50 <= 1)})")  # fmt: skip
                for name, flood in (("no ledger", mesh_flood), ("ledger", ledger_flood)):
                    cpu = flood["cpu_us"]
                    print(
                        f"   keel mesh ({name}) CPU per message in the flood (us): "
                        + ", ".join(f"{n} {value:.1f}" for n, value in cpu.items())
                        + f"; total {sum(cpu.values()):.1f} on {os.cpu_count()} cores"
                    )
        if full:
            peers = int(100 * scale) or 10
            print(f"\n3. memory: one daemon, {peers} connected peers (loopback)")
            before, after, per_peer = memory_per_peer(workdir, peers)
            print(
                f"   RSS idle {before / 1024:.1f} MiB, with {peers} sessions "
                f"{after / 1024:.1f} MiB: {per_peer:.0f} KiB per connected peer"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
