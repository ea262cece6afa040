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
from keel.mesh.noise import HandshakeState, NoiseProtocol  # noqa: E402

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


def render() -> str:
    document = {
        "about": (
            "keel's own Noise hfs vectors (X25519 + ML-KEM-768); not published vectors. "
            "Made by python/tests/data/make_hybrid_vectors.py from fixed labels; "
            "ML-KEM via kyber-py with fixed encapsulation randomness."
        ),
        "vectors": [make_vector(name) for name in PROTOCOLS],
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
