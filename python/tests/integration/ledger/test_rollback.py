"""A ledger that went back is noticed (issue 8, item 7).

Deleting the ``-wal`` file under a writer that is then killed loses what the
file held, although every append was acknowledged; SQLite cannot help it, and
the shorter ledger is a perfectly consistent tree. What tells is the head file
beside the database (``ledger.db.head``), which every checkpoint replaces with
its signed note: ``verify`` finds the ledger shorter than its own last signed
checkpoint, and ``checkpoint`` refuses to sign the shorter tree.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from keel.ledger import Ledger, TamperError, core
from keel.ledger.keys import create_signer, load_signer

from tests.harness.processes import Lines, Processes

from .conftest import assert_one_line_error, keel, ok

# Appends and signs when told on stdin, acknowledging each on stdout. It signs
# with Ledger.checkpoint, as `keel ledger checkpoint` and the daemons do.
WRITER = """
import sys
from pathlib import Path
from keel.ledger import Ledger
from keel.ledger.keys import create_signer

db = Path(sys.argv[1])
ledger = Ledger.open(db)
signer = create_signer(db.with_name("ledger.key"), "test/keel/ledger")
for line in sys.stdin:
    command, _, count = line.strip().partition(" ")
    if command == "append":
        for n in range(int(count)):
            print("ack", ledger.append(source="writer", kind="tick", data={"n": n}), flush=True)
    elif command == "checkpoint":
        print("signed", ledger.checkpoint(signer).size, flush=True)
"""


class Writer:
    def __init__(self, processes: Processes, db: Path) -> None:
        self.process = processes.popen(
            [sys.executable, "-c", WRITER, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines = Lines(self.process.stdout)

    def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()

    def append(self, count: int) -> int:
        """Appends ``count`` entries; the last acknowledged index."""
        self.tell(f"append {count}")
        acks = [self.lines.next() for _ in range(count)]
        return int(acks[-1].split()[1])

    def checkpoint(self) -> int:
        self.tell("checkpoint")
        word, size = self.lines.next().split()
        assert word == "signed"
        return int(size)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)


def held(db: Path) -> int:
    connection = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    (count,) = connection.execute("SELECT count(*) FROM leaves").fetchone()
    connection.close()
    return int(count)


def test_deleted_wal_under_a_killed_writer(tmp_path: Path, processes: Processes) -> None:
    # SQLite copies the log into the database every ~1000 pages; a copy that
    # happens to follow the last checkpoint exactly would save everything
    # (nothing lost, nothing to report), so the scenario is tried up to 3 times.
    losses = 0
    for attempt in range(3):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        db = folder / "ledger.db"
        writer = Writer(processes, db)
        assert writer.append(300) == 299
        assert writer.checkpoint() == 300
        (folder / "ledger.db-wal").unlink()  # under the running writer
        assert writer.append(300 + attempt) == 599 + attempt  # all acknowledged
        signed = writer.checkpoint()
        assert signed == 600 + attempt
        writer.kill()
        left = held(db)
        if left == signed:
            continue
        losses += 1
        assert left < signed
        result = keel("ledger", "verify", "--db", db)
        assert result.returncode == 1, result.stdout
        assert_one_line_error(
            result.stderr, f"the ledger went back: it holds {left} entries, but its last signed"
        )
        assert f"commits to {signed}: entries {left}..{signed - 1} were lost" in result.stderr
        report = keel("ledger", "verify", "--db", db, "--json")
        assert report.returncode == 1
        assert f'"firstBadIndex": {left}' in report.stdout
        # The periodic signer cannot paper over it: signing the shorter tree is refused.
        refused = keel("ledger", "checkpoint", "--db", db)
        assert refused.returncode == 1
        assert_one_line_error(refused.stderr, "the ledger went back")
        # The documented way on: keep the head file as evidence, then sign anew.
        shutil.move(folder / "ledger.db.head", folder / "lost.head")
        ok("ledger", "checkpoint", "--db", db)
        assert ok("ledger", "verify", "--db", db).startswith(f"ok: {left} entries")
        break
    assert losses == 1, "the log never lost anything: the scenario did not happen"


def test_restored_backup_is_noticed(tmp_path: Path) -> None:
    """The same from an old copy of the database put back in place."""
    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        signer = create_signer(tmp_path / "ledger.key", "test/keel/ledger")
        for n in range(10):
            ledger.append(source="s", kind="k", data={"n": n})
        ledger.checkpoint(signer)
    backup = tmp_path / "backup.db"
    shutil.copy(db, backup)
    with Ledger.open(db) as ledger:
        for n in range(10, 25):
            ledger.append(source="s", kind="k", data={"n": n})
        ledger.checkpoint(signer)
    shutil.copy(backup, db)
    with (
        Ledger.open(db, read_only=True) as ledger,
        pytest.raises(
            TamperError, match=r"went back: it holds 10 entries.*commits to 25"
        ) as caught,
    ):
        ledger.verify(signer.verifier)
    assert caught.value.index == 10


def test_head_file_edited_or_swapped(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    signer = create_signer(tmp_path / "ledger.key", "test/keel/ledger")
    with Ledger.open(db) as ledger:
        for n in range(5):
            ledger.append(source="s", kind="k", data={"n": n})
        ledger.checkpoint(signer)
    head = tmp_path / "ledger.db.head"
    note = head.read_text()
    assert note.startswith("test/keel/ledger\n5\n")
    assert head.stat().st_mode & 0o777 == 0o644
    stranger = core.Signer("test/keel/ledger", bytes(32))
    cases: dict[str, str | bytes] = {
        "does not verify": note.replace("\n5\n", "\n4\n"),
        "not signed by a trusted key": core.sign_checkpoint(
            core.Checkpoint("test/keel/ledger", 5, bytes(32)), stranger
        ),
        "a signed note is text": "garbage",
        "not text": b"\xff\xfe",
        "larger than a signed checkpoint": "x" * 70_000,
    }
    for needle, content in cases.items():
        if isinstance(content, bytes):
            head.write_bytes(content)
        else:
            head.write_text(content)
        for command in (["verify"], ["checkpoint"]):
            result = keel("ledger", *command, "--db", db)
            assert result.returncode == 1, (needle, command)
            assert_one_line_error(result.stderr, needle)
    head.write_text(note)
    assert ok("ledger", "verify", "--db", db).splitlines()[-1].endswith(f"({head}, size 5)")
    assert load_signer(tmp_path / "ledger.key") == signer
