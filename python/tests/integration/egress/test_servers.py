"""MCP servers keel runs are governed like agents: their own uid, allowlist, proxy port, chain."""

from __future__ import annotations

from .test_enforce import assert_blocked
from .world import AGENT_UID, SECOND_AGENT_UID, World


def test_an_mcp_server_reaches_its_allowlist_and_nothing_else(world: World) -> None:
    world.start_internet()
    world.configure(
        {"scout": {"uid": AGENT_UID, "port": 5301, "allow": ["www.allowed.test"]}},
        servers={"fetch": {"uid": SECOND_AGENT_UID, "port": 5302, "allow": ["*.wild.test"]}},
    )
    world.start_daemon()
    server = world.agent(SECOND_AGENT_UID)
    # Its DNS goes to its own proxy, which answers from its own allowlist...
    assert server.resolve("a.wild.test", server=world.dns_v4)["addresses"] == ["192.0.2.16"]
    assert server.resolve("www.allowed.test", server=world.dns_v4)["rcode"] == "NXDOMAIN"
    assert server.connect("192.0.2.16", 80)["ok"] is True
    assert_blocked(server, "192.0.2.14", 80)
    assert_blocked(server, "2001:db8::14", 853)
    # ... into its own sets: what it resolved opens nothing for the agent.
    assert set(world.elements("mcp.fetch_v4")) == {"192.0.2.16"}
    assert world.elements("scout_v4") == {}
    agent = world.agent()
    assert_blocked(agent, "192.0.2.16", 80)
    status = world.status()["agents"]["mcp.fetch"]
    assert (status["mode"], status["port"], status["uid"]) == ("enforce", 5302, SECOND_AGENT_UID)
    assert status["dns"]["denied"] == 1
    check = world.keel(
        "egress", "check", "mcp.fetch", "x.wild.test", "--config", str(world.config_path)
    )
    assert (check.returncode, check.stdout.strip()) == (0, "allow")
    rules = world.host.run("nft", "list", "chain", "inet", "keel", "agent_mcp.fetch").stdout
    assert "@mcp.fetch_v4" in rules
    assert "drop" in rules
