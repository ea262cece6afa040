"""C2SP tlog-cosignature v1 (Ed25519): layout, message, key ids, refusal of forgeries."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from keel.fleet import cosign
from keel.fleet.cosign import CosignatureVerifier, Cosigner, cosignatures
from keel.ledger import core
from keel.ledger.errors import MalformedError, ProofError

from .logs import MemoryLog, cosigner, signer

# The cosignature line of the spec's example (c2sp.org/tlog-cosignature), and
# one from transparency-dev/formats' tests: their layout is keyid || u64 time || sig.
SPEC_BLOB = "jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA=="
GO_BLOB = "ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOworDcFiEBYJXORmnFBOBA=="


@pytest.mark.parametrize(("blob", "timestamp"), [(SPEC_BLOB, 1679315147), (GO_BLOB, 1727964367)])
def test_published_cosignatures_have_the_layout_keel_reads(blob: str, timestamp: int) -> None:
    raw = base64.b64decode(blob)
    assert len(raw) == cosign.BLOB_SIZE
    assert int.from_bytes(raw[4:12], "big") == timestamp


def test_the_signed_message_is_exactly_the_specs() -> None:
    text = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    assert cosign.message(text, 1679315147) == (
        b"cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n20852163\n"
        b"CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )
    with pytest.raises(ValueError, match="2\\^63"):
        cosign.message(text, 1 << 63)


def test_a_cosignature_verifies_with_plain_ed25519_over_the_spec_message() -> None:
    witness = cosigner("witness.example/w1", 7)
    log = MemoryLog(signer("example.com/log", 1)).append(5)
    note = cosign.cosign(log.note(), witness, 1700000000)
    text, signatures = core.split_note(note)
    assert [s.name for s in signatures] == ["example.com/log", "witness.example/w1"]
    blob = signatures[1].blob
    # key id with type byte 0x04 (not the 0x01 of a plain note signature)
    public = witness.verifier.public_key
    expected_id = hashlib.sha256(b"witness.example/w1\n\x04" + public).digest()[:4]
    assert blob[:4] == expected_id
    assert int.from_bytes(blob[4:12], "big") == 1700000000
    Ed25519PublicKey.from_public_bytes(public).verify(
        blob[12:], b"cosignature/v1\ntime 1700000000\n" + text.encode()
    )
    # the log's own signature is untouched and still verifies
    core.open_checkpoint(note, log.key.verifier)


def test_verifier_key_round_trip_and_type() -> None:
    witness = cosigner("w.example/1", 3)
    text = str(witness.verifier)
    assert CosignatureVerifier.parse(text) == witness.verifier
    assert base64.b64decode(text.split("+")[2])[0] == 0x04
    # a plain note verifier (type 0x01) is not a cosignature key
    with pytest.raises(MalformedError, match="type 0x04"):
        CosignatureVerifier.parse(str(witness.signer.verifier))
    with pytest.raises(MalformedError, match="does not match"):
        CosignatureVerifier.parse(text.replace(text.split("+")[1], "00000000"))
    for bad in ("", "name", "a+b", "a+00000000+!!!"):
        with pytest.raises(MalformedError):
            CosignatureVerifier.parse(bad)


def test_cosignatures_found_forged_and_replaced() -> None:
    log = MemoryLog(signer("log", 1)).append(3)
    a, b = cosigner("wa", 2), cosigner("wb", 4)
    note = cosign.cosign(cosign.cosign(log.note(), a, 100), b, 200)
    found = cosignatures(note, [a.verifier, b.verifier])
    assert [(c.witness, c.timestamp) for c in found] == [("wa", 100), ("wb", 200)]
    # unknown witnesses are ignored, not errors
    assert cosignatures(note, [cosigner("other", 9).verifier]) == []
    # cosigning again replaces the witness's old line (one line per witness)
    again = cosign.cosign(note, a, 300)
    assert len(core.split_note(again)[1]) == 3
    assert {c.timestamp for c in cosignatures(again, [a.verifier])} == {300}
    # a changed checkpoint text no longer verifies under the old cosignature
    forged = note.replace("\n3\n", "\n4\n", 1)
    with pytest.raises(ProofError, match="does not verify"):
        cosignatures(forged, [a.verifier])
    # a changed timestamp does not verify either
    text, sigs = core.split_note(note)
    blob = bytearray(sigs[1].blob)
    blob[11] ^= 1
    tampered = text + "\n" + sigs[0].line() + core.NoteSignature("wa", bytes(blob)).line()
    with pytest.raises(ProofError, match="does not verify"):
        cosignatures(tampered, [a.verifier])
    # a short blob under a known key id is refused, not misread
    short = text + "\n" + core.NoteSignature("wa", bytes(blob[:40])).line()
    with pytest.raises(ProofError, match="bytes"):
        cosignatures(short, [a.verifier])


def test_a_cosignature_is_no_note_signature_and_the_reverse() -> None:
    # the same seed as a plain signed-note key and as a witness key: different ids,
    # so a cosignature cannot pass for the log's signature
    key = signer("same", 5)
    note = cosign.cosign(core.sign_note("text\n", [signer("log", 1)]), Cosigner(key), 5)
    with pytest.raises(ProofError, match="not signed by a trusted key"):
        core.open_note(note, [key.verifier])
