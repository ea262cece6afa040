"""The NixOS VM tests of vm-tests/, checked without building them.

Each test file evaluates (name, nodes, test script); every node's
configuration passes keel's modules and the real NixOS declarations without
a failed assertion; the test script is Python that compiles and passes the
checks of ``vm_script.py`` against the real NixOS test driver of the nixpkgs
tree (names, machine methods and their arguments, ports awaited where the
node listens), and tells its story in subtests. The tests themselves run
under `nix flake check` (test_flake.py) where Nix can build.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.nix.nixeval import HERE, nix_eval_file, nix_string
from tests.nix.vm_script import DriverApi, check_script

VM_TESTS = sorted(p for p in (REPO / "vm-tests").glob("*.nix") if p.name != "default.nix")


@pytest.fixture(scope="module")
def driver(nixpkgs_tree: Path) -> DriverApi:
    return DriverApi.read(nixpkgs_tree)


def evaluate_vm_test(nix_instantiate: str, nixpkgs_tree: Path, path: Path) -> dict[str, Any]:
    result: dict[str, Any] = nix_eval_file(
        nix_instantiate,
        HERE / "eval-vm-test.nix",
        args={
            "repo": Path(nix_string(REPO)),
            "nixpkgs": Path(nix_string(nixpkgs_tree)),
            "file": Path(nix_string(path)),
        },
    )
    return result


def test_the_agents_vm_test_exists() -> None:
    assert "agents.nix" in {p.name for p in VM_TESTS}


@pytest.mark.parametrize("path", VM_TESTS, ids=[p.stem for p in VM_TESTS])
def test_vm_test_evaluates_and_its_script_is_sound(
    nix_instantiate: str, nixpkgs_tree: Path, driver: DriverApi, path: Path
) -> None:
    test = evaluate_vm_test(nix_instantiate, nixpkgs_tree, path)
    assert test["name"].startswith("keel-")
    assert test["nodes"], "a VM test needs at least one node"
    for name, node in test["nodes"].items():
        assert node["failedAssertions"] == [], (name, node["failedAssertions"])
        for special, failed in node["specialisations"].items():
            assert failed == [], (name, special, failed)
    script = test["testScript"]
    compile(script, f"{path.name}:testScript", "exec")
    listeners = {name: node["listeners"] for name, node in test["nodes"].items()}
    assert check_script(script, listeners, driver) == []
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


FIXED_KEY = re.compile(r"writeText \"([a-z0-9-]+-identity\.key)\" ''\n(.*?)\n\s*'';", re.S)
DECLARED_ID = re.compile(r'(\w+Id) = "([a-z2-7]{32})";')


def test_the_fixed_mesh_identities_of_vm_tests_are_their_keys() -> None:
    """A VM test that names a node at build time gives it a fixed key: the id must be that key's."""
    from keel.mesh.identity import NodeIdentity

    seen = 0
    for path in VM_TESTS:
        text = path.read_text()
        declared = dict(DECLARED_ID.findall(text))
        for name, body in FIXED_KEY.findall(text):
            data = json.loads(body)
            identity = NodeIdentity(
                static_private=bytes.fromhex(data["static_private"]),
                signing_private=bytes.fromhex(data["signing_private"]),
            )
            assert identity.node_id == data["node_id"], (path.name, name)
            assert identity.node_id in declared.values(), (path.name, name, declared)
            seen += 1
    assert seen >= 2  # fleet.nix's operator, mcp.nix's host


def test_the_driver_is_read_from_the_tree(driver: DriverApi) -> None:
    assert {"start_all", "subtest", "retry", "polling_condition"} <= driver.symbols
    assert str(driver.methods["wait_for_open_port"]) == "(port, addr=0, timeout=0)"
    assert {"succeed", "fail", "wait_for_unit", "wait_until_succeeds"} <= set(driver.methods)
    # the type hints driver.nix type-checks a script with
    assert str(driver.functions["retry"]) == "(fn, timeout_seconds=0)"
    assert {"start_all", "subtest", "polling_condition"} <= set(driver.functions)
    assert {"machines", "log", "driver"} & driver.typed == {"machines", "log"}


