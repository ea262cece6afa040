#!/usr/bin/env python3
"""A small example agent that reports what its sandbox lets it do.

It serves ``GET /health`` (200 "ok") and ``GET /report`` on 127.0.0.1:PORT and,
at start, tries what each ``--write DIR`` / ``--read FILE`` asks plus opening
raw, packet and netlink sockets, and writes the outcome to ``report.json`` in
its state directory (``$STATE_DIRECTORY``, set by systemd's StateDirectory=).
The system tests compare those reports across trust tiers; ``keel watch``
probes ``/health``. Standard library only: it runs on any python3.

If systemd gave it a watchdog (``WatchdogSec=`` via the spec's
``health.watchdogSec``) it pings at half the interval.
"""

from __future__ import annotations

import argparse
import errno
import http.server
import json
import os
import pwd
import socket
import threading
import time
from pathlib import Path
from typing import Any


def attempt(action: Any) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def try_write(directory: str) -> str:
    def write() -> None:
        probe = Path(directory) / f".keel-probe-{os.getpid()}"
        probe.write_text("probe\n")
        probe.unlink()

    return attempt(write)


def try_read(path: str) -> str:
    return attempt(lambda: Path(path).read_bytes())


def try_socket(family: int, kind: int, proto: int = 0) -> str:
    return attempt(lambda: socket.socket(family, kind, proto).close())


def status_fields() -> dict[str, str]:
    wanted = {"NoNewPrivs", "CapEff", "CapBnd", "CapAmb", "Seccomp"}
    fields: dict[str, str] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            fields[key] = value.strip()
    return fields


def report(args: argparse.Namespace) -> dict[str, Any]:
    checks = {f"write:{d}": try_write(d) for d in args.write}
    checks.update({f"read:{f}": try_read(f) for f in args.read})
    checks["socket:inet"] = try_socket(socket.AF_INET, socket.SOCK_STREAM)
    checks["socket:raw"] = try_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    checks["socket:packet"] = try_socket(socket.AF_PACKET, socket.SOCK_RAW)
    checks["socket:netlink"] = try_socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    uid = os.getuid()
    return {
        "name": args.name,
        "pid": os.getpid(),
        "uid": uid,
        "user": pwd.getpwuid(uid).pw_name,
        "started": time.time(),
        "environment": {k: v for k, v in os.environ.items() if k.startswith("AGENT_")},
        "status": status_fields(),
        "checks": checks,
    }


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def watchdog_loop() -> None:
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if not usec:
        return
    while True:
        notify("WATCHDOG=1")
        time.sleep(usec / 2e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="agent")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--write", action="append", default=[], metavar="DIR")
    parser.add_argument("--read", action="append", default=[], metavar="FILE")
    args = parser.parse_args()

    result = report(args)
    state = Path(os.environ.get("STATE_DIRECTORY", ".").split(":")[0])
    (state / "report.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    body = json.dumps(result, sort_keys=True).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                payload, kind = b"ok\n", "text/plain"
            elif self.path == "/report":
                payload, kind = body, "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    threading.Thread(target=watchdog_loop, daemon=True).start()
    notify("READY=1")
    print(f"{args.name}: serving on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
