"""The NixOS VM tests of vm-tests/, checked without building them.

Each test file evaluates (name, nodes, test script); every node's
configuration passes keel's modules without a failed assertion; the test
script is Python that compiles, uses only names the NixOS test driver
defines or the script itself binds, and tells its story in subtests. The
tests themselves run under `nix flake check` (test_flake.py) where Nix can
build.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.nix.nixeval import HERE, nix_eval_file, nix_string

VM_TESTS = sorted(p for p in (REPO / "vm-tests").glob("*.nix") if p.name != "default.nix")

# What the NixOS test driver puts in a test script's globals
# (nixos/lib/test-driver: driver.py, test_symbols()).
DRIVER_GLOBALS = {
    "start_all",
    "test_script",
    "machines",
    "vlans",
    "driver",
    "log",
    "create_machine",
    "subtest",
    "run_tests",
    "join_all",
    "retry",
    "serial_stdout_off",
    "serial_stdout_on",
    "polling_condition",
    "Machine",
    "t",
}


def bound_names(tree: ast.AST) -> set[str]:
    """Every name the script binds anywhere (scopes are not told apart)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def undefined_names(script: str, nodes: set[str]) -> set[str]:
    tree = ast.parse(script)
    known = bound_names(tree) | DRIVER_GLOBALS | nodes | set(dir(builtins))
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - known


def evaluate_vm_test(nix_instantiate: str, nixpkgs_lib: Path, path: Path) -> dict[str, Any]:
    result: dict[str, Any] = nix_eval_file(
        nix_instantiate,
        HERE / "eval-vm-test.nix",
        args={
            "repo": Path(nix_string(REPO)),
            "nixpkgsLib": Path(nix_string(nixpkgs_lib)),
            "file": Path(nix_string(path)),
        },
    )
    return result


def test_the_agents_vm_test_exists() -> None:
    assert "agents.nix" in {p.name for p in VM_TESTS}


@pytest.mark.parametrize("path", VM_TESTS, ids=[p.stem for p in VM_TESTS])
def test_vm_test_evaluates_and_its_script_is_sound(
    nix_instantiate: str, nixpkgs_lib: Path, path: Path
) -> None:
    test = evaluate_vm_test(nix_instantiate, nixpkgs_lib, path)
    assert test["name"].startswith("keel-")
    assert test["nodes"], "a VM test needs at least one node"
    for name, node in test["nodes"].items():
        assert node["failedAssertions"] == [], (name, node["failedAssertions"])
        for special, failed in node["specialisations"].items():
            assert failed == [], (name, special, failed)
    script = test["testScript"]
    compile(script, f"{path.name}:testScript", "exec")
    assert not undefined_names(script, set(test["nodes"]))
    assert "start_all()" in script
    subtests = [
        node
        for node in ast.walk(ast.parse(script))
        if isinstance(node, ast.With)
        and any(
            isinstance(item.context_expr, ast.Call)
            and isinstance(item.context_expr.func, ast.Name)
            and item.context_expr.func.id == "subtest"
            for item in node.items
        )
    ]
    assert len(subtests) >= 2, "one subtest per behaviour"


def test_the_script_check_catches_an_undefined_name() -> None:
    script = (
        "start_all()\nwith subtest('x'):\n    machine.succeed('true')\n    mahcine.fail('false')\n"
    )
    assert undefined_names(script, {"machine"}) == {"mahcine"}
