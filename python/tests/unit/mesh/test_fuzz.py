"""Bounded fuzzing: the frame parser and both sides of the handshake take any bytes.

The only exception allowed out of the core is a ``RemoteProtocolError`` (the
shell closes the connection); every loop here is bounded, so a hang would show
as a test that never ends rather than pass. Examples are derandomised so CI
runs the same cases every time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keel.mesh.errors import RemoteProtocolError
from keel.mesh.framing import FrameReader
from keel.mesh.identity import NodeIdentity
from keel.mesh.kem import Kem
from keel.mesh.session import Closed, HandshakeComplete, Message, NeedData, Session

from tests.kyberpy_kem import KyberPyKem

from .conftest import FakeClock, production_kem, seeded

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
