"""``keel watch serve``, ``keel status`` and friends as an operator runs them."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keel.watch.children import pidfd_supported

from tests.integration.watch_support import (
    agent_entry,
    cgroups_available,
    cleaned_up,
    escaping_agent,
    free_port,
    tagged,
    write_config,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not pidfd_supported(),
    reason="the process backend needs Linux 5.3+ (pidfd_open)",
)

KEEL = [sys.executable, "-m", "keel"]


def keel(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KEEL, *args], capture_output=True, text=True, timeout=30, check=check)


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def status(sock: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        keel("status", "--socket", str(sock), "--json", check=True).stdout
    )
    return result


def answers(sock: Path) -> bool:
    return keel("status", "--socket", str(sock)).returncode == 0


class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [*KEEL, "watch", "serve", "--config", str(config)],
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=30)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.kill(signal.SIGTERM)
        daemon.log.close()
    # Anything a SIGKILLed watch left running belongs to this test: end it.
    state = tmp_path / "processes.json"
    if state.exists():
        for entry in json.loads(state.read_text()).get("agents", {}).values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(entry["pid"], signal.SIGKILL)


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "web": {
                "command": ["true"],
                "probes": [{"type": "http", "url": "http://x/", "intervall": 1}],
            }
        },
    )
    result = keel("watch", "serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"keel: error: {config}: agents.web.probes[0].intervall: unknown key "
        "(known keys here: expect_body, expect_status, failures, grace, interval, name, "
        "timeout, type, url)"
    )
    assert not (tmp_path / "watch.sock").exists()  # it never half-started
    check = keel("watch", "check-config", "--config", str(config))
    assert check.returncode == 2
    assert "agents.web.probes[0].intervall: unknown key" in check.stderr


def test_check_config_accepts_a_good_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"web": agent_entry(8080)})
    result = keel("watch", "check-config", "--config", str(config), check=True)
    assert result.stdout.strip() == f"{config}: valid (1 agent, process backend, 0 alert routes)"
    listed = json.loads(keel("watch", "check-config", "--config", str(config), "--json").stdout)
    assert listed["agents"]["web"]["probes"] == ["http"]


def test_status_table_json_metrics_and_verbs(tmp_path: Path, daemons: list[Daemon]) -> None:
    port, metrics_port = free_port(), free_port()
    config = write_config(
        tmp_path,
        {"web": agent_entry(port), "idle": {"command": ["sleep", "600"]}},
        metrics=f"127.0.0.1:{metrics_port}",
    )
    sock = tmp_path / "watch.sock"
    daemons.append(Daemon(config, tmp_path / "watch.log"))
    wait_for(lambda: answers(sock), "the control socket")
    wait_for(lambda: status(sock)["agents"]["web"]["state"] == "healthy", "web healthy")

    result = status(sock)
    web = result["agents"]["web"]
    assert web["restarts"] == 0
    assert isinstance(web["pid"], int)
    assert set(result["agents"]) == {"web", "idle"}
    assert result["backend"] == "process"

    table = keel("status", "--socket", str(sock), check=True).stdout.splitlines()
    assert table[0].split() == [
        "AGENT",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "LAST",
        "PROBE",
        "LAST",
        "ERROR",
    ]
    assert table[1].split()[:3] == ["idle", "healthy", str(result["agents"]["idle"]["pid"])]
    assert table[2].split()[:3] == ["web", "healthy", str(web["pid"])]

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        assert page.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = page.read().decode()
    assert 'keel_watch_up{agent="web"} 1' in text
    assert 'keel_watch_restarts_total{agent="web"} 0' in text
    assert "# TYPE keel_watch_restart_latency_seconds histogram" in text

    os.kill(web["pid"], signal.SIGKILL)
    wait_for(lambda: status(sock)["agents"]["web"]["restarts"] == 1, "the restart")
    wait_for(lambda: status(sock)["agents"]["web"]["state"] == "healthy", "healthy again")
    assert "killed by signal 9 (SIGKILL)" in keel("status", "--socket", str(sock)).stdout

    stopped = keel("watch", "stop", "idle", "--socket", str(sock), check=True)
    assert stopped.stdout.strip() == "idle: stopped"
    wait_for(lambda: status(sock)["agents"]["idle"]["pid"] is None, "idle stopped")
    started = keel("watch", "start", "idle", "--socket", str(sock), check=True)
    assert started.stdout.strip() == "idle: starting"
    wait_for(lambda: status(sock)["agents"]["idle"]["pid"] is not None, "idle running")
    running = status(sock)["agents"]["idle"]["pid"]
    # restart: one step, the start follows the exit.
    keel("watch", "restart", "idle", "--socket", str(sock), check=True)
    wait_for(lambda: status(sock)["agents"]["idle"]["pid"] not in (None, running), "idle restarted")
    missing = keel("watch", "stop", "nope", "--socket", str(sock))
    assert missing.returncode == 1
    assert "no agent named 'nope' (watch supervises: idle, web)" in missing.stderr


def test_status_without_a_daemon_says_how_to_fix_it(tmp_path: Path) -> None:
    result = keel("status", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert "cannot reach the watch daemon at" in result.stderr
    assert "is `keel watch serve` running" in result.stderr


def test_agents_outlive_a_killed_watch_and_are_adopted(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    port = free_port()
    config = write_config(tmp_path, {"web": agent_entry(port)})
    sock = tmp_path / "watch.sock"
    daemons.append(Daemon(config, tmp_path / "watch.log"))
    wait_for(lambda: answers(sock), "the control socket")
    wait_for(lambda: status(sock)["agents"]["web"]["state"] == "healthy", "web healthy")
    pid = status(sock)["agents"]["web"]["pid"]

    daemons[0].kill(signal.SIGKILL)
    os.kill(pid, 0)  # still running without its supervisor
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as page:
        assert page.status == 200

    daemons.append(Daemon(config, tmp_path / "watch.log"))
    wait_for(lambda: answers(sock), "the control socket again")
    wait_for(lambda: status(sock)["agents"]["web"]["state"] == "healthy", "web healthy again")
    again = status(sock)["agents"]["web"]
    assert again["pid"] == pid  # adopted, not a second copy
    assert again["restarts"] == 0

    # The adopted agent is supervised like any other: its crash is seen at once.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: status(sock)["agents"]["web"]["restarts"] == 1, "restart of the adopted agent")
    assert "status unknown" in status(sock)["agents"]["web"]["last_error"]

    # A graceful stop of watch (SIGTERM) stops the agents it runs.
    last = status(sock)["agents"]["web"]["pid"]
    assert daemons[1].kill(signal.SIGTERM) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(last, 0)


def test_nothing_an_agent_started_survives_watch_killed_then_stopped(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    reason = cgroups_available()
    if reason is not None:
        pytest.skip(f"no cgroup for agents here: {reason}")
    sock = tmp_path / "watch.sock"
    with cleaned_up(random.randrange(10**8, 10**9)) as marker:
        config = write_config(tmp_path, {"dbl": escaping_agent(marker)})
        daemons.append(Daemon(config, tmp_path / "watch.log"))
        wait_for(lambda: len(tagged(marker)) == 4, "the agent and its three escapees")
        first = set(tagged(marker))
        entry = json.loads((tmp_path / "processes.json").read_text())["agents"]["dbl"]
        cgroup = Path(entry["cgroup"])
        assert {int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()} == first

        # A killed watch leaves them running; the next one adopts them, cgroup and all.
        daemons[0].kill(signal.SIGKILL)
        assert set(tagged(marker)) == first
        daemons.append(Daemon(config, tmp_path / "watch.log"))
        wait_for(lambda: answers(sock), "the control socket again")
        assert status(sock)["agents"]["dbl"]["pid"] == entry["pid"]

        # watch's SIGTERM stops its agents: every process of them.
        assert daemons[1].kill(signal.SIGTERM) == 0
        assert tagged(marker) == []
        assert not cgroup.exists()
        assert not cgroup.parent.exists()  # the killed watch's tree, removed once empty
