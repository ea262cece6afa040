"""Many raw MCP connections from one process, each with a call in flight; then it waits to be killed.

``python mcp_flood.py SOCKET COUNT SECONDS``: opens COUNT connections to the
gateway, initialises each, sends a ``toolbox.sleep`` call of SECONDS on each,
prints ``ready`` once every connection is initialised, and sleeps. The test
kills it with SIGKILL.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def line(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def main() -> None:
    path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    connections = []
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "flood", "version": "1"},
        },
    }
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.sendall(line(initialize))
        connections.append(sock)
    for sock in connections:
        buffer = b""
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit("the gateway closed a connection during initialize")
            buffer += chunk
        sock.sendall(line({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "toolbox.sleep", "arguments": {"seconds": seconds}},
        }
        sock.sendall(line(call))
    print("ready", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
