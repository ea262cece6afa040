"""Several hosts (network namespaces): chained invites, partitions, loss, SIGKILL.

Every message must reach its application exactly once. Each daemon runs
inside its host's namespace; the test drives them through their control
sockets, which are files and so reachable from outside the namespace.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from keel.mesh.kem import available_backends

from tests.harness.netns import Bridge, Host, Network

from .nodes import FAST, Node, wait_until
from .test_delivery import collect

PORT = 7400
Made = tuple[list[Host], list[Node], Bridge]


@pytest.fixture
def hosts_nodes(network: Network, short_tmp: Path) -> Callable[..., Made]:
    if all(reason is not None for reason in available_backends().values()):
        pytest.skip(f"no ML-KEM-768 backend: {available_backends()}")

    def make(labels: Sequence[str], config: dict[str, Any]) -> Made:
        hosts = [network.host(label) for label in labels]
        bridge = network.bridge(hosts)
        nodes = [
            Node(short_tmp / h.label, listen=f"{h.address}:{PORT}", config=config,
                 prefix=h.argv([]), name=h.label)
            for h in hosts
        ]  # fmt: skip
        for node in nodes:
            node.start()
        return hosts, nodes, bridge

    return make


def everyone_connected(nodes: Sequence[Node], timeout: float = 60) -> None:
    for node in nodes:
        node.wait_connected(*[n for n in nodes if n is not node], timeout=timeout)


def exchange(nodes: Sequence[Node], topic: str, count: int) -> dict[str, set[bytes]]:
    """Every node sends ``count`` messages to every other; returns what each must receive."""
    expected: dict[str, set[bytes]] = {n.name: set() for n in nodes}
    for sender, receiver in itertools.permutations(nodes, 2):
        payloads = [f"{sender.name}->{receiver.name} #{i}".encode() for i in range(count)]
        sender.client.send_many([(receiver.node_id, topic, p) for p in payloads])
        expected[receiver.name].update(payloads)
    return expected


def check_exactly_once(nodes: Sequence[Node], topic: str, expected: dict[str, set[bytes]],
                       timeout: float = 90) -> None:  # fmt: skip
    for node in nodes:
        got = collect(node.client, topic, expected[node.name], timeout=timeout)
        assert set(got) == expected[node.name], (
            f"{node.name} missed {expected[node.name] - set(got)}"
        )
        assert all(c == 1 for c in got.values()), f"{node.name} got duplicates"


def test_chained_invites_all_directions_and_a_partition_that_heals(
    network: Network, hosts_nodes: Callable[..., Made]
) -> None:
    hosts, nodes, _ = hosts_nodes("abcd", FAST)
    a, b, c, d = nodes
    b.join(a)
    c.join(b)  # c knows only b's invite, yet learns a and d and connects to them
    d.join(c)
    everyone_connected(nodes)
    peers = {p["id"]: p for p in d.client.peers()}
    assert set(peers) == {a.node_id, b.node_id, c.node_id}
    assert peers[a.node_id]["addresses"] == [f"{hosts[0].address}:{PORT}"]

    check_exactly_once(nodes, "calm", exchange(nodes, "calm", 5))

    network.partition(hosts[:2], hosts[2:])
    wait_until(lambda: c.node_id not in a.connected(), timeout=30, what="the partition to bite")
    during = exchange(nodes, "split", 5)
    time.sleep(1)
    # within each side, messages still flow; across, they wait in the outboxes
    assert a.status()["outbox"] > 0
    network.heal()
    everyone_connected(nodes)
    check_exactly_once(nodes, "split", during)
    wait_until(
        lambda: all(n.status()["outbox"] == 0 for n in nodes), timeout=30, what="outboxes to drain"
    )


def test_loss_delay_and_sigkill_on_either_side(
    network: Network, hosts_nodes: Callable[..., Made]
) -> None:
    lossy = {**FAST, "handshake_timeout": 15, "keepalive_interval": 2, "idle_timeout": 20,
             "connect_timeout": 10, "ack_timeout": 4, "retry_cap": 4}  # fmt: skip
    hosts, nodes, bridge = hosts_nodes("abc", lossy)
    a, b, c = nodes
    b.join(a)
    c.join(a)
    everyone_connected(nodes)
    for host in hosts:  # 20% loss and 100 ms on every host's uplink, both ways
        bridge.link(host).netem(delay_ms=100, loss_pct=20)

    check_exactly_once(nodes, "lossy", exchange(nodes, "lossy", 4), timeout=120)

    payloads = [f"stream {i}".encode() for i in range(120)]
    result: dict[str, Counter[bytes]] = {}
    thread = threading.Thread(
        target=lambda: result.update(got=collect(b.client, "stream", set(payloads), timeout=180))
    )
    thread.start()
    try:
        for i, payload in enumerate(payloads):
            if i == 40:
                b.kill()  # the receiver dies mid-stream
                b.start()
            if i == 80:
                a.kill()  # the sender dies mid-stream
                a.start()
            a.client.send(b.node_id, "stream", payload, retry=60)
    finally:
        thread.join(timeout=200)
    got = result["got"]
    assert set(got) == set(payloads)
    assert all(count == 1 for count in got.values())
