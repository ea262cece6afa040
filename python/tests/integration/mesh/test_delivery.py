"""Delivery through real daemons on loopback: exactly once across SIGKILL, TTLs, back-pressure."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from keel.api import call as api_call
from keel.errors import ApiError
from keel.ledger import Ledger
from keel.ledger.core import InclusionProof
from keel.mesh import audit
from keel.mesh.client import MeshClient, Received
from keel.mesh.encoding import b64u_decode, b64u_encode
from keel.mesh.invite import TOKEN_PREFIX, InviteToken

from .nodes import FAST, Node, wait_until


def collect(
    client: MeshClient, topic: str, want: set[bytes], timeout: float = 60
) -> Counter[bytes]:
    """Receive until every payload in ``want`` came; rides out the daemon restarting."""
    got: Counter[bytes] = Counter()
    deadline = time.monotonic() + timeout
    while not want <= set(got) and time.monotonic() < deadline:
        try:
            batch: list[Received] = client.recv(topic, max=500, wait=0.5)
        except ApiError:
            time.sleep(0.1)  # the daemon is down for the moment
            continue
        got.update(m.data for m in batch)
    client.ack()
    return got


def test_messages_both_ways_with_the_cli(pair: tuple[Node, Node]) -> None:
    a, b = pair
    sent = a.cli("send", b.node_id, "--topic", "greet", "hello b")
    assert sent.returncode == 0, sent.stderr
    message_id = sent.stdout.strip()
    assert len(message_id) == 32
    piped = b.cli("send", a.node_id, "--topic", "greet", "-", input=b"\xff\x00binary")
    assert piped.returncode == 0, piped.stderr
    got = b.cli("recv", "--topic", "greet", "--count", "1", "--timeout", "20", "--json")
    assert got.returncode == 0, got.stderr
    line = json.loads(got.stdout)
    assert line == {"id": message_id, "from": a.node_id, "topic": "greet", "data": "hello b"}
    raw = a.cli("recv", "--topic", "greet", "--count", "1", "--timeout", "20", "--json")
    assert json.loads(raw.stdout)["data_base64"] == "/wBiaW5hcnk="
    # nothing more: a timeout with a count not reached is an error, and says so
    empty = b.cli("recv", "--topic", "greet", "--count", "1", "--timeout", "0.5")
    assert empty.returncode == 1
    assert "timed out after 0.5 s with 0 of 1 messages" in empty.stderr
    # --timeout alone just stops
    assert b.cli("recv", "--topic", "greet", "--timeout", "0.3").returncode == 0


def test_cli_errors_are_one_clear_line(
    pair: tuple[Node, Node], mesh_nodes: Callable[..., Node]
) -> None:
    a, b = pair
    cases = [
        (a.cli("send", "nonsense", "--topic", "t", "x"), "is not a node id"),
        (a.cli("send", a.node_id, "--topic", "t", "x"), "own id"),
        (a.cli("send", "a" * 32, "--topic", "t", "x"), "is not a member"),
        (a.cli("send", b.node_id, "--topic", "bad topic", "x"), "topic"),
        (a.cli("recv", "--topic", "t", "--count", "0"), "--count must be at least 1"),
        (a.cli("room", "send", "nope", "--topic", "t", "x"), "no room 'nope'"),
        (mesh_nodes("idle").cli("peers"), "is `keel mesh serve` running"),
        # Over the limit, refused before anything is sent: 17 MiB from stdin, and one byte over.
        (
            a.cli("send", b.node_id, "--topic", "t", "-", input=b"x" * (17 << 20)),
            "a message carries at most 983,040 bytes (960 KiB); stdin holds more",
        ),
        (
            a.cli("send", b.node_id, "--topic", "t", "-", input=b"x" * 983_041),
            "a message carries at most 983,040 bytes (960 KiB); stdin holds more",
        ),
        (
            a.cli("room", "send", "r", "--topic", "t", "-", input=b"x" * 983_041),
            "a message carries at most 983,040 bytes (960 KiB)",
        ),
        (a.cli("send", "a" * 100_000, "--topic", "t", "x"), "to 'aaaaaaaaa"),
    ]
    for value in ("0", "-1", "nan", "inf", "1e400", "315360001"):
        cases.append((a.cli("invite", f"--ttl={value}"), "--ttl must be a number of seconds"))
    for value in ("-1", "nan", "inf", "-inf"):
        cases.append((a.cli("recv", "--topic", "t", f"--timeout={value}"), "--timeout must be"))
    cases.append((a.cli("invite", "--uses", "0"), "--uses must be 1 to 1000000"))
    for done, text in cases:
        assert done.returncode in (1, 2), done
        assert text in done.stderr, done.stderr
        assert done.stderr.startswith("keel: error: "), done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr) < 300, done.stderr  # long values are cut, not echoed
    # A message of exactly the limit goes.
    limit = a.cli("send", b.node_id, "--topic", "big", "-", input=b"y" * 983_040)
    assert limit.returncode == 0, limit.stderr
    for node in (a, b):
        assert "Traceback" not in node.log()


def test_peers_and_ids(pair: tuple[Node, Node]) -> None:
    a, b = pair
    assert a.cli("id").stdout.strip() == a.node_id
    listed = json.loads(a.cli("peers", "--json").stdout)
    assert [p["id"] for p in listed] == [b.node_id]
    assert listed[0]["connected"] is True
    assert listed[0]["addresses"] == [b.address]
    assert listed[0]["last_seen"] > time.time() - 60
    table = a.cli("peers").stdout
    assert b.node_id in table
    assert "yes" in table
    status = a.cli("status").stdout
    assert f"node:      {a.node_id}" in status
    assert "connected: 1" in status
    assert "ledger:    off" in status  # the tests' nodes run without one
    service = json.loads(a.cli("status", "--json").stdout)["service"]
    assert (service["name"], service["ledger"]["state"]) == ("mesh", "off")


@pytest.mark.parametrize("size", [0, 40 << 10], ids=["small", "blob-files"])
def test_exactly_once_when_either_daemon_is_killed_mid_stream(
    pair: tuple[Node, Node], size: int
) -> None:
    a, b = pair
    payloads = [f"message {i}".encode().ljust(size, b".") for i in range(300)]
    receiver = MeshClient(b.socket, timeout=5)
    sender = MeshClient(a.socket, timeout=5)
    result: dict[str, Counter[bytes]] = {}

    def receive() -> None:
        result["got"] = collect(receiver, "stream", set(payloads), timeout=120)

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        for i, payload in enumerate(payloads):
            if i == 100:
                a.kill()  # the sender's daemon dies with messages queued and in flight
                a.start()
            if i == 200:
                b.kill()  # the receiver's daemon dies while the receiver reads
                b.start()
            sender.send(b.node_id, "stream", payload, retry=30)
    finally:
        thread.join(timeout=150)
    got = result["got"]
    assert set(got) == set(payloads)
    assert all(count == 1 for count in got.values()), [p for p, c in got.items() if c > 1]
    wait_until(lambda: a.status()["outbox"] == 0, timeout=30, what="a's outbox to drain")
    assert b.status()["inbox"] == 0


@pytest.mark.parametrize("size", [0, 40 << 10], ids=["small", "blob-files"])
def test_queued_messages_survive_restarts_of_the_sender(pair: tuple[Node, Node], size: int) -> None:
    a, b = pair
    b.stop()
    ids = [a.client.send(b.node_id, "later", f"{i}".encode().ljust(size)) for i in range(20)]
    assert a.status()["outbox"] == 20
    a.kill()
    a.start()
    assert a.status()["outbox"] == 20
    b.start()
    got = collect(b.client, "later", {f"{i}".encode().ljust(size) for i in range(20)})
    assert sum(got.values()) == 20
    assert len(set(ids)) == 20


def test_ttl_expiry_makes_a_dead_letter(pair: tuple[Node, Node]) -> None:
    a, b = pair
    b.stop()
    message_id = a.client.send(b.node_id, "t", b"too late", ttl=1)
    wait_until(lambda: a.client.call("dead_letters"), timeout=15, what="a dead letter")
    letter = a.client.call("dead_letters")[0]
    assert letter["id"] == message_id
    assert letter["reason"] == "expired"
    assert letter["to"] == b.node_id
    assert a.status()["outbox"] == 0
    a.wait_log(f"message {message_id} to {b.node_id} is a dead letter: expired")
    b.start()
    b.wait_connected(a)
    # a marker sent now is all b gets: a's outbox held nothing else
    marker = a.client.send(b.node_id, "t", b"marker")
    got = wait_until(lambda: b.client.recv("t", max=10, wait=1), timeout=20, what="the marker")
    assert [m.id for m in got] == [marker]
    wait_until(lambda: a.status()["outbox"] == 0, timeout=20, what="a's outbox to drain")
    assert b.client.recv("t", max=10) == []  # whatever a delivered is in b's inbox by now


def test_a_full_outbox_pushes_back(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a", config={**FAST, "max_outbox_per_peer": 5}).start()
    b = mesh_nodes("b").start()
    b.join(a)
    b.stop()
    for i in range(5):
        a.client.send(b.node_id, "t", f"{i}".encode())
    refused = a.cli("send", b.node_id, "--topic", "t", "one too many")
    assert refused.returncode == 1
    assert f"outbox for {b.node_id} is full (5 messages waiting)" in refused.stderr
    b.start()
    got = collect(b.client, "t", {f"{i}".encode() for i in range(5)})
    assert sum(got.values()) == 5
    wait_until(lambda: a.status()["outbox"] == 0, timeout=20, what="the outbox to drain")
    assert a.cli("send", b.node_id, "--topic", "t", "room again").returncode == 0


def test_a_full_inbox_slows_the_sender_down_without_losing_anything(
    mesh_nodes: Callable[..., Node],
) -> None:
    a = mesh_nodes("a").start()
    b = mesh_nodes("b", config={**FAST, "max_inbox": 3}).start()
    b.join(a)
    a.wait_connected(b)
    ids = a.client.send_many([(b.node_id, "t", f"{i}".encode()) for i in range(10)])
    wait_until(lambda: b.status()["inbox"] == 3, timeout=20, what="b's inbox to fill")
    # a offered the other 7 at least twice (its first try and a retry): b took none of them
    wait_until(lambda: b.status()["answered_busy"] >= 14, timeout=30, what="a retry, refused")
    assert b.status()["inbox"] == 3
    assert a.status()["outbox"] == 7  # held back, not lost
    got = collect(b.client, "t", {f"{i}".encode() for i in range(10)})
    assert sum(got.values()) == 10
    assert len(ids) == 10


def test_one_connection_per_pair_even_when_both_dial(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a").start()
    b = mesh_nodes("b").start()
    c = mesh_nodes("c").start()
    b.join(a)
    c.join(b)  # c learns a through b and both dial each other
    for node in (a, b, c):
        node.wait_connected(*[n for n in (a, b, c) if n is not node])
    ports = {int(n.address.rpartition(":")[2]) for n in (a, b, c)}

    def accepted() -> list[str]:
        listing = subprocess.run(
            ["ss", "-Htn", "state", "established"], capture_output=True, text=True, check=True
        ).stdout
        return [
            line
            for line in listing.splitlines()
            if int(line.split()[2].rpartition(":")[2]) in ports
            and line.split()[2].startswith("127.0.0.1")
            and line.split()[3].startswith("127.0.0.1")
        ]

    # Duplicates are closed as both ends notice them; then one per pair stays.
    wait_until(lambda: len(accepted()) == 3, timeout=30, what="one connection per pair")
    for node in (a, b, c):
        assert len(node.connected()) == 2
    assert len(accepted()) == 3


def test_rooms_fan_out_and_a_removed_member_receives_nothing_more(
    mesh_nodes: Callable[..., Node],
) -> None:
    a, b, c = (mesh_nodes(n).start() for n in "abc")
    b.join(a)
    c.join(a)
    a.wait_connected(b, c)
    created = a.cli("room", "create", "ops", b.node_id, "--json")
    assert created.returncode == 0, created.stderr
    room = json.loads(created.stdout)["room"]
    added = a.cli("room", "add", "ops", c.node_id, "--json")
    assert {m["id"] for m in json.loads(added.stdout)["members"]} == {
        a.node_id,
        b.node_id,
        c.node_id,
    }
    wait_until(
        lambda: (
            b.client.rooms() and c.client.rooms() and b.client.room_members(room)["version"] == 2
        ),
        timeout=15,
        what="b and c to learn the room",
    )
    members = json.loads(c.cli("room", "members", room, "--json").stdout)
    assert members["owner"] == a.node_id
    sent = b.cli("room", "send", "ops", "--topic", "chat", "hi all")
    assert sent.returncode == 0, sent.stderr
    for node in (a, c):
        got = collect(node.client, "chat", {b"hi all"})
        assert got == Counter({b"hi all": 1})
    line = json.loads(c.cli("recv", "--topic", "chat", "--timeout", "0.2", "--json").stdout or "{}")
    assert line == {}
    # c goes offline with a message queued for it; then a removes c from the room
    c.stop()
    b.client.room_send(room, "chat", b"while c is away")
    removed = a.cli("room", "remove", room, c.node_id)
    assert removed.returncode == 0, removed.stderr
    wait_until(
        lambda: b.client.room_members(room)["version"] == 3,
        timeout=15,
        what="b to learn c's removal",
    )
    wait_until(lambda: b.status()["outbox"] == 0, timeout=15, what="b to drop c's copies")
    b.client.room_send(room, "chat", b"after c left")
    c.start()
    c.wait_connected(a, b)
    got = collect(a.client, "chat", {b"while c is away", b"after c left"})
    assert set(got) == {b"while c is away", b"after c left"}
    # b queued nothing more for c (its copies were dropped): a marker is all c gets
    marker = b.client.send(c.node_id, "chat", b"marker")
    got_c = wait_until(lambda: c.client.recv("chat", max=10, wait=1), timeout=20, what="marker")
    assert [m.id for m in got_c] == [marker]
    wait_until(lambda: b.status()["outbox"] == 0, timeout=20, what="b's outbox to drain")
    assert c.client.recv("chat", max=10) == []  # whatever b delivered is in c's inbox by now
    not_member = c.cli("room", "send", room, "--topic", "chat", "let me in")
    assert not_member.returncode == 1
    assert "not a member of room ops" in not_member.stderr
    b.wait_log("is a dead letter: recipient removed")


def test_only_the_owner_changes_a_room(pair: tuple[Node, Node]) -> None:
    a, b = pair
    room = a.client.room_create("ops", [b.node_id])["room"]
    wait_until(b.client.rooms, timeout=10, what="b to learn the room")
    done = b.cli("room", "remove", room, a.node_id)
    assert done.returncode == 1
    assert "only its owner changes it" in done.stderr


def test_no_payload_byte_reaches_the_ledger(mesh_nodes: Callable[..., Node], short_tmp) -> None:
    ledger_a, ledger_b = short_tmp / "a-ledger.db", short_tmp / "b-ledger.db"
    a = mesh_nodes("a", ledger=ledger_a).start()
    b = mesh_nodes("b", ledger=ledger_b).start()
    b.join(a)
    a.wait_connected(b)
    secret = b"PAYLOAD-" + bytes.fromhex("deadbeefcafebabe") * 8
    room = a.client.room_create("r", [b.node_id])["room"]
    wait_until(b.client.rooms, timeout=10, what="the room to reach b")
    a.client.send(b.node_id, "secrets", secret)
    a.client.room_send(room, "secrets", secret)
    b.stop()
    a.client.send(b.node_id, "secrets", secret, ttl=0.5)  # will be a dead letter
    wait_until(lambda: a.client.call("dead_letters"), timeout=10, what="the dead letter")
    b.start()
    got = collect(b.client, "secrets", {secret})
    assert got[secret] == 2
    a.stop()
    b.stop()
    import base64

    forms = [
        secret,
        base64.b64encode(secret),
        secret.hex().encode(),
        b"deadbeefcafebabe",
        base64.b64encode(secret[8:20]),
    ]
    kinds: set[str] = set()
    for path in short_tmp.glob("*-ledger.db*"):
        content = path.read_bytes()
        for form in forms:
            assert form not in content, f"{form!r} found in {path}"
    for path in (ledger_a, ledger_b):
        ledger = Ledger.open(path)
        try:
            for _, entry in ledger.entries():
                kinds.add(entry.kind)
        finally:
            ledger.close()
    assert {
        "sent-batch",
        "delivered-batch",
        "received-batch",
        "dead-letter-batch",
        "member-join",
    } <= kinds
    assert not {"sent", "delivered", "received", "dead-letter"} & kinds  # no entry per message


def batch_entries(path: Path) -> dict[tuple[str, str], list[int]]:
    """Where each message is named, by (stage, id): the indices of the batch entries."""
    named: dict[tuple[str, str], list[int]] = {}
    with Ledger.open(path) as ledger:
        for index, entry in ledger.entries():
            if entry.kind in audit.STAGE_OF_KIND:
                for message in audit.messages(entry.kind, entry.data):
                    named.setdefault((message["stage"], message["id"]), []).append(index)
    return named


def test_every_message_is_provable_in_the_ledger(
    mesh_nodes: Callable[..., Node], short_tmp: Path
) -> None:
    """Batched metadata: each message in one entry per stage, found and proven; SIGTERM loses none."""
    ledger_a, ledger_b = short_tmp / "a-ledger.db", short_tmp / "b-ledger.db"
    a = mesh_nodes("a", ledger=ledger_a).start()
    b = mesh_nodes("b", ledger=ledger_b).start()
    b.join(a)
    a.wait_connected(b)
    count = audit.MAX_MESSAGES + 44  # more than one entry's worth
    with a.client.sender(retry=60) as out:
        ids = [out.send(b.node_id, "audit", b"m%d" % n) for n in range(count)]
    got = collect(b.client, "audit", {b"m%d" % n for n in range(count)})
    assert sum(got.values()) == count
    wait_until(lambda: a.status()["outbox"] == 0, timeout=30, what="a's outbox to drain")
    assert a.stop() == 0  # SIGTERM at once: the batches still open are written on the way out
    assert b.stop() == 0
    sent, received = batch_entries(ledger_a), batch_entries(ledger_b)
    for message_id in ids:
        assert len(sent["sent", message_id]) == 1, message_id
        assert len(sent["delivered", message_id]) == 1, message_id
        assert len(received["received", message_id]) == 1, message_id
    assert len({sent["sent", i][0] for i in ids}) >= 2  # the batches were bounded
    with Ledger.open(ledger_a) as ledger:
        index = sent["delivered", ids[-1]][0]
        ((_, entry),) = ledger.entries(index, index + 1)
        assert entry.subject == b.node_id
        (message,) = [m for m in audit.messages(entry.kind, entry.data) if m["id"] == ids[-1]]
        assert message == {"stage": "delivered", "id": ids[-1], "from": a.node_id,
                           "to": b.node_id, "topic": "audit", "room": None,
                           "size": len(b"m%d" % (count - 1))}  # fmt: skip
    # What an auditor does: find the entries naming the id, prove one, check the proof.
    found = subprocess.run(
        [sys.executable, "-m", "keel", "ledger", "search", ids[-1], "--db", str(ledger_a),
         "--json", "--source", "mesh"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = [json.loads(line) for line in found.stdout.splitlines()]
    assert sorted(e["kind"] for e in lines) == ["delivered-batch", "sent-batch"]
    assert index in [e["index"] for e in lines]
    proof = subprocess.run(
        [sys.executable, "-m", "keel", "ledger", "prove", "inclusion", str(index),
         "--db", str(ledger_a)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    document = json.loads(proof.stdout)
    (line,) = [e for e in lines if e["index"] == index]
    assert document["leafHash"] == line["leafHash"]
    InclusionProof.from_json(document).verify()


def test_a_failing_ledger_does_not_stop_the_mesh(
    mesh_nodes: Callable[..., Node], short_tmp
) -> None:
    bogus = short_tmp / "not-a-ledger.db"
    bogus.write_bytes(b"certainly not SQLite" * 100)
    a = mesh_nodes("a", ledger=bogus).start(timeout=20)
    b = mesh_nodes("b").start()
    b.join(a)
    a.wait_connected(b)
    ledger = a.status()["service"]["ledger"]
    assert ledger["state"] == "degraded", ledger
    a.client.send(b.node_id, "still", b"delivered without a ledger")
    assert collect(b.client, "still", {b"delivered without a ledger"})
    assert "Traceback" not in a.log()


def test_a_second_daemon_on_the_same_directory_is_refused(
    mesh_nodes: Callable[..., Node], short_tmp
) -> None:
    a = mesh_nodes("a").start()
    records = a.directory / "state.db"
    before = records.stat().st_mtime_ns
    twin = short_tmp / "twin.json"
    twin.write_text(
        json.dumps(
            {"directory": str(a.directory), "listen": "127.0.0.1:0", "ledger": None,
             "socket": str(short_tmp / "twin.sock")}
        )
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "keel", "mesh", "serve", "--config", str(twin)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert (
        f"cannot start: {a.directory}: another keel mesh daemon is already serving this "
        f"directory (pid {a.process.pid if a.process else '?'})" in done.stderr
    ), done.stderr
    assert records.stat().st_mtime_ns == before  # it touched nothing
    assert a.status()["node"] == a.node_id


def test_control_requests_with_bad_values_get_one_line_errors(pair: tuple[Node, Node]) -> None:
    """The daemon's side: what a client other than keel's CLI could send."""
    a, b = pair
    token = InviteToken.decode(a.invite())
    body = json.loads(b64u_decode(token.encode()[len(TOKEN_PREFIX) :], "token"))
    body["addrs"] = ["127.0.0.1:99999"]
    port_99999 = TOKEN_PREFIX + b64u_encode(json.dumps(body).encode())
    huge = 1 << 70
    cases: list[tuple[str, dict[str, object], str]] = [
        ("invite", {"ttl": float("nan")}, "NaN is not a JSON value"),
        ("invite", {"ttl": float("inf")}, "Infinity is not a JSON value"),
        ("invite", {"ttl": 1e300}, "ttl must be at most"),
        ("invite", {"ttl": -5}, "ttl must be positive"),
        ("invite", {"uses": huge}, "uses must be an integer from 1 to 1000000"),
        ("join", {"token": port_99999}, "invite token is damaged"),
        ("join", {"token": token.encode(), "timeout": 1e300}, "timeout must be at most 3600"),
        ("send", {"to": b.node_id, "topic": "t", "data": "", "ttl": 1e300}, "ttl must be at most"),
        ("recv", {"topic": "t", "ack": [huge]}, "ack must be a list of at most"),
        ("recv", {"topic": "t", "lease": -1}, "lease must be positive"),
        ("ack", {"receipts": [True]}, "receipts must be a list"),
        ("dead_letters", {"limit": huge}, "limit must be an integer from 1 to 10000"),
        ("room_create", {"name": "x", "members": "ab"}, "members must be a list"),
    ]
    path = a.socket
    for verb, args, text in cases:
        with pytest.raises(ApiError) as caught:
            api_call(path, verb, args)
        assert text in str(caught.value), (verb, args, str(caught.value))
        assert "\n" not in str(caught.value)
    raw = b'{"verb": "invite", "args": {"ttl": 1e400}}\n'
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(raw)
        answer = json.loads(sock.makefile("rb").readline())
    assert answer == {
        "ok": False,
        "error": "malformed request: the number 1e400 is too large",
        "kind": "bad_request",
    }
    assert a.status()["member"]
    for node in (a, b):
        assert "Traceback" not in node.log()
