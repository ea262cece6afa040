"""The client's binary stream: frames read whole however the socket cuts them, and
frames sent in pieces arriving whole (``keel.mesh.client.transport``)."""

from __future__ import annotations

import itertools
import os
import platform
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import pytest
from keel.errors import Unavailable
from keel.mesh import local
from keel.mesh.client.transport import KEEP, READ_AHEAD, Buffer, Stream, send_all
from keel.mesh.local import Kind

NODE = "b" * 32
MESSAGE_ID = "0123456789abcdef" * 2


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Stream, socket.socket]]:
    """A client stream on one end of a socket pair; the test plays the daemon on the other."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = Stream(tmp_path / "mesh.sock", 10.0, sock=ours)
    try:
        yield stream, theirs
    finally:
        stream.close()
        theirs.close()


def deliver_frame(payloads: Sequence[bytes], *, room: str | None = None) -> bytes:
    entries = [
        local.deliver_entry(
            n + 1, MESSAGE_ID, sender=NODE, received=1.5, room=room, payload=p, agent=None
        )
        for n, p in enumerate(payloads)
    ]
    return local.frame(Kind.DELIVER, b"".join(entries))


def payloads_of(body: bytes | bytearray | memoryview) -> list[bytes]:
    return [d.payload for d in local.decode_deliver(body)]


def send_from_a_thread(sock: socket.socket, data: bytes) -> threading.Thread:
    """Write ``data`` (more than the socket buffers hold) while the test reads."""
    thread = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("cut", [1, 4, 5, 6, 70, 5 + 65 + 4 + 1000, -1])
def test_a_deliver_frame_cut_anywhere_is_read_whole(
    pair: tuple[Stream, socket.socket], cut: int
) -> None:
    stream, daemon = pair
    payloads = [os.urandom(65536), os.urandom(100), b""]
    data = deliver_frame(payloads)
    daemon.sendall(data[:cut])
    assert stream.frame(0.05, "recv") is None  # what came is kept for the next call
    daemon.sendall(data[cut:])
    got = stream.frame(None, "recv")
    assert got is not None
    kind, body = got
    assert kind == Kind.DELIVER
    assert payloads_of(body) == payloads
    assert all(type(p) is bytes for p in payloads_of(body))


def test_frames_that_come_several_to_a_read_and_one_large_frame(
    pair: tuple[Stream, socket.socket],
) -> None:
    stream, daemon = pair
    sent = [local.encode_sent(n) for n in range(1, 4)]
    large = [os.urandom(960 * 1024) for _ in range(16)]  # 15 MiB: one frame, near its limit
    data = b"".join(sent) + deliver_frame(large) + local.encode_sent(4)
    assert len(data) > 15 << 20
    writer = send_from_a_thread(daemon, data)
    for n in range(1, 4):
        got = stream.frame(None, "send")
        assert got is not None
        assert local.decode_sent(got[1]) == (n, local.Status.QUEUED, "")
    got = stream.frame(None, "recv")
    assert got is not None
    assert got[0] == Kind.DELIVER
    assert payloads_of(got[1]) == large
    assert stream.sent("send") == (4, local.Status.QUEUED, "")
    writer.join(timeout=10)


def test_a_room_message_and_bytes_read_ahead_of_a_large_body(
    pair: tuple[Stream, socket.socket],
) -> None:
    """The head is read with up to READ_AHEAD bytes of its body: those go into the body."""
    stream, daemon = pair
    first = [os.urandom(READ_AHEAD * 3 + 7)]
    second = [os.urandom(12), os.urandom(READ_AHEAD)]
    data = deliver_frame(first, room="ab" * 16) + deliver_frame(second)
    daemon.sendall(data[: READ_AHEAD + 100])  # the head, and more than READ_AHEAD of the body
    writer = send_from_a_thread(daemon, data[READ_AHEAD + 100 :])
    delivered = []
    for _ in range(2):  # each body decoded before the next frame is read (a view)
        got = stream.frame(None, "recv")
        assert got is not None
        assert got[0] == Kind.DELIVER
        delivered.append(local.decode_deliver(got[1]))
    assert [d.payload for d in delivered[0]] == first
    assert delivered[0][0].room == "ab" * 16
    assert [d.payload for d in delivered[1]] == second
    writer.join(timeout=10)


def test_a_stream_closed_in_the_middle_of_a_frame_is_unavailable(
    pair: tuple[Stream, socket.socket],
) -> None:
    stream, daemon = pair
    data = deliver_frame([os.urandom(5000)])
    daemon.sendall(data[:3000])
    daemon.close()
    with pytest.raises(Unavailable, match="the daemon closed the connection"):
        stream.frame(None, "recv")


def test_an_oversized_frame_head_is_refused_before_its_body(
    pair: tuple[Stream, socket.socket],
) -> None:
    stream, daemon = pair
    daemon.sendall(local.FRAME.pack(Kind.DELIVER, local.MAX_FRAME + 1))
    with pytest.raises(Unavailable, match="over"):
        stream.frame(None, "recv")


class ShortWrites:
    """A socket whose ``sendmsg`` takes at most ``most`` bytes a call (as a full kernel
    buffer does), recording what it took."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.taken = bytearray()
        self.calls = 0

    def sendmsg(self, parts: Sequence[Buffer]) -> int:
        self.calls += 1
        room = self.most
        for part in parts:
            piece = bytes(part)[:room]
            self.taken += piece
            room -= len(piece)
            if not room:
                break
        return self.most - room


