"""Packets the rules dropped (or in audit mode would have), from the kernel's NFLOG group.

The agent chains end in ``limit rate ... log group G prefix "keel-egress
<agent> <mode>"``: the kernel copies the first bytes of each such packet
(rate-limited per agent) to whoever listens on group ``G`` over nfnetlink.
:func:`read_packets` is the pure part (messages in, :class:`BlockedFlow`
out); :class:`NflogListener` binds the group and feeds an asyncio loop.
With no listener the kernel logs nothing and drops as before: the log never
decides a verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable

from keel.egress.denials import BlockedFlow
from keel.egress.netlink import NETLINK_NETFILTER
from keel.egress.ruleset import parse_log_prefix

log = logging.getLogger("keel.egress.nflog")

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
COPY_RANGE = 128  # bytes of each packet: the IP header and the ports
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLA_TYPE_MASK = 0x3FFF
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
WITH_PORTS = (6, 17, 132, 136)


def _attributes(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            break
        found[kind & NLA_TYPE_MASK] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def read_flow(payload: bytes) -> tuple[str, str, int | None] | None:
    """(protocol, destination, port) of an IPv4 or IPv6 packet's first bytes, or None."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        header = (payload[0] & 0x0F) * 4
        number = payload[9]
        destination = str(ipaddress.IPv4Address(payload[16:20]))
    elif version == 6 and len(payload) >= 40:
        header = 40
        number = payload[6]
        destination = str(ipaddress.IPv6Address(payload[24:40]))
    else:
        return None
    port = None
    if number in WITH_PORTS and len(payload) >= header + 4:
        (port,) = struct.unpack_from("!H", payload, header + 2)
    return PROTOCOLS.get(number, str(number)), destination, port


def read_packets(data: bytes) -> list[BlockedFlow]:
    """Every keel-logged packet in a buffer of nfnetlink messages."""
    flows: list[BlockedFlow] = []
    offset = 0
    while offset + 20 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16 or offset + length > len(data):
            break
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            attributes = _attributes(data[offset + 20 : offset + length])
            prefix = attributes.get(NFULA_PREFIX, b"").split(b"\0", 1)[0]
            ours = parse_log_prefix(prefix.decode("ascii", "replace"))
            flow = read_flow(attributes.get(NFULA_PAYLOAD, b""))
            if ours is not None and flow is not None:
                agent, enforced = ours
                flows.append(BlockedFlow(agent, flow[0], flow[1], flow[2], enforced))
        offset += (length + 3) & ~3
    return flows


def _config(group: int, attribute: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attribute
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


class NflogListener:
    """Binds an NFLOG group and hands each keel-logged packet to ``on_flow``."""

    def __init__(self, group: int, on_flow: Callable[[BlockedFlow], None]) -> None:
        self.group = group
        self.on_flow = on_flow
        self.lost = 0  # messages the kernel could not queue for us (ENOBUFS)
        self._sock: socket.socket | None = None

    def open(self) -> None:
        """Bind the group; raises OSError (EBUSY: another process listens on it)."""
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, 0))
            sock.settimeout(2.0)
            bind = _attr(NFULA_CFG_CMD, struct.pack("=B", NFULNL_CFG_CMD_BIND))
            mode = _attr(NFULA_CFG_MODE, struct.pack("!IBx", COPY_RANGE, NFULNL_COPY_PACKET))
            for seq, attribute in ((1, bind), (2, mode)):
                sock.send(_config(self.group, attribute, seq))
                self._expect_ack(sock, seq)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    @staticmethod
    def _expect_ack(sock: socket.socket, seq: int) -> None:
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, got = struct.unpack_from("=IHHI", data, offset)
                if kind == NLMSG_ERROR and got == seq:
                    (code,) = struct.unpack_from("=i", data, offset + 16)
                    if code:
                        raise OSError(-code, f"NFLOG group: {errno.errorcode.get(-code, -code)}")
                    return
                offset += max(16, (length + 3) & ~3)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._sock is not None
        loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # bounded per wake-up: the loop serves DNS too
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                log.warning("NFLOG group %d: %s", self.group, exc.strerror)
                return
            for flow in read_packets(data):
                self.on_flow(flow)

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._sock is None:
            return
        if loop is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
