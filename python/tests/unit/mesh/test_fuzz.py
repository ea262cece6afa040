"""Bounded fuzzing of every parser of outside input in the mesh.

What a peer sends: frames, both sides of the handshake and its identity
payload, the handshake's ``extra``, membership records, packets (also in
``test_packets.py``); what a person pastes: invite tokens; what a local
process sends: control requests and their arguments (the real daemon's
handlers: ``tests/integration/mesh/test_fuzz_control.py``) and the binary
stream's frames (``test_local.py``). Each either parses or raises the one
error type of its layer, with a message of one line; never anything else.
Every loop here is bounded, so a hang would show as a test that never ends
rather than pass. Examples are derandomised so CI runs the same cases every
time.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keel.api import ControlServer, Peer
from keel.config import parse_json
from keel.errors import UsageError
from keel.mesh import arguments, ids, packets, rooms
from keel.mesh.encoding import b64u_decode, b64u_encode, is_address
from keel.mesh.errors import InviteError, RemoteProtocolError
from keel.mesh.framing import FrameReader
from keel.mesh.hello import make_hello, parse_hello
from keel.mesh.identity import NodeIdentity
from keel.mesh.invite import TOKEN_PREFIX, InviteToken, new_invite
from keel.mesh.kem import Kem
from keel.mesh.membership import Membership, SignedRecord
from keel.mesh.packets import Ack, Msg, Msgs, Records
from keel.mesh.session import Closed, HandshakeComplete, Message, NeedData, Session
from keel.testing import FakeClock

from tests.json_values import json_values
from tests.kyberpy_kem import KyberPyKem

from .conftest import production_kem, seeded
from .test_session import hand_made_initiator

ARGUMENT_KEYS = ["token", "to", "wait", "timeout", "ttl", "max", "ack", "data", "id", "topic"]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(chunks=st.lists(st.binary(max_size=300), max_size=20), limit=st.integers(1, 65535))
def test_frame_reader_takes_any_bytes(chunks: list[bytes], limit: int) -> None:
    reader = FrameReader(max_frame_size=limit)
    chunks = [c for c in chunks if c]  # b"" means EOF: only at the end
    total = sum(len(c) for c in chunks)
    taken = 0
    try:
        for chunk in [*chunks, b""]:
            reader.feed(chunk)
            while (frame := reader.next_frame()) is not None:
                assert 0 < len(frame) <= limit
                taken += len(frame) + 2
                assert taken <= total
    except RemoteProtocolError:
        return


def run_to_the_end(session: Session, stream: bytes, chunk: int) -> list[object]:
    """Feed ``stream`` in ``chunk``-byte pieces, then EOF; collect events; bounded."""
    events: list[object] = []
    pieces = [stream[i : i + chunk] for i in range(0, len(stream), chunk)] + [b""]
    budget = len(stream) + 100
    try:
        for piece in pieces:
            session.receive_data(piece)
            while True:
                budget -= 1
                assert budget > 0, "the session loops without consuming input"
                event = session.next_event()
                session.data_to_send()
                if isinstance(event, NeedData):
                    break
                events.append(event)
                if isinstance(event, Closed):
                    return events
    except RemoteProtocolError as exc:
        events.append(exc)
    return events


@FUZZ
@given(stream=st.binary(max_size=3000), chunk=st.integers(1, 4000))
def test_responder_takes_any_bytes(stream: bytes, chunk: int) -> None:
    responder = Session.responder(
        NodeIdentity.generate(seeded("r")), kem=production_kem(), clock=FakeClock()
    )
    events = run_to_the_end(responder, stream, chunk)
    assert events, "EOF always ends in Closed or an error"
    assert not any(isinstance(e, HandshakeComplete) for e in events)


# -- mutations of a real, reproducible conversation ----------------------------------


@dataclass(frozen=True)
class Transcript:
    to_responder: bytes  # handshake messages 1 and 3, then three transport frames
    to_initiator: bytes  # handshake message 2, then one transport frame
    alice: NodeIdentity
    bob: NodeIdentity


def fixed_kem() -> Kem:
    """The responder encapsulates: kyber-py with fixed randomness makes that reproducible.

    (The initiator only makes a key pair from a seed and decapsulates, which the
    production backends do deterministically.)
    """
    return KyberPyKem(encaps_random=lambda n: bytes(range(n)))


def new_initiator(t: Transcript) -> Session:
    return Session.initiator(
        t.alice,
        remote_static=t.bob.static_public,
        kem=production_kem(),
        clock=FakeClock(),
        random=seeded("i"),
    )


def new_responder(t: Transcript) -> Session:
    return Session.responder(t.bob, kem=fixed_kem(), clock=FakeClock(), random=seeded("r"))


@functools.cache
def transcript() -> Transcript:
    t = Transcript(
        b"", b"", NodeIdentity.generate(seeded("alice")), NodeIdentity.generate(seeded("bob"))
    )
    initiator, responder = new_initiator(t), new_responder(t)
    to_r = bytearray(initiator.start())
    responder.receive_data(bytes(to_r))
    assert isinstance(responder.next_event(), NeedData)
    to_i = bytearray(responder.data_to_send())
    initiator.receive_data(bytes(to_i))
    assert isinstance(initiator.next_event(), HandshakeComplete)
    message3 = initiator.data_to_send()
    to_r += message3
    responder.receive_data(message3)
    assert isinstance(responder.next_event(), HandshakeComplete)
    for text in (b"one", b"two" * 50, b""):
        to_r += initiator.send_message(text)
    to_i += responder.send_message(b"back")
    return Transcript(bytes(to_r), bytes(to_i), t.alice, t.bob)


def mutations() -> st.SearchStrategy[tuple[str, int, bytes]]:
    return st.tuples(
        st.sampled_from(["flip", "truncate", "insert", "duplicate", "drop"]),
        st.integers(0, 10_000),
        st.binary(min_size=1, max_size=40),
    )


def mutate(stream: bytes, how: tuple[str, int, bytes]) -> bytes:
    kind, position, junk = how
    at = position % len(stream)
    if kind == "flip":
        return stream[:at] + bytes([stream[at] ^ (junk[0] or 1)]) + stream[at + 1 :]
    if kind == "truncate":
        return stream[:at]
    if kind == "insert":
        return stream[:at] + junk + stream[at:]
    if kind == "duplicate":
        return stream[:at] + stream[at : at + len(junk) * 8] + stream[at:]
    return stream[:at] + stream[at + len(junk) :]


def test_the_unmutated_transcript_replays() -> None:
    t = transcript()
    events = run_to_the_end(new_responder(t), t.to_responder, 4096)
    assert isinstance(events[0], HandshakeComplete)
    assert events[1:4] == [Message(b"one"), Message(b"two" * 50), Message(b"")]
    back = run_to_the_end(new_initiator_started(t), t.to_initiator, 4096)
    assert isinstance(back[0], HandshakeComplete)
    assert back[1] == Message(b"back")


def new_initiator_started(t: Transcript) -> Session:
    initiator = new_initiator(t)
    initiator.start()
    return initiator


@settings(FUZZ, max_examples=60)
@given(how=mutations(), chunk=st.integers(1, 5000))
def test_responder_survives_any_mutation(how: tuple[str, int, bytes], chunk: int) -> None:
    t = transcript()
    stream = mutate(t.to_responder, how)
    events = run_to_the_end(new_responder(t), stream, chunk)
    messages = [e for e in events if isinstance(e, Message)]
    # Whatever arrives intact arrives in order; nothing is invented.
    assert messages == [Message(b"one"), Message(b"two" * 50), Message(b"")][: len(messages)]


@settings(FUZZ, max_examples=60)
@given(how=mutations(), chunk=st.integers(1, 5000))
def test_initiator_survives_any_mutation(how: tuple[str, int, bytes], chunk: int) -> None:
    t = transcript()
    stream = mutate(t.to_initiator, how)
    events = run_to_the_end(new_initiator_started(t), stream, chunk)
    messages = [e for e in events if isinstance(e, Message)]
    assert messages in ([], [Message(b"back")])


# -- what peers, people and local processes send, above the frames -----------------------

JSON = json_values()


def one_line(error: Exception) -> None:
    text = str(error)
    assert text
    assert "\n" not in text
    assert len(text) < 1000, text[:200]


def mutated_json(base: dict[str, object], data: st.DataObject) -> dict[str, object]:
    """``base`` with some fields replaced by any JSON, some dropped, some added."""
    out = dict(base)
    for key in data.draw(st.lists(st.sampled_from(sorted(base)), max_size=3, unique=True)):
        if data.draw(st.booleans()):
            out[key] = data.draw(JSON)
        else:
            del out[key]
    out.update(data.draw(st.dictionaries(st.text(max_size=8), JSON, max_size=2)))
    return out


def valid_token() -> str:
    inviter = NodeIdentity.generate(seeded("inviter"))
    token = new_invite(inviter, ["192.0.2.1:7400"], now=1_700_000_000, ttl=60, random=seeded("s"))
    return token.encode()


@FUZZ
@given(text=st.text(max_size=300))
def test_invite_tokens_any_text(text: str) -> None:
    for candidate in (text, TOKEN_PREFIX + text):
        try:
            InviteToken.decode(candidate)
        except InviteError as exc:
            one_line(exc)


@FUZZ
@given(data=st.data())
def test_invite_tokens_mutated(data: st.DataObject) -> None:
    token = valid_token()
    body = parse_json(b64u_decode(token[len(TOKEN_PREFIX) :], "token"), source="token")
    text = json.dumps(mutated_json(body, data))
    for candidate in (
        TOKEN_PREFIX + b64u_encode(text.encode()),
        token[: data.draw(st.integers(0, len(token)))] + data.draw(st.text(max_size=10)),
    ):
        try:
            InviteToken.decode(candidate)
        except InviteError as exc:
            one_line(exc)


def valid_records() -> list[dict[str, object]]:
    alice, bob = NodeIdentity.generate(seeded("a")), NodeIdentity.generate(seeded("b"))
    mesh = Membership.found(alice, ["10.0.0.1:7400"], 1_700_000_000_000)
    join = SignedRecord.make(
        alice, "join", 1_700_000_000_001, node=bob.record().to_json(), addrs=[]
    )
    room = mesh.make(
        alice, "room", 1_700_000_000_002, **rooms.create(alice, name="ops", members=[])
    )
    grant = SignedRecord.make(alice, "operator", 1_700_000_000_003, node=bob.node_id, grant=True)
    remove = SignedRecord.make(alice, "remove", 1_700_000_000_004, node=bob.node_id)
    return [r.to_json() for r in (mesh.genesis, join, room, grant, remove)]


@FUZZ
@given(data=st.data())
def test_membership_records(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(valid_records()))
    for candidate in (mutated_json(base, data), data.draw(JSON)):
        try:
            record = SignedRecord.from_json(candidate)
        except RemoteProtocolError as exc:
            one_line(exc)
            continue
        assert SignedRecord.from_json(record.to_json()) == record
        packets.canonical_json(record.to_json())  # it can be sent on


@FUZZ
@given(data=st.data())
def test_handshake_extra(data: st.DataObject) -> None:
    base = make_hello(["10.0.0.1:7400", "[2001:db8::1]:7400"], "ab" * 16, valid_records()[1:2])
    for extra in (mutated_json(base, data), data.draw(st.dictionaries(st.text(), JSON))):
        hello = parse_hello(extra)  # never raises
        assert len(hello.addresses) <= 16
        assert all(is_address(a) for a in hello.addresses)
        assert hello.mesh is None or ids.is_message_id(hello.mesh)
        assert all(isinstance(r, dict) for r in hello.admission)
        assert type(hello.app) is int
        assert hello.app >= 1


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_handshake_identity_payload(data: st.DataObject) -> None:
    """Message 3's payload, decrypted fine but saying anything at all."""
    alice = NodeIdentity.generate(seeded("alice"))
    base: dict[str, object] = {
        "v": 1,
        "signing_key": b64u_encode(alice.signing_public),
        "binding": b64u_encode(alice.binding),
        "extra": {"addrs": ["10.0.0.1:1"]},
    }
    payload = data.draw(
        st.sampled_from(["mutated", "json", "bytes"]).flatmap(
            lambda how: (
                st.just(json.dumps(mutated_json(base, data)).encode())
                if how == "mutated"
                else st.builds(lambda v: json.dumps(v).encode(), JSON)
                if how == "json"
                else st.binary(max_size=200)
            )
        )
    )
    responder = Session.responder(
        NodeIdentity.generate(seeded("r")), kem=production_kem(), clock=FakeClock()
    )
    hand_made_initiator(production_kem(), responder, payload)
    try:
        event = responder.next_event()
    except RemoteProtocolError as exc:
        one_line(exc)
        return
    assert isinstance(event, HandshakeComplete)
    parse_hello(event.extra)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_packets_mutated(data: st.DataObject) -> None:
    message = Msg("ab" * 16, "jobs", 1_700_000_000, b"payload")
    base = data.draw(
        st.sampled_from(
            [
                packets.encode(message),
                packets.encode(Ack(("ab" * 16,), ("cd" * 16,), (("ef" * 16, "no"),))),
                packets.encode(Records(tuple(valid_records()))),
                packets.encode(Msgs((message, message._replace(id="cd" * 16)))),
            ]
        )
    )
    how = (data.draw(st.sampled_from(["flip", "truncate", "insert", "duplicate", "drop"])),
           data.draw(st.integers(0, 10_000)), data.draw(st.binary(min_size=1, max_size=20)))  # fmt: skip
    try:
        packets.decode(mutate(base, how))
    except RemoteProtocolError as exc:
        one_line(exc)


