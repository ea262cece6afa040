"""The Noise core beyond the vectors: nonces, rekey, names, patterns, misuse."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from keel.mesh.errors import LocalProtocolError, NonceExhausted, RemoteProtocolError
from keel.mesh.kem import Kem
from keel.mesh.noise import (
    CIPHERS,
    MAX_NONCE,
    CipherState,
    HandshakePattern,
    HandshakeState,
    NoiseProtocol,
)

from tests.kyberpy_kem import KyberPyKem

from .conftest import seeded

CHACHA = CIPHERS["ChaChaPoly"]


def test_nonce_2_64_minus_1_is_never_used() -> None:
    sender = CipherState(CHACHA, bytes(32))
    receiver = CipherState(CHACHA, bytes(32))
    sender.set_nonce(MAX_NONCE - 1)
    receiver.set_nonce(MAX_NONCE - 1)
    assert receiver.decrypt_with_ad(b"", sender.encrypt_with_ad(b"", b"last")) == b"last"
    assert sender.nonce == receiver.nonce == MAX_NONCE
    with pytest.raises(NonceExhausted):
        sender.encrypt_with_ad(b"", b"x")
    with pytest.raises(NonceExhausted):
        receiver.decrypt_with_ad(b"", bytes(17))
    with pytest.raises(LocalProtocolError, match="out of range"):
        sender.set_nonce(MAX_NONCE + 1)


def test_rekey_is_the_specs_and_keeps_the_nonce() -> None:
    key = bytes(range(32))
    state = CipherState(CHACHA, key)
    state.set_nonce(7)
    state.rekey()
    nonce = bytes(4) + MAX_NONCE.to_bytes(8, "little")
    assert state.key == ChaCha20Poly1305(key).encrypt(nonce, bytes(32), b"")[:32]
    assert state.nonce == 7
    with pytest.raises(LocalProtocolError, match="without a key"):
        CipherState(CHACHA).rekey()


def test_a_failed_decryption_does_not_advance_the_nonce() -> None:
    sender = CipherState(CHACHA, bytes(32))
    receiver = CipherState(CHACHA, bytes(32))
    good = sender.encrypt_with_ad(b"ad", b"payload")
    with pytest.raises(RemoteProtocolError, match="decryption failed"):
        receiver.decrypt_with_ad(b"other ad", good)
    assert receiver.decrypt_with_ad(b"ad", good) == b"payload"


def test_no_key_means_no_encryption() -> None:
    state = CipherState(CHACHA)
    assert state.encrypt_with_ad(b"", b"clear") == b"clear"
    assert not state.has_key()


@pytest.mark.parametrize(
    ("name", "messages"),
    [
        ("XXhfs", (("e", "e1"), ("e", "ee", "ekem1", "s", "es"), ("s", "se"))),
        ("NNhfs", (("e", "e1"), ("e", "ee", "ekem1"))),
        ("IKhfs", (("e", "es", "e1", "s", "ss"), ("e", "ee", "ekem1", "se"))),
        ("XKhfs", (("e", "es", "e1"), ("e", "ee", "ekem1"), ("s", "se"))),
        ("XXpsk3", (("e",), ("e", "ee", "s", "es"), ("s", "se", "psk"))),
        ("NNpsk0+psk2", (("psk", "e"), ("e", "ee", "psk"))),
        ("XXhfs+psk3", (("e", "e1"), ("e", "ee", "ekem1", "s", "es"), ("s", "se", "psk"))),
    ],
)
def test_pattern_modifiers(name: str, messages: tuple[tuple[str, ...], ...]) -> None:
    assert HandshakePattern.parse(name).messages == messages


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("Noise_QQ_25519_ChaChaPoly_BLAKE2s", "unknown or unsupported Noise pattern"),
        ("Noise_Nhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s", "interactive"),
        ("Noise_XXpsk4_25519_ChaChaPoly_BLAKE2s", "past the last message"),
        ("Noise_XXhfs+hfs_25519+MLKEM768_ChaChaPoly_BLAKE2s", "repeated modifier"),
        ("Noise_XXhfs_25519_ChaChaPoly_BLAKE2s", "both or neither"),
        ("Noise_XX_25519+MLKEM768_ChaChaPoly_BLAKE2s", "both or neither"),
        ("Noise_XX_25519_ChaChaPoly_MD5", "unsupported primitive"),
        ("Noise_XX_25519_ChaChaPoly", "malformed Noise protocol name"),
        ("Nois_XX_25519_ChaChaPoly_BLAKE2s", "malformed Noise protocol name"),
    ],
)
def test_bad_protocol_names(name: str, problem: str) -> None:
    with pytest.raises(LocalProtocolError, match=problem):
        NoiseProtocol.parse(name)


def hfs(initiator: bool, kem: Kem | None, **options: object) -> HandshakeState:
    return HandshakeState(
        "Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s",
        initiator=initiator,
        s=seeded("s" + str(initiator))(32),
        kem=kem,
        **options,  # type: ignore[arg-type]
    )


def test_hfs_needs_its_kem() -> None:
    with pytest.raises(LocalProtocolError, match="needs a MLKEM768 KEM"):
        hfs(True, None)


def test_misuse_is_local_and_garbage_is_remote(kem: Kem) -> None:
    init, resp = hfs(True, kem), hfs(False, kem)
    with pytest.raises(LocalProtocolError, match="not this side's turn"):
        resp.write_message(b"")
    with pytest.raises(RemoteProtocolError, match="unexpected handshake message"):
        hfs(True, kem).read_message(bytes(1300))  # an initiator reads nothing first
    message = init.write_message(b"")
    with pytest.raises(RemoteProtocolError, match="too short for its KEM public key"):
        resp.read_message(message[:100])
    with pytest.raises(LocalProtocolError, match="already failed"):
        resp.read_message(message)  # a failed handshake stays failed
    with pytest.raises(LocalProtocolError, match="not complete"):
        init.split()


def test_psk_count_and_size_are_checked() -> None:
    with pytest.raises(LocalProtocolError, match="needs 1 PSKs, got 0"):
        HandshakeState("Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s", initiator=True)
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        HandshakeState("Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s", initiator=True, psks=[b"x"])


def test_missing_pre_message_key() -> None:
    with pytest.raises(LocalProtocolError, match="pre-message key rs is missing"):
        HandshakeState("Noise_NK_25519_ChaChaPoly_BLAKE2s", initiator=True)


def test_low_order_points_are_refused() -> None:
    """An all-zero X25519 key makes an all-zero DH output: refused as a remote error."""
    init = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2s", initiator=True)
    resp = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2s", initiator=False)
    resp.read_message(init.write_message(b""))
    reply = bytearray(resp.write_message(b""))
    reply[:32] = bytes(32)
    with pytest.raises(RemoteProtocolError, match="key agreement failed"):
        init.read_message(bytes(reply))


def test_kem_ciphertext_must_be_intact(kem: Kem) -> None:
    init, resp = hfs(True, kem), hfs(False, KyberPyKem())
    resp.read_message(init.write_message(b""))
    reply = bytearray(resp.write_message(b""))
    reply[40] ^= 1  # inside the encrypted ekem1 ciphertext
    with pytest.raises(RemoteProtocolError, match="decryption failed"):
        init.read_message(bytes(reply))


def test_oversized_handshake_message() -> None:
    init = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2s", initiator=True)
    with pytest.raises(LocalProtocolError, match="over Noise's 65535"):
        init.write_message(bytes(65535))
    resp = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2s", initiator=False)
    with pytest.raises(RemoteProtocolError, match="over 65535"):
        resp.read_message(bytes(65536))
