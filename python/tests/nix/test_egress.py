"""modules/egress.nix: /etc/keel/egress.json from services.keel.agents, the unit, the assertions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from keel.egress.config import load

from tests.nix.test_modules import evaluate

AGENTS = """
  services.keel.agents = {
    scout = { command = [ "/bin/scout" ]; tier = 2; egress.allow = [ "example.org" "*.wikipedia.org" ]; };
    jail = { command = [ "/bin/jail" ]; tier = 2; };
    notes = { command = [ "/bin/notes" ]; tier = 1; egress.allow = [ "api.example.com" ]; };
    open = { command = [ "/bin/open" ]; tier = 1; };
    ops = { command = [ "/bin/ops" ]; tier = 0; user = "root"; };
    off = { command = [ "/bin/off" ]; tier = 2; enable = false; };
  };
"""
EGRESS = (
    'services.keel.egress = { enable = true; upstream = [ "192.0.2.53" "[2001:db8::53]:53" ]; };'
)


def egress(nix_instantiate: str, nixpkgs_tree: Path, body: str = "") -> dict[str, Any]:
    return evaluate(nix_instantiate, nixpkgs_tree, "{ " + AGENTS + EGRESS + body + " }")


def egress_json(result: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = result["etc"]["keel/egress.json"]["json"]
    return config


def test_the_agents_come_from_services_keel_agents(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    result = egress(nix_instantiate, nixpkgs_tree)
    assert result["failedAssertions"] == []
    assert egress_json(result) == {
        "socket": "/run/keel/egress.sock",
        "ledger": "/var/lib/keel/ledger.db",
        "upstream": ["192.0.2.53", "[2001:db8::53]:53"],
        "min_ttl": 30,
        "grace": 30,
        "on_stop": "keep",
        "log_group": 17,
        "agents": {
            # Tier 2 always (no allowlist: no egress at all), tier 1 with an
            # allowlist; never tier 0, a tier 1 without one, a disabled agent.
            "jail": {"user": "keel-agent-jail", "port": 5301, "mode": "enforce", "allow": []},
            "notes": {
                "user": "keel-agent-notes",
                "port": 5302,
                "mode": "enforce",
                "allow": ["api.example.com"],
            },
            "scout": {
                "user": "keel-agent-scout",
                "port": 5303,
                "mode": "enforce",
                "allow": ["example.org", "*.wikipedia.org"],
            },
        },
    }
    assert "egress" in result["enabledServices"]


def test_keel_reads_the_file_the_module_writes(
    nix_instantiate: str, nixpkgs_tree: Path, tmp_path: Path
) -> None:
    result = egress(
        nix_instantiate,
        nixpkgs_tree,
        'services.keel.egress = { min_ttl = 5; grace = 1; onStop = "remove"; audit = [ "notes" ]; };',
    )
    path = tmp_path / "egress.json"
    path.write_text(json.dumps(egress_json(result)))
    config = load(path)
    assert (config.min_ttl, config.grace, config.on_stop) == (5, 1, "remove")
    assert config.agents["notes"].mode == "audit"
    assert config.agents["scout"].user == "keel-agent-scout"
    assert config.agents["scout"].allow.allows_text("en.wikipedia.org")


def test_the_daemon_is_a_hardened_notify_service_with_cap_net_admin_only(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    unit = egress(nix_instantiate, nixpkgs_tree)["services"]["keel-egress"]
    service = unit["serviceConfig"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "always"
    command = service["ExecStart"].split()
    assert command[1:4] == ["egress", "serve", "--config"]
    assert command[4].endswith("-egress.json")
    assert service["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert service["AmbientCapabilities"] == "CAP_NET_ADMIN"
    assert service["RestrictAddressFamilies"] == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert service["NoNewPrivileges"] is True
    assert service["ProtectSystem"] == "strict"
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert service["ReadWritePaths"] == ["/var/lib/keel", "/run/keel"]
    assert service["Group"] == "keel"
    assert unit["stopIfChanged"] is False
    assert any(path.endswith("-nftables") for path in unit["path"])
    assert sorted(unit["before"]) == [
        "keel-agent-jail.service",
        "keel-agent-notes.service",
        "keel-agent-scout.service",
    ]


def test_governed_agents_start_only_once_their_rules_are_in(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    services = egress(nix_instantiate, nixpkgs_tree)["services"]
    scout = services["keel-agent-scout"]
    assert "keel-egress.service" in scout["after"]
    assert "keel-egress.service" in scout["wants"]
    [check] = scout["serviceConfig"]["ExecStartPre"]
    assert check.startswith("+/nix/store/")
    assert check.endswith("-nftables/bin/nft list chain inet keel agent_scout")
    assert "ExecStartPre" not in services["keel-agent-open"]["serviceConfig"]
    assert "ExecStartPre" not in services["keel-agent-ops"]["serviceConfig"]


def test_audit_of_a_tier_2_agent_warns(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = egress(nix_instantiate, nixpkgs_tree, 'services.keel.egress.audit = [ "scout" ];')
    assert result["failedAssertions"] == []
    assert egress_json(result)["agents"]["scout"]["mode"] == "audit"
    assert any("scout is a tier 2 agent" in w for w in result["warnings"])


BAD = [
    pytest.param(
        '{ services.keel.agents.x = { command = [ "/bin/x" ]; tier = 2; }; }',
        "services.keel.agents.x: tier 2 agents reach only their egress.allow, which keel egress "
        "enforces: set services.keel.egress.enable = true",
        id="tier-2-without-egress",
    ),
    pytest.param(
        '{ services.keel.agents.x = { command = [ "/bin/x" ]; tier = 1; egress.allow = [ "a.test" ]; }; }',
        "services.keel.agents.x.egress.allow: an allowlist is enforced by keel egress",
        id="tier-1-allowlist-without-egress",
    ),
    pytest.param(
        '{ services.keel.agents.x = { command = [ "/bin/x" ]; tier = 0; user = "root"; '
        'egress.allow = [ "a.test" ]; }; ' + EGRESS + " }",
        "services.keel.agents.x.egress.allow: tier 0 agents have an open network",
        id="tier-0-allowlist",
    ),
    pytest.param(
        "{ services.keel.egress.enable = true; }",
        "services.keel.egress.upstream: name the resolvers",
        id="no-upstream",
    ),
    pytest.param(
        '{ services.keel.egress = { enable = true; upstream = [ "dns.google" ]; }; }',
        "services.keel.egress.upstream: dns.google: expected IP",
        id="upstream-name",
    ),
    pytest.param(
        "{ " + AGENTS + EGRESS + ' services.keel.egress.audit = [ "open" ]; }',
        "services.keel.egress.audit: open: not an agent egress governs",
        id="audit-unknown",
    ),
    pytest.param(
        "{ " + AGENTS + EGRESS + " services.keel.egress.basePort = 65534; }",
        "services.keel.egress.basePort: 65534 leaves no room for 3 agent ports",
        id="ports-overflow",
    ),
]


SERVERS = """
  services.keel.mcp = {
    enable = true;
    servers = {
      files = { command = [ "/bin/files" ]; tier = 2; };
      fetch = { command = [ "/bin/fetch" ]; tier = 1; egress.allow = [ "*.wikipedia.org" ]; };
      time = { command = [ "/bin/time" ]; tier = 1; };
      shell = { command = [ "/bin/shell" ]; tier = 0; };
      remote = { url = "https://mcp.example.com/mcp"; };
      off = { command = [ "/bin/off" ]; tier = 2; enable = false; };
    };
  };
