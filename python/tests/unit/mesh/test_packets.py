"""The application packets: round trips, strict refusals, and a bounded fuzz of the decoder."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.mesh import ids, packets
from keel.mesh.errors import LocalProtocolError, RemoteProtocolError
from keel.mesh.packets import Ack, Msg, Msgs, Records, RoomStamp

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
        (b"\x10\x00\x02\xff\xfe", "MSG header: not UTF-8"),
        (b'\x11\x00\x11{"ok":[],"ok":[]}', 'ACK header: key "ok" appears twice'),
        (b'\x10\x00\x0d{"exp": NaN }', "NaN is not a JSON value"),
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
    assert ids.check_topic("a.b-c_d:e/f@g+h=i") == "a.b-c_d:e/f@g+h=i"
    for bad in ("", "x" * 129, "sp ace", "é", None, 3):
        with pytest.raises(ValueError, match="topic"):
            ids.check_topic(bad)


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


AGENT_NAMES = st.one_of(st.none(), st.from_regex(r"[a-z][a-z0-9_-]{0,19}", fullmatch=True))


@settings(max_examples=200, deadline=None)
@given(AGENT_NAMES, AGENT_NAMES, st.booleans())
def test_agents_round_trip_in_msg_and_msgs(
    agent: str | None, to: str | None, in_room: bool
) -> None:
    stamp = RoomStamp(ID[::-1], NODE, 2, bytes(64)) if in_room else None
    message = Msg(ID, "jobs", 7, b"body", stamp, agent, to)
    data = packets.encode(message)
    length = int.from_bytes(data[1:3], "big")
    header = json.loads(data[3 : 3 + length])
    assert data[3 : 3 + length] == packets.canonical_json(header)
    assert ("agent" in header, "to" in header) == (agent is not None, to is not None)
    assert packets.decode(data) == message
    plain = Msg(ID[::-1], "t", 1, b"")
    assert packets.decode(packets.encode_msgs([message, plain])) == Msgs((message, plain))


@pytest.mark.parametrize("bad", ["", "Scout", "1st", "a" * 21, "a b", "a@b"])
def test_agent_fields_that_are_no_agent_names_are_refused(bad: str) -> None:
    for key in ("agent", "to"):
        header = packets.canonical_json({"id": ID, "topic": "t", "exp": 1, key: bad})
        data = b"\x10" + len(header).to_bytes(2, "big") + header
        with pytest.raises(RemoteProtocolError, match=f"MSG {key} must be an agent name"):
            packets.decode(data)


def test_addresses() -> None:
    assert ids.parse_address(NODE) == (None, NODE)
    assert ids.parse_address(f"scout@{NODE}") == ("scout", NODE)
    for bad in (f"Scout@{NODE}", f"@{NODE}", "scout@nobody", f"a@b@{NODE}", ""):
        with pytest.raises(ValueError):
            ids.parse_address(bad)


def test_new_message_ids_are_time_ordered_and_random_after_the_time() -> None:
    made = [
        ids.new_message_id(
            random=lambda n, i=i: bytes([i]) * n,  # type: ignore[misc]
            clock=lambda i=i: 1700000000.123 + i,  # type: ignore[misc]
        )
        for i in range(3)
    ]
    assert all(ids.is_message_id(i) for i in made)
    assert made == sorted(made)
    assert made[0] == f"{1700000000123:012x}" + "00" * 10
    assert made[1][12:] == "01" * 10
    assert ids.new_message_id() != ids.new_message_id()


def test_msgs_round_trip_and_layout() -> None:
    direct = Msg(ID, "jobs.v1", 1_800_000_000, b"\x00\xffpayload")
    room = Msg(ID[::-1], "chat", 5, b"", RoomStamp(ID, NODE, 3, bytes(range(64))))
    data = packets.encode_msgs([direct, room, direct])
    assert packets.decode(data) == Msgs((direct, room, direct))
    assert packets.encode(Msgs((direct, room, direct))) == data
    assert data[:3] == b"\x13\x00\x00"
    first = data[3:]
    assert first[0] == 0
    assert first[1:17] == bytes.fromhex(ID)
    assert first[17:25] == (1_800_000_000).to_bytes(8, "big")
    assert first[25:33] == b"\x07jobs.v1"
    assert first[33:37] == (9).to_bytes(4, "big")
    assert first[37:46] == b"\x00\xffpayload"
    second = first[46:]
    assert second[0] == 1
    assert second[25:41] == bytes.fromhex(ID)
    assert second[41:73] == NODE.encode()
    assert second[73:81] == (3).to_bytes(8, "big")
    assert second[81:145] == bytes(range(64))
    assert second[145:154] == b"\x04chat\x00\x00\x00\x00"


def test_msgs_limits_are_the_senders_to_keep() -> None:
    message = Msg(ID, "t", 1, b"x")
    with pytest.raises(LocalProtocolError):
        packets.encode_msgs([])
    with pytest.raises(LocalProtocolError):
        packets.encode_msgs([message] * (packets.MAX_BATCH_MESSAGES + 1))
    with pytest.raises(LocalProtocolError):
        packets.encode_msgs([Msg(ID, "t", 2**64, b"")])
    with pytest.raises(LocalProtocolError):
        packets.encode_msgs([Msg(ID, "t", 1, b"x" * (packets.MAX_PAYLOAD + 1))])
    with pytest.raises(LocalProtocolError):
        packets.encode_msgs([Msg(ID, "t", 1, b"x" * packets.MAX_PAYLOAD)] * 2)
    assert not packets.batchable(Msg(ID, "t", 1, b"", RoomStamp(ID, NODE, 2**64, bytes(64))))
    assert packets.batchable(Msg(ID, "t", 2**64 - 1, b""))


def entry(flags: int = 0, topic: bytes = b"t", size: int = 1, body: bytes = b"x") -> bytes:
    return (
        bytes([flags])
        + bytes(16)
        + bytes(8)
        + bytes([len(topic)])
        + topic
        + (size.to_bytes(4, "big") + body)
    )


ROOM_FIELDS = bytes(16) + NODE.encode() + (1).to_bytes(8, "big") + bytes(64)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x13\x00\x00", "holds no message"),
        (b"\x13\x00\x02{}" + entry(), "no header"),
        (b"\x13\x00\x00" + entry()[:-1], "runs past"),
        (b"\x13\x00\x00" + entry()[:20], "runs past"),
        (b"\x13\x00\x00" + entry() + b"\x00", "runs past"),
        (b"\x13\x00\x00" + entry(flags=4), "flags"),
        # the agents flag, then no agent at all, or a name that is none
        (
            b"\x13\x00\x00" + entry(flags=2)[:25] + b"\x00\x00\x01t" + bytes([0, 0, 0, 1]) + b"x",
            "names no agent",
        ),
        (
            b"\x13\x00\x00" + entry(flags=2)[:25] + b"\x02A!\x00\x01t" + bytes([0, 0, 0, 1]) + b"x",
            "agent must be an agent name",
        ),
        (b"\x13\x00\x00" + entry(topic=b""), "topic"),
        (b"\x13\x00\x00" + entry(topic=b"a b"), "topic"),
        (b"\x13\x00\x00" + entry(topic=b"\xff"), "topic"),
        (b"\x13\x00\x00" + entry(size=packets.MAX_PAYLOAD + 1), "exceeds"),
        (
            b"\x13\x00\x00"
            + bytes([1])
            + bytes(24)
            + bytes(16)
            + b"A" * 32
            + ROOM_FIELDS[48:]
            + b"\x01t"
            + bytes(4),
            "not a node id",
        ),
        (
            b"\x13\x00\x00"
            + bytes([1])
            + bytes(24)
            + ROOM_FIELDS[:48]
            + bytes(8)
            + bytes(64)
            + b"\x01t"
            + bytes(4),
            "rv",
        ),
        (b"\x13\x00\x00" + entry(size=0, body=b"") * (packets.MAX_BATCH_MESSAGES + 1), "more than"),
    ],
)
def test_malformed_msgs_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(RemoteProtocolError, match=problem):
        packets.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_msgs_raises_only_remote_protocol_errors(body: bytes) -> None:
    try:
        packet = packets.decode(b"\x13\x00\x00" + body)
    except RemoteProtocolError:
        return
    assert isinstance(packet, Msgs)
    assert packets.decode(packets.encode(packet)) == packet


def test_message_ids_drawn_from_one_block_of_randomness_differ_in_a_forked_child() -> None:
    """The random bytes come from the OS a block at a time: a forked child must not hand
    out the rest of its parent's block (the same ids twice on the mesh)."""
    made = {ids.new_message_id() for _ in range(1000)}  # several blocks
    assert len(made) == 1000
    assert len({i[12:] for i in made}) == 1000
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(writer, "".join(ids.new_message_id() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        theirs = pipe.read()
    os.waitpid(pid, 0)
    ours = "".join(ids.new_message_id() for _ in range(3))
    assert len(theirs) == len(ours) == 96
    random_parts = {text[n + 12 : n + 32] for text in (ours, theirs) for n in range(0, 96, 32)}
    assert len(random_parts) == 6
