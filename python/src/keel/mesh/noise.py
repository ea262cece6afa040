"""The Noise Protocol Framework (revision 34) with the hfs extension, pure.

This is the spec's three objects, nothing more: ``CipherState`` (a key and a
64-bit nonce), ``SymmetricState`` (the chaining key and the handshake hash) and
``HandshakeState`` (a pattern's tokens, processed one message at a time). No
sockets, no clock; randomness comes in as ``random(n) -> bytes``.

Supported: every one-way, interactive and deferred pattern of the spec
(section 7), the ``pskN`` modifiers (section 9) and the ``hfs`` modifier of
the Noise HFS extension (``e1``/``ekem1`` tokens with a KEM); DH ``25519`` and
``448``, ciphers ``ChaChaPoly`` and ``AESGCM``, hashes ``SHA256``, ``SHA512``,
``BLAKE2s`` and ``BLAKE2b``. The published vectors (cacophony, snow) exercise
all of it; the mesh uses ``Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s``.

HFS token rules (Noise HFS spec, section 4 and 5), as implemented here:

- ``e1`` (write): ``e1 = KEM.keygen(random(64))``; append
  ``EncryptAndHash(e1.public_key)``. (read): ``re1 = DecryptAndHash(next
  KEM_PUBLIC_LEN (+16 if HasKey) bytes)``.
- ``ekem1`` (write): ``ct, ss = KEM.encapsulate(re1)``; append
  ``EncryptAndHash(ct)``; ``MixKey(ss)``. (read): ``ct = DecryptAndHash(next
  KEM_CIPHERTEXT_LEN (+16 if HasKey) bytes)``; ``MixKey(KEM.decapsulate(e1, ct))``.
- The ``hfs`` modifier puts ``e1`` right after the first ``e`` token (or after
  the first DH token of that message, if it has one, so the key travels
  encrypted) and ``ekem1`` right after the first ``ee``. For ``XX``::

      -> e, e1
      <- e, ee, ekem1, s, es
      -> s, se
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x448, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from keel.mesh.errors import LocalProtocolError, NonceExhausted, RemoteProtocolError
from keel.mesh.kem import Kem, KemKeyPair

MAX_MESSAGE_LEN = 65535
TAG_LEN = 16
MAX_NONCE = 2**64 - 1  # reserved by the spec: no message is ever sent with it
KEY_LEN = 32

RandomSource = Callable[[int], bytes]
Buffer = bytes | bytearray | memoryview


# --------------------------------------------------------------------- hashes


@dataclass(frozen=True)
class HashFunction:
    name: str
    hashlen: int
    blocklen: int
    constructor: Callable[..., Any]

    def hash(self, data: bytes) -> bytes:
        return bytes(self.constructor(data).digest())

    def hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.constructor).digest()

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
        """Noise's HKDF: 2 or 3 outputs of HASHLEN bytes each."""
        temp_key = self.hmac(chaining_key, ikm)
        out1 = self.hmac(temp_key, b"\x01")
        out2 = self.hmac(temp_key, out1 + b"\x02")
        if outputs == 2:
            return out1, out2
        return out1, out2, self.hmac(temp_key, out2 + b"\x03")


HASHES = {
    "SHA256": HashFunction("SHA256", 32, 64, hashlib.sha256),
    "SHA512": HashFunction("SHA512", 64, 128, hashlib.sha512),
    "BLAKE2s": HashFunction("BLAKE2s", 32, 64, hashlib.blake2s),
    "BLAKE2b": HashFunction("BLAKE2b", 64, 128, hashlib.blake2b),
}


# -------------------------------------------------------------------- ciphers


class _Aead(Protocol):
    def encrypt(self, nonce: bytes, data: Buffer, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: Buffer, associated_data: bytes | None) -> bytes: ...


@dataclass(frozen=True)
class CipherFunction:
    name: str
    aead: Callable[[bytes], _Aead]
    nonce: Callable[[int], bytes]


