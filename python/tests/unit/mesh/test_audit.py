"""Message metadata batched into ledger entries (keel.mesh.audit, keel.mesh.audit_log)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.ledger import core
from keel.ledger.recorder import MAX_ENTRY
from keel.mesh.audit import KINDS, MAX_REASON, WINDOW, Entry, Message, MessageBatches, messages
from keel.mesh.audit_log import AuditLog
from keel.testing import FakeClock

ME = "a" * 32
P1 = "b" * 32
P2 = "c" * 32
WALL0 = 1_700_000_000.0


def batches(**options: Any) -> tuple[MessageBatches, FakeClock, FakeClock]:
    mono, wall = FakeClock(100.0), FakeClock(WALL0)
    return MessageBatches(ME, clock=mono, wall=wall, **options), mono, wall


def mid(n: int) -> str:
    return f"{n:032x}"


def add(b: MessageBatches, stage: str, n: int, **fields: Any) -> list[Entry]:
    message: dict[str, Any] = {"peer": P1, "topic": "t", "room": None, "size": 100 + n}
    message.update(fields)
    return b.add(stage, message_id=mid(n), **message)


def test_one_message_waits_for_its_window_then_makes_one_entry() -> None:
    b, mono, wall = batches()
    assert add(b, "sent", 1) == []
    assert len(b) == 1
    assert b.next_deadline() == pytest.approx(100.0 + WINDOW)
    mono.advance(WINDOW / 2)
    assert b.due() == []
    mono.advance(WINDOW / 2)
    wall.advance(0.5)
    (entry,) = b.due()
    assert entry == Entry(
        "sent-batch",
        P1,
        {
            "from": ME,
            "to": P1,
            "count": 1,
            "bytes": 101,
            "first": core.format_ts(WALL0),
            "last": core.format_ts(WALL0),
            "groups": [{"topic": "t", "room": None, "ids": [mid(1)], "sizes": [101]}],
        },
    )
    assert b.next_deadline() is None
    assert len(b) == 0
    assert b.due() == []


def test_a_full_batch_is_an_entry_at_once() -> None:
    b, _, wall = batches(max_messages=3)
    assert add(b, "delivered", 1) == []
    wall.advance(0.02)
    assert add(b, "delivered", 2, topic="u") == []
    wall.advance(0.03)
    (entry,) = add(b, "delivered", 3)
    assert entry.kind == "delivered-batch"
    assert entry.data["count"] == 3
    assert entry.data["bytes"] == 101 + 102 + 103
    assert entry.data["first"] == core.format_ts(WALL0)
    assert entry.data["last"] == core.format_ts(WALL0 + 0.05)
    assert entry.data["groups"] == [
        {"topic": "t", "room": None, "ids": [mid(1), mid(3)], "sizes": [101, 103]},
        {"topic": "u", "room": None, "ids": [mid(2)], "sizes": [102]},
    ]
    assert b.next_deadline() is None
    assert add(b, "delivered", 4) == []  # a new batch with a new window
    assert len(b) == 1


def test_batches_are_per_stage_and_peer_and_received_names_the_sender() -> None:
    b, _, _ = batches()
    add(b, "sent", 1)
    add(b, "sent", 2, peer=P2)
    add(b, "received", 3)
    add(b, "dead-letter", 4, reason="expired")
    add(b, "dead-letter", 5, reason="rejected: busy", room="r1")
    entries = {(e.kind, e.subject): e for e in b.flush()}
    assert set(entries) == {
        ("sent-batch", P1),
        ("sent-batch", P2),
        ("received-batch", P1),
        ("dead-letter-batch", P1),
    }
    received = entries["received-batch", P1].data
    assert (received["from"], received["to"]) == (P1, ME)
    assert (entries["sent-batch", P2].data["from"], entries["sent-batch", P2].data["to"]) == (
        ME,
        P2,
    )
    dead = entries["dead-letter-batch", P1].data["groups"]
    assert dead == [
        {"topic": "t", "room": None, "reason": "expired", "ids": [mid(4)], "sizes": [104]},
        {"topic": "t", "room": "r1", "reason": "rejected: busy", "ids": [mid(5)], "sizes": [105]},
    ]
    assert b.flush() == []
    assert len(b) == 0


def test_messages_lists_each_message_back() -> None:
    b, _, _ = batches()
    add(b, "dead-letter", 1, reason="expired", room="r")
    add(b, "dead-letter", 2, reason="expired", room="r")
    (entry,) = b.flush()
    assert list(messages(entry.kind, entry.data)) == [
        {
            "stage": "dead-letter",
            "id": mid(n),
            "from": ME,
            "to": P1,
            "topic": "t",
            "room": "r",
            "size": 100 + n,
            "reason": "expired",
        }
        for n in (1, 2)
    ]


def test_messages_refuses_what_is_not_a_batch_entry() -> None:
    with pytest.raises(ValueError, match="not a mesh batch entry"):
        list(messages("sent", {"id": mid(1)}))
    with pytest.raises(ValueError, match="malformed received-batch"):
        list(messages("received-batch", {"from": P1, "to": ME}))
    with pytest.raises(ValueError, match="as many ids as sizes"):
        list(
            messages(
                "sent-batch",
                {
                    "from": ME,
                    "to": P1,
                    "groups": [{"topic": "t", "room": None, "ids": [mid(1)], "sizes": []}],
                },
            )
        )


def test_a_long_reason_is_shortened() -> None:
    b, _, _ = batches()
    add(b, "dead-letter", 1, reason="x" * 5000)
    (entry,) = b.flush()
    reason = entry.data["groups"][0]["reason"]
    assert len(reason) == MAX_REASON
    assert reason.endswith("...")


def test_bad_stage_and_bad_options_are_refused() -> None:
    b, _, _ = batches()
    with pytest.raises(ValueError, match="unknown stage 'queued'"):
        add(b, "queued", 1)
    with pytest.raises(ValueError, match="max_messages >= 1"):
        batches(max_messages=0)


def test_wide_groups_stay_under_the_byte_budget() -> None:
    b, _, _ = batches(max_bytes=4096)
    entries: list[Entry] = []
    for n in range(200):  # a new 120-character topic for every message
        entries += add(b, "sent", n, topic=f"{n:03d}" + "x" * 117, room=f"room-{n}")
    entries += b.flush()
    assert len(entries) > 1
    for entry in entries:
        assert len(core.canonical_json(entry.data)) <= 4096
    assert [m["id"] for e in entries for m in messages(e.kind, e.data)] == [
        mid(n) for n in range(200)
    ]


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(sorted(KINDS)),
        st.sampled_from([P1, P2, "d" * 32]),
        st.sampled_from(["t", "topic/" + "y" * 100, "z"]),
        st.sampled_from([None, "r1", "room-" + "q" * 60]),
        st.integers(0, 2**31),
        st.sampled_from([None, "expired", "rejected: " + "é" * 300]),
        st.floats(0, 0.2),
    ),
    max_size=600,
)


@settings(max_examples=60, deadline=None)
@given(EVENTS, st.integers(1, 300), st.integers(1024, 16 * 1024))
def test_every_message_is_in_exactly_one_valid_entry(
    events: list[tuple[str, str, str, str | None, int, str | None, float]],
    max_messages: int,
    max_bytes: int,
) -> None:
    b, mono, wall = batches(max_messages=max_messages, max_bytes=max_bytes)
    entries: list[Entry] = []
    expected: list[dict[str, Any]] = []
    for n, (stage, peer, topic, room, size, why, pause) in enumerate(events):
        reason = why if stage == "dead-letter" else None
        entries += b.add(
            stage, message_id=mid(n), peer=peer, topic=topic, room=room, size=size, reason=reason
        )
        mono.advance(pause)
        wall.advance(pause)
        entries += b.due()
        sender, recipient = (peer, ME) if stage == "received" else (ME, peer)
        message = {"stage": stage, "id": mid(n), "from": sender, "to": recipient,
                   "topic": topic, "room": room, "size": size}  # fmt: skip
        if reason is not None:
            message["reason"] = reason[: MAX_REASON - 3] + "..." if len(reason) > 200 else reason
        expected.append(message)
    entries += b.flush()
    assert len(b) == 0
    found: list[dict[str, Any]] = []
    for entry in entries:
        data: Mapping[str, Any] = entry.data
        assert entry.subject == (data["from"] if entry.kind == "received-batch" else data["to"])
        listed = list(messages(entry.kind, data))
        assert 1 <= data["count"] == len(listed) <= max_messages
        assert data["bytes"] == sum(m["size"] for m in listed)
        assert data["first"] <= data["last"]
        if len(listed) > 1:
            assert len(core.canonical_json(data)) <= max_bytes
        raw = core.make_entry(ts=wall(), source="mesh", kind=entry.kind, subject=entry.subject,
                              data=data)  # fmt: skip
        assert len(raw) <= MAX_ENTRY
        found += listed
    assert sorted(found, key=lambda m: m["id"]) == expected


def test_the_audit_log_records_on_time_and_on_close() -> None:
    recorded: list[tuple[str, str, Mapping[str, Any]]] = []
    arrived = asyncio.Event()

    def record(kind: str, subject: str, data: Mapping[str, Any]) -> None:
        recorded.append((kind, subject, data))
        arrived.set()

    async def scenario() -> None:
        mono, wall = FakeClock(100.0), FakeClock(WALL0)
        log = AuditLog(MessageBatches(ME, clock=mono, wall=wall, window=0.0), record)
        log.add("sent", [(mid(1), P1, "t", None, 1, None, None)])
        assert recorded == []  # not before its window is over (on the loop's next turn)
        await arrived.wait()
        assert [(k, s) for k, s, _ in recorded] == [("sent-batch", P1)]
        full = AuditLog(MessageBatches(ME, clock=mono, wall=wall, max_messages=2), record)
        full.add("received", [(mid(2), P2, "t", None, 1, None, None)])
        full.add("received", [(mid(3), P2, "t", None, 1, None, None)])
        assert len(recorded) == 1  # full, but recorded on the next tick with the others
        full.add("delivered", [(mid(4), P2, "t", None, 1, None, None)])
        full.close()  # the window is not waited for
        assert [(k, d["count"]) for k, _, d in recorded[1:]] == [
            ("received-batch", 2),
            ("delivered-batch", 1),
        ]
        full.close()
        assert len(recorded) == 3
        arrived.clear()
        ticks = AuditLog(MessageBatches(ME, clock=mono, wall=wall, window=0.0, max_messages=1),
                         record)  # fmt: skip
        ticks.add(
            "sent", [(mid(5), P1, "t", None, 1, None, None), (mid(6), P1, "t", None, 1, None, None)]
        )
        assert len(recorded) == 3
        await arrived.wait()  # both full batches, on one tick
        assert [d["groups"][0]["ids"] for _, _, d in recorded[3:]] == [[mid(5)], [mid(6)]]

    asyncio.run(scenario())


def test_add_many_is_add_one_by_one() -> None:
    one, _, _ = batches(max_messages=5, max_bytes=2048)
    many, _, _ = batches(max_messages=5, max_bytes=2048)
    agents = [None, "scout", "ops-agent-with-a-long-name"]
    items: list[Message] = [
        (mid(n), [P1, P2][n % 2], f"t{n % 3}" * 20, None, n, agents[n % 3], agents[n % 2])
        for n in range(40)
    ]
    singly: list[Entry] = []
    for message_id, peer, topic, room, size, agent, to in items:
        singly += one.add(
            "sent",
            message_id=message_id,
            peer=peer,
            topic=topic,
            room=room,
            size=size,
            agent=agent,
            to=to,
        )
    assert many.add_many("sent", items) == singly
    assert many.flush() == one.flush()


def test_an_entry_names_the_agents_that_sent_its_messages() -> None:
    """Which agent sent what: per group (the agent stamped, the agent it is for), and the
    set of sending agents of the entry; messages() lists them back per message."""
    b, _, _ = batches()
    add(b, "sent", 1, agent="scout")
    add(b, "sent", 2, agent="scout", to="notes")
    add(b, "sent", 3)  # the node itself
    add(b, "sent", 4, agent="ops")
    add(b, "sent", 5, agent="scout")
    (entry,) = b.flush()
    assert entry.data["agents"] == ["ops", "scout"]
    assert [(g.get("agent"), g.get("to_agent"), g["ids"]) for g in entry.data["groups"]] == [
        ("scout", None, [mid(1), mid(5)]),
        ("scout", "notes", [mid(2)]),
        (None, None, [mid(3)]),
        ("ops", None, [mid(4)]),
    ]
    listed = {
        m["id"]: (m.get("agent"), m.get("to_agent")) for m in messages(entry.kind, entry.data)
    }
    assert listed == {
        mid(1): ("scout", None),
        mid(2): ("scout", "notes"),
        mid(3): (None, None),
        mid(4): ("ops", None),
        mid(5): ("scout", None),
    }
    # an entry without agents has no "agents" key (as before agents were told apart)
    add(b, "received", 6)
    (plain,) = b.flush()
    assert "agents" not in plain.data
    assert "agent" not in plain.data["groups"][0]


def test_agent_names_keep_an_entry_within_its_size() -> None:
    b, _, _ = batches(max_messages=10_000, max_bytes=1024)
    entries: list[Entry] = []
    for n in range(400):
        entries += add(b, "sent", n, agent=f"agent-{n % 50:02d}-name", to=f"to-{n % 7}")
    entries += b.flush()
    assert sum(e.data["count"] for e in entries) == 400
    for entry in entries:
        assert len(core.canonical_json(entry.data)) <= 1024
