"""Any value of any SQLite type in any column: a tampering verdict, never a crash.

Someone with write access to ``ledger.db`` can put anything in it: a note as a
blob, a size of ``'abc'``, an entry of ``12345``, a hash one byte short. Every
command reading it must answer with keel's one-line error (for ``verify``:
``the ledger was tampered with: ...``, exit 1), or work; no other exception
may escape. The tables are rebuilt without types and constraints first (what
an editor of the file can do), so every value reaches every column as given.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keel.cli
import pytest
from keel.cli import main
from keel.ledger import Ledger
from keel.ledger.keys import signer_for

COLUMNS = {
    "meta": ("key", "value"),
    "leaves": ("idx", "entry", "hashes"),
    "checkpoints": ("id", "size", "note", "created"),
}


@dataclass(frozen=True)
class Sql:
    """A value written as an SQL expression (what Python's sqlite3 cannot bind)."""

    expression: str


VALUES: dict[str, object] = {
    "NULL": None,
    "int 0": 0,
    "int -1": -1,
    "int 12345": 12345,
    "int max": 2**63 - 1,
    "int min": -(2**63),
    "real 1.5": 1.5,
    "real -0.0": -0.0,
    "real 1e308": 1e308,
    "text empty": "",
    "text abc": "abc",
    "text 12": "12",
    "text 007": "007",
    "text accent": "\u00e9t\u00e9",
    "text newline": "a\nb",
    "text 100 KB": "x" * 100_000,
    "text not UTF-8": Sql("CAST(X'fffe41' AS TEXT)"),
    "blob empty": b"",
    "blob abc": b"abc",
    "blob 31 bytes": bytes(31),
    "blob 32 bytes": bytes(32),
    "blob 33 bytes": bytes(33),
    "blob 64 bytes": b"\x01" * 64,
    "blob 100 KB": b"\xa5" * 100_000,
}

COMMANDS = [
    ["verify"],
    ["verify", "--json"],
    ["tail", "-n", "25"],
    ["prove", "inclusion", "3"],
    ["prove", "consistency", "4", "20"],
    ["key"],
    ["checkpoint"],
    ["append", "--source", "s", "--kind", "k"],
]


def loosen(db: Path) -> None:
    """Rebuild every table with the same columns but no types or constraints."""
    connection = sqlite3.connect(db)
    with connection:
        for table, columns in COLUMNS.items():
            names = ", ".join(columns)
            connection.execute(f"CREATE TABLE loose_{table} ({names})")
            connection.execute(f"INSERT INTO loose_{table} SELECT {names} FROM {table}")
            connection.execute(f"DROP TABLE {table}")
            connection.execute(f"ALTER TABLE loose_{table} RENAME TO {table}")
    connection.close()


@pytest.fixture(scope="module")
def loose_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 entries, checkpoints at 4, 12 and 20 (so a head file), tables loosened."""
    folder = tmp_path_factory.mktemp("loose")
    db = folder / "ledger.db"
    with Ledger.open(db, clock=lambda: 1_700_000_000.0) as ledger:
        signer = signer_for(ledger)
        for index in range(20):
            ledger.append(source="watch", kind="restart", data={"attempt": index})
            if index + 1 in (4, 12, 20):
                ledger.checkpoint(signer)
    loosen(db)
    return folder


def copy_of(template: Path, into: Path) -> Path:
    into.mkdir()
    for path in template.iterdir():
        if path.is_file():
            shutil.copy2(path, into / path.name)
    return into / "ledger.db"


def tamper(db: Path, table: str, column: str, value: object, rows: str) -> None:
    where = "" if rows == "all" else f" WHERE rowid = (SELECT rowid FROM {table} LIMIT 1 OFFSET 1)"
    connection = sqlite3.connect(db)
    with connection:
        if isinstance(value, Sql):
            connection.execute(f"UPDATE {table} SET {column} = {value.expression}{where}")
        else:
            connection.execute(f"UPDATE {table} SET {column} = ?{where}", (value,))
    connection.close()


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: thousands of fsyncs cost nothing there."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="keel-tamper-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def one_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build ``keel``'s argument parser once, not for each of the thousands of runs."""
    monkeypatch.setattr(keel.cli, "build_parser", functools.cache(keel.cli.build_parser))


def run(db: Path, command: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``keel ledger COMMAND --db DB`` in this process; any exception but keel's fails."""
    code = main(["ledger", *command, "--db", str(db)])
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (command, code)
    if code and "--json" in command and not err:  # the verdict as JSON on stdout
        verdict = json.loads(out)
        assert verdict["ok"] is False, out
        err = f"keel: error: {verdict['problem']}\n"
    if code:
        assert err.startswith("keel: error: "), (command, err)
        assert err.count("\n") == 1, (command, err)
        assert len(err) < 1000, (command, err[:300])  # long values are cut, never echoed
    return code, err


def harmless(table: str, column: str, value: object) -> bool:
    """Changes that do not alter what the ledger says: checkpoint ids only order the rows."""
    return (table, column) == ("checkpoints", "id") and type(value) is int


CASES = [
    (table, column, rows)
    for table, columns in COLUMNS.items()
    for column in columns
    for rows in (("all",) if table == "meta" else ("one", "all"))
]


@pytest.mark.parametrize(("table", "column", "rows"), CASES, ids=str)
def test_every_value_in_every_column(
    loose_template: Path,
    scratch: Path,
    capsys: pytest.CaptureFixture[str],
    table: str,
    column: str,
    rows: str,
) -> None:
    for number, (label, value) in enumerate(VALUES.items()):
        db = copy_of(loose_template, scratch / str(number))
        tamper(db, table, column, value, rows)
        for command in COMMANDS:
            code, err = run(db, command, capsys)
            if command == ["verify"] and not harmless(table, column, value):
                assert code == 1, (label, err)
                assert "the ledger was tampered with" in err, (label, err)


def test_rows_added_and_removed(
    loose_template: Path, scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Beyond values: a missing or doubled leaf count, stray and doubled rows."""
    changes = {
        "no leaf count": "DELETE FROM meta",
        "two leaf counts": "INSERT INTO meta SELECT * FROM meta",
        "doubled leaf": "INSERT INTO leaves SELECT * FROM leaves WHERE idx = 7",
        "stray leaf": "INSERT INTO leaves SELECT 99, entry, hashes FROM leaves WHERE idx = 7",
        "doubled checkpoint": "INSERT INTO checkpoints SELECT * FROM checkpoints WHERE size = 12",
        "checkpoint beyond the end": "UPDATE checkpoints SET size = 25 WHERE size = 20",
    }
    for number, (label, statement) in enumerate(changes.items()):
        db = copy_of(loose_template, scratch / str(number))
        connection = sqlite3.connect(db)
        with connection:
            connection.execute(statement)
        connection.close()
        for command in COMMANDS:
            code, err = run(db, command, capsys)
            if command == ["verify"]:
                assert code == 1, (label, err)
                assert "the ledger was tampered with" in err, (label, err)


ISSUE_EXAMPLES = {
    "a note stored as a blob": "UPDATE checkpoints SET note = CAST(note AS BLOB) WHERE size = 12",
    "a size of 'abc'": "UPDATE checkpoints SET size = 'abc' WHERE size = 12",
    "a meta value of 'abc'": "UPDATE meta SET value = 'abc'",
    "an entry of 12345": "UPDATE leaves SET entry = 12345 WHERE idx = 5",
}


@pytest.mark.parametrize("statement", ISSUE_EXAMPLES.values(), ids=list(ISSUE_EXAMPLES))
def test_the_issue_examples_end_to_end(tmp_path: Path, statement: str) -> None:
    """The reported cases, with the schema as keel made it, through the real command."""
    folder = tmp_path / "state"
    folder.mkdir()
    db = folder / "ledger.db"
    with Ledger.open(db) as ledger:
        signer = signer_for(ledger)
        for index in range(20):
            ledger.append(source="watch", kind="restart", data={"attempt": index})
            if index + 1 in (4, 12):
                ledger.checkpoint(signer)
    connection = sqlite3.connect(db)
    with connection:
        connection.execute(statement)
    connection.close()
    for command in (["verify"], ["tail"], ["append", "--source", "s", "--kind", "k"]):
        result = subprocess.run(
            [sys.executable, "-m", "keel", "ledger", *command, "--db", str(db)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert "Traceback" not in result.stderr, (command, result.stderr)
        if command == ["verify"]:
            assert result.returncode == 1, result.stderr
            assert result.stderr.startswith("keel: error: "), result.stderr
            assert "the ledger was tampered with" in result.stderr
            assert result.stderr.count("\n") == 1
        elif result.returncode:
            assert result.stderr.startswith("keel: error: "), result.stderr
            assert result.stderr.count("\n") == 1
