from __future__ import annotations

from pathlib import Path

import pytest
from keel.cli import main


def test_id_makes_an_identity_once_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = tmp_path / "node"
    assert main(["mesh", "id", "--dir", str(node)]) == 0
    first = capsys.readouterr()
    assert f"made a new one in {node / 'identity.key'}" in first.err
    assert (node / "identity.key").stat().st_mode & 0o077 == 0
    assert main(["mesh", "id", "--dir", str(node)]) == 0
    again = capsys.readouterr()
    assert again.out == first.out  # the same node id, from the same key
    assert len(again.out.strip()) == 32
    assert again.err == ""
