"""A stand-in internet for keel egress: an authoritative DNS server and a few services.

The demo (``make demo``), the integration tests, the benchmark and the VM test
run it inside a network namespace (or VM) standing in for the world.

Run inside the internet namespace::

    python internet.py --zone zones.txt --dns 10.200.1.2 --dns fd42::2

- DNS (UDP and TCP, port 53) on each ``--dns`` address: authoritative for the
  zones in the file (dnspython's master-file format, several ``$ORIGIN``
  blocks allowed), CNAMEs inside the zones followed as a real authoritative
  server does, NXDOMAIN/NODATA with the SOA. Every question is printed as
  ``query NAME TYPE PROTO`` (the tests count them).
- On every address of the namespace: TCP 80, 853 and 9000 answer each line
  with ``HOST PORT LINE`` (HOST the address the client reached: which server
  a name led to); UDP 443 and 9000 echo the same way; TCP and UDP 9 discard;
  UDP 19 answers the first datagram from each client address and port with
  ``hello`` and discards the rest (a flow the sender's conntrack sees
  answered, for benchmarks).
- ``A.B.C.D.addr.test`` written ``A-B-C-D.addr.test`` answers A A.B.C.D (fresh
  names and addresses for benchmarks).

Prints ``ready`` once everything listens.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import socket
import struct
import sys

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

TCP_PORTS = (80, 853, 9000)
UDP_PORTS = (443, 9000)
DISCARD = 9  # TCP and UDP: everything read and thrown away (throughput benchmarks)
ANSWER_ONCE = 19  # UDP: the first datagram of each flow answered, the rest thrown away
MAX_FLOWS = 10_000


def load_zones(path: str) -> list[dns.zone.Zone]:
    with open(path, encoding="utf-8") as file:
        text = file.read()
    zones = []
    for block in text.split("$ORIGIN ")[1:]:
        origin, _, body = block.partition("\n")
        zones.append(dns.zone.from_text(body, origin=origin.strip(), relativize=False))
    assert all(zone.origin is not None for zone in zones)
    return zones


SYNTHETIC = dns.name.from_text("addr.test.")


def synthesize(name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
    """``10-77-0-1.addr.test A`` is 10.77.0.1 (any name, for benchmarks that need fresh ones)."""
    if rdtype != dns.rdatatype.A or len(name.labels) < 2 or name.parent() != SYNTHETIC:
        return None
    label = name.labels[0].decode(errors="replace")
    parts = label.split("-")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
        return None
    return dns.rrset.from_text(name, 300, "IN", "A", ".".join(parts))


def origin(zone: dns.zone.Zone) -> dns.name.Name:
    assert zone.origin is not None
    return zone.origin


class Authority:
    def __init__(self, zones: list[dns.zone.Zone]) -> None:
        self.zones = sorted(zones, key=lambda z: len(origin(z).labels), reverse=True)

    def zone_of(self, name: dns.name.Name) -> dns.zone.Zone | None:
        for zone in self.zones:
            if name.is_subdomain(origin(zone)):
                return zone
        return None

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        synthesized = synthesize(name, rdtype)
        if synthesized is not None:
            reply.answer.append(synthesized)
            return reply
        zone = self.zone_of(name)
        if zone is None:
            reply.set_rcode(dns.rcode.REFUSED)
            return reply
        for _ in range(16):
            node = zone.get_node(name)
            if node is None:
                if not reply.answer:
                    reply.set_rcode(dns.rcode.NXDOMAIN)
                self._soa(reply, zone)
                return reply
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is not None and rdtype != dns.rdatatype.CNAME:
                reply.answer.append(dns.rrset.from_rdata_list(name, cname.ttl, list(cname)))
                name = cname[0].target
                next_zone = self.zone_of(name)
                if next_zone is None:
                    return reply  # out of our zones: the resolver follows it
                zone = next_zone
                continue
            found = node.get_rdataset(dns.rdataclass.IN, rdtype)
            if found is None:
                self._soa(reply, zone)
            else:
                reply.answer.append(dns.rrset.from_rdata_list(name, found.ttl, list(found)))
            return reply
        return reply

    @staticmethod
    def _soa(reply: dns.message.Message, zone: dns.zone.Zone) -> None:
        soa = zone.get_rdataset(origin(zone), dns.rdatatype.SOA)
        if soa is not None:
            reply.authority.append(dns.rrset.from_rdata_list(origin(zone), soa.ttl, list(soa)))


def log(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = respond(self.authority, data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def respond(authority: Authority, data: bytes, proto: str) -> bytes | None:
    try:
        query = dns.message.from_wire(data)
    except Exception:
        return None
    if not query.question:
        return None
    question = query.question[0]
    log(
        f"query {question.name.to_text(True).lower()} {dns.rdatatype.to_text(question.rdtype)} {proto}"
    )
    reply = authority.answer(query)
    limit = 65535 if proto == "tcp" else (query.payload if query.edns >= 0 else 512)
    try:
        return reply.to_wire(max_size=limit)
    except dns.exception.TooBig:
        truncated = dns.message.make_response(query)
        truncated.flags |= dns.flags.TC | dns.flags.AA
        return truncated.to_wire()


async def dns_tcp(
    authority: Authority, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = respond(authority, await reader.readexactly(length), "tcp")
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def line_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    host, port = writer.get_extra_info("sockname")[:2]
    try:
        while line := await reader.readline():
            writer.write(f"{host} {port} {line.decode(errors='replace').strip()}\n".encode())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.read(1 << 20):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


class Echo(asyncio.DatagramProtocol):
    def __init__(self, port: int) -> None:
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(b"echo " + data, addr)


class AnswerOnce(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.seen: set[object] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr in self.seen or self.transport is None:
            return
        if len(self.seen) >= MAX_FLOWS:
            self.seen.clear()
        self.seen.add(addr)
        self.transport.sendto(b"hello", addr)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zone", required=True)
    parser.add_argument("--dns", action="append", default=[])
    args = parser.parse_args()
    authority = Authority(load_zones(args.zone))
    loop = asyncio.get_running_loop()
    for address in args.dns:
        await loop.create_datagram_endpoint(lambda: DnsUdp(authority), local_addr=(address, 53))
        await asyncio.start_server(lambda r, w: dns_tcp(authority, r, w), address, 53)
    for port in TCP_PORTS:
        for host in ("0.0.0.0", "::"):
            sock = socket.socket(
                socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if ":" in host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            await asyncio.start_server(line_service, sock=sock)
    for address in local_addresses():
        # One socket per address, so that replies leave from the address asked.
        for port in UDP_PORTS:
            await loop.create_datagram_endpoint(
                functools.partial(Echo, port), local_addr=(address, port)
            )
        await loop.create_datagram_endpoint(AnswerOnce, local_addr=(address, ANSWER_ONCE))
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, DISCARD))
        await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
    await asyncio.start_server(discard, "0.0.0.0", DISCARD)
    log("ready")
    await asyncio.Event().wait()


def local_addresses() -> list[str]:
    import subprocess

    out = subprocess.run(
        ["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if parts[2] in ("inet", "inet6"):
            address = parts[3].split("/")[0]
            if not address.startswith("fe80") and address not in ("127.0.0.1", "::1"):
                found.append(address)
    return found


if __name__ == "__main__":
    asyncio.run(main())
