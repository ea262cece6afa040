"""The ledger on disk: SQLite in WAL mode, shared by every daemon.

Typical use, from any process (several may append at once)::

    ledger = Ledger.open(path)        # creates the file and its directory if missing
    index = ledger.append(source="watch", kind="restart", subject="web", data={"n": 3})
    ledger.close()

``append`` is one durable transaction (``synchronous=FULL``): when it returns,
the entry survives a crash or power loss. ``append_many`` writes a batch in one
transaction. Writers serialise on SQLite's write lock (``BEGIN IMMEDIATE`` and
a busy timeout), so concurrent appends from many processes interleave without
losing or duplicating anything. A :class:`Ledger` may be shared between
threads (its connection is guarded by a lock), so from asyncio
``await asyncio.to_thread(ledger.append, ...)`` works; :class:`AsyncLedger`
does better: appends made concurrently by a daemon's tasks are written in one
transaction by one writer thread, and the event loop never blocks::

    async with await AsyncLedger.open(path) as ledger:
        index = await ledger.append(source="mesh", kind="message.sent", data={...})

Schema (``PRAGMA application_id`` = ``0x6b65656c`` "keel", ``user_version`` = 1):

- ``leaves(idx, entry, hashes)``: one row per leaf; ``entry`` is the
  canonical entry, ``hashes`` the leaf hash followed by the hashes of the
  perfect subtrees this leaf completes (see :mod:`keel.ledger.core`);
- ``checkpoints(id, size, note, created)``: the signed checkpoint notes;
- ``meta(key, value)``: ``size``, the number of leaves, updated in every
  append transaction (so deleting trailing rows is detected).

Outside the database, ``<db>.head`` (``ledger.db.head``) holds the last signed
checkpoint note, replaced atomically and fsynced by every :meth:`Ledger.checkpoint`.
It is the ledger's memory of how far it had come: a log that went back (a
deleted or lost ``-wal`` file, a restored backup, removed rows) no longer
reaches it, :meth:`Ledger.verify` says so, and :meth:`Ledger.checkpoint`
refuses to sign the shorter tree.

Anything read back from the database is checked for the type and form keel
writes (``meta.size`` a decimal text, entries and hashes blobs, checkpoint
notes text...): whatever else an editor of the file put there is reported as
a :class:`TamperError`, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from keel.files import write_durably
from keel.ledger import core
from keel.ledger.errors import (
    EntryError,
    LedgerError,
    MalformedError,
    ProofError,
    StoreError,
    TamperError,
    shown,
)

T = TypeVar("T")

APPLICATION_ID = 0x6B65656C  # "keel"
SCHEMA_VERSION = 1
BUSY_TIMEOUT = 30.0

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE leaves (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL, hashes BLOB NOT NULL);
CREATE TABLE checkpoints (
    id INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    note TEXT NOT NULL,
    created TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('size', '0');
"""
_TABLES = {"meta", "leaves", "checkpoints"}
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
MAX_HEAD_BYTES = 64 * 1024  # a signed checkpoint is a few hundred bytes


def head_path(db: Path) -> Path:
    """Where the ledger at ``db`` keeps its last signed checkpoint: ``<db>.head``."""
    return db.with_name(db.name + ".head")


def _sql_type(value: object) -> str:
    """How SQLite calls the type of a value read back (for messages about tampering)."""
    names = {type(None): "NULL", int: "an integer", float: "a real", str: "text", bytes: "a blob"}
    return names.get(type(value), type(value).__name__)


class _NotUtf8(ValueError):
    """A TEXT value that is not UTF-8: keel never writes one."""


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _NotUtf8 from None


