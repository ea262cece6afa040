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
from keel.mesh import packets
from keel.mesh.ids import new_message_id
from keel.mesh.packets import Ack, Msg

from .nodes import FAST, Node, wait_until
from .test_security import member

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
    assert scout["mesh"] == {"sendTo": [b.node_id], "receiveFrom": [], "topics": ["jobs"]}
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
    assert listed["idle"]["mesh"] == {"sendTo": [], "receiveFrom": [], "topics": []}
    assert listed["ops"]["mesh"] == {"sendTo": ["*"], "receiveFrom": ["*"], "topics": ["*"]}
    shown = a.cli("whoami")
    assert shown.returncode == 0, shown.stderr
    assert "you are:   root" in shown.stdout
    assert "* (the node)" in shown.stdout
    assert "read from: * (the node)" in shown.stdout


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
    assert request(a, SCOUT, "whoami")["ok"]["mesh"] == {
        "sendTo": [b.node_id],
        "receiveFrom": [],
        "topics": ["jobs"],
    }
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


# Sends as the given uid with the client library; prints the message id or the refusal.
SEND = """
import sys
from keel.errors import ApiError
from keel.mesh.client import MeshClient
try:
    print(MeshClient(sys.argv[1]).send(sys.argv[2], sys.argv[3], sys.argv[4].encode()))
except ApiError as exc:
    print(type(exc).__name__, exc)
"""

# Receives as the given uid: recv (JSON) or a subscription (the binary stream).
RECEIVE = """
import json, sys
from keel.mesh.client import MeshClient
mesh = MeshClient(sys.argv[1])
if sys.argv[3] == "recv":
    got = mesh.recv(sys.argv[2], wait=float(sys.argv[4]))
    mesh.ack()
else:
    with mesh.subscribe(sys.argv[2]) as sub:
        got = sub.recv(wait=float(sys.argv[4]))
        sub.ack()
print(json.dumps([[m.data.decode(), m.agent, m.sender] for m in got]))
"""


def two_nodes_with_agents(mesh_nodes: Callable[..., Node], short_tmp: Path) -> tuple[Node, Node]:
    """a and b, each knowing the same agents (ops everywhere, scout and notes on jobs)."""
    roster = {
        "ops": {"uid": OPS, "tier": 0},
        "scout": {"uid": SCOUT, "tier": 2, "mesh": {"sendTo": ["*"], "topics": ["jobs"]}},
        "notes": {"uid": READER, "tier": 1, "mesh": {"topics": ["jobs"]}},
    }
    b = mesh_nodes("b", config={**FAST, "agents": roster}).start()
    a = mesh_nodes("a", config={**FAST, "agents": roster}).start()
    b.join(a)
    a.wait_connected(b)
    open_up(a)
    open_up(b)
    return a, b


def received(node: Node, uid: int, how: str, wait: float) -> list[list[Any]]:
    return list(json.loads(as_uid(uid, RECEIVE, str(node.socket), "jobs", how, str(wait))))


@pytest.mark.parametrize("how", ["recv", "subscribe"])
def test_a_message_carries_its_sending_agent_and_reaches_only_its_addressee(
    mesh_nodes: Callable[..., Node], short_tmp: Path, how: str
) -> None:
    a, b = two_nodes_with_agents(mesh_nodes, short_tmp)
    sent = as_uid(SCOUT, SEND, str(a.socket), f"notes@{b.node_id}", "jobs", "for notes")
    assert len(sent) == 32, sent
    as_uid(SCOUT, SEND, str(a.socket), b.node_id, "jobs", "for the topic")
    # ops (tier 0, every topic) reads jobs on b, but not what is for notes
    got = received(b, OPS, how, 20)
    assert got == [["for the topic", "scout", a.node_id]]
    # notes gets its own, with the agent that sent it as a's node stamped it
    assert received(b, READER, how, 20) == [["for notes", "scout", a.node_id]]
    # the node itself (root) reads what is for no agent only: nothing is left
    assert b.client.recv("jobs") == []


