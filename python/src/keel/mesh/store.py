"""The mesh daemon's durable state: one SQLite database (WAL) in the node's directory.

Tables: ``records`` (membership and room records), ``invites`` (the
inviter's side of each token), ``outbox`` (one row per message and
recipient, until acknowledged), ``inbox`` (received, not yet consumed by the
application), ``seen`` (dedup keys: author and message id, kept past the
message's TTL), ``dead_letters`` (metadata of messages that expired or were
refused, with the agent that sent each and the one it was for), ``peers`` (last time each peer was seen). Every change the
protocol depends on is one transaction, committed before the daemon
answers: the outbox row before ``send`` returns the id, the inbox and dedup
rows before the ACK leaves.

Commits append to the write-ahead log; a thread of its own copies the log
into the database (a *checkpoint*, with its fsyncs), so the event loop
never waits for that. New databases use 8 KiB pages (a 64 KiB payload is
eight pages, not sixteen; a small commit still writes little), and deleted rows are zeroed where that costs no
extra I/O (``secure_delete=FAST``: small payloads are wiped in place, the
pages of large ones go to the free list as they are).

Large payloads cost pages, not rows: the page cache is big enough
(``CACHE_BYTES``) to still hold the pages of the messages in flight when
their acknowledgement deletes them (deleting a row walks its overflow
pages, which would otherwise be read back from the file), and the log is
copied only once it holds ``CHECKPOINT_BYTES``: pages freed by
acknowledged messages are reused meanwhile, so one checkpoint copies each
page once however many payloads passed through it (with 8 MiB, each
64 KiB payload was copied about once; with 64 MiB about half as often).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from keel.errors import KeelError
from keel.mesh import blobs as blob_files
from keel.mesh.blobs import BLOB_MIN, BlobFiles
from keel.mesh.delivery import Envelope, InboxMessage, Incoming, OutboxRow, Queued
from keel.mesh.invite import InviteRecord
from keel.mesh.membership import SignedRecord
from keel.mesh.packets import RoomStamp

log = logging.getLogger("keel.mesh")

SCHEMA_VERSION = 4  # 2: agent and to_agent in outbox and inbox; 3: blob columns; 4: agent and
# to_agent in dead_letters (each migrated from the one before)
SEEN_CEILINGS = 4096  # authors whose highest stored dedup id is remembered (seen_among)
PAGE_SIZE = 8192  # new databases only; an existing file keeps its own
CHECKPOINT_BYTES = 64 << 20  # the checkpoint thread copies the log once it is this big
CHECKPOINT_DELAY = 0.02  # s between two looks at the log's size
WAL_SIZE_LIMIT = 128 << 20  # a log reset after a burst is truncated to this
CACHE_BYTES = 32 << 20  # SQLite's page cache, at most (it grows only as pages are used)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY, at INTEGER NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invites (
    invite_id TEXT PRIMARY KEY, body TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, peer TEXT NOT NULL,
    room TEXT, topic TEXT NOT NULL, expires REAL NOT NULL, created REAL NOT NULL,
    stamp TEXT, payload BLOB NOT NULL, agent TEXT, to_agent TEXT,
    blob INTEGER, blob_at INTEGER, blob_size INTEGER, UNIQUE (peer, id));
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, sender TEXT NOT NULL,
    room TEXT, topic TEXT NOT NULL, received REAL NOT NULL, payload BLOB NOT NULL,
    agent TEXT, to_agent TEXT);
CREATE INDEX IF NOT EXISTS inbox_by_topic ON inbox (topic, seq);
CREATE TABLE IF NOT EXISTS seen (
    sender TEXT NOT NULL, id TEXT NOT NULL, keep_until REAL NOT NULL,
    PRIMARY KEY (sender, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_age ON seen (keep_until);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, peer TEXT NOT NULL, room TEXT,
    topic TEXT NOT NULL, size INTEGER NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL,
    agent TEXT, to_agent TEXT);
CREATE INDEX IF NOT EXISTS dead_letters_by_agent ON dead_letters (agent, seq);
CREATE TABLE IF NOT EXISTS peers (node TEXT PRIMARY KEY, last_seen REAL NOT NULL);
"""


class StateError(KeelError):
    """The state database cannot be opened, read or written (a full disk, an I/O error)."""


def state_failed(what: str, exc: StateError) -> None:
    """One log line for a failure of the state database the node rides out."""
    log.error("mesh: %s: %s", what, exc)


class _Duplicates(Exception):
    """A batch holds messages queued already: undo, and take the slow path."""


