"""The daemon's SQLite state."""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from keel.mesh import store as store_module
from keel.mesh.delivery import Envelope, Incoming, OutboxRow
from keel.mesh.identity import NodeIdentity
from keel.mesh.invite import InviteRecord, new_invite
from keel.mesh.membership import Membership, SignedRecord
from keel.mesh.packets import RoomStamp
from keel.mesh.store import StateError, Store

from .conftest import seeded

P, Q = "p" * 32, "q" * 32


def out(message_id: str, peer: str = P, payload: bytes = b"data") -> OutboxRow:
    return OutboxRow(message_id, peer, None, "t", 2e9, None, payload)


def test_outbox_rows_survive_reopening_and_duplicates_are_ignored(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    first = store.enqueue([out("1" * 32), out("2" * 32), out("1" * 32, Q)], created=1.0)
    assert all(item is not None for item in first)
    again = store.enqueue([out("1" * 32)], created=2.0)
    assert again == [None]
    store.close()
    store = Store(tmp_path / "s.db")
    loaded = store.load_outbox()
    assert [(i.id[0], i.peer) for i in loaded] == [("1", P), ("2", P), ("1", Q)]
    assert store.outbox_payload(loaded[0].seq) == Envelope(b"data", None)
    store.delivered(loaded[:1])
    store.touch_peers([P], wall=5.0)
    store.dead_letter(loaded[1:2], "expired", wall=6.0)
    assert [i.seq for i in store.load_outbox()] == [loaded[2].seq]
    assert store.dead_letters() == [
        {
            "id": "2" * 32,
            "to": P,
            "agent": None,
            "to_agent": None,
            "room": None,
            "topic": "t",
            "size": 4,
            "reason": "expired",
            "at": 6.0,
        }
    ]
    assert store.last_seen() == {P: 5.0}


def test_a_room_stamp_is_stored_once_per_message_in_the_form_older_keels_wrote(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    stamp = RoomStamp("r" * 32, P, 3, bytes(range(64)))
    rows = [OutboxRow("1" * 32, peer, "r" * 32, "t", 2e9, stamp, b"x") for peer in (P, Q)]
    queued = store.enqueue(rows, created=1.0)
    assert [store.outbox_payload(item.seq) for item in queued if item] == [
        Envelope(b"x", stamp)
    ] * 2
    store.close()
    with sqlite3.connect(tmp_path / "s.db") as db:
        texts = [json.loads(text) for (text,) in db.execute("SELECT stamp FROM outbox")]
    assert (
        texts
        == [
            {
                "room": "r" * 32,
                "from": P,
                "rv": 3,
                "sig": base64.b64encode(bytes(range(64))).decode(),
            }
        ]
        * 2
    )


def test_inbox_dedup_take_and_consume(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    seqs = store.receive(
        [
            Incoming(P, f"{i:032x}", None, "t" if i % 2 else "u", b"x" * i, 100.0)
            for i in range(1, 6)
        ],
        wall=1.0,
    )
    assert store.seen_among([(P, f"{1:032x}"), (Q, f"{1:032x}")]) == {(P, f"{1:032x}")}
    with pytest.raises(StateError, match="UNIQUE constraint failed"):
        store.receive([Incoming(P, f"{1:032x}", None, "t", b"", 100.0)], wall=1.0)
    assert store.inbox_totals() == (5, 15)
    taken = store.take("t", 10, exclude=[seqs[0]])
    assert [m.payload for m in taken] == [b"xxx", b"xxxxx"]
    assert [m.seq for m in store.take("t", 1, exclude=[])] == [seqs[0]]
    assert store.consume([seqs[0], seqs[0], 999]) == [(seqs[0], 1)]
    assert store.inbox_totals() == (4, 14)
    assert store.prune_seen(wall=50.0) == 0
    assert store.prune_seen(wall=150.0) == 5


def test_dedup_lookups_walk_the_index(tmp_path: Path) -> None:
    """``seen`` keeps a week of ids: a lookup that scanned it would grow with it."""
    store = Store(tmp_path / "s.db")
    store.receive([Incoming(P, f"{i:032x}", None, "t", b"", 1e10) for i in range(50)], wall=1.0)
    store.enqueue([out(f"{i:032x}") for i in range(5)], created=1.0)
    keys = [(P, f"{i:032x}") for i in range(45, 55)] + [(Q, f"{1:032x}")]
    assert store.seen_among(keys) == {(P, f"{i:032x}") for i in range(45, 50)}
    assert store.enqueue([out(f"{i:032x}") for i in range(3, 7)], created=2.0)[:2] == [None, None]
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)  # the SQL with its parameters filled in
    store.seen_among(keys)
    store.enqueue([out(f"{i:032x}") for i in range(3, 7)], created=3.0)
    store._db.set_trace_callback(None)
    lookups = [sql for sql in statements if sql.startswith("SELECT") and " id IN (" in sql]
    # seen for P (45 to 49 only: 50 to 54 are above P's highest stored id, Q has none), outbox
    assert len(lookups) == 2
    assert "'00000000000000000000000000000050'" not in lookups[0]
    for sql in lookups:
        plan = [row[3] for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}")]
        assert plan, sql
        assert all(step.startswith("SEARCH") for step in plan), (sql, plan)


def test_ids_above_an_authors_highest_stored_one_are_new_without_a_lookup(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)

    def lookups() -> list[str]:
        found = [sql for sql in statements if " id IN (" in sql]
        statements.clear()
        return found

    def key(i: int, author: str = P) -> tuple[str, str]:
        return (author, f"{i:032x}")

    assert store.seen_among([key(5), key(6)]) == set()  # P has no stored id: none looked up
    assert lookups() == []
    store.receive([Incoming(P, f"{i:032x}", None, "t", b"", 1e10) for i in (5, 6)], wall=1.0)
    store.mark_seen([(P, f"{9:032x}", 1e10), (Q, f"{3:032x}", 1e10)])
    assert lookups() == []
    # 5, 6 and 9 are below or at the ceiling (9): looked up and found; 10 is above it
    assert store.seen_among([key(5), key(9), key(7), key(10)]) == {key(5), key(9)}
    assert len(lookups()) == 1
    assert store.seen_among([key(3, Q), key(4, Q), key(2, Q)]) == {key(3, Q)}
    assert len(lookups()) == 1
    assert store.prune_seen(wall=2e10) == 4  # pruned: the ceiling stays, lookups say "new"
    assert store.seen_among([key(9), key(10)]) == set()
    store._db.set_trace_callback(None)
    store.mark_seen([(P, f"{20:032x}", 1e10)])
    store.close()
    reopened = Store(tmp_path / "s.db")  # the ceiling is read again from the table
    assert reopened.seen_among([key(20), key(21), key(19)]) == {key(20)}


def test_records_and_invites(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    alice, bob = NodeIdentity.generate(seeded("a")), NodeIdentity.generate(seeded("b"))
    mesh = Membership.found(alice, [], 1000)
    store.replace_records(mesh.records(), mesh.mesh_id)
    assert store.get_meta("mesh") == mesh.mesh_id
    token = new_invite(alice, ["127.0.0.1:1"], now=time.time(), ttl=60, uses=2)
    store.add_invite(InviteRecord.from_token(token), created=1.0)
    record = store.get_invite(token.invite_id)
    assert record is not None
    assert record.uses_left == 2
    join = SignedRecord.make(alice, "join", 1001, node=bob.record().to_json(), addrs=[])
    store.redeem_invite(record.redeem(time.time()), join)
    again = store.get_invite(token.invite_id)
    assert again is not None
    assert again.uses_left == 1
    assert [SignedRecord.from_json(r).id for r in store.load_records()] == [
        mesh.genesis.id,
        join.id,
    ]
    assert store.prune_invites(wall=time.time() + 3600) == 1
    assert store.get_invite(token.invite_id) is None


def test_a_damaged_or_foreign_database_is_refused_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="cannot open the mesh state database"):
        Store(bad)
    newer = tmp_path / "newer.db"
    Store(newer).close()
    db = sqlite3.connect(newer)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="schema version 99"):
        Store(newer)


def test_invite_record_json_round_trip() -> None:
    alice = NodeIdentity.generate(seeded("a"))
    token = new_invite(alice, ["127.0.0.1:1"], now=0, ttl=60)
    record = InviteRecord.from_token(token)
    assert InviteRecord.from_json(record.to_json()) == record


def test_the_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.enqueue([out("1" * 32)], created=1.0)
    for name in ("s.db", "s.db-wal"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    store.close()


def test_the_checkpoint_thread_copies_the_log_and_stops_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_BYTES", 1)
    path = tmp_path / "s.db"
    store = Store(path)
    before = path.stat().st_size
    store.enqueue([out(f"{1:032x}", payload=b"x" * 200_000)], created=1.0)
    deadline = time.monotonic() + 30
    while path.stat().st_size <= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.stat().st_size > before  # the row reached the database file itself
    for _ in range(20):  # pokes in flight, then close straight away
        store.touch_peers([P], wall=1.0)
    store.close()
    assert not store._checkpointer._thread.is_alive()
    reopened = Store(path)
    assert [i.id for i in reopened.load_outbox()] == [f"{1:032x}"]
    reopened.close()


def test_outbox_seqs_only_grow_and_a_batch_may_repeat_itself(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    first = store.enqueue([out(f"{1:032x}"), out(f"{2:032x}")], created=1.0)
    twice = store.enqueue([out(f"{3:032x}"), out(f"{3:032x}"), out(f"{2:032x}")], created=1.0)
    assert twice[1:] == [None, None]  # the same message twice in a batch, and one queued before
    assert twice[0] is not None
    seqs = [i.seq for i in first if i] + [twice[0].seq]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 3
    store.dead_letter([i for i in first if i], "expired", wall=2.0)
    store.delivered([twice[0]])
    store.close()
    reopened = Store(tmp_path / "s.db")  # the outbox is empty now: seqs still never come back
    (later,) = reopened.enqueue([out(f"{4:032x}")], created=3.0)
    assert later is not None
    assert later.seq > max(seqs)
    reopened.close()


def test_every_failure_of_the_database_is_a_state_error_naming_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.close()
    for call in (
        lambda: store.enqueue([out("1" * 32)], created=1.0),
        lambda: store.take("t", 10, ()),
        lambda: store.seen_among([(P, "1" * 32)]),
    ):
        with pytest.raises(StateError, match=str(tmp_path / "s.db")):
            call()


def test_agents_travel_with_a_message_and_each_reader_takes_its_own(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    row = OutboxRow("1" * 32, P, None, "t", 2e9, None, b"x", "scout", "notes")
    (queued,) = store.enqueue([row], created=1.0)
    assert queued is not None
    assert store.outbox_payload(queued.seq) == Envelope(b"x", None, "scout", "notes")
    store.receive(
        [
            Incoming(P, "a" * 32, None, "t", b"to notes", 2e9, "scout", "notes"),
            Incoming(P, "b" * 32, None, "t", b"to ops", 2e9, None, "ops"),
            Incoming(P, "c" * 32, None, "t", b"to the topic", 2e9, "scout", None),
        ],
        wall=3.0,
    )

    def taken(reader: str | None) -> list[tuple[bytes, str | None]]:
        return [(m.payload, m.agent) for m in store.take("t", 10, (), reader)]

    assert taken("notes") == [(b"to notes", "scout"), (b"to the topic", "scout")]
    assert taken("ops") == [(b"to ops", None), (b"to the topic", "scout")]
    assert taken(None) == [(b"to the topic", "scout")]  # the node: what is for no agent


def test_an_agent_acknowledges_only_what_is_for_no_agent_or_for_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    seqs = store.receive(
        [
            Incoming(P, "a" * 32, None, "t", b"to notes", 2e9, "scout", "notes"),
            Incoming(P, "b" * 32, None, "t", b"to ops", 2e9, None, "ops"),
            Incoming(P, "c" * 32, None, "t", b"to the topic", 2e9, "scout", None),
        ],
        wall=3.0,
    )
    every = lambda topic: True  # noqa: E731
    # ops, whose grant covers the topic, may not delete notes' message by its receipt
    assert store.consume(seqs, every, reader="ops") == [(seqs[1], 6), (seqs[2], 12)]
    assert store.consume(seqs, every, reader="ops") == []
    assert store.consume(seqs, every, reader="notes") == [(seqs[0], 8)]


def test_a_readers_receive_from_bounds_take_consume_and_names_who_was_kept_back(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    row = OutboxRow("1" * 32, P, None, "t", 2e9, None, b"x", "scout", "notes")
    (queued,) = store.enqueue([row], created=1.0)
    assert queued is not None
    assert (queued.agent, queued.to) == ("scout", "notes")  # for the ledger's batches
    assert [(q.agent, q.to) for q in store.load_outbox()] == [("scout", "notes")]
    seqs = store.receive(
        [
            Incoming(P, "a" * 32, None, "t", b"scout of p", 2e9, "scout", None),
            Incoming(P, "b" * 32, None, "t", b"p itself", 2e9, None, None),
            Incoming(Q, "c" * 32, None, "t", b"scout of q", 2e9, "scout", None),
            Incoming(Q, "d" * 32, None, "t", b"ops of q", 2e9, "ops", None),
        ],
        wall=3.0,
    )

    def taken(senders: list[str] | None) -> list[bytes]:
        return [m.payload for m in store.take("t", 10, (), "picky", senders)]

    everything = [b"scout of p", b"p itself", b"scout of q", b"ops of q"]
    assert taken(None) == taken(["*"]) == everything
    assert taken([]) == []
    assert taken([P]) == [b"scout of p", b"p itself"]
    assert taken([f"*@{P}", f"ops@{Q}"]) == [b"scout of p", b"ops of q"]
    assert taken([f"scout@{Q}"]) == [b"scout of q"]
    assert store.refused_senders("t", "picky", [f"scout@{Q}"]) == [
        (P, None),
        (P, "scout"),
        (Q, "ops"),
    ]
    assert store.refused_senders("t", "picky", ["*"]) == []
    # an acknowledgement deletes only what the reader may read
    gone = store.consume(seqs, None, [f"scout@{Q}"])
    assert [seq for seq, _ in gone] == [seqs[2]]
    assert len(store.consume(seqs)) == 3


def test_a_schema_1_database_gains_the_agents_columns_and_keeps_its_messages(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as db:  # what keel wrote before agents were named
        db.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema', '1');
            CREATE TABLE outbox (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, peer TEXT NOT NULL,
                room TEXT, topic TEXT NOT NULL, expires REAL NOT NULL, created REAL NOT NULL,
                stamp TEXT, payload BLOB NOT NULL, UNIQUE (peer, id));
            CREATE TABLE inbox (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, sender TEXT NOT NULL,
                room TEXT, topic TEXT NOT NULL, received REAL NOT NULL, payload BLOB NOT NULL);
            """
        )
        db.execute(
            "INSERT INTO outbox (id, peer, topic, expires, created, payload) "
            "VALUES (?, ?, 't', 2e9, 1, x'6f6c64')",
            ("1" * 32, P),
        )
        db.execute(
            "INSERT INTO inbox (id, sender, topic, received, payload) "
            "VALUES (?, ?, 't', 1, x'6f6c64')",
            ("2" * 32, P),
        )
    store = Store(path)
    (queued,) = store.load_outbox()
    assert store.outbox_payload(queued.seq) == Envelope(b"old", None)
    assert [(m.payload, m.agent, m.to) for m in store.take("t", 10, ())] == [(b"old", None, None)]
    assert store.get_meta("schema") == "4"
    store.close()
    Store(path).close()  # and opens again as schema 4


# ---------------------------------------------------------------- large payloads (keel.mesh.blobs)

BIG = bytes(range(256)) * 256  # 64 KiB


def blob_dir(path: Path) -> Path:
    return path.with_name(path.name + "-blobs")


def segments(path: Path) -> list[str]:
    return sorted(p.name for p in blob_dir(path).iterdir() if p.name.isdigit())


def test_a_large_payload_is_written_once_to_a_blob_file_and_read_back_after_reopening(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    room = OutboxRow("1" * 32, P, None, "t", 2e9, None, BIG)  # one message, two recipients
    first, second = store.enqueue([room, room._replace(peer=Q), out("2" * 32)], created=1.0)[:2]
    assert first is not None
    assert second is not None
    assert first.size == len(BIG)
    assert [(blob_dir(path) / name).stat().st_size for name in segments(path)] == [len(BIG)]
    with sqlite3.connect(path) as db:  # the rows name the file; the small one holds its payload
        rows = db.execute("SELECT length(payload), blob_size FROM outbox ORDER BY seq").fetchall()
    assert rows == [(0, len(BIG)), (0, len(BIG)), (4, None)]
    store.close()
    store = Store(path)
    loaded = store.load_outbox()
    assert [i.size for i in loaded] == [len(BIG), len(BIG), 4]
    assert store.outbox_payload(loaded[1].seq) == Envelope(BIG, None)
    store.delivered(loaded[:1])
    assert segments(path) != []  # the other recipient's row still names it
    store.close()


def test_blob_segments_go_once_no_row_names_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("keel.mesh.blobs.SEGMENT_BYTES", len(BIG))  # a segment per batch
    monkeypatch.setattr("keel.mesh.blobs.SPARE_SEGMENTS", 0)  # none kept to be written over
    path = tmp_path / "s.db"
    store = Store(path)
    queued = [store.enqueue([out(f"{n:032x}", payload=BIG)], created=1.0)[0] for n in range(3)]
    assert queued[0] is not None
    assert queued[1] is not None
    assert len(segments(path)) == 3
    store.delivered([queued[0]])  # (older segment, no row left: deleted)
    store.dead_letter([queued[1]], "expired", wall=2.0)
    assert len(segments(path)) == 1
    store.close()
    (blob_dir(path) / "99").write_bytes(b"left by a crash between a commit and an unlink")
    store = Store(path)
    assert len(segments(path)) == 1
    (last,) = store.load_outbox()
    assert store.outbox_payload(last.seq) == Envelope(BIG, None)
    store.delivered([last])
    store.enqueue([out("a" * 32, payload=BIG)], created=3.0)  # a new segment...
    assert len(segments(path)) == 1  # ...and the old one, empty, is gone
    store.close()


@pytest.mark.parametrize("full", [False, True])
def test_emptied_segments_are_written_over_not_deleted_and_made_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full: bool
) -> None:
    monkeypatch.setattr("keel.mesh.blobs.SEGMENT_BYTES", len(BIG))  # a segment per batch
    path = tmp_path / "s.db"
    store = Store(path, synchronous="FULL" if full else "NORMAL")
    queued = [store.enqueue([out(f"{n:032x}", payload=BIG)], created=1.0)[0] for n in range(4)]
    assert all(q is not None for q in queued)
    inodes = {name: (blob_dir(path) / name).stat().st_ino for name in segments(path)}
    assert list(inodes) == ["1", "2", "3", "4"]
    store.delivered([q for q in queued[:3] if q is not None])  # 1, 2 kept as spares, 3 deleted
    assert segments(path) == ["1", "2", "4"]
    other = bytes(reversed(BIG))
    again = [store.enqueue([out(f"{n:032x}", payload=other)], created=2.0)[0] for n in (5, 6)]
    # segments 5 and 6 are the spares renamed (their inodes), written over from the start
    assert segments(path) == ["4", "5", "6"]
    assert {(blob_dir(path) / n).stat().st_ino for n in ("5", "6")} == {inodes["1"], inodes["2"]}
    for item in again:
        assert item is not None
        assert store.outbox_payload(item.seq) == Envelope(other, None)
    store.enqueue([out("7" * 32, payload=BIG)], created=3.0)  # no spare left: a new file
    live = {(blob_dir(path) / n).stat().st_ino for n in ("4", "5", "6")}
    assert (blob_dir(path) / "7").stat().st_ino not in live
    store.delivered([q for q in again if q is not None])  # 5 and 6 are spares again
    assert segments(path) == ["4", "5", "6", "7"]
    store.close()  # the spares go with a clean close
    assert segments(path) == ["4", "7"]
    store = Store(path)
    assert [store.outbox_payload(i.seq) for i in store.load_outbox()] == [
        Envelope(BIG, None),
        Envelope(BIG, None),
    ]
    store.close()


def test_segments_held_by_a_few_waiting_messages_are_compacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that is down keeps one message in each segment; the rest were delivered."""
    monkeypatch.setattr("keel.mesh.blobs.SEGMENT_BYTES", 4 * len(BIG))  # four payloads each
    monkeypatch.setattr("keel.mesh.blobs.SPARE_SEGMENTS", 0)
    path = tmp_path / "s.db"
    store = Store(path, synchronous="NORMAL")
    waiting = {}
    for n in range(6):  # six segments: one payload for P (down), three for Q (delivered)
        payload = bytes([n]) * len(BIG)
        batch = [out(f"{n:030x}00", P, payload)] + [
            out(f"{n:030x}{k:02x}", Q, bytes([n, k]) * (len(BIG) // 2)) for k in range(1, 4)
        ]
        queued = store.enqueue(batch, created=1.0)
        waiting[queued[0].seq] = payload  # type: ignore[union-attr]
        store.delivered([q for q in queued[1:] if q is not None])
    # each new segment moved the sparse ones' payloads forward: not six files of four
    assert len(segments(path)) <= 3
    for seq, payload in waiting.items():
        assert store.outbox_payload(seq) == Envelope(payload, None)
    store.close()
    store = Store(path)  # the rows name the new places after reopening too
    assert {q.seq: store.outbox_payload(q.seq) for q in store.load_outbox()} == {
        seq: Envelope(payload, None) for seq, payload in waiting.items()
    }
    store.delivered(store.load_outbox())
    store.close()


def test_a_compaction_cut_short_leaves_every_row_naming_its_payload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("keel.mesh.blobs.SEGMENT_BYTES", 4 * len(BIG))
    monkeypatch.setattr("keel.mesh.blobs.SPARE_SEGMENTS", 0)
    path = tmp_path / "s.db"
    store = Store(path, synchronous="NORMAL")
    real = store.transaction
    calls = {"n": 0}

    def failing() -> Any:
        calls["n"] += 1
        if calls["n"] % 3 == 0:  # every third transaction fails (some are compactions)
            raise StateError("injected")
        return real()

    monkeypatch.setattr(store, "transaction", failing)
    waiting = {}
    for n in range(8):
        payload = bytes([n + 1]) * len(BIG)
        try:
            queued = store.enqueue(
                [out(f"{n:030x}00", P, payload)]
                + [
                    out(f"{n:030x}{k:02x}", Q, bytes([n, k]) * (len(BIG) // 2)) for k in range(1, 4)
                ],
                created=1.0,
            )
        except StateError:
            continue
        waiting[queued[0].seq] = payload  # type: ignore[union-attr]
        with contextlib.suppress(StateError):
            store.delivered([q for q in queued[1:] if q is not None])
    monkeypatch.setattr(store, "transaction", real)
    for seq, payload in waiting.items():
        assert store.outbox_payload(seq) == Envelope(payload, None)
    store.close()
    store = Store(path)
    for seq, payload in waiting.items():
        assert store.outbox_payload(seq) == Envelope(payload, None)
    store.close()


def crashed(path: Path, seq: int, *, boot: str, full: bool = False) -> None:
    """As if the daemon had stopped without closing the store, ``seq``'s payloads synced."""
    record = {"boot": boot, "seq": seq, "clean": False, "full": full}
    (blob_dir(path) / "synced").write_text(json.dumps(record))


def test_after_a_host_crash_payloads_not_yet_on_disk_become_dead_letters(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    kept, lost = store.enqueue(
        [out("1" * 32, payload=BIG), out("2" * 32, payload=BIG + b"!")._replace(agent="scout")],
        created=1.0,
    )
    small = store.enqueue([out("3" * 32)], created=1.0)[0]
    assert kept is not None
    assert lost is not None
    assert small is not None
    store.close()
    crashed(path, kept.seq, boot="another boot")
    store = Store(path)
    assert [i.id[0] for i in store.load_outbox()] == ["1", "3"]  # small payloads are in SQLite
    assert store.outbox_payload(kept.seq) == Envelope(BIG, None)
    [dead] = store.dead_letters()
    assert (dead["id"], dead["size"], dead["agent"]) == ("2" * 32, len(BIG) + 1, "scout")
    assert "host crash" in dead["reason"]
    assert store.dead_letters(agent="ops") == []
    store.close()


@pytest.mark.parametrize("same_boot", [True, False])
def test_a_daemon_crash_or_full_durability_loses_no_payload(
    tmp_path: Path, same_boot: bool
) -> None:
    from keel.mesh.blobs import boot_id

    path = tmp_path / "s.db"
    store = Store(path, synchronous="NORMAL" if same_boot else "FULL")
    store.enqueue([out("1" * 32, payload=BIG)], created=1.0)
    store.close()
    crashed(path, 0, boot=boot_id() if same_boot else "another boot", full=not same_boot)
    store = Store(path)
    (queued,) = store.load_outbox()
    assert store.outbox_payload(queued.seq) == Envelope(BIG, None)
    assert store.dead_letters() == []
    store.close()


def test_a_row_whose_blob_file_is_gone_is_a_dead_letter(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    store.enqueue([out("1" * 32, payload=BIG)], created=1.0)
    store.close()
    for name in segments(path):
        (blob_dir(path) / name).unlink()
    store = Store(path)
    assert store.load_outbox() == []
    assert [d["id"] for d in store.dead_letters()] == ["1" * 32]
    store.close()


def test_a_schema_2_database_gains_the_blob_columns_and_keeps_its_messages(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    store.enqueue([out("1" * 32)], created=1.0)
    store.close()
    with sqlite3.connect(path) as db:  # back to what schema 2 was
        for column in ("blob", "blob_at", "blob_size"):
            db.execute(f"ALTER TABLE outbox DROP COLUMN {column}")
        db.execute("DROP INDEX dead_letters_by_agent")
        for column in ("agent", "to_agent"):
            db.execute(f"ALTER TABLE dead_letters DROP COLUMN {column}")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    store = Store(path)
    (queued,) = store.load_outbox()
    assert store.outbox_payload(queued.seq) == Envelope(b"data", None)
    assert store.get_meta("schema") == "4"
    store.enqueue([out("2" * 32, payload=BIG)], created=2.0)
    store.close()
    Store(path).close()  # and opens again as schema 4


def test_a_reader_takes_and_acknowledges_only_the_rooms_it_is_in(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    seqs = store.receive(
        [
            Incoming(P, "a" * 32, "r" * 32, "t", b"in room r", 2e9, "scout", None),
            Incoming(P, "b" * 32, "s" * 32, "t", b"in room s", 2e9, None, None),
            Incoming(P, "c" * 32, None, "t", b"direct", 2e9, None, None),
        ],
        wall=3.0,
    )

    def in_r(room: str) -> bool:
        return room == "r" * 32

    assert [m.payload for m in store.take("t", 10, (), "notes", rooms=in_r)] == [
        b"in room r",
        b"direct",
    ]
    assert len(store.take("t", 10, (), None)) == 3  # the node reads every room
    # an acknowledgement of a room message of another room deletes nothing
    assert store.consume([seqs[1]], lambda topic: True, rooms=in_r) == []
    assert store.consume(seqs, lambda topic: True, rooms=in_r) == [(seqs[0], 9), (seqs[2], 6)]
    assert store.consume([seqs[1]]) == [(seqs[1], 9)]


def test_a_schema_3_database_gains_the_dead_letters_agents_and_keeps_its_dead_letters(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    (queued,) = store.enqueue([out("1" * 32)], created=1.0)
    assert queued is not None
    store.dead_letter([queued], "expired", wall=2.0)
    store.close()
    with sqlite3.connect(path) as db:  # back to what schema 3 was
        db.execute("DROP INDEX dead_letters_by_agent")
        for column in ("agent", "to_agent"):
            db.execute(f"ALTER TABLE dead_letters DROP COLUMN {column}")
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    store = Store(path)
    assert store.get_meta("schema") == "4"
    (old,) = store.dead_letters()
    assert (old["id"], old["agent"], old["to_agent"], old["reason"]) == (
        "1" * 32, None, None, "expired",
    )  # fmt: skip
    assert store.dead_letters(agent="scout") == []
    (new,) = store.enqueue([out("2" * 32)._replace(agent="scout", to="notes")], created=3.0)
    assert new is not None
    store.dead_letter([new], "rejected: no agent notes on this node", wall=4.0)
    assert [(d["id"][0], d["agent"], d["to_agent"]) for d in store.dead_letters()] == [
        ("2", "scout", "notes"),
        ("1", None, None),
    ]
    store.close()
    Store(path).close()  # and opens again as schema 4


def test_dead_letters_are_kept_up_to_their_limit_the_oldest_going_first(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path, keep_dead_letters=100)
    ids = []
    for start in range(0, 250, 25):  # ten expiries of 25
        rows = [out(f"{n:032x}") for n in range(start, start + 25)]
        queued = [q for q in store.enqueue(rows, created=1.0) if q is not None]
        store.dead_letter(queued, "expired", wall=2.0)
        ids += [r.id for r in rows]
        held = [d["id"] for d in store.dead_letters(10_000)]
        assert len(held) <= 100
        assert held == ids[::-1][: len(held)]  # the newest, newest first
    assert len(held) >= 90  # pruned to nine tenths of the limit, not further
    store.close()
    store = Store(path, keep_dead_letters=50)  # a lower limit applies at the next letter
    queued = [q for q in store.enqueue([out("f" * 32)], created=3.0) if q is not None]
    store.dead_letter(queued, "expired", wall=4.0)
    held = [d["id"] for d in store.dead_letters(10_000)]
    assert held == ["f" * 32, *ids[::-1][:44]]
    store.close()


def test_an_agent_gets_only_the_dead_letters_it_sent_on_its_topics(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    rows = [
        out(f"{n:032x}")._replace(agent=agent, topic=topic)
        for n, (agent, topic) in enumerate(
            [("scout", "jobs"), (None, "jobs"), ("ops", "jobs"), ("scout", "other")] * 200
        )
    ]
    queued = [q for q in store.enqueue(rows, created=1.0) if q is not None]
    store.dead_letter(queued, "expired", wall=2.0)
    everything = store.dead_letters(10_000)
    assert len(everything) == 800  # the node's own callers: all, newest first
    assert everything[0]["id"] == f"{799:032x}"
    mine = store.dead_letters(300, agent="scout", reads=lambda topic: topic == "jobs")
    assert len(mine) == 200  # past the others' and its off-topic ones, up to the limit
    assert {(d["agent"], d["topic"]) for d in mine} == {("scout", "jobs")}
    assert [d["id"] for d in mine] == [f"{n:032x}" for n in range(796, -1, -4)]
    assert len(store.dead_letters(5, agent="scout", reads=lambda t: t == "jobs")) == 5
    assert store.dead_letters(agent="nobody") == []
    store.close()
