"""A userspace netem: delay, jitter and loss for kernels without ``sch_netem``.

Some kernels (this project's test VMs among them) are built without the
``netem`` qdisc. There, :meth:`tests.harness.netns.Link.netem` sends a link
end's outgoing IPv4 packets to an NFQUEUE (``iptables -j NFQUEUE --queue-bypass``
in that host's namespace) and runs this program inside the host: it holds each
packet for ``delay ± jitter`` ms, then lets it go (or drops it with probability
``loss``). Packets are never copied to userspace, only their ids (copy mode
META), so the cost per packet is two small netlink messages.

Standard library only; it speaks nfnetlink_queue directly
(``linux/netfilter/nfnetlink_queue.h``). It prints ``ready`` once bound, and on
SIGTERM releases everything it holds before exiting, so clearing a delay does
not drop the packets in flight.

    python3 shaper.py --queue 1 --delay-ms 50 --jitter-ms 5 --loss-pct 1
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 1 << 0, 1 << 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_DROP, NF_ACCEPT = 0, 1


def attribute(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def message(kind: int, flags: int, seq: int, queue: int, attributes: bytes) -> bytes:
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue) + attributes
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0)
    return header + body


def messages(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        out.append((kind, data[offset + 16 : offset + length]))
        offset += (length + 3) & ~3
    return out


def packet_id(body: bytes) -> int | None:
    offset = 4  # struct nfgenmsg
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if length < 4:
            return None
        if kind & 0x3FFF == NFQA_PACKET_HDR:
            return int(struct.unpack_from("!I", body, offset + 4)[0])
        offset += (length + 3) & ~3
    return None


class Shaper:
    def __init__(self, queue: int, delay: float, jitter: float, loss: float) -> None:
        self.queue = queue
        self.delay, self.jitter, self.loss = delay, jitter, loss
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.seq = 0
        self.held: list[tuple[float, int, int]] = []
        self.rng = random.Random()

    def request(self, kind: int, attributes: bytes, *, ack: bool = False) -> None:
        self.seq += 1
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        self.sock.send(message(kind, flags, self.seq, self.queue, attributes))
        if ack:
            for msg_kind, body in messages(self.sock.recv(65536)):
                if msg_kind == NLMSG_ERROR and struct.unpack_from("=i", body)[0] != 0:
                    errno = -struct.unpack_from("=i", body)[0]
                    raise OSError(errno, f"nfnetlink_queue config: {os.strerror(errno)}")

    def bind(self) -> None:
        self.request(
            NFQNL_MSG_CONFIG,
            attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)),
            ack=True,
        )
        params = attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
        maxlen = attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536))
        flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
        flag_attrs = attribute(NFQA_CFG_FLAGS, struct.pack("!I", flags)) + attribute(
            NFQA_CFG_MASK, struct.pack("!I", flags)
        )
        self.request(NFQNL_MSG_CONFIG, params + maxlen + flag_attrs, ack=True)

    def verdict(self, ident: int, verdict: int) -> None:
        self.request(
            NFQNL_MSG_VERDICT, attribute(NFQA_VERDICT_HDR, struct.pack("!II", verdict, ident))
        )

    def take(self, now: float) -> None:
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:  # ENOBUFS: the kernel dropped some notifications
                print(f"shaper: {exc}", file=sys.stderr, flush=True)
                return
            for kind, body in messages(data):
                if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    continue
                ident = packet_id(body)
                if ident is None:
                    continue
                if self.loss and self.rng.random() < self.loss:
                    self.verdict(ident, NF_DROP)
                    continue
                hold = max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
                heapq.heappush(self.held, (now + hold, ident, ident))

    def release(self, now: float, *, everything: bool = False) -> None:
        while self.held and (everything or self.held[0][0] <= now):
            _, _, ident = heapq.heappop(self.held)
            self.verdict(ident, NF_ACCEPT)

    def serve(self, stop_fd: int) -> None:
        while True:
            now = time.monotonic()
            timeout = max(0.0, self.held[0][0] - now) if self.held else None
            ready, _, _ = select.select([self.sock.fileno(), stop_fd], [], [], timeout)
            now = time.monotonic()
            if stop_fd in ready:
                self.take(now)
                self.release(now, everything=True)
                return
            if self.sock.fileno() in ready:
                self.take(now)
            self.release(now)


def main() -> None:
    parser = argparse.ArgumentParser(description="delay, jitter and loss on an NFQUEUE")
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0)
    parser.add_argument("--jitter-ms", type=float, default=0)
    parser.add_argument("--loss-pct", type=float, default=0)
    args = parser.parse_args()
    stop_read, stop_write = os.pipe()
    signal.signal(signal.SIGTERM, lambda *_: os.write(stop_write, b"x"))
    signal.signal(signal.SIGINT, lambda *_: os.write(stop_write, b"x"))
    shaper = Shaper(args.queue, args.delay_ms / 1000, args.jitter_ms / 1000, args.loss_pct / 100)
    shaper.bind()
    print("ready", flush=True)
    shaper.serve(stop_read)


if __name__ == "__main__":
    main()
