"""An agent's stream read in place: frames whole or in pieces, bad frames, buffers reused."""

from __future__ import annotations

import asyncio
import json
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel import api
from keel.mesh import agent_streams, local
from keel.mesh.buffers import BufferPool
from keel.mesh.local import FrameReader, Kind, LocalStreamError, SendEntry, Status

NODE = "a" * 32
SCRATCH = FrameReader.SCRATCH


def send_frame(request: int, payloads: Sequence[bytes], topic: str = "t") -> bytes:
    entries = [
        local.send_entry(SendEntry(f"{request:016x}{n:016x}", NODE, topic, payload))
        for n, payload in enumerate(payloads)
    ]
    return local.encode_send(request, entries)


def sized_send(request: int, body_length: int) -> bytes:
    """A SEND frame of one message whose body is exactly ``body_length`` bytes."""
    overhead = len(send_frame(request, [b""])) - local.FRAME.size
    return send_frame(request, [bytes([request % 251]) * (body_length - overhead)])


def decoded(frames: list[tuple[int, local.Body]]) -> list[tuple[int, Any]]:
    return [
        (kind, local.decode_send(body) if kind == Kind.SEND else bytes(body))
        for kind, body in frames
    ]


def read(reader: FrameReader, data: bytes, pieces: Sequence[int]) -> list[tuple[int, Any]]:
    """``data`` through ``reader``, each read at most the next of ``pieces`` bytes (cycled);
    every frame decoded as soon as it is complete (its buffer may be read into again)."""
    out: list[tuple[int, Any]] = []
    at = turn = 0
    while at < len(data):
        into = reader.buffer()
        assert len(into) > 0
        count = min(len(into), pieces[turn % len(pieces)], len(data) - at)
        into[:count] = data[at : at + count]
        reader.filled(count)
        at += count
        turn += 1
        while (frame := reader.pop()) is not None:
            out += decoded([frame])
    return out


STREAM = [
    send_frame(1, [b"x", b"", b"yz" * 100]),
    local.encode_ack([1, 2, 3]),
    sized_send(2, SCRATCH - local.FRAME.size),  # the largest frame the scratch buffer holds
    sized_send(3, SCRATCH - local.FRAME.size + 1),  # the smallest one read in place
    send_frame(4, [os.urandom(65536) for _ in range(17)]),
    send_frame(5, [os.urandom(65536) for _ in range(3)]),  # reuses the buffer of 4
    local.encode_ack([]),
    send_frame(6, [b"small after large"]),
]
EXPECTED = decoded([(local.read_frame_head(f[:5])[0], f[5:]) for f in STREAM])


def test_frames_read_in_one_piece_are_the_frames_written() -> None:
    data = b"".join(STREAM)
    assert read(FrameReader(), data, [len(data)]) == EXPECTED


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3 * SCRATCH), min_size=1, max_size=8))
def test_frames_read_in_any_pieces_are_the_same_frames(pieces: list[int]) -> None:
    assert read(FrameReader(), b"".join(STREAM), pieces) == EXPECTED


def test_frames_read_a_byte_at_a_time_are_the_same_frames() -> None:
    small = b"".join(STREAM[:4] + STREAM[6:])
    assert read(FrameReader(), small, [1]) == EXPECTED[:4] + EXPECTED[6:]


def test_a_large_body_is_read_in_place_and_its_buffer_used_again_once_no_payload_holds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local, "BODIES", BufferPool(keep=4, keep_bytes=16 << 20))
    reader = FrameReader()
    first = [os.urandom(65536) for _ in range(16)]
    data = send_frame(1, first)
    into = reader.buffer()  # between frames: the scratch buffer
    into[:] = data[: len(into)]
    reader.filled(len(into))
    rest = reader.buffer()  # the rest of the body, in the frame's own buffer, and no further
    assert len(rest) == len(data) - len(into)
    own = id(rest.obj)  # (its id: a name for it would hold it)
    rest[:] = data[len(into) :]
    reader.filled(len(rest))
    del into, rest
    frame = reader.pop()
    assert frame is not None
    assert frame[0] == Kind.SEND
    body = frame[1]
    assert isinstance(body, memoryview)
    assert id(body.obj) == own
    messages = local.decode_send(body)[1]
    assert [m.payload for m in messages] == first
    for message in messages:  # views of the frame's buffer, not copies, and read-only
        assert isinstance(message.payload, memoryview)
        assert id(message.payload.obj) == own
        assert message.payload.readonly
    assert reader.pop() is None
    assert len(reader.buffer()) == local.FRAME.size  # after a large frame, a head alone
    del frame, body

    second = [os.urandom(65536) for _ in range(16)]
    data = send_frame(2, second)
    assert read(reader, data, [len(data)]) == [(Kind.SEND, local.decode_send(data[5:]))]
    assert [m.payload for m in messages] == first  # the first's payloads: held, so intact
    assert local.BODIES.made == 2  # the second frame had a buffer of its own

    del messages, message  # the payloads dropped (acknowledged): the first buffer is free
    third = [os.urandom(65536) for _ in range(16)]
    data = send_frame(3, third)
    into = reader.buffer()
    into[: local.FRAME.size] = data[: local.FRAME.size]
    reader.filled(local.FRAME.size)
    rest = reader.buffer()
    assert id(rest.obj) == own  # used again, written over
    assert local.BODIES.made == 2


