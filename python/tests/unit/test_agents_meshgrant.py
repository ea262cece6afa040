"""Agents' mesh grants: the spec's ``mesh`` section, tier defaults, and the node's decisions."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from keel.agents.meshgrant import MeshGrant, check_peer_pattern, check_topic_pattern, matches
from keel.agents.roster import AgentEntry
from keel.agents.spec import parse_spec
from keel.api import Peer
from keel.config import Section
from keel.errors import ConfigError
from keel.mesh.access import Agents
from keel.mesh.config import parse
from keel.mesh.store import senders_clause

NODE_B = "b" * 32
NODE_C = "c" * 32


def spec(tier: int, **extra: Any) -> dict[str, Any]:
    return {"name": "scout", "command": ["/bin/true"], "tier": tier, **extra}


@pytest.mark.parametrize(("tier", "everything"), [(0, True), (1, True), (2, False)])
def test_a_spec_without_a_mesh_section_takes_its_tiers_default(tier: int, everything: bool) -> None:
    grant = parse_spec(spec(tier), source="s").mesh_grant
    assert grant.empty is not everything
    assert grant.covers("jobs") is everything
    assert grant.may_send_to(NODE_B) is everything
    assert grant.may_send_to(NODE_B, "ops") is everything
    assert grant.receives(NODE_B, None) is everything
    assert grant.receives(NODE_B, "ops") is everything
    assert "mesh" not in parse_spec(spec(tier), source="s").to_json()


def test_declared_keys_replace_the_default_one_by_one() -> None:
    only_topics = parse_spec(spec(1, mesh={"topics": ["jobs"]}), source="s")
    assert only_topics.mesh_grant == MeshGrant(("*",), ("jobs",), ("*",))
    tier2 = parse_spec(spec(2, mesh={"sendTo": [NODE_B], "topics": ["jobs", "jobs"]}), source="s")
    assert tier2.mesh_grant == MeshGrant(send_to=(NODE_B,), topics=("jobs",))
    assert tier2.mesh_grant.receive_from == ()  # tier 2: nothing it did not declare
    assert tier2.to_json()["mesh"] == {"sendTo": [NODE_B], "topics": ["jobs"]}
    both = parse_spec(
        spec(2, mesh={"topics": ["jobs"], "receiveFrom": [f"ops@{NODE_B}", NODE_C]}), source="s"
    )
    assert both.mesh_grant == MeshGrant((), ("jobs",), (f"ops@{NODE_B}", NODE_C))
    assert both.to_json()["mesh"] == {"receiveFrom": [f"ops@{NODE_B}", NODE_C], "topics": ["jobs"]}
    assert parse_spec(both.to_json(), source="s").mesh == both.mesh
    nothing = parse_spec(spec(0, mesh={"sendTo": [], "topics": []}), source="s").mesh_grant
    assert nothing.empty
    assert not nothing.may_send_to(NODE_B)
    # the normalised spec reads back the same
    again = parse_spec(json.loads(json.dumps(tier2.to_json())), source="s")
    assert again.mesh == tier2.mesh


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        ({"sendTo": ["bob"]}, 'mesh.sendTo[0]: "bob": expected .*a node id'),
        ({"sendTo": "*"}, "mesh.sendTo"),
        ({"sendTo": [f"Ops@{NODE_B}"]}, 'mesh.sendTo[0]: "Ops@' + NODE_B + '": "Ops" before \'@\''),
        ({"sendTo": ["ops@nowhere"]}, 'mesh.sendTo[0]: "ops@nowhere": "nowhere" after \'@\''),
        ({"receiveFrom": [NODE_B, "bob"]}, 'mesh.receiveFrom[1]: "bob": expected'),
        ({"receiveFrom": [f"**@{NODE_B}"]}, "mesh.receiveFrom[0]"),
        ({"receiveFrom": [f"ops@{NODE_B}@{NODE_C}"]}, "mesh.receiveFrom[0]"),
        ({"receiveFrom": "*"}, "mesh.receiveFrom"),
        ({"topics": ["a b"]}, "mesh.topics[0]: topic 'a b' must be"),
        ({"topics": ["*jobs"]}, "mesh.topics[0]"),
        ({"topics": [7]}, "mesh.topics"),
        ({"talkTo": []}, "talkTo"),
    ],
)
def test_bad_grants_are_refused_naming_the_key(mesh: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(spec(2, mesh=mesh), source="s")


def test_send_and_receive_patterns() -> None:
    """``*``, ``NODE_ID`` (the whole node, its agents too), ``*@NODE_ID`` (its agents, not
    the node itself) and ``AGENT@NODE_ID``; the same forms for sendTo and receiveFrom."""
    cases: list[tuple[str, str, str | None, bool]] = [
        ("*", NODE_B, None, True),
        ("*", NODE_B, "ops", True),
        (NODE_B, NODE_B, None, True),
        (NODE_B, NODE_B, "ops", True),
        (NODE_B, NODE_C, None, False),
        (NODE_B, NODE_C, "ops", False),
        (f"*@{NODE_B}", NODE_B, "ops", True),
        (f"*@{NODE_B}", NODE_B, None, False),
        (f"*@{NODE_B}", NODE_C, "ops", False),
        (f"ops@{NODE_B}", NODE_B, "ops", True),
        (f"ops@{NODE_B}", NODE_B, "scout", False),
        (f"ops@{NODE_B}", NODE_B, None, False),
        (f"ops@{NODE_B}", NODE_C, "ops", False),
    ]
    for pattern, node, agent, covered in cases:
        assert check_peer_pattern(pattern) is None
        assert matches((pattern,), node, agent) is covered, (pattern, node, agent)
        grant = MeshGrant((pattern,), ("*",), (pattern,))
        assert grant.may_send_to(node, agent) is covered
        assert grant.receives(node, agent) is covered
    assert not matches((), NODE_B, None)
    assert matches((f"ops@{NODE_B}", NODE_C), NODE_C, "scout")


@given(
    st.sampled_from(["*", NODE_B, NODE_C, f"*@{NODE_B}", f"ops@{NODE_B}", f"scout@{NODE_C}"]),
    st.sampled_from([NODE_B, NODE_C]),
    st.sampled_from([None, "ops", "scout"]),
)
def test_the_sql_of_receive_from_agrees_with_matches(
    pattern: str, node: str, agent: str | None
) -> None:
    """The inbox filters in SQL (keel.mesh.store.senders_clause): the same answer."""
    clause, params = senders_clause([pattern])
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE inbox (sender TEXT, agent TEXT)")
    db.execute("INSERT INTO inbox VALUES (?, ?)", (node, agent))
    found = db.execute(f"SELECT count(*) FROM inbox WHERE {clause}", params).fetchone()[0]
    assert bool(found) is matches((pattern,), node, agent)


def test_topic_patterns() -> None:
    grant = MeshGrant(send_to=(), topics=("jobs", "reports.*"))
    assert grant.covers("jobs")
    assert not grant.covers("jobs.x")
    assert not grant.covers("job")
    assert grant.covers("reports.daily")
    assert grant.covers("reports.")
    assert not grant.covers("reports")
    assert not grant.covers("other")
    assert MeshGrant(topics=("*",)).covers("anything/at:all")


@given(st.text(alphabet="ab.*/ -", max_size=12))
def test_an_accepted_pattern_covers_what_it_names(text: str) -> None:
    problem = check_topic_pattern(text)
    if "*" in text[:-1] or " " in text or text in ("", "*" * 2):
        assert problem is not None or text == "*"
    if problem is None and text != "*":
        named = text.removesuffix("*")
        assert MeshGrant(topics=(text,)).covers(named)
        assert MeshGrant(topics=(text,)).covers(named + "x") is text.endswith("*")


def agents() -> Agents:
    return Agents(
        {
            "ops": AgentEntry("ops", 1001, 0, MeshGrant.default(0)),
            "scout": AgentEntry(
                "scout",
                1002,
                2,
                MeshGrant((NODE_B, f"ops@{NODE_C}"), ("jobs",), (f"ops@{NODE_C}",)),
            ),
            "idle": AgentEntry("idle", 1003, 2, MeshGrant.default(2)),
        }
    )


def test_the_node_decides_from_the_uid() -> None:
    policy = agents()
    root = policy.caller(Peer(1, 0, 0))
    ops = policy.caller(Peer(2, 1001, 1001))
    scout = policy.caller(Peer(3, 1002, 1002))
    idle = policy.caller(Peer(4, 1003, 1003))
    stranger = policy.caller(Peer(5, 4242, 4242))
    for everyone in (root, stranger, ops):
        assert policy.refuse_send(everyone, (NODE_B, NODE_C), "anything") is None
        assert policy.refuse_topic(everyone, "anything") is None
    assert policy.reads(root) is None
    assert policy.reads(stranger) is None
    assert policy.refuse_send(scout, (NODE_B,), "jobs") is None
    assert policy.refuse_send(scout, (NODE_C,), "jobs", to_agent="ops") is None
    assert policy.refuse_send(scout, (NODE_B,), "jobs", to_agent="anyone") is None
    listed = f"'{NODE_B}', 'ops@{NODE_C}'"
    assert policy.refuse_send(scout, (NODE_C,), "jobs") == (
        f"agent scout (tier 2, uid 1002) may not send to {NODE_C}: its mesh.sendTo is {listed}"
    )
    assert policy.refuse_send(scout, (NODE_C,), "jobs", to_agent="scout") == (
        f"agent scout (tier 2, uid 1002) may not send to scout@{NODE_C}: its mesh.sendTo is "
        f"{listed}"
    )
    # receiveFrom: whose messages are kept from it, and why (the ledger's reason)
    assert policy.senders(None) is None
    assert policy.senders("ops") is None  # tier 0: everyone
    assert policy.senders("scout") == (f"ops@{NODE_C}",)
    assert policy.senders("idle") == ()
    assert policy.refuse_delivery("scout", "jobs", (NODE_C, "ops")) is None
    assert policy.refuse_delivery("scout", "jobs", (NODE_C, None)) == (
        f"agent scout does not receive from {NODE_C} (its mesh.receiveFrom is 'ops@{NODE_C}')"
    )
    assert policy.refuse_senders("scout", "jobs", [(NODE_B, None), (NODE_C, "spy")]) == (
        f"agent scout (tier 2, uid 1002) is not given messages on 'jobs' from {NODE_B}, "
        f"spy@{NODE_C}: its mesh.receiveFrom is 'ops@{NODE_C}' (they stay for the node's "
        "other readers)"
    )
    assert policy.refuse_send(scout, (NODE_B,), "other") == (
        "agent scout (tier 2, uid 1002) may not use topic 'other': its mesh.topics are 'jobs'"
    )
    reads = policy.reads(scout)
    assert reads is not None
    assert reads("jobs")
    assert not reads("other")
    assert policy.refuse_use(scout) is None
    refusal = policy.refuse_use(idle)
    assert refusal is not None
    assert refusal.startswith("agent idle (tier 2, uid 1003) has no mesh")
    assert policy.refuse_topic(idle, "jobs") == refusal  # the whole story, not "topic jobs"


def test_the_mesh_config_reads_agents_inline(tmp_path: Path) -> None:
    raw = {
        "listen": "127.0.0.1:7400",
        "agents": {
            "scout": {"uid": 1002, "tier": 2, "mesh": {"sendTo": ["*"], "topics": ["jobs"]}},
            "ops": {"uid": 1001, "tier": 0},
        },
    }
    with Section(raw, source="mesh.json") as cfg:
        config = parse(cfg)
    entries = config.settings.agents.entries
    assert entries["scout"].mesh == MeshGrant(("*",), ("jobs",))  # tier 2: receives nothing
    assert entries["ops"].mesh == MeshGrant.default(0)
    same_uid = {**raw, "agents": {"a": {"uid": 7, "tier": 1}, "b": {"uid": 7, "tier": 1}}}
    with (
        pytest.raises(ConfigError, match=r"mesh\.json: agents: .*same uid 7"),
        Section(same_uid, source="mesh.json") as cfg,
    ):
        parse(cfg)
    bad = {**raw, "agents": {"a": {"uid": 7, "tier": 1, "mesh": {"topics": ["no spaces"]}}}}
    with (
        pytest.raises(ConfigError, match=r"agents\.a\.mesh\.topics\[0\]"),
        Section(bad, source="mesh.json") as cfg,
    ):
        parse(cfg)


def test_the_mesh_config_reads_installed_specs(tmp_path: Path) -> None:
    (tmp_path / "guest.json").write_text(
        json.dumps(
            {
                "name": "guest",
                "command": ["/bin/true"],
                "tier": 2,
                "user": "nobody",
                "mesh": {"topics": ["jobs"]},
            }
        )
    )
    raw = {"listen": "127.0.0.1:7400", "agents": str(tmp_path)}
    with Section(raw, source="mesh.json") as cfg:
        entries = parse(cfg).settings.agents.entries
    assert list(entries) == ["guest"]
    assert entries["guest"].mesh == MeshGrant((), ("jobs",))
