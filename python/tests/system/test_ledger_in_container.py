"""The ledger CLI inside a booted keel host: append, checkpoint, verify, tail."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.harness.plugin import Containers


def _has_ledger_cli() -> bool:
    try:
        return importlib.util.find_spec("keel.ledger.cli") is not None
    except ModuleNotFoundError:
        return False


DB = "/var/lib/keel/ledger.db"


def test_ledger_cli_works_inside(containers: Containers) -> None:
    if not _has_ledger_cli():
        pytest.skip("keel.ledger.cli is not in this build (the ledger branch has not been merged)")
    box = containers.boot("ledger")
    for n in range(3):
        data = json.dumps({"restarts": n})
        index = box.run(
            "keel", "ledger", "append", "--db", DB, "--source", "watch",
            "--kind", "restart", "--subject", "scout", "--data", data,
        ).stdout.strip()  # fmt: skip
        assert index == str(n)
    box.run("keel", "ledger", "checkpoint", "--db", DB)
    assert box.run("keel", "ledger", "verify", "--db", DB).returncode == 0
    tail = box.run("keel", "ledger", "tail", "--db", DB, "--json").stdout.splitlines()
    assert [json.loads(line)["subject"] for line in tail] == ["scout"] * 3
