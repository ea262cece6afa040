"""Every applicable published Noise vector (cacophony and snow) through ``keel.mesh.noise``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from keel.mesh.noise import HandshakeState, NoiseProtocol

VECTOR_FILES = ("cacophony.txt", "snow.txt")


def fixed_random(value: bytes) -> Callable[[int], bytes]:
    def random(n: int) -> bytes:
        assert n == len(value), f"asked for {n} random bytes, vector has {len(value)}"
        return value

    return random


def load(vectors_dir: Path, name: str) -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads((vectors_dir / "noise" / name).read_text())[
        "vectors"
    ]
    return vectors


def unhex(vector: dict[str, Any], key: str) -> bytes | None:
    value = vector.get(key)
    return bytes.fromhex(value) if value is not None else None


def run_vector(vector: dict[str, Any]) -> None:
    protocol = NoiseProtocol.parse(vector["protocol_name"])
    sides = {}
    for role in ("init", "resp"):
        sides[role] = HandshakeState(
            protocol,
            initiator=role == "init",
            prologue=unhex(vector, f"{role}_prologue") or b"",
            s=unhex(vector, f"{role}_static"),
            rs=unhex(vector, f"{role}_remote_static"),
            psks=[bytes.fromhex(p) for p in vector.get(f"{role}_psks", [])],
            random=fixed_random(unhex(vector, f"{role}_ephemeral") or b""),
        )
    init, resp = sides["init"], sides["resp"]
    one_way = protocol.pattern.one_way
    transport = None
    for index, message in enumerate(vector["messages"]):
        payload = bytes.fromhex(message["payload"])
        expected = bytes.fromhex(message["ciphertext"])
        init_sends = one_way or index % 2 == 0
        if not (init.complete and resp.complete):
            sender, receiver = (init, resp) if init_sends else (resp, init)
            assert sender.write_message(payload) == expected, f"message {index}"
            assert receiver.read_message(expected) == payload, f"message {index}"
            continue
        if transport is None:
            assert init.handshake_hash == resp.handshake_hash
            if "handshake_hash" in vector:
                assert init.handshake_hash.hex() == vector["handshake_hash"]
            i_send, i_recv = init.split_for_role()
            r_send, r_recv = resp.split_for_role()
            transport = {True: (i_send, r_recv), False: (r_send, i_recv)}
        send, recv = transport[init_sends]
        assert send.encrypt_with_ad(b"", payload) == expected, f"transport message {index}"
        assert recv.decrypt_with_ad(b"", expected) == payload, f"transport message {index}"


@pytest.mark.parametrize("file_name", VECTOR_FILES)
def test_every_vector(vectors_dir: Path, file_name: str) -> None:
    vectors = load(vectors_dir, file_name)
    failures = []
    for vector in vectors:
        try:
            run_vector(vector)
        except AssertionError as exc:
            failures.append(f"{vector['protocol_name']}: {exc}")
    assert not failures, f"{len(failures)} of {len(vectors)} failed: {failures[:5]}"
    assert len(vectors) > 400


@pytest.mark.parametrize("file_name", VECTOR_FILES)
@pytest.mark.parametrize("hash_name", ["BLAKE2s", "BLAKE2b", "SHA256", "SHA512"])
def test_xx_chachapoly_vectors(vectors_dir: Path, file_name: str, hash_name: str) -> None:
    """The mesh's own base pattern, named so that a failure is unmistakable."""
    name = f"Noise_XX_25519_ChaChaPoly_{hash_name}"
    matching = [v for v in load(vectors_dir, file_name) if v["protocol_name"] == name]
    assert len(matching) == 1
    run_vector(matching[0])
