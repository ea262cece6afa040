"""What an agent does in the egress tests, run under the agent's uid, driven over stdin.

One JSON command per line in, one JSON result per line out::

    {"op": "resolve", "name": "a.test", "type": "A", "server": "10.200.1.2", "tcp": false}
    -> {"rcode": "NOERROR", "addresses": ["192.0.2.10"]}    (or {"error": "timeout"})
    {"op": "connect", "address": "192.0.2.10", "port": 80, "proto": "tcp"}
    -> {"ok": true, "reply": "192.0.2.10 80 hello"}           (or {"ok": false, "error": "EPERM"})
    {"op": "open", "id": "c1", "address": ..., "port": 9000}  a TCP connection kept open
    {"op": "talk", "id": "c1"}                                one line over it
    {"op": "load_start", "good": [[addr, port], ...], "bad": [[addr, port], ...]}
    {"op": "load_count"} -> {"good_ok": n, "good_failed": n, "bad_ok": n, "bad_failed": n}
    {"op": "load_stop"} -> the same, and the loop ends, with "bad_ok_at": when (time.monotonic())
                             each connect to a bad destination that succeeded began
    {"op": "run", "argv": [...]} -> {"rc": n, "stdout": ..., "stderr": ...}
    {"op": "datagram", "source_port": 40000, "address": ..., "port": 443}
    -> {"ok": true, "reply": "..."}  one UDP datagram from a chosen port (and its answer)
    {"op": "serve", "port": 8080} -> {"ok": true}  a TCP server answering "agent PORT LINE"
("resolve" takes a "source_port" too.)
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

TIMEOUT = 3.0


def resolve(command: dict[str, Any]) -> dict[str, Any]:
    query = dns.message.make_query(command["name"], command.get("type", "A"))
    server = command["server"]
    try:
        timeout = command.get("timeout", TIMEOUT)
        if command.get("tcp"):
            response = dns.query.tcp(query, server, timeout=timeout)
        else:
            source_port = command.get("source_port", 0)
            response = dns.query.udp(query, server, timeout=timeout, source_port=source_port)
    except dns.exception.Timeout:
        return {"error": "timeout"}
    except OSError as exc:
        return {"error": errno.errorcode.get(exc.errno or 0, str(exc))}
    addresses = [
        rdata.address
        for rrset in response.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rdata in rrset
    ]
    return {
        "rcode": dns.rcode.to_text(response.rcode()),
        "addresses": addresses,
        "names": [rrset.name.to_text(True) for rrset in response.answer],
        "ttls": [rrset.ttl for rrset in response.answer],
    }


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def connect(
    address: str, port: int, proto: str = "tcp", timeout: float = TIMEOUT
) -> dict[str, Any]:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    try:
        with socket.socket(_family(address), kind) as sock:
            sock.settimeout(timeout)
            sock.connect((address, port))
            sock.sendall(b"hello\n")
            reply = sock.recv(200).decode(errors="replace").strip()
    except TimeoutError:
        return {"ok": False, "error": "timeout"}
    except OSError as exc:
        return {"ok": False, "error": errno.errorcode.get(exc.errno or 0, str(exc))}
    return {"ok": True, "reply": reply}


def datagram(source_port: int, address: str, port: int, timeout: float = 1.0) -> dict[str, Any]:
    try:
        with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if ":" in address else "0.0.0.0", source_port))
            sock.settimeout(timeout)
            sock.sendto(b"hello\n", (address, port))
            reply = sock.recv(200).decode(errors="replace").strip()
    except TimeoutError:
        return {"ok": False, "error": "timeout"}
    except OSError as exc:
        return {"ok": False, "error": errno.errorcode.get(exc.errno or 0, str(exc))}
    return {"ok": True, "reply": reply}


def serve(port: int) -> None:
    """A TCP server in a thread: each connection gets "agent PORT LINE" for each line."""
    listener = socket.create_server(("0.0.0.0", port), reuse_port=False)

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                conn.sendall(f"agent {port} {line.decode(errors='replace').strip()}\n".encode())

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


class Load:
    """Connects in a loop to good and bad destinations until stopped, counting outcomes."""

    def __init__(self, good: list[list[Any]], bad: list[list[Any]]) -> None:
        self.good, self.bad = good, bad
        self.counts = {"good_ok": 0, "good_failed": 0, "bad_ok": 0, "bad_failed": 0}
        self.failures: list[str] = []
        self.bad_ok_at: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            for kind, targets in (("good", self.good), ("bad", self.bad)):
                for address, port in targets:
                    # A blocked SYN never completes; 0.3 s is ages for a veth.
                    began = time.monotonic()
                    result = connect(address, port, timeout=2.0 if kind == "good" else 0.3)
                    if kind == "bad" and result["ok"]:
                        self.bad_ok_at.append(began)
                    outcome = "ok" if result["ok"] else "failed"
                    self.counts[f"{kind}_{outcome}"] += 1
                    if (kind == "good") != result["ok"] and len(self.failures) < 20:
                        self.failures.append(f"{kind} {address}:{port}: {result}")

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        self.thread.join()
        return {**self.counts, "failures": self.failures, "bad_ok_at": self.bad_ok_at}


def main() -> None:
    connections: dict[str, socket.socket] = {}
    load: Load | None = None
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        result: dict[str, Any]
        if op == "resolve":
            result = resolve(command)
        elif op == "connect":
            result = connect(
                command["address"],
                command["port"],
                command.get("proto", "tcp"),
                command.get("timeout", TIMEOUT),
            )
        elif op == "open":
            try:
                sock = socket.create_connection(
                    (command["address"], command["port"]), timeout=TIMEOUT
                )
                connections[command["id"]] = sock
                result = {"ok": True}
            except OSError as exc:
                result = {"ok": False, "error": errno.errorcode.get(exc.errno or 0, str(exc))}
        elif op == "talk":
            sock = connections[command["id"]]
            try:
                sock.sendall(b"still there\n")
                result = {"ok": True, "reply": sock.recv(200).decode().strip()}
            except OSError as exc:
                result = {"ok": False, "error": errno.errorcode.get(exc.errno or 0, str(exc))}
        elif op == "load_start":
            load = Load(command["good"], command["bad"])
            result = {"ok": True}
        elif op == "load_count":
            assert load is not None
            result = dict(load.counts)
        elif op == "load_stop":
            assert load is not None
            result = load.finish()
        elif op == "datagram":
            result = datagram(command["source_port"], command["address"], command["port"])
        elif op == "serve":
            serve(command["port"])
            result = {"ok": True}
        elif op == "run":
            proc = subprocess.run(command["argv"], capture_output=True, text=True, check=False)
            result = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
        else:
            result = {"error": f"unknown op {op}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
