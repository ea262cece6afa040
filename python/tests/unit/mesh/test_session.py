"""The sans-I/O secure channel: handshake, messages, timers, rekeying and every refusal."""

from __future__ import annotations

import json

import pytest
from keel.mesh.errors import (
    HandshakeTimeout,
    LocalProtocolError,
    NonceExhausted,
    PeerTimeout,
    RemoteProtocolError,
)
from keel.mesh.framing import FrameReader
from keel.mesh.identity import NodeIdentity
from keel.mesh.ids import node_id_of
from keel.mesh.invite import new_invite
from keel.mesh.kem import Kem
from keel.mesh.noise import MAX_NONCE, HandshakeState
from keel.mesh.session import (
    NEED_DATA,
    PROLOGUE,
    PROTOCOL_NAME,
    Closed,
    HandshakeComplete,
    Keepalive,
    Message,
    Session,
    SessionConfig,
    State,
)
from keel.testing import FakeClock

from tests.kyberpy_kem import KyberPyKem

from .conftest import Pair, drain, make_pair, open_pair, seeded


def frames(data: bytes) -> list[bytes]:
    """Split a stream into its frames (length prefix included)."""
    reader = FrameReader()
    reader.feed(data)
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(len(frame).to_bytes(2, "big") + frame)
    return out


def test_handshake_authenticates_both_sides(kem: Kem) -> None:
    pair = open_pair(kem)
    i_done, r_done = pair.events["i"][0], pair.events["r"][0]
    assert isinstance(i_done, HandshakeComplete)
    assert isinstance(r_done, HandshakeComplete)
    alice, bob = pair.initiator.identity, pair.responder.identity
    assert i_done.remote_node_id == bob.node_id == node_id_of(bob.static_public)
    assert r_done.remote_node_id == alice.node_id
    assert i_done.remote_signing_key == bob.signing_public
    assert r_done.remote_signing_key == alice.signing_public
    assert i_done.extra == {"addresses": ["10.0.0.2:7400"]}
    assert r_done.extra == {"addresses": ["10.0.0.1:7400"]}
    assert i_done.handshake_hash == r_done.handshake_hash
    assert r_done.invite is None
    i_done.remote_record().verify()
    r_done.remote_record().verify()
    assert pair.initiator.state is pair.responder.state is State.OPEN
    assert pair.initiator.remote_node_id == bob.node_id


def test_handshake_messages_have_the_documented_sizes(kem: Kem) -> None:
    pair = make_pair(kem)
    msg1 = pair.initiator.start()
    assert len(msg1) == 2 + 32 + 1184 + len(b'{"v": 1}')
    pair.responder.receive_data(msg1)
    assert pair.responder.next_event() is NEED_DATA
    msg2 = pair.responder.data_to_send()
    assert int.from_bytes(msg2[:2], "big") == len(msg2) - 2 > 32 + 1104 + 48 + 16


def test_messages_both_ways_including_empty_and_large(kem: Kem) -> None:
    pair = open_pair(kem)
    big = bytes(range(256)) * 4096  # 1 MiB: exactly the maximum, 17 frames
    pair.pump(pair.initiator.send_message(b"hello") + pair.initiator.send_message(b""))
    pair.pump(to_initiator=pair.responder.send_message(big))
    assert pair.events["r"][1:] == [Message(b"hello"), Message(b"")]
    assert pair.events["i"][1:] == [Message(big)]
    with pytest.raises(LocalProtocolError, match="exceeds the maximum"):
        pair.initiator.send_message(big + b"x")
    assert pair.initiator.state is State.OPEN  # a refused send does not kill the session


def test_hybrid_session_between_different_kem_backends(kem: Kem) -> None:
    pair = open_pair(KyberPyKem(), responder_kem=kem)
    pair.pump(pair.initiator.send_message(b"across implementations"))
    assert pair.events["r"][-1] == Message(b"across implementations")


def test_nothing_can_be_sent_before_the_handshake(kem: Kem) -> None:
    pair = make_pair(kem)
    with pytest.raises(LocalProtocolError, match="before the handshake"):
        pair.initiator.send_message(b"too early")
    with pytest.raises(LocalProtocolError, match="before the handshake"):
        pair.responder.send_keepalive()
    with pytest.raises(LocalProtocolError, match="start"):
        pair.responder.start()


