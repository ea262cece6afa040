"""A bounded fuzz of the running proxy on loopback: malformed messages crash nothing, insert nothing."""

from __future__ import annotations

import random
import struct

import dns.exception
import dns.flags
import dns.message

from .world import AGENT_UID, World

ROUNDS_UDP = 3000
ROUNDS_TCP = 300
ALLOWED = "www.allowed.test"


def malformed(rng: random.Random) -> bytes:
    """A message the proxy must drop: it does not parse, or it is a response."""
    valid = dns.message.make_query(ALLOWED, rng.choice(["A", "AAAA", "HTTPS"])).to_wire()
    while True:
        how = rng.randrange(5)
        if how == 0:
            data = rng.randbytes(rng.randrange(0, 600))
        elif how == 1:
            data = valid[: rng.randrange(0, len(valid))]
        elif how == 2:
            flipped = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            data = bytes(flipped)
        elif how == 3:  # counts that promise more records than there are
            data = (
                valid[:4]
                + struct.pack("!HHHH", 1, rng.randrange(1, 9), rng.randrange(9), 0)
                + valid[12:]
            )
        else:  # a response (QR set) with an answer: a reflection attempt
            response = dns.message.make_response(dns.message.from_wire(valid))
            response.flags |= dns.flags.QR
            data = response.to_wire() + rng.randbytes(rng.randrange(0, 4))
        try:
            message = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
            return data
        if message.flags & dns.flags.QR:
            return data


def test_malformed_messages_neither_crash_nor_insert(world: World) -> None:
    world.start_internet()
    world.configure({"scout": {"uid": AGENT_UID, "port": 5301, "allow": [ALLOWED]}})
    world.start_daemon()
    rng = random.Random(20261206)
    fuzz = (
        "import socket, struct, sys\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "messages, offset = [], 0\n"
        "while offset < len(data):\n"
        "    (n,) = struct.unpack_from('!H', data, offset); offset += 2\n"
        "    messages.append(data[offset:offset + n]); offset += n\n"
        f"udp = messages[:{ROUNDS_UDP}]; tcp = messages[{ROUNDS_UDP}:]\n"
        "with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
        "    for m in udp: s.sendto(m, ('127.0.0.1', 5301))\n"
        "for m in tcp:\n"
        "    with socket.create_connection(('127.0.0.1', 5301), timeout=5) as c:\n"
        "        c.sendall(struct.pack('!H', len(m)) + m)\n"
        "        c.settimeout(5)\n"
        "        try: assert c.recv(10) == b''\n"
        "        except (ConnectionResetError, TimeoutError): pass\n"
        "print('sent', len(udp), len(tcp))\n"
    )
    messages = [malformed(rng) for _ in range(ROUNDS_UDP + ROUNDS_TCP)]
    corpus = world.workdir / "corpus"
    corpus.write_bytes(b"".join(struct.pack("!H", len(m)) + m for m in messages))
    result = world.host.run("python3", "-c", fuzz, str(corpus), timeout=300)
    assert result.stdout.strip() == f"sent {ROUNDS_UDP} {ROUNDS_TCP}"
    # The proxy is alive, answered nothing and inserted nothing ...
    dns_counters = world.status()["agents"]["scout"]["dns"]
    assert dns_counters["queries"] == 0
    assert dns_counters["malformed"] >= ROUNDS_TCP  # UDP may be lost under load; TCP is not
    assert world.elements("scout_v4") == {}
    assert world.elements("scout_v6") == {}
    # ... and still answers a well-formed question.
    agent = world.agent()
    assert agent.resolve(ALLOWED, server=world.dns_v4)["addresses"] == ["192.0.2.10"]
    assert world.daemon is not None
    assert world.daemon.poll() is None
    assert "Traceback" not in world.log()


def test_a_response_sent_to_the_proxy_is_not_answered(world: World) -> None:
    """No reflection through keel: a response (QR set) gets nothing back.

    The proxy handles datagrams in order, so the first thing that comes back
    after a response and then a question is the question's answer.
    """
    world.start_internet()
    world.configure({"scout": {"uid": AGENT_UID, "port": 5301, "allow": [ALLOWED]}})
    world.start_daemon()
    question = dns.message.make_query(ALLOWED, "A")
    response = dns.message.make_response(dns.message.make_query(ALLOWED, "A"))
    response.id = (question.id + 1) % 65536
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)\n"
        "s.sendto(bytes.fromhex(sys.argv[1]), ('127.0.0.1', 5301))\n"
        "s.sendto(bytes.fromhex(sys.argv[2]), ('127.0.0.1', 5301))\n"
        "print(s.recv(512)[:2].hex())\n"
    )
    first = world.host.run(
        "python3", "-c", probe, response.to_wire().hex(), question.to_wire().hex()
    )
    assert first.stdout.strip() == struct.pack("!H", question.id).hex()