CIPHERS = {
    # ChaChaPoly: 32 bits of zeros, then the nonce little-endian; AESGCM: big-endian.
    "ChaChaPoly": CipherFunction(
        "ChaChaPoly", ChaCha20Poly1305, lambda n: b"\x00" * 4 + n.to_bytes(8, "little")
    ),
    "AESGCM": CipherFunction("AESGCM", AESGCM, lambda n: b"\x00" * 4 + n.to_bytes(8, "big")),
}


# ------------------------------------------------------------------ DH curves


@dataclass(frozen=True, eq=False)
class KeyPair:
    private: bytes
    public: bytes
    handle: Any


@dataclass(frozen=True)
class DHFunction:
    name: str
    dhlen: int
    private_type: Any
    public_type: Any

    def keypair(self, private: bytes) -> KeyPair:
        if len(private) != self.dhlen:
            raise LocalProtocolError(f"{self.name} private key must be {self.dhlen} bytes")
        handle = self.private_type.from_private_bytes(private)
        return KeyPair(bytes(private), handle.public_key().public_bytes_raw(), handle)

    def generate(self, random: RandomSource) -> KeyPair:
        return self.keypair(random(self.dhlen))

    def dh(self, keypair: KeyPair, public: bytes) -> bytes:
        try:
            return bytes(keypair.handle.exchange(self.public_type.from_public_bytes(public)))
        except ValueError as exc:
            # cryptography refuses low-order points (an all-zero shared secret).
            raise RemoteProtocolError(
                f"{self.name} key agreement failed: {exc}",
                hint="the peer sent an invalid or low-order public key",
            ) from exc


DHS = {
    "25519": DHFunction("25519", 32, x25519.X25519PrivateKey, x25519.X25519PublicKey),
    "448": DHFunction("448", 56, x448.X448PrivateKey, x448.X448PublicKey),
}


# --------------------------------------------------------------- CipherState


def _tampered() -> RemoteProtocolError:
    return RemoteProtocolError(
        "decryption failed (bad authentication tag)",
        hint="tampered, replayed, reordered or truncated data, or a wrong key",
    )


