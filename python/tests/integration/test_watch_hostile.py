"""``keel watch``: what ``check-config`` accepts, ``serve`` runs, with exactly those values.

For each value no process can be given (an ``=`` in a variable name, a NUL
in a value or in the command...), ``check-config`` and ``serve`` both refuse
with one line naming the key, and ``serve`` starts nothing. For hostile but
valid values (every control character, quotes, ``%``, ``$``, Unicode
separators, long strings: :data:`tests.unit_values.CARRIED`), ``serve``
starts the agent with exactly that argv and environment, as its own
``/proc/self/cmdline`` and ``/proc/self/environ`` say.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from keel.watch.children import pidfd_supported

from tests.integration.test_watch_cli import Daemon, keel, wait_for
from tests.integration.watch_support import write_config
from tests.unit_values import CARRIED

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not pidfd_supported(),
    reason="the process backend needs Linux 5.3+ (pidfd_open)",
)

# The agent: its argv and environment from the kernel, then it waits to be stopped.
SCRIPT = (
    "import json, os, signal\n"
    "def strings(path):\n"
    "    with open(path, 'rb') as f:\n"
    "        return [s.decode() for s in f.read().split(b'\\0')[:-1]]\n"
    "report = {'argv': strings('/proc/self/cmdline'), 'environ': strings('/proc/self/environ')}\n"
    "target = os.environ['KEEL_T_REPORT']\n"
    "with open(target + '.tmp', 'w') as f:\n"
    "    json.dump(report, f)\n"
    "os.replace(target + '.tmp', target)\n"
    "signal.pause()\n"
)

REFUSED = [
    (
        {"environment": {"A=B": "1"}},
        'agents.a.environment["A=B"]: "A=B" is not a valid variable name',
    ),
    (
        {"environment": {"A": "x\x00y"}},
        'agents.a.environment.A: "x\\u0000y" contains a NUL character',
    ),
    (
        {"command": ["/bin/sleep", "10\x00"]},
        'agents.a.command[1]: "10\\u0000" contains a NUL character',
    ),
]


@pytest.mark.parametrize(("agent", "message"), REFUSED, ids=["env-name", "env-nul", "argv-nul"])
def test_check_config_and_serve_refuse_what_no_process_can_be_given(
    tmp_path: Path, agent: dict[str, Any], message: str
) -> None:
    config = write_config(tmp_path, {"a": {"command": ["/bin/sleep", "10"], **agent}})
    for verb in ("check-config", "serve"):
        result = keel("watch", verb, "--config", str(config))
        assert (result.returncode, result.stdout) == (2, ""), result
        assert result.stderr.startswith(f"keel: error: {config}: {message}"), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "watch.sock").exists()
    assert not (tmp_path / "processes.json").exists()


def test_serve_gives_the_agent_exactly_its_argv_and_environment(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    command = [sys.executable, "-I", "-c", SCRIPT, *CARRIED]
    environment = {f"KEEL_T_{i}": value for i, value in enumerate(CARRIED)}
    environment["KEEL_T_REPORT"] = str(report)
    config = write_config(tmp_path, {"a": {"command": command, "environment": environment}})
    check = keel("watch", "check-config", "--config", str(config))
    assert check.returncode == 0, check.stderr
    daemon = Daemon(config, tmp_path / "watch.log")
    try:
        wait_for(report.exists, "the agent's report")
        got = json.loads(report.read_text())
    finally:
        assert daemon.kill(15) == 0
        daemon.log.close()
    assert got["argv"] == command
    given = dict(entry.split("=", 1) for entry in got["environ"])
    assert {name: given.get(name) for name in environment} == environment
    assert given["KEEL_AGENT"] == "a"
    assert "Traceback" not in (tmp_path / "watch.log").read_text()