@pytest.mark.parametrize("most", [1, 7, 4096, 1 << 20])
def test_pieces_sent_with_short_writes_arrive_whole_and_in_order(most: int) -> None:
    parts: list[Buffer] = [b"head", os.urandom(70_000), b"", memoryview(b"view"), os.urandom(9)]
    if most == 1:
        parts = [b"ab", b"", b"cde", bytearray(b"f")]
    sock = ShortWrites(most)
    send_all(cast(socket.socket, sock), parts)
    assert bytes(sock.taken) == b"".join(bytes(p) for p in parts)
    assert sock.calls == -(-len(sock.taken) // most)


def test_a_send_frame_in_pieces_is_the_frame_joined(pair: tuple[Stream, socket.socket]) -> None:
    stream, daemon = pair
    messages = [local.SendEntry(MESSAGE_ID, NODE, "t", os.urandom(size)) for size in (0, 1, 65536)]
    entries = [p for m in messages for p in (local.send_entry_head(m), m.payload)]
    parts = local.encode_send_parts(9, entries)
    frame = local.encode_send(9, [local.send_entry(m) for m in messages])
    assert b"".join(parts) == frame
    stream.write_parts(parts, "send")
    got = bytearray()
    while len(got) < len(frame):
        got += daemon.recv(1 << 20)
    kind, length = local.read_frame_head(bytes(got[: local.FRAME.size]))
    assert (kind, length) == (Kind.SEND, len(frame) - local.FRAME.size)
    request, decoded = local.decode_send(bytes(got[local.FRAME.size :]))
    assert (request, [d.payload for d in decoded]) == (9, [m.payload for m in messages])


def test_frames_of_every_size_cut_anywhere_come_whole_from_the_kept_buffer(
    pair: tuple[Stream, socket.socket],
) -> None:
    """Small frames several to a read, large ones (one beyond the buffer kept, KEEP) read
    after their heads, in a stream cut at odd places: each body whole, in order, and the
    buffer back to at most KEEP after the huge frame."""
    stream, daemon = pair
    sizes = [0, 10, READ_AHEAD - 80, 3, READ_AHEAD + 1, 1 << 20, 7, KEEP + 4096, 100, 1 << 20]
    batches = [[os.urandom(size)] for size in sizes]
    data = b"".join(deliver_frame(b) for b in batches)
    cuts = [*range(0, len(data), 40_009), len(data)]

    def write() -> None:
        for a, b in itertools.pairwise(cuts):
            daemon.sendall(data[a:b])

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    for batch in batches:
        got = stream.frame(None, "recv")
        assert got is not None
        assert got[0] == Kind.DELIVER
        assert isinstance(got[1], memoryview)  # a view of the stream's buffer
        assert payloads_of(got[1]) == batch
    writer.join(timeout=10)
    assert not stream.buffered()
    daemon.sendall(local.encode_sent(1))
    assert stream.sent("send") == (1, local.Status.QUEUED, "")
    assert len(stream._buffer) <= KEEP


def test_a_timeout_of_zero_hands_out_only_what_was_read_already(
    pair: tuple[Stream, socket.socket],
) -> None:
    stream, daemon = pair
    daemon.sendall(local.encode_sent(1) + local.encode_sent(2)[:3])
    got = stream.frame(None, "send")  # reads both, the second in part
    assert got is not None
    assert local.decode_sent(got[1]) == (1, local.Status.QUEUED, "")
    assert stream.buffered()
    daemon.sendall(local.encode_sent(2)[3:])
    assert stream.frame(0.0, "send") is None  # the rest waits in the socket, unread
    assert stream.sent("send") == (2, local.Status.QUEUED, "")
    assert not stream.buffered()


def test_a_write_to_a_full_socket_waits_for_room_then_times_out(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = Stream(tmp_path / "mesh.sock", 0.2, sock=ours)
    try:
        data = os.urandom(4 << 20)
        reader = threading.Thread(target=lambda: theirs.recv(1 << 16), daemon=True)
        reader.start()  # takes a little; the socket then stays full
        with pytest.raises(Unavailable, match="timed out"):
            stream.write_parts([data, data], "send")
        reader.join(timeout=10)
    finally:
        stream.close()
        theirs.close()


BURSTS = """
import resource, sys
from keel.mesh.client import transport
if sys.argv[1] == "kept":
    transport.keep_heap()
def burst():  # as a Sender's confirmed batch, or a recv's messages once handled
    held = [bytes(65536) for _ in range(16)]
    del held
burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_bursts_of_large_payloads_freed_do_not_fault_the_heap_in_again_once_it_is_kept() -> None:
    """glibc hands the top of the heap back after each burst of 1 MiB freed, and faults it
    in again for the next (16 pages a payload): ``keep_heap`` (every Stream) stops that."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the trimming and its thresholds are glibc's")
    faults = {}
    for mode in ("default", "kept"):
        done = subprocess.run(
            [sys.executable, "-c", BURSTS, mode], capture_output=True, text=True, check=True
        )
        faults[mode] = int(done.stdout)
    pages = 50 * 16 * 65536 // resource.getpagesize()
    if faults["default"] < pages // 10:
        pytest.skip(f"this malloc does not hand the heap back ({faults})")
    assert faults["kept"] < pages // 20, faults
