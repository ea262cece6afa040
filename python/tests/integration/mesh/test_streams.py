"""The binary local stream: pipelined senders and subscriptions, exactly once through real daemons."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from keel.errors import ApiError
from keel.mesh.client import MeshClient, SendRefused, Subscription
from keel.mesh.identity import NodeIdentity
from keel.mesh.ids import new_message_id
from keel.mesh.invite import InviteToken
from keel.mesh.packets import Ack, Msg, Msgs

from .nodes import FAST, Node, RawPeer, wait_until


def drain(subscription: Subscription, want: int, timeout: float = 60) -> Counter[bytes]:
    """Receive until ``want`` messages came (counting repeats); rides out daemon restarts."""
    got: Counter[bytes] = Counter()
    deadline = time.monotonic() + timeout
    while sum(got.values()) < want and time.monotonic() < deadline:
        try:
            got.update(m.data for m in subscription.recv(wait=0.5))
        except ApiError:
            time.sleep(0.1)  # the daemon is restarting; the next recv reconnects
    return got


def test_a_pipelined_sender_and_a_subscription_deliver_everything_once(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    payloads = [f"{i:05d}".encode() * (i % 7) for i in range(3000)]
    payloads += [b"", b"\x00" * 200_000, bytes(range(256)) * 300]  # empty, big, binary
    with b.client.subscribe("bulk", max_unacked=500) as inbox:
        with a.client.sender() as out:
            ids = [out.send(b.node_id, "bulk", p) for p in payloads]
        assert len(set(ids)) == len(payloads)
        got = drain(inbox, len(payloads))
        inbox.ack()
        # Everything acknowledged end to end: nothing is left anywhere to hand out again.
        wait_until(lambda: a.status()["outbox"] == 0, timeout=30, what="a's outbox to drain")
        wait_until(lambda: b.status()["inbox"] == 0, timeout=30, what="b's inbox to empty")
        assert inbox.recv() == []
    assert got == Counter(payloads)
    assert b.client.recv("bulk", max=10) == []


def test_what_a_subscriber_did_not_acknowledge_is_handed_out_again(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    a.client.send_many([(b.node_id, "again", f"{i}".encode()) for i in range(20)])
    crashed = MeshClient(b.socket).subscribe("again")
    first = drain(crashed, 20)
    assert sum(first.values()) == 20
    assert crashed._stream is not None
    crashed._stream.close()  # the agent dies without acknowledging anything
    # a poll recv on another client sees them again, and a second subscriber too
    wait_until(lambda: b.client.recv("again", max=5, wait=0.5), timeout=10, what="redelivery")
    with MeshClient(b.socket).subscribe("again") as inbox:
        rest = drain(inbox, 15, timeout=40)  # the other 5 are leased to that recv
    assert sum(rest.values()) == 15
    b.client.ack()
    wait_until(lambda: b.status()["inbox"] == 0, timeout=10, what="b's inbox to empty")


def test_subscribers_on_one_topic_share_its_messages(pair: tuple[Node, Node]) -> None:
    a, b = pair
    one = MeshClient(b.socket).subscribe("shared", max_unacked=10)
    two = MeshClient(b.socket).subscribe("shared", max_unacked=10)
    one.recv()
    two.recv()
    a.client.send_many([(b.node_id, "shared", f"{i}".encode()) for i in range(100)])
    got: Counter[bytes] = Counter()
    deadline = time.monotonic() + 30
    while sum(got.values()) < 100 and time.monotonic() < deadline:
        got.update(m.data for m in one.recv(wait=0.1))
        got.update(m.data for m in two.recv(wait=0.1))
    one.close()
    two.close()
    assert got == Counter(f"{i}".encode() for i in range(100))


def test_refused_sends_say_why_and_queue_nothing(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stranger = "b" * 32
    out = a.client.sender()
    out.send(b.node_id, "t", b"fine")
    out.send(stranger, "t", b"not a member")
    with pytest.raises(SendRefused, match="is not a member") as refused:
        out.flush()
    assert len(refused.value.ids) == 2  # one batch: all or nothing
    with pytest.raises(ApiError, match="own id"):
        a.client.send_many([(a.node_id, "t", b"to myself")])
    with pytest.raises(ApiError, match="topic"):
        a.client.send(b.node_id, "bad topic", b"x")
    assert a.status()["outbox"] == 0
    with pytest.raises(ApiError, match="topic"):
        b.client.subscribe("bad topic").recv(wait=1)


def test_exactly_once_over_streams_when_either_daemon_is_killed(pair: tuple[Node, Node]) -> None:
    a, b = pair
    payloads = [f"message {i}".encode() for i in range(600)]
    receiver = MeshClient(b.socket, timeout=5)
    result: dict[str, Counter[bytes]] = {}
    subscription = receiver.subscribe("killed", max_unacked=50)

    def receive() -> None:
        got: Counter[bytes] = Counter()
        deadline = time.monotonic() + 150
        while not set(payloads) <= set(got) and time.monotonic() < deadline:
            try:
                got.update(m.data for m in subscription.recv(wait=0.5))
            except ApiError:
                time.sleep(0.1)
        subscription.close()
        result["got"] = got

    thread = threading.Thread(target=receive)
    thread.start()
    sender = MeshClient(a.socket, timeout=5)
    try:
        for start in range(0, len(payloads), 50):
            if start == 200:
                a.kill()  # the sender's daemon dies with messages queued and in flight
                a.start()
            if start == 400:
                b.kill()  # the receiver's daemon dies while the subscriber reads
                b.start()
            batch = {
                sender.send(b.node_id, "killed", p, retry=30): p
                for p in payloads[start : start + 50]
            }
            assert len(batch) == 50
    finally:
        thread.join(timeout=170)
    got = result["got"]
    assert set(got) == set(payloads)
    assert all(count == 1 for count in got.values()), [p for p, c in got.items() if c > 1]
    wait_until(lambda: a.status()["outbox"] == 0, timeout=30, what="a's outbox to drain")
    wait_until(lambda: b.status()["inbox"] == 0, timeout=30, what="b's inbox to empty")


def member_sending_to(node: Node) -> RawPeer:
    """A raw member of ``node``'s mesh (revision 2) that sends it messages by hand."""
    token = InviteToken.decode(node.invite())
    peer = RawPeer(
        NodeIdentity.generate(), token.addresses[0], token.static_key, invite=token,
        extra={"app": 2},
    )  # fmt: skip
    peer.handshake()
    peer.read_until(lambda e: True, timeout=5)
    return peer