def test_messages_for_agents_a_node_lacks_are_dead_letters_with_the_reason(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    a, b = two_nodes_with_agents(mesh_nodes, short_tmp)
    a.client.send(f"ghost@{b.node_id}", "jobs", b"to nobody")
    a.client.send(f"notes@{b.node_id}", "other", b"off its topics")

    def letters() -> dict[str, str]:
        return {d["topic"]: d["reason"] for d in a.client.dead_letters()}

    found = wait_until(lambda: len(letters()) == 2 and letters(), timeout=20, what="2 dead letters")
    assert found == {
        "jobs": "rejected: no agent ghost on this node",
        "other": "rejected: agent notes does not take topic 'other' (its mesh.topics)",
    }


def test_a_node_speaks_only_for_its_own_agents(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    # A member that speaks the wire itself names its message's agent "ops": a takes the
    # agent from the message but the node from the Noise session, so its readers see
    # ops of the forger's node, never ops of b.
    a, b = two_nodes_with_agents(mesh_nodes, short_tmp)
    forger = member(a)
    message_id = new_message_id()
    forger.send_packet(Msg(message_id, "jobs", 2**31, b"ops says: wire the money", None, "ops"))
    forger.read_until(lambda e: any(isinstance(p, Ack) for p in forger.received()))
    got = received(a, OPS, "recv", 20)
    assert got == [["ops says: wire the money", "ops", forger.identity.node_id]]
    assert forger.identity.node_id != b.node_id
    # and a name that is no agent's is a protocol error: the connection ends
    bad = packets.encode(Msg(new_message_id(), "jobs", 2**31, b"", None, "ops"))
    forger.sock.sendall(
        forger.session.send_message(bad.replace(b'"agent":"ops"', b'"agent":"OPS"'))
    )
    forger.closed()
    a.wait_log("MSG agent must be an agent name")


def test_a_peer_from_before_agents_gets_no_agent_fields_and_no_message_for_an_agent(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    # The raw peer announces no application revision (1): it would refuse a MSG with
    # agent fields as malformed, so a sends it none, and dead-letters what is for an agent.
    a, _ = two_nodes_with_agents(mesh_nodes, short_tmp)
    old = member(a)
    peer = old.identity.node_id
    sent = as_uid(SCOUT, SEND, str(a.socket), peer, "jobs", "from scout")
    assert len(sent) == 32, sent
    old.read_until(lambda e: any(isinstance(p, Msg) for p in old.received()))
    (message,) = [p for p in old.received() if isinstance(p, Msg)]
    assert (message.payload, message.agent, message.to) == (b"from scout", None, None)
    a.client.send(f"notes@{peer}", "jobs", b"for an agent there")
    letter = wait_until(a.client.dead_letters, timeout=20, what="the dead letter")
    assert letter[0]["reason"].startswith(
        "the recipient's keel is too old for messages to an agent (application revision 3)"
    )


def test_each_node_lists_the_agents_its_peers_announced(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    a, b = two_nodes_with_agents(mesh_nodes, short_tmp)
    c = mesh_nodes("c", config={**FAST, "agents": {"idle": {"uid": IDLE, "tier": 2}}}).start()
    c.join(a)
    c.wait_connected(a, b)
    listed = {(x["agent"], x["node"]) for x in a.client.agents() if x["uid"] is None}
    # b's agents, each with a grant; c's only agent has no mesh, so c names none
    assert listed == {("ops", b.node_id), ("scout", b.node_id), ("notes", b.node_id)}
    shown = a.cli("agents")
    assert shown.returncode == 0, shown.stderr
    assert f"(its node's)  {b.node_id}" in shown.stdout


# -- sendTo and receiveFrom naming agents (issue 13: policy per agent)


def grants_both_ways(mesh_nodes: Callable[..., Node], short_tmp: Path) -> tuple[Node, Node]:
    """a sends (ops: everything; scout; narrow: to notes@b only), b reads (picky: from
    scout@a only; notes: the tier's default, everyone). b keeps a ledger."""
    b = mesh_nodes("b", ledger=short_tmp / "b-ledger.db").start()
    a_roster = {
        "ops": {"uid": OPS, "tier": 0},
        "scout": {"uid": SCOUT, "tier": 2, "mesh": {"sendTo": ["*"], "topics": ["jobs"]}},
        "narrow": {
            "uid": IDLE,
            "tier": 2,
            "mesh": {"sendTo": [f"notes@{b.node_id}"], "topics": ["jobs"]},
        },
    }
    a = mesh_nodes("a", ledger=short_tmp / "a-ledger.db", config={**FAST, "agents": a_roster})
    a.start()
    b.stop()  # b learns a's id, then names it in picky's receiveFrom
    b.settings["agents"] = {
        "picky": {
            "uid": READER,
            "tier": 1,
            "mesh": {"topics": ["jobs"], "receiveFrom": [f"scout@{a.node_id}"]},
        },
        "notes": {"uid": OPS, "tier": 1},
    }
    b.start()
    b.join(a)
    a.wait_connected(b)
    open_up(a)
    open_up(b)
    return a, b


def refusals(ledger: Path, kind: str = "mesh-refused") -> list[dict[str, Any]]:
    opened = Ledger.open(ledger)
    try:
        return [e.as_dict() for _, e in opened.entries() if e.kind == kind]
    finally:
        opened.close()


@pytest.mark.parametrize("how", ["recv", "subscribe"])
def test_an_agent_reads_only_what_its_receive_from_names(
    mesh_nodes: Callable[..., Node], short_tmp: Path, how: str
) -> None:
    a, b = grants_both_ways(mesh_nodes, short_tmp)
    for uid, text in ((OPS, "from ops"), (SCOUT, "from scout")):
        sent = as_uid(uid, SEND, str(a.socket), b.node_id, "jobs", text)
        assert len(sent) == 32, sent
    wait_until(lambda: b.status()["inbox"] == 2, timeout=20, what="both messages at b")
    # picky takes scout's message only; ops' stays for the node's other readers
    assert received(b, READER, how, 20) == [["from scout", "scout", a.node_id]]
    assert b.status()["inbox"] == 1
    assert received(b, OPS, how, 20) == [["from ops", "ops", a.node_id]]
    grant = request(b, READER, "whoami")["ok"]["mesh"]
    assert grant == {"sendTo": ["*"], "receiveFrom": [f"scout@{a.node_id}"], "topics": ["jobs"]}
    # a message addressed to picky by a sender it does not receive from is refused
    # for good: the sender's dead letter says why
    a.client.send(f"picky@{b.node_id}", "jobs", b"from a itself")
    (letter,) = wait_until(a.client.dead_letters, timeout=20, what="the dead letter")
    assert letter["reason"] == (
        f"rejected: agent picky does not receive from {a.node_id} "
        f"(its mesh.receiveFrom is 'scout@{a.node_id}')"
    )
    # the same policy after a restart (the grant is the config's, nothing else)
    b.stop()
    b.start()
    a.wait_connected(b)
    open_up(b)
    assert request(b, READER, "whoami")["ok"]["mesh"] == grant
    as_uid(OPS, SEND, str(a.socket), b.node_id, "jobs", "again from ops")
    wait_until(lambda: b.status()["inbox"] == 1, timeout=20, what="ops' second message at b")
    assert received(b, READER, how, 0.2) == []
    assert b.status()["inbox"] == 1
    b.stop()  # the ledger's last entries are written by an orderly stop
    recorded = refusals(short_tmp / "b-ledger.db")
    assert len(recorded) == 2, recorded  # one per daemon run: rate-limited, not per message
    for entry in recorded:
        assert entry["subject"] == "picky"
        assert entry["data"]["verb"] == "read"
        assert entry["data"]["reason"] == (
            f"agent picky (tier 1, uid {READER}) is not given messages on 'jobs' from "
            f"ops@{a.node_id}: its mesh.receiveFrom is 'scout@{a.node_id}' "
            "(they stay for the node's other readers)"
        )


def test_send_to_an_agent_allows_that_agent_only(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    a, b = grants_both_ways(mesh_nodes, short_tmp)
    sent = as_uid(IDLE, SEND, str(a.socket), f"notes@{b.node_id}", "jobs", "for notes")
    assert len(sent) == 32, sent
    for to in (f"picky@{b.node_id}", b.node_id):
        text = as_uid(IDLE, SEND, str(a.socket), to, "jobs", "not for them")
        assert text == (
            f"Refused agent narrow (tier 2, uid {IDLE}) may not send to {to}: "
            f"its mesh.sendTo is 'notes@{b.node_id}'"
        )
    assert received(b, OPS, "recv", 20) == [["for notes", "narrow", a.node_id]]
    listed = a.cli("agents")
    assert listed.returncode == 0, listed.stderr
    assert f"notes@{b.node_id}" in listed.stdout
    assert "READ FROM" in listed.stdout
    # both ledgers say which agent sent it, and to which agent
    a.stop()
    b.stop()
    for ledger, kind in (("a-ledger.db", "sent-batch"), ("b-ledger.db", "received-batch")):
        (entry,) = refusals(short_tmp / ledger, kind)
        assert entry["data"]["agents"] == ["narrow"]
        (group,) = entry["data"]["groups"]
        assert (group["agent"], group["to_agent"], group["ids"]) == ("narrow", "notes", [sent])


# Subscribes as the given uid, says so, then prints what the first DELIVER brought.
LIVE = """
import json, sys
from keel.mesh.client import MeshClient
with MeshClient(sys.argv[1]).subscribe("jobs") as sub:
    print("subscribed", flush=True)
    got = sub.recv(wait=20)
    sub.ack()
print(json.dumps([[m.data.decode(), m.agent, m.sender] for m in got]), flush=True)
"""


def test_a_subscriber_is_not_handed_what_its_receive_from_refuses(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    # picky subscribes before the messages arrive, so they are handed from the peer's
    # batch (not read from the inbox): ops' message, sent first, is passed over and stored.
    a, b = grants_both_ways(mesh_nodes, short_tmp)
    listener = subprocess.Popen(
        ["setpriv", f"--reuid={READER}", f"--regid={READER}", "--clear-groups",
         sys.executable, "-c", LIVE, str(b.socket)],
        stdout=subprocess.PIPE, text=True, cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "subscribed"
        as_uid(OPS, SEND, str(a.socket), b.node_id, "jobs", "from ops")
        as_uid(SCOUT, SEND, str(a.socket), b.node_id, "jobs", "from scout")
        got = json.loads(listener.stdout.readline())
        assert listener.wait(timeout=30) == 0
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert got == [["from scout", "scout", a.node_id]]
    wait_until(lambda: b.status()["inbox"] == 1, timeout=20, what="ops' message kept at b")
    assert received(b, OPS, "recv", 20) == [["from ops", "ops", a.node_id]]


def test_an_agent_cannot_acknowledge_a_message_addressed_to_another(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    # ops (tier 0) may read every topic, but a message for notes@b is notes' alone:
    # ops acknowledging its receipt deletes nothing (receipts are guessable numbers).
    a, b = two_nodes_with_agents(mesh_nodes, short_tmp)
    sent = as_uid(SCOUT, SEND, str(a.socket), f"notes@{b.node_id}", "jobs", "for notes")
    assert len(sent) == 32, sent
    got = request(b, READER, "recv", {"topic": "jobs", "wait": 20, "lease": 60})["ok"]["messages"]
    assert [m["id"] for m in got] == [sent]
    receipt = got[0]["receipt"]
    assert request(b, OPS, "ack", {"receipts": [receipt]})["ok"] == {"acked": 0}
    assert request(b, OPS, "recv", {"topic": "jobs", "ack": [receipt]})["ok"]["messages"] == []
    assert b.status()["inbox"] == 1
    assert request(b, READER, "ack", {"receipts": [receipt]})["ok"] == {"acked": 1}
