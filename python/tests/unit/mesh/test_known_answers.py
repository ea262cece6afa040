"""The application layer's known answers in docs/mesh-protocol.md stay true."""

from __future__ import annotations

import re
from pathlib import Path

from keel.mesh import rooms
from keel.mesh.encoding import b64u_encode
from keel.mesh.identity import NodeIdentity
from keel.mesh.invite import invite_id_of
from keel.mesh.membership import SignedRecord, room_id_of
from keel.mesh.packets import Msg, Msgs, RoomStamp, decode, encode

DOC = Path(__file__).resolve().parents[4] / "docs" / "mesh-protocol.md"


def test_the_documented_known_answers() -> None:
    text = DOC.read_text().split("**Known answers.** For the identity", 1)[1]
    identity = NodeIdentity(bytes(range(32)), bytes(range(32, 64)))
    assert f"(node id `{identity.node_id}`)" in text
    assert f"nonce = 16 zero bytes: `{room_id_of(identity.node_id, bytes(16))}`" in text
    genesis = SignedRecord.make(
        identity,
        "genesis",
        1_700_000_000_000,
        node=identity.record().to_json(),
        addrs=["10.0.0.1:7400"],
    )
    assert f"`{genesis.signed_bytes().decode()}`" in text
    assert f"`{genesis.to_json()['sig']}`" in text
    assert f"mesh id) `{genesis.id}`" in text
    revocation = SignedRecord.make(
        identity, "revoke-invite", 1_700_000_000_001, invite=invite_id_of(bytes(32)).hex()
    )
    assert f"`{revocation.signed_bytes().decode()}`" in text
    assert f"`{revocation.to_json()['sig']}`" in text
    assert f"its record id `{revocation.id}`" in text
    packet = encode(Msg("0" * 32, "jobs", 1_700_000_000, b"hi"))
    shown = re.search(r"is the packet \(hex\)\s+`([0-9a-f]+)`", text)
    assert shown is not None
    assert shown.group(1) == packet.hex()
    direct = Msg("0" * 32, "jobs", 1_700_000_000, b"hi")
    room = Msg(
        "01" * 16,
        "chat",
        1_700_000_000,
        b"",
        RoomStamp(room_id_of(identity.node_id, bytes(16)), identity.node_id, 1, b"\xab" * 64),
    )
    batch = re.search(r"in one `MSGS` packet, is \(hex\)\s+`([0-9a-f]+)`", text)
    assert batch is not None
    assert batch.group(1) == encode(Msgs((direct, room))).hex()
    assert decode(bytes.fromhex(batch.group(1))) == Msgs((direct, room))
    addressed = direct._replace(agent="scout", to="notes")
    shown_agents = re.search(
        r"sent by agent `scout` for agent `notes` is, as a\s+`MSG` \(the header's keys sorted: "
        r"`agent`, `exp`, `id`, `to`, `topic`\),\s+`([0-9a-f]+)`,\s+and alone in a `MSGS` packet "
        r"\(flags `02`, then `05` `scout` `05` `notes`\)\s+`([0-9a-f]+)`",
        text,
    )
    assert shown_agents is not None
    assert shown_agents.group(1) == encode(addressed).hex()
    assert shown_agents.group(2) == encode(Msgs((addressed,))).hex()
    assert decode(bytes.fromhex(shown_agents.group(2))) == Msgs((addressed,))
    agent_room = SignedRecord.make(
        identity,
        "room",
        1_700_000_000_002,
        room=room_id_of(identity.node_id, bytes(16)),
        nonce=b64u_encode(bytes(16)),
        name="ops",
        version=1,
        members=[identity.node_id, "scout@l2x7zovq3nifrbiq6yoaoa74ebkpauy3"],
    )
    assert SignedRecord.from_json(agent_room.to_json()) == agent_room
    assert f"`{agent_room.signed_bytes().decode()}`" in text
    assert f"`{agent_room.to_json()['sig']}`" in text
    assert f"its record id `{agent_room.id}`" in text
    for agent in (None, "scout"):
        signed = rooms.signed_bytes(
            room_id_of(identity.node_id, bytes(16)),
            "01" * 16,
            identity.node_id,
            topic="chat",
            expires=1_700_000_000,
            version=1,
            payload=b"",
            agent=agent,
        )
        shown_signed = f"`{signed.decode()}`"
        assert shown_signed in text
        after = text.split(shown_signed, 1)[1]
        sig = b64u_encode(identity.sign(rooms.MESSAGE_DOMAIN, signed))
        assert re.match(r"[,\s]+(its `sig` being|`sig`)\s+`" + re.escape(sig) + "`", after)
