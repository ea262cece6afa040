"""A node's handshake ``extra``: each field taken if well-formed, ignored otherwise."""

from __future__ import annotations

from keel.mesh.hello import MAX_AGENTS, Hello, make_hello, parse_hello
from keel.mesh.packets import APP_REVISION


def test_a_node_names_its_agents_and_its_revision() -> None:
    extra = make_hello(["10.0.0.1:7400"], "0" * 32, [], agents=["scout", "notes"])
    assert extra["agents"] == ["notes", "scout"]
    hello = parse_hello(extra)
    assert hello == Hello(("10.0.0.1:7400",), "0" * 32, (), APP_REVISION, ("notes", "scout"))


def test_agents_that_are_no_agent_names_are_left_out_and_the_list_is_bounded() -> None:
    hello = parse_hello({"agents": ["ok", "Not-OK", 7, "ok", "a" * 21, None, "x_1"]})
    assert hello.agents == ("ok", "x_1")
    assert parse_hello({"agents": "scout"}).agents == ()
    assert parse_hello({}).agents == ()
    many = parse_hello({"agents": [f"a{i}" for i in range(MAX_AGENTS + 50)]})
    assert len(many.agents) == MAX_AGENTS
