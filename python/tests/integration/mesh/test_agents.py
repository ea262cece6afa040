"""Agents told apart on the control socket (issue 13, part 1: local identities and grants).

The daemon runs as root; each "agent" is a process under a uid of its own
(setpriv, numeric uids with no passwd entry), named in the node's ``agents``
config. What is checked is the daemon's decision from the kernel's
credentials: an agent sends and reads only within its mesh grant, cannot
acknowledge (delete) another agent's messages, a tier-2 agent without a
grant has no mesh, every refusal is a clear error and a ledger entry, and
the same holds after a restart.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from keel.ledger import Ledger

from .nodes import FAST, Node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run agents as other uids")

OPS, SCOUT, IDLE, READER, STRANGER = 61001, 61002, 61003, 61004, 61005

# Runs one control request as the given uid; prints {"ok": result} or {"error": [type, text]}.
CALL = """
import json, sys
from pathlib import Path
from keel.api import call
from keel.errors import ApiError
try:
    print(json.dumps({"ok": call(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))}))
except ApiError as exc:
    print(json.dumps({"error": [type(exc).__name__, str(exc)]}))
"""

# Subscribes on the binary stream as the given uid; prints what the daemon answered.
SUBSCRIBE = """
import sys
from keel.errors import Forbidden
from keel.mesh.client import MeshClient
try:
    with MeshClient(sys.argv[1]).subscribe(sys.argv[2]) as sub:
        print("subscribed", len(sub.recv(wait=0.2)))
except Forbidden as exc:
    print("refused:", exc)
