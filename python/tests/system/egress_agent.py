"""A tier-2 agent for the egress system test: it tries the network and reports.

At start it resolves names (through the libc resolver and straight at other
resolvers), connects to addresses, and writes what worked to
``$STATE_DIRECTORY/egress-report.json``; then it idles. Runs on keel's own
Python (``/opt/keel/bin/python``: dnspython is there).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode


def resolve(name: str, server: str, tcp: bool = False) -> Any:
    query = dns.message.make_query(name, "AAAA" if ":" in server else "A")
    try:
        ask = dns.query.tcp if tcp else dns.query.udp
        response = ask(query, server, timeout=3)
    except dns.exception.Timeout:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    addresses = sorted(
        r.address for rrset in response.answer for r in rrset if hasattr(r, "address")
    )
    return {"rcode": dns.rcode.to_text(response.rcode()), "addresses": addresses}


def libc(name: str) -> Any:
    try:
        return sorted(
            {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
        )
    except socket.gaierror as exc:
        return f"gaierror {exc.errno}"


def connect(address: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect((address, port))
            sock.sendall(b"hello\n")
            return sock.recv(200).decode().strip()
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def main() -> None:
    plan = json.loads(sys.argv[1])
    report: dict[str, Any] = {"pid": os.getpid(), "uid": os.getuid()}
    report["resolve"] = {
        f"{name}@{server}{'/tcp' if tcp else ''}": resolve(name, server, tcp)
        for name, server, tcp in plan["resolve"]
    }
    report["libc"] = {name: libc(name) for name in plan["libc"]}
    report["connect"] = {f"{a}:{p}": connect(a, p) for a, p in plan["connect"]}
    path = Path(os.environ["STATE_DIRECTORY"]) / "egress-report.json"
    path.write_text(json.dumps(report))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