def test_small_payloads_and_small_frames_are_copied() -> None:
    reader = FrameReader()
    payloads = [os.urandom(local.VIEW_MIN - 1), os.urandom(local.VIEW_MIN), os.urandom(70_000)]
    large = send_frame(1, payloads)
    small = send_frame(2, [os.urandom(local.VIEW_MIN)])
    bodies = []
    for data in (large, small):
        read_into = reader.buffer()
        count = min(len(read_into), len(data))
        read_into[:count] = data[:count]
        reader.filled(count)
        at = count
        while at < len(data):
            read_into = reader.buffer()
            count = min(len(read_into), len(data) - at)
            read_into[:count] = data[at : at + count]
            reader.filled(count)
            at += count
        frame = reader.pop()
        assert frame is not None
        bodies.append(frame[1])
    assert isinstance(bodies[0], memoryview)
    assert isinstance(bodies[1], bytes)  # a small frame: copied out of the scratch buffer
    got = local.decode_send(bodies[0])[1]
    assert [type(m.payload) for m in got] == [bytes, memoryview, memoryview]
    assert [m.payload for m in got] == payloads
    (alone,) = local.decode_send(bodies[1])[1]
    assert type(alone.payload) is bytes


def test_a_body_over_what_is_kept_is_read_into_a_mapping_taken_as_it_fills() -> None:
    reader = FrameReader()
    payloads = [os.urandom(65536) for _ in range(FrameReader.KEEP // 65536 + 16)]
    data = send_frame(1, payloads)
    into = reader.buffer()
    into[: local.FRAME.size] = data[: local.FRAME.size]
    reader.filled(local.FRAME.size)  # the head alone
    rest = reader.buffer()
    assert isinstance(rest.obj, mmap.mmap)  # anonymous: memory only where bytes land
    assert len(rest) == len(data) - local.FRAME.size
    del into, rest
    got = read(reader, data[local.FRAME.size :], [1 << 20])
    assert got == [(Kind.SEND, local.decode_send(data[local.FRAME.size :]))]


def test_a_frame_past_the_limit_ends_the_stream_after_the_frames_before_it() -> None:
    reader = FrameReader()
    good = local.encode_ack([7])
    data = good + local.FRAME.pack(Kind.SEND, local.MAX_FRAME + 1) + b"whatever follows"
    into = reader.buffer()
    into[: len(data)] = data
    reader.filled(len(data))
    assert reader.failed
    assert reader.pop() == (Kind.ACK, good[local.FRAME.size :])
    with pytest.raises(LocalStreamError, match=f"is over {local.MAX_FRAME}"):
        reader.pop()


# ---------------------------------------------------------------- through a control socket


class Inbox:
    """What the stream asks of the node's inbox, recorded (no subscriptions here)."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = asyncio.Event()

    def stream_opened(self, stream: agent_streams.LocalStream) -> None:
        self.opened += 1

    def subscribe(
        self, stream: agent_streams.LocalStream, topic: str, max_unacked: int, max_bytes: int
    ) -> None:
        raise AssertionError("no test here subscribes")

    def stream_acked(self, stream: agent_streams.LocalStream, receipts: Sequence[int]) -> None:
        pass

    def stream_closed(self, stream: agent_streams.LocalStream) -> None:
        self.closed.set()


async def talk(
    tmp_path: Path,
    pieces: Sequence[bytes],
    answers: int,
    *,
    hang_up: bool = False,
    paused: bool = False,
    later: bytes = b"",
) -> tuple[list[SendEntry], list[tuple[int, bytes]], Inbox]:
    """``pieces`` written to a stream (right behind the request line, not waiting for its
    answer; ``later`` once it came); what was submitted, and the first ``answers`` frames the
    daemon wrote. After
    an ERROR frame, or with ``hang_up`` (the agent stops sending), the stream must end."""
    submitted: list[SendEntry] = []
    inbox = Inbox()

    async def submit(entries: Sequence[SendEntry]) -> tuple[Status, str]:
        submitted.extend(entries)
        return Status.QUEUED, ""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if paused:  # as the control server's StreamReader does once it holds 4 MiB unread
            assert isinstance(writer.transport, asyncio.Transport)
            writer.transport.pause_reading()
        await agent_streams.serve(reader, writer, inbox=inbox, submit=submit)

    async def stream(args: dict[str, Any], peer: api.Peer) -> api.Upgrade:
        return api.Upgrade({"stream": 1}, serve, buffer_size=local.SOCKET_BUFFER)

    path = tmp_path / "mesh.sock"
    async with asyncio.timeout(60), api.ControlServer(path, {"stream": stream}):  # not forever
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"verb": "stream", "args": {}}\n')
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        if hang_up:
            writer.write_eof()
        assert json.loads(await reader.readline()) == {"ok": True, "result": {"stream": 1}}
        if later:
            writer.write(later)  # after the answer: read by the stream's own reader
        frames = []
        for _ in range(answers):
            kind, length = local.read_frame_head(await reader.readexactly(local.FRAME.size))
            frames.append((kind, await reader.readexactly(length)))
        if hang_up or (frames and frames[-1][0] == Kind.ERROR):
            await inbox.closed.wait()  # the stream is over (the control server closes it)
        writer.close()
        await writer.wait_closed()
    return submitted, frames, inbox


def test_sends_right_behind_the_request_in_small_pieces_or_paused_are_queued_intact(
    tmp_path: Path,
) -> None:
    large = [os.urandom(65536) for _ in range(20)]
    frames = [send_frame(1, large[:16]), send_frame(2, [b"small"]), send_frame(3, large[16:])]
    data = b"".join(frames)
    whole = asyncio.run(talk(tmp_path, [data], 3))
    pieces = asyncio.run(talk(tmp_path, [data[i : i + 1000] for i in range(0, len(data), 1000)], 3))
    paused = asyncio.run(talk(tmp_path, [data], 3, paused=True))
    for submitted, answers, _ in (whole, pieces, paused):
        assert [m.payload for m in submitted] == [*large[:16], b"small", *large[16:]]
        assert answers == [(Kind.SENT, local.encode_sent(n)[5:]) for n in (1, 2, 3)]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (local.FRAME.pack(Kind.SEND, 0xFFFFFFFF), "frame of 4294967295 bytes is over 16777216"),
        (
            local.frame(Kind.SEND, b"\x00\x00\x00\x01" + bytes(20)),
            "SEND entry runs past the frame's end",
        ),
        (local.frame(Kind.SEND, bytes(SCRATCH)), "SEND entry runs past the frame's end"),
        (local.frame(Kind.SEND, b"\x00\x00\x00\x01"), "SEND without a message"),
    ],
)
def test_a_malformed_frame_gets_an_error_and_the_end(
    tmp_path: Path, data: bytes, error: str
) -> None:
    ok = send_frame(1, [b"before"])
    submitted, answers, _ = asyncio.run(talk(tmp_path, [ok + data], 2))
    assert [m.payload for m in submitted] == [b"before"]
    assert answers == [
        (Kind.SENT, local.encode_sent(1)[5:]),
        (Kind.ERROR, f"malformed frame: {error}".encode()),
    ]


def test_an_empty_frame_read_alone_is_answered_at_once(tmp_path: Path) -> None:
    _, answers, _ = asyncio.run(talk(tmp_path, [], 1, later=local.FRAME.pack(0x07, 0)))
    assert answers == [(Kind.ERROR, b"malformed frame: unknown frame type 0x07")]


def test_an_agent_that_hangs_up_in_a_frame_queues_nothing_of_it(tmp_path: Path) -> None:
    whole = send_frame(1, [os.urandom(65536) for _ in range(4)])
    submitted, answers, inbox = asyncio.run(
        talk(tmp_path, [send_frame(2, [b"one"]), whole[:-10]], 1, hang_up=True)
    )
    assert [m.payload for m in submitted] == [b"one"]
    assert answers == [(Kind.SENT, local.encode_sent(2)[5:])]
    assert inbox.opened == 1
    assert inbox.closed.is_set()
