"""C2SP ``tlog-cosignature`` v1 (Ed25519): a witness's signature on a checkpoint.

Pure: no I/O, the time is a parameter.

A cosignature is a signed-note signature line (``— <name> base64(blob)``)
added to a checkpoint note. For the Ed25519 type:

- the key id is ``SHA-256(name || 0x0A || 0x04 || public key)[:4]``;
- the blob is ``key id (4) || timestamp (u64, big-endian) || signature (64)``;
- the signed message is ``"cosignature/v1\\n" || "time " || decimal(timestamp)
  || "\\n" || the checkpoint text`` (every line of the note before the blank
  line, the final newline included).

Semantically, a cosignature says: *as of this time, the largest consistent
tree head the witness has seen for this log has this root* (the witness
checked consistency before signing). The key is a plain Ed25519 seed kept in
a signed-note signer key file (``PRIVATE+KEY+...``, as
:mod:`keel.ledger.keys` writes them); its verifier key for cosignatures is
written ``name+hexid+base64(0x04 || public key)``, the form Go's
``transparency-dev/formats/note`` reads. The name is not signed, so one key
must serve one witness name only.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keel.ledger.core import NoteSignature, Signer, key_id, split_note
from keel.ledger.errors import MalformedError, ProofError

ED25519_COSIGNATURE = 0x04
HEADER = "cosignature/v1\n"
MAX_TIMESTAMP = (1 << 63) - 1
BLOB_SIZE = 4 + 8 + 64


def message(text: str, timestamp: int) -> bytes:
    """The bytes an Ed25519 cosignature signs over checkpoint ``text`` at ``timestamp``."""
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise ValueError(f"a cosignature timestamp is 0 to 2^63-1, got {timestamp}")
    return f"{HEADER}time {timestamp}\n{text}".encode()


@dataclass(frozen=True)
class CosignatureVerifier:
    """A witness's public key for cosignature/v1: ``name+hexid+base64(0x04 || key)``."""

    name: str
    public_key: bytes

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.public_key, ED25519_COSIGNATURE)

    @classmethod
    def parse(cls, text: str) -> CosignatureVerifier:
        if not isinstance(text, str):
            raise MalformedError("a witness key is a string name+hexid+base64")
        parts = text.strip().split("+", 2)  # base64 may hold '+', names may not
        if len(parts) != 3:
            raise MalformedError("a witness key has the form name+hexkeyid+base64key")
        name, hex_id, material = parts
        if not name or any(c.isspace() for c in name) or not name.isprintable():
            raise MalformedError(f"witness key name {name[:60]!r} is empty or not printable")
        try:
            raw = base64.b64decode(material.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise MalformedError("the witness key is not valid base64") from None
        if len(raw) != 33 or raw[0] != ED25519_COSIGNATURE:
            raise MalformedError(
                "the witness key is not an Ed25519 cosignature key (type 0x04, 32 bytes)"
            )
        verifier = cls(name, raw[1:])
        if not re.fullmatch(r"[0-9a-f]{8}", hex_id) or int(hex_id, 16) != verifier.key_id:
            raise MalformedError(f"the witness key's id {hex_id!r} does not match its name and key")
        return verifier

    def __str__(self) -> str:
        material = base64.b64encode(bytes([ED25519_COSIGNATURE]) + self.public_key).decode()
        return f"{self.name}+{self.key_id:08x}+{material}"

    def timestamp_of(self, text: str, signature: NoteSignature) -> int:
        """The time of ``signature``, a cosignature of ``text`` by this key; :class:`ProofError` if not."""
        blob = signature.blob
        if signature.name != self.name or signature.key_id != self.key_id:
            raise ProofError(f"the signature of {signature.name} is not by witness {self.name}")
        if len(blob) != BLOB_SIZE:
            raise ProofError(
                f"the cosignature of {self.name} is {len(blob)} bytes, not {BLOB_SIZE}"
            )
        timestamp = int.from_bytes(blob[4:12], "big")
        if timestamp > MAX_TIMESTAMP:
            raise ProofError(f"the cosignature of {self.name} has an impossible timestamp")
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(
                blob[12:], message(text, timestamp)
            )
        except (InvalidSignature, ValueError):
            raise ProofError(
                f"the cosignature of {self.name} ({self.key_id:08x}) does not verify"
            ) from None
        return timestamp


@dataclass(frozen=True)
class Cosigner:
    """A witness's signing key (the seed of a signed-note signer key) and its name."""

    signer: Signer

    @property
    def name(self) -> str:
        return self.signer.name

    @property
    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.signer.name, self.signer.verifier.public_key)

    def signature(self, text: str, timestamp: int) -> NoteSignature:
        """The cosignature line of checkpoint ``text`` at ``timestamp`` (POSIX seconds)."""
        signed = self.signer.sign(message(text, timestamp))
        head = self.verifier.key_id.to_bytes(4, "big") + timestamp.to_bytes(8, "big")
        return NoteSignature(self.name, head + signed)


def cosign(note: str, cosigner: Cosigner, timestamp: int) -> str:
    """``note`` with ``cosigner``'s cosignature at ``timestamp`` (replacing an older one of it).

    The note's own signatures are kept as they are; they are not checked
    here: check the log's signature first (the witness does).
    """
    text, signatures = split_note(note)
    mine = cosigner.verifier
    kept = [s for s in signatures if (s.name, s.key_id) != (mine.name, mine.key_id)]
    kept.append(cosigner.signature(text, timestamp))
    return text + "\n" + "".join(s.line() for s in kept)


@dataclass(frozen=True)
class Cosignature:
    witness: str  # the key name
    key: CosignatureVerifier
    timestamp: int


def cosignatures(note: str, verifiers: list[CosignatureVerifier]) -> list[Cosignature]:
    """The valid cosignatures of ``note`` by the known ``verifiers`` (others are ignored).

    A signature line by a known witness key that does not verify is a
    :class:`ProofError`: a forged or damaged cosignature is not quietly skipped.
    """
    text, signatures = split_note(note)
    known = {(v.name, v.key_id): v for v in verifiers}
    found = []
    for signature in signatures:
        verifier = known.get((signature.name, signature.key_id))
        if verifier is not None:
            found.append(
                Cosignature(verifier.name, verifier, verifier.timestamp_of(text, signature))
            )
    return found