class CipherState:
    """A key ``k`` (or none) and a nonce ``n``; section 5.1.

    ``encrypt_into``/``decrypt_into`` are ``encrypt_with_ad``/``decrypt_with_ad``
    writing into a buffer the caller owns (no new object per message). They use
    the AEAD's own ``encrypt_into``/``decrypt_into`` (cryptography 47.0.0 and
    newer) and fall back to ``encrypt``/``decrypt`` and a copy where those are
    absent; the bytes are the same either way.
    """

    __slots__ = ("_aead", "_decrypt_into", "_encrypt_into", "cipher", "key", "nonce")

    def __init__(self, cipher: CipherFunction, key: bytes | None = None) -> None:
        self.cipher = cipher
        self.key: bytes | None = None
        self.nonce = 0
        self._aead: _Aead | None = None
        self._encrypt_into: Callable[[bytes, Buffer, bytes, memoryview], Any] | None = None
        self._decrypt_into: Callable[[bytes, Buffer, bytes, memoryview], Any] | None = None
        self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        self.key = key
        self.nonce = 0
        self._aead = None if key is None else self.cipher.aead(key)
        self._encrypt_into = getattr(self._aead, "encrypt_into", None)
        self._decrypt_into = getattr(self._aead, "decrypt_into", None)

    def has_key(self) -> bool:
        return self.key is not None

    def set_nonce(self, nonce: int) -> None:
        if not 0 <= nonce <= MAX_NONCE:
            raise LocalProtocolError(f"nonce {nonce} out of range")
        self.nonce = nonce

    def _nonce(self, direction: str) -> bytes:
        """The current nonce's bytes; ``NonceExhausted`` at 2^64 - 1 (reserved)."""
        if self.nonce >= MAX_NONCE:
            raise NonceExhausted(
                f"{direction} nonce exhausted (2^64 - 1 is reserved)",
                hint="start a new handshake",
            )
        return self.cipher.nonce(self.nonce)

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        ciphertext = self._aead.encrypt(self._nonce("sending"), plaintext, ad)
        self.nonce += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: Buffer) -> bytes:
        if self._aead is None:
            return bytes(ciphertext)
        nonce = self._nonce("receiving")
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, ad)
        except InvalidTag:
            raise _tampered() from None
        self.nonce += 1
        return plaintext

    def encrypt_into(self, ad: bytes, plaintext: Buffer, out: memoryview) -> None:
        """``encrypt_with_ad`` into ``out``: exactly ``len(plaintext) + TAG_LEN`` bytes (with a key).

        ``out`` must not overlap ``plaintext``. Without a key the plaintext is
        copied (``out`` then as long as it).
        """
        if self._aead is None:
            out[:] = plaintext
            return
        nonce = self._nonce("sending")
        if self._encrypt_into is not None:
            self._encrypt_into(nonce, plaintext, ad, out)
        else:  # cryptography before 47.0.0
            out[:] = self._aead.encrypt(nonce, plaintext, ad)
        self.nonce += 1

    def decrypt_into(self, ad: bytes, ciphertext: Buffer, out: memoryview) -> None:
        """``decrypt_with_ad`` into ``out``: exactly ``len(ciphertext) - TAG_LEN`` bytes (with a key).

        When the tag does not verify, ``out`` may hold unauthenticated bytes:
        the caller must drop them (the session does: it is dead then).
        """
        if self._aead is None:
            out[:] = ciphertext
            return
        nonce = self._nonce("receiving")
        try:
            if self._decrypt_into is not None:
                self._decrypt_into(nonce, ciphertext, ad, out)
            else:  # cryptography before 47.0.0
                out[:] = self._aead.decrypt(nonce, ciphertext, ad)
        except InvalidTag:
            raise _tampered() from None
        self.nonce += 1

    def rekey(self) -> None:
        """``k = REKEY(k)``: the first 32 bytes of ENCRYPT(k, 2^64-1, "", zeros); n unchanged."""
        if self._aead is None or self.key is None:
            raise LocalProtocolError("cannot rekey a CipherState without a key")
        nonce = self.nonce
        new_key = self._aead.encrypt(self.cipher.nonce(MAX_NONCE), bytes(KEY_LEN), b"")[:KEY_LEN]
        self.initialize_key(new_key)
        self.nonce = nonce


# ------------------------------------------------------------ SymmetricState


