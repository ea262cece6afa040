"""fleet.json, and who may command what."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from keel.errors import BadRequest, ConfigError, Forbidden
from keel.fleet import config
from keel.fleet.control import AgentCommand, authorize, parse_command

from .logs import signer

NODE = "a" * 32
OTHER = "b" * 26 + "234567"


def load(tmp_path: Path, **values: Any) -> config.FleetConfig:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(values))
    return config.load(path)


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.operators == frozenset()
    assert set(cfg.services) == {"watch", "mesh"}
    assert cfg.services["mesh"] is None
    assert cfg.witness_every == 60
    assert cfg.witness_name.endswith("/keel/witness")
    assert cfg.status_timeout == 1.0
    assert cfg.common.socket.name == "fleet.sock"


def test_settings(tmp_path: Path) -> None:
    key = str(signer("h/keel/ledger", 1).verifier)
    cfg = load(
        tmp_path,
        operators=[NODE],
        services=["mesh", "egress"],
        watch=None,
        pinned={OTHER: key},
        witness_every=5,
        witness_name="w1.example/witness",
    )
    assert cfg.operators == {NODE}
    assert cfg.watch is None
    assert cfg.services["egress"] is not None
    assert cfg.services["egress"].name == "egress.sock"
    assert cfg.pinned == {OTHER: key}
    assert cfg.witness_name == "w1.example/witness"


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"operatorz": []}, "operatorz: unknown key"),
        ({"operators": ["web1"]}, r"operators: \[0\]: \"web1\" is not a mesh node id"),
        ({"operators": "x"}, "expected a list"),
        ({"services": ["fleet"]}, "not a keel service name"),
        ({"services": ["Watch!"]}, "not a keel service name"),
        ({"pinned": {"x": "y"}}, "is not a mesh node id"),
        ({"pinned": {NODE: "nonsense"}}, "not a ledger verifier key"),
        ({"witness_every": 0}, "witness_every: expected a number > 0"),
        ({"witness_name": "a b"}, "no spaces"),
        ({"status_timeout": 100}, "at most 60"),
        ({"keep": 0}, "at least 1"),
        ({"socket": "a\u0000b"}, "socket"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, values: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load(tmp_path, **values)


def test_commands() -> None:
    assert parse_command({"verb": "restart", "agent": "web-1"}) == AgentCommand("restart", "web-1")
    for body, problem in (
        ({"verb": "reboot", "agent": "web"}, "unknown command"),
        ({"verb": "stop", "agent": "../x"}, "not an agent name"),
        ({"verb": "stop"}, "not an agent name"),
        ({"verb": "stop", "agent": "web", "as": "root"}, "unknown key 'as'"),
    ):
        with pytest.raises(BadRequest, match=problem):
            parse_command(body)


def test_only_declared_operators_may_command() -> None:
    authorize(NODE, frozenset({NODE}), OTHER)
    with pytest.raises(Forbidden, match=f"node {OTHER} is not an operator of node {NODE}"):
        authorize(OTHER, frozenset({"c" * 32}), NODE)
    # a node is no operator of itself unless declared: it may not command itself over the mesh
    with pytest.raises(Forbidden):
        authorize(NODE, frozenset(), NODE)
