"""Fixtures for the mesh daemon tests: nodes that always die with the test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from keel.mesh.kem import available_backends

from .nodes import Node


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: control socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kmesh-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mesh_nodes(short_tmp: Path) -> Iterator[Callable[..., Node]]:
    """``mesh_nodes("a", **options)`` makes (not starts) a node; all are killed at the end,
    and then none of their logs may hold a traceback."""
    if all(reason is not None for reason in available_backends().values()):
        pytest.skip(f"no ML-KEM-768 backend: {available_backends()}")
    made: list[Node] = []

    def make(name: str, **options: Any) -> Node:
        node = Node(short_tmp / name, name=name, **options)
        made.append(node)
        return node

    yield make
    for node in made:
        node.kill()
        node.client.close()  # its control connection: closed now, not by the garbage collector
    # Nothing a test does (hostile peers, bad requests, floods) may print a traceback.
    for node in made:
        log = node.log()
        assert "Traceback" not in log, f"{node.name}'s log holds a traceback:\n{log[-4000:]}"


@pytest.fixture
def pair(mesh_nodes: Callable[..., Node]) -> tuple[Node, Node]:
    """Two started nodes on loopback, B joined through A's invite, connected."""
    a = mesh_nodes("a").start()
    b = mesh_nodes("b").start()
    b.join(a)
    a.wait_connected(b)
    b.wait_connected(a)
    return a, b