class SymmetricState:
    """The chaining key ``ck``, the handshake hash ``h`` and a CipherState; section 5.2."""

    def __init__(self, protocol_name: bytes, cipher: CipherFunction, hash_fn: HashFunction) -> None:
        self.hash_fn = hash_fn
        self.cipher = cipher
        if len(protocol_name) <= hash_fn.hashlen:
            self.h = protocol_name.ljust(hash_fn.hashlen, b"\x00")
        else:
            self.h = hash_fn.hash(protocol_name)
        self.ck = self.h
        self.cipher_state = CipherState(cipher)

    def _key(self, temp_k: bytes) -> bytes:
        return temp_k[:KEY_LEN]  # truncated when HASHLEN is 64

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = self.hash_fn.hkdf(self.ck, ikm, 2)
        self.cipher_state.initialize_key(self._key(temp_k))

    def mix_hash(self, data: bytes) -> None:
        self.h = self.hash_fn.hash(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = self.hash_fn.hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher_state.initialize_key(self._key(temp_k))

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher_state.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher_state.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = self.hash_fn.hkdf(self.ck, b"", 2)
        return (
            CipherState(self.cipher, self._key(temp_k1)),
            CipherState(self.cipher, self._key(temp_k2)),
        )


# ------------------------------------------------------------------ patterns

# name: (initiator pre-message, responder pre-message, messages); messages
# alternate, initiator first. Section 7.4 (one-way), 7.5 (interactive), 7.6
# (deferred).
_BASE_PATTERNS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "N": ("", "s", ("e, es",)),
    "K": ("s", "s", ("e, es, ss",)),
    "X": ("", "s", ("e, es, s, ss",)),
    "NN": ("", "", ("e", "e, ee")),
    "NK": ("", "s", ("e, es", "e, ee")),
    "NX": ("", "", ("e", "e, ee, s, es")),
    "KN": ("s", "", ("e", "e, ee, se")),
    "KK": ("s", "s", ("e, es, ss", "e, ee, se")),
    "KX": ("s", "", ("e", "e, ee, se, s, es")),
    "XN": ("", "", ("e", "e, ee", "s, se")),
    "XK": ("", "s", ("e, es", "e, ee", "s, se")),
    "XX": ("", "", ("e", "e, ee, s, es", "s, se")),
    "IN": ("", "", ("e, s", "e, ee, se")),
    "IK": ("", "s", ("e, es, s, ss", "e, ee, se")),
    "IX": ("", "", ("e, s", "e, ee, se, s, es")),
    "NK1": ("", "s", ("e", "e, ee, es")),
    "NX1": ("", "", ("e", "e, ee, s", "es")),
    "X1N": ("", "", ("e", "e, ee", "s", "se")),
    "X1K": ("", "s", ("e, es", "e, ee", "s", "se")),
    "XK1": ("", "s", ("e", "e, ee, es", "s, se")),
    "X1K1": ("", "s", ("e", "e, ee, es", "s", "se")),
    "X1X": ("", "", ("e", "e, ee, s, es", "s", "se")),
    "XX1": ("", "", ("e", "e, ee, s", "es, s, se")),
    "X1X1": ("", "", ("e", "e, ee, s", "es, s", "se")),
    "K1N": ("s", "", ("e", "e, ee", "se")),
    "K1K": ("s", "s", ("e, es", "e, ee", "se")),
    "KK1": ("s", "s", ("e", "e, ee, se, es")),
    "K1K1": ("s", "s", ("e", "e, ee, es", "se")),
    "K1X": ("s", "", ("e", "e, ee, s, es", "se")),
    "KX1": ("s", "", ("e", "e, ee, se, s", "es")),
    "K1X1": ("s", "", ("e", "e, ee, s", "se, es")),
    "I1N": ("", "", ("e, s", "e, ee", "se")),
    "I1K": ("", "s", ("e, es, s", "e, ee", "se")),
    "IK1": ("", "s", ("e, s", "e, ee, se, es")),
    "I1K1": ("", "s", ("e, s", "e, ee, es", "se")),
    "I1X": ("", "", ("e, s", "e, ee, s, es", "se")),
    "IX1": ("", "", ("e, s", "e, ee, se, s", "es")),
    "I1X1": ("", "", ("e, s", "e, ee, s", "se, es")),
}
_ONE_WAY = frozenset({"N", "K", "X"})
_DH_TOKENS = frozenset({"ee", "es", "se", "ss"})


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclass(frozen=True)
class HandshakePattern:
    """A pattern after its modifiers: pre-messages and the tokens of each message."""

    name: str
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]
    one_way: bool
    psk: bool
    hfs: bool

    @classmethod
    def parse(cls, name: str) -> HandshakePattern:
        match = re.fullmatch(r"([NKXI]1?[NKX]?1?)((?:psk\d+|hfs)(?:\+(?:psk\d+|hfs))*)?", name)
        if match is None or match.group(1) not in _BASE_PATTERNS:
            raise LocalProtocolError(f"unknown or unsupported Noise pattern {name!r}")
        base = match.group(1)
        init_pre, resp_pre, message_texts = _BASE_PATTERNS[base]
        messages = [list(_tokens(m)) for m in message_texts]
        modifiers = match.group(2).split("+") if match.group(2) else []
        if len(set(modifiers)) != len(modifiers):
            raise LocalProtocolError(f"repeated modifier in Noise pattern {name!r}")
        for modifier in modifiers:
            if modifier == "hfs":
                if base in _ONE_WAY:
                    raise LocalProtocolError(f"hfs needs an interactive pattern, not {base}")
                _apply_hfs(messages)
            else:
                index = int(modifier[3:])
                if index > len(messages):
                    raise LocalProtocolError(f"{modifier} is past the last message of {base}")
                if index == 0:
                    messages[0].insert(0, "psk")
                else:
                    messages[index - 1].append("psk")
        return cls(
            name=name,
            initiator_pre=_tokens(init_pre),
            responder_pre=_tokens(resp_pre),
            messages=tuple(tuple(m) for m in messages),
            one_way=base in _ONE_WAY,
            psk=any(m.startswith("psk") for m in modifiers),
            hfs="hfs" in modifiers,
        )


