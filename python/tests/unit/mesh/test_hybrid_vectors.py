"""keel's own Noise hfs vectors: replayed, reproduced, and derived from first principles."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from keel.mesh import kem as kem_module
from keel.mesh.errors import RemoteProtocolError
from keel.mesh.kem import get_kem
from keel.mesh.noise import HandshakeState

from tests.data import make_hybrid_vectors as maker
from tests.kyberpy_kem import KyberPyKem

MESH_PROTOCOL = "Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s"


def vectors() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(maker.OUTPUT.read_text())["vectors"]
    return found


def replay(vector: dict[str, Any], kems: dict[str, Any] | None = None) -> None:
    states = maker.handshake_states(vector, kems)
    init, resp = states["init"], states["resp"]
    transport = None
    for index, message in enumerate(vector["messages"]):
        payload = bytes.fromhex(message["payload"])
        expected = bytes.fromhex(message["ciphertext"])
        init_sends = index % 2 == 0
        if not init.complete:
            sender, receiver = (init, resp) if init_sends else (resp, init)
            assert sender.write_message(payload) == expected, f"message {index}"
            assert receiver.read_message(expected) == payload
            continue
        if transport is None:
            assert init.handshake_hash.hex() == vector["handshake_hash"]
            assert resp.handshake_hash == init.handshake_hash
            i_send, i_recv = init.split_for_role()
            r_send, r_recv = resp.split_for_role()
            transport = {True: (i_send, r_recv), False: (r_send, i_recv)}
        send, recv = transport[init_sends]
        assert send.encrypt_with_ad(b"", payload) == expected, f"transport {index}"
        assert recv.decrypt_with_ad(b"", expected) == payload


def test_the_script_reproduces_the_file_byte_for_byte() -> None:
    assert maker.render() == maker.OUTPUT.read_text()


def test_the_file_covers_the_mesh_protocol() -> None:
    names = [v["protocol_name"] for v in vectors()]
    assert MESH_PROTOCOL in names
    assert len(names) == len(set(names)) >= 10


@pytest.mark.parametrize("vector", vectors(), ids=lambda v: v["protocol_name"])
def test_replay_through_the_production_handshake(vector: dict[str, Any]) -> None:
    replay(vector)


@pytest.mark.parametrize("backend", ["cryptography", "oqs"])
def test_replay_with_a_production_kem_on_the_decapsulating_side(backend: str) -> None:
    """Whoever makes ``e1`` from the vector's seed may use a real backend: same bytes."""
    reason = kem_module.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"ML-KEM backend {backend} unavailable here: {reason}")
    for vector in vectors():
        role = "init" if "init_kem_seed" in vector else "resp"
        replay(vector, {role: get_kem(backend)})


def test_a_changed_vector_fails_the_replay() -> None:
    vector = json.loads(json.dumps(vectors()[0]))
    vector["resp_kem_encaps_randomness"] = "00" * 32
    with pytest.raises(AssertionError, match="message 1"):
        replay(vector)


# -- the whole-session transcript -------------------------------------------------


def recorded_session() -> dict[str, Any]:
    session: dict[str, Any] = json.loads(maker.OUTPUT.read_text())["session"]
    return session


def test_session_transcript_with_a_production_kem_on_the_initiator() -> None:
    reason = kem_module.available_backends()["cryptography"]
    if reason is not None:
        pytest.skip(f"ML-KEM backend cryptography unavailable here: {reason}")
    assert maker.session_conversation(get_kem("cryptography")) == recorded_session()


def test_session_transcript_replays_from_the_files_own_inputs() -> None:
    """A responder built only from the file answers the recorded frames with the recorded ones."""
    from keel.mesh.identity import NodeIdentity
    from keel.mesh.invite import InviteToken
    from keel.mesh.session import Closed, NeedData, Session, SessionConfig

    recorded = recorded_session()
    bob = recorded["responder"]
    identity = NodeIdentity(
        static_private=bytes.fromhex(bob["static_private"]),
        signing_private=bytes.fromhex(bob["signing_private"]),
    )
    assert identity.node_id == bob["node_id"]
    responder = Session.responder(
        identity,
        kem=KyberPyKem(encaps_random=lambda n: bytes.fromhex(bob["kem_encaps_randomness"])),
        clock=lambda: 0.0,
        random=lambda n: bytes.fromhex(bob["ephemeral"]),
        config=SessionConfig(**recorded["config"]),
        extra={"addresses": ["192.0.2.2:7400"]},
    )
    token = InviteToken.decode(recorded["initiator"]["invite_token"])
    steps = recorded["steps"]
    replies = [
        s["frame"] for s in steps if s["from"] == "responder" and s["action"] == "handshake reply"
    ]
    for step in steps:
        if step["from"] != "initiator":
            continue
        frame = bytes.fromhex(step["frame"])
        responder.receive_data(len(frame).to_bytes(2, "big") + frame)
        events = []
        while not isinstance(event := responder.next_event(), NeedData):
            events.append(maker.describe(event))
            if isinstance(event, Closed):
                break
        assert events == step["events"], step["action"]
        reply = responder.data_to_send()
        if reply:
            assert reply[2:].hex() == replies.pop(0)
    assert replies == []
    claim = responder.remote.invite if responder.remote else None
    assert claim is not None
    assert claim.verify(token.secret)


