"""The egress world fixture: an internet and a keel host as network namespaces."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.netns import Network

from .world import World


@pytest.fixture
def world(network: Network) -> Iterator[World]:
    built = World(network)
    try:
        yield built
    finally:
        built.close()
