"""The gate fed by a real watch daemon (process backend) over its control socket."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from keel.watch.children import pidfd_supported

from tests.integration.safeswitch.lab import HEALTH_AGENT, KEEL, Lab, wait_for
from tests.integration.watch_support import free_port

pytestmark = pytest.mark.skipif(not pidfd_supported(), reason="needs Linux 5.3+ (pidfd_open)")


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Lab, Path]]:
    lab = Lab(tmp_path / "lab")
    lab.boot(lab.system("gen-a"))
    agent = tmp_path / "agent.py"
    agent.write_text(HEALTH_AGENT)
    port = free_port()
    socket = tmp_path / "watch.sock"
    config = {
        "backend": "process",
        "socket": str(socket),
        "ledger": str(lab.ledger),
        "state_file": str(tmp_path / "processes.json"),
        "agents": {
            "web": {
                "command": [sys.executable, str(agent), str(lab.root / "health"), str(port)],
                "probes": [
                    {"type": "http", "url": f"http://127.0.0.1:{port}/", "interval": 0.2,
                     "timeout": 0.2, "failures": 2, "grace": 5}
                ],
                "stop_timeout": 2,
            }
        },
    }  # fmt: skip
    (tmp_path / "watch.json").write_text(json.dumps(config))
    log = (tmp_path / "watch.log").open("w")
    daemon = subprocess.Popen(
        [*KEEL, "watch", "serve", "--config", str(tmp_path / "watch.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            out = subprocess.run(
                [*KEEL, "status", "--socket", str(socket), "--json"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            return out.returncode == 0 and json.loads(out.stdout)["agents"]["web"]["state"] == (
                "healthy"
            )

        wait_for(healthy, "the agent to be healthy under watch", 60)
        lab.config(gate=2, deadline=30, checks=[{"type": "watch", "socket": str(socket)}])
        yield lab, socket
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        log.close()


def test_watch_says_healthy_and_the_switch_commits(watched: tuple[Lab, Path]) -> None:
    lab, _ = watched
    result = lab.switch(lab.system("gen-b"), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = json.loads(result.stdout)["checks"]
    assert checks[0]["name"] == "watch"
    assert checks[0]["verdict"] == "pass"
    assert checks[0]["detail"] == "1 agent healthy"


def test_an_agent_the_new_system_breaks_fails_the_gate(watched: tuple[Lab, Path]) -> None:
    lab, socket = watched
    result = lab.switch(lab.system("gen-b", "break"), "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    reason = json.loads(result.stdout)["reason"]
    assert reason.startswith("check watch failed: web ")
    assert lab.running().endswith("gen-a")

    def healthy_again() -> bool:
        out = subprocess.run(
            [*KEEL, "status", "--socket", str(socket), "--json"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return bool(json.loads(out.stdout)["agents"]["web"]["state"] == "healthy")

    wait_for(healthy_again, "the agent to recover on the old system", 60)
