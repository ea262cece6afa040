"""Agents at trust tiers 0, 1 and 2 under real systemd, installed from their
specs with ``keel agents install`` and run from the units it renders.

Each example agent (``examples/agents/agent.py``) tries, at start, to write
and read a set of paths and to open raw, packet and netlink sockets, and
writes the outcome to its state directory; the tests read those reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.nspawn import Container, Image

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "agents"
AGENTS = ("ops", "notes", "scout")  # tiers 0, 1, 2


def main_pid(box: Container, agent: str) -> int:
    return int(box.unit_properties(f"keel-agent-{agent}.service", "MainPID")["MainPID"])


def report(box: Container, agent: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(box.read_file(f"/var/lib/keel-agents/{agent}/report.json"))
    return value


def wait_for_fresh_report(box: Container, agent: str) -> dict[str, Any]:
    """The report of the agent's current process (written once it started)."""

    def fresh() -> bool:
        pid = main_pid(box, agent)
        text = box.run("cat", f"/var/lib/keel-agents/{agent}/report.json", check=False).stdout
        try:
            return pid != 0 and json.loads(text)["pid"] == pid
        except (ValueError, KeyError):
            return False

    box.wait_until(fresh, timeout=30, what=f"a report from the running {agent}")
    return report(box, agent)


@pytest.fixture(scope="module")
def agents_host(image: Image) -> Iterator[Container]:
    """One container with the three example agents installed and running."""
    box = Container("agents", image)
    try:
        box.start()
        box.copy_in(EXAMPLES, "/opt/keel-examples/agents")
        box.sh("mkdir -p /root/specs && cp /opt/keel-examples/agents/*.json /root/specs/")
        # Files that only the sandbox (not Unix permissions) keeps from agents.
        box.sh("install -d -m 1777 /srv/keel-open && install -d -m 0755 /home/keel-demo")
        box.write_file("/home/keel-demo/secret.txt", "operator's secret\n", mode=0o644)
        out = box.sh("keel agents install /root/specs/*.json").stdout
        assert "keel: agents installed and running: notes, ops, scout" in out
        box.write_file("/srv/keel-notes/notes.txt", "notes of the tier-1 agent\n", mode=0o644)
        # Restart once everything exists, so each agent's report sees all of it.
        box.run("systemctl", "restart", *[f"keel-agent-{a}.service" for a in AGENTS])
        for agent in AGENTS:
            wait_for_fresh_report(box, agent)
        yield box
    finally:
        box.stop()


def test_install_starts_every_tier(agents_host: Container) -> None:
    listed = json.loads(agents_host.run("keel", "agents", "list", "--json").stdout)["agents"]
    assert {name: (a["tier"], a["user"], a["state"]) for name, a in listed.items()} == {
        "ops": (0, "root", "active"),
        "notes": (1, "keel-agent-notes", "active"),
        "scout": (2, "keel-agent-scout", "active"),
    }
    table = agents_host.run("keel", "agents", "list").stdout.splitlines()
    assert table[0].split() == ["AGENT", "TIER", "USER", "STATE", "PID", "RESTARTS"]
    assert "active/running" in table[1]
    # Users made by install: system users without a login shell.
    entry = agents_host.run("getent", "passwd", "keel-agent-scout").stdout.strip().split(":")
    assert int(entry[2]) < 1000
    assert entry[6].endswith("nologin")


def test_install_is_idempotent(agents_host: Container) -> None:
    before = {agent: main_pid(agents_host, agent) for agent in AGENTS}
    out = agents_host.sh("keel agents install /root/specs/*.json").stdout.splitlines()
    assert not [line for line in out if line.startswith(("write", "create", "systemctl daemon"))]
    assert (
        "systemctl enable keel-agent-scout.service; systemctl start keel-agent-scout.service" in out
    )
    assert {agent: main_pid(agents_host, agent) for agent in AGENTS} == before


def test_rendered_unit_is_what_runs(agents_host: Container) -> None:
    rendered = agents_host.run("keel", "agents", "render-unit", "/root/specs/scout.json").stdout
    installed = agents_host.read_file("/etc/systemd/system/keel-agent-scout.service")
    assert rendered == installed
    spec = json.loads(agents_host.read_file("/etc/keel/agents/scout.json"))
    assert spec["tier"] == 2
    assert spec["egress"]["allow"] == ["example.org", "*.wikipedia.org"]


