"""keel mcp under real systemd: servers as socket-activated units at their tier, agents as users.

``keel mcp add`` installs a toolbox server (``tests/mcp_server.py`` on the
SDK) at tier 2 and the gateway; two agents are installed with ``keel agents
install``; the test agent (``tests/mcp_agent.py``) runs as each agent's user.
The server's stdin and stdout are the connection systemd hands it
(``keel-mcp-toolbox.socket``), and when it crashes systemd restarts it and the
gateway reconnects by itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.nspawn import Container, Image

TESTS = Path(__file__).resolve().parents[1]
PY = "/opt/keel/bin/python"
AGENT = "/opt/keel-mcp-test/mcp_agent.py"

SERVER_SPEC = {
    "name": "toolbox",
    "command": [PY, "/opt/keel-mcp-test/mcp_server.py"],
    "tier": 2,
    "resources": {"memoryMax": "256M", "tasksMax": 32},
    "share": [
        {"agents": ["scout"], "tools": ["echo", "add", "pid", "crash"]},
        {"agents": "*", "tools": ["echo"]},
    ],
}


def agent_spec(name: str, tier: int) -> dict[str, Any]:
    return {"name": name, "command": ["/usr/bin/sleep", "infinity"], "tier": tier}


def calls(box: Container, user: str, *ops: str) -> list[dict[str, Any]]:
    out = box.run(PY, AGENT, "/run/keel-mcp/mcp.sock", *ops, user=user, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def main_pid(box: Container) -> int:
    return int(box.unit_properties("keel-mcp-toolbox.service", "MainPID")["MainPID"])


@pytest.fixture(scope="module")
def mcp_host(image: Image) -> Iterator[Container]:
    box = Container("mcp", image)
    try:
        box.start()
        box.sh("mkdir -p /opt/keel-mcp-test /root/specs")
        for name in ("mcp_server.py", "mcp_agent.py"):
            box.write_file(f"/opt/keel-mcp-test/{name}", (TESTS / name).read_text(), mode=0o644)
        box.write_file("/root/specs/scout.json", json.dumps(agent_spec("scout", 2)))
        box.write_file("/root/specs/notes.json", json.dumps(agent_spec("notes", 1)))
        box.write_file("/root/toolbox.json", json.dumps(SERVER_SPEC))
        box.sh("keel agents install /root/specs/*.json")
        out = box.run("keel", "mcp", "add", "/root/toolbox.json", timeout=120).stdout
        assert "keel: MCP servers installed: toolbox" in out
        box.wait_until(
            lambda: (
                box.run("keel", "mcp", "list", "--json", check=False).returncode == 0
                and json.loads(box.run("keel", "mcp", "list", "--json").stdout)["servers"][
                    "toolbox"
                ]["state"]
                == "ready"
            ),
            timeout=90,
            what="the gateway serving a ready toolbox",
        )
        yield box
    finally:
        box.stop()


def test_agents_see_and_call_only_their_tools(mcp_host: Container) -> None:
    scout = calls(mcp_host, "keel-agent-scout", "list", 'call:toolbox.add:{"a": 2, "b": 3}')
    assert scout[0]["tools"] == ["toolbox.echo", "toolbox.add", "toolbox.pid", "toolbox.crash"]
    assert scout[1]["result"]["content"][0]["text"] == "5"
    notes = calls(mcp_host, "keel-agent-notes", "list", 'call:toolbox.add:{"a": 1, "b": 1}')
    assert notes[0]["tools"] == ["toolbox.echo"]
    assert notes[1]["error"]["code"] == -32050
    nobody = calls(mcp_host, "nobody", "list")
    assert nobody[0]["tools"] == []


def test_the_server_runs_once_in_its_tier_sandbox(mcp_host: Container) -> None:
    props = mcp_host.unit_properties(
        "keel-mcp-toolbox.service",
        "User",
        "ProtectSystem",
        "PrivateDevices",
        "MemoryMax",
        "TasksMax",
    )
    assert props["User"] == "keel-mcp-toolbox"
    assert props["ProtectSystem"] == "strict"
    assert props["PrivateDevices"] == "yes"
    assert props["MemoryMax"] == str(256 * 1024 * 1024)
    assert props["TasksMax"] == "32"
    pids = {
        calls(mcp_host, user, "call:toolbox.pid:{}")[0]
        .get("result", {})
        .get("content", [{}])[0]
        .get("text")
        for user in ("keel-agent-scout",) * 3
    }
    assert pids == {str(main_pid(mcp_host))}
    status = mcp_host.read_file(f"/proc/{main_pid(mcp_host)}/status")
    uid = mcp_host.run("id", "-u", "keel-mcp-toolbox").stdout.strip()
    assert f"Uid:\t{uid}\t" in status
    # One process: `keel mcp exec` became the server (no relay, no second copy).
    cmdline = mcp_host.read_file(f"/proc/{main_pid(mcp_host)}/cmdline").split("\0")
    assert cmdline[:2] == [PY, "/opt/keel-mcp-test/mcp_server.py"]
    owned = mcp_host.sh(
        "for p in /proc/[0-9]*; do stat -c %U $p 2>/dev/null; done | grep -cx keel-mcp-toolbox"
    ).stdout
    assert owned.strip() == "1"
    socket = mcp_host.unit_properties("keel-mcp-toolbox.socket", "ActiveState", "Listen")
    assert socket["ActiveState"] == "active"
    assert "/run/keel/mcp/toolbox.sock" in socket["Listen"]


def test_a_crash_mid_call_is_an_error_and_the_next_call_works(mcp_host: Container) -> None:
    before = main_pid(mcp_host)
    restarts = int(mcp_host.unit_properties("keel-mcp-toolbox.service", "NRestarts")["NRestarts"])
    crashed = calls(mcp_host, "keel-agent-scout", "call:toolbox.crash:{}")
    assert crashed[0]["error"]["code"] == -32051
    mcp_host.wait_until(
        lambda: main_pid(mcp_host) not in (0, before),
        timeout=60,
        what="toolbox restarted by systemd",
    )
    after = int(mcp_host.unit_properties("keel-mcp-toolbox.service", "NRestarts")["NRestarts"])
    assert after > restarts

    def works() -> bool:
        answer = calls(mcp_host, "keel-agent-scout", "call:toolbox.pid:{}")[0]
        return "result" in answer and answer["result"]["content"][0]["text"] == str(
            main_pid(mcp_host)
        )

    mcp_host.wait_until(works, timeout=60, what="calls working again")
    entries = mcp_host.run("keel", "ledger", "tail", "-n", "50", "--json").stdout
    assert '"mcp_call"' in entries
    assert '"unavailable"' in entries
