"""Every ``.nix`` file of the repository parses (``nix-instantiate --parse``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SKIP_DIRS = {".git", ".venv", ".keel", "node_modules", "result"}


def nix_files() -> list[Path]:
    """Tracked and not-ignored ``.nix`` files; every ``.nix`` file outside git."""
    proc = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.nix"],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    if proc.returncode == 0:
        names = [name for name in proc.stdout.decode().split("\0") if name]
        return sorted(REPO / name for name in names if (REPO / name).is_file())
    return sorted(
        path
        for path in REPO.rglob("*.nix")
        if not SKIP_DIRS.intersection(path.relative_to(REPO).parts)
    )


FILES = nix_files()


def test_the_flake_files_are_found() -> None:
    names = {str(path.relative_to(REPO)) for path in FILES}
    assert {"flake.nix", "pkgs/keel.nix", "modules/default.nix", "vm-tests/default.nix"} <= names


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO)) for p in FILES])
def test_parses(nix_instantiate: str, path: Path) -> None:
    proc = subprocess.run(
        [nix_instantiate, "--parse", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_a_syntax_error_is_caught(nix_instantiate: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.nix"
    broken.write_text("{ services.keel.enable = true }\n")
    proc = subprocess.run(
        [nix_instantiate, "--parse", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "syntax error" in proc.stderr