def test_initiator_refuses_a_responder_with_another_key(kem: Kem, clock: FakeClock) -> None:
    """A man in the middle (any key but the pinned one) is refused before message 3."""
    alice = NodeIdentity.generate(seeded("alice"))
    bob = NodeIdentity.generate(seeded("bob"))
    mallory = NodeIdentity.generate(seeded("mallory"))
    initiator = Session.initiator(alice, remote_static=bob.static_public, kem=kem, clock=clock)
    impostor = Session.responder(mallory, kem=kem, clock=clock)
    impostor.receive_data(initiator.start())
    assert impostor.next_event() is NEED_DATA
    initiator.receive_data(impostor.data_to_send())
    with pytest.raises(RemoteProtocolError, match="not the expected") as caught:
        initiator.next_event()
    assert "man in the middle" in caught.value.hint
    assert initiator.data_to_send() == b""  # alice's identity never left
    assert initiator.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        initiator.next_event()


def test_invite_proof_travels_in_message_three(kem: Kem, clock: FakeClock) -> None:
    bob = NodeIdentity.generate(seeded("bob"))
    token = new_invite(bob, ["10.0.0.2:7400"], now=0, ttl=60, random=seeded("invite"))
    pair = open_pair(kem, clock, invite=token)
    claim = pair.events["r"][0].invite  # type: ignore[union-attr]
    assert claim is not None
    assert claim.invite_id == token.invite_id
    assert claim.verify(token.secret)
    assert not claim.verify(bytes(32))
    other = new_invite(bob, ["10.0.0.2:7400"], now=0, ttl=60, random=seeded("other"))
    assert not claim.verify(other.secret)


def test_invite_proof_is_bound_to_its_handshake(kem: Kem, clock: FakeClock) -> None:
    bob = NodeIdentity.generate(seeded("bob"))
    token = new_invite(bob, ["10.0.0.2:7400"], now=0, ttl=60, random=seeded("invite"))
    first = open_pair(kem, clock, invite=token).events["r"][0].invite  # type: ignore[union-attr]
    second = open_pair(kem, clock, invite=token).events["r"][0].invite  # type: ignore[union-attr]
    assert first is not None
    assert second is not None
    assert first.proof != second.proof
    moved = type(first)(first.invite_id, first.proof, second.handshake_hash, second.joiner_static)
    assert not moved.verify(token.secret)


def test_an_invite_must_match_the_dialled_key(kem: Kem, clock: FakeClock) -> None:
    bob = NodeIdentity.generate(seeded("bob"))
    carol = NodeIdentity.generate(seeded("carol"))
    token = new_invite(carol, ["10.0.0.3:7400"], now=0, ttl=60)
    with pytest.raises(LocalProtocolError, match="another node"):
        Session.initiator(
            NodeIdentity.generate(),
            remote_static=bob.static_public,
            kem=kem,
            clock=clock,
            invite=token,
        )


def test_close_is_clean_and_eof_is_not(kem: Kem) -> None:
    pair = open_pair(kem)
    pair.pump(pair.initiator.close("removed from the mesh"))
    assert pair.events["r"][-1] == Closed("removed from the mesh", clean=True)
    assert pair.responder.next_event() == Closed("removed from the mesh", clean=True)
    assert pair.initiator.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.initiator.send_message(b"after close")

    other = open_pair(kem)
    other.responder.receive_data(b"")
    assert other.responder.next_event() == Closed("connection closed by the peer", clean=False)


def test_eof_during_the_handshake(kem: Kem) -> None:
    pair = make_pair(kem)
    pair.responder.receive_data(pair.initiator.start())
    pair.responder.receive_data(b"")
    event = drain_one(pair.responder)
    assert event == Closed("connection closed by the peer during the handshake", clean=False)


def drain_one(session: Session) -> object:
    while (event := session.next_event()) is NEED_DATA:
        pass
    return event


# -- what the wire can do to us ------------------------------------------------------


def transport_frames(pair: Pair, count: int) -> list[bytes]:
    data = b"".join(pair.initiator.send_message(f"m{i}".encode()) for i in range(count))
    return frames(data)


def test_tampered_frame_is_refused(kem: Kem) -> None:
    pair = open_pair(kem)
    frame = bytearray(transport_frames(pair, 1)[0])
    frame[10] ^= 0x01
    pair.responder.receive_data(bytes(frame))
    with pytest.raises(RemoteProtocolError, match="decryption failed"):
        pair.responder.next_event()


def test_replayed_frame_is_refused(kem: Kem) -> None:
    pair = open_pair(kem)
    first = transport_frames(pair, 1)[0]
    pair.responder.receive_data(first)
    assert pair.responder.next_event() == Message(b"m0")
    pair.responder.receive_data(first)
    with pytest.raises(RemoteProtocolError, match="decryption failed") as caught:
        pair.responder.next_event()
    assert "replayed" in caught.value.hint


