"""Reserved topics (``keel.``) and sending on behalf of an agent: the node's decisions."""

from __future__ import annotations

from keel.agents.meshgrant import MeshGrant
from keel.agents.roster import AgentEntry
from keel.api import Peer
from keel.mesh.access import Agents, reserved

NODE_B = "b" * 32
NODE_C = "c" * 32


def agents() -> Agents:
    return Agents(
        {
            "ops": AgentEntry("ops", 1001, 0, MeshGrant.default(0)),
            "scout": AgentEntry("scout", 1002, 2, MeshGrant((NODE_B,), ("jobs",))),
            "idle": AgentEntry("idle", 1003, 2, MeshGrant.default(2)),
        }
    )


def test_reserved_topics_are_the_keel_prefix() -> None:
    assert reserved("keel.mcp.call")
    assert reserved("keel.")
    assert not reserved("keel")
    assert not reserved("keelx.mcp")
    assert not reserved("jobs.keel.x")


def test_no_agent_grant_covers_a_reserved_topic_not_even_everything() -> None:
    policy = agents()
    ops = policy.caller(Peer(2, 1001, 1001))  # mesh.topics "*"
    root = policy.caller(Peer(1, 0, 0))
    refusal = policy.refuse_topic(ops, "keel.mcp.answer")
    assert refusal is not None
    assert "are for keel's own daemons" in refusal
    assert policy.refuse_send(ops, (NODE_B,), "keel.mcp.call") == refusal.replace(
        "keel.mcp.answer", "keel.mcp.call"
    )
    reads = policy.reads(ops)
    assert reads is not None
    assert reads("jobs")
    assert not reads("keel.mcp.answer")
    assert policy.refuse_topic(root, "keel.mcp.answer") is None
    assert policy.reads(root) is None
    assert policy.refuse_delivery("ops", "jobs") is None
    assert policy.refuse_delivery("ops", "keel.mcp.call") is not None


def test_the_node_sends_as_its_agent_within_the_agents_send_to() -> None:
    policy = agents()
    root = policy.caller(Peer(1, 0, 0))
    daemon = policy.caller(Peer(9, 4242, 4242))  # keel's daemon user: the node itself
    for node_level in (root, daemon):
        behalf, refusal = policy.refuse_on_behalf(node_level, "scout", (NODE_B,), "keel.mcp.call")
        assert refusal is None  # a reserved topic: the agent's topics do not apply
        assert behalf.agent == "scout"
        assert behalf.uid == 1002
        assert behalf.pid == node_level.pid
        _, refusal = policy.refuse_on_behalf(node_level, "scout", (NODE_C,), "keel.mcp.call")
        assert refusal == (
            f"agent scout (tier 2, uid 1002) may not send to {NODE_C}: its mesh.sendTo is '{NODE_B}'"
        )
        # a topic that is not reserved: the agent's whole grant, as if it sent itself
        _, refusal = policy.refuse_on_behalf(node_level, "scout", (NODE_B,), "other")
        assert refusal is not None
        assert "may not use topic 'other'" in refusal
        assert policy.refuse_on_behalf(node_level, "scout", (NODE_B,), "jobs")[1] is None
        # a tier-2 agent without a mesh: nowhere, not even on a reserved topic
        _, refusal = policy.refuse_on_behalf(node_level, "idle", (NODE_B,), "keel.mcp.call")
        assert refusal is not None
        assert refusal.startswith("agent idle (tier 2, uid 1003) may not send to")
        _, refusal = policy.refuse_on_behalf(node_level, "ghost", (NODE_B,), "keel.mcp.call")
        assert refusal == "no agent 'ghost' on this node to send as"


def test_an_agent_may_not_send_as_another() -> None:
    policy = agents()
    ops = policy.caller(Peer(2, 1001, 1001))
    behalf, refusal = policy.refuse_on_behalf(ops, "scout", (NODE_B,), "keel.mcp.call")
    assert behalf == ops
    assert refusal is not None
    assert refusal.startswith("agent ops (tier 0, uid 1001) may not send as another agent")
    _, refusal = policy.refuse_on_behalf(ops, "ops", (NODE_B,), "jobs")
    assert refusal is not None  # not even as itself: as_agent is the node's