def test_session_transcript_shows_every_record_type() -> None:
    records = [bytes.fromhex(s["record"])[0] for s in recorded_session()["steps"] if "record" in s]
    assert set(records) == {0x00, 0x01, 0x02, 0x03, 0x04}


# -- the token rules, computed by hand for the mesh's protocol ----------------


def blake2s(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def hkdf2(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp = hmac.new(ck, ikm, hashlib.blake2s).digest()
    out1 = hmac.new(temp, b"\x01", hashlib.blake2s).digest()
    return out1, hmac.new(temp, out1 + b"\x02", hashlib.blake2s).digest()


def seal(key: bytes, nonce: int, ad: bytes, plaintext: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(bytes(4) + nonce.to_bytes(8, "little"), plaintext, ad)


def test_hfs_messages_from_first_principles() -> None:
    """Messages 1 and 2 of XXhfs rebuilt with hashlib/hmac only, per the hfs spec."""
    vector = next(v for v in vectors() if v["protocol_name"] == MESH_PROTOCOL)
    x = {
        k: bytes.fromhex(v)
        for k, v in vector.items()
        if isinstance(v, str) and k != "protocol_name"
    }
    msg1 = bytes.fromhex(vector["messages"][0]["ciphertext"])
    msg2 = bytes.fromhex(vector["messages"][1]["ciphertext"])
    payload1 = bytes.fromhex(vector["messages"][0]["payload"])
    payload2 = bytes.fromhex(vector["messages"][1]["payload"])

    def public(private: bytes) -> bytes:
        return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()

    def dh(private: bytes, public_key: bytes) -> bytes:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public_key)
        )

    reference = KyberPyKem(encaps_random=lambda n: x["resp_kem_encaps_randomness"])
    e1 = reference.keygen(x["init_kem_seed"])

    # Initialize: the name is longer than HASHLEN, so h = HASH(name); ck = h.
    h = blake2s(MESH_PROTOCOL.encode())
    ck = h
    h = blake2s(h + x["init_prologue"])
    # -> e, e1 (no key yet: e1 is hashed, not encrypted), payload
    e_init = public(x["init_ephemeral"])
    h = blake2s(h + e_init)
    h = blake2s(h + e1.public_key)
    h = blake2s(h + payload1)
    assert msg1 == e_init + e1.public_key + payload1

    # <- e, ee, ekem1, s, es, payload
    e_resp = public(x["resp_ephemeral"])
    h = blake2s(h + e_resp)
    ck, k = hkdf2(ck, dh(x["resp_ephemeral"], e_init))  # ee
    ciphertext, shared = reference.encapsulate(e1.public_key)  # ekem1
    sealed_ct = seal(k, 0, h, ciphertext)
    h = blake2s(h + sealed_ct)
    ck, k = hkdf2(ck, shared)  # MixKey(ss) *after* EncryptAndHash(ct)
    sealed_s = seal(k, 0, h, public(x["resp_static"]))  # s (a fresh key: n = 0)
    h = blake2s(h + sealed_s)
    ck, k = hkdf2(ck, dh(x["resp_static"], e_init))  # es
    sealed_payload = seal(k, 0, h, payload2)
    assert msg2 == e_resp + sealed_ct + sealed_s + sealed_payload
    assert len(msg1) == 32 + 1184 + len(payload1)
    assert len(msg2) == 32 + (1088 + 16) + (32 + 16) + len(payload2) + 16


def test_a_swapped_kem_key_breaks_the_handshake() -> None:
    """Tampering with e1 in message 1 is caught when the initiator reads message 2."""
    vector = next(v for v in vectors() if v["protocol_name"] == MESH_PROTOCOL)
    states = maker.handshake_states(vector)
    init, resp = states["init"], states["resp"]
    msg1 = bytearray(init.write_message(b""))
    other = KyberPyKem().keygen(bytes(64)).public_key
    msg1[32 : 32 + 1184] = other
    resp.read_message(bytes(msg1))
    msg2 = resp.write_message(b"")
    with pytest.raises(RemoteProtocolError, match="decryption failed"):
        init.read_message(msg2)


def test_every_hfs_pattern_handshakes_with_real_kems() -> None:
    for name in maker.PROTOCOLS:
        vector = maker.make_vector(name)
        kem = get_kem() if kem_module.available_backends()["cryptography"] is None else KyberPyKem()
        states = {}
        for role in ("init", "resp"):
            states[role] = HandshakeState(
                name,
                initiator=role == "init",
                prologue=b"p",
                s=bytes.fromhex(vector[f"{role}_static"]) if f"{role}_static" in vector else None,
                rs=bytes.fromhex(vector[f"{role}_remote_static"])
                if f"{role}_remote_static" in vector
                else None,
                psks=[bytes.fromhex(p) for p in vector[f"{role}_psks"]],
                kem=kem,
            )
        init, resp = states["init"], states["resp"]
        turn = 0
        while not (init.complete and resp.complete):
            sender, receiver = (init, resp) if turn % 2 == 0 else (resp, init)
            assert receiver.read_message(sender.write_message(b"x" * turn)) == b"x" * turn
            turn += 1
        assert init.handshake_hash == resp.handshake_hash
        assert init.split()[0].encrypt_with_ad(b"", b"hi") == resp.split()[0].encrypt_with_ad(
            b"", b"hi"
        )
