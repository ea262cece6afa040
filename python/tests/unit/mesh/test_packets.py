"""The application packets: round trips, strict refusals, and a bounded fuzz of the decoder."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.mesh import packets
from keel.mesh.errors import LocalProtocolError, RemoteProtocolError
from keel.mesh.packets import Ack, Msg, Records, RoomStamp

ID = "0123456789abcdef0123456789abcdef"
NODE = "a" * 32


def raw(kind: int, header: object, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return bytes([kind]) + len(text).to_bytes(2, "big") + text + body


def test_msg_round_trip_with_and_without_room() -> None:
    direct = Msg(ID, "jobs.v1", 1_800_000_000, b"\x00\xffpayload")
    assert packets.decode(packets.encode(direct)) == direct
    stamp = RoomStamp(ID, NODE, 3, bytes(range(64)))
    room = Msg(ID, "chat", 5, b"", stamp)
    assert packets.decode(packets.encode(room)) == room


def test_ack_and_records_round_trip() -> None:
    ack = Ack((ID,), (ID.replace("0", "1"),), ((ID.replace("0", "2"), "not in room"),))
    assert packets.decode(packets.encode(ack)) == ack
    records = Records(({"kind": "addr", "x": [1, 2]},))
    assert packets.decode(packets.encode(records)) == records


def test_encoding_is_canonical() -> None:
    data = packets.encode(Msg(ID, "t", 1, b"body"))
    assert data[3:].startswith(b'{"exp":1,"id":"' + ID.encode() + b'","topic":"t"}')
    assert data.endswith(b"body")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "shorter"),
        (b"\x10\x00", "shorter"),
        (b"\x99\x00\x00", "unknown packet type"),
        (b"\x10\x00\x09{}", "runs past"),
        (raw(0x10, [1]), "not a JSON object"),
        (b"\x10\x00\x02\xff\xfe", "not UTF-8 JSON"),
        (raw(0x10, {"id": ID, "topic": "t"}), "fields must be"),
        (raw(0x10, {"id": ID, "topic": "t", "exp": 1, "extra": 1}), "fields must be"),
        (raw(0x10, {"id": "XYZ", "topic": "t", "exp": 1}), "32 lowercase hex"),
        (raw(0x10, {"id": ID, "topic": "a b", "exp": 1}), "topic"),
        (raw(0x10, {"id": ID, "topic": "t", "exp": -1}), "exp"),
        (raw(0x10, {"id": ID, "topic": "t", "exp": True}), "exp"),
        (raw(0x10, {"id": ID, "topic": "t", "exp": 1, "room": ID}), "all of room"),
        (
            raw(
                0x10,
                {"id": ID, "topic": "t", "exp": 1, "room": ID, "from": "x", "rv": 1, "sig": "AA"},
            ),
            "not a node id",
        ),
        (
            raw(
                0x10,
                {"id": ID, "topic": "t", "exp": 1, "room": ID, "from": NODE, "rv": 1, "sig": "AA"},
            ),
            "sig",
        ),
        (raw(0x11, {"ok": [], "busy": []}), "fields must be"),
        (raw(0x11, {"ok": ["nope"], "busy": [], "rejected": []}), "not a message id"),
        (raw(0x11, {"ok": [], "busy": [], "rejected": [{"id": ID}]}), "rejected entries"),
        (raw(0x11, {"ok": [], "busy": [], "rejected": []}, b"x"), "with a body"),
        (raw(0x12, {"records": [1]}), "list of JSON objects"),
    ],
)
def test_refusals(data: bytes, problem: str) -> None:
    with pytest.raises(RemoteProtocolError, match=problem):
        packets.decode(data)


def test_oversized_payload_refused_both_ways() -> None:
    big = b"x" * (packets.MAX_PAYLOAD + 1)
    with pytest.raises(LocalProtocolError):
        packets.encode(Msg(ID, "t", 1, big))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        packets.decode(raw(0x10, {"id": ID, "topic": "t", "exp": 1}, big))


def test_split_records_keeps_every_record_and_the_limit() -> None:
    records = [{"kind": "addr", "pad": "x" * 900, "n": i} for i in range(200)]
    batches = packets.split_records(records, limit=10_000)
    assert len(batches) > 1
    assert [r for b in batches for r in b.records] == records
    for batch in batches:
        assert len(packets.encode(batch)) < 10_000 + 100


def test_topics() -> None:
    assert packets.check_topic("a.b-c_d:e/f@g+h=i") == "a.b-c_d:e/f@g+h=i"
    for bad in ("", "x" * 129, "sp ace", "é", None, 3):
        with pytest.raises(ValueError, match="topic"):
            packets.check_topic(bad)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decode_raises_only_remote_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        packets.decode(data)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([0x10, 0x11, 0x12]),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=40),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "id",
                        "topic",
                        "exp",
                        "ok",
                        "busy",
                        "rejected",
                        "records",
                        "room",
                        "from",
                        "rv",
                        "sig",
                        "reason",
                    ]
                ),
                children,
                max_size=6,
            )
        ),
        max_leaves=12,
    ),
    st.binary(max_size=20),
)
def test_fuzz_structured_headers(kind: int, header: object, body: bytes) -> None:
    try:
        packet = packets.decode(raw(kind, header, body))
    except RemoteProtocolError:
        return
    assert packets.decode(packets.encode(packet)) == packet


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9._:/@+=-]{1,128}", fullmatch=True),
    st.integers(0, 2**53),
    st.booleans(),
    st.integers(1, 2**40),
    st.binary(min_size=64, max_size=64),
)
def test_msg_headers_are_canonical_json(
    message_id: str, topic: str, expires: int, in_room: bool, version: int, sig: bytes
) -> None:
    stamp = RoomStamp(message_id[::-1], "b" * 32, version, sig) if in_room else None
    data = packets.encode(Msg(message_id, topic, expires, b"body", stamp))
    length = int.from_bytes(data[1:3], "big")
    header = json.loads(data[3 : 3 + length])
    assert data[3 : 3 + length] == packets.canonical_json(header)
    assert packets.decode(data) == Msg(message_id, topic, expires, b"body", stamp)
