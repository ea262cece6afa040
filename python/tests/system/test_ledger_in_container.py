"""The ledger CLI inside a booted keel host: append, checkpoint, verify, tail,
and an entry edited behind the ledger's back is caught."""

from __future__ import annotations

import json

from tests.harness.plugin import Containers

DB = "/var/lib/keel/ledger.db"


def test_ledger_cli_works_inside(containers: Containers) -> None:
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
    # Edit an entry behind the ledger's back: verify must name it.
    box.run(
        "sqlite3", DB,
        "UPDATE leaves SET entry = CAST(replace(CAST(entry AS TEXT), 'scout', 'sc0ut') AS BLOB) "
        "WHERE idx = 1",
    )  # fmt: skip
    result = box.run("keel", "ledger", "verify", "--db", DB, "--json", check=False)
    assert result.returncode == 1
    assert json.loads(result.stdout)["firstBadIndex"] == 1
