"""Where egress control is on: keel's nftables table enforces what /etc/keel/egress.json says.

Checked from the outside, in the kernel's own words (``nft -j list table``):
every governed agent has its sets, its chain ending in a drop (or an accept
in audit mode), its DNS redirected to its own proxy port, and its uid
dispatched to its chain; the proxy listens on that port; every tier-2 agent
or MCP server (and every tier-1 one with an allowlist) is governed and, at
tier 2, enforced; the daemon holds CAP_NET_ADMIN and nothing else.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import keelhost
import pytest
from keel.agents.spec import AgentSpec
from keel.config import Section, parse_json
from keel.egress.allowlist import Allowlist
from keel.egress.config import SERVER_PREFIX, EgressConfig, needs_egress, parse
from keel.egress.ruleset import chain_name, counter_name, set_name

CONFIG = "/etc/keel/egress.json"


def egress_configured(host: Any) -> bool:
    return bool(host.service("keel-egress").is_enabled or host.file(CONFIG).exists)


@pytest.fixture(scope="module")
def egress(host: Any) -> EgressConfig:
    if not egress_configured(host):
        pytest.skip(f"egress is not configured here (keel-egress.service not enabled, no {CONFIG})")
    return parse(
        Section(parse_json(host.file(CONFIG).content_string, source=CONFIG), source=CONFIG),
        specs=keelhost.HostSpecs(host),
    )


@pytest.fixture(scope="module")
def table(host: Any, egress: EgressConfig, pytestconfig: pytest.Config) -> list[dict[str, Any]]:
    name = pytestconfig.getoption("keel_nft_table")
    result = host.run(shlex.join(["nft", "-j", "list", "table", *name.split()]))
    if result.rc != 0:
        pytest.fail(f"egress is on but `nft list table {name}` fails: {result.stderr.strip()}")
    objects: list[dict[str, Any]] = json.loads(result.stdout)["nftables"]
    return objects


def of_kind(table: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item[kind] for item in table if kind in item]


def rules(table: list[dict[str, Any]], chain: str) -> list[list[dict[str, Any]]]:
    return [rule["expr"] for rule in of_kind(table, "rule") if rule.get("chain") == chain]


def uid_of(host: Any, egress: EgressConfig, agent: str) -> int | None:
    config = egress.agents[agent]
    if config.uid is not None:
        return config.uid
    user = host.user(config.user)
    return int(user.uid) if user.exists else None


def mapping(expressions: list[dict[str, Any]], key: str) -> dict[int, Any]:
    """uid -> value of the map (``redirect`` port map, ``vmap``, conntrack ``zone``) in a rule."""
    for expression in expressions:
        if key == "redirect" and "redirect" in expression:
            data = expression["redirect"].get("port", {}).get("map", {}).get("data", {})
        elif key == "vmap" and "vmap" in expression:
            data = expression["vmap"].get("data", {})
        elif key == "zone" and "mangle" in expression:
            data = expression["mangle"].get("value", {}).get("map", {}).get("data", {})
        else:
            continue
        return {int(k): v for k, v in data.get("set", [])}
    return {}


def test_egress_table_present(host: Any, table: list[dict[str, Any]]) -> None:
    chains = {chain["name"] for chain in of_kind(table, "chain")}
    missing = {"zones", "redirect", "output"} - chains
    assert not missing, f"keel's table lacks its base chains {sorted(missing)}"


def test_egress_daemon_holds_cap_net_admin_only(host: Any, egress: EgressConfig) -> None:
    shown = keelhost.show(host, "keel-egress.service", "ActiveState", "CapabilityBoundingSet")
    assert shown["ActiveState"] == "active", f"keel-egress.service is {shown['ActiveState']}"
    assert shown["CapabilityBoundingSet"] == "cap_net_admin", (
        f"keel-egress.service may use {shown['CapabilityBoundingSet']!r}, expected cap_net_admin only"
    )


def test_every_governed_agent_has_its_rules(
    host: Any, egress: EgressConfig, table: list[dict[str, Any]]
) -> None:
    problems: list[str] = []
    sets = {s["name"]: s for s in of_kind(table, "set")}
    counters = {c["name"] for c in of_kind(table, "counter")}
    redirects = {
        uid: port
        for rule in rules(table, "redirect")
        for uid, port in mapping(rule, "redirect").items()
    }
    dispatch = {
        uid: verdict
        for rule in rules(table, "output")
        for uid, verdict in mapping(rule, "vmap").items()
    }
    zones = {
        uid: zone for rule in rules(table, "zones") for uid, zone in mapping(rule, "zone").items()
    }
    shared = {zone for zone in zones.values() if list(zones.values()).count(zone) > 1}
    if shared:
        problems.append(
            f"agents share conntrack zones {sorted(shared)}: one could ride on another's flows"
        )
    for name, agent in sorted(egress.agents.items()):
        uid = uid_of(host, egress, name)
        if uid is None:
            problems.append(f"{name}: its user {agent.user!r} does not exist")
            continue
        for family in (4, 6):
            found = sets.get(set_name(name, family))
            if found is None or "timeout" not in found.get("flags", []):
                problems.append(f"{name}: no set {set_name(name, family)} with timeouts")
        if counter_name(name) not in counters:
            problems.append(f"{name}: no counter {counter_name(name)}")
        if redirects.get(uid) != agent.port:
            problems.append(
                f"{name}: DNS of uid {uid} goes to {redirects.get(uid)}, not port {agent.port}"
            )
        if not zones.get(uid):
            problems.append(
                f"{name}: uid {uid} has no conntrack zone of its own: it could ride on UDP flows "
                "other users opened"
            )
        if dispatch.get(uid) != {"jump": {"target": chain_name(name)}}:
            problems.append(
                f"{name}: uid {uid} is not sent to chain {chain_name(name)} ({dispatch.get(uid)})"
            )
        chain = rules(table, chain_name(name))
        verdict = "drop" if agent.enforced else "accept"
        if not chain or verdict not in chain[-1][-1]:
            last = chain[-1] if chain else "no rules"
            problems.append(f"{name}: chain {chain_name(name)} does not end in {verdict} ({last})")
    assert not problems, "\n".join(problems)


def test_each_proxy_listens(host: Any, egress: EgressConfig) -> None:
    silent = [
        f"{name}: nothing listens on 127.0.0.1:{agent.port} (udp and tcp)"
        for name, agent in sorted(egress.agents.items())
        if not (
            host.socket(f"udp://127.0.0.1:{agent.port}").is_listening
            and host.socket(f"tcp://127.0.0.1:{agent.port}").is_listening
        )
    ]
    assert not silent, "\n".join(silent)


def governance_problems(
    egress: EgressConfig, name: str, tier: int | None, allow: tuple[str, ...]
) -> list[str]:
    """What is wrong with how egress governs one agent or server (none if it need not)."""
    if not needs_egress(tier, allow):
        return []
    governed = egress.agents.get(name)
    if governed is None:
        return [f"{name} (tier {tier}) is not in {CONFIG}: its network is open"]
    problems = []
    if tier == 2 and not governed.enforced:
        problems.append(f"{name} (tier 2) is in audit mode: its network is open")
    # Both in egress's canonical form (case, IDNA, trailing dot).
    wanted = set(Allowlist.parse(allow).texts())
    allowed = set(governed.allow.texts())
    if wanted - allowed:
        problems.append(
            f"{name}: its spec allows {sorted(wanted - allowed)}, which {CONFIG} does not"
        )
    if allowed - wanted:
        problems.append(f"{name}: {CONFIG} allows {sorted(allowed - wanted)} beyond its spec")
    return problems


def test_sandboxed_agents_are_governed(host: Any, egress: EgressConfig) -> None:
    specs: list[AgentSpec] = keelhost.agent_specs(host)
    problems = [
        problem
        for spec in specs
        for problem in governance_problems(egress, spec.name, spec.tier, spec.egress_allow)
    ]
    assert not problems, "\n".join(problems)


def test_sandboxed_mcp_servers_are_governed(host: Any, egress: EgressConfig) -> None:
    problems = [
        problem
        for spec in keelhost.server_specs(host)
        if spec.runs_here
        for problem in governance_problems(
            egress, SERVER_PREFIX + spec.name, spec.tier, spec.egress_allow
        )
    ]
    assert not problems, "\n".join(problems)
