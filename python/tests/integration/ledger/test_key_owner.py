"""Whose ledger key it is: the owner of its directory makes it, owns it, and alone signs.

Many daemons append to one ledger as different users; the key is made by
the owner of its directory (root, for /var/lib/keel) and only processes
running as that user sign by default. Here root and ``nobody`` (through
``setpriv``) share a ledger in a directory both can write, as the daemons of
a NixOS host share /var/lib/keel (2770 root:keel).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from keel.config import Section
from keel.ledger import Ledger
from keel.ledger.errors import KeyFileError
from keel.ledger.keys import create_signer, load_signer, provision, signs_here
from keel.service import Common, read_common

from .conftest import assert_one_line_error

NOBODY = 65534
KEEL = [sys.executable, "-m", "keel"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to run processes as another user",
)

# What a daemon's shell does with its ledger: read_common, then the Recorder.
DAEMON = """
import asyncio, json, sys
from pathlib import Path
from keel.config import Section
from keel.ledger.recorder import Recorder
from keel.service import read_common

async def main():
    cfg = Section(json.loads(sys.argv[1]), source="daemon.json")
    common = read_common(cfg, "probe")
    recorder = Recorder(common.ledger, "probe", checkpoint_every=common.checkpoint_every)
    await recorder.start()
    recorder.record("start", "probe")
    await recorder.close()
    print(json.dumps(recorder.status()))

asyncio.run(main())
"""


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory of root's that ``nobody`` may write in, as /var/lib/keel is the keel group's.

    Outside pytest's own temporary directory, which only root may enter.
    """
    top = Path(tempfile.mkdtemp(prefix="keel-key-owner-"))
    try:
        top.chmod(0o755)
        directory = top / "keel"
        directory.mkdir()
        directory.chmod(0o1777)
        yield directory
    finally:
        shutil.rmtree(top)


def as_nobody(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "KEEL_DEV": "1"},
    )


def daemon_as_nobody(config: dict[str, object], cwd: Path) -> dict[str, object]:
    result = as_nobody(sys.executable, "-c", DAEMON, json.dumps(config), cwd=cwd)
    assert result.returncode == 0, result.stderr
    status: dict[str, object] = json.loads(result.stdout)
    return status


def test_only_the_owner_of_the_directory_makes_the_key(shared: Path) -> None:
    db = shared / "ledger.db"
    with Ledger.open(db) as ledger:
        ledger.append(source="watch", kind="start")
    db.chmod(0o666)
    # nobody started first: it may append, but it may not make the key its own.
    result = as_nobody(
        sys.executable, "-m", "keel", "ledger", "checkpoint", "--db", str(db), cwd=shared
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "it is made by the owner of")
    assert f"({shared}) belongs" not in result.stderr
    assert "(root), and this process runs as nobody (uid 65534)" in result.stderr
    assert "run `keel ledger key --provision` as root" in result.stderr
    assert not (shared / "ledger.key").exists()
    # root, the owner, makes it.
    signer = create_signer(shared / "ledger.key", "host/keel/ledger")
    assert (shared / "ledger.key").stat().st_uid == 0
    assert stat.S_IMODE((shared / "ledger.key").stat().st_mode) == 0o600
    assert load_signer(shared / "ledger.key") == signer


def test_root_does_not_make_a_key_in_another_users_directory(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(KeyFileError, match=r"owner of .*theirs \(nobody \(uid 65534\)\)"):
        create_signer(theirs / "ledger.key", "host/keel/ledger")
    assert not (theirs / "ledger.key").exists()
    assert signs_here(tmp_path / "ledger.key")
    assert not signs_here(theirs / "ledger.key")
    # A directory not made yet is made in its parent, and so is its owner's.
    assert not signs_here(theirs / "later" / "ledger.key")


def test_a_daemon_signs_by_default_only_as_the_owner_of_the_key(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)

    def common(ledger: Path, **more: object) -> Common:
        return read_common(Section({"ledger": str(ledger), **more}, source="x.json"), "x")

    assert common(mine / "ledger.db").checkpoint_every == 300
    assert common(theirs / "ledger.db").checkpoint_every is None
    # Said in the config, it stands (a host whose key is that daemon's user's).
    assert common(theirs / "ledger.db", checkpoint_every=60).checkpoint_every == 60
    assert common(mine / "ledger.db", checkpoint_every=None).checkpoint_every is None


def test_two_daemons_as_two_users_one_signs_the_other_never_tries(shared: Path) -> None:
    db = shared / "ledger.db"
    with Ledger.open(db) as ledger:
        ledger.append(source="watch", kind="start")
    for path in shared.iterdir():
        path.chmod(0o666)
    # nobody's daemon first: no key yet, and it makes none.
    status = daemon_as_nobody({"ledger": str(db)}, cwd=shared)
    assert status["checkpoint_every"] is None
    assert status["checkpoints"] == 0
    assert status["checkpoint_problem"] is None
    assert status["appended"] == 1
    assert not (shared / "ledger.key").exists()
    # root's daemon signs everything, nobody's entry included.
    root = subprocess.run(
        [sys.executable, "-c", DAEMON, json.dumps({"ledger": str(db)})],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=shared,
    )
    assert root.returncode == 0, root.stderr
    signed = json.loads(root.stdout)
    assert signed["checkpoint_every"] == 300
    assert signed["checkpoint_problem"] is None
    assert signed["last_checkpoint_size"] == 3
    assert (shared / "ledger.key").stat().st_uid == 0
    with Ledger.open(db, read_only=True) as ledger:
        assert ledger.verify(load_signer(shared / "ledger.key").verifier).head == 3
        assert [e.source for _, e in ledger.entries(0, 3)] == ["watch", "probe", "probe"]
    # Told to sign anyway, nobody's daemon says whose the key is and the way out.
    status = daemon_as_nobody({"ledger": str(db), "checkpoint_every": 60}, cwd=shared)
    problem = str(status["checkpoint_problem"])
    assert "it belongs to root and this process runs as nobody (uid 65534)" in problem
    assert "a daemon running as another user should have checkpoint_every null" in problem


def test_provision_takes_back_a_key_another_user_made(shared: Path) -> None:
    key = shared / "ledger.key"
    signer = create_signer(key, "host/keel/ledger")
    os.chown(key, NOBODY, NOBODY)  # as an older keel let the first daemon to start make it
    # nobody may not provision in root's directory.
    result = as_nobody(
        sys.executable, "-m", "keel", "ledger", "key", "--provision", "--key", str(key), cwd=shared
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "belongs to the owner of")
    assert key.stat().st_uid == NOBODY
    # root takes it back: the same key, root's, still 0600.
    result = subprocess.run(
        [*KEEL, "ledger", "key", "--provision", "--json", "--db", str(shared / "ledger.db")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ, KEEL_DEV="1"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verifierKey"] == str(signer.verifier)
    assert key.stat().st_uid == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert provision(key) == signer  # again: nothing to do
    # A key others can read is refused, not taken back: it may have leaked.
    key.chmod(0o640)
    with pytest.raises(KeyFileError, match="readable by others"):
        provision(key)
