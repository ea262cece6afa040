"""The node sending for its own agents (``as_agent``), and the topics reserved for keel (``keel.``).

As in test_agents: the daemons run as root, agents are processes under uids
of their own (setpriv). What the MCP gateway relies on across the mesh is
checked here at the mesh's level: a node-level caller's message sent as an
agent arrives carrying that agent (the receiver takes the node from the
session), within the agent's ``sendTo``; an agent can neither send as
another nor touch a reserved topic, even with a grant of every topic.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from keel.errors import Forbidden

from .nodes import FAST, Node
from .test_agents import IDLE, OPS, SCOUT, agents, open_up, refused, request

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run agents as other uids")


@pytest.fixture
def nodes(mesh_nodes: Callable[..., Node], short_tmp: Path) -> tuple[Node, Node]:
    b = mesh_nodes("b").start()
    a = mesh_nodes(
        "a", ledger=short_tmp / "a-ledger.db", config={**FAST, "agents": agents(b.node_id)}
    ).start()
    b.join(a)
    a.wait_connected(b)
    b.wait_connected(a)
    open_up(a)
    return a, b


def data(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_the_node_sends_as_its_agent_and_the_receiver_sees_that_agent(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    # root (the node itself) sends for scout on a reserved topic: scout's topics do not apply
    a.client.send(b.node_id, "keel.test", b"for scout", as_agent="scout")
    got = b.client.recv("keel.test", wait=20)
    assert [(m.data, m.agent, m.sender) for m in got] == [(b"for scout", "scout", a.node_id)]
    b.client.ack()
    # on any other topic, the agent's whole grant applies, as if it sent itself
    a.client.send(b.node_id, "jobs", b"job", as_agent="scout")
    with pytest.raises(Forbidden, match="may not use topic 'other'"):
        a.client.send(b.node_id, "other", b"x", as_agent="scout")
    got = b.client.recv("jobs", wait=20)
    assert [(m.data, m.agent) for m in got] == [(b"job", "scout")]


def test_an_agents_send_to_still_decides(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    # idle: tier 2 without a grant; even the node cannot carry its messages anywhere
    with pytest.raises(Forbidden, match=f"agent idle \\(tier 2, uid {IDLE}\\) may not send to"):
        a.client.send(b.node_id, "keel.test", b"x", as_agent="idle")
    with pytest.raises(Forbidden, match="no agent 'ghost' on this node to send as"):
        a.client.send(b.node_id, "keel.test", b"x", as_agent="ghost")


def test_an_agent_may_not_send_as_another_nor_use_reserved_topics(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    send = {"to": b.node_id, "topic": "keel.test", "data": data("x")}
    text = refused(request(a, OPS, "send", {**send, "as_agent": "scout"}))
    assert text.startswith(f"agent ops (tier 0, uid {OPS}) may not send as another agent")
    # ops has every topic ("*"), but not keel's
    text = refused(request(a, OPS, "send", send))
    assert "topics beginning 'keel.' are for keel's own daemons" in text
    assert "keel.test" in refused(request(a, OPS, "recv", {"topic": "keel.test"}))
    assert "ok" in request(a, OPS, "recv", {"topic": "jobs"})
    assert "keel.test" in refused(request(a, SCOUT, "send", send))
    # nothing of it was queued for b
    assert [p["queued"] for p in a.client.peers()] == [0]
