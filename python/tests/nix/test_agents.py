"""modules/agents.nix against the Python side: same spec, same unit, same checks.

The module writes /etc/keel/agents/<name>.json and the keel-agent-<name>
unit; keel.agents reads that spec and renders a unit from tiers.json. Here
the two meet: the spec the module writes is one keel.agents accepts and gives
back unchanged, and the unit's directives are the ones keel renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from keel.agents.spec import check_domain, parse_spec
from keel.agents.units import load_tiers, service_directives

from tests.conftest import REPO
from tests.nix.test_modules import evaluate

TIERS_JSON = REPO / "modules" / "tiers.json"

# Three agents shaped like examples/agents/{scout,notes,ops}.json, one per
# tier, with argv words and values that need systemd quoting.
# Tier 2 agents (and allowlists) need keel egress (modules/egress.nix).
EGRESS = 'services.keel.egress = { enable = true; upstream = [ "192.0.2.53" ]; };'

HOST = r"""
{
  services.keel.egress = { enable = true; upstream = [ "192.0.2.53" ]; };
  services.keel.agents = {
    scout = {
      command = [ "/run/current-system/sw/bin/python3" "/srv/agent.py" "--name" "scout"
                  "--greeting" "hello world" "--rate" "100%" "--home" "$HOME"
                  "--quote" "say \"hi\"" "--back" "a\\b" ];
      tier = 2;
      capabilities = [ "CAP_NET_BIND_SERVICE" ];
      readWritePaths = [ "/srv/keel-scout" ];
      environment = { AGENT_ROLE = "web scout"; AGENT_MOTTO = "50% \"curious\""; };
      egress.allow = [ "example.org" "*.wikipedia.org" ];
      health.probes = [
        { type = "http"; url = "http://127.0.0.1:8702/health"; expect_status = 200;
          interval = 2; timeout = 1; failures = 3; grace = 5; }
      ];
      health.watchdogSec = 10;
      resources = { memoryMax = "256M"; cpuQuota = "50%"; tasksMax = 64; };
    };
    notes = {
      command = [ "/run/current-system/sw/bin/python3" "/srv/agent.py" "--name" "notes" ];
      tier = 1;
      capabilities = [ "CAP_NET_RAW" "CAP_NET_BIND_SERVICE" "CAP_NET_RAW" ];
      workingDirectory = "/srv/keel-notes";
      readWritePaths = [ "/srv/keel-notes" ];
      environmentFiles = [ "/run/secrets/notes.env" ];
      health.probes = [
        { type = "tcp"; port = 8701; name = "port"; }
        { type = "exec"; command = [ "/run/current-system/sw/bin/true" ]; interval = 10; timeout = 2.5; }
        { type = "http"; url = "http://127.0.0.1:8701/health"; interval = 1;
          expect_status = [ 200 204 ]; expect_body = "ok"; grace = 3; }
      ];
    };
    ops = {
      command = [ "/run/current-system/sw/bin/python3" "/srv/agent.py" "--name" "ops" ];
      tier = 0;
      user = "root";
      capabilities = [ "CAP_NET_BIND_SERVICE" ];
    };
  };
}
"""


@pytest.fixture(scope="module")
def host(nix_instantiate: str, nixpkgs_lib: Path) -> dict[str, Any]:
    result = evaluate(nix_instantiate, nixpkgs_lib, HOST)
    assert result["failedAssertions"] == []
    return result


def rendered(value: Any) -> list[str]:
    """A directive's value as the lines of a unit file (NixOS and keel agree on these)."""
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, list):
        return [str(item) for item in value]
    return [str(value)]


def test_each_agent_gets_a_spec_a_unit_and_a_user(host: dict[str, Any]) -> None:
    agent_files = {name for name in host["etc"] if name.startswith("keel/agents/")}
    assert agent_files == {f"keel/agents/{n}.json" for n in ("scout", "notes", "ops")}
    agent_units = {name for name in host["services"] if name.startswith("keel-agent-")}
    assert agent_units == {f"keel-agent-{n}" for n in ("scout", "notes", "ops")}
    # Their own user and group for the sandboxed tiers; root stays root.
    assert host["users"] == {
        user: {
            "isSystemUser": True,
            "isNormalUser": False,
            "group": user,
            "home": "/var/empty",
            "createHome": False,
            "extraGroups": [],
        }
        for user in ("keel-agent-scout", "keel-agent-notes")
    }
    assert {"keel-agent-scout", "keel-agent-notes"} <= set(host["groups"])
    for unit in host["services"].values():
        assert unit["wantedBy"] == ["multi-user.target"]
        assert unit["serviceConfig"]["Restart"] == "always"


