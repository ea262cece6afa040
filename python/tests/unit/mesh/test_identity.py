"""Node identity: the id derivation, the key file, signatures and node records."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest
from keel.mesh import identity
from keel.mesh.errors import IdentityError, RemoteProtocolError
from keel.mesh.identity import NodeIdentity, NodeRecord, is_node_id, node_id_of, verify_signature

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


def test_key_file_is_created_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity.key"
    made = identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = identity.load_or_create(path)
    assert again.node_id == made.node_id
    assert again.signing_public == made.signing_public
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temp file left


def test_create_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    identity.create(path)
    with pytest.raises(IdentityError, match="already exists"):
        identity.create(path)


def test_racing_first_runs_agree(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    results: list[str] = []

    def run() -> None:
        results.append(identity.load_or_create(path).node_id)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    assert identity.load(path).node_id == results[0]


def test_a_readable_key_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    identity.create(path)
    path.chmod(0o644)
    with pytest.raises(
        IdentityError, match=f"readable by others \\(mode 644\\); run: chmod 600 {path}"
    ):
        identity.load(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "malformed identity key file"),
        ("[]", "not a JSON object"),
        ('{"version": 2}', "version must be 1"),
        ('{"version": 1, "node_id": "x", "static_private": "00"}', "expected exactly"),
    ],
)
def test_malformed_key_files_name_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "identity.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=problem) as caught:
        identity.load(path)
    assert str(path) in str(caught.value)


def test_an_edited_node_id_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    identity.create(path)
    data = json.loads(path.read_text())
    data["node_id"] = NodeIdentity.generate().node_id
    path.write_text(json.dumps(data))
    with pytest.raises(IdentityError, match="does not match the static key"):
        identity.load(path)


def test_missing_and_symlinked_key_files(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="no identity key file"):
        identity.load(tmp_path / "absent.key")
    real = tmp_path / "real.key"
    identity.create(real)
    link = tmp_path / "link.key"
    os.symlink(real, link)
    with pytest.raises(IdentityError, match="cannot open"):
        identity.load(link)