def test_reordered_frames_are_refused(kem: Kem) -> None:
    pair = open_pair(kem)
    first, second = transport_frames(pair, 2)
    pair.responder.receive_data(second + first)
    with pytest.raises(RemoteProtocolError, match="decryption failed"):
        pair.responder.next_event()


def test_truncated_stream_is_refused(kem: Kem) -> None:
    pair = open_pair(kem)
    frame = transport_frames(pair, 1)[0]
    pair.responder.receive_data(frame[:-5])
    assert pair.responder.next_event() is NEED_DATA
    pair.responder.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        pair.responder.next_event()


def test_a_shortened_frame_is_refused(kem: Kem) -> None:
    pair = open_pair(kem)
    frame = transport_frames(pair, 1)[0]
    body = frame[2:-1]
    pair.responder.receive_data(len(body).to_bytes(2, "big") + body)
    with pytest.raises(RemoteProtocolError, match="decryption failed"):
        pair.responder.next_event()


def test_oversized_frame_is_refused_from_its_length_alone(kem: Kem, clock: FakeClock) -> None:
    bob = NodeIdentity.generate(seeded("bob"))
    config = SessionConfig(max_frame_size=4096)
    responder = Session.responder(bob, kem=kem, clock=clock, config=config)
    responder.receive_data((4097).to_bytes(2, "big"))
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum of 4096"):
        responder.next_event()


def test_oversized_message_is_refused(kem: Kem) -> None:
    pair = open_pair(kem)
    pair.responder.config = SessionConfig(max_message_size=100_000)
    pair.responder.receive_data(pair.initiator.send_message(bytes(100_001)))
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum of 100000"):
        pair.responder.next_event()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x00",
        b"\x00\x05hello",
        bytes(range(256)) * 8,
        b"\x04\xd0" + bytes(1232),
    ],
)
def test_garbage_at_the_responder_is_refused(kem: Kem, clock: FakeClock, garbage: bytes) -> None:
    responder = Session.responder(NodeIdentity.generate(), kem=kem, clock=clock)
    responder.receive_data(garbage)
    responder.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        while not isinstance(responder.next_event(), Closed):
            responder.data_to_send()
    assert responder.state is State.ERROR


def test_messages_out_of_turn_in_the_handshake(kem: Kem) -> None:
    pair = make_pair(kem)
    msg1 = pair.initiator.start()
    pair.initiator.receive_data(msg1)  # the initiator's own message echoed back
    with pytest.raises(RemoteProtocolError):
        pair.initiator.next_event()


def hand_made_initiator(kem: Kem, responder: Session, payload3: bytes) -> None:
    """Run a raw Noise initiator against ``responder`` with a chosen message-3 payload."""
    alice = NodeIdentity.generate(seeded("alice"))
    hs = HandshakeState(
        PROTOCOL_NAME, initiator=True, prologue=PROLOGUE, s=alice.static_private, kem=kem
    )
    msg1 = hs.write_message(b'{"v": 1}')
    responder.receive_data(len(msg1).to_bytes(2, "big") + msg1)
    assert responder.next_event() is NEED_DATA
    reply = responder.data_to_send()
    hs.read_message(reply[2:])
    msg3 = hs.write_message(payload3)
    responder.receive_data(len(msg3).to_bytes(2, "big") + msg3)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"\xff\xfe", "JSON: not UTF-8 text"),
        (b'{"v": 1, "v": 1}', 'key "v" appears twice'),
        (b'{"v": NaN}', "NaN is not a JSON value"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"v": 2}', "unsupported protocol version 2"),
        (b'{"v": true}', "unsupported protocol version True"),
        (b'{"v": 1, "signing_key": "AAAA", "binding": ""}', "signing_key must be 32 bytes"),
        (b"[" * 100_00 + b"]" * 100_00, "nested more than 64 levels deep"),
        (b"[" * 65 + b"]" * 65, "nested more than 64 levels deep"),
    ],
)
def test_malformed_identity_payloads_are_refused(
    kem: Kem, clock: FakeClock, payload: bytes, problem: str
) -> None:
    responder = Session.responder(NodeIdentity.generate(), kem=kem, clock=clock)
    hand_made_initiator(kem, responder, payload)
    with pytest.raises(RemoteProtocolError, match=problem):
        responder.next_event()


def test_a_signing_key_bound_to_another_node_is_refused(kem: Kem, clock: FakeClock) -> None:
    """Alice cannot claim Carol's signing key: the binding covers Carol's static key."""
    carol = NodeIdentity.generate(seeded("carol"))
    from keel.mesh.encoding import b64u_encode

    payload = json.dumps(
        {
            "v": 1,
            "signing_key": b64u_encode(carol.signing_public),
            "binding": b64u_encode(carol.binding),
        }
    ).encode()
    responder = Session.responder(NodeIdentity.generate(), kem=kem, clock=clock)
    hand_made_initiator(kem, responder, payload)
    with pytest.raises(RemoteProtocolError, match="binding does not verify"):
        responder.next_event()


