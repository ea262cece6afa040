"""Helpers for the ledger's integration tests: the real CLI in real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


def keel(
    *args: str | Path, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m keel ARGS`` as a separate process."""
    env = dict(os.environ, KEEL_DEV="1")
    return subprocess.run(
        [sys.executable, "-m", "keel", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def ok(*args: str | Path) -> str:
    result = keel(*args)
    assert result.returncode == 0, f"keel {' '.join(map(str, args))}: {result.stderr}"
    return result.stdout


def assert_one_line_error(stderr: str, needle: str = "") -> None:
    """keel's error contract: one line, ``keel: error: ...``, naming the problem."""
    assert stderr.startswith("keel: error: "), stderr
    assert stderr.count("\n") == 1, stderr
    assert needle in stderr, stderr


@dataclass
class Populated:
    db: Path
    key: Path
    # Signed checkpoints, as files an auditor kept, by tree size.
    checkpoints: dict[int, Path]


@pytest.fixture(scope="session")
def ledger_template(tmp_path_factory: pytest.TempPathFactory) -> Populated:
    """A ledger of 20 entries with stored checkpoints at sizes 4, 12 and 20, copied to files."""
    folder = tmp_path_factory.mktemp("ledger-template")
    db = folder / "ledger.db"
    saved = {}
    for index in range(20):
        appended = ok(
            "ledger",
            "append",
            "--db",
            db,
            "--source",
            "watch",
            "--kind",
            "restart",
            "--subject",
            f"agent{index % 3}",
            "--data",
            f'{{"attempt": {index}}}',
        )
        assert appended.strip() == str(index)
        if index + 1 in (4, 12, 20):
            saved[index + 1] = folder / f"checkpoint-{index + 1}.txt"
            saved[index + 1].write_text(ok("ledger", "checkpoint", "--db", db))
    return Populated(db, db.with_name("ledger.key"), saved)


@pytest.fixture
def populated(tmp_path: Path, ledger_template: Populated) -> Populated:
    """A private copy of the template ledger, its key and its checkpoint files."""
    copy = tmp_path / "state"
    copy.mkdir()
    for source in ledger_template.db.parent.iterdir():
        if source.is_file():
            shutil.copy2(source, copy / source.name)
    return Populated(
        copy / "ledger.db",
        copy / "ledger.key",
        {size: copy / path.name for size, path in ledger_template.checkpoints.items()},
    )
