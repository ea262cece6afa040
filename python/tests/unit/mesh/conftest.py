"""Shared helpers for the mesh core's tests: a clock the test drives, identities, a KEM."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from keel.mesh import kem as kem_module
from keel.mesh.identity import NodeIdentity
from keel.mesh.kem import Kem, get_kem
from keel.mesh.session import Closed, Event, HandshakeComplete, NeedData, Session
from keel.testing import FakeClock

from tests.kyberpy_kem import KyberPyKem


def seeded(label: str) -> Callable[[int], bytes]:
    """A deterministic random source (SHAKE-256 of a label and a counter)."""
    counter = 0

    def random(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(f"{label}/{counter}".encode()).digest(n)

    return random


def production_kem() -> Kem:
    """The backend keel would use here; kyber-py only where neither backend loads."""
    if any(reason is None for reason in kem_module.available_backends().values()):
        return get_kem()
    return KyberPyKem()


@pytest.fixture
def kem() -> Kem:
    return production_kem()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class Pair:
    initiator: Session
    responder: Session
    clock: FakeClock
    events: dict[str, list[Event]] = field(default_factory=lambda: {"i": [], "r": []})

    def pump(self, to_responder: bytes = b"", to_initiator: bytes = b"") -> None:
        """Deliver bytes both ways until neither side has anything more to say."""
        while to_responder or to_initiator:
            if to_responder:
                self.responder.receive_data(to_responder)
            from_responder = drain(self.responder, self.events["r"])
            if to_initiator:
                self.initiator.receive_data(to_initiator)
            from_initiator = drain(self.initiator, self.events["i"])
            to_responder, to_initiator = from_initiator, from_responder


def drain(session: Session, into: list[Event]) -> bytes:
    out = bytearray()
    while True:
        event = session.next_event()
        out += session.data_to_send()
        if isinstance(event, NeedData):
            return bytes(out)
        into.append(event)
        if isinstance(event, Closed):
            return bytes(out)


def make_pair(
    kem: Kem,
    clock: FakeClock | None = None,
    *,
    responder_kem: Kem | None = None,
    **initiator_options: Any,
) -> Pair:
    clock = clock or FakeClock()
    alice = NodeIdentity.generate(seeded("alice"))
    bob = NodeIdentity.generate(seeded("bob"))
    responder = Session.responder(
        bob, kem=responder_kem or kem, clock=clock, extra={"addresses": ["10.0.0.2:7400"]}
    )
    initiator = Session.initiator(
        alice,
        remote_static=bob.static_public,
        kem=kem,
        clock=clock,
        extra={"addresses": ["10.0.0.1:7400"]},
        **initiator_options,
    )
    return Pair(initiator, responder, clock)


def open_pair(kem: Kem, clock: FakeClock | None = None, **options: Any) -> Pair:
    pair = make_pair(kem, clock, **options)
    pair.pump(pair.initiator.start())
    assert isinstance(pair.events["i"][0], HandshakeComplete)
    assert isinstance(pair.events["r"][0], HandshakeComplete)
    return pair
