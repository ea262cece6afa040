"""egress.json: defaults, every key checked, errors that name the key."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from keel.egress.config import load, parse_upstream, resolve_uids
from keel.errors import ConfigError


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "egress.json"
    path.write_text(json.dumps(data))
    return path


BASE: dict[str, Any] = {"upstream": ["192.0.2.53"], "ledger": None}


def test_defaults(tmp_path: Path) -> None:
    config = load(
        write(tmp_path, {**BASE, "agents": {"scout": {"user": "keel-agent-scout", "port": 5301}}})
    )
    assert (config.min_ttl, config.grace, config.on_stop, config.log_group) == (30, 30, "keep", 17)
    agent = config.agents["scout"]
    assert agent.mode == "enforce"
    assert agent.enforced
    assert not agent.allow  # no allowlist: nothing allowed, never everything
    assert str(config.upstream[0]) == "192.0.2.53:53"
    assert config.common.ledger is None


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("192.0.2.1", "192.0.2.1", 53),
        ("192.0.2.1:5353", "192.0.2.1", 5353),
        ("[2001:db8::1]:53", "2001:db8::1", 53),
        ("2001:db8::1", "2001:db8::1", 53),
        ("[::1]", "::1", 53),
    ],
)
def test_upstreams(text: str, host: str, port: int) -> None:
    upstream = parse_upstream(text)
    assert (upstream.host, upstream.port) == (host, port)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("dns.google", "a name would need a resolver"),
        ("192.0.2.1:0", "port must be a number from 1 to 65535"),
        ("192.0.2.1:x", "port must be a number"),
        ("[2001:db8::1", "missing ']'"),
        ("[::1]x", "expected ':PORT' after ']'"),
    ],
)
def test_bad_upstreams(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_upstream(text)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"upstream": []}, "upstream: must not be an empty list"),
        ({"upstream": ["resolver.example"]}, "upstream[0]: 'resolver.example'"),
        ({"grace": "30s"}, "grace: expected an integer"),
        ({"log_group": 70000}, "log_group: must be at most 65535"),
        (
            {"agents": {"Scout": {"uid": 1001, "port": 5301}}},
            'agents.Scout: "Scout" is not a valid agent name',
        ),
        ({"agents": {"s": {"uid": 0, "port": 5301}}}, "agents.s.uid: must be at least 1"),
        (
            {"agents": {"s": {"user": "root", "port": 5301}}},
            "agents.s.user: an agent never runs as root",
        ),
        (
            {"agents": {"s": {"uid": 1001, "user": "x", "port": 5301}}},
            "agents.s.uid: give exactly one",
        ),
        (
            {"agents": {"s": {"uid": 1001, "port": 5301, "allow": ["ok.test", "bad..test"]}}},
            "agents.s.allow[1]: 'bad..test'",
        ),
        (
            {"agents": {"s": {"uid": 1001, "port": 5301, "allow": "ok.test"}}},
            "agents.s.allow: expected a list",
        ),
        (
            {"agents": {"a": {"uid": 1001, "port": 5301}, "b": {"uid": 1002, "port": 5301}}},
            "agents.b.port: 5301 is already the port of 'a'",
        ),
        (
            {"agents": {"a": {"user": "u", "port": 5301}, "b": {"user": "u", "port": 5302}}},
            "agents.b.user: \"u\" is also 'a'",
        ),
        (
            {"upstream": ["127.0.0.1:5301"], "agents": {"a": {"uid": 1001, "port": 5301}}},
            "upstream[0]: 127.0.0.1:5301 is the proxy of agent 'a'",
        ),
        ({"surprise": 1}, "surprise: unknown key"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, {**BASE, **change}))
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "egress.json"))


def test_users_are_resolved_at_start(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            {**BASE, "agents": {"a": {"user": "ua", "port": 5301}, "b": {"uid": 77, "port": 5302}}},
        )
    )
    assert resolve_uids(config, {"ua": 1001}.__getitem__) == {"a": 1001, "b": 77}
    with pytest.raises(ConfigError, match=re.escape("agents.a.user: no such user 'ua'")):
        none: dict[str, int] = {}
        resolve_uids(config, none.__getitem__)
    with pytest.raises(ConfigError, match="uid 77 is also 'a'"):
        resolve_uids(config, {"ua": 77}.__getitem__)


def test_mcp_servers_are_governed_under_their_own_names(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            {
                **BASE,
                "agents": {"fetch": {"user": "keel-agent-fetch", "port": 5301}},
                "servers": {
                    "fetch": {"user": "keel-mcp-fetch", "port": 5302, "allow": ["*.Wiki.org"]}
                },
            },
        )
    )
    assert sorted(config.agents) == ["fetch", "mcp.fetch"]  # an agent and a server, apart
    server = config.agents["mcp.fetch"]
    assert (server.user, server.port, server.allow.texts()) == (
        "keel-mcp-fetch",
        5302,
        ["*.wiki.org"],
    )
    with pytest.raises(ConfigError, match=re.escape("servers.fetch.user: no such user")):
        resolve_uids(config, {"keel-agent-fetch": 1001}.__getitem__)


def agent_spec(name: str, tier: int, allow: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "command": ["/bin/true"], "tier": tier}
    if allow is not None:
        spec["egress"] = {"allow": allow}
    return spec


def install(directory: Path, specs: list[dict[str, Any]]) -> str:
    directory.mkdir(parents=True)
    for spec in specs:
        (directory / f"{spec['name']}.json").write_text(json.dumps(spec))
    return str(directory)


def test_installed_specs_are_governed_as_the_nixos_module_governs_them(tmp_path: Path) -> None:
    agents = install(
        tmp_path / "agents",
        [
            agent_spec("scout", 2, ["api.example.com"]),
            agent_spec("notes", 1),  # tier 1 without an allowlist: its network is open
            agent_spec("crawler", 1, ["Bücher.example"]),
            agent_spec("ops", 0),
        ],
    )
    servers = install(
        tmp_path / "servers",
        [
            {**agent_spec("files", 2), "share": []},
            {**agent_spec("fetch", 1, ["*.wikipedia.org"]), "share": []},
            {**agent_spec("time", 1), "share": []},
            {"name": "remote", "url": "https://mcp.example.com/mcp", "share": []},
        ],
    )
    config = load(
        write(
            tmp_path,
            {**BASE, "agents": agents, "servers": servers, "audit": ["mcp.fetch"]},
        )
    )
    # Agents in name order, then servers: base_port + 1, + 2, ...
    assert [(name, a.port, a.user, a.mode) for name, a in config.agents.items()] == [
        ("crawler", 5301, "keel-agent-crawler", "enforce"),
        ("scout", 5302, "keel-agent-scout", "enforce"),
        ("mcp.fetch", 5303, "keel-mcp-fetch", "audit"),
        ("mcp.files", 5304, "keel-mcp-files", "enforce"),
    ]
    assert config.agents["crawler"].allow.allows_text("xn--bcher-kva.example")
    assert not config.agents["mcp.files"].allow  # tier 2 without an allowlist: nothing
    with pytest.raises(ConfigError, match=re.escape("agents/scout.json: user: no such user")):
        resolve_uids(config, {"keel-agent-crawler": 1001}.__getitem__)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"agents": "relative/dir"}, 'agents: "relative/dir": give the directory as an absolute'),
        ({"servers": 7}, "servers: expected an object of entries by name or the directory"),
        (
            {"servers": {"Bad": {"uid": 5, "port": 5301}}},
            'servers.Bad: "Bad" is not a valid MCP server',
        ),
        ({"audit": ["scout"]}, 'audit[0]: "scout" is not an agent or server egress governs'),
        ({"base_port": 65535}, "base_port: must be at most 65534"),
    ],
)
def test_server_and_directory_errors_name_the_key(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, {**BASE, **change}))
    assert message in str(caught.value)


def test_derived_ports_never_take_53_nor_another_entrys_port(tmp_path: Path) -> None:
    agents = install(tmp_path / "agents", [agent_spec("a", 2), agent_spec("b", 2)])
    with pytest.raises(ConfigError, match="base_port: 51 gives b port 53"):
        load(write(tmp_path, {**BASE, "agents": agents, "base_port": 51}))
    servers = {"s": {"uid": 1234, "port": 5302}}
    with pytest.raises(
        ConfigError, match=re.escape("base_port: b's port: 5302 is already the port of 'mcp.s'")
    ):
        load(write(tmp_path, {**BASE, "agents": agents, "servers": servers}))
