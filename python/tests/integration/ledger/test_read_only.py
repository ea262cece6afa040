"""An auditor's read-only copy: verify, tail and prove read it, and write nothing (item 10).

The copy is mode 0444 in a 0555 directory, read by a process that cannot
write there: as root (which ignores modes) the process drops
CAP_DAC_OVERRIDE and CAP_FOWNER with ``setpriv``; or the directory is a
read-only bind mount in a private mount namespace (``unshare``), which binds
root too.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from keel.ledger import Ledger
from keel.ledger.keys import load_signer

from tests.harness.processes import Lines, Processes

from .conftest import Populated, assert_one_line_error


def no_write_permission(folder: Path) -> list[str]:
    """The command prefix that takes away the right to write to ``folder``'s files."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("as root, modes bind nobody and setpriv (util-linux) is missing")
    return [setpriv, "--bounding-set=-dac_override,-fowner", "--"]


def read_only_mount(folder: Path) -> list[str]:
    """The command prefix that runs it with ``folder`` mounted read-only (root only)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("a read-only bind mount needs root and unshare (util-linux)")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", script, str(folder)]


PREFIXES = {"no write permission": no_write_permission, "read-only mount": read_only_mount}


def seal(folder: Path) -> None:
    for path in folder.iterdir():
        path.chmod(0o444)
    folder.chmod(0o555)


@pytest.fixture
def auditor_copy(populated: Populated, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The database alone (no key, no head), sealed; and the verifier key to check it with."""
    verifier = str(load_signer(populated.key).verifier)
    folder = tmp_path / "audit"
    folder.mkdir()
    shutil.copy(populated.db, folder / "ledger.db")
    seal(folder)
    yield folder / "ledger.db", verifier
    folder.chmod(0o755)


def keel_as(prefix: list[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "keel", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def cannot_write(prefix: list[str], folder: Path) -> None:
    """The setting really takes the right away (or the test would prove nothing)."""
    probe = keel_as(prefix, "ledger", "append", "--db", folder / "ledger.db", "--source", "a")
    assert probe.returncode == 2  # (a usage error: --kind is missing; just starting it works)
    # The probe says why it failed in one line (a traceback would fail the test).
    script = (
        f"import sys\ntry:\n    open({str(folder / 'probe')!r}, 'w')\n"
        "except OSError as e:\n    sys.exit(f'refused: {e}')"
    )
    attempt = subprocess.run(
        [*prefix, sys.executable, "-c", script],
        capture_output=True,
        check=False,
    )
    assert attempt.returncode != 0, "the directory can still be written to"


@pytest.mark.parametrize("how", list(PREFIXES))
def test_read_commands_on_a_read_only_copy(auditor_copy: tuple[Path, str], how: str) -> None:
    db, verifier = auditor_copy
    prefix = PREFIXES[how](db.parent)
    cannot_write(prefix, db.parent)
    before = sorted(p.name for p in db.parent.iterdir())

    result = keel_as(prefix, "ledger", "verify", "--db", db, "--verifier-key", verifier)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 20 entries")
    assert "3 stored checkpoints" in result.stdout
    result = keel_as(prefix, "ledger", "tail", "--db", db, "-n", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["index"] for line in result.stdout.splitlines()] == [18, 19]
    for proof in (["inclusion", "5"], ["consistency", "4", "20"]):
        result = keel_as(prefix, "ledger", "prove", *proof, "--db", db)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["proof"]
    # Writing is refused with one line, and changes nothing.
    result = keel_as(prefix, "ledger", "append", "--db", db, "--source", "s", "--kind", "k")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"can this user write to {db.parent}?")
    assert sorted(p.name for p in db.parent.iterdir()) == before


def copy_live(populated: Populated, folder: Path, *, with_shm: bool) -> Path:
    """A copy taken while a writer holds the ledger: the newest entries only in its -wal."""
    folder.mkdir()
    with Ledger.open(populated.db) as writer:
        for n in range(7):
            writer.append(source="late", kind="k", data={"n": n})
        names = ["ledger.db", "ledger.db-wal"] + (["ledger.db-shm"] if with_shm else [])
        for name in names:
            shutil.copy(populated.db.with_name(name), folder / name)
    assert (folder / "ledger.db-wal").stat().st_size > 0
    seal(folder)
    return folder / "ledger.db"


def test_live_copy_with_its_wal(populated: Populated, tmp_path: Path) -> None:
    verifier = str(load_signer(populated.key).verifier)
    db = copy_live(populated, tmp_path / "with-shm", with_shm=True)
    prefix = no_write_permission(db.parent)
    try:
        result = keel_as(prefix, "ledger", "verify", "--db", db, "--verifier-key", verifier)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok: 27 entries")  # the 7 in the -wal included
        # Without the -shm file, the -wal cannot be read in a read-only directory: say so.
        db = copy_live(populated, tmp_path / "without-shm", with_shm=False)
        result = keel_as(prefix, "ledger", "verify", "--db", db, "--verifier-key", verifier)
        assert result.returncode == 1
        assert_one_line_error(
            result.stderr, "copy the database with its -wal file to a writable directory"
        )
    finally:
        for folder in tmp_path.iterdir():
            folder.chmod(0o755)


READER = """
import sys
from keel.errors import KeelError
from keel.ledger import Ledger

ledger = Ledger.open(sys.argv[1], read_only=True)
print("opened", ledger.size(), flush=True)
sys.stdin.readline()
try:
    print("size", ledger.size(), flush=True)
except KeelError as exc:
    print("refused", exc, flush=True)
"""


def test_unlocked_read_notices_a_change(
    populated: Populated, tmp_path: Path, processes: Processes
) -> None:
    """Read without locks (no -shm possible), a file that changes is not trusted."""
    folder = tmp_path / "audit"
    folder.mkdir()
    db = folder / "ledger.db"
    shutil.copy(populated.db, db)
    db.chmod(0o644)
    folder.chmod(0o555)
    try:
        prefix = no_write_permission(folder)
        reader = processes.popen(
            [*prefix, sys.executable, "-c", READER, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        lines = Lines(reader.stdout)
        assert lines.next() == "opened 20"
        with Ledger.open(db) as writer:  # as root, or the owner: a writer appears
            writer.append(source="s", kind="k")
        assert reader.stdin is not None
        reader.stdin.write(b"go\n")
        reader.stdin.flush()
        assert lines.next().startswith(f"refused {db} changed while it was read without locks")
        assert reader.wait(timeout=60) == 0
    finally:
        folder.chmod(0o755)
    assert stat.S_IMODE(db.stat().st_mode) == 0o644
