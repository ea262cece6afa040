"""The peer link's hot path: records sealed from pieces into one buffer, read back in place.

The bytes on the wire are those of sealing ``encode_record(kind, chunk)``
chunk by chunk (docs/mesh-protocol.md, sections 6 and 7): each test seals
with the session and checks against that, computed here with
cryptography's ChaCha20Poly1305 directly, with and without the AEAD's
``encrypt_into``/``decrypt_into`` (cryptography 47.0.0 and newer).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keel.mesh import noise, packets
from keel.mesh.errors import RemoteProtocolError
from keel.mesh.kem import Kem
from keel.mesh.noise import MAX_NONCE, CipherFunction, CipherState
from keel.mesh.packets import Ack, Msg, Msgs, Records
from keel.mesh.peer_link import PeerLink, merge_acks
from keel.mesh.session import Closed, HandshakeComplete, Message, NeedData, Session, SessionConfig

from tests.unit.mesh.conftest import Pair, open_pair, production_kem

FRAME = 2048  # small frames: many records per message
CHUNK = FRAME - 17
KEM = production_kem()


class _OnlyEncryptDecrypt:
    """An AEAD as cryptography before 47.0.0 has it: no encrypt_into/decrypt_into."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)

    def encrypt(self, nonce: bytes, data: Any, associated_data: bytes | None) -> bytes:
        return self._aead.encrypt(nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: Any, associated_data: bytes | None) -> bytes:
        return self._aead.decrypt(nonce, data, associated_data)


OLD_CHACHA = CipherFunction("ChaChaPoly", _OnlyEncryptDecrypt, noise.CIPHERS["ChaChaPoly"].nonce)


@pytest.fixture(params=["into", "fallback"])
def cipher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fallback":
        monkeypatch.setitem(noise.CIPHERS, "ChaChaPoly", OLD_CHACHA)
    return str(request.param)


def _nonce(n: int) -> bytes:
    return b"\x00" * 4 + n.to_bytes(8, "little")


def _frame(sealed: bytes) -> bytes:
    return len(sealed).to_bytes(2, "big") + sealed


class Reference:
    """A sending CipherState's key, nonce and records since a rekey, sealing as the spec says."""

    def __init__(self, session: Session) -> None:
        state = session._send
        assert state is not None
        assert state.key is not None
        self.key, self.nonce = state.key, state.nonce
        self.sent = session._sent_since_rekey
        self.rekey_every = session.config.rekey_messages

    def _seal(self, record: bytes) -> bytes:
        sealed = ChaCha20Poly1305(self.key).encrypt(_nonce(self.nonce), record, b"")
        self.nonce += 1
        return _frame(sealed)

    def message(self, data: bytes, chunk: int, *, timed: bool = False) -> bytes:
        """``timed``: the key is older than the rekey interval (a REKEY goes first)."""
        chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
        out = b""
        for number, body in enumerate(chunks):
            if self.sent >= self.rekey_every or (timed and number == 0):
                out += self._seal(b"\x03")
                self.key = ChaCha20Poly1305(self.key).encrypt(_nonce(MAX_NONCE), bytes(32), b"")
                self.key = self.key[:32]
                self.sent = 0
            out += self._seal((b"\x00" if number == len(chunks) - 1 else b"\x01") + body)
            self.sent += 1
        return out


