"""The mesh daemon's durable state: one SQLite database (WAL) in the node's directory.

Tables: ``records`` (membership and room records), ``invites`` (the
inviter's side of each token), ``outbox`` (one row per message and
recipient, until acknowledged), ``inbox`` (received, not yet consumed by the
application), ``seen`` (dedup keys: author and message id, kept past the
message's TTL), ``dead_letters`` (metadata of messages that expired or were
refused), ``peers`` (last time each peer was seen). Every change the
protocol depends on is one transaction, committed before the daemon
answers: the outbox row before ``send`` returns the id, the inbox and dedup
rows before the ACK leaves.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.errors import KeelError
from keel.mesh.delivery import Outgoing
from keel.mesh.invite import InviteRecord
from keel.mesh.membership import Record

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY, at INTEGER NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invites (
    invite_id TEXT PRIMARY KEY, body TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, peer TEXT NOT NULL,
    room TEXT, topic TEXT NOT NULL, expires REAL NOT NULL, created REAL NOT NULL,
    stamp TEXT, payload BLOB NOT NULL, UNIQUE (peer, id));
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, sender TEXT NOT NULL,
    room TEXT, topic TEXT NOT NULL, received REAL NOT NULL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS inbox_by_topic ON inbox (topic, seq);
CREATE TABLE IF NOT EXISTS seen (
    sender TEXT NOT NULL, id TEXT NOT NULL, keep_until REAL NOT NULL,
    PRIMARY KEY (sender, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_age ON seen (keep_until);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, peer TEXT NOT NULL, room TEXT,
    topic TEXT NOT NULL, size INTEGER NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS peers (node TEXT PRIMARY KEY, last_seen REAL NOT NULL);
"""


class StoreError(KeelError):
    """The state database cannot be opened or written."""


@dataclass(frozen=True)
class NewOutgoing:
    id: str
    peer: str
    room: str | None
    topic: str
    expires: float
    stamp: str | None  # JSON of the room stamp, the same for every recipient
    payload: bytes


@dataclass(frozen=True)
class Incoming:
    sender: str  # the author (dedup key with id)
    id: str
    room: str | None
    topic: str
    payload: bytes
    keep_until: float


@dataclass(frozen=True)
class InboxMessage:
    seq: int
    id: str
    sender: str
    room: str | None
    topic: str
    received: float
    payload: bytes