@pytest.mark.parametrize("name", ["scout", "notes", "ops"])
def test_keel_reads_the_spec_back_unchanged(host: dict[str, Any], name: str) -> None:
    written = host["etc"][f"keel/agents/{name}.json"]["json"]
    spec = parse_spec(written, source=f"/etc/keel/agents/{name}.json")
    assert spec.to_json() == written


@pytest.mark.parametrize("name", ["scout", "notes", "ops"])
def test_the_unit_is_the_one_keel_renders(host: dict[str, Any], name: str) -> None:
    written = host["etc"][f"keel/agents/{name}.json"]["json"]
    spec = parse_spec(written, source=name)
    tiers = load_tiers(TIERS_JSON)
    unit = host["services"][f"keel-agent-{name}"]
    # modules/egress.nix adds its fail-closed check to agents it governs.
    nix = {
        key: rendered(value)
        for key, value in unit["serviceConfig"].items()
        if key != "ExecStartPre"
    }
    python = {key: rendered(value) for key, value in service_directives(spec, tiers).items()}
    assert nix == python
    assert {k: rendered(v) for k, v in unit["unitConfig"].items()} == {
        k: rendered(v) for k, v in tiers.unit_directives(spec.tier).items()
    }
    assert unit["description"] == f"keel agent {name} (tier {spec.tier})"


def test_tier_2_has_the_tier_2_sandbox(host: dict[str, Any]) -> None:
    tiers = json.loads(TIERS_JSON.read_text())
    scout = host["services"]["keel-agent-scout"]["serviceConfig"]
    declared = {"CapabilityBoundingSet", "AmbientCapabilities"}
    for key, value in tiers["tiers"]["2"]["serviceConfig"].items():
        if key not in declared:
            assert scout[key] == value, key
    # The tier's empty capability set gives way to the declared one, no more.
    assert {key: scout[key] for key in declared} == dict.fromkeys(declared, "CAP_NET_BIND_SERVICE")
    ops = host["services"]["keel-agent-ops"]["serviceConfig"]
    assert "ProtectSystem" not in ops
    assert ops["User"] == "root"


def test_keel_validates_every_spec_when_the_system_is_built(host: dict[str, Any]) -> None:
    (check,) = host["checks"]
    assert check["name"] == "keel-agents-valid"
    for name in ("scout", "notes", "ops"):
        assert "keel agents render-unit /nix/store/" in check["script"]
        assert f"-keel-agent-{name}.json > /dev/null" in check["script"]


def agent(**fields: str) -> str:
    base = {
        "command": '[ "/bin/agent" ]',
        "tier": "2",
    }
    base.update(fields)
    body = " ".join(f"{key} = {value};" for key, value in base.items())
    return "{ services.keel.agents.probe = { " + body + " }; " + EGRESS + " }"


