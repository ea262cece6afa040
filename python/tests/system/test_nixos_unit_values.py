"""systemd itself reads back the hostile values of an agent's unit, as given.

The unit NixOS generates for an agent holding every hostile value
(``tests/nix/hostile.py``; the unit text from the real NixOS declarations, as
tier 4 makes it) and the unit ``keel agents render-unit`` writes from the same
spec are loaded by systemd 252 in a container and run: the agent, a script
that writes down the argv and environment it was started with, must have
received exactly the given values. systemd's own reading is also taken
through D-Bus (``busctl --json``: ExecStart's argv and the Environment list as
systemd holds them, before ``$$`` becomes ``$`` at exec time), which holds
``tests/systemd_syntax.py``, the model tier 4 reads units with, to systemd.
(``test_unit_values.py`` beside it holds keel's Python renderer to the same
values through ``keel agents install``.)

Needs what tier 3 needs (root, systemd-nspawn) and what tier 4's module
evaluation needs (``nix-instantiate``, ``KEEL_NIXPKGS``); skips otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import systemd_syntax
from tests.harness.nspawn import Container, Image
from tests.nix import hostile
from tests.nix.conftest import TREE_NEEDED
from tests.nix.nixeval import evaluate_modules, nix_instantiate_path, resolve_nixpkgs_tree

NIX_UNIT = "keel-agent-hostile.service"
# The agent of both units: it writes down what it was started with, then waits.
AGENT = """#!/usr/bin/python3
import json, os, signal, sys
with open(os.path.join(os.environ["STATE_DIRECTORY"], "report.json"), "w") as out:
    json.dump({"argv": sys.argv, "environ": dict(os.environ)}, out)
signal.pause()
"""
REPORT = "/var/lib/keel-agents/hostile/report.json"
PYTHON_UNIT = "keel-agent-hostilepy.service"
# NixOS adds these to every unit's environment (its PATH, the time zones).
NIXOS_ENVIRONMENT = {"PATH", "TZDIR"}


def nix_units(workdir: Path, strings: list[str]) -> dict[str, Any]:
    nix = nix_instantiate_path()
    if nix is None:
        pytest.skip("nix-instantiate not found (Debian's nix-bin provides it)")
    tree = resolve_nixpkgs_tree(os.environ.get("KEEL_NIXPKGS", ""))
    if tree is None:
        pytest.skip(TREE_NEEDED)
    result = evaluate_modules(nix, tree, hostile.agent_host(workdir, strings))
    assert result["failedAssertions"] == []
    return result


def started_with(box: Container, unit: str) -> tuple[list[str], dict[str, str]]:
    """Start ``unit``, and return the argv and environment its agent received."""
    box.run("rm", "-f", REPORT)
    box.run("systemctl", "start", unit)
    try:
        box.wait_until(
            lambda: box.run("test", "-s", REPORT, check=False).returncode == 0,
            timeout=30,
            what=f"{unit}'s agent to report",
        )
        report = json.loads(box.read_file(REPORT))
    finally:
        box.run("systemctl", "stop", unit)
    return report["argv"], report["environ"]


def busctl(box: Container, *args: str) -> Any:
    out = box.run("busctl", "--json=short", *args).stdout
    return json.loads(out)["data"]


def read_back(box: Container, unit: str) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, load state) of ``unit`` as systemd holds them."""
    (path,) = busctl(
        box,
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "LoadUnit",
        "s",
        unit,
    )
    load_state = busctl(
        box,
        "get-property",
        "org.freedesktop.systemd1",
        path,
        "org.freedesktop.systemd1.Unit",
        "LoadState",
    )
    (start,) = busctl(
        box,
        "get-property",
        "org.freedesktop.systemd1",
        path,
        "org.freedesktop.systemd1.Service",
        "ExecStart",
    )
    environment = busctl(
        box,
        "get-property",
        "org.freedesktop.systemd1",
        path,
        "org.freedesktop.systemd1.Service",
        "Environment",
    )
    env: dict[str, str] = {}
    for assignment in environment:
        name, _, value = assignment.partition("=")
        env[name] = value
    assert start[0] == start[1][0], start[:2]
    return list(start[1]), env, load_state


# Session scope: fixtures of wider scope are made first, and this one must
# skip before the container image is built for nothing.
@pytest.fixture(scope="session")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, Any]]:
    """The hostile values and what the NixOS modules make of them (before any container)."""
    strings = hostile.values()
    return strings, nix_units(tmp_path_factory.mktemp("values"), strings)


