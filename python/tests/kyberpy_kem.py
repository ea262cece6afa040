"""ML-KEM-768 over kyber-py, for tests and for making vectors only.

kyber-py (a dev dependency) is a readable pure-Python FIPS 203 implementation
that exposes the derandomised internals, so it serves twice: as the
independent implementation the production backends are cross-checked
against, and as the deterministic KEM that makes our hybrid vectors
reproducible (encapsulation randomness from a fixed source). It is far too
slow, and not constant-time, for anything else; ``keel.mesh.kem.get_kem``
never returns it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from keel.mesh.kem import (
    EXPANDED_PRIVATE_KEY_SIZE,
    PUBLIC_KEY_SIZE,
    Kem,
    KemKeyPair,
)

try:
    from kyber_py.ml_kem import ML_KEM_768
except ImportError as exc:  # the Nix check phase may run without dev dependencies
    MISSING: str | None = f"kyber-py (a dev dependency) is not installed: {exc}"
else:
    MISSING = None


class KyberPyKem(Kem):
    backend = "kyber-py"

    def __init__(self, encaps_random: Callable[[int], bytes] = os.urandom) -> None:
        if MISSING is not None:
            import pytest

            pytest.skip(MISSING)
        self.encaps_random = encaps_random

    def _keygen(self, seed: bytes) -> KemKeyPair:
        ek, dk = ML_KEM_768.key_derive(seed)
        return KemKeyPair(ek, dk)

    def _encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        shared, ciphertext = ML_KEM_768._encaps_internal(public_key, self.encaps_random(32))
        return ciphertext, shared

    def _decapsulate(self, keypair: KemKeyPair, ciphertext: bytes) -> bytes:
        return bytes(ML_KEM_768.decaps(keypair.private, ciphertext))

    def import_expanded_key(self, expanded: bytes) -> KemKeyPair:
        assert len(expanded) == EXPANDED_PRIVATE_KEY_SIZE
        return KemKeyPair(expanded[1152 : 1152 + PUBLIC_KEY_SIZE], bytes(expanded))
