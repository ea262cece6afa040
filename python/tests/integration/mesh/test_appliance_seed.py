"""A first boot joins the mesh from a seed: `keel appliance seed` against real nodes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .nodes import Node


def seed_command(seed: Path, node: Node, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keel", "appliance", "seed", "--dir", str(seed),
         "--mesh-socket", str(node.socket), "--only", "mesh", *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def invited(mesh_nodes: Callable[..., Node], short_tmp: Path) -> tuple[Node, Node, Path]:
    """Nodes a and b running, and a seed holding an invite of a's."""
    a = mesh_nodes("a").start()
    b = mesh_nodes("b").start()
    seed = short_tmp / "seed"
    seed.mkdir()
    (seed / "mesh-invite").write_text(a.invite() + "\n")
    return a, b, seed


def test_the_seed_invite_joins_the_mesh_once(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    a, b, seed = invited(mesh_nodes, short_tmp)
    done = seed_command(seed, b, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["mesh"]["joined"] is True
    assert result["mesh"]["via"] == a.node_id
    assert result["keys"] is None
    a.wait_connected(b)
    b.wait_connected(a)
    # The invite, a secret, is gone; the next boot has nothing to do.
    assert not (seed / "mesh-invite").exists()
    again = seed_command(seed, b)
    assert (again.returncode, again.stdout) == (0, f"keel: nothing to apply in {seed}\n")


def test_a_join_that_fails_keeps_the_invite_and_says_why(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    a, b, seed = invited(mesh_nodes, short_tmp)
    a.kill()
    failed = seed_command(seed, b)
    assert failed.returncode == 1
    assert failed.stderr.startswith("keel: error: ")
    assert failed.stderr.count("\n") == 1
    assert "Traceback" not in failed.stderr
    assert (seed / "mesh-invite").exists()