"""


BAD += [
    pytest.param(
        '{ services.keel.mcp = { enable = true; servers.x = { command = [ "/bin/x" ]; tier = 2; }; }; }',
        "services.keel.mcp.servers.x: tier 2 servers reach only their egress.allow, which keel "
        "egress enforces: set services.keel.egress.enable = true",
        id="tier-2-server-without-egress",
    ),
    pytest.param(
        '{ services.keel.mcp = { enable = true; servers.x = { command = [ "/bin/x" ]; tier = 1; '
        'egress.allow = [ "a.test" ]; }; }; }',
        "services.keel.mcp.servers.x.egress.allow: an allowlist is enforced by keel egress",
        id="tier-1-server-allowlist-without-egress",
    ),
    pytest.param(
        '{ services.keel.mcp = { enable = true; servers.x = { command = [ "/bin/x" ]; tier = 0; '
        'egress.allow = [ "a.test" ]; }; }; ' + EGRESS + " }",
        "services.keel.mcp.servers.x.egress.allow: tier 0 servers have an open network",
        id="tier-0-server-allowlist",
    ),
    pytest.param(
        "{ " + AGENTS + EGRESS + SERVERS + ' services.keel.egress.audit = [ "mcp.time" ]; }',
        "services.keel.egress.audit: mcp.time: not an agent egress governs",
        id="audit-ungoverned-server",
    ),
    pytest.param(
        "{ " + AGENTS + EGRESS + SERVERS + " services.keel.egress.basePort = 65532; }",
        "leaves no room for 3 agent ports and 2 MCP server ports",
        id="server-ports-overflow",
    ),
]


@pytest.mark.parametrize(("config", "message"), BAD)
def test_bad_combinations_say_the_fix(
    nix_instantiate: str, nixpkgs_tree: Path, config: str, message: str
) -> None:
    failed = evaluate(nix_instantiate, nixpkgs_tree, config)["failedAssertions"]
    assert any(message in text for text in failed), failed


def test_nothing_without_enable(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = evaluate(
        nix_instantiate, nixpkgs_tree, '{ services.keel.egress.upstream = [ "192.0.2.53" ]; }'
    )
    assert result["failedAssertions"] == []
    assert "keel/egress.json" not in result["etc"]
    assert "keel-egress" not in result["services"]


def test_mcp_servers_are_governed_as_agents_are(
    nix_instantiate: str, nixpkgs_tree: Path, tmp_path: Path
) -> None:
    result = egress(
        nix_instantiate, nixpkgs_tree, SERVERS + 'services.keel.egress.audit = [ "mcp.fetch" ];'
    )
    assert result["failedAssertions"] == []
    written = egress_json(result)
    # Tier 2 always, tier 1 with an allowlist, as agents; their ports after the agents'.
    assert written["servers"] == {
        "fetch": {
            "user": "keel-mcp-fetch",
            "port": 5304,
            "mode": "audit",
            "allow": ["*.wikipedia.org"],
        },
        "files": {"user": "keel-mcp-files", "port": 5305, "mode": "enforce", "allow": []},
    }
    path = tmp_path / "egress.json"
    path.write_text(json.dumps(written))
    config = load(path)
    assert sorted(config.agents) == ["jail", "mcp.fetch", "mcp.files", "notes", "scout"]
    assert config.agents["mcp.fetch"].allow.allows_text("en.wikipedia.org")
    services = result["services"]
    files = services["keel-mcp-files"]
    assert "keel-egress.service" in files["after"]
    assert "keel-egress.service" in files["wants"]
    [check] = files["serviceConfig"]["ExecStartPre"]
    assert check.endswith("-nftables/bin/nft list chain inet keel agent_mcp.files")
    assert "-/run/nscd" in services["keel-mcp-fetch"]["serviceConfig"]["InaccessiblePaths"]
    for ungoverned in ("keel-mcp-time", "keel-mcp-shell"):
        assert "ExecStartPre" not in services[ungoverned]["serviceConfig"]
    assert {"keel-mcp-files.service", "keel-mcp-fetch.service"} <= set(
        services["keel-egress"]["before"]
    )
    assert not any("mcp.fetch" in w for w in result["warnings"])  # tier 1: no warning
    audited = egress(
        nix_instantiate, nixpkgs_tree, SERVERS + 'services.keel.egress.audit = [ "mcp.files" ];'
    )
    assert egress_json(audited)["servers"]["files"]["mode"] == "audit"
    assert any("mcp.files is a tier 2" in w for w in audited["warnings"])
