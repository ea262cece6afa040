"""A focused mesh benchmark for iterating: two daemons, one flood, one ping-pong.

Much quicker than ``run.py`` (no baselines, no handshake or memory figures,
loopback by default), so it can run after each change. ``--profile DIR``
records both daemons with py-spy (``pip install py-spy``) during the flood
and prints where their time goes, by function (self time) and by top-level
stage; the raw collapsed stacks stay in DIR.

Run: ``.venv/bin/python bench/mesh/focus.py [--size 256] [--count 20000]
[--pings 300] [--netns] [--profile DIR]``. The figures are for comparing
one change with the next on the same machine, not for the record: the
record is ``run.py``, which measures the baselines in the same run.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run


def profile_start(pid: int, out: Path) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--gil",
            "--format",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_stop(recorder: subprocess.Popen[bytes]) -> None:
    recorder.send_signal(signal.SIGINT)
    try:
        recorder.wait(timeout=30)
    except subprocess.TimeoutExpired:
        recorder.kill()
        recorder.wait()


# Where a sample's innermost frame is, as a stage of the path (first match wins).
STAGES = (
    ("SQLite (outbox, inbox, dedup ids)", ("keel/mesh/store.py", "sqlite3")),
    ("ChaCha20-Poly1305", ("noise.py",)),
    ("secure channel framing (session, framing)", ("session.py", "framing.py")),
    ("packets (MSGS, ACK)", ("packets.py",)),
    ("local stream codec (agent side frames)", ("keel/mesh/local.py",)),
    ("outbox bookkeeping (delivery core)", ("delivery.py",)),
    ("receiving cores (inbound, handoffs)", ("inbound.py", "handoffs.py")),
    (
        "node shells (node, links, outbound, inbox, streams)",
        ("node.py", "peer_link.py", "links.py", "outbound.py", "inbox.py", "agent_streams.py"),
    ),
    ("asyncio, sockets, syscalls", ("asyncio/", "selectors.py", "socket.py")),
)


def stage_of(leaf: str) -> str:
    for name, needles in STAGES:
        if any(needle in leaf for needle in needles):
            return name
    return "other"


def summarize(path: Path, title: str, top: int = 20) -> None:
    """Samples by stage of the path, then the hottest functions (self time)."""
    own: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        leaf = frames[-1]
        own[leaf.split(" (")[0] + " (" + leaf.rsplit("/", 1)[-1]] += n
        stages[stage_of(leaf)] += n
    if not total:
        print(f"   {title}: no samples")
        return
    print(f"\n   {title}: {total} samples while holding the GIL, by stage")
    for name, n in stages.most_common():
        print(f"   {100 * n / total:5.1f}%  {name}")
    print(f"   {title}: hottest functions (self time)")
    for name, n in own.most_common(top):
        print(f"   {100 * n / total:5.1f}%  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--pings", type=int, default=300)
    parser.add_argument("--netns", action="store_true", help="two hosts joined by veth")
    parser.add_argument("--profile", type=Path, help="py-spy both daemons during the flood")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kmf-"))
    try:
        with run.two_hosts(args.netns) as (a, b, medium):
            da = run.Daemon(workdir, "a", a, 0 if medium == "loopback" else run.MESH_PORT)
            db = run.Daemon(workdir, "b", b, 0 if medium == "loopback" else run.MESH_PORT)
            try:
                db.client.join(da.client.invite())
                time.sleep(0.5)
                run.mesh_run(da, db, a, b, "flood", size=args.size, count=min(args.count, 2000))
                pids = [run.daemon_pid(da), run.daemon_pid(db)]
                recorders = []
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    recorders = [
                        profile_start(pid, args.profile / f"{name}.txt")
                        for pid, name in zip(pids, ("sender", "receiver"), strict=True)
                    ]
                    time.sleep(1.0)
                flood = run.mesh_run(da, db, a, b, "flood", size=args.size, count=args.count)
                for recorder in recorders:
                    profile_stop(recorder)
                ping = run.mesh_run(da, db, a, b, "pingpong", size=args.size, count=args.pings)
            except Exception:
                for name in ("a", "b"):
                    log = workdir / f"{name}.log"
                    print(f"--- {log}", *log.read_text().splitlines()[-30:], sep="\n")
                raise
            finally:
                da.stop()
                db.stop()
        rate, latencies = flood["rate"], ping["latencies"]
        print(
            f"mesh {args.size} B over {medium}: {rate:,.0f} msg/s, {rate * args.size / 1e6:.1f} MB/s; "
            f"p50 {statistics.median(latencies):.3f} ms, p99 {run.percentile(latencies, 0.99):.3f} ms"
        )
        print(
            "CPU us/msg: "
            + ", ".join(f"{name} {value:.1f}" for name, value in flood["cpu_us"].items())
            + f"; total {sum(flood['cpu_us'].values()):.1f}"
        )
        if args.profile:
            for name in ("sender", "receiver"):
                summarize(args.profile / f"{name}.txt", f"{name} daemon")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