def _stamp(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


@dataclass(frozen=True)
class StoredCheckpoint:
    id: int
    size: int
    note: str
    created: str


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked; it raises :class:`TamperError` instead of returning on a problem."""

    size: int
    root: bytes
    checkpoints: int
    signatures_checked: bool
    external: int
    head: int | None = None  # the size of the head file's checkpoint; None without one


class Ledger:
    """An append-only Merkle log in one SQLite file. Use :meth:`open`."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        clock: Callable[[], float],
        *,
        read_only: bool = False,
        stamp: tuple[int, int, int] | None = None,
    ) -> None:
        self._db = connection
        self._db.text_factory = _decode_text
        self._lock = threading.RLock()
        self.path = path
        self.clock = clock
        self.read_only = read_only
        # Set when the file is read without locks (immutable): it must not change meanwhile.
        self._stamp = stamp
        self._closed = False

    @property
    def head_path(self) -> Path:
        return head_path(self.path)

    # ---- opening --------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
        timeout: float = BUSY_TIMEOUT,
    ) -> Ledger:
        """Open the ledger at ``path``; with ``create`` (the default) make it if missing.

        A file that is not SQLite, a SQLite database without the ledger
        schema, or one of another schema version is refused with a
        :class:`StoreError` and left untouched.

        ``read_only`` (which implies ``create=False``) never writes: for
        ``verify``, ``tail``, ``prove`` and an auditor's copy that is read-only
        (mode 0444 in a 0555 directory, a read-only mount). SQLite reads a
        WAL database read-only through its ``-shm`` file; where that file can
        be neither used nor created, the database is read as an immutable
        file (no locks), which holds all of it when no ``-wal`` file is beside
        it: if one is, the error says to copy both somewhere writable. A file
        read without locks that changes meanwhile is a :class:`StoreError`.
        """
        db_path = Path(path)
        create = create and not read_only
        try:
            if create:
                try:
                    db_path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot create {db_path.parent}: {exc.strerror}") from None
            elif not db_path.exists():
                raise StoreError(f"no ledger at {db_path} (nothing appended yet, or a wrong --db?)")
            if db_path.is_dir():
                raise StoreError(f"{db_path} is a directory, not a ledger database")
            uri = db_path.resolve().as_uri()
        except (OSError, ValueError) as exc:  # a name too long, a NUL, a loop of links
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StoreError(f"cannot open {shown(str(db_path))}: {reason}") from None
        stamp = None
        if read_only:
            connection, stamp = _connect_read_only(db_path, uri, timeout)
        else:
            connection = _connect(db_path, uri + ("?mode=rwc" if create else "?mode=rw"), timeout)
        ledger = cls(connection, db_path, clock, read_only=read_only, stamp=stamp)
        try:
            ledger._prepare(create, timeout)
        except BaseException:
            connection.close()
            raise
        return ledger

    def _prepare(self, create: bool, timeout: float) -> None:
        # Opening races with other processes creating the same file or switching
        # it to WAL; SQLite reports some of those as "locked" without waiting.
        deadline = time.monotonic() + timeout
        with self._errors("open"):
            while True:
                try:
                    self._prepare_once(create)
                except sqlite3.OperationalError as exc:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    transient = "locked" in str(exc) or "busy" in str(exc)
                    if not transient or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005 + 0.02 * random.random())
                else:
                    return

    def _prepare_once(self, create: bool) -> None:
        self._db.execute("BEGIN")
        try:
            state = self._schema_state()
        finally:
            if self._db.in_transaction:
                self._db.execute("COMMIT")
        if state == "empty":
            if not create:
                raise StoreError(f"{self.path} is an empty database, not a keel ledger")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._schema_state() == "empty":
                    # executescript() would commit first; run the statements one by one.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        if self.read_only:
            return
        # Set on creation; repeated in case the creator died before it got there.
        if str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode})")
        self._db.execute("PRAGMA synchronous = FULL")

    def _schema_state(self) -> str:
        """``"empty"`` for a fresh database, ``"ledger"`` for ours; raises for anything else."""
        application_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = {
            row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if application_id == 0 and not tables:
            return "empty"
        if application_id != APPLICATION_ID:
            raise StoreError(
                f"{self.path} is a SQLite database but not a keel ledger "
                f"(application_id {application_id:#x}); point --db at a ledger file"
            )
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has ledger schema version {version}, this keel reads version "
                f"{SCHEMA_VERSION}: use the keel release that wrote it"
            )
        if not tables >= _TABLES:
            raise StoreError(
                f"{self.path} lacks the ledger tables {', '.join(sorted(_TABLES - tables))}"
            )
        return "ledger"

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn SQLite failures into one-line :class:`StoreError`s naming the file."""
        if self._closed:
            raise StoreError(f"the ledger {self.path} is closed")
        try:
            yield
        except sqlite3.DatabaseError as exc:
            self._check_unchanged()
            message = str(exc)
            if len(message) > 200:  # SQLite's own are short; one quoting a value may not be
                message = shown(message)
            if "file is not a database" in message:
                raise StoreError(
                    f"{self.path} is not a SQLite database; point --db at a ledger file"
                ) from None
            if "unable to open" in message or "readonly" in message:
                message += (
                    f" (can this user write to {self.path.parent}? the ledger's -wal and -shm "
                    "files live there)"
                )
            raise StoreError(f"cannot {action} {self.path}: {message}") from None
        except _NotUtf8:
            self._check_unchanged()
            raise self._tampered("it holds a text value that is not UTF-8", 0) from None
        except TamperError:
            self._check_unchanged()
            raise
        self._check_unchanged()

    def changed(self) -> bool:
        """True when a file read without locks changed since it was opened: open it afresh.

        Always False for a ledger opened normally: SQLite's locks keep its reads
        consistent while others write.
        """
        if self._stamp is None:
            return False
        try:
            return _stamp(self.path) != self._stamp
        except OSError:
            return True

    def _check_unchanged(self) -> None:
        """For a file read without locks: a change meanwhile may have torn what was read."""
        if self.changed():
            raise StoreError(
                f"{self.path} changed while it was read without locks (its directory is "
                "read-only, so SQLite could not share it with the writer): run the command "
                "again, or read a copy"
            )

    def _tampered(self, detail: str, index: int) -> TamperError:
        """The one form of every tampering verdict: what was found, and the first bad leaf."""
        return TamperError(f"{self.path}: the ledger was tampered with: {detail}", index)

    @contextlib.contextmanager
    def _write(self, action: str) -> Iterator[None]:
        """One ``BEGIN IMMEDIATE`` transaction, rolled back on any failure."""
        with self._lock, self._errors(action):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---- reading the tree -------------------------------------------------

    def _lookup(self, level: int, index: int) -> bytes:
        row = core.stored_location(level, index)[0]
        found = self._db.execute("SELECT hashes FROM leaves WHERE idx = ?", (row,)).fetchone()
        return self._slot(level, index, found[0] if found else None)

    def _slot(self, level: int, index: int, hashes: object) -> bytes:
        """Slot ``level`` of a row's hash list, or a :class:`TamperError` if it is not there."""
        row, slot = core.stored_location(level, index)
        value = (
            hashes[slot * core.HASH_SIZE : (slot + 1) * core.HASH_SIZE]
            if isinstance(hashes, bytes)
            else b""
        )
        if len(value) != core.HASH_SIZE:
            raise self._tampered(
                f"the stored hash of leaves {index << level}..{row} is missing or damaged; "
                "run `keel ledger verify`",
                index << level,
            )
        return value

    def _fetched(self, compute: Callable[[core.HashLookup], T]) -> T:
        """Run ``compute`` with its stored hashes read in one query instead of one each.

        Which subtrees a root or proof needs depends only on the sizes and
        indices, never on hash values, so a dry run with placeholder hashes
        names them all; one ``IN (...)`` query then fetches their rows.
        """
        wanted: list[tuple[int, int]] = []

        def record(level: int, index: int) -> bytes:
            wanted.append((level, index))
            return bytes(core.HASH_SIZE)

        compute(record)
        rows = sorted({core.stored_location(level, index)[0] for level, index in wanted})
        fetched: dict[int, bytes] = {}
        for start in range(0, len(rows), 500):
            chunk = rows[start : start + 500]
            marks = ",".join("?" * len(chunk))
            fetched.update(
                self._db.execute(
                    f"SELECT idx, hashes FROM leaves WHERE idx IN ({marks})",  # noqa: S608
                    chunk,
                ).fetchall()
            )

        def lookup(level: int, index: int) -> bytes:
            return self._slot(level, index, fetched.get(core.stored_location(level, index)[0]))

        return compute(lookup)

    def stored_hash(self, level: int, index: int) -> bytes:
        """The stored hash of perfect subtree ``(level, index)`` (a :data:`core.HashLookup`)."""
        with self._lock, self._errors("read"):
            return self._lookup(level, index)

    def _size(self) -> int:
        # One statement, so one snapshot: other processes may be appending.
        recorded, records, last = self._db.execute(
            "SELECT (SELECT value FROM meta WHERE key = 'size'), "
            "(SELECT count(*) FROM meta WHERE key = 'size'), (SELECT max(idx) FROM leaves)"
        ).fetchone()
        if type(last) is not int and last is not None:
            raise self._tampered(
                f"a leaf is stored under the index {shown(last)} ({_sql_type(last)}); "
                "run `keel ledger verify`",
                0,
            )
        held = 0 if last is None else last + 1
        size = self._recorded_size(recorded, records, held)
        if held != size:
            raise self._tampered(
                f"it records {size} entries but its last entry is {held - 1}; "
                "run `keel ledger verify`",
                min(held, size),
            )
        return size

    def _recorded_size(self, recorded: object, records: object, index: int) -> int:
        """The leaf count kept in ``meta``, as keel writes it: one decimal text."""
        if records != 1:
            raise self._tampered(f"it keeps {records} leaf counts instead of one", index)
        if type(recorded) is not str or not _DECIMAL.fullmatch(recorded):
            raise self._tampered(
                f"its leaf count is {shown(recorded)} ({_sql_type(recorded)}), "
                "not a number written by keel",
                index,
            )
        return int(recorded)

    def size(self) -> int:
        with self._lock, self._errors("read"):
            return self._size()

    def _check_size(self, size: int | None) -> int:
        current = self._size()
        if size is None:
            return current
        if not 0 <= size <= current:
            raise LedgerError(f"the ledger has {current} entries; size {size} is out of range")
        return size

    def root(self, size: int | None = None) -> bytes:
        with self._lock, self._errors("read"):
            tree_size = self._check_size(size)
            return self._fetched(lambda lookup: core.tree_root(tree_size, lookup))

    def entries(self, start: int = 0, end: int | None = None) -> list[tuple[int, core.Entry]]:
        """Entries ``start..end-1`` (all from ``start`` when ``end`` is None), parsed."""
        with self._lock, self._errors("read"):
            rows = self._db.execute(
                "SELECT idx, entry FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, end if end is not None else 2**63 - 1),
            ).fetchall()
            return [
                (expected, self._parse_stored(expected, index, raw))
                for expected, (index, raw) in enumerate(rows, start)
            ]

    def _parse_stored(self, expected: int, index: object, raw: object) -> core.Entry:
        if type(index) is not int or index != expected:
            raise self._tampered(
                f"entry {expected} is missing (the next row has the index {shown(index)}); "
                "run `keel ledger verify`",
                expected,
            )
        if type(raw) is not bytes:
            raise self._tampered(f"entry {index} is stored as {_sql_type(raw)}, not a blob", index)
        try:
            return core.parse_entry(raw)
        except EntryError as exc:
            raise self._tampered(f"entry {index} is damaged: {exc}", index) from None

    def search(
        self,
        text: str,
        *,
        source: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[int, core.Entry]]:
        """Entries whose canonical JSON contains ``text`` (and of ``source``/``kind``), oldest first.

        A scan of every entry (``instr`` on the stored bytes): for an audit,
        not for a daemon. ``limit``: at most that many, the first found.
        """
        if not text:
            raise LedgerError("search for a text of one character or more")
        found: list[tuple[int, core.Entry]] = []
        with self._lock, self._errors("read"):
            rows = self._db.execute(
                "SELECT idx, entry FROM leaves WHERE instr(entry, ?) > 0 ORDER BY idx",
                (text.encode("utf-8"),),
            )
            for index, raw in rows:
                if type(index) is not int:
                    raise self._tampered(f"an entry has the index {shown(index)}", 0)
                entry = self._parse_stored(index, index, raw)
                if (source is None or entry.source == source) and (
                    kind is None or entry.kind == kind
                ):
                    found.append((index, entry))
                    if limit is not None and len(found) >= limit:
                        break
        return found

    def tail(self, count: int) -> list[tuple[int, core.Entry]]:
        with self._lock, self._errors("read"):
            size = self._size()
        return self.entries(max(0, size - count), size)

    def inclusion_proof(self, index: int, size: int | None = None) -> core.InclusionProof:
        with self._lock, self._errors("read"):
            tree_size = self._check_size(size)
            if not 0 <= index < tree_size:
                raise LedgerError(f"leaf {index} is not in a tree of size {tree_size}")
            return self._fetched(
                lambda lookup: core.InclusionProof(
                    index,
                    tree_size,
                    core.tree_root(tree_size, lookup),
                    lookup(0, index),
                    tuple(core.inclusion_proof(index, tree_size, lookup)),
                )
            )

    def consistency_proof(self, size1: int, size2: int) -> core.ConsistencyProof:
        with self._lock, self._errors("read"):
            self._check_size(size2)
            if not 0 < size1 <= size2:
                raise LedgerError(f"a consistency proof needs 0 < OLD <= NEW, got {size1}, {size2}")
            return self._fetched(
                lambda lookup: core.ConsistencyProof(
                    size1,
                    size2,
                    core.tree_root(size1, lookup),
                    core.tree_root(size2, lookup),
                    tuple(core.consistency_proof(size1, size2, lookup)),
                )
            )

    # ---- appending --------------------------------------------------------

    def append(
        self,
        *,
        source: str,
        kind: str,
        subject: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one entry in its own durable transaction; returns its leaf index."""
        raw = core.make_entry(ts=self.clock(), source=source, kind=kind, subject=subject, data=data)
        return self.append_raw([raw])

    def append_many(self, entries: Iterable[Mapping[str, Any]]) -> range:
        """Append a batch in one transaction; each item has ``append``'s keywords.

        Nothing is written unless every entry is valid. Returns the indices.
        """
        raws = []
        for number, entry in enumerate(entries):
            unknown = set(entry) - {"source", "kind", "subject", "data"}
            if unknown:
                raise EntryError(f"entry {number}: unknown field {sorted(unknown)[0]!r}")
            raws.append(
                core.make_entry(
                    ts=self.clock(),
                    source=entry.get("source", ""),
                    kind=entry.get("kind", ""),
                    subject=entry.get("subject", ""),
                    data=entry.get("data"),
                )
            )
        first = self.append_raw(raws)
        return range(first, first + len(raws))

    def append_raw(self, raws: Sequence[bytes]) -> int:
        """Append canonical entry bytes (from :func:`core.make_entry`); returns the first index."""
        with self._write("append to"):
            size = self._size()
            if not raws:
                return size
            builder = self._fetched(lambda lookup: core.TreeBuilder.resume(size, lookup))
            hashes = builder.append_entries(raws)
            self._db.executemany(
                "INSERT INTO leaves (idx, entry, hashes) VALUES (?, ?, ?)",
                zip(range(size, size + len(raws)), raws, hashes, strict=True),
            )
            self._db.execute(
                "UPDATE meta SET value = ? WHERE key = 'size'", (str(size + len(raws)),)
            )
        return size

    # ---- checkpoints --------------------------------------------------------

    def checkpoint(self, signer: core.Signer) -> StoredCheckpoint:
        """Sign the current tree head, store the note, write the head file and return it.

        Refused with a :class:`TamperError` when the tree does not extend the
        head file's checkpoint (the log went back, or was rewritten): signing
        it would hide that.
        """
        with self._write("checkpoint"):
            size = self._size()
            head = self._read_head()
            if head is not None:
                self._check_extends_head(head, signer.verifier, size)
            root = self._fetched(lambda lookup: core.tree_root(size, lookup))
            note = core.sign_checkpoint(core.Checkpoint(signer.name, size, root), signer)
            latest = self._latest_checkpoint()
            if latest is not None and latest.note == note:
                stored = latest
            else:
                created = core.format_ts(self.clock())
                cursor = self._db.execute(
                    "INSERT INTO checkpoints (size, note, created) VALUES (?, ?, ?)",
                    (size, note, created),
                )
                assert cursor.lastrowid is not None
                stored = StoredCheckpoint(cursor.lastrowid, size, note, created)
            # Under the write lock, so concurrent checkpoints replace it in order.
            if head != note:
                self._write_head(note)
            return stored

    def checkpoint_if_grown(self, signer: core.Signer) -> StoredCheckpoint | None:
        """:meth:`checkpoint` if the ledger grew since the last one, else None.

        What a daemon calls on a timer and at shutdown: when nothing was
        appended it costs two small reads (the sizes in the database and in
        the head file) and signs nothing. An empty ledger is not signed.
        """
        with self._lock, self._errors("read"):
            size = self._size()
            latest = self._db.execute(
                "SELECT size FROM checkpoints ORDER BY id DESC LIMIT 1"
            ).fetchone()
        head = self._read_head()
        if head is None and size == 0:
            return None
        head_lines = head.split("\n", 2) if head is not None else []
        head_size = head_lines[1] if len(head_lines) > 2 else None
        if latest is not None and latest[0] == size and head_size == str(size):
            return None
        return self.checkpoint(signer)

    def _latest_checkpoint(self) -> StoredCheckpoint | None:
        row = self._db.execute(
            "SELECT id, size, note, created FROM checkpoints ORDER BY id DESC LIMIT 1"
        ).fetchone()
        return None if row is None else self._stored_checkpoint(row)

    def _stored_checkpoint(self, row: tuple[Any, ...]) -> StoredCheckpoint:
        """A row of ``checkpoints`` with the types keel writes, or a :class:`TamperError`."""
        ident, size, note, created = row
        valid_size = type(size) is int and size >= 0
        if type(ident) is not int:
            problem = f"a checkpoint is stored under the id {shown(ident)} ({_sql_type(ident)})"
        elif not valid_size:
            problem = f"checkpoint {ident} has the size {shown(size)} ({_sql_type(size)})"
        elif type(note) is not str:
            problem = f"checkpoint {ident}'s note is {_sql_type(note)}, not text"
        elif type(created) is not str or not core.TIMESTAMP.fullmatch(created):
            problem = f"checkpoint {ident}'s time is {shown(created)} ({_sql_type(created)})"
        else:
            return StoredCheckpoint(ident, size, note, created)
        raise self._tampered(problem, size if valid_size else 0)

    def checkpoints(self) -> list[StoredCheckpoint]:
        with self._lock, self._errors("read"):
            rows = self._db.execute(
                "SELECT id, size, note, created FROM checkpoints ORDER BY id"
            ).fetchall()
            return [self._stored_checkpoint(row) for row in rows]

    # ---- the head file ------------------------------------------------------

    def _read_head(self) -> str | None:
        """The head file's note, None if there is none; damage is a :class:`TamperError`."""
        path = self.head_path
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_HEAD_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_HEAD_BYTES:
            raise self._tampered(f"{path} is larger than a signed checkpoint can be", 0)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self._tampered(f"{path} is not text, so not a signed checkpoint", 0) from None

    def _write_head(self, note: str) -> None:
        try:
            write_durably(self.head_path, note.encode("utf-8"), mode=0o644, replace=True)
        except OSError as exc:
            raise StoreError(f"cannot write {self.head_path}: {exc.strerror or exc}") from None

    def _head_label(self) -> str:
        return f"its last signed checkpoint ({self.head_path})"

    def _went_back(self, size: int, head_size: int) -> TamperError:
        return TamperError(
            f"{self.path}: the ledger went back: it holds {size} entries, but "
            f"{self._head_label()} commits to {head_size}: entries {size}..{head_size - 1} "
            "were lost (a deleted or lost -wal file, a restored backup, deleted rows). "
            f"To go on without them, keep {self.head_path.name} elsewhere as evidence, "
            "remove it and sign a new checkpoint",
            size,
        )

    def _check_extends_head(self, note: str, verifier: core.Verifier, size: int) -> None:
        """Does the stored tree still extend the head file's checkpoint? (O(log n) reads)."""
        head = self._open_checkpoint(self._head_label(), note, verifier, None)
        if head.size > size:
            raise self._went_back(size, head.size)
        root = self._fetched(lambda lookup: core.tree_root(head.size, lookup))
        if root != head.root:
            raise self._tampered(
                f"the first {head.size} entries no longer match {self._head_label()}; "
                "run `keel ledger verify`",
                0,
            )

    # ---- verification -------------------------------------------------------

    def verify(
        self,
        verifier: core.Verifier | None,
        external: Sequence[tuple[str, str]] = (),
    ) -> VerifyReport:
        """Recompute the whole tree from the stored entries and check everything.

        Every leaf hash is recomputed from its entry, every stored subtree
        hash from its leaves, every stored checkpoint's signature (with
        ``verifier``; skipped when it is None) and root, and each ``external``
        ``(label, signed note)`` checkpoint (an older one kept elsewhere) must
        verify with ``verifier`` and be a prefix of this tree. So must the
        head file's checkpoint, when there is one: a tree shorter than it
        went back. The first problem raises :class:`TamperError` with the
        first bad leaf index.

        It reads one snapshot (a read transaction), so appends by other
        processes meanwhile neither disturb it nor wait for it.
        """
        with self._lock, self._errors("verify"):
            self._db.execute("BEGIN")
            try:
                return self._verify_snapshot(verifier, external)
            finally:
                if self._db.in_transaction:
                    self._db.execute("COMMIT")

    def _verify_snapshot(
        self, verifier: core.Verifier | None, external: Sequence[tuple[str, str]]
    ) -> VerifyReport:
        stored = [
            self._stored_checkpoint(row)
            for row in self._db.execute(
                "SELECT id, size, note, created FROM checkpoints ORDER BY id"
            ).fetchall()
        ]
        targets: dict[int, list[tuple[str, bytes]]] = {}
        for earlier, later in itertools.pairwise(stored):
            if earlier.id == later.id:
                raise self._tampered(f"checkpoint {later.id} is stored twice", later.size)
        for checkpoint in stored:
            label = f"stored checkpoint {checkpoint.id} (size {checkpoint.size})"
            head = self._open_checkpoint(label, checkpoint.note, verifier, checkpoint.size)
            if head.size != checkpoint.size:
                raise self._tampered(
                    f"{label}: its note says size {head.size}; the checkpoint row was edited",
                    min(head.size, checkpoint.size),
                )
            targets.setdefault(head.size, []).append((label, head.root))
        if external and verifier is None:
            raise LedgerError("checking an external checkpoint needs a verifier key")
        for label, note in external:
            head = self._open_checkpoint(label, note, verifier, None)
            targets.setdefault(head.size, []).append((label, head.root))
        head_note = self._read_head()
        head_size = None
        if head_note is not None:
            head = self._open_checkpoint(self._head_label(), head_note, verifier, None)
            head_size = head.size
            targets.setdefault(head.size, []).append((self._head_label(), head.root))

        builder = core.TreeBuilder()
        good_prefix = 0  # leaves known to match a signed checkpoint

        def check_targets() -> None:
            nonlocal good_prefix
            for label, root in targets.pop(builder.size, []):
                if root != builder.root():
                    raise self._tampered(
                        f"the first {builder.size} entries do not match {label}: "
                        f"an entry from {good_prefix} on was changed, deleted or reordered",
                        good_prefix,
                    )
                good_prefix = builder.size

        recorded, records = self._db.execute(
            "SELECT (SELECT value FROM meta WHERE key = 'size'), "
            "(SELECT count(*) FROM meta WHERE key = 'size')"
        ).fetchone()
        cursor = self._db.execute("SELECT idx, entry, hashes FROM leaves ORDER BY idx")
        check_targets()
        while True:
            chunk = cursor.fetchmany(4096)
            if not chunk:
                break
            while chunk:
                # Up to the next checkpoint size, so each is checked at its size.
                upcoming = [size for size in targets if size > builder.size]
                room = min(upcoming) - builder.size if upcoming else len(chunk)
                part, chunk = chunk[:room], chunk[room:]
                self._verify_rows(builder, part)
                check_targets()
        size = builder.size
        recorded_size = self._recorded_size(recorded, records, size)
        if recorded_size != size:
            raise self._tampered(
                f"it records {recorded_size} entries but holds {size}: "
                f"entries from {size} on were deleted (truncated)",
                size,
            )
        if targets:
            larger = min(targets)
            only_head = all(
                label == self._head_label()
                for labelled in targets.values()
                for label, _ in labelled
            )
            if head_size is not None and only_head:
                raise self._went_back(size, head_size)
            raise self._tampered(
                f"it holds {size} entries but {targets[larger][0][0]} commits to {larger}: "
                f"entries from {size} on were deleted (truncated)",
                size,
            )
        return VerifyReport(
            size=size,
            root=builder.root(),
            checkpoints=len(stored),
            signatures_checked=verifier is not None,
            external=len(external),
            head=head_size,
        )

    def _verify_rows(self, builder: core.TreeBuilder, rows: list[tuple[Any, Any, Any]]) -> None:
        """Check consecutive stored rows against the tree ``builder`` recomputes."""
        start = builder.size
        for expected, (index, entry, hashes) in enumerate(rows, start):
            if type(index) is not int:
                raise self._tampered(
                    f"entry {expected} is missing: the next row has the index {shown(index)} "
                    f"({_sql_type(index)})",
                    expected,
                )
            if index != expected:
                if index == expected - 1:
                    problem = f"entry {index} is stored twice"
                elif index > expected:
                    problem = f"entry {expected} is missing (deleted)"
                else:
                    problem = (
                        f"entry {expected} is missing: the row in its place has the index {index}"
                    )
                raise self._tampered(problem, expected)
            if type(entry) is not bytes:
                raise self._tampered(
                    f"entry {index} is stored as {_sql_type(entry)}, not a blob", index
                )
            if type(hashes) is not bytes:
                raise self._tampered(
                    f"the hashes of entry {index} are stored as {_sql_type(hashes)}, not a blob",
                    index,
                )
        expected_rows = builder.append_entries([entry for _, entry, _ in rows])
        for offset, (index, _, hashes) in enumerate(rows):
            if hashes != expected_rows[offset]:
                want = expected_rows[offset]
                parts = [want[i : i + core.HASH_SIZE] for i in range(0, len(want), core.HASH_SIZE)]
                raise self._tampered(*_hash_mismatch(index, hashes, parts))

    def _open_checkpoint(
        self, label: str, note: str, verifier: core.Verifier | None, stored_size: int | None
    ) -> core.Checkpoint:
        try:
            if verifier is None:
                text = note[: note.rindex("\n\n") + 1] if "\n\n" in note else note
                return core.Checkpoint.parse(text)
            return core.open_checkpoint(note, verifier)
        except (ProofError, MalformedError) as exc:
            index = stored_size if stored_size is not None else 0
            raise self._tampered(f"{label}: {exc}", index) from None


def _hash_mismatch(index: int, stored: bytes, expected: list[bytes]) -> tuple[str, int]:
    """What a row whose hashes differ from the recomputed ones tells: (detail, first bad leaf)."""
    for slot, want in enumerate(expected):
        got = stored[slot * core.HASH_SIZE : (slot + 1) * core.HASH_SIZE]
        if got == want:
            continue
        if slot == 0:
            return f"entry {index} does not match its stored leaf hash (edited)", index
        first = index - (1 << slot) + 1
        return (
            f"entries {first}..{index} do not match their stored subtree hash: "
            "one of them was edited, replaced or reordered",
            first,
        )
    return f"entry {index} has extra stored hashes (damaged row)", index


def _connect(db_path: Path, uri: str, timeout: float) -> sqlite3.Connection:
    try:
        return sqlite3.connect(
            uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {db_path}: {exc}") from None


def _connect_read_only(
    db_path: Path, uri: str, timeout: float
) -> tuple[sqlite3.Connection, tuple[int, int, int] | None]:
    """A read-only connection, and the file's stamp if it had to be opened without locks."""
    connection = _connect(db_path, uri + "?mode=ro", timeout)
    try:
        connection.execute("PRAGMA application_id").fetchone()  # opens the WAL index
    except sqlite3.DatabaseError as exc:
        name = getattr(exc, "sqlite_errorname", "")
        if not (name.startswith("SQLITE_READONLY") or name == "SQLITE_CANTOPEN"):
            return connection, None  # opening goes on, and reports it
        connection.close()
    else:
        return connection, None
    # SQLite could neither use nor create the -shm file (a read-only directory).
    wal = db_path.with_name(db_path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise StoreError(
            f"cannot read {db_path} read-only: {wal.name} beside it holds changes that SQLite "
            f"reads only through a {db_path.name}-shm file, which this directory does not let "
            "it create: copy the database with its -wal file to a writable directory"
        )
    stamp = _stamp(db_path)
    return _connect(db_path, uri + "?immutable=1", timeout), stamp


_Queued = tuple[bytes, "asyncio.Future[int]"]


class AsyncLedger:
    """Appends from asyncio without blocking the event loop.

    One writer thread owns the writes; appends made while it is busy are
    queued and written together in the next transaction (group commit), each
    caller getting its own index back once that transaction is durable. A
    malformed entry fails its own ``append`` call at once and never reaches
    the queue.
    """

    MAX_BATCH = 1000

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-ledger")
        self._queue: asyncio.Queue[_Queued | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **options: Any) -> AsyncLedger:
        ledger = await asyncio.to_thread(Ledger.open, path, **options)
        return cls(ledger)

    async def append(
        self,
        *,
        source: str,
        kind: str,
        subject: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> int:
        raw = core.make_entry(
            ts=self.ledger.clock(), source=source, kind=kind, subject=subject, data=data
        )
        if self._closing:
            raise StoreError(f"the ledger {self.ledger.path} is closed")
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._writer = asyncio.create_task(self._write_batches(self._queue))
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((raw, done))
        return await done

    async def _write_batches(self, queue: asyncio.Queue[_Queued | None]) -> None:
        loop = asyncio.get_running_loop()
        finished = False
        while not finished:
            batch: list[_Queued] = []
            item = await queue.get()
            while True:
                if item is None:
                    finished = True
                    break
                batch.append(item)
                if queue.empty() or len(batch) >= self.MAX_BATCH:
                    break
                item = queue.get_nowait()
            if not batch:
                continue
            try:
                first = await loop.run_in_executor(
                    self._executor, self.ledger.append_raw, [raw for raw, _ in batch]
                )
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for offset, (_, done) in enumerate(batch):
                    if not done.done():
                        done.set_result(first + offset)

    async def checkpoint_if_grown(self, signer: core.Signer) -> StoredCheckpoint | None:
        """:meth:`Ledger.checkpoint_if_grown` on the writer thread, between two batches.

        On the same thread as the appends, so it neither blocks the event loop
        nor contends for SQLite's write lock with this daemon's own batches.
        """
        if self._closing:
            raise StoreError(f"the ledger {self.ledger.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.ledger.checkpoint_if_grown, signer
        )

    async def aclose(self) -> None:
        """Write what is queued, then close the ledger."""
        self._closing = True
        if self._queue is not None and self._writer is not None:
            self._queue.put_nowait(None)
            await self._writer
        await asyncio.get_running_loop().run_in_executor(self._executor, self.ledger.close)
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
