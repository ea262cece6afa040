"""The ledger verifies: no entry, hash or checkpoint was edited, dropped or reordered."""

from __future__ import annotations

import shlex
from typing import Any

import pytest


def test_ledger_verifies(host: Any, pytestconfig: pytest.Config) -> None:
    path = pytestconfig.getoption("keel_ledger")
    if not host.file(path).exists:
        pytest.skip(f"no ledger at {path} (nothing has been recorded on this host)")
    if host.run("keel ledger --help").rc != 0:
        pytest.skip("the keel on this host has no `keel ledger` command")
    result = host.run(shlex.join(["keel", "ledger", "verify", "--db", path]))
    assert result.rc == 0, (
        f"`keel ledger verify --db {path}` failed: {result.stdout}{result.stderr}"
    )
