"""``keel fleet``: clear one-line errors, the config check, the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from keel.cli import main
from keel.fleet.cli import agent_rows, node_rows


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "fleet.json"
    good.write_text(json.dumps({"operators": ["a" * 32], "witness_every": 30}))
    code, out, err = run(capsys, "fleet", "check-config", "--config", str(good))
    assert (code, err) == (0, "")
    assert "valid (1 operator nodes, witnessing every 30 s)" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"operators": ["web1"]}))
    code, out, err = run(capsys, "fleet", "check-config", "--config", str(bad))
    assert code == 2
    assert err.startswith(f"keel: error: {bad}: operators: [0]")
    assert err.count("\n") == 1


def test_no_daemon_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    socket = str(tmp_path / "fleet.sock")
    for argv in (("status",), ("audit",), ("witness",), ("restart", "n", "web")):
        code, _, err = run(capsys, "fleet", *argv, "--socket", socket)
        assert code == 1
        assert "cannot reach the fleet daemon" in err
        assert "Traceback" not in err
        assert err.count("\n") == 1


def test_bad_timeouts_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("0", "-1", "301"):
        code, _, err = run(
            capsys, "fleet", "status", "--timeout", value, "--socket", "/nonexistent"
        )
        assert code == 2
        assert "--timeout must be more than 0" in err


def test_the_tables_mark_unreachable_and_stale_rows() -> None:
    report = {
        "host": "web1",
        "version": "0.1.0",
        "system": {"generation": 42},
        "agents": {"web": {"state": "healthy", "restarts": 1, "last_error": None}},
        "problems": [],
    }
    result = {
        "nodes": [
            {"node": "a" * 32, "state": "healthy", "last_seen": 100.0, "stale": False, "report": report},
            {
                "node": "b" * 32,
                "state": "unreachable",
                "last_seen": 40.0,
                "stale": True,
                "error": "no answer within 1 s",
                "report": {**report, "host": "db1"},
            },
            {"node": "c" * 32, "state": "unreachable", "last_seen": None, "stale": False,
             "error": "the mesh has no connection to it", "report": None},
        ]
    }  # fmt: skip
    rows = node_rows(result, now=100.0)
    assert rows[0][:6] == ["aaaaaaaaaaaa", "web1", "healthy", "now", "0.1.0", 42]
    assert rows[1][2] == "UNREACHABLE (no answer within 1 s)"
    assert rows[1][3] == "1m0s ago"
    assert rows[1][7] == "(stale)"
    assert rows[0][7] is None
    assert rows[2][1] is None
    assert rows[2][3] == "never"
    agents = agent_rows(result)
    assert agents == [
        ["web1", "web", "healthy", 1, None],
        ["db1", "web", "healthy (stale)", 1, None],
    ]
