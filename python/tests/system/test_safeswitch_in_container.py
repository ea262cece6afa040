"""safeswitch under real systemd (PID 1 in an nspawn container), with the systemd runner.

The rollback timer is a real transient timer unit, the activations real
transient services (``systemd-run --wait``), the gate fed by a real watch
daemon supervising real agent units, and ``systemctl is-system-running``.
The systems are the generation fixtures of the integration tests, written
into the container.
"""

from __future__ import annotations

import json
from typing import Any

from tests.harness.nspawn import Container
from tests.harness.plugin import Containers
from tests.integration.safeswitch.lab import HEALTH_AGENT, SCRIPT

LAB = "/srv/lab"
CONFIG = "/etc/keel/safeswitch.json"


WATCH_UNIT = """\
[Service]
Type=notify
NotifyAccess=main
ExecStart=/opt/keel/bin/keel watch serve --config /etc/keel/watch.json
Restart=always
RestartSec=200ms
"""


def system(box: Container, name: str, behaviour: str = "ok") -> str:
    path = f"{LAB}/systems/{name}"
    box.write_file(
        f"{path}/bin/switch-to-configuration", SCRIPT.format(name=name, lab=LAB), mode=0o755
    )
    box.write_file(f"{LAB}/behaviour/{name}", behaviour + "\n")
    return path


def setup_lab(box: Container, **settings: Any) -> None:
    old = system(box, "gen-a")
    box.sh(
        f"mkdir -p {LAB}/profiles {LAB}/gcroots && ln -s {old} {LAB}/profiles/system-1-link && "
        f"ln -s system-1-link {LAB}/profiles/system && ln -s {old} {LAB}/current && "
        f"echo ok > {LAB}/health"
    )
    config: dict[str, Any] = {
        "profile": f"{LAB}/profiles/system",
        "current": f"{LAB}/current",
        "gcroots": f"{LAB}/gcroots",
        "timer": "systemd",
        "keel": ["/opt/keel/bin/keel"],
        "interval": 0.2,
        "gate": 2,
        "deadline": 30,
    }
    config.update(settings)
    box.write_file(CONFIG, json.dumps(config))


def state(box: Container) -> dict[str, Any] | None:
    result = box.run("cat", "/run/keel/safeswitch/state.json", check=False)
    if result.returncode != 0:
        return None
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def phase(box: Container) -> str | None:
    current = state(box)
    return None if current is None else str(current["phase"])


def running(box: Container) -> str:
    return box.run("readlink", "-f", f"{LAB}/current").stdout.strip()


def calls(box: Container) -> list[str]:
    return box.run("cat", f"{LAB}/calls", check=False).stdout.splitlines()


def start_switcher(box: Container, target: str, *args: str) -> None:
    """``keel switch`` as a unit of its own (commands from outside are not in a cgroup)."""
    box.run(
        "systemd-run", "--unit=switcher", "--service-type=exec", "--quiet", "--",
        "/opt/keel/bin/keel", "switch", *args, target,
    )  # fmt: skip


def test_the_transient_timer_rolls_back_after_sigkill(containers: Containers) -> None:
    box = containers.boot("switch1")
    slow = {"type": "command", "command": "sleep 120", "timeout": 200, "name": "slow"}
    setup_lab(box, gate=1, deadline=12, checks=[slow])
    new = system(box, "gen-b")
    start_switcher(box, new)
    box.wait_until(lambda: phase(box) == "gating", timeout=60, what="the gate to open")
    current = state(box)
    assert current is not None
    timer_unit = current["timer"]["unit"]
    assert timer_unit == f"keel-safeswitch-rollback-{current['id']}.timer"
    assert box.run("systemctl", "is-active", timer_unit).stdout.strip() == "active"
    props = box.unit_properties(timer_unit, "AccuracyUSec", "RemainAfterElapse")
    assert props == {"AccuracyUSec": "100ms", "RemainAfterElapse": "no"}
    assert running(box) == new
    # The activation ran in its own transient unit, which is gone (--collect).
    assert calls(box) == ["test gen-b"]

    pid = box.unit_properties("switcher.service", "MainPID")["MainPID"]
    box.run("kill", "-KILL", pid)
    # A daemon-reload (what a NixOS switch does) leaves the transient timer armed.
    box.run("systemctl", "daemon-reload")
    assert box.run("systemctl", "is-active", timer_unit).stdout.strip() == "active"

    box.wait_until(lambda: phase(box) == "rolled-back", timeout=90, what="the timer's rollback")
    assert running(box).endswith("/gen-a")
    final = state(box)
    assert final is not None
    assert final["rolled_back_by"] == "timer"
    assert calls(box) == ["test gen-b", "test gen-a"]
    service = timer_unit.removesuffix(".timer") + ".service"
    timer_log = box.read_file(f"/run/keel/safeswitch/{final['id']}-timer.log")
    assert "the rollback timer fired" in timer_log
    # The rollback service succeeded (exit 0): nothing failed, nothing left behind.
    box.wait_until(
        lambda: (
            box.run("systemctl", "is-active", service, check=False).stdout.strip()
            in ("inactive", "unknown")
        ),
        timeout=30,
        what="the rollback service to end",
    )
    failed = box.run("systemctl", "--failed", "--plain", "--no-legend").stdout.split("\n")
    assert [line.split()[0] for line in failed if line.strip()] == ["switcher.service"]  # killed
    entries = [
        json.loads(line)
        for line in box.run(
            "keel", "ledger", "tail", "--db", "/var/lib/keel/ledger.db", "--json"
        ).stdout.splitlines()
    ]
    assert [e["kind"] for e in entries if e["source"] == "safeswitch"] == [
        "started",
        "rolled-back",
    ]


