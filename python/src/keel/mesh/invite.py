"""Invite tokens and the proof a joiner gives inside the handshake. Pure.

A token is ``"keelinv1." + base64url(JSON)`` (unpadded) where the JSON object
has exactly these keys::

    {"v": 1, "node": "<inviter node id>", "addrs": ["host:port", ...],
     "key": "<inviter X25519 static key, base64url>",
     "secret": "<32-byte one-time secret, base64url>",
     "exp": <expiry, Unix seconds>, "uses": <uses allowed>}

The **invite id** names a token without revealing its secret::

    invite_id = BLAKE2s-256("keel-mesh/1 invite-id" || 0x00 || secret)[:16]

The joiner dials one of ``addrs`` and pins the responder's static key to
``key`` (so the handshake cannot be intercepted). In handshake message 3
(encrypted, after the joiner's static key) it sends ``invite_id`` and::

    proof = HMAC-BLAKE2s(secret, "keel-mesh/1 invite-proof" || 0x00
                                 || invite_id || h2 || joiner_static)

where ``h2`` is the Noise handshake hash right after message 2 (both sides
hold it) and ``joiner_static`` the joiner's X25519 public key. The proof is
bound to this very handshake (``h2`` covers both ephemerals) and to the
joiner's key, so it cannot be replayed or moved to another session, and it
travels encrypted, so a passive observer learns nothing. The inviter is
authoritative for expiry and remaining uses: it keeps an ``InviteRecord`` per
token, and the copy of ``exp``/``uses`` in the token is only for the joiner's
information (editing them achieves nothing).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from keel.config import parse_json
from keel.errors import ConfigError, UsageError
from keel.mesh.encoding import b64u_decode, b64u_encode, is_address
from keel.mesh.errors import InviteError
from keel.mesh.identity import NodeIdentity
from keel.mesh.ids import KEY_SIZE, is_node_id, node_id_of

TOKEN_PREFIX = "keelinv1."  # noqa: S105 (a format marker, not a secret)
TOKEN_VERSION = 1
SECRET_SIZE = 32
INVITE_ID_SIZE = 16
PROOF_SIZE = 32
MAX_ADDRESSES = 16
MAX_TOKEN_LEN = 8192
MAX_USES = 1_000_000
INVITE_ID_LABEL = b"keel-mesh/1 invite-id\x00"
PROOF_LABEL = b"keel-mesh/1 invite-proof\x00"
_TOKEN_KEYS = frozenset({"v", "node", "addrs", "key", "secret", "exp", "uses"})


def invite_id_of(secret: bytes) -> bytes:
    return hashlib.blake2s(INVITE_ID_LABEL + secret).digest()[:INVITE_ID_SIZE]


def invite_proof(secret: bytes, handshake_hash: bytes, joiner_static: bytes) -> bytes:
    """The joiner's proof of ``secret`` for the handshake whose hash after message 2 is given."""
    message = PROOF_LABEL + invite_id_of(secret) + handshake_hash + joiner_static
    return hmac.new(secret, message, hashlib.blake2s).digest()


@dataclass(frozen=True)
class InviteClaim:
    """What a joiner presented in handshake message 3 (the session fills it in)."""

    invite_id: bytes
    proof: bytes = field(repr=False)
    handshake_hash: bytes = field(repr=False)  # h after message 2
    joiner_static: bytes = field(repr=False)

    def verify(self, secret: bytes) -> bool:
        """Whether the joiner proved knowledge of ``secret`` in this handshake."""
        if invite_id_of(secret) != self.invite_id:
            return False
        expected = invite_proof(secret, self.handshake_hash, self.joiner_static)
        return hmac.compare_digest(expected, self.proof)


@dataclass(frozen=True)
class InviteToken:
    node_id: str
    addresses: tuple[str, ...]
    static_key: bytes
    secret: bytes = field(repr=False)
    expires: int
    uses: int

    @property
    def invite_id(self) -> bytes:
        return invite_id_of(self.secret)

    def encode(self) -> str:
        body = {
            "v": TOKEN_VERSION,
            "node": self.node_id,
            "addrs": list(self.addresses),
            "key": b64u_encode(self.static_key),
            "secret": b64u_encode(self.secret),
            "exp": self.expires,
            "uses": self.uses,
        }
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        return TOKEN_PREFIX + b64u_encode(text.encode())

    @classmethod
    def decode(cls, text: str) -> InviteToken:
        """Parse a token; ``InviteError`` ("malformed" or "forged") says what is wrong."""
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise InviteError(
                f"not a keel invite token (it should start with {TOKEN_PREFIX!r})", "malformed"
            )
        if len(text) > MAX_TOKEN_LEN:
            raise InviteError("invite token is too long", "malformed")
        try:
            body: Any = parse_json(b64u_decode(text[len(TOKEN_PREFIX) :], "token"), source="JSON")
            token = _token_from_json(body)
        except (ValueError, binascii.Error, UnicodeDecodeError, ConfigError) as exc:
            raise InviteError(
                f"invite token is damaged ({exc}); copy the whole token again", "malformed"
            ) from None
        if node_id_of(token.static_key) != token.node_id:
            raise InviteError(
                "invite token's node id does not match its key: the token was edited or forged",
                "forged",
            )
        return token

    def check_fresh(self, now: float) -> None:
        """The joiner's early check: ``InviteError("expired")`` once ``exp`` has passed."""
        if now >= self.expires:
            raise InviteError(
                f"invite token from {self.node_id} expired; ask for a new one", "expired"
            )


