"""Make keel's own Noise hfs (X25519 + ML-KEM-768) test vectors.

No published vectors exist for Noise hfs patterns with ML-KEM, so these are
ours: every key and every random byte is derived from a fixed label, the
handshakes run through ``keel.mesh.noise.HandshakeState`` (the production
code), and ML-KEM is kyber-py with its encapsulation randomness fixed
(``tests/kyberpy_kem.py``; the production backends cannot fix it).

Run from the repository root to rewrite the file, or check it::

    .venv/bin/python python/tests/data/make_hybrid_vectors.py          # rewrite
    .venv/bin/python python/tests/data/make_hybrid_vectors.py --check  # compare

The JSON follows cacophony's format, plus, per side, ``<role>_kem_seed`` (the
64-byte ``d || z`` its ``e1`` key pair is made from) and
``<role>_kem_encaps_randomness`` (the 32-byte ``m`` its ``ekem1``
encapsulation uses). ``tests/unit/mesh/test_hybrid_vectors.py`` replays the
file and checks that this script reproduces it byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PYTHON = Path(__file__).resolve().parents[2]
if str(PYTHON) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(PYTHON))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from keel.mesh.framing import FrameReader, RecordType, decode_record  # noqa: E402
from keel.mesh.identity import NodeIdentity  # noqa: E402
from keel.mesh.invite import InviteToken  # noqa: E402
from keel.mesh.kem import Kem  # noqa: E402
from keel.mesh.noise import CIPHERS, CipherState, HandshakeState, NoiseProtocol  # noqa: E402
from keel.mesh.session import (  # noqa: E402
    Closed,
    HandshakeComplete,
    Keepalive,
    Message,
    NeedData,
    Session,
    SessionConfig,
)

from tests.kyberpy_kem import KyberPyKem  # noqa: E402

OUTPUT = Path(__file__).with_name("hybrid_vectors.json")
PROLOGUE = b"keel hybrid vectors"
PAYLOADS = [
    b"",
    b"keel: the first handshake payload",
    b"keel: the second handshake payload",
    b"keel: the third",
    b"transport one",
    b"transport two",
    b"transport three",
]
PROTOCOLS = [
    "Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s",  # the mesh's protocol
    "Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2b",
    "Noise_XXhfs_25519+MLKEM768_ChaChaPoly_SHA256",
    "Noise_XXhfs_25519+MLKEM768_ChaChaPoly_SHA512",
    "Noise_XXhfs_25519+MLKEM768_AESGCM_BLAKE2s",
    "Noise_NNhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s",
    "Noise_NKhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s",
    "Noise_IKhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s",
    "Noise_IXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s",
    "Noise_XXhfs+psk3_25519+MLKEM768_ChaChaPoly_BLAKE2s",
    "Noise_NNhfs+psk0_25519+MLKEM768_ChaChaPoly_BLAKE2s",
]


def fixed_bytes(label: str, size: int) -> bytes:
    """``size`` bytes named by ``label``: SHAKE-256 of ``"keel hybrid vectors/" + label``."""
    return hashlib.shake_256(f"keel hybrid vectors/{label}".encode()).digest(size)


def sequence(values: list[bytes]) -> Callable[[int], bytes]:
    """A random source that hands out ``values`` in order (and checks their sizes)."""
    queue = list(values)

    def random(n: int) -> bytes:
        value = queue.pop(0)
        if len(value) != n:
            raise AssertionError(f"random source asked for {n} bytes, next value has {len(value)}")
        return value

    return random


def side_inputs(protocol: NoiseProtocol, role: str) -> dict[str, Any]:
    """The fixed keys and randomness of one side, as hex, for the vector file."""
    pattern = protocol.pattern
    initiator = role == "init"
    tokens_sent = [
        t
        for i, message in enumerate(pattern.messages)
        if (i % 2 == 0) == initiator
        for t in message
    ]
    pre = pattern.initiator_pre if initiator else pattern.responder_pre
    remote_pre = pattern.responder_pre if initiator else pattern.initiator_pre
    needs_static = "s" in tokens_sent or "s" in pre
    inputs: dict[str, Any] = {
        f"{role}_prologue": PROLOGUE.hex(),
        f"{role}_ephemeral": fixed_bytes(f"{role}/ephemeral", 32).hex(),
    }
    if needs_static:
        inputs[f"{role}_static"] = fixed_bytes(f"{role}/static", 32).hex()
    if "s" in remote_pre:
        other = "resp" if initiator else "init"
        private = X25519PrivateKey.from_private_bytes(fixed_bytes(f"{other}/static", 32))
        inputs[f"{role}_remote_static"] = private.public_key().public_bytes_raw().hex()
    if "e1" in tokens_sent:
        inputs[f"{role}_kem_seed"] = fixed_bytes(f"{role}/kem-seed", 64).hex()
    if "ekem1" in tokens_sent:
        inputs[f"{role}_kem_encaps_randomness"] = fixed_bytes(f"{role}/kem-encaps", 32).hex()
    psks = sum(m.count("psk") for m in pattern.messages)
    inputs[f"{role}_psks"] = [fixed_bytes(f"psk/{i}", 32).hex() for i in range(psks)]
    return inputs


def handshake_states(vector: dict[str, Any], kems: dict[str, Any] | None = None) -> dict[str, Any]:
    """Both sides of ``vector``'s handshake, with its fixed keys and randomness.

    ``kems`` may replace a side's KEM (the test decapsulates with the
    production backends); by default both use kyber-py with the vector's
    encapsulation randomness.
    """
    protocol = NoiseProtocol.parse(vector["protocol_name"])
    states = {}
    for role in ("init", "resp"):

        def value(key: str, role: str = role) -> bytes | None:
            text = vector.get(f"{role}_{key}")
            return bytes.fromhex(text) if text is not None else None

        encaps = value("kem_encaps_randomness")
        kem = (kems or {}).get(role) or KyberPyKem(
            encaps_random=sequence([encaps] if encaps else [])
        )
        randomness = [value("ephemeral") or b""]
        if value("kem_seed") is not None:
            randomness.append(value("kem_seed") or b"")
        states[role] = HandshakeState(
            protocol,
            initiator=role == "init",
            prologue=value("prologue") or b"",
            s=value("static"),
            rs=value("remote_static"),
            psks=[bytes.fromhex(p) for p in vector[f"{role}_psks"]],
            kem=kem,
            random=sequence(randomness),
        )
    return states


def make_vector(name: str) -> dict[str, Any]:
    protocol = NoiseProtocol.parse(name)
    vector: dict[str, Any] = {"protocol_name": name}
    for role in ("init", "resp"):
        vector.update(side_inputs(protocol, role))
    states = handshake_states(vector)
    init, resp = states["init"], states["resp"]
    messages = []
    transport = None
    for index, payload in enumerate(PAYLOADS):
        init_sends = index % 2 == 0
        if not init.complete:
            sender, receiver = (init, resp) if init_sends else (resp, init)
            ciphertext = sender.write_message(payload)
            if receiver.read_message(ciphertext) != payload:
                raise AssertionError(f"{name}: message {index} did not round-trip")
        else:
            if transport is None:
                vector["handshake_hash"] = init.handshake_hash.hex()
                i_send, i_recv = init.split_for_role()
                r_send, r_recv = resp.split_for_role()
                transport = {True: (i_send, r_recv), False: (r_send, i_recv)}
            send, recv = transport[init_sends]
            ciphertext = send.encrypt_with_ad(b"", payload)
            if recv.decrypt_with_ad(b"", ciphertext) != payload:
                raise AssertionError(f"{name}: transport message {index} did not round-trip")
        messages.append({"payload": payload.hex(), "ciphertext": ciphertext.hex()})
    vector["messages"] = messages
    return vector


# -- a whole keel session: handshake with an invite, messages, rekey, close ------

SESSION_CONFIG = SessionConfig(max_frame_size=2048, rekey_messages=3)
SESSION_CLOCK = 1000.0


def session_identity(name: str) -> NodeIdentity:
    return NodeIdentity(
        static_private=fixed_bytes(f"{name}/static", 32),
        signing_private=fixed_bytes(f"{name}/signing", 32),
    )


def session_token(bob: NodeIdentity) -> InviteToken:
    return InviteToken(
        node_id=bob.node_id,
        addresses=("192.0.2.2:7400",),
        static_key=bob.static_public,
        secret=fixed_bytes("invite/secret", 32),
        expires=1_700_003_600,
        uses=1,
    )


def split_frames(data: bytes) -> list[bytes]:
    reader = FrameReader()
    reader.feed(data)
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(bytes(frame))
    return frames


def describe(event: object) -> dict[str, Any]:
    if isinstance(event, HandshakeComplete):
        described: dict[str, Any] = {
            "event": "HandshakeComplete",
            "remote_node_id": event.remote_node_id,
            "extra": dict(event.extra),
            "handshake_hash": event.handshake_hash.hex(),
        }
        if event.invite is not None:
            described["invite_id"] = event.invite.invite_id.hex()
        return described
    if isinstance(event, Message):
        return {"event": "Message", "data": event.data.hex()}
    if isinstance(event, Keepalive):
        return {"event": "Keepalive"}
    if isinstance(event, Closed):
        return {"event": "Closed", "reason": event.reason, "clean": event.clean}
    raise AssertionError(f"unexpected event {event!r}")


class Shadow:
    """Decrypts one direction's transport frames on the side, to show their records.

    It starts from the receiving session's first transport key (read from the
    session's internals: test-data generation only) and follows REKEY records
    as the spec says, so it is a second, independent reading of the stream.
    """

    def __init__(self, key: bytes) -> None:
        self.cipher = CipherState(CIPHERS["ChaChaPoly"], key)

    def record(self, frame: bytes) -> str:
        plaintext = self.cipher.decrypt_with_ad(b"", frame)
        kind, _ = decode_record(plaintext)
        if kind is RecordType.REKEY:
            self.cipher.rekey()
        return plaintext.hex()


def session_conversation(initiator_kem: Kem | None = None) -> dict[str, Any]:
    """Alice joins Bob with an invite, they talk, Alice closes; every frame recorded."""
    alice, bob = session_identity("alice"), session_identity("bob")
    token = session_token(bob)
    initiator = Session.initiator(
        alice,
        remote_static=bob.static_public,
        kem=initiator_kem or KyberPyKem(),
        clock=lambda: SESSION_CLOCK,
        random=sequence([fixed_bytes("alice/ephemeral", 32), fixed_bytes("alice/kem-seed", 64)]),
        config=SESSION_CONFIG,
        invite=token,
        extra={"addresses": ["192.0.2.1:7400"]},
    )
    responder = Session.responder(
        bob,
        kem=KyberPyKem(encaps_random=sequence([fixed_bytes("bob/kem-encaps", 32)])),
        clock=lambda: SESSION_CLOCK,
        random=sequence([fixed_bytes("bob/ephemeral", 32)]),
        config=SESSION_CONFIG,
        extra={"addresses": ["192.0.2.2:7400"]},
    )
    sides = {"initiator": initiator, "responder": responder}
    shadows: dict[str, Shadow] = {}
    steps: list[dict[str, Any]] = []

    def deliver(sender: str, action: str, data: bytes) -> None:
        receiver_name = "responder" if sender == "initiator" else "initiator"
        receiver = sides[receiver_name]
        for frame in split_frames(data):
            step: dict[str, Any] = {"from": sender, "action": action, "frame": frame.hex()}
            if sender in shadows:
                step["record"] = shadows[sender].record(frame)
            receiver.receive_data(len(frame).to_bytes(2, "big") + frame)
            events = []
            while not isinstance(event := receiver.next_event(), NeedData):
                events.append(describe(event))
                if isinstance(event, Closed):
                    break
            step["events"] = events
            steps.append(step)
            reply = receiver.data_to_send()
            if reply:
                deliver(receiver_name, "handshake reply", reply)
            if receiver.remote is not None and sender not in shadows:
                recv = receiver._recv  # test-data generation only: see Shadow
                assert recv is not None
                assert recv.key is not None
                shadows[sender] = Shadow(recv.key)

    deliver("initiator", "start", initiator.start())
    claim = responder.remote.invite if responder.remote else None
    if claim is None or not claim.verify(token.secret):
        raise AssertionError("the invite proof did not verify")
    deliver("initiator", "send_message hello", initiator.send_message(b"hello bob"))
    deliver("responder", "send_message reply", responder.send_message(b"hello alice"))
    long = bytes(i % 251 for i in range(5000))
    deliver("initiator", "send_message 5000 bytes", initiator.send_message(long))
    deliver("initiator", "send_keepalive", initiator.send_keepalive())
    deliver("initiator", "close", initiator.close("done"))
    return {
        "protocol_name": "Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s",
        "prologue": b"keel-mesh/1".hex(),
        "config": {"max_frame_size": 2048, "rekey_messages": 3},
        "initiator": {
            "static_private": alice.static_private.hex(),
            "signing_private": alice.signing_private.hex(),
            "node_id": alice.node_id,
            "ephemeral": fixed_bytes("alice/ephemeral", 32).hex(),
            "kem_seed": fixed_bytes("alice/kem-seed", 64).hex(),
            "invite_token": token.encode(),
        },
        "responder": {
            "static_private": bob.static_private.hex(),
            "signing_private": bob.signing_private.hex(),
            "node_id": bob.node_id,
            "ephemeral": fixed_bytes("bob/ephemeral", 32).hex(),
            "kem_encaps_randomness": fixed_bytes("bob/kem-encaps", 32).hex(),
        },
        "steps": steps,
    }


def render() -> str:
    document = {
        "about": (
            "keel's own Noise hfs vectors (X25519 + ML-KEM-768); not published vectors. "
            "Made by python/tests/data/make_hybrid_vectors.py from fixed labels; "
            "ML-KEM via kyber-py with fixed encapsulation randomness."
        ),
        "vectors": [make_vector(name) for name in PROTOCOLS],
        "session": session_conversation(),
    }
    return json.dumps(document, indent=1) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        same = OUTPUT.read_text() == text
        print(f"{OUTPUT}: {'up to date' if same else 'DIFFERS from what this script makes'}")
        return 0 if same else 1
    OUTPUT.write_text(text)
    print(f"wrote {len(json.loads(text)['vectors'])} vectors to {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
