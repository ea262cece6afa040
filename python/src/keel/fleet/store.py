"""The fleet's state on disk: one SQLite file (WAL) in the fleet's state directory.

- ``witnessed``: per node, the largest checkpoint this node cosigned of its
  ledger, with the pinned ledger key (what the witness judges the next one by);
- ``history``: every cosigned checkpoint, the newest ``keep`` per node;
- ``alarms``: forks, rollbacks and key changes this witness saw, with both
  notes as evidence; kept until an operator forgets the node;
- ``cosigned``: the cosignatures other nodes made of this node's checkpoints
  (the newest per witness);
- ``pins``: witness keys of other nodes, pinned the first time they were seen;
- ``reports``: every node's last status report and when it arrived.

Only the fleet daemon writes it; reads from the CLI go through the daemon.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.errors import KeelError
from keel.fleet.status import Seen
from keel.fleet.witness import Alarm, Witnessed

SCHEMA_VERSION = 1
APPLICATION_ID = 0x6B666C74  # "kflt"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS witnessed (
    node TEXT PRIMARY KEY, ledger_key TEXT NOT NULL, size INTEGER NOT NULL,
    root BLOB NOT NULL, note TEXT NOT NULL, at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY, node TEXT NOT NULL, size INTEGER NOT NULL,
    note TEXT NOT NULL, at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS history_node ON history (node, id);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY, node TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL,
    witnessed_key TEXT NOT NULL, witnessed_note TEXT NOT NULL,
    presented_key TEXT NOT NULL, presented_note TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cosigned (
    witness TEXT PRIMARY KEY, witness_key TEXT NOT NULL, size INTEGER NOT NULL,
    note TEXT NOT NULL, at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pins (
    node TEXT PRIMARY KEY, witness_key TEXT NOT NULL, first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    node TEXT PRIMARY KEY, report TEXT NOT NULL, at REAL NOT NULL
);
"""


class StoreError(KeelError):
    """The fleet's state file cannot be opened or written."""


@dataclass(frozen=True)
class StoredAlarm:
    id: int
    node: str
    kind: str
    detail: str
    witnessed_key: str
    witnessed_note: str
    presented_key: str
    presented_note: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node": self.node,
            "kind": self.kind,
            "detail": self.detail,
            "at": self.at,
            "witnessed": {"ledger_key": self.witnessed_key, "note": self.witnessed_note},
            "presented": {"ledger_key": self.presented_key, "note": self.presented_note},
        }


@dataclass(frozen=True)
class Cosignature:
    witness: str  # node id of the witness
    witness_key: str
    size: int
    note: str
    at: int


