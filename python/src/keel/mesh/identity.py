"""A node's identity: its static X25519 key, its Ed25519 signing key, its node id.

- The **static key** (X25519) is what the Noise handshake authenticates.
- The **node id** (:func:`keel.mesh.ids.node_id_of`) names the node
  everywhere (CLI, membership, messages). Whoever holds the static key owns
  the id; peers recompute it from the key the handshake proved.
- The **signing key** (Ed25519) signs membership and room records. It is
  bound to the node by ``binding``, an Ed25519 signature over
  ``"keel-mesh/1 signing-key" || 0x00 || static_public``: the node signs its own
  X25519 key (proof of possession of the Ed25519 key), and the pair
  ``(signing_key, binding)`` travels inside the *encrypted, authenticated*
  handshake payload (so the X25519 key holder vouches for it) and in every
  ``NodeRecord``. A signing key is accepted for a node only if its binding
  verifies against that node's static key.
- Every signature keel makes is domain-separated:
  ``Ed25519.sign("keel-mesh/1 " || domain || 0x00 || message)``.

The key file's form (JSON: version, node id, both private keys in hex) is
made by :meth:`NodeIdentity.to_key_file` and read by :func:`parse_key_file`;
:mod:`keel.mesh.directory` reads and writes the file itself. Pure: no I/O
(the keys come from ``cryptography``, the randomness is a parameter).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from keel.config import parse_json
from keel.errors import ConfigError
from keel.mesh.encoding import b64u_decode, b64u_encode
from keel.mesh.errors import RemoteProtocolError
from keel.mesh.ids import KEY_SIZE, SIGNATURE_SIZE, is_node_id, node_id_of

BINDING_LABEL = b"keel-mesh/1 signing-key\x00"
SIGNATURE_PREFIX = b"keel-mesh/1 "
KEY_FILE_VERSION = 1


def signed_bytes(domain: str, message: bytes) -> bytes:
    """What an Ed25519 signature in ``domain`` actually covers."""
    if not domain or "\x00" in domain:
        raise ValueError("a signature domain is a non-empty string without NUL")
    return SIGNATURE_PREFIX + domain.encode() + b"\x00" + message


def verify_signature(signing_public: bytes, domain: str, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``signing_public``'s signature of ``message`` in ``domain``."""
    return _ed25519_valid(signing_public, signature, signed_bytes(domain, message))


def verify_binding(static_public: bytes, signing_public: bytes, binding: bytes) -> bool:
    """Whether ``binding`` ties ``signing_public`` to the node with ``static_public``."""
    return _ed25519_valid(signing_public, binding, BINDING_LABEL + static_public)


def _ed25519_valid(public: bytes, signature: bytes, signed: bytes) -> bool:
    if len(public) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, signed)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class NodeRecord:
    """The public half of an identity, self-certifying: id, both keys, the binding."""

    node_id: str
    static_key: bytes
    signing_key: bytes
    binding: bytes

    def verify(self) -> None:
        """``RemoteProtocolError`` unless the id matches the key and the binding verifies."""
        if len(self.static_key) != KEY_SIZE or node_id_of(self.static_key) != self.node_id:
            raise RemoteProtocolError(
                f"node record {self.node_id!r}: the id does not match its static key",
                hint="forged or corrupted node record",
            )
        if not verify_binding(self.static_key, self.signing_key, self.binding):
            raise RemoteProtocolError(
                f"node record {self.node_id}: the signing key's binding does not verify",
                hint="forged or corrupted node record",
            )

    def to_json(self) -> dict[str, str]:
        return {
            "node_id": self.node_id,
            "static_key": b64u_encode(self.static_key),
            "signing_key": b64u_encode(self.signing_key),
            "binding": b64u_encode(self.binding),
        }

    @classmethod
    def from_json(cls, data: object) -> NodeRecord:
        """Parse and verify; ``RemoteProtocolError`` for anything malformed or forged."""
        if not isinstance(data, Mapping):
            raise RemoteProtocolError("node record is not a JSON object")
        try:
            record = cls(
                node_id=_node_id_field(data["node_id"]),
                static_key=b64u_decode(data["static_key"], "static_key", KEY_SIZE),
                signing_key=b64u_decode(data["signing_key"], "signing_key", KEY_SIZE),
                binding=b64u_decode(data["binding"], "binding", SIGNATURE_SIZE),
            )
        except KeyError as exc:
            raise RemoteProtocolError(f"node record lacks {exc.args[0]!r}") from None
        except ValueError as exc:
            raise RemoteProtocolError(f"node record: {exc}") from None
        record.verify()
        return record


