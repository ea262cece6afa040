from __future__ import annotations

import json
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


def test_id_reads_the_directory_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "mesh.json"
    config.write_text(json.dumps({"listen": "127.0.0.1:7400", "directory": str(tmp_path / "n")}))
    assert main(["mesh", "id", "--config", str(config)]) == 0
    made = capsys.readouterr().out
    assert main(["mesh", "id", "--dir", str(tmp_path / "n")]) == 0
    assert capsys.readouterr().out == made


def test_the_flags_before_the_config_file_say_what_to_write(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["mesh", "serve", "--dir", "/srv/node", "--listen", "0.0.0.0:7401"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert 'write {"directory": "/srv/node", "listen": "0.0.0.0:7401"} there' in err


def test_check_config_names_the_key_or_says_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "mesh.json"
    config.write_text(json.dumps({"listen": "127.0.0.1:7400", "ledger": None, "retry_cap": -1}))
    assert main(["mesh", "check-config", "--config", str(config)]) == 2
    assert f"{config}: retry_cap: expected a number > 0" in capsys.readouterr().err
    config.write_text(json.dumps({"listen": "127.0.0.1:7400", "ledger": None}))
    assert main(["mesh", "check-config", "--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["listen"], shown["ledger"]) == ("127.0.0.1:7400", None)
    assert main(["mesh", "check-config", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith(f"{config}: valid (node directory ")