def test_tier_two_agent_is_confined(agents_host: Container) -> None:
    scout = report(agents_host, "scout")
    assert scout["user"] == "keel-agent-scout"
    assert scout["environment"] == {"AGENT_ROLE": "web scout"}
    checks = scout["checks"]
    assert checks["write:/srv/keel-scout"] == "ok"  # its declared path
    assert checks["write:/srv/keel-open"] == "EROFS"  # mode 1777, but the system is read-only
    assert checks["write:/srv/keel-notes"] in ("EROFS", "EACCES")  # another agent's path
    assert checks["read:/home/keel-demo/secret.txt"] in ("EACCES", "ENOENT")  # ProtectHome
    assert checks["read:/var/lib/keel-agents/notes/report.json"] == "EACCES"
    assert checks["read:/srv/keel-notes/notes.txt"] == "EACCES"
    assert checks["read:/etc/keel/agents/notes.json"] == "EACCES"  # keel's own files
    assert checks["socket:inet"] == "ok"
    assert checks["socket:raw"] in ("EPERM", "EAFNOSUPPORT")
    assert checks["socket:packet"] == "EAFNOSUPPORT"
    assert checks["socket:netlink"] == "EAFNOSUPPORT"
    assert scout["status"]["NoNewPrivs"] == "1"
    assert scout["status"]["Seccomp"] == "2"
    assert int(scout["status"]["CapEff"], 16) == 0
    assert int(scout["status"]["CapBnd"], 16) == 0


def test_tier_one_agent_is_confined_to_its_paths(agents_host: Container) -> None:
    notes = report(agents_host, "notes")
    assert notes["user"] == "keel-agent-notes"
    checks = notes["checks"]
    assert checks["write:/srv/keel-notes"] == "ok"
    assert checks["write:/srv/keel-open"] == "EROFS"
    assert checks["read:/home/keel-demo/secret.txt"] in ("EACCES", "ENOENT")
    assert checks["read:/var/lib/keel-agents/scout/report.json"] == "EACCES"
    assert checks["read:/etc/keel/agents/scout.json"] == "ok"  # tier 2 only hides keel's files
    assert checks["socket:raw"] == "EPERM"  # no capabilities
    assert checks["socket:netlink"] == "ok"  # address families are tier 2's restriction
    assert notes["status"]["NoNewPrivs"] == "1"
    assert int(notes["status"]["CapBnd"], 16) == 0


def test_tier_zero_agent_can_do_what_tier_two_cannot(agents_host: Container) -> None:
    ops = report(agents_host, "ops")
    assert ops["user"] == "root"
    assert set(ops["checks"].values()) == {"ok"}, ops["checks"]
    assert ops["status"]["NoNewPrivs"] == "0"
    assert int(ops["status"]["CapEff"], 16) != 0


def test_sandbox_directives_are_in_effect(agents_host: Container) -> None:
    scout = agents_host.unit_properties(
        "keel-agent-scout.service",
        "User", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
        "NoNewPrivileges", "RestrictAddressFamilies", "CapabilityBoundingSet",
        "MemoryMax", "TasksMax", "CPUQuotaPerSecUSec", "WatchdogUSec", "Restart",
        "ReadWritePaths", "StateDirectory",
    )  # fmt: skip
    assert scout == {
        "User": "keel-agent-scout",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",  # systemd sorts them
        "CapabilityBoundingSet": "",
        "MemoryMax": str(256 * 1024 * 1024),
        "TasksMax": "64",
        "CPUQuotaPerSecUSec": "500ms",
        "WatchdogUSec": "10s",
        "Restart": "always",
        "ReadWritePaths": "/srv/keel-scout",
        "StateDirectory": "keel-agents/scout",
    }
    ops = agents_host.unit_properties("keel-agent-ops.service", "ProtectSystem", "User", "Restart")
    assert ops == {"ProtectSystem": "no", "User": "root", "Restart": "always"}


