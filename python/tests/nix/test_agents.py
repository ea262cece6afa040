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
from keel.agents.units import load_tiers, render_unit

from tests import systemd_syntax
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
      mesh = { sendTo = [ "*" ]; receiveFrom = [ "ops@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb" "*@cccccccccccccccccccccccccccccccc" ]; topics = [ "jobs" "reports.*" ]; };
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
def host(nix_instantiate: str, nixpkgs_tree: Path) -> dict[str, Any]:
    result = evaluate(nix_instantiate, nixpkgs_tree, HOST)
    assert result["failedAssertions"] == []
    return result


# What NixOS puts in every unit's environment besides the agent's own: the
# PATH it builds from the unit's `path`, and the time zone database.
NIXOS_ENVIRONMENT = {"PATH", "TZDIR"}


def normalised(value: str) -> str:
    """A directive's value as systemd takes it (NixOS writes true, keel writes yes)."""
    return {"true": "yes", "false": "no"}.get(value, value)


def sections(text: str, *, skip: set[str]) -> dict[tuple[str, str], list[str]]:
    """A unit file's directives, by (section, key), but the keys in ``skip``."""
    found: dict[tuple[str, str], list[str]] = {}
    for d in systemd_syntax.directives(text):
        if d.key not in skip:
            found.setdefault((d.section, d.key), []).append(normalised(d.value))
    return found


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
    for name, unit in host["services"].items():
        if not name.startswith("keel-agent-"):
            continue  # keel-ledger-key (modules/keel.nix) is no agent
        assert unit["wantedBy"] == ["multi-user.target"]
        assert unit["serviceConfig"]["Restart"] == "always"