@pytest.fixture(scope="module")
def loaded(
    evaluated: tuple[list[str], dict[str, Any]], image: Image
) -> Iterator[tuple[Container, list[str], dict[str, Any], str | None]]:
    strings, result = evaluated
    spec = result["etc"]["keel/agents/hostile.json"]["json"]
    box = Container("unitvalues", image)
    try:
        box.start()
        box.write_file("/usr/local/bin/agent", AGENT, mode=0o755)
        box.run("useradd", "--system", "--user-group", "keel-agent-hostile")
        # The agent is tier 2, so modules/egress.nix made it wait for its
        # nftables chain (ExecStartPre=+.../nft list chain inet keel ...);
        # there is no keel egress (nor that store path) in this container.
        unit_text = "\n".join(
            line
            for line in result["units"][NIX_UNIT].split("\n")  # only \n ends a unit line
            if not (line.startswith("ExecStartPre=") and "nft list chain inet keel" in line)
        )
        box.write_file(f"/etc/systemd/system/{NIX_UNIT}", unit_text)
        box.write_file("/root/hostile.json", json.dumps(spec))
        rendered = box.run("keel", "agents", "render-unit", "/root/hostile.json", check=False)
        refused = None
        if rendered.returncode == 0:
            box.write_file(f"/etc/systemd/system/{PYTHON_UNIT}", rendered.stdout)
        else:
            refused = rendered.stderr.strip()
        box.run("systemctl", "daemon-reload")
        yield box, strings, result, refused
    finally:
        box.stop()


def assert_received(argv: list[str], environ: dict[str, str], strings: list[str]) -> None:
    assert argv[0] == "/usr/local/bin/agent"
    arguments = hostile.arguments_of(strings)
    assert len(argv) == len(arguments) + 1
    for i, (got, given) in enumerate(zip(argv[1:], arguments, strict=True)):
        assert got == given, (i, given)
    for key, given in hostile.environment_of(strings).items():
        assert environ.get(key) == given, (key, given)


def test_the_agent_of_the_nixos_unit_receives_every_value(
    loaded: tuple[Container, list[str], dict[str, Any], str | None],
) -> None:
    box, strings, _, _ = loaded
    argv, environ = started_with(box, NIX_UNIT)
    assert_received(argv, environ, strings)
    # NixOS' own additions, and nothing the values smuggled in.
    assert environ["PATH"].startswith("/nix/store/")
    assert not {"ExecStartPre", "User"} & set(environ)


def test_the_model_reads_units_as_systemd_does(
    loaded: tuple[Container, list[str], dict[str, Any], str | None],
) -> None:
    # tests/systemd_syntax.py, which tier 4 relies on, agrees with systemd
    # (systemd keeps `$$` until it executes the command).
    box, strings, result, _ = loaded
    argv, env, load_state = read_back(box, NIX_UNIT)
    assert load_state == "loaded"
    model_argv, model_env = systemd_syntax.service_values(result["units"][NIX_UNIT])
    assert [systemd_syntax.variables(word) for word in argv] == model_argv
    assert env == model_env
    assert set(env) == set(hostile.environment_of(strings)) | NIXOS_ENVIRONMENT


def test_systemd_logged_nothing_about_the_unit(
    loaded: tuple[Container, list[str], dict[str, Any], str | None],
) -> None:
    # A value systemd had to ignore or could not parse is logged at load.
    box = loaded[0]
    log = box.run("journalctl", "--no-pager", "-b", "-o", "cat", check=False).stdout
    where = f"/etc/systemd/system/{NIX_UNIT}:"
    assert where not in log, [line for line in log.splitlines() if where in line]


def test_the_python_rendered_unit_gives_the_agent_the_same_values(
    loaded: tuple[Container, list[str], dict[str, Any], str | None],
) -> None:
    # `keel agents render-unit` on the spec the module wrote: refusing it is
    # allowed (with a one-line error), altering a value is not.
    box, strings, _, refused = loaded
    if refused is not None:
        assert len(refused.splitlines()) == 1, refused
        assert refused.startswith("keel: error:"), refused
        pytest.skip(f"keel agents render-unit refuses the spec: {refused}")
    argv, environ = started_with(box, PYTHON_UNIT)
    assert_received(argv, environ, strings)