class FleetStore:
    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> FleetStore:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the fleet's state {path}: {exc}") from None
        store = cls(db, path)
        try:
            with store._errors("open"):
                _prepare(db, path)
        except BaseException:
            db.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot {action}: {exc}") from None

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors(action):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._errors("read"):
            return self._db.execute(sql, args).fetchall()

    # --- witnessing ------------------------------------------------------------------

    def witnessed(self, node: str) -> Witnessed | None:
        rows = self._rows(
            "SELECT node, ledger_key, size, root, note, at FROM witnessed WHERE node = ?", (node,)
        )
        return Witnessed(*rows[0]) if rows else None

    def all_witnessed(self) -> list[Witnessed]:
        rows = self._rows(
            "SELECT node, ledger_key, size, root, note, at FROM witnessed ORDER BY node"
        )
        return [Witnessed(*row) for row in rows]

    def save_witnessed(self, record: Witnessed, keep: int) -> None:
        with self._transaction("record a cosigned checkpoint") as db:
            db.execute(
                "INSERT OR REPLACE INTO witnessed (node, ledger_key, size, root, note, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.node, record.ledger_key, record.size, record.root, record.note, record.at),
            )
            last = db.execute(
                "SELECT size FROM history WHERE node = ? ORDER BY id DESC LIMIT 1", (record.node,)
            ).fetchone()
            if last is None or last[0] != record.size:
                db.execute(
                    "INSERT INTO history (node, size, note, at) VALUES (?, ?, ?, ?)",
                    (record.node, record.size, record.note, record.at),
                )
                db.execute(
                    "DELETE FROM history WHERE node = ? AND id NOT IN "
                    "(SELECT id FROM history WHERE node = ? ORDER BY id DESC LIMIT ?)",
                    (record.node, record.node, keep),
                )

    def history(self, node: str) -> list[tuple[int, str, int]]:
        """``(size, note, at)`` of the cosigned checkpoints of ``node`` kept, oldest first."""
        rows = self._rows("SELECT size, note, at FROM history WHERE node = ? ORDER BY id", (node,))
        return [(int(size), str(note), int(at)) for size, note, at in rows]

    def add_alarm(self, alarm: Alarm, at: float) -> StoredAlarm:
        values = (
            alarm.node,
            alarm.kind,
            alarm.detail,
            alarm.witnessed.ledger_key,
            alarm.witnessed.note,
            alarm.presented_key,
            alarm.presented,
            at,
        )
        with self._transaction("record an alarm") as db:
            same = db.execute(
                "SELECT id FROM alarms WHERE node = ? AND kind = ? AND presented_note = ?",
                (alarm.node, alarm.kind, alarm.presented),
            ).fetchone()
            if same is not None:  # the same evidence again: one alarm, not one per round
                return self._alarm(db, int(same[0]))
            cursor = db.execute(
                "INSERT INTO alarms (node, kind, detail, witnessed_key, witnessed_note, "
                "presented_key, presented_note, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            assert cursor.lastrowid is not None
            return StoredAlarm(cursor.lastrowid, *values)

    @staticmethod
    def _alarm(db: sqlite3.Connection, alarm_id: int) -> StoredAlarm:
        row = db.execute("SELECT * FROM alarms WHERE id = ?", (alarm_id,)).fetchone()
        return StoredAlarm(*row)

    def alarms(self, node: str | None = None) -> list[StoredAlarm]:
        if node is None:
            rows = self._rows("SELECT * FROM alarms ORDER BY id")
        else:
            rows = self._rows("SELECT * FROM alarms WHERE node = ? ORDER BY id", (node,))
        return [StoredAlarm(*row) for row in rows]

    def forget(self, node: str) -> tuple[int, int]:
        """Drop what is witnessed of ``node`` and its alarms; returns how many of each."""
        with self._transaction("forget a node") as db:
            witnessed = db.execute("DELETE FROM witnessed WHERE node = ?", (node,)).rowcount
            db.execute("DELETE FROM history WHERE node = ?", (node,))
            alarms = db.execute("DELETE FROM alarms WHERE node = ?", (node,)).rowcount
        return witnessed, alarms

    # --- cosignatures of this node's checkpoints -----------------------------------

    def save_cosignature(self, cosignature: Cosignature) -> None:
        with self._transaction("record a cosignature") as db:
            db.execute(
                "INSERT OR REPLACE INTO cosigned (witness, witness_key, size, note, at) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    cosignature.witness,
                    cosignature.witness_key,
                    cosignature.size,
                    cosignature.note,
                    cosignature.at,
                ),
            )

    def cosignatures(self) -> list[Cosignature]:
        rows = self._rows(
            "SELECT witness, witness_key, size, note, at FROM cosigned ORDER BY witness"
        )
        return [Cosignature(*row) for row in rows]

    # --- keys of other witnesses ------------------------------------------------------

    def pin_witness_key(self, node: str, key: str, now: float) -> str:
        """The witness key pinned for ``node``: ``key`` if it is the first one seen."""
        with self._transaction("pin a witness key") as db:
            row = db.execute("SELECT witness_key FROM pins WHERE node = ?", (node,)).fetchone()
            if row is not None:
                return str(row[0])
            db.execute(
                "INSERT INTO pins (node, witness_key, first_seen) VALUES (?, ?, ?)",
                (node, key, now),
            )
        return key

    def unpin(self, node: str) -> bool:
        with self._transaction("unpin a witness key") as db:
            return db.execute("DELETE FROM pins WHERE node = ?", (node,)).rowcount > 0

    # --- status reports ---------------------------------------------------------------

    def save_report(self, node: str, report: dict[str, Any], at: float) -> None:
        with self._transaction("record a status report") as db:
            db.execute(
                "INSERT OR REPLACE INTO reports (node, report, at) VALUES (?, ?, ?)",
                (node, json.dumps(report, sort_keys=True), at),
            )

    def reports(self) -> dict[str, Seen]:
        out = {}
        for node, text, at in self._rows("SELECT node, report, at FROM reports"):
            try:
                report = json.loads(text)
            except ValueError:
                continue
            out[str(node)] = Seen(report, float(at))
        return out


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    application = db.execute("PRAGMA application_id").fetchone()[0]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if tables and application != APPLICATION_ID:
        raise StoreError(f"{path} is not a keel fleet state file; move it away")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} was written by a newer keel (schema {version}); upgrade keel")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.executescript(_SCHEMA)
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def root_text(root: bytes) -> str:
    return base64.b64encode(root).decode()
