"""The sending daemon's ingest alone: an agent's 64 KiB messages into the outbox, none sent.

Two daemons on loopback join one mesh; the recipient's daemon is then
stopped, so the sender's pump has nothing to send and the sending daemon's
CPU (user and system, from /proc) covers only the path from the agent's
stream to the outbox: reading the SEND frames, the checks, the durable
enqueue (blob segment and SQLite rows) and the outbox's bookkeeping. The
agent is this process (``MeshClient.sender``). Keep ``--count`` times the
size under the outbox's 256 MiB; put the state on tmpfs (``TMPDIR=/dev/shm``)
to leave the disk out. Figures swing on a shared machine: alternate runs
from the trees compared (each runs the daemons of its own tree).

Run: ``.venv/bin/python bench/mesh/ingest.py [--count 3800] [--size 65536]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/mesh/run.py: the daemons


def cpu(pid: int) -> tuple[float, float, int]:
    """User and system CPU seconds and minor page faults of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def ingest(count: int, size: int) -> tuple[float, float, float]:
    """(user us, system us, minor faults) per message of the sending daemon."""
    workdir = Path(tempfile.mkdtemp(prefix="keel-ingest-"))
    side = run.Side("127.0.0.1", [])
    try:
        sender = run.Daemon(workdir, "a", side, run.MESH_PORT + 1)
        try:
            recipient = run.Daemon(workdir, "b", side, run.MESH_PORT + 2)
            recipient.client.join(sender.client.invite())
            to = recipient.node_id
            recipient.stop()
            pid = run.daemon_pid(sender)
            payload = os.urandom(size)
            with sender.client.sender(retry=120) as out:  # warm: the first segment, the cache
                for _ in range(50):
                    out.send(to, "bulk", payload)
            before = cpu(pid)
            with sender.client.sender(retry=120) as out:
                for _ in range(count):
                    out.send(to, "bulk", payload)
            after = cpu(pid)
        finally:
            sender.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    user, system, faults = (b - a for a, b in zip(before, after, strict=True))
    return 1e6 * user / count, 1e6 * system / count, faults / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3800)
    parser.add_argument("--size", type=int, default=65536)
    args = parser.parse_args()
    user, system, faults = ingest(args.count, args.size)
    print(
        f"{run.ROOT}: sending daemon per message: user {user:.0f} us, system {system:.0f} us, "
        f"total {user + system:.0f} us, {faults:.1f} minor faults"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