@pytest.mark.parametrize("agent", AGENTS)
def test_killed_agent_comes_back(agents_host: Container, agent: str) -> None:
    unit = f"keel-agent-{agent}.service"
    before = main_pid(agents_host, agent)
    restarts = int(agents_host.unit_properties(unit, "NRestarts")["NRestarts"])
    agents_host.run("kill", "-KILL", str(before))
    agents_host.wait_until(
        lambda: (
            main_pid(agents_host, agent) not in (0, before)
            and agents_host.unit_properties(unit, "ActiveState")["ActiveState"] == "active"
        ),
        timeout=30,
        what=f"{unit} restarted",
    )
    assert int(agents_host.unit_properties(unit, "NRestarts")["NRestarts"]) == restarts + 1
    # The new process is a working agent again.
    fresh = wait_for_fresh_report(agents_host, agent)
    assert fresh["pid"] == main_pid(agents_host, agent)


def test_install_reports_a_bad_spec_and_changes_nothing(agents_host: Container) -> None:
    agents_host.write_file(
        "/root/bad.json", json.dumps({"name": "bad", "command": ["x"], "tier": 1})
    )
    result = agents_host.run("keel", "agents", "install", "/root/bad.json", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        'keel: error: /root/bad.json: command[0]: "x": the program must be an absolute path '
        "(systemd does not search PATH the way a shell does)"
    )
    assert (
        agents_host.run(
            "test", "-e", "/etc/systemd/system/keel-agent-bad.service", check=False
        ).returncode
        == 1
    )
    assert agents_host.run("getent", "passwd", "keel-agent-bad", check=False).returncode == 2


def test_install_without_root_says_so(agents_host: Container) -> None:
    result = agents_host.run(
        "/opt/keel/bin/keel", "agents", "install", "/root/specs/ops.json",
        user="nobody", check=False,
    )  # fmt: skip
    # nobody cannot even read root's specs: the error names the file.
    assert result.returncode == 2
    assert "/root/specs/ops.json: agent spec file is not readable" in result.stderr
    agents_host.run("cp", "/root/specs/ops.json", "/tmp/ops.json")
    agents_host.run("chmod", "0644", "/tmp/ops.json")
    result = agents_host.run(
        "/opt/keel/bin/keel", "agents", "install", "/tmp/ops.json", user="nobody", check=False
    )
    assert result.returncode == 1
    assert "keel agents install must run as root" in result.stderr


def test_install_names_an_agent_that_does_not_start(agents_host: Container) -> None:
    spec = {"name": "broken", "command": ["/usr/bin/no-such-program"], "tier": 1}
    agents_host.write_file("/root/broken.json", json.dumps(spec))
    try:
        result = agents_host.run("keel", "agents", "install", "/root/broken.json", check=False)
        assert result.returncode == 1
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith("keel: error: keel-agent-broken.service did not start (")
        assert error.endswith("see `journalctl -u keel-agent-broken.service`")
    finally:
        agents_host.sh(
            "systemctl disable --now keel-agent-broken.service; "
            "rm -f /etc/systemd/system/keel-agent-broken.service /etc/keel/agents/broken.json; "
            "systemctl daemon-reload; systemctl reset-failed"
        )


def test_declared_capability_is_all_a_tier_one_agent_gets(agents_host: Container) -> None:
    """``capabilities`` gives a tier-1 agent exactly what it declares (here CAP_NET_RAW)."""
    spec = {
        "name": "pinger",
        "command": [
            "/usr/bin/python3", "/opt/keel-examples/agents/agent.py", "--name", "pinger",
            "--port", "8709",
        ],
        "tier": 1,
        "capabilities": ["CAP_NET_RAW"],
    }  # fmt: skip
    agents_host.write_file("/root/pinger.json", json.dumps(spec))
    unit = "keel-agent-pinger.service"
    try:
        agents_host.sh("keel agents install /root/pinger.json")
        pinger = wait_for_fresh_report(agents_host, "pinger")
        assert pinger["checks"]["socket:raw"] == "ok"  # refused to notes, which declares none
        cap_net_raw = 1 << 13  # capabilities(7)
        for field in ("CapBnd", "CapAmb", "CapEff"):
            assert int(pinger["status"][field], 16) == cap_net_raw, field
        props = agents_host.unit_properties(unit, "CapabilityBoundingSet", "AmbientCapabilities")
        assert props == {
            "CapabilityBoundingSet": "cap_net_raw",
            "AmbientCapabilities": "cap_net_raw",
        }
    finally:
        agents_host.sh(
            f"systemctl disable --now {unit}; rm -f /etc/systemd/system/{unit} "
            "/etc/keel/agents/pinger.json; systemctl daemon-reload"
        )
