#!/usr/bin/env python3
"""An example agent that talks to agents on other hosts through its keel mesh node.

Two roles, as in ``make demo``:

- ``--serve``: answer every message on topic ``<name>`` with a short reply to
  its sender (topic ``reply``), until ``--count`` messages were answered;
- ``--ask NODE_ID``: send ``--count`` questions to the agent named ``--peer``
  on node NODE_ID, then print the replies as they come back.

It only needs ``keel.mesh.client``: the local daemon does the encryption,
the queueing and the retries; a message queued while the peer is offline is
delivered when it comes back, once.
"""

from __future__ import annotations

import argparse
import sys
import time

from keel.mesh.client import MeshClient


def serve(mesh: MeshClient, name: str, count: int, timeout: float) -> int:
    answered = 0
    deadline = time.monotonic() + timeout
    while answered < count and time.monotonic() < deadline:
        for message in mesh.recv(name, wait=min(5.0, deadline - time.monotonic())):
            text = message.data.decode(errors="replace")
            print(f"[{name}] from {message.sender[:8]}: {text}", flush=True)
            mesh.send(message.sender, "reply", f"{name} noted: {text}".encode())
            answered += 1
    mesh.ack()
    return 0 if answered == count else 1


def ask(mesh: MeshClient, name: str, peer: str, node: str, *, count: int, timeout: float) -> int:
    for i in range(1, count + 1):
        message_id = mesh.send(node, peer, f"{name} report #{i}".encode())
        print(f"[{name}] sent report #{i} to {peer} (message {message_id[:8]})", flush=True)
    replies = 0
    deadline = time.monotonic() + timeout
    while replies < count and time.monotonic() < deadline:
        for message in mesh.recv("reply", wait=min(5.0, deadline - time.monotonic())):
            print(f"[{name}] reply: {message.data.decode(errors='replace')}", flush=True)
            replies += 1
    mesh.ack()
    return 0 if replies == count else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="this agent's name (its topic)")
    parser.add_argument(
        "--socket", help="the local mesh node's control socket (default: /run/keel/mesh.sock)"
    )
    parser.add_argument("--serve", action="store_true", help="answer messages")
    parser.add_argument("--ask", metavar="NODE_ID", help="send reports to this node")
    parser.add_argument("--peer", default="notes", help="the agent to ask (default notes)")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if not args.serve and not args.ask:
        parser.error("give --serve or --ask NODE_ID")
    with MeshClient(args.socket) as mesh:
        if args.serve:
            return serve(mesh, args.name, args.count, args.timeout)
        return ask(mesh, args.name, args.peer, args.ask, count=args.count, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
