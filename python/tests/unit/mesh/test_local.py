"""The binary local stream's frames: round trips, layouts and refusals."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.mesh import local
from keel.mesh.local import Delivered, Kind, LocalStreamError, SendEntry

ID = "0123456789abcdef0123456789abcdef"
NODE = "a" * 32


def body_of(data: bytes, kind: Kind) -> bytes:
    got, length = local.read_frame_head(data[: local.FRAME.size])
    assert got == kind
    assert length == len(data) - local.FRAME.size
    return data[local.FRAME.size :]


def test_send_round_trip_and_layout() -> None:
    messages = [SendEntry(ID, NODE, "jobs", b"\x00payload", 1500), SendEntry(ID, NODE, "t", b"")]
    data = local.encode_send(7, [local.send_entry(m) for m in messages])
    body = body_of(data, Kind.SEND)
    assert body[:4] == (7).to_bytes(4, "big")
    assert body[4:20] == bytes.fromhex(ID)
    assert body[20:52] == NODE.encode()
    assert body[52:60] == (1500).to_bytes(8, "big")
    assert body[60:65] == b"\x04jobs"
    assert body[65:69] == (8).to_bytes(4, "big")
    assert local.decode_send(body) == (7, messages)


def test_sent_subscribe_and_ack_round_trips() -> None:
    queued = local.decode_sent(body_of(local.encode_sent(3), Kind.SENT))
    assert queued == (3, local.Status.QUEUED, "")
    busy = local.encode_sent(4, local.Status.BUSY, "outbox is full")
    assert local.decode_sent(body_of(busy, Kind.SENT)) == (4, local.Status.BUSY, "outbox is full")
    refused = local.encode_sent(5, local.Status.REFUSED)
    assert local.decode_sent(body_of(refused, Kind.SENT)) == (5, local.Status.REFUSED, "refused")
    subscribe = body_of(local.encode_subscribe("jobs", 100, 1 << 20), Kind.SUBSCRIBE)
    assert local.decode_subscribe(subscribe) == ("jobs", 100, 1 << 20)
    assert local.decode_ack(body_of(local.encode_ack([1, 2**40]), Kind.ACK)) == (1, 2**40)
    assert local.decode_ack(b"") == ()


def test_deliver_round_trip() -> None:
    entries = [
        local.deliver_entry(5, ID, sender=NODE, received=1.5, room=None, payload=b"x"),
        local.deliver_entry(6, ID, sender=NODE, received=2.0, room=ID[::-1], payload=b""),
    ]
    body = body_of(local.frame(Kind.DELIVER, b"".join(entries)), Kind.DELIVER)
    assert list(local.decode_deliver(body)) == [
        Delivered(5, ID, NODE, 1.5, None, b"x"),
        Delivered(6, ID, NODE, 2.0, ID[::-1], b""),
    ]


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda: local.decode_send(b"\x00\x00"), "request number"),
        (lambda: local.decode_send(b"\x00\x00\x00\x01"), "without a message"),
        (lambda: local.decode_send(b"\x00\x00\x00\x01" + bytes(20)), "runs past"),
        (
            lambda: local.decode_send(
                b"\x00\x00\x00\x01"
                + bytes(16)
                + NODE.encode()
                + bytes(8)
                + b"\x01t\x00\x00\x00\x05"
            ),
            "runs past",
        ),
        (
            lambda: local.decode_send(
                b"\x00\x00\x00\x01" + bytes(16) + b"\xff" * 32 + bytes(8) + b"\x01t" + bytes(4)
            ),
            "not ASCII",
        ),
        (lambda: local.decode_subscribe(b"\x00"), "too short"),
        (lambda: local.decode_subscribe(bytes(8) + b"\x05ab"), "does not match"),
        (lambda: local.decode_ack(b"\x00" * 7), "multiple of 8"),
        (lambda: local.decode_sent(b"\x00"), "too short"),
        (lambda: local.decode_sent(b"\x00\x00\x00\x01\x03"), "status"),
        (lambda: list(local.decode_deliver(bytes(30))), "runs past"),
        (lambda: local.read_frame_head(b"\x01\xff\xff\xff\xff"), "is over"),
        (lambda: local.send_entry(SendEntry(ID, "short", "t", b"")), "node id"),
        (lambda: local.send_entry(SendEntry(ID, NODE, "", b"")), "topic"),
    ],
)
def test_malformed_frames_are_refused(call: object, problem: str) -> None:
    with pytest.raises(LocalStreamError, match=problem):
        call()  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_decoders_raise_only_local_stream_errors(data: bytes) -> None:
    for decode in (
        local.decode_send,
        local.decode_subscribe,
        local.decode_ack,
        local.decode_sent,
        lambda b: list(local.decode_deliver(b)),
    ):
        with contextlib.suppress(LocalStreamError):
            decode(data)


def test_deliver_decodes_from_a_view_with_rooms_and_agents_each_payload_bytes() -> None:
    entries = [
        local.deliver_entry(1, ID, sender=NODE, received=1.5, room=ID, payload=b"r", agent="ops"),
        local.deliver_entry(2, ID, sender="b" * 32, received=2.5, room=None, payload=b"p"),
        local.deliver_entry(3, ID, sender=NODE, received=3.5, room=None, payload=b"", agent="a"),
    ]
    buffer = bytearray(b"\xff" + b"".join(entries) + b"\xff")  # a view inside a larger buffer
    got = local.decode_deliver(memoryview(buffer)[1:-1])
    assert got == [
        Delivered(1, ID, NODE, 1.5, ID, b"r", "ops"),
        Delivered(2, ID, "b" * 32, 2.5, None, b"p"),
        Delivered(3, ID, NODE, 3.5, None, b"", "a"),
    ]
    assert all(type(d.payload) is bytes for d in got)
    buffer[:] = bytes(len(buffer))  # the buffer is read into again: the payloads stay
    assert [d.payload for d in got] == [b"r", b"p", b""]


def test_a_deliver_entry_cut_in_its_agent_is_malformed() -> None:
    entry = local.deliver_entry(
        1, ID, sender=NODE, received=1.5, room=None, payload=b"x", agent="a"
    )
    for cut in range(1, len(entry)):
        with pytest.raises(LocalStreamError, match="runs past"):
            local.decode_deliver(entry[:cut])


def test_a_send_entry_head_is_its_id_its_route_and_its_size() -> None:
    plain = SendEntry(ID, NODE, "jobs", b"12345", 1500)
    route = local.send_entry_route(NODE, "jobs", 1500)
    assert local.send_entry_head(plain) == bytes.fromhex(ID) + route + (5).to_bytes(4, "big")
    for agent in ("scout", None):
        entry = SendEntry(ID, NODE, "jobs", b"", 0, agent)
        route = local.send_entry_route(NODE, "jobs", 0, agent, to_agents=True)
        assert local.send_entry_head(entry, to_agents=True) == bytes.fromhex(ID) + route + bytes(4)
    with pytest.raises(LocalStreamError, match="SEND_TO"):
        local.send_entry_route(NODE, "jobs", 0, "scout")
    with pytest.raises(LocalStreamError, match="topic"):
        local.send_entry_route(NODE, "", 0)
