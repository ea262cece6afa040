"""The binary local stream: pipelined senders and subscriptions, exactly once through real daemons."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from keel.errors import ApiError
from keel.mesh.client import MeshClient, SendRefused, Subscription

from .nodes import Node, wait_until


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
        time.sleep(0.3)
        assert inbox.recv() == []
    assert got == Counter(payloads)
    wait_until(lambda: a.status()["outbox"] == 0, timeout=30, what="a's outbox to drain")
    wait_until(lambda: b.status()["inbox"] == 0, timeout=30, what="b's inbox to empty")
    assert b.client.recv("bulk", max=10) == []


def test_what_a_subscriber_did_not_acknowledge_is_handed_out_again(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    a.client.send_many([(b.node_id, "again", f"{i}".encode()) for i in range(20)])
    crashed = MeshClient(b.directory).subscribe("again")
    first = drain(crashed, 20)
    assert sum(first.values()) == 20
    assert crashed._stream is not None
    crashed._stream.close()  # the agent dies without acknowledging anything
    # a poll recv on another client sees them again, and a second subscriber too
    wait_until(lambda: b.client.recv("again", max=5, wait=0.5), timeout=10, what="redelivery")
    with MeshClient(b.directory).subscribe("again") as inbox:
        rest = drain(inbox, 15, timeout=40)  # the other 5 are leased to that recv
    assert sum(rest.values()) == 15
    b.client.ack()
    wait_until(lambda: b.status()["inbox"] == 0, timeout=10, what="b's inbox to empty")


def test_subscribers_on_one_topic_share_its_messages(pair: tuple[Node, Node]) -> None:
    a, b = pair
    one = MeshClient(b.directory).subscribe("shared", max_unacked=10)
    two = MeshClient(b.directory).subscribe("shared", max_unacked=10)
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
    receiver = MeshClient(b.directory, timeout=5)
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
    sender = MeshClient(a.directory, timeout=5)
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
