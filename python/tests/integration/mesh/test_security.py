"""The real daemon against hostile peers: everything refused and logged, the daemon lives on."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable

import pytest
from keel.mesh import packets, rooms
from keel.mesh.framing import RecordType, encode_frame, encode_record
from keel.mesh.identity import NodeIdentity
from keel.mesh.invite import InviteToken, new_invite
from keel.mesh.packets import Ack, Msg
from keel.mesh.session import Closed

from .nodes import Node, RawPeer, is_closed_by_peer, wait_until

MSG_ID = "0123456789abcdef0123456789abcdef"


def still_serving(node: Node) -> None:
    """The daemon is alive and answers."""
    assert node.alive(), node.log()[-2000:]
    assert node.status()["node"] == node.node_id


def target(node: Node) -> tuple[str, bytes]:
    token = InviteToken.decode(node.invite())
    return token.addresses[0], token.static_key


def member(node: Node) -> RawPeer:
    """A raw peer that joined ``node``'s mesh with an invite and is connected."""
    token = InviteToken.decode(node.invite())
    peer = RawPeer(NodeIdentity.generate(), token.addresses[0], token.static_key, invite=token)
    peer.handshake()
    peer.read_until(lambda e: True, timeout=5)
    return peer


def reconnect(node: Node, identity: NodeIdentity) -> RawPeer:
    address, key = target(node)
    peer = RawPeer(identity, address, key)
    peer.handshake()
    return peer


