"""The application layer's known answers in docs/mesh-protocol.md stay true."""

from __future__ import annotations

import re
from pathlib import Path

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