def _apply_hfs(messages: list[list[str]]) -> None:
    for tokens in messages:
        if "e" in tokens:
            dh_positions = [i for i, t in enumerate(tokens) if t in _DH_TOKENS]
            at = dh_positions[0] + 1 if dh_positions else tokens.index("e") + 1
            tokens.insert(at, "e1")
            break
    for tokens in messages:
        if "ee" in tokens:
            tokens.insert(tokens.index("ee") + 1, "ekem1")
            break


@dataclass(frozen=True)
class NoiseProtocol:
    """A parsed protocol name: ``Noise_<pattern>_<dh>[+<kem>]_<cipher>_<hash>``."""

    name: str
    pattern: HandshakePattern
    dh: DHFunction
    kem_name: str | None
    cipher: CipherFunction
    hash: HashFunction

    @classmethod
    def parse(cls, name: str) -> NoiseProtocol:
        parts = name.split("_")
        if len(parts) != 5 or parts[0] != "Noise":
            raise LocalProtocolError(f"malformed Noise protocol name {name!r}")
        _, pattern_name, dh_name, cipher_name, hash_name = parts
        pattern = HandshakePattern.parse(pattern_name)
        dh_name, _, kem_name = dh_name.partition("+")
        if dh_name not in DHS or cipher_name not in CIPHERS or hash_name not in HASHES:
            raise LocalProtocolError(f"unsupported primitive in Noise protocol name {name!r}")
        if pattern.hfs != bool(kem_name):
            raise LocalProtocolError(
                f"{name!r}: the hfs modifier and a '+KEM' name go together (both or neither)"
            )
        return cls(
            name=name,
            pattern=pattern,
            dh=DHS[dh_name],
            kem_name=kem_name or None,
            cipher=CIPHERS[cipher_name],
            hash=HASHES[hash_name],
        )


# ------------------------------------------------------------ HandshakeState