def test_garbage_on_the_port_is_refused_and_logged(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a").start()
    host, _, port = a.address.rpartition(":")
    for junk in (os.urandom(5000), b"\x00\x00", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(junk)
            assert is_closed_by_peer(sock)
    a.wait_log("dropping the connection with unauthenticated peer")
    still_serving(a)


def test_a_slow_handshake_times_out(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a").start()
    address, key = target(a)
    peer = RawPeer(NodeIdentity.generate(), address, key)
    first = peer.session.start()
    peer.sock.sendall(first[:100])  # half a message, then silence
    assert is_closed_by_peer(peer.sock, timeout=15)
    a.wait_log("handshake not finished after 2 s")  # closed by its deadline, not at once
    still_serving(a)


def test_an_unknown_static_key_is_refused(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a").start()
    address, key = target(a)
    stranger = RawPeer(NodeIdentity.generate(), address, key)
    stranger.handshake()
    closed = stranger.closed()
    assert closed.reason.startswith("unknown-node:")
    a.wait_log("is not a member of this mesh")
    assert not any(isinstance(p, packets.Records) for p in stranger.received())  # learns nothing
    still_serving(a)


def test_a_man_in_the_middle_with_the_wrong_key_is_refused(
    mesh_nodes: Callable[..., Node],
) -> None:
    a = mesh_nodes("a").start()
    b = mesh_nodes("b").start()
    impostor = mesh_nodes("impostor").start()
    # b gets a token that names a's key but points at the impostor's address
    genuine = InviteToken.decode(a.invite())
    forged = InviteToken(
        genuine.node_id, (impostor.address,), genuine.static_key, genuine.secret,
        genuine.expires, genuine.uses,
    )  # fmt: skip
    done = b.cli("join", forged.encode())
    assert done.returncode == 1
    assert "not the expected" in done.stderr
    assert genuine.node_id in done.stderr
    b.wait_log("wrong static key")
    # the genuine token still works afterwards: nothing was used up
    assert b.cli("join", genuine.encode()).returncode == 0
    still_serving(b)
    still_serving(impostor)


def test_invite_reuse_expiry_and_forgery_are_refused_clearly(
    mesh_nodes: Callable[..., Node],
) -> None:
    a = mesh_nodes("a").start()
    b = mesh_nodes("b").start()
    c = mesh_nodes("c").start()
    token = a.invite()
    assert b.cli("join", token).returncode == 0
    reuse = c.cli("join", token)
    assert reuse.returncode == 1
    assert "keel: error: the inviter refused the invite: invite already used up" in reuse.stderr
    a.wait_log("invite-used-up")

    short = a.client.invite(ttl=1)
    expires = InviteToken.decode(short).expires
    wait_until(lambda: time.time() > expires, timeout=10, what="the invite to expire")
    expired = c.cli("join", short)
    assert expired.returncode == 1
    assert "expired" in expired.stderr

    # a token whose secret was changed: the inviter knows no such invite
    genuine = InviteToken.decode(a.invite())
    other_secret = new_invite(NodeIdentity.generate(), ["127.0.0.1:1"], now=time.time(), ttl=60)
    edited = InviteToken(genuine.node_id, genuine.addresses, genuine.static_key,
                         other_secret.secret, genuine.expires, 1)  # fmt: skip
    forged = c.cli("join", edited.encode())
    assert forged.returncode == 1
    assert "the inviter refused the invite: this node issued no such invite" in forged.stderr

    # a token whose node id does not match its key is caught before dialing
    body = genuine.encode()
    broken = c.cli("join", body[:-6] + ("A" if body[-6] != "A" else "B") + body[-5:])
    assert broken.returncode in (1, 2)
    assert "keel: error:" in broken.stderr
    assert "Traceback" not in broken.stderr

    garbage = c.cli("join", "keelinv1.!!!")
    assert garbage.returncode == 1
    assert "damaged" in garbage.stderr
    still_serving(a)
    assert len(a.client.peers()) == 1  # only b got in


@pytest.mark.parametrize("attack", ["replay", "reorder", "tamper", "truncate", "oversize"])
def test_manipulated_frames_are_refused(mesh_nodes: Callable[..., Node], attack: str) -> None:
    a = mesh_nodes("a").start()
    peer = member(a)
    peer.send_packet(Msg("1" * 32, "t", int(time.time()) + 60, b"first"))
    peer.read_until(lambda e: any(isinstance(p, Ack) for p in peer.received()))
    session, sock = peer.session, peer.sock
    if attack == "replay":
        frame = session.send_message(packets.encode(Msg("2" * 32, "t", 2**31, b"once")))
        sock.sendall(frame + frame)
    elif attack == "reorder":
        one = session.send_message(packets.encode(Msg("3" * 32, "t", 2**31, b"one")))
        two = session.send_message(packets.encode(Msg("4" * 32, "t", 2**31, b"two")))
        sock.sendall(two + one)
    elif attack == "tamper":
        sealed = bytearray(session.send_message(packets.encode(Msg("5" * 32, "t", 2**31, b"x"))))
        sealed[10] ^= 0x40
        sock.sendall(bytes(sealed))
    elif attack == "truncate":
        frame = session.send_message(packets.encode(Msg("6" * 32, "t", 2**31, b"cut")))
        sock.sendall(frame[: len(frame) // 2])
        sock.shutdown(socket.SHUT_WR)
    else:  # a message longer than 1 MiB, in DATA_MORE records that each are valid
        assert session._send is not None
        chunk = b"\x00" * 60000
        for _ in range(20):
            piece = session._send.encrypt_with_ad(b"", encode_record(RecordType.DATA_MORE, chunk))
            sock.sendall(encode_frame(piece))
    closed = peer.closed()
    assert isinstance(closed, Closed)
    expected = {
        "replay": "dropping the connection",
        "reorder": "dropping the connection",
        "tamper": "dropping the connection",
        "truncate": "truncated stream",
        "oversize": "exceeds the maximum",
    }[attack]
    a.wait_log(expected)
    still_serving(a)
    # only the first, honest message reached the inbox
    got = a.client.recv("t", max=10)
    assert [m.data for m in got] == ([b"first", b"once"] if attack == "replay" else [b"first"])
    # and the member can still come back with a fresh connection
    again = reconnect(a, peer.identity)
    again.send_packet(Msg("7" * 32, "t", 2**31, b"later"))
    again.read_until(lambda e: any(isinstance(p, Ack) for p in again.received()))
    assert [m.data for m in a.client.recv("t", max=10)] == [b"later"]


def test_packet_garbage_inside_a_valid_session_is_refused(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a").start()
    peer = member(a)
    peer.sock.sendall(peer.session.send_message(b"\x10\xff\xff not a packet"))
    peer.closed()
    a.wait_log("malformed packet")
    still_serving(a)


def test_a_removed_node_is_refused_from_then_on(pair: tuple[Node, Node]) -> None:
    a, b = pair
    removed = a.cli("remove", b.node_id)
    assert removed.returncode == 0, removed.stderr
    wait_until(lambda: b.node_id not in a.connected(), timeout=10, what="a to drop b")
    b.wait_log("this node was removed from mesh")
    assert a.client.peers() == []
    # b's own view: it knows it was removed, refuses to send, stops dialing
    refused = b.cli("send", a.node_id, "--topic", "t", "hi")
    assert refused.returncode == 1
    assert "removed" in refused.stderr
    still_serving(a)
    assert a.cli("remove", b.node_id).returncode == 1  # already


def test_a_removed_identity_cannot_reconnect(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a").start()
    peer = member(a)
    identity = peer.identity
    peer.close()
    assert a.cli("remove", identity.node_id).returncode == 0
    again = reconnect(a, identity)
    closed = again.closed()
    assert closed.reason.startswith("removed:")
    records = [r for p in again.received() if isinstance(p, packets.Records) for r in p.records]
    assert any(r["kind"] == "remove" and r["node"] == identity.node_id for r in records)
    a.wait_log(f"removed: {identity.node_id} was removed from the mesh")
    still_serving(a)


def test_a_member_cannot_forge_another_members_room_message(pair: tuple[Node, Node]) -> None:
    a, b = pair
    forger = member(a)
    room = a.client.room_create("ops", [b.node_id, forger.identity.node_id])
    wait_until(b.client.rooms, timeout=10, what="b to learn the room")
    forger.read_until(
        lambda e: any(isinstance(p, packets.Records) and any(r["kind"] == "room" for r in p.records)
                      for p in forger.received())
    )  # fmt: skip
    # the forger signs a message with its own key but names b as the author
    from keel.mesh.membership import Membership, SignedRecord

    records = [SignedRecord.from_json(r) for p in forger.received() if isinstance(p, packets.Records)
               for r in p.records]  # fmt: skip
    genesis = next(r for r in records if r.kind == "genesis")
    view = Membership(genesis, [r for r in records if r.kind != "genesis"]).view
    stamp = rooms.stamp(forger.identity, view.rooms[room["room"]], MSG_ID, topic="chat",
                        expires=2**31, payload=b"b says: wire the money")  # fmt: skip
    import dataclasses

    lie = dataclasses.replace(stamp, author=b.node_id)
    forger.send_packet(Msg(MSG_ID, "chat", 2**31, b"b says: wire the money", lie))
    forger.read_until(lambda e: any(isinstance(p, Ack) for p in forger.received()))
    answer = next(p for p in forger.received() if isinstance(p, Ack))
    assert answer.ok == ()
    assert answer.rejected[0][0] == MSG_ID
    assert "signature" in answer.rejected[0][1]
    a.wait_log("refusing room message")
    assert a.client.recv("chat", max=10) == []
    # the honest version from the forger itself goes through
    honest = rooms.stamp(forger.identity, view.rooms[room["room"]], "9" * 32, topic="chat",
                         expires=2**31, payload=b"hello")  # fmt: skip
    forger.send_packet(Msg("9" * 32, "chat", 2**31, b"hello", honest))
    wait_until(lambda: a.client.recv("chat", max=10), timeout=10, what="the honest room message")


def test_records_from_a_member_are_checked(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a").start()
    peer = member(a)
    stranger = NodeIdentity.generate()
    # a join signed by the member is fine; one it forged in a's name is not
    from keel.mesh.membership import SignedRecord

    genuine = SignedRecord.make(peer.identity, "join", int(time.time() * 1000) + 10,
                          node=stranger.record().to_json(), addrs=[])  # fmt: skip
    fake = SignedRecord.make(peer.identity, "remove", int(time.time() * 1000) + 20, node=a.node_id)
    claim = {**fake.to_json(), "by": a.node_id}
    peer.send_packet(packets.Records((claim, {"kind": "nonsense"})))
    peer.send_packet(packets.Records((genuine.to_json(),)))
    wait_until(lambda: any(p["id"] == stranger.node_id for p in a.client.peers()), timeout=10,
               what="the genuine join to take effect")  # fmt: skip
    a.wait_log("ignoring a record")
    assert a.status()["member"] is True  # the forged removal of a did nothing
    still_serving(a)


def test_only_operator_nodes_remove_members_and_the_role_is_granted(
    mesh_nodes: Callable[..., Node],
) -> None:
    a = mesh_nodes("a").start()
    b = mesh_nodes("b").start()
    c = mesh_nodes("c").start()
    b.join(a)
    c.join(a)
    for node in (a, b, c):
        node.wait_connected(*[n for n in (a, b, c) if n is not node])
    assert a.status()["operator"] is True  # the founder is the first operator node
    assert b.status()["operator"] is False
    refused = b.cli("remove", c.node_id)
    assert refused.returncode == 1
    assert "only an operator node of the mesh may remove a node" in refused.stderr
    assert c.status()["member"] is True
    # a node cannot promote itself, and a member cannot promote another
    assert b.cli("operator", "grant", b.node_id).returncode == 2
    assert "only an operator node" in b.cli("operator", "grant", c.node_id).stderr
    granted = a.cli("operator", "grant", b.node_id, "--json")
    assert granted.returncode == 0, granted.stderr
    assert json.loads(granted.stdout)["operator"] is True
    wait_until(lambda: b.status()["operator"], timeout=10, what="b to learn it is an operator")
    wait_until(lambda: {p["id"]: p["operator"] for p in c.client.peers()}[b.node_id],
               timeout=10, what="c to see b as an operator node")  # fmt: skip
    removed = b.cli("remove", c.node_id)
    assert removed.returncode == 0, removed.stderr
    wait_until(lambda: c.node_id not in [p["id"] for p in a.client.peers()], timeout=10,
               what="a to count c's removal by b")  # fmt: skip
    c.wait_log("this node was removed from mesh")
    # taken back: b may no longer remove anyone
    assert a.cli("operator", "revoke", b.node_id).returncode == 0
    wait_until(lambda: not b.status()["operator"], timeout=10, what="b to lose the role")
    assert "only an operator node" in b.cli("remove", a.node_id).stderr
    still_serving(a)


def test_an_operator_node_revokes_another_nodes_invite_and_the_rest_still_work(
    mesh_nodes: Callable[..., Node],
) -> None:
    a = mesh_nodes("a").start()
    b = mesh_nodes("b").start()
    c = mesh_nodes("c").start()
    b.join(a)
    a.wait_connected(b)
    made = b.cli("invite", "--json")  # any member may invite; b is no operator
    assert made.returncode == 0, made.stderr
    revoked = json.loads(made.stdout)
    kept = b.invite()
    assert InviteToken.decode(revoked["token"]).invite_id.hex() == revoked["id"]
    listed = {i["id"]: i for i in json.loads(b.cli("invites", "--json").stdout)}
    assert listed[revoked["id"]]["state"] == "open"
    assert listed[InviteToken.decode(kept).invite_id.hex()]["state"] == "open"
    # b, the issuer but no operator, may not revoke
    refused = b.cli("revoke-invite", revoked["id"])
    assert refused.returncode == 1
    assert "only an operator node of the mesh may revoke an invite" in refused.stderr
    assert all(i["state"] == "open" for i in json.loads(b.cli("invites", "--json").stdout))
    # a, an operator node, revokes it from the token (only its id travels)
    done = a.cli("revoke-invite", revoked["token"], "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["invite"], answer["issued_here"]) == (revoked["id"], False)
    assert "was revoked already" in a.cli("revoke-invite", revoked["id"]).stderr
    wait_until(lambda: {i["id"]: i["state"] for i in b.client.invites()}[revoked["id"]]
               == "revoked", timeout=10, what="b to count a's revocation")  # fmt: skip
    b.wait_log(f"invite {revoked['id']} revoked (by {a.node_id})")
    table = b.cli("invites").stdout
    assert f"{revoked['id']}  revoked" in table, table
    # the revoked invite is refused by its issuer, with its own reason
    joining = c.cli("join", revoked["token"])
    assert joining.returncode == 1
    assert "the inviter refused the invite: an operator node revoked this invite" in (
        joining.stderr
    )
    b.wait_log("invite-revoked")
    assert c.status()["members"] == 1  # still alone
    # the invite nobody revoked still works
    c.client.join(kept)
    c.wait_connected(a, b)
    states = {i["id"]: i["state"] for i in b.client.invites()}
    assert states == {revoked["id"]: "revoked", InviteToken.decode(kept).invite_id.hex(): "used-up"}
    still_serving(b)
