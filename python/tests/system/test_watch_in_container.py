"""watch under real systemd (PID 1 in an nspawn container), with the systemd backend.

Agents are real units: crashes, hangs, a WatchdogSec agent that stops pinging,
operator stops, units rendered by ``keel agents render-unit`` (Restart=always),
and keel-watch itself killed while the agents run on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.harness.nspawn import Container
from tests.harness.plugin import Containers

AGENT = Path(__file__).resolve().parents[1] / "watch_agent.py"

WATCH_UNIT = """\
[Unit]
Description=keel watch
After=dbus.service

[Service]
Type=notify
NotifyAccess=main
ExecStart=/opt/keel/bin/keel watch serve --config /etc/keel/watch.json
WatchdogSec=5s
Restart=always
RestartSec=200ms
"""


def agent_unit(
    port: int, *, notify: bool = False, watchdog: str | None = None, start_delay: float = 0
) -> str:
    lines = [
        "[Service]",
        f"Type={'notify' if notify else 'exec'}",
        f"ExecStart=/usr/bin/python3 /srv/watch_agent.py --port {port}"
        + (" --notify" if notify else "")
        + (f" --start-delay {start_delay:g}" if start_delay else ""),
        "Restart=no",
    ]
    if watchdog:
        lines.append(f"WatchdogSec={watchdog}")
    return "\n".join(lines) + "\n"


def probe(port: int) -> dict[str, Any]:
    return {
        "type": "http",
        "url": f"http://127.0.0.1:{port}/health",
        "interval": 0.5,
        "timeout": 0.4,
        "failures": 2,
        "grace": 5,
    }


def setup(box: Container, units: dict[str, str], agents: dict[str, Any]) -> None:
    box.write_file("/srv/watch_agent.py", AGENT.read_text())
    for name, text in units.items():
        box.write_file(f"/etc/systemd/system/{name}", text)
    config = {
        "backend": "systemd",
        "socket": "/run/keel/watch.sock",
        "ledger": "/var/lib/keel/ledger.db",
        "agents": agents,
    }
    box.write_file("/etc/keel/watch.json", json.dumps(config))
    box.write_file("/etc/systemd/system/keel-watch.service", WATCH_UNIT)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "keel-watch.service", timeout=60)


def status(box: Container) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(box.run("keel", "status", "--json").stdout)
    return result


def agent(box: Container, name: str) -> dict[str, Any]:
    found: dict[str, Any] = status(box)["agents"][name]
    return found


def wait_agent(box: Container, name: str, what: str, **expected: Any) -> dict[str, Any]:
    def matches() -> bool:
        current = agent(box, name)
        return all(current.get(key) == value for key, value in expected.items())

    box.wait_until(matches, timeout=60, what=f"{name}: {what}")
    return agent(box, name)


def main_pid(box: Container, unit: str) -> int:
    return int(box.unit_properties(unit, "MainPID")["MainPID"])


def settled_down(box: Container, unit: str) -> bool:
    """Down with nothing pending that could start it: no job, no Restart= timer."""
    props = box.unit_properties(unit, "ActiveState", "SubState")
    jobs = box.run("systemctl", "list-jobs", "--no-legend", unit).stdout.strip()
    return props["ActiveState"] in ("inactive", "failed") and not jobs


def ledger(box: Container) -> list[dict[str, Any]]:
    out = box.run(
        "keel", "ledger", "tail", "--db", "/var/lib/keel/ledger.db", "-n", "500", "--json"
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


def get(box: Container, url: str) -> None:
    box.run(
        "python3", "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3).read()"
    )


def test_crash_hang_and_operator_stop_of_real_units(containers: Containers) -> None:
    box = containers.boot("watch1")
    setup(
        box,
        {"agent-web.service": agent_unit(8081)},
        {"web": {"unit": "agent-web.service", "probes": [probe(8081)]}},
    )
    first = wait_agent(box, "web", "healthy", state="healthy")
    assert first["pid"] == main_pid(box, "agent-web.service")

    # A crash: systemd sees SIGCHLD, watch sees the unit fail and restarts it.
    box.run("kill", "-KILL", str(first["pid"]))
    crashed = wait_agent(box, "web", "restarted", restarts=1, state="healthy")
    assert crashed["pid"] != first["pid"]
    assert crashed["pid"] == main_pid(box, "agent-web.service")
    assert crashed["last_error"] == "killed by signal 9 (SIGKILL)"

    # A hang: the process lives but stops answering; the probe budget runs out.
    get(box, "http://127.0.0.1:8081/hang")
    hung = wait_agent(box, "web", "restarted after the hang", restarts=2, state="healthy")
    assert hung["last_error"].startswith("probe http failed 2 times in a row: timeout")
    assert box.unit_properties("agent-web.service", "ActiveState")["ActiveState"] == "active"

    # systemctl stop is respected: the agent stays stopped (watch recorded the
    # stop as systemd's, has no restart pending, and systemd has no job queued)...
    box.run("systemctl", "stop", "agent-web.service")
    wait_agent(box, "web", "stopped", state="stopped")
    box.wait_until(
        lambda: (
            ("stop", "web", "systemd")
            in [(e["kind"], e["subject"], e["data"].get("by")) for e in ledger(box)]
        ),
        timeout=30,
        what="the stop recorded as systemd's",
    )
    box.wait_until(lambda: settled_down(box, "agent-web.service"), timeout=30, what="web down")
    stopped = agent(box, "web")
    assert (stopped["state"], stopped["backoff_until"], stopped["restarts"]) == ("stopped", None, 2)
    # ...until someone starts it again.
    box.run("systemctl", "start", "agent-web.service")
    wait_agent(box, "web", "healthy again", state="healthy")

    # systemd re-executing itself drops watch's connection; watch reconnects
    # and goes on following the unit.
    box.run("systemctl", "daemon-reexec", timeout=120)
    box.wait_until(
        lambda: box.run("systemctl", "is-system-running", check=False).stdout.strip() == "running",
        timeout=60,
        what="systemd back",
    )
    pid = wait_agent(box, "web", "healthy", state="healthy")["pid"]
    box.run("kill", "-KILL", str(pid))
    wait_agent(box, "web", "restarted after the reexec", restarts=3, state="healthy")
    assert "reconnected to systemd" in box.journal("keel-watch.service")

    # keel-watch pinged its own watchdog all along (WatchdogSec=5s): never restarted.
    assert box.unit_properties("keel-watch.service", "NRestarts")["NRestarts"] == "0"

    entries = ledger(box)
    kinds = [(e["kind"], e["subject"]) for e in entries if e["source"] == "watch"]
    assert kinds.count(("restart", "web")) == 3
    assert ("stop", "web") in kinds
    table = box.run("keel", "status").stdout.splitlines()
    assert table[1].split()[:2] == ["web", "healthy"]


def test_a_watchdog_kill_is_reported_and_restarted(containers: Containers) -> None:
    box = containers.boot("watch2")
    setup(
        box,
        {"agent-dog.service": agent_unit(8082, notify=True, watchdog="1s")},
        {"dog": {"unit": "agent-dog.service"}},
    )
    first = wait_agent(box, "dog", "healthy", state="healthy")
    # The agent stops sending WATCHDOG=1: systemd kills it (SIGABRT) after 1 s.
    get(box, "http://127.0.0.1:8082/hang")
    dog = wait_agent(box, "dog", "restarted", restarts=1, state="healthy")
    assert dog["pid"] != first["pid"]
    assert dog["last_error"].startswith("watchdog timeout: no WATCHDOG=1 within WatchdogSec")
    restart = next(e for e in ledger(box) if e["kind"] == "restart" and e["subject"] == "dog")
    assert restart["data"]["cause"].startswith("watchdog timeout")


def test_killing_watch_leaves_agents_running_and_they_are_adopted(
    containers: Containers,
) -> None:
    box = containers.boot("watch3")
    # A bad config first: keel-watch fails at start, naming the key.
    box.write_file("/etc/keel/watch.json", json.dumps({"backend": "systemd", "agentz": {}}))
    box.write_file(
        "/etc/systemd/system/keel-watch.service", WATCH_UNIT.replace("Restart=always", "Restart=no")
    )
    box.run("systemctl", "daemon-reload")
    failed = box.run("systemctl", "start", "keel-watch.service", check=False, timeout=60)
    assert failed.returncode != 0
    assert "/etc/keel/watch.json: agentz: unknown key" in box.journal("keel-watch.service")

    # Agents as the agents module renders them (Restart=always, RestartSec=100ms).
    spec = {
        "name": "rendered",
        "command": ["/usr/bin/python3", "/srv/watch_agent.py", "--port", "8084"],
        "tier": 0,
    }
    box.write_file("/etc/keel/agents/rendered.json", json.dumps(spec))
    rendered = box.run("keel", "agents", "render-unit", "/etc/keel/agents/rendered.json").stdout
    assert "Restart=always" in rendered
    box.run("useradd", "--system", "--no-create-home", "keel-agent-rendered")
    box.run("systemctl", "reset-failed", "keel-watch.service")
    setup(
        box,
        {"agent-a.service": agent_unit(8083), "keel-agent-rendered.service": rendered},
        {
            "a": {"unit": "agent-a.service", "probes": [probe(8083)]},
            "rendered": {"probes": [probe(8084)], "restart": {"backoff_initial": 30}},
        },
    )
    a = wait_agent(box, "a", "healthy", state="healthy")
    r = wait_agent(box, "rendered", "healthy", state="healthy")

    watch_pid = main_pid(box, "keel-watch.service")
    box.run("kill", "-KILL", str(watch_pid))
    # The agents do not notice: same processes, still active.
    assert main_pid(box, "agent-a.service") == a["pid"]
    assert main_pid(box, "keel-agent-rendered.service") == r["pid"]
    get(box, "http://127.0.0.1:8083/health")
    # systemd restarts keel-watch, which adopts them instead of restarting them.
    box.wait_until(
        lambda: (
            main_pid(box, "keel-watch.service") not in (0, watch_pid)
            and box.run("keel", "status", check=False).returncode == 0
        ),
        timeout=60,
        what="keel-watch back",
    )
    assert agent(box, "a")["pid"] == a["pid"]
    assert agent(box, "a")["restarts"] == 0
    assert agent(box, "rendered")["pid"] == r["pid"]

    # And supervises them: a Restart=always unit's crash is one restart, not two...
    box.run("kill", "-KILL", str(r["pid"]))
    again = wait_agent(box, "rendered", "restarted", restarts=1, state="healthy")
    assert again["pid"] == main_pid(box, "keel-agent-rendered.service")
    # ...and the second crash in a row backs off (watch cancels systemd's own timer:
    # the unit settles down with no restart of systemd's pending, back-off 30 s).
    box.run("kill", "-KILL", str(again["pid"]))
    wait_agent(box, "rendered", "backing off", state="backoff")
    box.wait_until(
        lambda: settled_down(box, "keel-agent-rendered.service"),
        timeout=30,
        what="systemd's own restart cancelled",
    )
    held = agent(box, "rendered")
    assert (held["state"], held["pid"], held["restarts"]) == ("backoff", None, 1)


def test_an_agent_stopped_while_it_starts_can_be_started_again(containers: Containers) -> None:
    # A Type=notify agent is "activating" until READY=1 (here 3 s after it starts).
    # A stop then used to leave watch waiting for an exit that was never
    # reported: the agent showed "stopped" and `keel watch start` did nothing.
    box = containers.boot("watch4")
    setup(
        box,
        {"agent-slow.service": agent_unit(8085, notify=True, start_delay=3)},
        {"slow": {"unit": "agent-slow.service"}},
    )
    box.wait_until(
        lambda: (
            box.unit_properties("agent-slow.service", "ActiveState")["ActiveState"] == "activating"
        ),
        timeout=60,
        what="slow activating",
    )
    box.run("keel", "watch", "stop", "slow")
    box.wait_until(lambda: settled_down(box, "agent-slow.service"), timeout=30, what="slow down")
    box.wait_until(
        lambda: any(e["kind"] == "exit" and e["subject"] == "slow" for e in ledger(box)),
        timeout=30,
        what="the stop's exit recorded",
    )
    assert agent(box, "slow")["state"] == "stopped"
    box.run("keel", "watch", "start", "slow")
    wait_agent(box, "slow", "healthy after the start", state="healthy")
    assert agent(box, "slow")["pid"] == main_pid(box, "agent-slow.service")
    assert agent(box, "slow")["restarts"] == 0
