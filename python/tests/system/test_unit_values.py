"""Hostile values through a real install: spec → unit → systemd 252 → the agent's process.

An agent is installed with ``keel agents install`` from a spec whose
arguments and environment hold the cases of :mod:`tests.unit_values` (every
control character, ``%``, ``$``, quotes, backslashes, Unicode separators, long
strings) and Hypothesis-generated ones, about 200 values per unit load. Then:

- what systemd holds, read over D-Bus (the ``Environment`` and ``ExecStart``
  properties ``systemctl show -p Environment,ExecStart`` prints, but as exact
  arrays: ``systemctl show`` joins them with spaces), equals the spec;
- the running agent's own ``/proc/self/cmdline`` and ``/proc/self/environ``
  equal the spec: the argv after systemd's ``$$`` → ``$`` at exec time.

The agent is ``python3 -I -c SCRIPT`` (``-I``: no ``PYTHON*`` variable can
change how it starts); generated variable names get a ``KEEL_T_`` prefix so
that none can be ``LD_PRELOAD`` and the like.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from tests.harness.nspawn import Container, Image
from tests.unit_values import CARRIED, INJECTION, carried_text, env_names

AGENT = "vals"
UNIT = f"keel-agent-{AGENT}.service"
SPEC = f"/root/specs/{AGENT}.json"

# The agent: its exact argv and environment, from the kernel, into its state directory.
SCRIPT = (
    "import json, os, signal\n"
    "def strings(path):\n"
    "    with open(path, 'rb') as f:\n"
    "        return [s.decode() for s in f.read().split(b'\\0')[:-1]]\n"
    "report = {'pid': os.getpid(), 'argv': strings('/proc/self/cmdline'),\n"
    "          'environ': strings('/proc/self/environ')}\n"
    "state = os.environ['STATE_DIRECTORY']\n"
    "with open(state + '/report.tmp', 'w') as f:\n"
    "    json.dump(report, f)\n"
    "os.replace(state + '/report.tmp', state + '/report.json')\n"
    "signal.pause()\n"
)
PROGRAM = ["/usr/bin/python3", "-I", "-c", SCRIPT]


def bus_path(unit: str) -> str:
    """systemd's D-Bus object path of a unit (bus_label_escape)."""
    label = "".join(c if c.isalnum() and c.isascii() else f"_{ord(c):02x}" for c in unit)
    return f"/org/freedesktop/systemd1/unit/{label}"


def service_property(box: Container, name: str) -> Any:
    out = box.run(
        "busctl", "--json=short", "get-property", "org.freedesktop.systemd1", bus_path(UNIT),
        "org.freedesktop.systemd1.Service", name,
    ).stdout  # fmt: skip
    return json.loads(out)["data"]


def install(box: Container, args: list[str], environment: dict[str, str]) -> dict[str, Any]:
    """Install the agent with these values; its report once the new process runs."""
    spec = {"name": AGENT, "tier": 2, "command": [*PROGRAM, *args], "environment": environment}
    box.write_file(SPEC, json.dumps(spec))
    box.run("keel", "agents", "install", SPEC, timeout=120)

    def report() -> dict[str, Any] | None:
        pid = box.unit_properties(UNIT, "MainPID")["MainPID"]
        text = box.run("cat", f"/var/lib/keel-agents/{AGENT}/report.json", check=False).stdout
        try:
            found: dict[str, Any] = json.loads(text)
        except ValueError:
            return None
        return found if str(found["pid"]) == pid else None

    box.wait_until(lambda: report() is not None, timeout=60, what=f"a report from {UNIT}")
    result = report()
    assert result is not None
    return result


def check_round_trip(box: Container, args: list[str], environment: dict[str, str]) -> None:
    command = [*PROGRAM, *args]
    report = install(box, args, environment)
    # What systemd parsed from the unit file (argv before the $$ → $ of exec time).
    exec_start = service_property(box, "ExecStart")
    assert len(exec_start) == 1
    path, argv = exec_start[0][0], exec_start[0][1]
    assert path == command[0]
    assert argv == [command[0], *(arg.replace("$", "$$") for arg in command[1:])]
    assert service_property(box, "Environment") == [f"{k}={v}" for k, v in environment.items()]
    # What the agent's process was given.
    assert report["argv"] == command
    given_env = dict(entry.split("=", 1) for entry in report["environ"])
    assert {name: given_env.get(name) for name in environment} == environment


@pytest.fixture(scope="module")
def box(image: Image) -> Iterator[Container]:
    container = Container("values", image)
    try:
        container.start()
        yield container
    finally:
        container.stop()


def test_the_issues_injection_reaches_the_agent_as_one_value(box: Container) -> None:
    check_round_trip(box, ["/bin/sleep", "100"], {"A": INJECTION})
    assert box.unit_properties(UNIT, "User")["User"] == "keel-agent-vals"
    assert service_property(box, "ExecStartPre") == []


def test_every_hostile_value_reaches_the_agent_exactly(box: Container) -> None:
    check_round_trip(box, CARRIED, {f"KEEL_T_{i}": value for i, value in enumerate(CARRIED)})


@settings(
    max_examples=examples(3),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    args=st.lists(carried_text(60), min_size=100, max_size=100),
    environment=st.dictionaries(
        env_names().map(lambda name: f"KEEL_T_{name}"), carried_text(60), min_size=100, max_size=100
    ),
)
def test_generated_values_reach_the_agent_exactly(
    box: Container, args: list[str], environment: dict[str, str]
) -> None:
    check_round_trip(box, args, environment)
