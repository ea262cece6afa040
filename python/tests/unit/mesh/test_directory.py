"""The node's directory: the identity key file (0600, atomic, never overwritten)."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from keel.errors import KeelError
from keel.mesh import directory
from keel.mesh.errors import IdentityError
from keel.mesh.identity import NodeIdentity


def test_key_file_is_created_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity.key"
    made = directory.load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = directory.load_or_create_identity(path)
    assert again.node_id == made.node_id
    assert again.signing_public == made.signing_public
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temp file left


def test_create_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    directory.create_identity(path)
    with pytest.raises(IdentityError, match="already exists"):
        directory.create_identity(path)


def test_racing_first_runs_agree(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    results: list[str] = []

    def run() -> None:
        results.append(directory.load_or_create_identity(path).node_id)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    assert directory.load_identity(path).node_id == results[0]


def test_a_readable_key_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    directory.create_identity(path)
    path.chmod(0o644)
    with pytest.raises(
        IdentityError, match=f"readable by others \\(mode 644\\); run: chmod 600 {path}"
    ):
        directory.load_identity(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "malformed identity key file"),
        ("[]", "not a JSON object"),
        ('{"version": 2}', "version must be 1"),
        ('{"version": 1, "node_id": "x", "static_private": "00"}', "expected exactly"),
    ],
)
def test_malformed_key_files_name_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "identity.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=problem) as caught:
        directory.load_identity(path)
    assert str(path) in str(caught.value)


def test_an_edited_node_id_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    directory.create_identity(path)
    data = json.loads(path.read_text())
    data["node_id"] = NodeIdentity.generate().node_id
    path.write_text(json.dumps(data))
    with pytest.raises(IdentityError, match="does not match the static key"):
        directory.load_identity(path)


def test_missing_and_symlinked_key_files(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="no identity key file"):
        directory.load_identity(tmp_path / "absent.key")
    real = tmp_path / "real.key"
    directory.create_identity(real)
    link = tmp_path / "link.key"
    os.symlink(real, link)
    with pytest.raises(IdentityError, match="cannot open"):
        directory.load_identity(link)


def test_prepare_makes_the_directory_and_refuses_what_cannot_be_written(tmp_path: Path) -> None:
    node = tmp_path / "a" / "node"
    directory.prepare(node, 0o750)
    assert stat.S_IMODE(node.stat().st_mode) == 0o750
    (tmp_path / "file").write_text("")
    with pytest.raises(
        KeelError, match=r"directory .*: cannot create the node's directory: File exists"
    ):
        directory.prepare(tmp_path / "file", 0o750)
