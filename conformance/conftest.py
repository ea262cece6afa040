"""Options and fixtures of the conformance suite (docs/conformance.md).

The ``host`` fixture is testinfra's: ``--hosts=ssh://root@HOST`` (or any
testinfra backend; none given means this machine). The expected sandbox of
each tier comes from this checkout's ``modules/tiers.json`` unless
``--keel-tiers`` names another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keelhost
import pytest
from keel.agents.spec import AgentSpec
from keel.agents.units import Tiers, load_tiers

CHECKOUT_TIERS = Path(__file__).resolve().parent.parent / "modules" / "tiers.json"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("keel conformance")
    group.addoption(
        "--keel-tiers",
        type=Path,
        default=None,
        help="tiers.json the agents' sandboxes must match (default: modules/tiers.json)",
    )
    group.addoption(
        "--keel-ledger",
        default="/var/lib/keel/ledger.db",
        help="the host's ledger (default: /var/lib/keel/ledger.db)",
    )
    group.addoption(
        "--keel-nft-table",
        default="inet keel",
        help="keel's nftables table, family and name (default: 'inet keel')",
    )


@pytest.fixture(scope="session")
def tiers(pytestconfig: pytest.Config) -> Tiers:
    path = pytestconfig.getoption("keel_tiers")
    if path is None and CHECKOUT_TIERS.is_file():
        path = CHECKOUT_TIERS
    return load_tiers(path)


@pytest.fixture(scope="module")
def specs(host: Any) -> list[AgentSpec]:
    return keelhost.agent_specs(host)


@pytest.fixture(scope="module")
def agents(specs: list[AgentSpec]) -> list[AgentSpec]:
    """The host's agents; skips the test when it has none."""
    if not specs:
        pytest.skip(f"no agents on this host (no specs in {keelhost.SPEC_DIR})")
    return specs