def test_activation_units_report_their_exit_status(containers: Containers) -> None:
    box = containers.boot("switch2")
    setup_lab(box, checks=[{"type": "command", "command": f"grep -qx ok {LAB}/health"}])
    failing = box.run("keel", "switch", "--json", system(box, "gen-b", "fail"), check=False)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    reason = json.loads(failing.stdout)["reason"]
    assert reason.startswith("activation failed: switch-to-configuration test exited with status 1")
    assert "a unit did not start" in reason
    good = box.run("keel", "switch", "--json", system(box, "gen-c"), check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    assert running(box).endswith("/gen-c")
    assert box.run("readlink", f"{LAB}/profiles/system").stdout.strip() == "system-2-link"
    # No unit of the switch is left: the timer was disarmed, activations collected.
    units = box.run(
        "systemctl", "list-units", "--all", "--plain", "--no-legend", "keel-safeswitch*"
    )
    assert units.stdout.strip() == ""


def test_real_agent_units_feed_the_gate_through_watch(containers: Containers) -> None:
    box = containers.boot("switch3")
    box.write_file("/srv/agent.py", HEALTH_AGENT)
    box.write_file(
        "/etc/systemd/system/agent-web.service",
        f"[Service]\nExecStart=/usr/bin/python3 /srv/agent.py {LAB}/health 8091\nRestart=no\n",
    )
    box.write_file(
        "/etc/keel/watch.json",
        json.dumps(
            {
                "backend": "systemd",
                "agents": {
                    "web": {
                        "unit": "agent-web.service",
                        "probes": [
                            {"type": "http", "url": "http://127.0.0.1:8091/", "interval": 0.3,
                             "timeout": 0.3, "failures": 2, "grace": 5}
                        ],
                    }
                },
            }
        ),
    )  # fmt: skip
    box.write_file("/etc/systemd/system/keel-watch.service", WATCH_UNIT)
    setup_lab(box, gate=3, deadline=40, checks=[{"type": "watch"}, {"type": "system"}])
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "agent-web.service", "keel-watch.service", timeout=60)

    def web(key: str) -> Any:
        out = box.run("keel", "status", "--json", check=False)
        if out.returncode != 0:
            return None
        return json.loads(out.stdout)["agents"]["web"][key]

    box.wait_until(lambda: web("state") == "healthy", timeout=60, what="web healthy")

    good = box.run("keel", "switch", "--json", system(box, "gen-b"), check=False, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    verdicts = {c["name"]: c["verdict"] for c in json.loads(good.stdout)["checks"]}
    assert verdicts == {"watch": "pass", "system": "pass"}

    bad = box.run(
        "keel", "switch", "--json", system(box, "gen-c", "break"), check=False, timeout=120
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    reason = json.loads(bad.stdout)["reason"]
    # watch sees the agent crash, or systemd lists its unit failed: whichever asks first.
    assert reason.startswith(
        ("check watch failed: web ", "check system failed: degraded: failed units: agent-web")
    ), reason
    assert running(box).endswith("/gen-b")
    # Back on the old system the agent is healthy again.
    box.wait_until(lambda: web("state") == "healthy", timeout=90, what="web healthy again")
    history = json.loads(box.run("keel", "switch", "history", "--json").stdout)
    assert [h["outcome"] for h in history] == ["committed", "rolled-back"]