class HandshakeState:
    """One side of a handshake; section 5.3 plus the hfs tokens.

    ``s`` is the local static private key, ``rs`` the remote static public key
    (for patterns that pre-share it), ``e``/``re`` likewise for pre-message
    ephemerals, ``psks`` the pre-shared keys in the order their tokens appear.
    ``kem`` is required for hfs protocols. Any error leaves the object unusable.
    """

    def __init__(
        self,
        protocol: NoiseProtocol | str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        s: bytes | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
        kem: Kem | None = None,
        random: RandomSource = secrets.token_bytes,
    ) -> None:
        if isinstance(protocol, str):
            protocol = NoiseProtocol.parse(protocol)
        self.protocol = protocol
        self.initiator = initiator
        pattern = protocol.pattern
        if protocol.kem_name is not None and (kem is None or kem.name != protocol.kem_name):
            raise LocalProtocolError(
                f"{protocol.name} needs a {protocol.kem_name} KEM, got {kem!r}"
            )
        self.kem = kem
        self.random = random
        dh = protocol.dh
        self.s = dh.keypair(s) if s is not None else None
        self.e = dh.keypair(e) if e is not None else None
        self.rs = bytes(rs) if rs is not None else None
        self.re = bytes(re) if re is not None else None
        self.e1: KemKeyPair | None = None
        self.re1: bytes | None = None
        wanted_psks = sum(m.count("psk") for m in pattern.messages)
        if len(psks) != wanted_psks:
            raise LocalProtocolError(f"{protocol.name} needs {wanted_psks} PSKs, got {len(psks)}")
        if any(len(p) != 32 for p in psks):
            raise LocalProtocolError("every PSK must be 32 bytes")
        self._psks = [bytes(p) for p in psks]
        self.symmetric = SymmetricState(protocol.name.encode(), protocol.cipher, protocol.hash)
        self.symmetric.mix_hash(prologue)
        for side_is_initiator, tokens in (
            (True, pattern.initiator_pre),
            (False, pattern.responder_pre),
        ):
            mine = side_is_initiator == initiator
            for op in tokens:
                if mine:
                    pair = self.s if op == "s" else self.e
                    key = pair.public if pair is not None else None
                else:
                    key = self.rs if op == "s" else self.re
                if key is None:
                    raise LocalProtocolError(
                        f"{protocol.name}: pre-message key {'' if mine else 'r'}{op} is missing"
                    )
                self.symmetric.mix_hash(key)
                if op == "e" and pattern.psk:
                    self.symmetric.mix_key(key)
        self.message_index = 0
        self.complete = False
        self._failed: BaseException | None = None
        self._split: tuple[CipherState, CipherState] | None = None

    # -- queries

    @property
    def handshake_hash(self) -> bytes:
        """``h`` as it stands (the channel binding once ``complete``)."""
        return self.symmetric.h

    @property
    def remote_static(self) -> bytes | None:
        return self.rs

    def is_my_turn(self) -> bool:
        if self.complete:
            return False
        initiator_sends = self.protocol.pattern.one_way or self.message_index % 2 == 0
        return initiator_sends == self.initiator

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport CipherStates ``(initiator->responder, responder->initiator)``."""
        if self._split is None:
            raise LocalProtocolError("the handshake is not complete")
        return self._split

    def split_for_role(self) -> tuple[CipherState, CipherState]:
        """The transport CipherStates as ``(send, receive)`` for this side."""
        c1, c2 = self.split()
        return (c1, c2) if self.initiator else (c2, c1)

    # -- messages

    def write_message(self, payload: bytes = b"") -> bytes:
        self._check_usable()
        if not self.is_my_turn():
            raise LocalProtocolError("not this side's turn to write a handshake message")
        try:
            return self._write(payload)
        except BaseException as exc:
            self._failed = exc
            raise

    def read_message(self, message: bytes) -> bytes:
        self._check_usable()
        if self.complete or self.is_my_turn():
            raise RemoteProtocolError(
                "unexpected handshake message", hint="the peer sent out of turn"
            )
        try:
            return self._read(bytes(message))
        except BaseException as exc:
            self._failed = exc
            raise

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise LocalProtocolError(
                f"handshake already failed: {self._failed}", hint="start a new handshake"
            )

    def _dh_pair(self, op: str) -> tuple[KeyPair | None, bytes | None]:
        # "es" is DH(initiator e, responder s): the initiator uses (e, rs), the
        # responder (s, re). Reading or writing does not change who holds what.
        local_first = {"ee": ("e", "e"), "ss": ("s", "s"), "es": ("e", "s"), "se": ("s", "e")}
        initiator_key, responder_key = local_first[op]
        mine, theirs = (
            (initiator_key, responder_key) if self.initiator else (responder_key, initiator_key)
        )
        local = self.e if mine == "e" else self.s
        remote = self.re if theirs == "e" else self.rs
        return local, remote

    def _mix_dh(self, op: str) -> None:
        local, remote = self._dh_pair(op)
        if local is None or remote is None:
            raise LocalProtocolError(f"{self.protocol.name}: token {op} lacks a key")
        self.symmetric.mix_key(self.protocol.dh.dh(local, remote))

    def _write(self, payload: bytes) -> bytes:
        pattern = self.protocol.pattern
        dh = self.protocol.dh
        out = bytearray()
        for op in pattern.messages[self.message_index]:
            if op == "e":
                self.e = dh.generate(self.random)
                out += self.e.public
                self.symmetric.mix_hash(self.e.public)
                if pattern.psk:
                    self.symmetric.mix_key(self.e.public)
            elif op == "s":
                if self.s is None:
                    raise LocalProtocolError(f"{self.protocol.name} needs a local static key")
                out += self.symmetric.encrypt_and_hash(self.s.public)
            elif op in _DH_TOKENS:
                self._mix_dh(op)
            elif op == "psk":
                self.symmetric.mix_key_and_hash(self._psks.pop(0))
            elif op == "e1":
                assert self.kem is not None
                self.e1 = self.kem.keygen(self.random(self.kem.seed_size))
                out += self.symmetric.encrypt_and_hash(self.e1.public_key)
            elif op == "ekem1":
                assert self.kem is not None
                if self.re1 is None:
                    raise LocalProtocolError("ekem1 before the peer's e1")
                ciphertext, shared = self.kem.encapsulate(self.re1)
                out += self.symmetric.encrypt_and_hash(ciphertext)
                self.symmetric.mix_key(shared)
        out += self.symmetric.encrypt_and_hash(payload)
        if len(out) > MAX_MESSAGE_LEN:
            raise LocalProtocolError(
                f"handshake message would be {len(out)} bytes, over Noise's {MAX_MESSAGE_LEN}"
            )
        self._advance()
        return bytes(out)

    def _take(self, message: bytes, at: int, length: int, what: str) -> bytes:
        if at + length > len(message):
            raise RemoteProtocolError(
                f"handshake message {self.message_index + 1} is too short for its {what}",
                hint="truncated or malformed handshake message",
            )
        return message[at : at + length]

    def _read(self, message: bytes) -> bytes:
        if len(message) > MAX_MESSAGE_LEN:
            raise RemoteProtocolError(f"handshake message over {MAX_MESSAGE_LEN} bytes")
        pattern = self.protocol.pattern
        dh = self.protocol.dh
        at = 0

        def sealed(length: int) -> int:
            return length + (TAG_LEN if self.symmetric.cipher_state.has_key() else 0)

        for op in pattern.messages[self.message_index]:
            if op == "e":
                self.re = self._take(message, at, dh.dhlen, "ephemeral key")
                at += dh.dhlen
                self.symmetric.mix_hash(self.re)
                if pattern.psk:
                    self.symmetric.mix_key(self.re)
            elif op == "s":
                n = sealed(dh.dhlen)
                self.rs = self.symmetric.decrypt_and_hash(self._take(message, at, n, "static key"))
                at += n
            elif op in _DH_TOKENS:
                self._mix_dh(op)
            elif op == "psk":
                self.symmetric.mix_key_and_hash(self._psks.pop(0))
            elif op == "e1":
                assert self.kem is not None
                n = sealed(self.kem.public_key_size)
                self.re1 = self.symmetric.decrypt_and_hash(
                    self._take(message, at, n, "KEM public key")
                )
                at += n
            elif op == "ekem1":
                assert self.kem is not None
                if self.e1 is None:
                    raise LocalProtocolError("ekem1 before our e1")
                n = sealed(self.kem.ciphertext_size)
                ciphertext = self.symmetric.decrypt_and_hash(
                    self._take(message, at, n, "KEM ciphertext")
                )
                at += n
                self.symmetric.mix_key(self.kem.decapsulate(self.e1, ciphertext))
        rest = message[at:]
        if self.symmetric.cipher_state.has_key() and len(rest) < TAG_LEN:
            raise RemoteProtocolError(
                f"handshake message {self.message_index + 1} is too short for its payload tag",
                hint="truncated or malformed handshake message",
            )
        payload = self.symmetric.decrypt_and_hash(rest)
        self._advance()
        return payload

    def _advance(self) -> None:
        self.message_index += 1
        if self.message_index == len(self.protocol.pattern.messages):
            self.complete = True
            self._split = self.symmetric.split()