"""


def as_uid(uid: int, script: str, *args: str) -> str:
    done = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def request(node: Node, uid: int, verb: str, args: dict[str, Any] | None = None) -> Any:
    return json.loads(as_uid(uid, CALL, str(node.socket), verb, json.dumps(args or {})))


def open_up(node: Node) -> None:
    for path in (node.directory.parent, node.directory):
        path.chmod(0o755)
    node.socket.chmod(0o666)


def agents(peer: str) -> dict[str, Any]:
    return {
        "ops": {"uid": OPS, "tier": 0},  # the tier's default: everything
        "scout": {"uid": SCOUT, "tier": 2, "mesh": {"sendTo": [peer], "topics": ["jobs"]}},
        "idle": {"uid": IDLE, "tier": 2},  # tier 2 without a grant: no mesh
        "reader": {"uid": READER, "tier": 1, "mesh": {"sendTo": [], "topics": ["reports.*"]}},
    }


@pytest.fixture
def nodes(mesh_nodes: Callable[..., Node], short_tmp: Path) -> tuple[Node, Node]:
    b = mesh_nodes("b").start()
    a = mesh_nodes(
        "a", ledger=short_tmp / "a-ledger.db", config={**FAST, "agents": agents(b.node_id)}
    ).start()
    b.join(a)
    a.wait_connected(b)
    open_up(a)
    return a, b


def refused(answer: Any) -> str:
    assert "error" in answer, answer
    kind, text = answer["error"]
    assert kind == "Forbidden", answer
    return str(text)


def payload(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_whoami_names_the_caller_from_the_kernel(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    scout = request(a, SCOUT, "whoami")["ok"]
    assert scout["agent"] == "scout"
    assert scout["tier"] == 2
    assert scout["uid"] == SCOUT
    assert scout["mesh"] == {"sendTo": [b.node_id], "topics": ["jobs"]}
    assert scout["caller"] == f"agent scout (uid {SCOUT})"
    assert not scout["operator"]
    stranger = request(a, STRANGER, "whoami")["ok"]
    assert stranger["agent"] is None
    assert stranger["mesh"] is None
    assert stranger["caller"] == f"uid {STRANGER} (not an agent)"
    root = a.client.whoami()
    assert root["agent"] is None
    assert root["operator"]
    assert root["caller"].startswith("root")
    listed = {entry["agent"]: entry for entry in a.client.agents()}
    assert set(listed) == {"ops", "scout", "idle", "reader"}
    assert listed["idle"]["mesh"] == {"sendTo": [], "topics": []}
    assert listed["ops"]["mesh"] == {"sendTo": ["*"], "topics": ["*"]}
    shown = a.cli("whoami")
    assert shown.returncode == 0, shown.stderr
    assert "you are:   root" in shown.stdout
    assert "* (the node)" in shown.stdout


def test_an_agent_sends_only_within_its_grant(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    send = {"to": b.node_id, "topic": "jobs", "data": payload("job 1")}
    assert "ok" in request(a, SCOUT, "send", send)
    assert "may not use topic 'other'" in refused(
        request(a, SCOUT, "send", {**send, "topic": "other"})
    )
    text = refused(request(a, READER, "send", {**send, "topic": "reports.daily"}))
    assert text == (
        f"agent reader (tier 1, uid {READER}) may not send to {b.node_id}: its mesh.sendTo is empty"
    )
    got = b.client.recv("jobs", wait=20)
    assert [m.data for m in got] == [b"job 1"]
    b.client.ack()
    assert b.client.recv("other") == []
    assert b.client.recv("reports.daily") == []


def test_a_tier_2_agent_without_a_grant_has_no_mesh(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    for verb, args in (
        ("send", {"to": b.node_id, "topic": "jobs", "data": payload("x")}),
        ("recv", {"topic": "jobs"}),
        ("stream", {}),
        ("ack", {"receipts": [1]}),
    ):
        text = refused(request(a, IDLE, verb, args))
        assert text.startswith(f"agent idle (tier 2, uid {IDLE}) has no mesh"), (verb, text)
    # still told who it is
    assert request(a, IDLE, "whoami")["ok"]["agent"] == "idle"


def test_an_agent_reads_and_acknowledges_only_its_topics(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    b.client.send(a.node_id, "ops.secret", b"for ops only")
    b.client.send(a.node_id, "reports.daily", b"for the reader")
    # the reader may not read ops' topic, on either channel
    assert "may not use topic 'ops.secret'" in refused(
        request(a, READER, "recv", {"topic": "ops.secret", "wait": 0})
    )
    assert as_uid(READER, SUBSCRIBE, str(a.socket), "ops.secret").startswith(
        f"refused: agent reader (tier 1, uid {READER}) may not use topic 'ops.secret'"
    )
    # ... nor delete it by acknowledging its receipt: root leases it to learn the receipt
    leased = a.client.call("recv", {"topic": "ops.secret", "wait": 20, "lease": 60})["messages"]
    assert [base64.b64decode(m["data"]) for m in leased] == [b"for ops only"]
    receipt = leased[0]["receipt"]
    assert request(a, READER, "ack", {"receipts": [receipt]})["ok"] == {"acked": 0}
    # the agent whose topic it is may
    assert request(a, OPS, "ack", {"receipts": [receipt]})["ok"] == {"acked": 1}
    # the reader reads its own topic
    got = request(a, READER, "recv", {"topic": "reports.daily", "wait": 20})["ok"]["messages"]
    assert [base64.b64decode(m["data"]) for m in got] == [b"for the reader"]
    assert as_uid(READER, SUBSCRIBE, str(a.socket), "reports.weekly") == "subscribed 0"


def test_refusals_reach_the_ledger_and_survive_a_restart(
    nodes: tuple[Node, Node], short_tmp: Path
) -> None:
    a, b = nodes
    send = {"to": b.node_id, "topic": "elsewhere", "data": payload("x")}
    first = refused(request(a, SCOUT, "send", send))
    a.stop()
    a.start()
    open_up(a)
    assert refused(request(a, SCOUT, "send", send)) == first
    assert request(a, SCOUT, "whoami")["ok"]["mesh"] == {"sendTo": [b.node_id], "topics": ["jobs"]}
    a.stop()  # the ledger's last entries are written by an orderly stop

    def entries() -> list[dict[str, Any]]:
        ledger = Ledger.open(short_tmp / "a-ledger.db")
        try:
            return [e.as_dict() for _, e in ledger.entries() if e.kind == "mesh-refused"]
        finally:
            ledger.close()

    recorded = entries()
    assert len(recorded) == 2  # once before the restart, once after
    for entry in recorded:
        assert entry["subject"] == "scout"
        assert entry["data"]["verb"] == "send"
        assert entry["data"]["reason"] == first


def test_the_agents_socket_serves_agents_only(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    # Tier-2 sandboxes hide /run/keel: their agents connect on a socket of their own,
    # open to every local user, where a caller that is no agent is refused.
    b = mesh_nodes("b").start()
    sock = short_tmp / "agents.sock"
    config = {**FAST, "agents": agents(b.node_id), "agent_socket": str(sock)}
    a = mesh_nodes("a", config=config).start()
    b.join(a)
    a.wait_connected(b)
    short_tmp.chmod(0o755)
    assert sock.stat().st_mode & 0o777 == 0o666

    def over(uid: int, verb: str, args: dict[str, Any] | None = None) -> Any:
        return json.loads(as_uid(uid, CALL, str(sock), verb, json.dumps(args or {})))

    assert over(SCOUT, "whoami")["ok"]["agent"] == "scout"
    assert "ok" in over(SCOUT, "send", {"to": b.node_id, "topic": "jobs", "data": payload("j")})
    assert refused(over(STRANGER, "whoami")) == (
        f"this socket is for the node's agents, and uid {STRANGER} runs none: "
        "use the node's control socket (docs/mesh.md, Agents)"
    )
    assert "may not use topic" in refused(over(SCOUT, "recv", {"topic": "other"}))
    # no administration there, whoever asks
    kind, text = over(OPS, "invite")["error"]
    assert kind == "BadRequest"
    assert "invite" in text
    assert [m.data for m in b.client.recv("jobs", wait=20)] == [b"j"]
    b.client.ack()
    a.stop()
    assert not sock.exists()