class Store:
    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        try:
            # Messages and invite secrets live here: owner only (the -wal and
            # -shm files SQLite makes take the database file's mode).
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(path, 0o600)
        except OSError as exc:
            raise StoreError(
                f"{path}: cannot create the mesh state database: {exc.strerror}"
            ) from None
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path}: cannot open the mesh state database: {exc} "
                "(a damaged file? move it away to start afresh, losing queued messages)"
            ) from None

    def _migrate(self) -> None:
        self._db.executescript(SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
        elif row[0] != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.path}: state schema version {row[0]}, this keel reads {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot start a transaction: {exc}") from None
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise StoreError(f"{self.path}: commit failed: {exc}") from None

    # -- meta

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- records

    def load_records(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT body FROM records ORDER BY at, id").fetchall()
        return [json.loads(body) for (body,) in rows]

    def add_records(self, records: Iterable[Record]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO records (id, at, body) VALUES (?, ?, ?)",
                [(r.id, r.at, json.dumps(r.to_json(), sort_keys=True)) for r in records],
            )

    def replace_records(self, records: Iterable[Record], mesh_id: str) -> None:
        """Adopt another mesh's records (a fresh node joining); one transaction."""
        with self.transaction() as db:
            db.execute("DELETE FROM records")
            db.executemany(
                "INSERT INTO records (id, at, body) VALUES (?, ?, ?)",
                [(r.id, r.at, json.dumps(r.to_json(), sort_keys=True)) for r in records],
            )
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('mesh', ?)", (mesh_id,))

    # -- invites

    def add_invite(self, record: InviteRecord, created: float) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO invites (invite_id, body, created) VALUES (?, ?, ?)",
                (record.invite_id.hex(), json.dumps(record.to_json()), created),
            )

    def get_invite(self, invite_id: bytes) -> InviteRecord | None:
        row = self._db.execute(
            "SELECT body FROM invites WHERE invite_id = ?", (invite_id.hex(),)
        ).fetchone()
        return None if row is None else InviteRecord.from_json(json.loads(row[0]))

    def redeem_invite(self, record: InviteRecord, join: Record) -> None:
        """Count a use down and store the join record it produced, together."""
        with self.transaction() as db:
            db.execute(
                "UPDATE invites SET body = ? WHERE invite_id = ?",
                (json.dumps(record.to_json()), record.invite_id.hex()),
            )
            db.execute(
                "INSERT OR IGNORE INTO records (id, at, body) VALUES (?, ?, ?)",
                (join.id, join.at, json.dumps(join.to_json(), sort_keys=True)),
            )

    def prune_invites(self, wall: float) -> int:
        with self.transaction() as db:
            rows = db.execute("SELECT invite_id, body FROM invites").fetchall()
            gone = [i for i, body in rows if json.loads(body)["expires"] <= wall]
            db.executemany("DELETE FROM invites WHERE invite_id = ?", [(i,) for i in gone])
        return len(gone)

    # -- outbox

    def enqueue(self, items: Sequence[NewOutgoing], created: float) -> list[Outgoing | None]:
        """Store outgoing messages; ``None`` for one already queued (same peer and id)."""
        keys = [(item.peer, item.id) for item in items]
        queued = self._existing("outbox", "peer", keys)
        out: list[Outgoing | None] = []
        rows = []
        with self.transaction() as db:
            (last,) = db.execute(
                "SELECT coalesce(max(seq), 0) FROM "
                "(SELECT seq FROM sqlite_sequence WHERE name = 'outbox' UNION ALL "
                "SELECT max(seq) FROM outbox UNION ALL SELECT max(seq) FROM dead_letters)"
            ).fetchone()
            for item, key in zip(items, keys, strict=True):
                if key in queued:
                    out.append(None)
                    continue
                queued.add(key)
                last += 1
                rows.append(
                    (
                        last,
                        item.id,
                        item.peer,
                        item.room,
                        item.topic,
                        item.expires,
                        created,
                        item.stamp,
                        item.payload,
                    )
                )
                out.append(
                    Outgoing(
                        last,
                        item.id,
                        item.peer,
                        item.topic,
                        item.room,
                        item.expires,
                        len(item.payload),
                    )
                )
            db.executemany(
                "INSERT INTO outbox (seq, id, peer, room, topic, expires, created, stamp, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return out

    def _existing(
        self, table: str, column: str, keys: Sequence[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        """Which ``(column, id)`` pairs are in ``table`` (outbox: peer; seen: sender)."""
        found: set[tuple[str, str]] = set()
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 400):
            chunk = unique[start : start + 400]
            marks = ", ".join("(?, ?)" for _ in chunk)
            rows = self._db.execute(
                f"SELECT {column}, id FROM {table} WHERE ({column}, id) IN (VALUES {marks})",  # noqa: S608 (fixed names)
                [v for pair in chunk for v in pair],
            ).fetchall()
            found.update((str(a), str(b)) for a, b in rows)
        return found

    def load_outbox(self) -> list[Outgoing]:
        rows = self._db.execute(
            "SELECT seq, id, peer, topic, room, expires, length(payload) FROM outbox ORDER BY seq"
        ).fetchall()
        return [Outgoing(*row) for row in rows]

    def outbox_payload(self, seq: int) -> tuple[bytes, str | None] | None:
        row = self._db.execute("SELECT payload, stamp FROM outbox WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else (bytes(row[0]), row[1])

    def delivered(self, items: Sequence[Outgoing]) -> None:
        """Acknowledged: drop the rows."""
        with self.transaction() as db:
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(i.seq,) for i in items])

    def dead_letter(self, items: Sequence[Outgoing], reason: str, wall: float) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(i.seq,) for i in items])
            db.executemany(
                "INSERT OR REPLACE INTO dead_letters "
                "(seq, id, peer, room, topic, size, reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(i.seq, i.id, i.peer, i.room, i.topic, i.size, reason, wall) for i in items],
            )

    def dead_letters(self, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT id, peer, room, topic, size, reason, at FROM dead_letters "
            "ORDER BY seq DESC LIMIT ?",
            (limit,),
        ).fetchall()
        keys = ("id", "to", "room", "topic", "size", "reason", "at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # -- inbox

    def is_seen(self, sender: str, message_id: str) -> bool:
        return bool(self._existing("seen", "sender", [(sender, message_id)]))

    def seen_among(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """The ``(author, id)`` pairs of ``keys`` received before (one query per 400)."""
        return self._existing("seen", "sender", keys)

    def receive(self, items: Sequence[Incoming], wall: float) -> list[int]:
        """Store new messages with their dedup keys, atomically; returns their inbox seqs."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO seen (sender, id, keep_until) VALUES (?, ?, ?)",
                [(i.sender, i.id, i.keep_until) for i in items],
            )
            db.executemany(
                "INSERT INTO inbox (id, sender, room, topic, received, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(i.id, i.sender, i.room, i.topic, wall, i.payload) for i in items],
            )
            (last,) = db.execute("SELECT coalesce(max(seq), 0) FROM inbox").fetchone()
        return list(range(last - len(items) + 1, last + 1))

    def inbox_totals(self) -> tuple[int, int]:
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM inbox"
        ).fetchone()
        return int(count), int(size)

    def take(self, topic: str, limit: int, exclude: Iterable[int]) -> list[InboxMessage]:
        """The oldest ``limit`` messages on ``topic`` whose seq is not in ``exclude``."""
        excluded = set(exclude)
        out: list[InboxMessage] = []
        after = 0
        while len(out) < limit:
            rows = self._db.execute(
                "SELECT seq, id, sender, room, topic, received, payload FROM inbox "
                "WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?",
                (topic, after, limit + len(excluded)),
            ).fetchall()
            if not rows:
                break
            for row in rows:
                after = row[0]
                if row[0] not in excluded:
                    out.append(
                        InboxMessage(row[0], row[1], row[2], row[3], row[4], row[5], bytes(row[6]))
                    )
                    if len(out) == limit:
                        break
        return out

    def consume(self, seqs: Iterable[int]) -> list[tuple[int, int]]:
        """Delete consumed messages; returns (seq, size) of those that were there."""
        unique = list(dict.fromkeys(seqs))
        gone: list[tuple[int, int]] = []
        with self.transaction() as db:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ", ".join("?" for _ in chunk)
                gone += db.execute(
                    f"DELETE FROM inbox WHERE seq IN ({marks}) RETURNING seq, length(payload)",  # noqa: S608
                    chunk,
                ).fetchall()
        return [(int(a), int(b)) for a, b in gone]

    def prune_seen(self, wall: float) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM seen WHERE keep_until < ?", (wall,)).rowcount

    # -- peers

    def touch_peers(self, peers: Iterable[str], wall: float) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO peers (node, last_seen) VALUES (?, ?)",
                [(p, wall) for p in peers],
            )

    def last_seen(self) -> dict[str, float]:
        return dict(self._db.execute("SELECT node, last_seen FROM peers"))
