"""The conformance suite (``conformance/``), run as an operator runs it: pytest
with testinfra over ssh (``--hosts=ssh://root@ADDRESS``) from another host of
the test's network into a container with keel and the example agents.

It must pass on a correct host and fail, naming the problem, on a broken one.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.netns import Host, Network
from tests.harness.nspawn import Container, Image

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "agents"

# A real keel control socket (keel.api), as a daemon would serve it.
SOCKET_SERVER = """
import asyncio, pathlib
from keel.api import ControlServer

async def status(args, peer):
    return {"ok": True}

async def main():
    async with ControlServer(pathlib.Path("/run/keel/probe.sock"), {"status": status}):
        await asyncio.Event().wait()

asyncio.run(main())
"""


LEDGER = "/var/lib/keel/ledger.db"
# conformance/test_egress.py: skipped where egress is not configured.
EGRESS_CHECKS = {
    "test_egress_table_present",
    "test_egress_daemon_holds_cap_net_admin_only",
    "test_every_governed_agent_has_its_rules",
    "test_each_proxy_listens",
    "test_sandboxed_agents_are_governed",
    "test_sandboxed_mcp_servers_are_governed",
}


@dataclass
class Site:
    operator: Host
    box: Container
    address: str
    ssh_config: Path
    workdir: Path


@pytest.fixture(scope="module")
def site(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("conformance")
    network = Network(workdir)
    box: Container | None = None
    try:
        operator, keel_host = network.host("op"), network.host("keelhost")
        network.connect(operator, keel_host)
        box = Container("keelhost", image, host=keel_host)
        box.start()
        key = workdir / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        box.write_file(
            "/root/.ssh/authorized_keys", key.with_suffix(".pub").read_text(), mode=0o600
        )
        box.run("chmod", "0700", "/root/.ssh")
        ssh_config = workdir / "ssh_config"
        ssh_config.write_text(
            "Host *\n"
            f"  IdentityFile {key}\n  IdentitiesOnly yes\n  BatchMode yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
            f"  ControlPath {workdir}/cm-%C\n"
        )
        # keel's layout on an installed host: agents, the keel group, /run/keel.
        box.copy_in(EXAMPLES, "/opt/keel-examples/agents")
        box.sh("install -d -m 1777 /srv/keel-open && install -d -m 0755 /home/keel-demo")
        box.sh("keel agents install /opt/keel-examples/agents/*.json")
        box.sh("groupadd --system keel && install -d -m 2770 -g keel /run/keel")
        box.run(
            "systemd-run", "--unit=keel-socket-probe", "--property=Group=keel",
            "/opt/keel/bin/python", "-c", SOCKET_SERVER,
        )  # fmt: skip
        box.wait_until(
            lambda: box.run("test", "-S", "/run/keel/probe.sock", check=False).returncode == 0,
            what="the probe socket",
        )
        for agent in ("ops", "notes", "scout"):
            box.run(
                "keel", "ledger", "append", "--db", LEDGER, "--source", "watch",
                "--kind", "started", "--subject", agent,
            )  # fmt: skip
        yield Site(operator, box, keel_host.address, ssh_config, workdir)
    finally:
        if box is not None:
            box.stop()
        network.close()


def conformance(site: Site, name: str) -> dict[str, tuple[str, str]]:
    """Run the suite against the site; test name -> (outcome, message)."""
    report = site.workdir / f"{name}.xml"
    result = site.operator.run(
        sys.executable, "-m", "pytest", str(REPO / "conformance"), "-q",
        f"--hosts=ssh://root@{site.address}", f"--ssh-config={site.ssh_config}",
        f"--junitxml={report}",
        check=False, timeout=300,
    )  # fmt: skip
    assert report.exists(), (
        f"the conformance run produced no report:\n{result.stdout}{result.stderr}"
    )
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test = case.get("name", "").split("[")[0]
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error"}.get(child.tag, child.tag)
                message = child.get("message", "") + (child.text or "")
        outcomes[test] = (outcome, message)
    return outcomes


def test_conformance_passes_on_a_keel_host(site: Site) -> None:
    outcomes = conformance(site, "good")
    passed = {name for name, (outcome, _) in outcomes.items() if outcome == "passed"}
    assert {
        "test_agent_units_are_enabled_and_active",
        "test_agent_users_exist_without_login",
        "test_sandbox_directives_are_in_effect",
        "test_running_agents_show_their_sandbox",
        "test_agent_state_directories_are_private",
        "test_no_keel_unit_has_failed",
        "test_enabled_keel_services_are_active",
        "test_runtime_directory_is_closed",
        "test_each_enabled_daemon_has_its_socket",
        "test_sockets_are_closed_to_others",
    } <= passed, outcomes
    assert "test_ledger_verifies" in passed
    not_passed = {name: o for name, o in outcomes.items() if name not in passed}
    # Nothing fails; only what this host lacks (egress) is skipped, and says why.
    assert set(not_passed) == EGRESS_CHECKS, not_passed
    for outcome, message in not_passed.values():
        assert outcome == "skipped", not_passed
        assert "egress is not configured here" in message


def test_conformance_catches_a_weakened_sandbox_and_an_open_socket(site: Site) -> None:
    box = site.box
    box.write_file(
        "/etc/systemd/system/keel-agent-scout.service.d/weaken.conf",
        "[Service]\nProtectSystem=full\nRestrictAddressFamilies=\n",
    )
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", "keel-agent-scout.service")
    box.run("chmod", "0666", "/run/keel/probe.sock")
    box.run("cp", LEDGER, "/root/ledger.db.good")
    box.run(
        "sqlite3", LEDGER,
        "UPDATE leaves SET entry = CAST(replace(CAST(entry AS TEXT), 'notes', 'n0tes') AS BLOB) "
        "WHERE idx = 1",
    )  # fmt: skip
    try:
        outcomes = conformance(site, "broken")
    finally:
        box.run("cp", "/root/ledger.db.good", LEDGER)
        box.run("rm", "-r", "/etc/systemd/system/keel-agent-scout.service.d")
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "keel-agent-scout.service")
        box.run("chmod", "0660", "/run/keel/probe.sock")
    outcome, message = outcomes["test_sandbox_directives_are_in_effect"]
    assert outcome == "failed"
    assert "keel-agent-scout.service: ProtectSystem: expected 'strict', got 'full'" in message
    assert "keel-agent-scout.service: RestrictAddressFamilies: missing" in message
    outcome, message = outcomes["test_sockets_are_closed_to_others"]
    assert outcome == "failed"
    assert "/run/keel/probe.sock: root:keel 0o666" in message
    outcome, message = outcomes["test_ledger_verifies"]
    assert outcome == "failed"
    assert f"`keel ledger verify --db {LEDGER}` failed" in message
    # What was not broken still passes.
    assert outcomes["test_running_agents_show_their_sandbox"][0] == "passed"
    assert outcomes["test_agent_units_are_enabled_and_active"][0] == "passed"


def test_conformance_catches_a_stopped_agent(site: Site) -> None:
    box = site.box
    box.run("systemctl", "stop", "keel-agent-notes.service")
    try:
        outcomes = conformance(site, "stopped")
    finally:
        box.run("systemctl", "start", "keel-agent-notes.service")
    outcome, message = outcomes["test_agent_units_are_enabled_and_active"]
    assert outcome == "failed"
    assert "keel-agent-notes.service" in message
    assert outcomes["test_enabled_keel_services_are_active"][0] == "failed"
    assert (
        "keel-agent-notes.service: not running"
        in outcomes["test_running_agents_show_their_sandbox"][1]
    )