_INSERT_OUTBOX = (
    "INSERT INTO outbox (seq, id, peer, room, topic, expires, created, stamp, payload, agent, "
    "to_agent, blob, blob_at, blob_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
Location = tuple[int, int]  # a payload in the blob files: (segment, offset)


def senders_clause(senders: Sequence[str] | None) -> tuple[str, list[str]]:
    """SQL on the inbox's ``sender`` and ``agent``, true for a message whose sender one of
    ``senders`` names (``receiveFrom`` entries, :func:`keel.agents.meshgrant.matches`;
    None: everyone), and its parameters."""
    if senders is None or "*" in senders:
        return "1", []
    terms: list[str] = []
    params: list[str] = []
    for pattern in senders:
        agent, at, node = pattern.rpartition("@")
        if not at:
            terms.append("sender = ?")
            params.append(pattern)
        elif agent == "*":
            terms.append("(sender = ? AND agent IS NOT NULL)")
            params.append(node)
        else:
            terms.append("(sender = ? AND agent = ?)")
            params += [node, agent]
    return ("(" + " OR ".join(terms) + ")" if terms else "0"), params


def _sender_order(sender: tuple[str, str | None]) -> tuple[str, str]:
    return sender[0], sender[1] or ""  # the node itself first


def _every_topic(topic: str) -> bool:
    return True


def _insert_new(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert outbox rows; ``_Duplicates`` (the caller rolls back) if any was there already."""
    inserted = db.executemany(_INSERT_OUTBOX + " ON CONFLICT (peer, id) DO NOTHING", rows)
    if inserted.rowcount != len(rows):
        raise _Duplicates


def _outbox_rows(
    last: int, items: Sequence[OutboxRow], created: float, blobs: Mapping[int, Location]
) -> tuple[list[tuple[Any, ...]], list[int], list[Queued]]:
    """Rows for ``items`` with seqs after ``last`` (a room stamp encoded once per message),
    the blob segment each row names (in order, once per row that names one), and what the
    outbox keeps of each: one pass.

    ``blobs``: where the payloads written to blob files are, by ``id(payload)``
    (their rows hold an empty payload).
    """
    texts: dict[int, str] = {}  # id(stamp): its stored form (one message's recipients share it)
    rows: list[tuple[Any, ...]] = []
    segments: list[int] = []
    queued: list[Queued] = []
    where_is = blobs.get
    for seq, (message_id, peer, room, topic, expires, stamp, payload, agent, to) in enumerate(
        items, last + 1
    ):
        text = None
        if stamp is not None:
            text = texts.get(id(stamp))
            if text is None:
                text = texts[id(stamp)] = _stamp_text(stamp)
        size = len(payload)
        where = where_is(id(payload))
        if where is None:
            row = (seq, message_id, peer, room, topic, expires, created, text, payload, agent, to)
            rows.append((*row, None, None, None))
        else:
            segment, offset = where
            segments.append(segment)
            row = (seq, message_id, peer, room, topic, expires, created, text, b"", agent, to)
            rows.append((*row, segment, offset, size))
        queued.append(Queued(seq, message_id, peer, topic, room, expires, size, agent, to))
    return rows, segments, queued


def _stamp_text(stamp: RoomStamp) -> str:
    """A room stamp as the ``stamp`` column holds it (JSON, as since the first schema)."""
    signature = base64.b64encode(stamp.signature).decode()
    return json.dumps(
        {"room": stamp.room, "from": stamp.author, "rv": stamp.version, "sig": signature}
    )


def _stamp_from_text(text: str) -> RoomStamp:
    data = json.loads(text)
    return RoomStamp(data["room"], data["from"], data["rv"], base64.b64decode(data["sig"]))


P = ParamSpec("P")
R = TypeVar("R")


def _state_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Any SQLite failure of ``method`` (a full disk, an I/O error) as a :class:`StateError`."""

    @functools.wraps(method)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            store = args[0]
            assert isinstance(store, Store)
            raise StateError(f"{store.path}: {exc}") from exc

    return wrapped


class Store:
    """The database; every failure it can meet is a :class:`StateError` naming the file."""

    def __init__(
        self, path: Path, *, synchronous: str = "FULL", keep_dead_letters: int = 10_000
    ) -> None:
        self.path = path
        self.keep_dead_letters = keep_dead_letters
        self._dead_count: int | None = None  # dead letters held (counted on the first one)
        # Per author, an id no dedup key of its in ``seen`` is above (``seen_among``).
        self._seen_ceiling: dict[str, str] = {}
        try:
            # Messages and invite secrets live here: owner only (the -wal and
            # -shm files SQLite makes take the database file's mode).
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(path, 0o600)
        except OSError as exc:
            raise StateError(
                f"{path}: cannot create the mesh state database: {exc.strerror}"
            ) from None
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # before WAL, or it is ignored
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA secure_delete=FAST")
            self._db.execute(f"PRAGMA cache_size=-{CACHE_BYTES >> 10}")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpoint thread's job
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"{path}: cannot open the mesh state database: {exc} "
                "(a damaged file? move it away to start afresh, losing queued messages)"
            ) from None
        self._last_seq: int | None = None  # the last outbox seq used (cached)
        self._compacted_at = 0  # the blob files' rotations when last compacted
        self._after_commit: Callable[[], None] = lambda: None  # the checkpointer's poke, soon
        try:
            self._blobs = BlobFiles(
                path.with_name(path.name + "-blobs"), full=synchronous.upper() == "FULL"
            )
            self._open_blobs()
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            raise StateError(f"{path}: cannot open the outbox's blob files: {exc}") from None
        self._checkpointer = _Checkpointer(path, self._blobs)
        self._after_commit = self._checkpointer.poke

    def _open_blobs(self) -> None:
        """Rows whose payload may be lost (a host crash, a missing file) become dead letters."""
        blobs = self._blobs
        after = blobs.suspect_after()
        rows = self._db.execute(
            "SELECT seq, id, peer, topic, room, expires, blob_size, agent, to_agent, blob "
            "FROM outbox WHERE blob IS NOT NULL"
        ).fetchall()
        present = {int(p.name) for p in blobs.directory.iterdir() if p.name.isdigit()}
        lost = [
            Queued(*row[:9])
            for row in rows
            if (after is not None and row[0] > after) or row[9] not in present
        ]
        if lost:
            log.warning(
                "mesh: %d queued message(s) lost their payload in a crash of the host "
                "before it was on disk (durability: normal); they are dead letters",
                len(lost),
            )
            with self.transaction() as db:  # no segment released: ``opened`` counts afresh
                self._dead_letter_rows(
                    db, lost, "lost in a host crash (durability: normal)", time.time()
                )
        live = self._db.execute(
            "SELECT blob, count(*) FROM outbox WHERE blob IS NOT NULL GROUP BY blob"
        ).fetchall()
        blobs.opened(live, self._outbox_seq(self._db))

    def _migrate(self) -> None:
        old = None
        if self._has_meta():
            old = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if old is not None and old[0] == "1":
            with self._db:  # one transaction: both tables gain the agents' columns
                for table in ("outbox", "inbox"):
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN agent TEXT")
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN to_agent TEXT")
                self._db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
            old = ("2",)
        if old is not None and old[0] == "2":
            with self._db:  # one transaction: where a payload in the blob files is
                for column in ("blob", "blob_at", "blob_size"):
                    self._db.execute(f"ALTER TABLE outbox ADD COLUMN {column} INTEGER")
                self._db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
            old = ("3",)
        if old is not None and old[0] == "3":
            with self._db:  # one transaction: who sent each dead letter, to which agent
                have = {row[1] for row in self._db.execute("PRAGMA table_info(dead_letters)")}
                for column in ("agent", "to_agent"):
                    if have and column not in have:  # (no table: SCHEMA makes it whole)
                        self._db.execute(f"ALTER TABLE dead_letters ADD COLUMN {column} TEXT")
                self._db.execute("UPDATE meta SET value = '4' WHERE key = 'schema'")
        self._db.executescript(SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
        elif row[0] != str(SCHEMA_VERSION):
            raise StateError(
                f"{self.path}: state schema version {row[0]}, this keel reads {SCHEMA_VERSION}"
            )

    def _has_meta(self) -> bool:
        found = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        return found is not None

    def close(self) -> None:
        self._checkpointer.stop()
        try:
            self._blobs.close()
        except OSError as exc:
            state_failed("closing the outbox's blob files", StateError(f"{self.path}: {exc}"))
        self._db.close()  # the last connection to close checkpoints what is left

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot start a transaction: {exc}") from None
        try:
            yield self._db
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise StateError(f"{self.path}: commit failed: {exc}") from None
        self._after_commit()

    # -- meta

    @_state_errors
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # -- records

    @_state_errors
    def load_records(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT body FROM records ORDER BY at, id").fetchall()
        return [json.loads(body) for (body,) in rows]

    @_state_errors
    def add_records(self, records: Iterable[SignedRecord]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO records (id, at, body) VALUES (?, ?, ?)",
                [(r.id, r.at, json.dumps(r.to_json(), sort_keys=True)) for r in records],
            )

    @_state_errors
    def replace_records(self, records: Iterable[SignedRecord], mesh_id: str) -> None:
        """Adopt another mesh's records (a fresh node joining); one transaction."""
        with self.transaction() as db:
            db.execute("DELETE FROM records")
            db.executemany(
                "INSERT INTO records (id, at, body) VALUES (?, ?, ?)",
                [(r.id, r.at, json.dumps(r.to_json(), sort_keys=True)) for r in records],
            )
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('mesh', ?)", (mesh_id,))

    # -- invites

    @_state_errors
    def add_invite(self, record: InviteRecord, created: float) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO invites (invite_id, body, created) VALUES (?, ?, ?)",
                (record.invite_id.hex(), json.dumps(record.to_json()), created),
            )

    @_state_errors
    def get_invite(self, invite_id: bytes) -> InviteRecord | None:
        row = self._db.execute(
            "SELECT body FROM invites WHERE invite_id = ?", (invite_id.hex(),)
        ).fetchone()
        return None if row is None else InviteRecord.from_json(json.loads(row[0]))

    @_state_errors
    def list_invites(self) -> list[tuple[InviteRecord, float]]:
        """The invites this node issued and still holds (not pruned), oldest first."""
        rows = self._db.execute("SELECT body, created FROM invites ORDER BY created").fetchall()
        return [(InviteRecord.from_json(json.loads(body)), created) for body, created in rows]

    @_state_errors
    def redeem_invite(self, record: InviteRecord, join: SignedRecord) -> None:
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

    @_state_errors
    def prune_invites(self, wall: float) -> int:
        with self.transaction() as db:
            rows = db.execute("SELECT invite_id, body FROM invites").fetchall()
            gone = [i for i, body in rows if json.loads(body)["expires"] <= wall]
            db.executemany("DELETE FROM invites WHERE invite_id = ?", [(i,) for i in gone])
        return len(gone)

    # -- outbox

    @_state_errors
    def enqueue(self, items: Sequence[OutboxRow], created: float) -> Sequence[Queued | None]:
        """Store outgoing messages; ``None`` for one already queued (same peer and id).

        One transaction. Payloads of ``BLOB_MIN`` bytes or more are first
        appended to the blob files (once per message, whatever its number of
        recipients; ``keel.mesh.blobs``). The common case (nothing queued
        twice) is one INSERT that skips conflicts; if it skipped any, the
        transaction is undone and done again with a lookup of what is queued
        already.
        """
        blobs = self._write_blobs(items)
        try:
            with self.transaction() as db:
                last = self._outbox_seq(db)
                rows, segments, queued = _outbox_rows(last, items, created, blobs)
                _insert_new(db, rows)
        except _Duplicates:
            return self._enqueue_checked(items, created, blobs)
        self._last_seq = last + len(rows)
        if blobs:
            self._blobs.committed(segments, self._last_seq)
        if self._blobs.rotations != self._compacted_at:
            self._compact_blobs()
        return queued

    def _write_blobs(self, items: Sequence[OutboxRow]) -> dict[int, tuple[int, int]]:
        """The large payloads of ``items`` appended to the blob files: where each is, by id()."""
        large = {id(i.payload): i.payload for i in items if len(i.payload) >= BLOB_MIN}
        if not large:
            return {}
        try:
            places = self._blobs.write(list(large.values()))
        except OSError as exc:
            raise StateError(
                f"{self.path}: cannot write to the outbox's blob files: {exc}"
            ) from None
        return dict(zip(large, places, strict=True))

    def _compact_blobs(self) -> None:
        """Move the live payloads of sparse older segments to the current one (``blobs``).

        Once per new segment, among the segments before the last two (whose
        messages may just be in flight). A segment is sparse when what rows still name in
        it is a quarter of its file or less; the oldest go first, at most half a
        segment's bytes each time (so compacting copies at most half a byte per
        byte written). Steps, each safe to be cut short: the payloads are
        appended and fsynced (the directory too), then one transaction points
        their rows at the new place, then the old segments are released (and
        deleted, or kept as spares, once nothing names them). A failure is
        logged and changes nothing rows depend on.
        """
        self._compacted_at = self._blobs.rotations
        if self._blobs.live_segments <= 2:  # the current one and the one before: nothing to do
            return
        size = blob_files.SEGMENT_BYTES
        try:
            live = self._db.execute(
                "SELECT blob, sum(blob_size) FROM outbox WHERE blob IS NOT NULL "
                "GROUP BY blob ORDER BY blob"
            ).fetchall()
            chosen: list[int] = []
            budget = size // 2
            for segment, held in live:
                if segment >= self._blobs.current - 1 or held * 4 > max(
                    self._blobs.segment_bytes(segment), size
                ):
                    continue  # the one being written or the one before (in flight), or not sparse
                if chosen and held > budget:
                    break
                chosen.append(segment)
                budget -= held
            if not chosen:
                return
            marks = ", ".join("?" * len(chosen))
            moving: list[tuple[int, int, int, int]] = self._db.execute(  # seq, segment, at, size
                f"SELECT seq, blob, blob_at, blob_size FROM outbox WHERE blob IN ({marks}) "  # noqa: S608
                "ORDER BY seq",
                chosen,
            ).fetchall()
            if not moving:
                return
            payloads = [self._blobs.read(segment, at, n) for _, segment, at, n in moving]
            places = self._blobs.write(payloads, sync=True)
            with self.transaction() as db:
                db.executemany(
                    "UPDATE outbox SET blob = ?, blob_at = ? WHERE seq = ?",
                    [(new, at, row[0]) for (new, at), row in zip(places, moving, strict=True)],
                )
        except (OSError, sqlite3.Error, StateError) as exc:
            log.warning(
                "mesh: compacting the outbox's blob files failed (tried again later): %s", exc
            )
            return
        self._blobs.committed((new for new, _ in places), self._outbox_seq(self._db))
        self._blobs.released(row[1] for row in moving)
        log.info(
            "mesh: moved %d queued payloads (%d bytes) out of %d sparse blob segments",
            len(moving),
            sum(row[3] for row in moving),
            len({row[1] for row in moving}),
        )

    def _enqueue_checked(
        self, items: Sequence[OutboxRow], created: float, blobs: Mapping[int, tuple[int, int]]
    ) -> list[Queued | None]:
        keys = [(item.peer, item.id) for item in items]
        queued = self._existing("outbox", "peer", keys)
        out: list[Queued | None] = []
        new: list[OutboxRow] = []
        with self.transaction() as db:
            last = self._outbox_seq(db)
            for item, key in zip(items, keys, strict=True):
                if key in queued:
                    out.append(None)
                    continue
                queued.add(key)
                new.append(item)
                out.append(item.queued(last + len(new)))
            rows, segments, _ = _outbox_rows(last, new, created, blobs)
            db.executemany(_INSERT_OUTBOX, rows)
        self._last_seq = last + len(new)
        if blobs:
            self._blobs.committed(segments, self._last_seq)
        return out

    def _outbox_seq(self, db: sqlite3.Connection) -> int:
        """The last outbox seq ever used (one query per Store; this Store is the only writer)."""
        if self._last_seq is None:
            (self._last_seq,) = db.execute(
                "SELECT coalesce(max(seq), 0) FROM "
                "(SELECT seq FROM sqlite_sequence WHERE name = 'outbox' UNION ALL "
                "SELECT max(seq) FROM outbox UNION ALL SELECT max(seq) FROM dead_letters)"
            ).fetchone()
        return self._last_seq

    def _existing(
        self, table: str, column: str, keys: Sequence[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        """Which ``(column, id)`` pairs are in ``table`` (outbox: peer; seen: sender).

        One query per ``column`` value (and 500 ids), ``column = ? AND id IN (...)``,
        so SQLite walks the ``(column, id)`` index: a row-value ``IN (VALUES ...)``
        would scan the whole table, and ``seen`` holds a week of ids.
        """
        by_first: dict[str, list[str]] = {}
        for first, message_id in dict.fromkeys(keys):
            by_first.setdefault(first, []).append(message_id)
        found: set[tuple[str, str]] = set()
        for first, ids in by_first.items():
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT id FROM {table} WHERE {column} = ? AND id IN ({marks})",  # noqa: S608 (fixed names)
                    [first, *chunk],
                ).fetchall()
                found.update((first, str(row[0])) for row in rows)
        return found

    @_state_errors
    def load_outbox(self) -> list[Queued]:
        rows = self._db.execute(
            "SELECT seq, id, peer, topic, room, expires, coalesce(blob_size, length(payload)), "
            "agent, to_agent "
            "FROM outbox ORDER BY seq"
        ).fetchall()
        return [Queued(*row) for row in rows]

    @_state_errors
    def outbox_payload(self, seq: int) -> Envelope | None:
        """A queued message's payload, room stamp and agents (None once it is gone)."""
        row = self._db.execute(
            "SELECT payload, stamp, agent, to_agent, blob, blob_at, blob_size FROM outbox "
            "WHERE seq = ?",
            (seq,),
        ).fetchone()
        if row is None:
            return None
        stamp = None if row[1] is None else _stamp_from_text(row[1])
        payload = bytes(row[0])
        if row[4] is not None:
            try:
                payload = self._blobs.read(row[4], row[5], row[6])
            except OSError as exc:
                raise StateError(f"{self.path}: cannot read a queued payload: {exc}") from None
        return Envelope(payload, stamp, row[2], row[3])

    @_state_errors
    def delivered(self, items: Sequence[Queued]) -> None:
        """Acknowledged: drop the rows."""
        with self.transaction() as db:
            segments = self._delete_outbox(db, items)
        self._blobs.released(segments)

    @_state_errors
    def dead_letter(self, items: Sequence[Queued], reason: str, wall: float) -> None:
        with self.transaction() as db:
            segments = self._dead_letter_rows(db, items, reason, wall)
        self._blobs.released(segments)

    def _dead_letter_rows(
        self, db: sqlite3.Connection, items: Sequence[Queued], reason: str, wall: float
    ) -> list[int]:
        segments = self._delete_outbox(db, items)
        db.executemany(
            "INSERT OR REPLACE INTO dead_letters "
            "(seq, id, peer, room, topic, size, reason, at, agent, to_agent) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (i.seq, i.id, i.peer, i.room, i.topic, i.size, reason, wall, i.agent, i.to)
                for i in items
            ],
        )
        self._prune_dead_letters(db, len(items))
        return segments

    def _prune_dead_letters(self, db: sqlite3.Connection, added: int) -> None:
        """At most ``keep_dead_letters``: past it, the oldest go, down to nine tenths of it
        (so a steady trickle prunes once per tenth, not once per letter)."""
        if self._dead_count is None:
            (self._dead_count,) = db.execute("SELECT count(*) FROM dead_letters").fetchone()
        else:
            self._dead_count += added  # at most: a letter may have replaced one of its seq
        if self._dead_count <= self.keep_dead_letters:
            return
        keep = max(1, self.keep_dead_letters * 9 // 10)
        db.execute(
            "DELETE FROM dead_letters WHERE seq <= "
            "(SELECT seq FROM dead_letters ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (keep,),
        )
        (self._dead_count,) = db.execute("SELECT count(*) FROM dead_letters").fetchone()

    @staticmethod
    def _delete_outbox(db: sqlite3.Connection, items: Sequence[Queued]) -> list[int]:
        """Delete the rows of ``items``; the blob segment of each that named one."""
        segments: list[int] = []
        for start in range(0, len(items), 500):
            chunk = [i.seq for i in items[start : start + 500]]
            marks = ", ".join("?" * len(chunk))
            segments += [
                int(segment)
                for (segment,) in db.execute(
                    f"DELETE FROM outbox WHERE seq IN ({marks}) RETURNING blob",  # noqa: S608
                    chunk,
                )
                if segment is not None
            ]
        return segments

    @_state_errors
    def dead_letters(
        self,
        limit: int = 1000,
        *,
        agent: str | None = None,
        reads: Callable[[str], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """The latest ``limit`` dead letters, newest first.

        ``agent``: only those that agent of this node sent (None: all, the
        node's and every agent's); ``reads``: only those on the topics it
        allows (None: every topic).
        """
        where, params = ("WHERE agent = ? ", [agent]) if agent is not None else ("", [])
        keys = ("id", "to", "agent", "to_agent", "room", "topic", "size", "reason", "at")
        out: list[dict[str, Any]] = []
        after: int | None = None
        while len(out) < limit:
            clause = where
            if after is not None:
                clause += ("AND " if where else "WHERE ") + "seq < ? "
            rows = self._db.execute(
                "SELECT seq, id, peer, agent, to_agent, room, topic, size, reason, at "  # noqa: S608
                f"FROM dead_letters {clause}ORDER BY seq DESC LIMIT ?",
                [*params, *([] if after is None else [after]), max(limit - len(out), 256)],
            ).fetchall()
            if not rows:
                break
            after = rows[-1][0]
            out += [
                dict(zip(keys, row[1:], strict=True))
                for row in rows
                if reads is None or reads(row[6])
            ][: limit - len(out)]
        return out

    # -- inbox

    @_state_errors
    def seen_among(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """The ``(author, id)`` pairs of ``keys`` received before (one query per 500).

        Ids are time-ordered, so an author's new messages mostly come with
        ids above all of its stored ones: those are new without a query. The
        ceiling kept per author (its highest stored id, read once) is raised by
        every insert, never lowered (a pruned key leaves it high: only more
        queries).
        """
        ceiling = self._seen_ceiling
        doubtful: list[tuple[str, str]] = []
        for author, message_id in keys:
            top = ceiling.get(author)
            if top is None:
                top = self._seen_top(author)
            if message_id <= top:
                doubtful.append((author, message_id))
        return self._existing("seen", "sender", doubtful) if doubtful else set()

    def _seen_top(self, author: str) -> str:
        (top,) = self._db.execute("SELECT max(id) FROM seen WHERE sender = ?", (author,)).fetchone()
        if len(self._seen_ceiling) >= SEEN_CEILINGS:
            self._seen_ceiling.clear()
        top = self._seen_ceiling[author] = "" if top is None else str(top)
        return top

    def _raise_ceilings(self, keys: Iterable[tuple[str, str]]) -> None:
        """Keys go into ``seen`` (called before the commit: a ceiling too high is harmless)."""
        ceiling = self._seen_ceiling
        for author, message_id in keys:
            top = ceiling.get(author)
            if top is not None and message_id > top:  # absent: read from the table when needed
                ceiling[author] = message_id

    @_state_errors
    def receive(self, items: Sequence[Incoming], wall: float) -> list[int]:
        """Store new messages with their dedup keys, atomically; returns their inbox seqs."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO seen (sender, id, keep_until) VALUES (?, ?, ?)",
                [(i.sender, i.id, i.keep_until) for i in items],
            )
            self._raise_ceilings((i.sender, i.id) for i in items)
            db.executemany(
                "INSERT INTO inbox (id, sender, room, topic, received, payload, agent, to_agent) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(i.id, i.sender, i.room, i.topic, wall, i.payload, i.agent, i.to) for i in items],
            )
            (last,) = db.execute("SELECT coalesce(max(seq), 0) FROM inbox").fetchone()
        return list(range(last - len(items) + 1, last + 1))

    @_state_errors
    def mark_seen(self, keys: Sequence[tuple[str, str, float]]) -> None:
        """Store dedup keys (sender, id, keep_until) of messages an agent took straight away."""
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO seen (sender, id, keep_until) VALUES (?, ?, ?)", keys
            )
            self._raise_ceilings((sender, message_id) for sender, message_id, _ in keys)

    @_state_errors
    def inbox_totals(self) -> tuple[int, int]:
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM inbox"
        ).fetchone()
        return int(count), int(size)

    @_state_errors
    def take(
        self,
        topic: str,
        limit: int,
        exclude: Container[int],
        reader: str | None = None,
        senders: Sequence[str] | None = None,
        *,
        rooms: Callable[[str], bool] | None = None,
    ) -> list[InboxMessage]:
        """The oldest ``limit`` messages on ``topic`` for ``reader`` whose seq is not in ``exclude``.

        ``reader``: an agent gets the messages for no agent and those for it;
        None (the node itself) those for no agent. ``senders``: the reader's
        ``receiveFrom`` (None: everyone); the messages of others stay.
        ``rooms``: the rooms whose messages the reader may read (None: all).
        Seqs come from the ``(topic, seq)`` index first; only the chosen rows'
        payloads are read.
        """
        chosen: list[int] = []
        after = 0
        clause, params = senders_clause(senders)
        while len(chosen) < limit:
            seqs = self._db.execute(
                "SELECT seq, room FROM inbox WHERE topic = ? AND seq > ? "  # noqa: S608
                f"AND (to_agent IS NULL OR to_agent = ?) AND {clause} ORDER BY seq LIMIT ?",
                (topic, after, reader, *params, max(limit, 256)),
            ).fetchall()
            if not seqs:
                break
            after = seqs[-1][0]
            chosen += [
                seq
                for (seq, room) in seqs
                if seq not in exclude and (room is None or rooms is None or rooms(room))
            ][: limit - len(chosen)]
        out: list[InboxMessage] = []
        for start in range(0, len(chosen), 500):
            chunk = chosen[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            query = (
                "SELECT seq, id, sender, room, topic, received, payload, agent, to_agent "
                "FROM inbox WHERE seq IN"
            )
            rows = self._db.execute(f"{query} ({marks}) ORDER BY seq", chunk).fetchall()
            out += [
                InboxMessage(
                    row[0], row[1], row[2], row[3], row[4], row[5], bytes(row[6]), row[7], row[8]
                )
                for row in rows
            ]
        return out

    @_state_errors
    def refused_senders(
        self, topic: str, reader: str, senders: Sequence[str], limit: int = 8
    ) -> list[tuple[str, str | None]]:
        """Up to ``limit`` (node, agent) that sent messages on ``topic`` ``reader`` may not
        read: not in its ``receiveFrom`` (``senders``)."""
        clause, params = senders_clause(senders)
        rows = self._db.execute(
            "SELECT DISTINCT sender, agent FROM inbox WHERE topic = ? "  # noqa: S608
            f"AND (to_agent IS NULL OR to_agent = ?) AND NOT {clause} LIMIT ?",
            (topic, reader, *params, limit),
        ).fetchall()
        return sorted(((str(node), agent) for node, agent in rows), key=_sender_order)

    @_state_errors
    def consume(
        self,
        seqs: Iterable[int],
        reads: Callable[[str], bool] | None = None,
        senders: Sequence[str] | None = None,
        *,
        rooms: Callable[[str], bool] | None = None,
        reader: str | None = None,
    ) -> list[tuple[int, int]]:
        """Delete consumed messages; returns (seq, size) of those that were there.

        ``reads``: only messages on topics it allows are deleted, ``senders``:
        only those from the nodes and agents it names, ``rooms``: only room
        messages of the rooms it allows, ``reader`` (an agent): only messages
        for no agent or for that one (an agent's acknowledgement of a message
        it may not read is no acknowledgement).
        """
        unique = list(dict.fromkeys(seqs))
        gone: list[tuple[int, int]] = []
        with self.transaction() as db:
            if reads is not None or senders is not None or rooms is not None or reader is not None:
                unique = self._readable(
                    db, unique, reads or _every_topic, senders, rooms=rooms, reader=reader
                )
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ", ".join("?" for _ in chunk)
                gone += db.execute(
                    f"DELETE FROM inbox WHERE seq IN ({marks}) RETURNING seq, length(payload)",  # noqa: S608
                    chunk,
                ).fetchall()
        return [(int(a), int(b)) for a, b in gone]

    @staticmethod
    def _readable(
        db: sqlite3.Connection,
        seqs: Sequence[int],
        reads: Callable[[str], bool],
        senders: Sequence[str] | None = None,
        *,
        rooms: Callable[[str], bool] | None = None,
        reader: str | None = None,
    ) -> list[int]:
        """Those of ``seqs`` whose message's topic ``reads`` allows, from ``senders``, of a
        room ``rooms`` allows (or of none), for no agent or for ``reader`` (if not None)."""
        allowed: list[int] = []
        clause, params = senders_clause(senders)
        if reader is not None:
            clause = f"(to_agent IS NULL OR to_agent = ?) AND {clause}"
            params = [reader, *params]
        for start in range(0, len(seqs), 500):
            chunk = seqs[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            rows = db.execute(
                f"SELECT seq, topic, room FROM inbox WHERE seq IN ({marks}) AND {clause}",  # noqa: S608
                [*chunk, *params],
            ).fetchall()
            allowed += [
                int(seq)
                for seq, topic, room in rows
                if reads(topic) and (room is None or rooms is None or rooms(room))
            ]
        return allowed

    @_state_errors
    def prune_seen(self, wall: float) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM seen WHERE keep_until < ?", (wall,)).rowcount

    # -- peers

    @_state_errors
    def touch_peers(self, peers: Iterable[str], wall: float) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO peers (node, last_seen) VALUES (?, ?)",
                [(p, wall) for p in peers],
            )

    @_state_errors
    def last_seen(self) -> dict[str, float]:
        return dict(self._db.execute("SELECT node, last_seen FROM peers"))


class _Checkpointer:
    """Copies the write-ahead log into the database from its own thread and connection.

    ``poke`` after commits: at most every ``CHECKPOINT_DELAY`` it looks at the
    log's size and, once it holds ``CHECKPOINT_BYTES`` or more, wakes the
    thread, which checkpoints (PASSIVE: writers go on meanwhile). Otherwise
    the thread sleeps: waking it for nothing would cost the event loop's
    thread the GIL. A failed checkpoint is logged and tried again on a later
    poke: the log only grows meanwhile, nothing is lost.
    """

    def __init__(self, path: Path, blobs: BlobFiles) -> None:
        self.path = path
        self.blobs = blobs
        self.wal = path.with_name(path.name + "-wal")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._looked = 0.0
        self._thread = threading.Thread(target=self._run, name="keel-mesh-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        now = time.monotonic()
        if now - self._looked < CHECKPOINT_DELAY:
            return
        self._looked = now
        try:
            big = self.wal.stat().st_size >= CHECKPOINT_BYTES
        except OSError:
            return
        big = big or self.blobs.unsynced_bytes >= CHECKPOINT_BYTES
        if big:
            self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping.is_set():
                    return
                try:
                    self.blobs.sync()  # the payloads on disk before the rows that name them
                except OSError as exc:
                    log.warning("mesh: fsync of %s's blob files failed (will retry): %s",
                                self.path, exc)  # fmt: skip
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.warning("mesh: checkpoint of %s failed (will retry): %s", self.path, exc)
        finally:
            db.close()
