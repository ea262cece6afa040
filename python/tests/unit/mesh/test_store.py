"""The daemon's SQLite state, and its settings file."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from keel.errors import ConfigError, UsageError
from keel.mesh.identity import NodeIdentity
from keel.mesh.invite import InviteRecord, new_invite
from keel.mesh.membership import Membership, Record
from keel.mesh.settings import load_settings, parse_listen
from keel.mesh.store import Incoming, NewOutgoing, Store, StoreError

from .conftest import seeded

P, Q = "p" * 32, "q" * 32


def out(message_id: str, peer: str = P, payload: bytes = b"data") -> NewOutgoing:
    return NewOutgoing(message_id, peer, None, "t", 2e9, None, payload)


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
    assert store.outbox_payload(loaded[0].seq) == (b"data", None)
    store.delivered(loaded[:1])
    store.touch_peers([P], wall=5.0)
    store.dead_letter(loaded[1:2], "expired", wall=6.0)
    assert [i.seq for i in store.load_outbox()] == [loaded[2].seq]
    assert store.dead_letters() == [
        {
            "id": "2" * 32,
            "to": P,
            "room": None,
            "topic": "t",
            "size": 4,
            "reason": "expired",
            "at": 6.0,
        }
    ]
    assert store.last_seen() == {P: 5.0}


def test_inbox_dedup_take_and_consume(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    seqs = store.receive(
        [
            Incoming(P, f"{i:032x}", None, "t" if i % 2 else "u", b"x" * i, 100.0)
            for i in range(1, 6)
        ],
        wall=1.0,
    )
    assert store.is_seen(P, f"{1:032x}")
    assert not store.is_seen(Q, f"{1:032x}")
    with pytest.raises(sqlite3.IntegrityError):
        store.receive([Incoming(P, f"{1:032x}", None, "t", b"", 100.0)], wall=1.0)
    assert store.inbox_totals() == (5, 15)
    taken = store.take("t", 10, exclude=[seqs[0]])
    assert [m.payload for m in taken] == [b"xxx", b"xxxxx"]
    assert [m.seq for m in store.take("t", 1, exclude=[])] == [seqs[0]]
    assert store.consume([seqs[0], seqs[0], 999]) == [(seqs[0], 1)]
    assert store.inbox_totals() == (4, 14)
    assert store.prune_seen(wall=50.0) == 0
    assert store.prune_seen(wall=150.0) == 5


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
    join = Record.make(alice, "join", 1001, node=bob.record().to_json(), addrs=[])
    store.redeem_invite(record.redeem(time.time()), join)
    again = store.get_invite(token.invite_id)
    assert again is not None
    assert again.uses_left == 1
    assert [Record.from_json(r).id for r in store.load_records()] == [mesh.genesis.id, join.id]
    assert store.prune_invites(wall=time.time() + 3600) == 1
    assert store.get_invite(token.invite_id) is None


def test_a_damaged_or_foreign_database_is_refused_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the mesh state database"):
        Store(bad)
    newer = tmp_path / "newer.db"
    Store(newer).close()
    db = sqlite3.connect(newer)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(newer)


def test_settings_defaults_overrides_and_errors(tmp_path: Path) -> None:
    assert load_settings(tmp_path).session.handshake_timeout == 10.0
    assert load_settings(tmp_path).durability == "normal"
    (tmp_path / "config.json").write_text(json.dumps({"handshake_timeout": 2, "max_inbox": 5}))
    settings = load_settings(tmp_path)
    assert settings.session.handshake_timeout == 2
    assert settings.inbox.max_messages == 5
    for bad, key in (
        ({"nope": 1}, "nope"),
        ({"idle_timeout": 1, "keepalive_interval": 2}, "idle_timeout"),
        ({"durability": "maybe"}, "durability"),
    ):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=key):
            load_settings(tmp_path)


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:7400") == ("0.0.0.0", 7400)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("7400", "host:7400", "1.2.3.4:x", "1.2.3.4:70000", ":1"):
        with pytest.raises(UsageError, match="--listen"):
            parse_listen(bad)


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
