"""What can go wrong in the mesh's cryptographic core.

The split follows h11: a ``LocalProtocolError`` means *we* misused a session
(sent before the handshake finished, a message over the limit, a nonce counter
used up); a ``RemoteProtocolError`` means the *peer* (or whatever sits on the
wire) sent something we refuse. Either way the connection is finished: the
shell logs ``str(err)`` and ``err.hint`` and closes the socket. Neither ever
means the daemon should stop.
"""

from __future__ import annotations

from typing import ClassVar

from keel.errors import KeelError


class MeshError(KeelError):
    """Base of every mesh error."""


class ProtocolError(MeshError):
    """A session cannot go on. ``hint`` says, in a few words, what to look at."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class LocalProtocolError(ProtocolError):
    """We used the session wrongly, or hit one of our own limits."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the protocol (or the bytes were tampered with)."""


class NonceExhausted(LocalProtocolError):
    """A CipherState used its last nonce (2^64 - 2); only a new handshake helps."""


class HandshakeTimeout(RemoteProtocolError):
    """The handshake did not finish within ``SessionConfig.handshake_timeout``."""


class PeerTimeout(RemoteProtocolError):
    """Nothing arrived from the peer for ``SessionConfig.idle_timeout``."""


class KemUnavailable(MeshError):
    """No ML-KEM-768 implementation can be loaded on this host."""


class IdentityError(MeshError):
    """The node's key file is missing, unreadable, malformed or too widely readable."""


class InviteError(MeshError):
    """An invite token was refused; ``reason`` is one of ``REASONS``."""

    REASONS: ClassVar[frozenset[str]] = frozenset(
        {"malformed", "expired", "used-up", "forged", "unknown", "revoked"}
    )

    def __init__(self, message: str, reason: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown invite error reason {reason!r}")
        super().__init__(message)
        self.reason = reason