def test_the_spec_carries_the_mesh_grant_as_declared(host: dict[str, Any]) -> None:
    written = host["etc"]["keel/agents/scout.json"]["json"]
    assert written["mesh"] == {
        "sendTo": ["*"],
        "receiveFrom": [
            "ops@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
            "*@cccccccccccccccccccccccccccccccc",
        ],
        "topics": ["jobs", "reports.*"],
    }
    grant = parse_spec(written, source="scout.json").mesh_grant
    assert grant.receives("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "ops")
    assert not grant.receives("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "scout")
    assert "mesh" not in host["etc"]["keel/agents/notes.json"]["json"]


@pytest.mark.parametrize("name", ["scout", "notes", "ops"])
def test_keel_reads_the_spec_back_unchanged(host: dict[str, Any], name: str) -> None:
    written = host["etc"][f"keel/agents/{name}.json"]["json"]
    spec = parse_spec(written, source=f"/etc/keel/agents/{name}.json")
    assert spec.to_json() == written


@pytest.mark.parametrize("name", ["scout", "notes", "ops"])
def test_the_unit_is_the_one_keel_renders(host: dict[str, Any], name: str) -> None:
    # The unit file NixOS generates and the one `keel agents render-unit`
    # writes give systemd the same directives, the same argv and the same
    # environment, however each quotes them.
    written = host["etc"][f"keel/agents/{name}.json"]["json"]
    spec = parse_spec(written, source=name)
    nix_text = host["units"][f"keel-agent-{name}.service"]
    python_text = render_unit(spec, load_tiers(TIERS_JSON))
    values = {"ExecStart", "Environment"}
    nix_sections = sections(nix_text, skip=values)
    if spec.tier == 2 or spec.egress_allow:
        # modules/egress.nix orders the agent after keel-egress and checks
        # that its rules are in the kernel before it starts (test_egress.py).
        assert nix_sections.pop(("Unit", "Wants")) == ["keel-egress.service"]
        assert nix_sections.pop(("Service", "ExecStartPre"))[0].startswith("+/nix/store/")
        after = nix_sections[("Unit", "After")]
        nix_sections[("Unit", "After")] = [
            " ".join(w for w in after[0].split() if w != "keel-egress.service")
        ]
    assert nix_sections == sections(python_text, skip=values)
    nix_argv, nix_env = systemd_syntax.service_values(nix_text)
    python_argv, python_env = systemd_syntax.service_values(python_text)
    assert nix_argv == python_argv == list(spec.command)
    assert python_env == spec.environment
    assert {k: v for k, v in nix_env.items() if k not in NIXOS_ENVIRONMENT} == spec.environment
    assert set(nix_env) == set(spec.environment) | NIXOS_ENVIRONMENT


def test_a_host_adds_ordering_to_an_agent_unit(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    # tiers.json's After= reaches NixOS through `after`, the list NixOS
    # derives unitConfig.After from, so a host's own `after` and `wants` add
    # to it (a string in unitConfig.After made this a conflict in real NixOS).
    result = evaluate(
        nix_instantiate,
        nixpkgs_tree,
        """{
          services.keel.agents.scout = { command = [ "/bin/scout" ]; tier = 2; };
          services.keel.egress = { enable = true; upstream = [ "192.0.2.53" ]; };
          systemd.services.keel-agent-scout = {
            after = [ "postgresql.service" ];
            wants = [ "postgresql.service" ];
            unitConfig.StartLimitBurst = 10;
          };
        }""",
    )
    assert result["failedAssertions"] == []
    unit = result["services"]["keel-agent-scout"]
    assert sorted(unit["after"]) == ["keel-egress.service", "network.target", "postgresql.service"]
    assert sorted(unit["wants"]) == ["keel-egress.service", "postgresql.service"]
    text = result["units"]["keel-agent-scout.service"]
    found = {(d.section, d.key): d.value for d in systemd_syntax.directives(text)}
    assert sorted(found["Unit", "After"].split()) == [
        "keel-egress.service",
        "network.target",
        "postgresql.service",
    ]
    assert sorted(found["Unit", "Wants"].split()) == ["keel-egress.service", "postgresql.service"]
    assert found["Unit", "StartLimitBurst"] == "10"


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
    (check,) = [c for c in host["checks"] if c["name"].startswith("keel")]
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
        agent(**{"mesh.sendTo": '[ "bob" ]'}),
        'services.keel.agents.probe.mesh.sendTo: bob: expected "*", node ids',
        id="mesh-send-to",
    ),
    pytest.param(
        agent(
            **{
                "mesh.receiveFrom": '[ "*" "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb" "Ops@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb" "ops@short" "*@*" ]'
            }
        ),
        "services.keel.agents.probe.mesh.receiveFrom: Ops@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb, ops@short, *@*: "
        'expected "*", node ids (as `keel mesh id` prints them), "*@NODE_ID" or "AGENT@NODE_ID"',
        id="mesh-receive-from",
    ),
    pytest.param(
        agent(**{"mesh.topics": '[ "jobs" "no spaces" "*jobs" ]'}),
        "services.keel.agents.probe.mesh.topics: no spaces, *jobs: expected topics",
        id="mesh-topics",
    ),
    pytest.param(
        agent(environment='{ "1ST" = "x"; }'),
        "services.keel.agents.probe.environment: '1ST': variable names are letters",
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
        "must fit the 31-character user name limit",
        id="long-name",
    ),
    pytest.param(
        # 32 characters: useradd takes it, NixOS does not (and aborts the
        # whole evaluation on it unless keel refuses it first).
        "{ services.keel.agents.twenty-one-characters = "
        '{ command = [ "/bin/agent" ]; tier = 1; }; }',
        "'keel-agent-twenty-one-characters' must fit the 31-character user name limit",
        id="name-at-nixos-user-limit",
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
    nix_instantiate: str, nixpkgs_tree: Path, config: str, message: str
) -> None:
    failed = evaluate(nix_instantiate, nixpkgs_tree, config)["failedAssertions"]
    assert any(message in text for text in failed), failed


def test_a_tier_outside_0_to_2_is_a_type_error(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    from tests.nix.nixeval import NixEvalError

    with pytest.raises(NixEvalError, match=r"services\.keel\.agents\.probe\.tier"):
        evaluate(nix_instantiate, nixpkgs_tree, agent(tier="3"))


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
    "a." * 200 + "example",
    "b" * 100_000,
    "API.Example.ORG.",
    "*.Wikipedia.org",
    # Internationalised: Nix has no IDNA and leaves them to keel's check at build time.
    "bücher.example",
    "*.Bücher.example",
    "a\u200d.example",
    "bü cher.example",
]


@pytest.mark.parametrize("domain", DOMAINS, ids=[d[:40] for d in DOMAINS])
def test_egress_domains_are_judged_as_keel_judges_them(
    nix_instantiate: str, nixpkgs_tree: Path, domain: str
) -> None:
    config = agent(**{"egress.allow": f"[ {json.dumps(domain)} ]"})
    failed = evaluate(nix_instantiate, nixpkgs_tree, config)["failedAssertions"]
    refused_by_nix = any("egress.allow" in text for text in failed)
    refused_by_keel = check_domain(domain) is not None
    if domain.isascii():
        assert refused_by_nix == refused_by_keel
    else:  # never stricter than keel; keel's own check of the spec at build time decides
        assert refused_by_keel or not refused_by_nix
