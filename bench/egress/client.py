"""What the egress benchmark runs inside the keel host, as an agent (or another user).

    python client.py latency PLAN.json        {"server": "10.200.1.2", "names": [...]}
    python client.py first-packet PLAN.json   {"server": ..., "names": [...], "port": 80}
    python client.py throughput PLAN.json     {"address": ..., "port": 9, "seconds": 3}
    python client.py packets PLAN.json        {"address": ..., "port": 9, "seconds": 2, "size": 64,
                                               "answered": false}

Prints one JSON object. Timings are taken here, around the system calls,
with ``time.perf_counter_ns``.
"""

from __future__ import annotations

import json
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype

TIMEOUT = 2.0


def ask(sock: socket.socket, server: str, name: str) -> tuple[int, list[str]]:
    """One UDP question; (nanoseconds, addresses), addresses empty on failure."""
    query = dns.message.make_query(name, "A")
    wire = query.to_wire()
    started = time.perf_counter_ns()
    sock.sendto(wire, (server, 53))
    while True:
        data = sock.recv(4096)
        reply = dns.message.from_wire(data)
        if reply.id == query.id:
            break
    elapsed = time.perf_counter_ns() - started
    addresses = [
        r.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for r in rrset
    ]
    return elapsed, addresses


def latency(plan: dict[str, Any]) -> dict[str, Any]:
    samples: list[int] = []
    failures = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        for name in plan["names"]:
            try:
                elapsed, addresses = ask(sock, plan["server"], name)
            except TimeoutError:
                failures += 1
                continue
            if not addresses:
                failures += 1
            samples.append(elapsed)
    return {"ns": samples, "failures": failures}


def first_packet(plan: dict[str, Any]) -> dict[str, Any]:
    """Resolve a fresh name, then connect to its address at once; count what the rules dropped."""
    query_to_answer: list[int] = []
    query_to_connected: list[int] = []
    dropped: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as resolver:
        resolver.settimeout(TIMEOUT)
        for name in plan["names"]:
            started = time.perf_counter_ns()
            elapsed, addresses = ask(resolver, plan["server"], name)
            query_to_answer.append(elapsed)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
                # A dropped SYN is retransmitted after 1 s: a connect that
                # takes longer than that met a rule that dropped its first packet.
                conn.settimeout(0.9)
                try:
                    conn.connect((addresses[0], plan["port"]))
                except OSError as exc:
                    dropped.append(f"{name}: {exc}")
                    continue
            query_to_connected.append(time.perf_counter_ns() - started)
    return {
        "query_to_answer_ns": query_to_answer,
        "query_to_connected_ns": query_to_connected,
        "dropped": len(dropped),
        "examples": dropped[:5],
    }


def throughput(plan: dict[str, Any]) -> dict[str, Any]:
    chunk = b"\0" * (1 << 20)
    sent = 0
    with socket.create_connection((plan["address"], plan["port"]), timeout=5) as conn:
        started = time.perf_counter()
        deadline = started + plan["seconds"]
        while time.perf_counter() < deadline:
            conn.sendall(chunk)
            sent += len(chunk)
        elapsed = time.perf_counter() - started
    return {"bytes": sent, "seconds": elapsed}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def packets(plan: dict[str, Any]) -> dict[str, Any]:
    """Datagrams as fast as one Python thread sends them; the wall time and the CPU time
    they took (the kernel's work for each, netfilter's included, is done in this
    process: the CPU time per packet is what the rules cost, whatever else runs)."""
    payload = b"\0" * plan["size"]
    count = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((plan["address"], plan["port"]))
        if plan.get("answered"):
            # One exchange first: the flow's conntrack entry is then established.
            sock.settimeout(TIMEOUT)
            sock.send(payload)
            sock.recv(100)
        started = time.perf_counter()
        cpu = cpu_seconds()
        deadline = started + plan["seconds"]
        send = sock.send
        while True:
            for _ in range(1000):
                send(payload)
            count += 1000
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds() - cpu
    return {"packets": count, "seconds": elapsed, "cpu_seconds": cpu}


def main() -> None:
    command, plan = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    handlers = {
        "latency": latency,
        "first-packet": first_packet,
        "throughput": throughput,
        "packets": packets,
    }
    print(json.dumps(handlers[command](plan)))


if __name__ == "__main__":
    main()