def acked(peer: RawPeer) -> list[str]:
    return [i for p in peer.received() if isinstance(p, Ack) for i in p.ok]


def test_a_message_handed_to_a_subscriber_is_acknowledged_once_the_agent_took_it(
    mesh_nodes: Callable[..., Node],
) -> None:
    a = mesh_nodes("a").start()
    peer = member_sending_to(a)
    expires = int(time.time()) + 600
    first = Msg(new_message_id(), "hand", expires, b"one")
    with a.client.subscribe("hand") as inbox:
        inbox.recv()
        peer.send_packet(Msgs((first,)))
        got = wait_until(lambda: inbox.recv(wait=0.2), timeout=10, what="the handoff")
        assert [m.data for m in got] == [b"one"]
        peer.pump(0.3)
        assert first.id not in acked(peer)  # the agent has not acknowledged it yet
        peer.send_packet(Msgs((first,)))  # a copy while the agent holds it: no answer
        peer.pump(0.3)
        assert first.id not in acked(peer)
        assert inbox.recv(wait=0.3) == []  # and not handed over twice
        inbox.ack()
        peer.read_until(lambda e: first.id in acked(peer), timeout=10)
    assert a.status()["inbox"] == 0  # taken straight from memory: never stored
    peer.events.clear()
    peer.send_packet(Msgs((first,)))  # resent later: a known duplicate, answered ok
    peer.read_until(lambda e: first.id in acked(peer), timeout=10)
    assert MeshClient(a.socket).recv("hand", max=10, wait=0.3) == []


def test_a_held_message_is_stored_when_the_agent_is_slow_or_goes_away(
    mesh_nodes: Callable[..., Node],
) -> None:
    a = mesh_nodes("a").start()
    peer = member_sending_to(a)
    expires = int(time.time()) + 600
    slow, gone = (Msg(new_message_id(), "hold", expires, b) for b in (b"slow", b"gone"))
    sleepy = a.client.subscribe("hold")
    sleepy.recv()
    peer.send_packet(Msgs((slow,)))
    assert [m.data for m in wait_until(lambda: sleepy.recv(wait=0.2), timeout=10, what="it")] == [
        b"slow"
    ]
    # the agent sits on it: after a second the daemon stores it and answers ok
    peer.read_until(lambda e: slow.id in acked(peer), timeout=10)
    assert a.status()["inbox"] == 1
    sleepy.ack()  # the agent's acknowledgement now consumes the stored copy
    wait_until(lambda: a.status()["inbox"] == 0, timeout=10, what="the stored copy consumed")
    peer.send_packet(Msgs((gone,)))
    assert [m.data for m in wait_until(lambda: sleepy.recv(wait=0.2), timeout=10, what="it")] == [
        b"gone"
    ]
    assert sleepy._stream is not None
    sleepy._stream.close()  # the agent dies holding it: stored, answered, handed out again
    peer.read_until(lambda e: gone.id in acked(peer), timeout=10)
    other = MeshClient(a.socket)  # another agent (a.client remembers what sleepy returned)
    again = wait_until(lambda: other.recv("hold", max=10, wait=0.5), timeout=10, what="it")
    assert [m.data for m in again] == [b"gone"]


def test_a_pipelined_sender_rides_out_back_pressure(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a", config={**FAST, "max_outbox_per_peer": 40}).start()
    b = mesh_nodes("b").start()
    b.join(a)
    a.wait_connected(b)
    b.stop()  # nothing drains a's outbox
    out = a.client.sender()
    with pytest.raises(SendRefused, match="more than the outbox holds") as refused:
        for _ in range(41):
            out.send(b.node_id, "bp", b"too many at once")
        out.flush()
    assert not refused.value.busy  # it never fits: no point in trying again
    for i in range(30):
        out.send(b.node_id, "bp", f"first {i}".encode())
    out.flush()
    for i in range(20):
        out.send(b.node_id, "bp", f"then {i}".encode())
    with pytest.raises(SendRefused, match="is full") as full:
        out.flush()
    assert full.value.busy
    assert a.status()["outbox"] == 30  # the second batch: all or nothing
    b.start()
    more = [f"{i}".encode() for i in range(300)]
    with b.client.subscribe("bp") as inbox, a.client.sender(retry=60, batch=20) as patient:
        for payload in more:
            patient.send(b.node_id, "bp", payload)
        patient.flush()
        got = drain(inbox, 30 + len(more))
    assert got == Counter([f"first {i}".encode() for i in range(30)] + more)
