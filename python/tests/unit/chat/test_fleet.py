"""The chat's fleet verbs, pure parts: AGENT@NODE, the fleet's answer, naming a node, /fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from keel.chat import config as chat_config
from keel.chat import views
from keel.chat.fleet import parse_view, resolve, split_target
from keel.chat.verbs import VerbError, fingerprint
from keel.errors import ConfigError

ME, OTHER, THIRD = "a" * 32, "b" * 32, "bbbbc" + "c" * 27


def report(host: str, agents: dict[str, Any], problems: list[str] | None = None) -> dict[str, Any]:
    return {"host": host, "agents": agents, "problems": problems or [], "health": "healthy"}


ANSWER = {
    "node": ME,
    "nodes": [
        {"node": ME, "state": "healthy", "last_seen": 100.0, "stale": False, "error": None,
         "report": report("alpha", {})},
        {"node": OTHER, "state": "degraded", "last_seen": 100.0, "stale": False, "error": None,
         "report": report("beta", {
             "web": {"state": "healthy", "restarts": 0, "last_error": None},
             "db": {"state": "backoff", "restarts": 3, "last_error": "exit 1",
                    "last_error_at": 90.0},
         }, ["agent db is backoff", "mesh does not answer: gone"])},
        {"node": THIRD, "state": "unreachable", "last_seen": 40.0, "stale": True,
         "error": "the mesh has no connection to it", "report": report("gamma", {})},
        "not a row",
    ],
}  # fmt: skip


def test_agent_at_node_splits_at_the_last_at() -> None:
    assert split_target("web") == ("web", None)
    assert split_target("web@db1") == ("web", "db1")
    assert split_target("a@b@db1") == ("a@b", "db1")
    for bad in ("web@", "@db1"):
        with pytest.raises(VerbError, match="is not AGENT@NODE"):
            split_target(bad)


def test_the_fleets_answer_is_read_and_bad_ones_refused() -> None:
    view = parse_view(ANSWER)
    assert view.me == ME
    assert [row.node for row in view.nodes] == [ME, OTHER, THIRD]
    beta = view.nodes[1]
    assert beta.host == "beta"
    db = next(a for a in beta.agents if a.name == "db")
    assert (db.state, db.restarts, db.pid, db.last_error) == ("backoff", 3, None, "exit 1")
    assert fingerprint(db) == "backoff/-/3"
    bad: Any
    for bad in (None, [], {"nodes": "x"}):
        with pytest.raises(VerbError, match="unreadable"):
            parse_view(bad)


def test_a_node_is_named_by_id_host_or_a_long_enough_unique_prefix() -> None:
    view = parse_view(ANSWER)
    assert resolve(view, OTHER).host == "beta"
    assert resolve(view, "gamma").node == THIRD
    assert resolve(view, "aaaa").node == ME
    with pytest.raises(VerbError, match="names 2 nodes"):
        resolve(view, "bbbb")
    with pytest.raises(VerbError, match="no node of the fleet is 'aaa'"):
        resolve(view, "aaa")  # too short to be a prefix
    with pytest.raises(VerbError, match="known: alpha, beta, gamma"):
        resolve(view, "delta")


def test_fleet_view_lists_every_node_and_what_is_down() -> None:
    text = views.fleet(parse_view(ANSWER), now=100.0)
    assert text.splitlines() == [
        "Fleet: 1 of 3 nodes healthy.",
        "alpha (this node): healthy, 0 agents, 0 not healthy",
        "beta: degraded, 2 agents, 1 not healthy",
        "  db@beta: backoff, 3 restarts",
        "  mesh does not answer: gone",
        "gamma: unreachable, last seen 1m0s ago: the mesh has no connection to it",
    ]
    assert views.fleet(parse_view({"node": ME, "nodes": []}), now=0) == (
        "The fleet has no nodes yet."
    )


def test_fleet_socket_defaults_and_null_turns_the_fleet_off(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("123456:ABC-def_ghi\n")
    token.chmod(0o600)
    path = tmp_path / "chat.json"
    base = f'"token_file": "{token}", "allowed_users": [1]'
    path.write_text("{" + base + "}")
    assert chat_config.load(path).fleet_socket is not None
    path.write_text("{" + base + ', "fleet_socket": null}')
    assert chat_config.load(path).fleet_socket is None
    path.write_text("{" + base + ', "fleet_socket": 7}')
    with pytest.raises(ConfigError, match="fleet_socket"):
        chat_config.load(path)