def small_pair(**options: Any) -> Pair:
    config = SessionConfig(max_frame_size=FRAME, **options)
    pair = open_pair(KEM, config=config)
    pair.responder.config = config  # both sides read and write 2048-byte frames
    return pair


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` in pieces at ``points`` (each taken modulo its length)."""
    at = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(at)]


def read_all(session: Session, chunks: list[bytes]) -> list[object]:
    events: list[object] = []
    for chunk in chunks:
        session.receive_data(chunk)
        while not isinstance(event := session.next_event(), NeedData):
            if isinstance(event, Message) and session.lend_messages:
                event = Message(bytes(event.data))  # lent: good only until the next event
            events.append(event)
    return events


# ---------------------------------------------------------------- sending


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 4 * CHUNK + 3), min_size=1, max_size=4),
    splits=st.lists(st.integers(0, 10_000), max_size=6),
    rekey_every=st.integers(1, 6),
)
def test_sealed_from_pieces_is_sealed_chunk_by_chunk(
    sizes: list[int], splits: list[int], rekey_every: int
) -> None:
    for fallback in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            if fallback:
                patch.setitem(noise.CIPHERS, "ChaChaPoly", OLD_CHACHA)
            pair = small_pair(rekey_messages=rekey_every)
            reference = Reference(pair.initiator)
            for number, size in enumerate(sizes):
                data = bytes((number + i) % 251 for i in range(size))
                sealed = pair.initiator.seal_message(cut(data, splits))
                assert bytes(sealed) == reference.message(data, CHUNK)
                events = read_all(pair.responder, [bytes(sealed)])
                assert events == [Message(data)]


def test_a_rekey_inside_a_packet_is_in_its_place_and_read_through(cipher: str) -> None:
    pair = small_pair(rekey_messages=3)
    reference = Reference(pair.initiator)
    data = bytes(range(256)) * 40  # 10240 bytes: 6 records, a REKEY before the 4th
    sealed = bytes(pair.initiator.send_message(data))
    assert sealed == reference.message(data, CHUNK)
    assert len(sealed) == len(data) + 6 * 19 + 19
    assert read_all(pair.responder, [sealed]) == [Message(data)]
    # the keys moved on together: the next message is read under the new key
    assert read_all(pair.responder, [bytes(pair.initiator.send_message(b"after"))]) == [
        Message(b"after")
    ]


@pytest.mark.parametrize("size", [100, 3 * CHUNK + 7])
def test_a_rekey_when_the_key_is_old_goes_first(cipher: str, size: int) -> None:
    pair = small_pair(rekey_messages=100)
    pair.initiator.send_message(b"before")  # the responder never reads it: only keys matter
    pair.clock.advance(pair.initiator.config.rekey_interval)
    reference = Reference(pair.initiator)
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    sealed = bytes(pair.initiator.send_message(data))
    assert sealed == reference.message(data, CHUNK, timed=True)
    assert sealed[:2] == (1 + 16).to_bytes(2, "big")  # the REKEY record's frame first
    # and only once: the next message goes under the new key without another
    assert bytes(pair.initiator.send_message(b"next")) == reference.message(b"next", CHUNK)


def test_a_batch_of_messages_sealed_from_its_pieces_is_its_msgs_packet(cipher: str) -> None:
    pair = open_pair(KEM)
    messages = [Msg(f"{n:032x}", "jobs", 1_700_000_000, bytes([n]) * 65536) for n in range(15)]
    pieces: list[bytes | memoryview] = [packets.MSGS_HEADER]
    for message in messages:
        pieces += (packets.msgs_entry_head(message), message.payload)
    reference = Reference(pair.initiator)
    sealed = bytes(pair.initiator.seal_message(pieces))
    assert sealed == reference.message(packets.encode_msgs(messages), 65535 - 17)
    (event,) = read_all(pair.responder, [sealed])
    assert isinstance(event, Message)
    assert packets.decode(event.data) == Msgs(tuple(messages))


# ---------------------------------------------------------------- receiving


def _stream(pair: Pair) -> tuple[bytes, list[bytes]]:
    """Messages of several shapes, sealed back to back, with a KEEPALIVE among them."""
    messages = [b"one", bytes(range(256)) * 30, b"", b"x" * CHUNK, b"y" * (CHUNK + 1), b"z"]
    wire = b""
    for number, message in enumerate(messages):
        wire += bytes(pair.initiator.send_message(message))
        if number == 2:
            wire += pair.initiator.send_keepalive()
    return wire, messages


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points=st.lists(st.integers(0, 100_000), max_size=12), lend=st.booleans())
def test_records_split_across_reads_anywhere(points: list[int], lend: bool) -> None:
    pair = small_pair(rekey_messages=4)
    pair.responder.lend_messages = lend
    wire, messages = _stream(pair)
    got = []
    for event in read_all(pair.responder, cut(wire, points)):
        if isinstance(event, Message):
            got.append(event.data)
    assert got == messages


def test_records_one_byte_at_a_time(cipher: str) -> None:
    pair = small_pair(rekey_messages=2)
    wire, messages = _stream(pair)
    events = read_all(pair.responder, [wire[i : i + 1] for i in range(len(wire))])
    assert [e.data for e in events if isinstance(e, Message)] == messages


def test_reads_cut_next_to_every_frame_boundary() -> None:
    pair = small_pair()
    wire, messages = _stream(pair)
    boundaries, at = [], 0
    while at < len(wire):
        boundaries.append(at)
        at += 2 + int.from_bytes(wire[at : at + 2], "big")
    for offset in (-1, 0, 1, 2, 3):
        pair = small_pair()
        wire, messages = _stream(pair)
        points = [b + offset for b in boundaries if 0 < b + offset < len(wire)]
        events = read_all(pair.responder, cut(wire, points))
        assert [e.data for e in events if isinstance(e, Message)] == messages


@pytest.mark.parametrize("record", [0, 2, 5])  # the first, a middle and the last of 6
@pytest.mark.parametrize("where", ["body", "tag"])
def test_tampered_ciphertext_is_refused_and_nothing_of_it_handed_out(
    cipher: str, record: int, where: str
) -> None:
    pair = small_pair()
    pair.responder.lend_messages = True
    before = bytes(pair.initiator.send_message(b"intact"))
    sealed = bytearray(pair.initiator.send_message(bytes(6 * CHUNK)))
    at = 0
    for _ in range(record):
        at += 2 + int.from_bytes(sealed[at : at + 2], "big")
    length = int.from_bytes(sealed[at : at + 2], "big")
    sealed[at + 2 + (5 if where == "body" else length - 3)] ^= 0x40
    events = read_all(pair.responder, [before])
    assert events == [Message(b"intact")]
    pair.responder.receive_data(bytes(sealed))
    with pytest.raises(RemoteProtocolError, match="bad authentication tag"):
        while not isinstance(pair.responder.next_event(), NeedData):
            pytest.fail("an event from a tampered message")
    with pytest.raises(RemoteProtocolError):  # and the session stays dead
        pair.responder.next_event()


def test_a_message_not_lent_is_the_receivers_to_keep() -> None:
    pair = small_pair()
    first, second = b"a" * (3 * CHUNK), b"b" * (3 * CHUNK)
    events = read_all(
        pair.responder,
        [bytes(pair.initiator.send_message(first)), bytes(pair.initiator.send_message(second))],
    )
    assert events == [Message(first), Message(second)]
    assert all(isinstance(e, Message) and isinstance(e.data, bytes) for e in events)


def test_a_lent_message_is_a_read_only_view() -> None:
    pair = small_pair()
    pair.responder.lend_messages = True
    data = bytes(range(256)) * 20
    pair.responder.receive_data(bytes(pair.initiator.send_message(data)))
    event = pair.responder.next_event()
    assert isinstance(event, Message)
    assert isinstance(event.data, memoryview)
    assert event.data.readonly
    assert event.data == data


def test_an_oversized_message_in_records_is_refused(cipher: str) -> None:
    sender = small_pair(max_message_size=10 * CHUNK)
    sender.responder.config = SessionConfig(max_frame_size=FRAME, max_message_size=4 * CHUNK)
    wire = bytes(sender.initiator.send_message(bytes(5 * CHUNK)))
    sender.responder.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum"):
        sender.responder.next_event()


# ---------------------------------------------------------------- CipherState


@pytest.mark.parametrize("into", [True, False])
def test_cipher_state_into_is_with_ad(into: bool) -> None:
    function = noise.CIPHERS["ChaChaPoly"] if into else OLD_CHACHA
    sender, receiver, plain = (CipherState(function, bytes(range(32))) for _ in range(3))
    plain.nonce = 7
    sender.nonce = receiver.nonce = 7
    out = bytearray(4 + 16)
    sender.encrypt_into(b"ad", b"data", memoryview(out))
    assert bytes(out) == plain.encrypt_with_ad(b"ad", b"data")
    back = bytearray(4)
    receiver.decrypt_into(b"ad", bytes(out), memoryview(back))
    assert back == b"data"
    assert sender.nonce == receiver.nonce == 8
    out[0] ^= 1
    with pytest.raises(RemoteProtocolError, match="bad authentication tag"):
        receiver.decrypt_into(b"ad", bytes(out), memoryview(back))
    assert receiver.nonce == 8  # a refused message uses no nonce


def test_cipher_state_without_a_key_copies() -> None:
    state = CipherState(noise.CIPHERS["ChaChaPoly"])
    out = bytearray(3)
    state.encrypt_into(b"", b"abc", memoryview(out))
    assert out == b"abc"


# ---------------------------------------------------------------- packets and ACKs


def test_a_packet_decodes_the_same_from_a_view() -> None:
    samples = [
        packets.encode(Msg("0" * 32, "jobs", 1_700_000_000, b"hi", agent="scout")),
        packets.encode_msgs([Msg(f"{n:032x}", "t", 5, b"p" * n, to="notes") for n in range(3)]),
        packets.encode(Ack(("1" * 32,), ("2" * 32,), (("3" * 32, "no"),))),
        packets.encode(Records(({"kind": "x"},))),
    ]
    for raw in samples:
        lent = memoryview(bytearray(raw)).toreadonly()
        assert packets.decode(lent) == packets.decode(raw)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**128 - 1), max_size=300))
def test_an_ack_of_ok_ids_reads_as_the_json_says(numbers: list[int]) -> None:
    ack = Ack(tuple(f"{n:032x}" for n in numbers))
    assert packets.decode(packets.encode(ack)) == ack


@pytest.mark.parametrize(
    "header",
    [
        b'{"busy":[],"ok":["' + b"A" * 32 + b'"],"rejected":[]}',  # not lowercase
        b'{"busy":[],"ok":["' + b"a" * 31 + b'"],"rejected":[]}',  # too short
        b'{"busy":[],"ok":["' + b"a" * 32 + b'",],"rejected":[]}',  # trailing comma
    ],
)
def test_an_ack_almost_in_the_plain_form_is_still_checked(header: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        packets.decode(b"\x11" + len(header).to_bytes(2, "big") + header)


def test_acks_merged_keep_every_list_in_order() -> None:
    one = Ack(("1" * 32,), ("2" * 32,), (("3" * 32, "a"),))
    two = Ack(("4" * 32,), (), (("5" * 32, "b"),))
    assert merge_acks([one]) is one
    assert merge_acks([one, two]) == Ack(
        ("1" * 32, "4" * 32), ("2" * 32,), (("3" * 32, "a"), ("5" * 32, "b"))
    )


# ---------------------------------------------------------------- the link


class _Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []

    def link_made(self, link: PeerLink) -> None: ...

    def handshake_done(self, link: PeerLink, event: HandshakeComplete) -> None: ...

    def messages_arrived(self, link: PeerLink, messages: list[Msg]) -> None:
        self.log.append(("messages", [m.id for m in messages]))

    def packet_arrived(self, link: PeerLink, packet: Ack | Records) -> None:
        self.log.append(("packet", packet))

    def closed_by_peer(self, link: PeerLink, event: Closed) -> None:
        self.log.append(("closed", event.reason))

    def refused(self, link: PeerLink, reason: str, hint: str = "") -> None:
        self.log.append(("refused", reason))

    def link_lost(self, link: PeerLink) -> None: ...


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.kinds: list[type] = []

    def write(self, data: Any) -> None:
        self.kinds.append(type(data))
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def test_a_link_reads_the_acks_of_one_read_as_one_and_writes_without_joining(
    kem: Kem,
) -> None:
    pair = open_pair(kem)
    events = _Events()

    async def run() -> _Transport:
        link = PeerLink(events, pair.responder, local_id="me", clock=pair.clock)
        transport = _Transport()
        link.transport = transport
        first, second = Ack(("1" * 32,)), Ack(("2" * 32,), ("3" * 32,))
        wire = b"".join(
            bytes(pair.initiator.send_message(packets.encode(p))) for p in (first, second)
        )
        wire += bytes(pair.initiator.send_message(packets.encode(Records(({"k": 1},)))))
        wire += bytes(pair.initiator.send_message(packets.encode(Ack(("4" * 32,)))))
        link.data_received(wire)
        link.send_packet(packets.encode(Ack(("5" * 32,))))  # small: joined with the next
        link.send_packet(b"\x13\x00\x00" + bytes(200_000))  # large: written as it is
        link.send_packet(packets.encode(Ack(("6" * 32,))))
        link.flush()
        return transport

    transport = asyncio.run(run())
    assert events.log == [
        ("packet", Ack(("1" * 32, "2" * 32), ("3" * 32,))),
        ("packet", Records(({"k": 1},))),
        ("packet", Ack(("4" * 32,))),
    ]
    assert len(transport.writes) == 3
    assert transport.kinds[1] is memoryview
    got = read_all(pair.initiator, [b"".join(transport.writes)])
    assert [bytes(e.data) for e in got if isinstance(e, Message)] == [
        packets.encode(Ack(("5" * 32,))),
        b"\x13\x00\x00" + bytes(200_000),
        packets.encode(Ack(("6" * 32,))),
    ]
