"""Buffers used again once nothing holds them: the pool, sealed packets, the payload cache."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from keel.mesh import packets
from keel.mesh import session as session_module
from keel.mesh.buffers import BufferPool
from keel.mesh.delivery import Outbox
from keel.mesh.outbound import PAYLOAD_CACHE_BYTES, NewMessage, Outbound
from keel.mesh.packets import Ack, Msg
from keel.mesh.session import Event
from keel.mesh.store import Store

from tests.unit.mesh.conftest import drain, open_pair, production_kem

PEER = "b" * 32


def test_a_buffer_comes_back_only_once_no_view_of_it_is_left() -> None:
    pool = BufferPool(keep=2, keep_bytes=1 << 20, step=4096)
    first = pool.take(5000)
    assert len(first) == 8192  # rounded up to the step
    view = memoryview(first)[:10]
    first_id = id(first)
    del first
    second = pool.take(100)  # the first is held by the view: a new one
    assert id(second) != first_id
    assert pool.made == 2
    del view
    again = pool.take(8000)
    assert id(again) == first_id  # free now, and large enough
    assert pool.made == 2
    assert pool.free() == 0  # both are held (``again``, ``second``)
    del again, second
    assert pool.free() == 2


def test_the_pool_keeps_no_more_than_its_limits_and_replaces_a_free_buffer_too_small() -> None:
    pool = BufferPool(keep=2, keep_bytes=64 << 10, step=4096)
    held = [pool.take(4096), pool.take(4096), pool.take(4096)]  # the third is not kept
    assert pool.made == 3
    del held
    assert pool.free() == 2
    large = pool.take(40_000)  # no free one fits: made, in place of a small free one
    assert pool.made == 4
    del large
    assert sorted(len(b) for b in pool._kept) == [4096, 40960]
    too_many = pool.take(70_000)  # it would take the pool past keep_bytes: not kept
    del too_many
    assert sorted(len(b) for b in pool._kept) == [4096, 40960]


def test_a_sealed_packet_is_not_written_over_while_its_view_is_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "OUTPUTS", BufferPool(keep=2, keep_bytes=8 << 20))
    pair = open_pair(production_kem())
    data = os.urandom(200_000)
    first = pair.initiator.seal_message([data[:70_000], data[70_000:]])
    assert isinstance(first, memoryview)
    kept = bytes(first)
    second = pair.initiator.seal_message([data])  # first still held: another buffer
    assert isinstance(second, memoryview)
    assert id(second.obj) != id(first.obj)
    assert bytes(first) == kept
    first_buffer = id(first.obj)
    del first
    third = pair.initiator.seal_message([data])
    assert isinstance(third, memoryview)
    assert id(third.obj) == first_buffer  # free again: used again
    assert session_module.OUTPUTS.made == 2
    # and every message reads back as it was sealed
    events: list[Event] = []
    pair.responder.receive_data(kept + bytes(second) + bytes(third))
    drain(pair.responder, events)
    assert [getattr(e, "data", None) for e in events] == [data, data, data]


@contextlib.contextmanager
def outbound_on(tmp_path: Path) -> Iterator[Outbound]:
    """An outbound with a real store and no links (what it sends waits)."""
    store = Store(tmp_path / "state.db", synchronous="NORMAL")
    outbound = Outbound(
        store=store,
        outbox=Outbox(clock=time.monotonic, wall=time.time),
        links={},
        me="a" * 32,
        audit=None,
        clock=time.monotonic,
        wall=time.time,
    )
    try:
        yield outbound
    finally:
        outbound.close()
        store.close()


def test_the_payload_cache_counts_a_frame_buffer_once_while_a_view_of_it_is_cached(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        with outbound_on(tmp_path) as outbound:
            frame = bytearray(os.urandom(1 << 20))
            payloads = memoryview(frame).toreadonly()
            ids = [f"{n:032x}" for n in range(1, 5)]
            messages = [
                NewMessage(i, (PEER,), "t", payloads[n * 65536 : (n + 1) * 65536], time.time() + 60)
                for n, i in enumerate(ids)
            ]
            small = NewMessage(f"{9:032x}", (PEER,), "t", b"x" * 100, time.time() + 60)
            outbound.submit([*messages, small])
            assert outbound._payload_bytes == len(frame) + 100  # the frame once, then the copy
            outbound.answered(PEER, Ack(tuple(ids[:3])))
            assert outbound._payload_bytes == len(frame) + 100  # one view of it is still cached
            outbound.answered(PEER, Ack((ids[3], small.id)))
            assert outbound._payload_bytes == 0
            assert outbound._buffers == {}

    asyncio.run(run())


def test_views_of_a_frame_too_large_for_the_cache_are_not_cached(tmp_path: Path) -> None:
    async def run() -> None:
        with outbound_on(tmp_path) as outbound:
            frame = bytearray(PAYLOAD_CACHE_BYTES + 1)
            view = memoryview(frame).toreadonly()[:65536]
            message = NewMessage(f"{1:032x}", (PEER,), "t", view, time.time() + 60)
            outbound.submit([message])
            assert outbound._payload_bytes == 0
            assert outbound._payloads == {}
            envelope = outbound._payload(1)  # read back from the store when it is sent
            assert envelope is not None
            assert envelope.payload == bytes(view)

    asyncio.run(run())


def test_a_message_whose_payload_is_a_view_encodes_as_its_bytes() -> None:
    data = os.urandom(70_000)
    frame = bytearray(b"\0" * 10 + data)
    view = memoryview(frame).toreadonly()[10:]
    for agent, to in ((None, None), ("alice", "bob")):
        as_view = Msg(f"{1:032x}", "jobs", 1_700_000_000, view, None, agent, to)
        as_bytes = as_view._replace(payload=data)
        assert packets.encode(as_view) == packets.encode(as_bytes)
        assert packets.msgs_entry(as_view) == packets.msgs_entry(as_bytes)
