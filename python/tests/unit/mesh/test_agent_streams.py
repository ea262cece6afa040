"""The daemon's side of an agent's stream: DELIVER frames written in pieces arrive whole."""

from __future__ import annotations

import asyncio
import os
import socket

from keel.mesh import local
from keel.mesh.agent_streams import LocalStream
from keel.mesh.local import Kind

NODE = "b" * 32


def head(receipt: int, size: int) -> bytes:
    return local.deliver_entry_head(
        receipt, f"{receipt:032x}", sender=NODE, received=2.5, room=None, size=size
    )


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        data += chunk
    return bytes(data)


def frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        kind, length = local.read_frame_head(data[: local.FRAME.size])
        out.append((kind, data[local.FRAME.size : local.FRAME.size + length]))
        data = data[local.FRAME.size + length :]
    return out


def test_frames_bigger_than_the_socket_takes_arrive_whole_and_in_order() -> None:
    """The first frame goes partly by ``sendmsg``, its rest through the transport; the
    next ones wait behind that rest; a SENT written between them keeps its place."""

    async def main() -> list[tuple[int, bytes]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        theirs.setblocking(False)
        _, writer = await asyncio.open_unix_connection(sock=ours)
        stream = LocalStream(writer)
        reading = asyncio.ensure_future(read_all(theirs))
        receipt = 0
        for batch in (payloads[:3], payloads[3:4], payloads[4:]):
            for payload in batch:
                receipt += 1
                stream.deliver(head(receipt, len(payload)), payload)
            stream.flush()
            assert writer.transport.get_write_buffer_size()  # the socket took part of it
            stream.write(local.encode_sent(receipt))
        stream.flush(always=True)  # an empty DELIVER frame
        stream.close()  # its duplicate of the socket: the agent sees EOF once the writer closes
        writer.close()
        await writer.wait_closed()
        data = await reading
        theirs.close()
        return frames(data)

    payloads = [os.urandom(size) for size in (65536, 0, 300_000, 17, 1 << 20, 5)]
    got = asyncio.run(main())
    # the 1 MiB payload fills a frame of its own at once (DELIVER_FRAME)
    assert [kind for kind, _ in got] == [Kind.DELIVER, Kind.SENT] * 2 + [
        Kind.DELIVER,
        Kind.DELIVER,
        Kind.SENT,
        Kind.DELIVER,
    ]
    delivered = [
        d for kind, body in got if kind == Kind.DELIVER for d in local.decode_deliver(body)
    ]
    assert [d.payload for d in delivered] == payloads
    assert [d.receipt for d in delivered] == [1, 2, 3, 4, 5, 6]
    assert [local.decode_sent(body)[0] for kind, body in got if kind == Kind.SENT] == [3, 4, 6]
    assert got[-1] == (Kind.DELIVER, b"")


def test_a_deliver_head_without_room_or_agent_is_the_general_form() -> None:
    plain = local.deliver_entry_head(7, "ab" * 16, sender=NODE, received=1.25, room=None, size=9)
    entry = plain + b"123456789"
    with_agent = local.deliver_entry(
        7, "ab" * 16, sender=NODE, received=1.25, room=None, payload=b"123456789", agent="x"
    )
    assert [tuple(d) for d in local.decode_deliver(entry)] == [
        (7, "ab" * 16, NODE, 1.25, None, b"123456789", None)
    ]
    assert len(with_agent) == len(entry) + 2  # the agent's length and name, and the flag
