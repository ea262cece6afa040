"""One benchmark agent: a process that talks to its own node's mesh daemon (``keel.mesh.client``).

``run.py`` starts ``meshpeer.py recv`` next to the receiving node (in its
network namespace) and ``meshpeer.py send`` next to the sending node, as
``peer.py`` does for the baselines, so each agent is its own process like a
real agent on its own host. Each message starts with the sender's
``CLOCK_MONOTONIC`` in nanoseconds; the receiver measures one-way latency.

- ``flood``: the sender pipelines ``count`` messages (``MeshClient.sender``);
  the receiver's subscription takes them as they are pushed.
- ``pingpong``: the sender sends one message (``MeshClient.send``) and waits
  until the receiver has it before the next: the receiver writes a byte to a
  FIFO (``--pace``, a side channel like the in-process event the first
  version of this benchmark used), so only the measured message crosses
  the mesh.

Each side prints one JSON line with its figures (and its own CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "src"))

from keel.mesh.client import MeshClient

STAMP = struct.Struct(">Q")


def stamped(size: int) -> bytes:
    return STAMP.pack(time.monotonic_ns()) + b"\x5a" * (size - STAMP.size)


def receive(args: argparse.Namespace) -> dict[str, Any]:
    client = MeshClient(args.socket, timeout=60)
    latencies: list[int] = []
    first = last = 0
    pace = None
    with client.subscribe(args.topic, max_unacked=4096) as inbox:
        inbox.recv()  # subscribed before the sender starts
        print("ready", flush=True)
        if args.mode == "pingpong":
            pace = os.open(args.pace, os.O_WRONLY)  # blocks until the sender opens it
        cpu = time.process_time()
        while len(latencies) < args.count:
            for message in inbox.recv(wait=10):
                now = time.monotonic_ns()
                first = first or now
                last = now
                latencies.append(now - STAMP.unpack_from(message.data)[0])
                if pace is not None:
                    os.write(pace, b"k")
        cpu = time.process_time() - cpu
    return {"first_ns": first, "last_ns": last, "latencies_ns": latencies, "cpu_s": cpu}


def send(args: argparse.Namespace) -> dict[str, Any]:
    client = MeshClient(args.socket, timeout=60)
    cpu = time.process_time()
    start = time.monotonic_ns()
    if args.mode == "flood":
        with client.sender(retry=120) as out:
            for _ in range(args.count):
                out.send(args.to, args.topic, stamped(args.size))
    else:
        pace = os.open(args.pace, os.O_RDONLY)
        try:
            for _ in range(args.count):
                client.send(args.to, args.topic, stamped(args.size))
                if not os.read(pace, 1):
                    raise RuntimeError("the receiving agent went away")
        finally:
            os.close(pace)
    return {"start_ns": start, "cpu_s": time.process_time() - cpu}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["send", "recv"])
    parser.add_argument("--socket", required=True, help="the node's control socket")
    parser.add_argument("--mode", choices=["flood", "pingpong"], required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--to", default="")
    parser.add_argument("--pace", default="", help="pingpong: the FIFO the receiver writes to")
    args = parser.parse_args()
    result = receive(args) if args.role == "recv" else send(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
