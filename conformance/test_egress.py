"""Where egress control is on, keel's nftables table is loaded."""

from __future__ import annotations

import shlex
from typing import Any

import pytest


def test_egress_table_present(host: Any, pytestconfig: pytest.Config) -> None:
    enabled = host.service("keel-egress").is_enabled
    configured = host.file("/etc/keel/egress.json").exists
    if not (enabled or configured):
        pytest.skip(
            "egress is not configured here (keel-egress.service not enabled, no /etc/keel/egress.json)"
        )
    table = pytestconfig.getoption("keel_nft_table")
    result = host.run(shlex.join(["nft", "list", "table", *table.split()]))
    assert result.rc == 0, (
        f"egress is on but `nft list table {table}` fails: {result.stderr.strip()}"
    )