MESH_LISTENERS = {
    "a": {"keel-mesh": ["192.168.1.1:7400"]},
    "b": {"keel-mesh": ["192.168.1.2:7400"]},
}


@pytest.mark.parametrize(
    ("script", "problem"),
    [
        pytest.param(
            # defect 1 of issue 12, as vm-tests/mesh.nix had it
            "nodes = {'a': a, 'b': b}\nstart_all()\nfor machine in nodes.values():\n"
            "    machine.wait_for_open_port(7400)\n",
            "machine.wait_for_open_port(7400) waits on localhost, but keel-mesh on node a "
            "listens on 192.168.1.1:7400 only",
            id="port-on-localhost",
        ),
        pytest.param(
            "start_all()\nb.wait_for_open_port(port=7400, timeout=60)\n",
            "keel-mesh on node b listens on 192.168.1.2:7400 only",
            id="port-on-localhost-by-keyword",
        ),
        pytest.param(
            "start_all()\na.wait_for_opne_port(7400)\n",
            "a.wait_for_opne_port: the test driver's machines have no method 'wait_for_opne_port'",
            id="misspelt-method",
        ),
        pytest.param(
            "start_all()\na.wait_until_succeeds('true', timeout=5, retries=3)\n",
            "a.wait_until_succeeds(...): got an unexpected keyword argument 'retries'",
            id="unknown-keyword",
        ),
        pytest.param(
            "start_all()\na.wait_for_unit()\n",
            "a.wait_for_unit(...): missing a required argument: 'unit'",
            id="missing-argument",
        ),
        pytest.param(
            # mcp.nix had it: the driver's retry() takes timeout_seconds
            "start_all()\nretry(lambda _: True, timeout=60)\n",
            "line 2: retry(...): got an unexpected keyword argument 'timeout'",
            id="driver-function-keyword",
        ),
        pytest.param(
            # mesh.nix, fleet.nix and mcp.nix had it: their type check would fail
            "machines = {'a': a, 'b': b}\nstart_all()\nfor m in machines.values():\n    m.succeed('true')\n",
            "line 1: 'machines' is a global of the test driver's type hints",
            id="typed-global-rebound",
        ),
        pytest.param(
            "start_all()\nwith subtest('x'):\n    a.succeed('true')\n    mahcine.fail('false')\n",
            "undefined name 'mahcine'",
            id="undefined-name",
        ),
    ],
)
def test_the_script_check_finds(driver: DriverApi, script: str, problem: str) -> None:
    problems = check_script(script, MESH_LISTENERS, driver)
    assert any(problem in p for p in problems), problems


def test_the_script_check_passes_a_sound_script(driver: DriverApi) -> None:
    script = (
        "addresses = {'a': '192.168.1.1', 'b': '192.168.1.2'}\n"
        "start_all()\n"
        "for name, machine in {'a': a, 'b': b}.items():\n"
        "    machine.wait_for_unit('keel-mesh.service')\n"
        "    machine.wait_for_open_port(7400, addresses[name])\n"
        "a.wait_for_open_port(22)\n"
        "b.succeed('true', 'true', timeout=10)\n"
        "a.wait_for_open_port(7400, addr='192.168.1.1', timeout=30)\n"
        "retry(lambda _: True, timeout_seconds=5)\n"
        "def each(machines: dict) -> list:\n"  # a local name of its own: no global rebound
        "    return [m for m in machines.values()]\n"
    )
    assert check_script(script, MESH_LISTENERS, driver) == []
    local = {"machine": {"keel-watch": ["127.0.0.1:9101"]}}
    assert check_script("start_all()\nmachine.wait_for_open_port(9101)\n", local, driver) == []