@FUZZ
@given(args=st.dictionaries(st.sampled_from(ARGUMENT_KEYS), JSON, max_size=6))
def test_control_request_arguments(args: dict[str, object]) -> None:
    checks: list[Callable[[], object]] = [
        lambda: arguments.string(args, "token"),
        lambda: arguments.node_id(args, "to"),
        lambda: arguments.number(args, "wait", 0.0),
        lambda: arguments.number(args, "timeout", 30.0, positive=True, maximum=3600),
        lambda: arguments.ttl(args, 60.0),
        lambda: arguments.integer(args, "max", 100, minimum=1, maximum=10_000),
        lambda: arguments.receipts(args, "ack"),
        lambda: arguments.data(args),
        lambda: arguments.message_id(args),
        lambda: arguments.topic(args),
    ]
    for check in checks:
        try:
            check()
        except UsageError as exc:
            one_line(exc)


@FUZZ
@given(line=st.one_of(st.binary(max_size=200), st.builds(lambda v: json.dumps(v).encode(), JSON)))
def test_control_request_lines(line: bytes) -> None:
    """The control socket's parsing: any line gets an answer, never an internal error."""

    async def echo(args: dict[str, object], peer: Peer) -> object:
        return args

    server = ControlServer(Path("/nonexistent"), {"echo": echo})
    for candidate in (line, b'{"verb": "echo", "args": ' + line + b"}"):
        answer = asyncio.run(server._dispatch(candidate, Peer(1, 0, 0)))
        assert isinstance(answer, dict)
        if not answer["ok"]:
            assert answer["kind"] != "internal"
            assert "internal error" not in answer["error"]
            one_line(Exception(answer["error"]))
        json.dumps(answer)  # it can be sent back
