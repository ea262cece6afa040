from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from keel.errors import ConfigError
from keel.mcp.policy import Policy, Principal, qualified, split
from keel.mcp.spec import ServerSpec, parse_server_spec

NODE_A = "a" * 32
NODE_B = "b" * 32
TIERS = {"ops": 0, "notes": 1, "scout": 2}


def server(name: str, share: list[dict[str, Any]], tier: int | None = 2) -> ServerSpec:
    data: dict[str, Any] = {"name": name, "share": share}
    if tier is None:
        data["url"] = "http://127.0.0.1:9/mcp"
    else:
        data.update(command=["/usr/bin/srv"], tier=tier)
    return parse_server_spec(data, source=f"{name}.json")


def policy(*servers: ServerSpec, tiers: dict[str, int] | None = None) -> Policy:
    return Policy({s.name: s for s in servers}, TIERS if tiers is None else tiers)


TOOLS = ["read", "write", "list"]


def test_nothing_is_shared_without_a_grant() -> None:
    p = policy(server("files", []))
    for agent in TIERS:
        assert p.visible(Principal(agent), "files", TOOLS) == []
        decision = p.may_call(Principal(agent), "files", "read")
        assert not decision.allowed
        assert f"files.read is not shared with agent {agent}" in decision.reason


def test_empty_lists_mean_nobody() -> None:
    p = policy(server("files", [{"agents": [], "tools": "*"}, {"agents": "*", "tools": []}]))
    assert all(p.visible(Principal(a), "files", TOOLS) == [] for a in TIERS)
    assert p.agents_seeing("files") == []


def test_grants_add_up_per_agent() -> None:
    p = policy(
        server(
            "files",
            [{"agents": ["scout"], "tools": ["read"]}, {"agents": "*", "tools": ["list"]}],
        )
    )
    assert p.visible(Principal("scout"), "files", TOOLS) == ["read", "list"]
    assert p.visible(Principal("notes"), "files", TOOLS) == ["list"]
    assert p.may_call(Principal("scout"), "files", "read").allowed
    assert not p.may_call(Principal("notes"), "files", "read").allowed
    assert not p.may_call(Principal("scout"), "files", "write").allowed
    assert p.agents_seeing("files") == ["notes", "ops", "scout"]


def test_callers_that_are_no_agent_get_nothing_even_from_star() -> None:
    p = policy(server("files", [{"agents": "*", "tools": "*"}]))
    root = Principal(None, uid=0)
    assert p.visible(root, "files", TOOLS) == []
    decision = p.may_call(root, "files", "read")
    assert not decision.allowed
    assert "uid 0 (not a keel agent) may use no tool" in decision.reason
    # An agent name the host does not know is no agent either.
    assert p.visible(Principal("ghost"), "files", TOOLS) == []


def test_a_looser_server_is_not_handed_to_a_stricter_agent() -> None:
    # A tier-0 server (no sandbox) through "*": the tier-2 agent does not get it.
    p = policy(server("shell", [{"agents": "*", "tools": "*"}], tier=0))
    assert p.visible(Principal("ops"), "shell", ["run"]) == ["run"]
    assert p.visible(Principal("scout"), "shell", ["run"]) == []
    decision = p.may_call(Principal("scout"), "shell", "run")
    assert not decision.allowed
    assert "shell runs at tier 0 and agent scout at tier 2" in decision.reason
    # Named in a grant, it is a config error naming the fix...
    with pytest.raises(
        ConfigError,
        match=r"shell.json: share\[0\].agents: shell runs at tier 0 and agent scout at tier 2.*allowLowerTier",
    ):
        policy(server("shell", [{"agents": ["scout"], "tools": "*"}], tier=0))
    # ...unless the operator says so.
    p = policy(
        server("shell", [{"agents": ["scout"], "tools": ["run"], "allowLowerTier": True}], tier=0)
    )
    assert p.may_call(Principal("scout"), "shell", "run").allowed
    # A server run elsewhere (url) has no tier here to compare.
    p = policy(server("search", [{"agents": "*", "tools": "*"}], tier=None))
    assert p.visible(Principal("scout"), "search", ["q"]) == ["q"]


def test_remote_grants_are_for_remote_callers_only_and_local_ones_for_local() -> None:
    p = policy(
        server(
            "files",
            [
                {"agents": ["scout"], "tools": ["read"]},
                {"nodes": [NODE_A], "agents": ["scout"], "tools": ["list"]},
                {"nodes": "*", "agents": ["writer"], "tools": ["write"]},
            ],
        )
    )
    assert p.visible(Principal("scout"), "files", TOOLS) == ["read"]
    assert p.visible(Principal("scout", node=NODE_A), "files", TOOLS) == ["list"]
    assert p.visible(Principal("scout", node=NODE_B), "files", TOOLS) == []
    # A remote agent with a local agent's name gets nothing the local one has.
    assert not p.may_call(Principal("scout", node=NODE_B), "files", "read").allowed
    assert p.may_call(Principal("writer", node=NODE_B), "files", "write").allowed
    assert p.visible(Principal("writer"), "files", TOOLS) == []
    decision = p.may_call(Principal("scout", node=NODE_B), "files", "list")
    assert f"not shared with agent scout@{NODE_B}" in decision.reason


def test_unknown_servers_are_refused() -> None:
    decision = policy().may_call(Principal("scout"), "nope", "x")
    assert not decision.allowed
    assert "no MCP server named 'nope'" in decision.reason


def test_names_are_server_dot_tool() -> None:
    assert qualified("files", "read.all") == "files.read.all"
    assert split("files.read.all") == ("files", "read.all")
    for bad in ("files", ".read", "files.", ""):
        assert split(bad) is None


names = st.sampled_from(["scout", "notes", "ops", "ghost"])
tool_names = st.sampled_from(TOOLS)
name_lists = st.one_of(st.just("*"), st.lists(names, max_size=3))
grants = st.fixed_dictionaries(
    {"agents": name_lists, "tools": st.one_of(st.just("*"), st.lists(tool_names, max_size=3))}
)


@given(st.lists(grants, max_size=4), names, tool_names)
def test_what_is_listed_is_exactly_what_may_be_called(
    share: list[dict[str, Any]], agent: str, tool: str
) -> None:
    p = policy(server("files", share, tier=2))
    who = Principal(agent)
    listed = tool in p.visible(who, "files", TOOLS)
    assert listed == p.may_call(who, "files", tool).allowed
    # And a grant is needed: an agent never sees a tool no grant names.
    if listed:
        assert any(
            (g["agents"] == "*" or agent in g["agents"])
            and (g["tools"] == "*" or tool in g["tools"])
            for g in share
        )
