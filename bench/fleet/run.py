"""keel fleet benchmark: ``keel fleet status`` across a 10-node mesh with one node down.

Ten keel hosts as network namespaces on one bridge, each with a real mesh
node (``keel mesh serve``) and a real fleet daemon (``keel fleet serve``);
the bench asks the first host. Measured in one run:

- **baseline**: one request/reply round trip over the mesh between two hosts
  (an echo on a bench topic through ``MeshClient``, agent to agent: the floor
  any answer from another node costs), and nine of them one after another
  (what asking each node in turn would cost);
- **keel**: ``fleet_status`` on the first host's fleet daemon (every node asked
  at once, each answering for itself, the first host's own report gathered
  meanwhile) with the tenth host gone: (a) cut off the network silently, while
  the asking mesh still believes its link alive (the answer waits the status
  timeout, 1 s, for it), and (b) once the mesh found the link dead (the node
  is reported unreachable at once, without waiting);
  plus the whole ``keel fleet status --json`` command (process start included).

Goal: every node's answer within 2 s with one node down. Run as root
(namespaces): ``.venv/bin/python bench/fleet/run.py [--quick]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python" / "src"))
sys.path.insert(0, str(ROOT / "python"))

from keel.mesh.client import MeshClient  # noqa: E402
from tests.harness.netns import Network, missing_prerequisite  # noqa: E402
from tests.integration.fleet.fleet_nodes import FleetHost, mesh_of  # noqa: E402
from tests.integration.mesh.nodes import wait_until  # noqa: E402

NODES = 10
ECHO, REPLY = "bench.echo", "bench.echo.reply"
GOAL = 2.0


def echo(socket: Path, stop: threading.Event) -> None:
    """Answer every message on ECHO with the same bytes on REPLY (an agent on that node)."""
    client = MeshClient(socket, timeout=10)
    with client.subscribe(ECHO) as inbox:
        while not stop.is_set():
            for message in inbox.recv(wait=0.2):
                client.send(message.sender, REPLY, message.data)


def round_trip(client: MeshClient, replies: object, to: str, n: int) -> float:
    from keel.mesh.client import Subscription

    assert isinstance(replies, Subscription)
    payload = f"ping {n}".encode()
    started = time.perf_counter()
    client.send(to, ECHO, payload)
    while True:
        for message in replies.recv(wait=5):
            if message.data == payload:
                return time.perf_counter() - started
        if time.perf_counter() - started > 10:
            raise RuntimeError(f"no echo from {to} within 10 s")


def command(host: FleetHost) -> None:
    subprocess.run(
        [sys.executable, "-m", "keel", "fleet", "status", "--json", "--socket", str(host.socket)],
        capture_output=True,
        check=False,
    )


def timed(function: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        out.append(time.perf_counter() - started)
    return out


def show(name: str, values: list[float], baseline: float | None = None) -> None:
    median, worst = statistics.median(values), max(values)
    ratio = f"   {median / baseline:6.1f}x the baseline" if baseline else ""
    print(f"   {name:<58} median {median * 1000:7.1f} ms  max {worst * 1000:7.1f} ms{ratio}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    runs = 5 if args.quick else 15
    reason = missing_prerequisite()
    if reason is not None:
        print(f"keel fleet benchmark: skipped ({reason})")
        return 0
    print("keel fleet benchmark (figures from this run; the machine may be shared and noisy)")
    workdir = Path(tempfile.mkdtemp(prefix="kfb-"))
    network = Network(workdir, name="fleetbench")
    hosts: list[FleetHost] = []
    stop = threading.Event()
    try:
        namespaces = [network.host(f"n{i}") for i in range(NODES)]
        network.bridge(namespaces)
        hosts = [
            FleetHost(h, workdir / h.label, witness_every=3600, config={"request_timeout": 5})
            for h in namespaces
        ]
        started = time.monotonic()
        for host in hosts:
            host.mesh.start()
        mesh_of(hosts, timeout=180)
        for host in hosts:
            host.start()
        print(f"   {NODES} hosts up, every pair connected, in {time.monotonic() - started:.1f} s")
        first, dead = hosts[0], hosts[-1]

        echoes = [
            threading.Thread(target=echo, args=(h.mesh.socket, stop), daemon=True)
            for h in hosts[1:]
        ]
        for thread in echoes:
            thread.start()
        client = MeshClient(first.mesh.socket, timeout=10)
        with client.subscribe(REPLY) as replies:
            round_trip(client, replies, hosts[1].node_id, -1)  # warm up
            one = [round_trip(client, replies, hosts[1].node_id, n) for n in range(runs)]
            nine = timed(
                lambda: [round_trip(client, replies, h.node_id, 0) for h in hosts[1:]],
                max(2, runs // 3),
            )
        stop.set()
        baseline = statistics.median(one)
        print("\n   baseline: request/reply over the mesh, agent to agent")
        show("one round trip (first host <-> second host)", one)
        show("nine round trips, one node after another", nine, baseline)

        first.call("fleet_status")  # every report once, so the dead node has a last one
        all_up = [first.call("fleet_status")["elapsed"] for _ in range(runs)]
        print(f"\n   keel: fleet_status on the first host ({NODES} nodes)")
        show("all nodes up", all_up, baseline)

        # the tenth host drops off the network silently (a partition: packets vanish,
        # as when a host loses power), then its daemons are killed too
        network.partition(dead.host, [h.host for h in hosts[:-1]])
        cut = time.monotonic()

        def connected() -> bool:
            return bool({p["id"]: p for p in first.mesh.client.peers()}[dead.node_id]["connected"])

        right_after: list[float] = []
        cli_cut: list[float] = []
        while len(right_after) < runs and connected():
            right_after.append(first.call("fleet_status")["elapsed"])
            if connected():
                cli_cut += timed(lambda: command(first), 1)
        if right_after:
            show("one node cut off, its mesh link not yet found dead", right_after, baseline)
        if cli_cut:
            show("  the same, `keel fleet status --json` (the whole command)", cli_cut, baseline)
        wait_until(lambda: not connected(), timeout=120, what="the mesh to find the link dead")
        noticed = time.monotonic() - cut
        dead.kill()
        results = [first.call("fleet_status") for _ in range(runs)]
        down = [r["elapsed"] for r in results]
        states = {row["state"] for row in results[-1]["nodes"] if row["node"] == dead.node_id}
        assert states == {"unreachable"}, states
        show(f"one node down, found dead by the mesh ({noticed:.1f} s after)", down, baseline)
        cli = timed(lambda: command(first), runs)
        show("  the same, `keel fleet status --json` (the whole command)", cli, baseline)
        worst = max([*right_after, *cli_cut, *down, *cli])
        print(
            f"\n   goal: every node's answer within {GOAL:g} s with one node down: "
            f"{'met' if worst <= GOAL else 'MISSED'} (worst {worst:.2f} s)"
        )
    finally:
        stop.set()
        for host in hosts:
            host.kill()
        network.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
