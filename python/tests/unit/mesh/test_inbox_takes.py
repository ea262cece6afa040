"""The inbox gathers agents' ACKs of messages handed from memory: their dedup keys are
stored, and answered to the peer, together; a copy that arrives meanwhile is neither
answered nor handed over again (``keel.mesh.inbox``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from keel.mesh import inbox as inbox_module
from keel.mesh import local
from keel.mesh.agent_streams import LocalStream
from keel.mesh.delivery import InboxLimits
from keel.mesh.handoffs import Handoffs
from keel.mesh.inbox import Inbox
from keel.mesh.membership import View
from keel.mesh.packets import Msg
from keel.mesh.peer_link import PeerLink
from keel.mesh.store import Store

ME, PEER = "m" * 32, "p" * 32


class Transport:
    def get_write_buffer_size(self) -> int:
        return 0


class Writer:
    """What a LocalStream writes to (no socket: everything through ``writelines``)."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.data = bytearray()

    def get_extra_info(self, name: str) -> Any:
        return None

    def is_closing(self) -> bool:
        return False

    def writelines(self, parts: Sequence[bytes | memoryview]) -> None:
        for part in parts:
            self.data += part

    def write(self, data: bytes) -> None:
        self.data += data

    def delivered(self) -> list[local.Delivered]:
        out: list[local.Delivered] = []
        data = bytes(self.data)
        self.data.clear()
        while data:
            kind, length = local.read_frame_head(data[: local.FRAME.size])
            body = data[local.FRAME.size : local.FRAME.size + length]
            data = data[local.FRAME.size + length :]
            assert kind == local.Kind.DELIVER
            out += local.decode_deliver(body)
        return out


class Link:
    """A peer's connection as the inbox sees it: who, and what it was answered."""

    def __init__(self) -> None:
        self.peer = PEER
        self.answers: list[tuple[list[str], list[str]]] = []

    def describe(self) -> str:
        return PEER

    def answer(
        self, ok: Sequence[str], busy: Sequence[str] = (), rejected: Sequence[Any] = ()
    ) -> None:
        self.answers.append((list(ok), list(busy)))


def message(n: int) -> Msg:
    return Msg(f"{n:032x}", "t", int(time.time()) + 3600, bytes([n]) * 100)


def make_inbox(tmp_path: Path, link: Link, answered: asyncio.Event) -> tuple[Inbox, Store]:
    store = Store(tmp_path / "state.db", synchronous="NORMAL")

    def answer(peer: str, ids: Sequence[str]) -> None:
        assert peer == PEER
        link.answer(ids)
        answered.set()

    inbox = Inbox(
        store=store,
        handoffs=Handoffs(clock=time.monotonic, epoch=1),
        limits=InboxLimits(),
        lease=30.0,
        me=ME,
        view=lambda: cast(View, None),  # no room messages here
        answer=answer,
        audit=None,
        clock=time.monotonic,
        wall=time.time,
    )
    return inbox, store


def test_acks_are_stored_and_answered_together_and_a_copy_meanwhile_is_left(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        link = Link()
        answered = asyncio.Event()
        inbox, store = make_inbox(tmp_path, link, answered)
        writer = Writer()
        stream = LocalStream(cast(asyncio.StreamWriter, writer))
        inbox.stream_opened(stream)
        inbox.subscribe(stream, "t", 100, 1 << 20)
        assert writer.delivered() == []  # subscribed: an empty DELIVER frame
        peer = cast(PeerLink, link)
        inbox.arrived(peer, [message(1), message(2)])
        handed = writer.delivered()
        assert [d.payload for d in handed] == [message(1).payload, message(2).payload]
        assert link.answers == []  # handed from memory: answered once taken
        keys = [(PEER, message(n).id) for n in (1, 2)]
        inbox.stream_acked(stream, [handed[0].receipt])
        inbox.arrived(peer, [message(1)])  # the sender's retry, while the ACK is gathered
        inbox.stream_acked(stream, [handed[1].receipt])
        assert writer.delivered() == []  # not handed over again
        assert link.answers == []
        assert store.seen_among(keys) == set()  # not stored yet
        await answered.wait()  # TAKE_DELAY later: one transaction, one answer for both
        assert link.answers == [([message(1).id, message(2).id], [])]
        assert store.seen_among(keys) == set(keys)
        inbox.arrived(peer, [message(1)])  # a copy now: a duplicate, answered ok
        assert link.answers[-1] == ([message(1).id], [])
        assert writer.delivered() == []
        inbox.close()
        store.close()

    asyncio.run(main())


def test_a_full_batch_of_acks_goes_at_once_and_closing_sends_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbox_module, "TAKE_BATCH", 2)
    monkeypatch.setattr(inbox_module, "TAKE_DELAY", 3600.0)  # never, within this test

    async def main() -> None:
        link = Link()
        inbox, store = make_inbox(tmp_path, link, asyncio.Event())
        writer = Writer()
        stream = LocalStream(cast(asyncio.StreamWriter, writer))
        inbox.stream_opened(stream)
        inbox.subscribe(stream, "t", 100, 1 << 20)
        inbox.arrived(cast(PeerLink, link), [message(n) for n in (1, 2, 3)])
        receipts = [d.receipt for d in writer.delivered()]
        inbox.stream_acked(stream, receipts[:2])  # TAKE_BATCH: stored and answered at once
        assert link.answers == [([message(1).id, message(2).id], [])]
        inbox.stream_acked(stream, receipts[2:])
        assert len(link.answers) == 1
        inbox.close()  # the node stops: what was gathered is stored and answered first
        assert link.answers[-1] == ([message(3).id], [])
        assert store.seen_among([(PEER, message(3).id)]) == {(PEER, message(3).id)}
        store.close()

    asyncio.run(main())
