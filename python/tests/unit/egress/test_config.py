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