def _token_from_json(body: object) -> InviteToken:
    if not isinstance(body, Mapping):
        raise ValueError("not a JSON object")  # noqa: TRY004 (a damaged token, like the rest)
    if set(body) != _TOKEN_KEYS:
        raise ValueError(f"fields must be exactly {', '.join(sorted(_TOKEN_KEYS))}")
    if type(body["v"]) is not int or body["v"] != TOKEN_VERSION:
        raise ValueError(f"unsupported token version {body['v']!r}")
    if not is_node_id(body["node"]):
        raise ValueError("node is not a node id")
    addresses = body["addrs"]
    if (
        not isinstance(addresses, list)
        or not 1 <= len(addresses) <= MAX_ADDRESSES
        or not all(is_address(a) for a in addresses)
    ):
        raise ValueError(f"addrs must list 1 to {MAX_ADDRESSES} host:port strings")
    for name in ("exp", "uses"):
        if not isinstance(body[name], int) or isinstance(body[name], bool) or body[name] < 0:
            raise ValueError(f"{name} must be a non-negative integer")
    return InviteToken(
        node_id=body["node"],
        addresses=tuple(addresses),
        static_key=b64u_decode(body["key"], "key", KEY_SIZE),
        secret=b64u_decode(body["secret"], "secret", SECRET_SIZE),
        expires=body["exp"],
        uses=body["uses"],
    )


def new_invite(
    identity: NodeIdentity,
    addresses: Sequence[str],
    *,
    now: float,
    ttl: float,
    uses: int = 1,
    random: Callable[[int], bytes] = secrets.token_bytes,
) -> InviteToken:
    """A fresh token for ``identity``, reachable at ``addresses``; ``UsageError`` for bad input."""
    if ttl <= 0:
        raise UsageError(f"invite ttl must be positive, got {ttl}")
    if not 1 <= uses <= MAX_USES:
        raise UsageError(f"invite uses must be between 1 and {MAX_USES}, got {uses}")
    if not 1 <= len(addresses) <= MAX_ADDRESSES:
        raise UsageError(f"an invite carries 1 to {MAX_ADDRESSES} addresses, got {len(addresses)}")
    for address in addresses:
        if not is_address(address):
            raise UsageError(f"invite address {address!r} is not host:port")
    return InviteToken(
        node_id=identity.node_id,
        addresses=tuple(addresses),
        static_key=identity.static_public,
        secret=random(SECRET_SIZE),
        expires=int(now + ttl),
        uses=uses,
    )


@dataclass(frozen=True)
class InviteRecord:
    """The inviter's state for one token: what ``redeem`` checks and counts down."""

    invite_id: bytes
    secret: bytes = field(repr=False)
    expires: int
    uses_left: int

    @classmethod
    def from_token(cls, token: InviteToken) -> InviteRecord:
        return cls(token.invite_id, token.secret, token.expires, token.uses)

    def redeem(self, now: float) -> InviteRecord:
        """This record after one more join; ``InviteError`` if expired or used up."""
        if now >= self.expires:
            raise InviteError("invite expired; ask the inviter for a new token", "expired")
        if self.uses_left <= 0:
            raise InviteError("invite already used up; ask the inviter for a new token", "used-up")
        return replace(self, uses_left=self.uses_left - 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "invite_id": b64u_encode(self.invite_id),
            "secret": b64u_encode(self.secret),
            "expires": self.expires,
            "uses_left": self.uses_left,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InviteRecord:
        record = cls(
            invite_id=b64u_decode(data["invite_id"], "invite_id", INVITE_ID_SIZE),
            secret=b64u_decode(data["secret"], "secret", SECRET_SIZE),
            expires=int(data["expires"]),
            uses_left=int(data["uses_left"]),
        )
        if invite_id_of(record.secret) != record.invite_id:
            raise ValueError("invite record's id does not match its secret")
        return record
