"""Node identity: the id derivation, the key file's form, signatures and node records."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from keel.mesh import identity
from keel.mesh.errors import RemoteProtocolError
from keel.mesh.identity import NodeIdentity, NodeRecord, parse_key_file, verify_signature
from keel.mesh.ids import is_node_id, node_id_of

from .conftest import seeded


def test_node_id_derivation_is_the_documented_one() -> None:
    static_public = bytes(range(32))
    digest = hashlib.blake2s(b"keel-mesh/1 node-id\x00" + static_public).digest()
    expected = base64.b32encode(digest[:20]).decode().lower()
    assert node_id_of(static_public) == expected == "l2x7zovq3nifrbiq6yoaoa74ebkpauy3"
    assert len(expected) == 32
    assert is_node_id(expected)
    assert not is_node_id(expected.upper())
    assert not is_node_id(expected[:-1])
    with pytest.raises(ValueError, match="32 bytes"):
        node_id_of(b"short")


def test_identity_derives_everything_public() -> None:
    ident = NodeIdentity.generate(seeded("n"))
    assert ident.node_id == node_id_of(ident.static_public)
    assert identity.verify_binding(ident.static_public, ident.signing_public, ident.binding)
    assert "static_private" not in repr(ident)
    assert ident.static_private.hex() not in repr(ident)


def test_signatures_are_domain_separated() -> None:
    ident = NodeIdentity.generate(seeded("n"))
    signature = ident.sign("membership", b"join abc")
    assert verify_signature(ident.signing_public, "membership", b"join abc", signature)
    assert not verify_signature(ident.signing_public, "room", b"join abc", signature)
    assert not verify_signature(ident.signing_public, "membership", b"join abd", signature)
    other = NodeIdentity.generate(seeded("o"))
    assert not verify_signature(other.signing_public, "membership", b"join abc", signature)
    assert not verify_signature(b"short", "membership", b"join abc", signature)
    with pytest.raises(ValueError, match="domain"):
        ident.sign("", b"x")


def test_node_record_round_trip_and_forgeries() -> None:
    ident = NodeIdentity.generate(seeded("n"))
    record = ident.record()
    assert NodeRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    other = NodeIdentity.generate(seeded("o"))
    forged = dict(record.to_json(), signing_key=other.record().to_json()["signing_key"])
    with pytest.raises(RemoteProtocolError, match="binding does not verify"):
        NodeRecord.from_json(forged)
    wrong_id = dict(record.to_json(), node_id=other.node_id)
    with pytest.raises(RemoteProtocolError, match="does not match its static key"):
        NodeRecord.from_json(wrong_id)
    with pytest.raises(RemoteProtocolError, match="lacks 'binding'"):
        NodeRecord.from_json({k: v for k, v in record.to_json().items() if k != "binding"})
    with pytest.raises(RemoteProtocolError, match="not a JSON object"):
        NodeRecord.from_json([])
    with pytest.raises(RemoteProtocolError, match="base64url"):
        NodeRecord.from_json(dict(record.to_json(), static_key="!!"))


def test_key_file_form_round_trips_and_refuses_an_edited_node_id() -> None:
    made = NodeIdentity.generate(seeded("key file"))
    again = parse_key_file(made.to_key_file().encode())
    assert (again.node_id, again.signing_public) == (made.node_id, made.signing_public)
    data = json.loads(made.to_key_file())
    data["node_id"] = NodeIdentity.generate(seeded("another")).node_id
    with pytest.raises(ValueError, match="does not match the static key"):
        parse_key_file(json.dumps(data).encode())