BAD = [
    pytest.param(
        agent(capabilities='[ "CAP_SYS_ADMIN" ]'),
        "services.keel.agents.probe.capabilities: tier 2 agents may declare only CAP_NET_BIND_SERVICE",
        id="tier-2-capability",
    ),
    pytest.param(
        agent(tier="0", **{"egress.allow": '[ "example.org" ]'}),
        "services.keel.agents.probe.egress.allow: tier 0 agents have an open network",
        id="tier-0-allowlist",
    ),
    pytest.param(
        agent(user='"root"'),
        "services.keel.agents.probe.user: tier 2 agents run as their own user, not root",
        id="root-at-tier-2",
    ),
    pytest.param(
        agent(command='[ "python3" "agent.py" ]'),
        "services.keel.agents.probe.command: 'python3' must be an absolute path",
        id="relative-command",
    ),
    pytest.param(
        agent(readWritePaths='[ "/var/lib/keel/ledger.db" ]'),
        "services.keel.agents.probe.readWritePaths: tier 2 agents cannot reach keel's own",
        id="tier-2-writes-keel-state",
    ),
    pytest.param(
        agent(readWritePaths='[ "srv/data" ]'),
        "services.keel.agents.probe: srv/data: paths must be absolute",
        id="relative-path",
    ),
    pytest.param(
        agent(**{"health.probes": '[ { type = "http"; } ]'}),
        "services.keel.agents.probe.health.probes.0.url is required for an http probe",
        id="http-probe-without-url",
    ),
    pytest.param(
        agent(**{"health.probes": '[ { type = "tcp"; host = "localhost"; } ]'}),
        "services.keel.agents.probe.health.probes.0.port is required for a tcp probe",
        id="tcp-probe-without-port",
    ),
    pytest.param(
        agent(
            **{"health.probes": '[ { type = "exec"; command = [ "/bin/true" ]; timeout = 9; } ]'}
        ),
        "services.keel.agents.probe.health.probes.0.timeout (9) must not exceed interval (5)",
        id="timeout-over-interval",
    ),
    pytest.param(
        agent(**{"resources.memoryMax": '"lots"'}),
        "services.keel.agents.probe.resources.memoryMax: expected bytes",
        id="memory-max",
    ),
    pytest.param(
        agent(**{"resources.cpuQuota": '"0%"'}),
        "services.keel.agents.probe.resources.cpuQuota: expected a percentage",
        id="cpu-quota",
    ),
    pytest.param(
        agent(environment='{ "1ST" = "x"; }'),
        "services.keel.agents.probe.environment: variable names are letters",
        id="environment-name",
    ),
    pytest.param(
        '{ services.keel.agents.Probe = { command = [ "/bin/agent" ]; tier = 1; }; }',
        "services.keel.agents.Probe: 'Probe' is not a valid agent name",
        id="bad-name",
    ),
    pytest.param(
        "{ services.keel.agents.a-very-long-agent-name-indeed = "
        '{ command = [ "/bin/agent" ]; tier = 1; }; }',
        "must fit the 32-character user name limit",
        id="long-name",
    ),
    pytest.param(
        "{ services.keel.agents = { "
        'one = { command = [ "/bin/a" ]; tier = 1; user = "shared"; }; '
        'two = { command = [ "/bin/b" ]; tier = 2; user = "shared"; }; }; }',
        "services.keel.agents: one (shared), two (shared): tier 1 and 2 agents need a user of their own",
        id="shared-user",
    ),
]


@pytest.mark.parametrize(("config", "message"), BAD)
def test_bad_combinations_fail_with_a_message(
    nix_instantiate: str, nixpkgs_lib: Path, config: str, message: str
) -> None:
    failed = evaluate(nix_instantiate, nixpkgs_lib, config)["failedAssertions"]
    assert any(message in text for text in failed), failed


def test_a_tier_outside_0_to_2_is_a_type_error(nix_instantiate: str, nixpkgs_lib: Path) -> None:
    from tests.nix.nixeval import NixEvalError

    with pytest.raises(NixEvalError, match=r"services\.keel\.agents\.probe\.tier"):
        evaluate(nix_instantiate, nixpkgs_lib, agent(tier="3"))


DOMAINS = [
    "example.org",
    "example.org.",
    "*.wikipedia.org",
    "api-1.example.co.uk",
    "Example.org",
    "*.org",
    "exa*mple.org",
    "a.*.example.org",
    "192.0.2.1",
    "example.123",
    "-bad.example.org",
    "xn--bcher-kva.example",
    "under_score.example",
    "a" * 64 + ".example",
]


@pytest.mark.parametrize("domain", DOMAINS)
def test_egress_domains_are_judged_as_keel_judges_them(
    nix_instantiate: str, nixpkgs_lib: Path, domain: str
) -> None:
    config = agent(**{"egress.allow": f"[ {json.dumps(domain)} ]"})
    failed = evaluate(nix_instantiate, nixpkgs_lib, config)["failedAssertions"]
    refused_by_nix = any("egress.allow" in text for text in failed)
    assert refused_by_nix == (check_domain(domain) is not None)
