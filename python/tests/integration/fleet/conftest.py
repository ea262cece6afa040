"""Fixtures for the fleet tests: keel hosts in network namespaces, on one bridge."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from keel.mesh.kem import available_backends

from tests.harness.netns import Network

from .fleet_nodes import FleetHost

FleetFactory = Callable[..., list[FleetHost]]


@pytest.fixture
def fleet_hosts(network: Network, short_tmp: Path) -> Iterator[FleetFactory]:
    """``fleet_hosts("abc", **options)``: made, not started; all killed after the test."""
    if all(reason is not None for reason in available_backends().values()):
        pytest.skip(f"no ML-KEM-768 backend: {available_backends()}")
    made: list[FleetHost] = []

    def make(labels: str | list[str], **options: Any) -> list[FleetHost]:
        hosts = [network.host(label) for label in labels]
        network.bridge(hosts)
        per_host: dict[str, dict[str, Any]] = options.pop("per_host", {})
        out = []
        for host in hosts:
            settings = {**options, **per_host.get(host.label, {})}
            out.append(FleetHost(host, short_tmp / host.label, **settings))
        made.extend(out)
        return out

    yield make
    for fleet_host in made:
        fleet_host.kill()
    for fleet_host in made:  # (watch's log holds its agents' output: only the fleet's is checked)
        log = fleet_host.fleet.log()
        assert "Traceback" not in log, f"the fleet daemon of {fleet_host.label}:\n{log[-4000:]}"