# -- time: timeouts, keepalives, rekeying ----------------------------------------------


def test_handshake_timeout_is_the_shells_to_enforce(kem: Kem, clock: FakeClock) -> None:
    responder = Session.responder(NodeIdentity.generate(), kem=kem, clock=clock)
    assert responder.next_deadline() == clock.now + 10
    clock.advance(9.9)
    assert responder.tick() == b""
    clock.advance(0.1)
    with pytest.raises(HandshakeTimeout, match="not finished after 10 s"):
        responder.tick()
    assert responder.state is State.ERROR


def test_keepalives_flow_and_silence_times_out(kem: Kem) -> None:
    pair = open_pair(kem)
    assert pair.initiator.next_deadline() == pair.clock.now + 15
    pair.clock.advance(15)
    pair.pump(pair.initiator.tick(), pair.responder.tick())
    assert pair.events["r"][-1] == Keepalive()
    assert pair.events["i"][-1] == Keepalive()
    pair.clock.advance(59)
    pair.initiator.tick()  # keepalive due, not dead yet
    pair.clock.advance(1)
    with pytest.raises(PeerTimeout, match="nothing received for 60 s"):
        pair.initiator.tick()


def test_rekey_on_time(kem: Kem) -> None:
    pair = open_pair(kem)
    before = pair.initiator._send.key  # type: ignore[union-attr]
    for _ in range(8):  # 8 x 15 s = 120 s, keepalives keep both sides alive
        pair.clock.advance(15)
        pair.pump(pair.initiator.tick(), pair.responder.tick())
    after = pair.initiator._send.key  # type: ignore[union-attr]
    assert after != before
    assert pair.responder._recv.key == after  # type: ignore[union-attr]
    pair.pump(pair.initiator.send_message(b"after rekey"))
    assert pair.events["r"][-1] == Message(b"after rekey")


def test_rekey_on_message_count(kem: Kem, clock: FakeClock) -> None:
    config = SessionConfig(rekey_messages=3)
    pair = open_pair(kem, clock, config=config)
    pair.responder.config = config
    keys = set()
    for i in range(10):
        pair.pump(pair.initiator.send_message(b"n%d" % i))
        keys.add(pair.initiator._send.key)  # type: ignore[union-attr]
    assert pair.events["r"][1:] == [Message(b"n%d" % i) for i in range(10)]
    assert len(keys) >= 3


def test_nonce_exhaustion_per_spec(kem: Kem) -> None:
    pair = open_pair(kem, config=SessionConfig(rekey_messages=1 << 62))
    pair.initiator._send.set_nonce(MAX_NONCE - 1)  # type: ignore[union-attr]
    pair.responder._recv.set_nonce(MAX_NONCE - 1)  # type: ignore[union-attr]
    pair.pump(pair.initiator.send_message(b"the last one"))  # sent with nonce 2^64 - 2
    assert pair.events["r"][-1] == Message(b"the last one")
    with pytest.raises(NonceExhausted, match="2\\^64 - 1 is reserved"):
        pair.initiator.send_message(b"one too many")
    assert pair.initiator.state is State.ERROR


def test_config_is_validated() -> None:
    with pytest.raises(LocalProtocolError, match="idle_timeout must exceed"):
        SessionConfig(keepalive_interval=30, idle_timeout=20)
    with pytest.raises(LocalProtocolError, match="max_frame_size"):
        SessionConfig(max_frame_size=100)


def test_extra_must_be_json(kem: Kem, clock: FakeClock) -> None:
    with pytest.raises(LocalProtocolError, match="must be JSON"):
        Session.responder(NodeIdentity.generate(), kem=kem, clock=clock, extra={"x": object()})


def test_byte_at_a_time_delivery(kem: Kem) -> None:
    pair = make_pair(kem)
    stream = pair.initiator.start()
    for byte in stream:
        pair.responder.receive_data(bytes([byte]))
        assert pair.responder.next_event() is NEED_DATA
    reply = pair.responder.data_to_send()
    assert reply
    pair.initiator.receive_data(reply)
    events: list[object] = []
    final = drain(pair.initiator, events)  # type: ignore[arg-type]
    assert isinstance(events[0], HandshakeComplete)
    for byte in final + pair.initiator.send_message(b"slowly"):
        pair.responder.receive_data(bytes([byte]))
    received: list[object] = []
    drain(pair.responder, received)  # type: ignore[arg-type]
    assert received[1:] == [Message(b"slowly")]