def _node_id_field(value: object) -> str:
    if not isinstance(value, str) or not is_node_id(value):
        raise ValueError("node_id is not a node id")
    return value


@dataclass(frozen=True, eq=False)
class NodeIdentity:
    """A node's two private keys and everything public derived from them."""

    static_private: bytes = field(repr=False)
    signing_private: bytes = field(repr=False)
    static_public: bytes = field(init=False)
    signing_public: bytes = field(init=False)
    node_id: str = field(init=False)
    binding: bytes = field(init=False, repr=False)
    _signer: Ed25519PrivateKey = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.static_private) != KEY_SIZE or len(self.signing_private) != KEY_SIZE:
            raise ValueError("both private keys are 32 bytes")
        static = X25519PrivateKey.from_private_bytes(self.static_private)
        signer = Ed25519PrivateKey.from_private_bytes(self.signing_private)
        static_public = static.public_key().public_bytes_raw()
        object.__setattr__(self, "static_public", static_public)
        object.__setattr__(self, "signing_public", signer.public_key().public_bytes_raw())
        object.__setattr__(self, "node_id", node_id_of(static_public))
        object.__setattr__(self, "binding", signer.sign(BINDING_LABEL + static_public))
        object.__setattr__(self, "_signer", signer)

    @classmethod
    def generate(cls, random: Callable[[int], bytes] = secrets.token_bytes) -> NodeIdentity:
        return cls(static_private=random(KEY_SIZE), signing_private=random(KEY_SIZE))

    def sign(self, domain: str, message: bytes) -> bytes:
        """Ed25519 signature of ``message`` in ``domain`` (see ``verify_signature``)."""
        return self._signer.sign(signed_bytes(domain, message))

    def record(self) -> NodeRecord:
        return NodeRecord(self.node_id, self.static_public, self.signing_public, self.binding)

    def to_key_file(self) -> str:
        return (
            json.dumps(
                {
                    "version": KEY_FILE_VERSION,
                    "node_id": self.node_id,
                    "static_private": self.static_private.hex(),
                    "signing_private": self.signing_private.hex(),
                },
                indent=1,
            )
            + "\n"
        )


def parse_key_file(raw: bytes) -> NodeIdentity:
    """The identity in a key file's bytes; ``ValueError`` saying what is malformed."""
    try:
        data: Any = parse_json(raw, source="JSON")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 (reported as malformed, like the rest)
    if data.get("version") != KEY_FILE_VERSION:
        raise ValueError(f"version must be {KEY_FILE_VERSION}")
    if set(data) != {"version", "node_id", "static_private", "signing_private"}:
        raise ValueError("expected exactly version, node_id, static_private, signing_private")
    identity = NodeIdentity(
        static_private=_hex_key(data["static_private"], "static_private"),
        signing_private=_hex_key(data["signing_private"], "signing_private"),
    )
    if identity.node_id != data["node_id"]:
        raise ValueError(
            f"node_id {data['node_id']!r} does not match the static key (it derives "
            f"{identity.node_id}); the file was edited or corrupted"
        )
    return identity


def _hex_key(value: object, what: str) -> bytes:
    if not isinstance(value, str) or re.fullmatch(r"[0-9a-f]{64}", value) is None:
        raise ValueError(f"{what} must be 64 lowercase hex digits")
    return bytes.fromhex(value)
