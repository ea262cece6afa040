"""Application-layer revisions: MSGS only to peers that announce revision 2, both ways."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from keel.mesh import packets
from keel.mesh.identity import NodeIdentity
from keel.mesh.ids import new_message_id
from keel.mesh.invite import InviteToken
from keel.mesh.packets import Ack, Msg, Msgs

from .nodes import Node, RawPeer, wait_until


def joined_peer(node: Node, extra: dict[str, Any]) -> RawPeer:
    """A raw member of ``node``'s mesh whose handshake ``extra`` is ``extra``."""
    token = InviteToken.decode(node.invite())
    peer = RawPeer(
        NodeIdentity.generate(), token.addresses[0], token.static_key, invite=token, extra=extra
    )
    done = peer.handshake()
    assert done.extra.get("app") == packets.APP_REVISION  # the daemon announces its revision
    peer.read_until(lambda e: True, timeout=5)
    return peer


def messages_for(peer: RawPeer, count: int) -> list[packets.Packet]:
    """Packets carrying messages, once ``count`` messages arrived."""

    def carried() -> int:
        found = 0
        for packet in peer.received():
            found += len(packet.messages) if isinstance(packet, Msgs) else isinstance(packet, Msg)
        return found

    peer.read_until(lambda e: carried() >= count, timeout=15)
    return [p for p in peer.received() if isinstance(p, Msg | Msgs)]


def test_a_revision_1_peer_gets_single_msg_packets(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a").start()
    old = joined_peer(a, extra={})  # announces no "app": revision 1
    ids = a.client.send_many([(old.identity.node_id, "t", f"{i}".encode()) for i in range(5)])
    carriers = messages_for(old, 5)
    assert all(isinstance(p, Msg) for p in carriers)
    assert sorted(p.id for p in carriers if isinstance(p, Msg)) == sorted(ids)


def test_a_revision_2_peer_gets_msgs_and_may_send_them(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a").start()
    new = joined_peer(a, extra={"app": 2})
    ids = a.client.send_many([(new.identity.node_id, "t", f"{i}".encode()) for i in range(50)])
    carriers = messages_for(new, 50)
    assert all(isinstance(p, Msgs) for p in carriers)
    assert len(carriers) < 50  # batched
    got = sorted(m.id for p in carriers if isinstance(p, Msgs) for m in p.messages)
    assert got == sorted(ids)
    # and the daemon takes MSGS: three messages, one of them twice, one packet, one ACK
    expires = int(time.time()) + 600
    first, second = (Msg(new_message_id(), "in", expires, b) for b in (b"x", b"y"))
    new.events.clear()
    new.send_packet(Msgs((first, second, first)))
    new.read_until(lambda e: any(isinstance(p, Ack) for p in new.received()))
    acks = [p for p in new.received() if isinstance(p, Ack)]
    assert [sorted(a.ok) for a in acks] == [sorted([first.id, second.id, first.id])]
    received = wait_until(lambda: a.client.recv("in", max=10), timeout=10, what="the messages")
    assert sorted(m.data for m in received) == [b"x", b"y"]
    assert a.client.recv("in", max=10, wait=0.3) == []
