"""ML-KEM-768 behind a small interface, with the backends this host can load.

The mesh handshake needs three operations of a KEM: make a key pair, encapsulate
to a public key, decapsulate a ciphertext. ``Kem`` is that interface, with the
sizes as attributes; ``get_kem()`` returns the first backend that loads:

- ``cryptography`` (pyca) where it has ML-KEM: 48 or newer over OpenSSL 3.5
  or newer, or 47 or newer over AWS-LC or BoringSSL (47's ML-KEM needs one of
  those); see :func:`cryptography_mlkem_problem`;
- ``oqs`` (liboqs-python >= 0.14 over liboqs), the fallback under Nix.

Key generation is deterministic from a 64-byte seed ``d || z`` (FIPS 203,
section 7.1) so that the caller owns the randomness; encapsulation draws its
32 random bytes inside the backend (neither library exposes the derandomised
form). A test-only backend over ``kyber-py`` (``tests/kyberpy_kem.py``) fixes
that randomness too, for reproducible vectors; it is never used at run time.

Every encapsulation key is checked as FIPS 203 section 7.2 requires (length,
and every 12-bit coefficient below q = 3329) before any backend sees it, so
the backends refuse exactly the same keys.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes.util
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.mesh.errors import KemUnavailable, LocalProtocolError, RemoteProtocolError

KEM_NAME = "MLKEM768"
PUBLIC_KEY_SIZE = 1184
CIPHERTEXT_SIZE = 1088
SHARED_SECRET_SIZE = 32
SEED_SIZE = 64
EXPANDED_PRIVATE_KEY_SIZE = 2400
_K = 3
_LOW_NIBBLE = bytes(i & 0x0F for i in range(256))


@dataclass(frozen=True, eq=False)
class KemKeyPair:
    """A decapsulation key: the public bytes and the backend's own private object."""

    public_key: bytes
    private: Any = field(repr=False)


def check_encapsulation_key(public_key: bytes) -> None:
    """Refuse an ML-KEM-768 encapsulation key that FIPS 203 section 7.2 rejects."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise RemoteProtocolError(
            f"ML-KEM-768 public key is {len(public_key)} bytes, not {PUBLIC_KEY_SIZE}",
            hint="the peer's handshake message is malformed",
        )
    # ByteDecode12: each 3 bytes (b0, b1, b2) hold two 12-bit coefficients,
    # c0 = b0 | (b1 & 0xF) << 8 and c1 = b1 >> 4 | b2 << 4. With q = 0xD01,
    # c0 >= q iff (b1 & 0xF) > 0xD, or == 0xD with b0 >= 1; c1 >= q iff
    # b2 > 0xD0, or == 0xD0 with b1 >> 4 >= 1. Checked column-wise in C speed.
    encoded = public_key[: 384 * _K]
    b0, b1, b2 = encoded[0::3], encoded[1::3], encoded[2::3]
    low = b1.translate(_LOW_NIBBLE)
    bad = max(low) > 0x0D or max(b2) > 0xD0
    i = low.find(0x0D)
    while not bad and i != -1:
        bad = b0[i] >= 1
        i = low.find(0x0D, i + 1)
    i = b2.find(0xD0)
    while not bad and i != -1:
        bad = b1[i] >> 4 >= 1
        i = b2.find(0xD0, i + 1)
    if bad:
        raise RemoteProtocolError(
            "ML-KEM-768 public key has a coefficient not reduced modulo q (FIPS 203 7.2)",
            hint="the peer's handshake message is malformed or tampered with",
        )


class Kem(abc.ABC):
    """ML-KEM-768: ``keygen(seed)``, ``encapsulate(pk)``, ``decapsulate(pair, ct)``."""

    name = KEM_NAME
    public_key_size = PUBLIC_KEY_SIZE
    ciphertext_size = CIPHERTEXT_SIZE
    shared_secret_size = SHARED_SECRET_SIZE
    seed_size = SEED_SIZE
    backend: str = ""

    def keygen(self, seed: bytes) -> KemKeyPair:
        """The key pair FIPS 203 ML-KEM.KeyGen_internal(d, z) makes from ``seed = d || z``."""
        if len(seed) != SEED_SIZE:
            raise LocalProtocolError(f"ML-KEM seed must be {SEED_SIZE} bytes, got {len(seed)}")
        return self._keygen(bytes(seed))

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Return ``(ciphertext, shared_secret)`` for the peer's ``public_key``."""
        check_encapsulation_key(public_key)
        ciphertext, shared = self._encapsulate(bytes(public_key))
        if len(ciphertext) != CIPHERTEXT_SIZE or len(shared) != SHARED_SECRET_SIZE:
            raise LocalProtocolError(f"{self.backend} returned a malformed encapsulation")
        return ciphertext, shared

    def decapsulate(self, keypair: KemKeyPair, ciphertext: bytes) -> bytes:
        """The shared secret in ``ciphertext`` (a pseudo-random one if it was tampered with)."""
        if len(ciphertext) != CIPHERTEXT_SIZE:
            raise RemoteProtocolError(
                f"ML-KEM-768 ciphertext is {len(ciphertext)} bytes, not {CIPHERTEXT_SIZE}",
                hint="the peer's handshake message is malformed",
            )
        return self._decapsulate(keypair, bytes(ciphertext))

    def import_expanded_key(self, expanded: bytes) -> KemKeyPair:
        """A key pair from a 2400-byte FIPS 203 decapsulation key, where the backend can."""
        raise LocalProtocolError(
            f"the {self.backend} backend cannot import expanded ML-KEM decapsulation keys"
        )

    @abc.abstractmethod
    def _keygen(self, seed: bytes) -> KemKeyPair: ...

    @abc.abstractmethod
    def _encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]: ...

    @abc.abstractmethod
    def _decapsulate(self, keypair: KemKeyPair, ciphertext: bytes) -> bytes: ...

    def __repr__(self) -> str:
        return f"<Kem {self.name} via {self.backend}>"


class CryptographyKem(Kem):
    """ML-KEM-768 from pyca/cryptography (OpenSSL or AWS-LC underneath)."""

    backend = "cryptography"

    def __init__(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise KemUnavailable(reason)
        from cryptography.hazmat.primitives.asymmetric import mlkem

        self._mlkem = mlkem

    @staticmethod
    def unavailable_reason() -> str | None:
        import cryptography
        from cryptography.hazmat.backends.openssl.backend import backend
        from cryptography.hazmat.bindings._rust import openssl as rust_openssl

        if getattr(rust_openssl, "CRYPTOGRAPHY_IS_AWSLC", False):
            library = "AWS-LC"
        elif getattr(rust_openssl, "CRYPTOGRAPHY_IS_BORINGSSL", False):
            library = "BoringSSL"
        else:
            library = "OpenSSL"
        supported = getattr(backend, "mlkem_supported", None)
        return cryptography_mlkem_problem(
            cryptography.__version__,
            library,
            backend.openssl_version_number(),
            backend.openssl_version_text(),
            has_module=importlib.util.find_spec("cryptography.hazmat.primitives.asymmetric.mlkem")
            is not None,
            backend_supports=None if supported is None else bool(supported()),
        )

    def _keygen(self, seed: bytes) -> KemKeyPair:
        private = self._mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
        return KemKeyPair(private.public_key().public_bytes_raw(), private)

    def _encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        try:
            key = self._mlkem.MLKEM768PublicKey.from_public_bytes(public_key)
            shared, ciphertext = key.encapsulate()
        except ValueError as exc:
            raise RemoteProtocolError(f"ML-KEM-768 public key refused: {exc}") from exc
        return ciphertext, shared

    def _decapsulate(self, keypair: KemKeyPair, ciphertext: bytes) -> bytes:
        try:
            return bytes(keypair.private.decapsulate(ciphertext))
        except ValueError as exc:
            raise RemoteProtocolError(f"ML-KEM-768 ciphertext refused: {exc}") from exc


class OqsKem(Kem):
    """ML-KEM-768 from liboqs through liboqs-python (module ``oqs``)."""

    backend = "oqs"
    ALGORITHM = "ML-KEM-768"

    def __init__(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise KemUnavailable(reason)
        import oqs

        self._oqs = oqs

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("oqs") is None:
            return "liboqs-python (module oqs) is not installed"
        # liboqs-python downloads and builds liboqs when it cannot find the
        # library, and exits the interpreter when that fails: look first.
        if not _liboqs_present():
            return "liboqs shared library not found (install liboqs, or set OQS_INSTALL_PATH)"
        try:
            import oqs
        except (ImportError, OSError, RuntimeError, SystemExit) as exc:
            return f"liboqs-python failed to load: {exc}"
        enabled_names = (
            getattr(oqs, "get_enabled_kem_mechanisms", None) or oqs.get_enabled_KEM_mechanisms
        )
        enabled = enabled_names()
        if cls.ALGORITHM not in enabled:
            return f"liboqs was built without {cls.ALGORITHM}"
        if not hasattr(oqs.KeyEncapsulation, "generate_keypair_seed"):
            return "liboqs-python is older than 0.14 (no seeded key generation)"
        return None

    def _keygen(self, seed: bytes) -> KemKeyPair:
        with self._oqs.KeyEncapsulation(self.ALGORITHM) as kem:
            public = bytes(kem.generate_keypair_seed(seed))
            expanded = bytes(kem.export_secret_key())
        return KemKeyPair(public, expanded)

    def _encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        with self._oqs.KeyEncapsulation(self.ALGORITHM) as kem:
            try:
                ciphertext, shared = kem.encap_secret(public_key)
            except RuntimeError as exc:
                raise RemoteProtocolError(f"ML-KEM-768 public key refused: {exc}") from exc
        return bytes(ciphertext), bytes(shared)

    def _decapsulate(self, keypair: KemKeyPair, ciphertext: bytes) -> bytes:
        with self._oqs.KeyEncapsulation(self.ALGORITHM, secret_key=keypair.private) as kem:
            try:
                return bytes(kem.decap_secret(ciphertext))
            except RuntimeError as exc:
                raise RemoteProtocolError(f"ML-KEM-768 ciphertext refused: {exc}") from exc

    def import_expanded_key(self, expanded: bytes) -> KemKeyPair:
        if len(expanded) != EXPANDED_PRIVATE_KEY_SIZE:
            raise LocalProtocolError(
                f"expanded ML-KEM-768 key must be {EXPANDED_PRIVATE_KEY_SIZE} bytes"
            )
        return KemKeyPair(expanded[1152 : 1152 + PUBLIC_KEY_SIZE], bytes(expanded))


# ML-KEM in pyca/cryptography: 47.0.0 brought it for AWS-LC and BoringSSL
# builds only; 48.0.0 added OpenSSL, which has ML-KEM from 3.5 on.
OPENSSL_MLKEM = 0x30500000


def cryptography_mlkem_problem(
    version: str,
    library: str,
    openssl_number: int,
    openssl_text: str,
    *,
    has_module: bool,
    backend_supports: bool | None,
) -> str | None:
    """Why this cryptography build cannot do ML-KEM-768, or None when it can.

    ``library`` is "OpenSSL", "AWS-LC" or "BoringSSL" (what cryptography was
    built against); ``openssl_number`` is OpenSSL's OPENSSL_VERSION_NUMBER;
    ``backend_supports`` is ``backend.mlkem_supported()`` where it exists.
    """
    match = re.match(r"(\d+)\.(\d+)", version)
    major = int(match.group(1)) if match else 0
    needed = 47 if library in ("AWS-LC", "BoringSSL") else 48
    if major < needed or not has_module:
        return (
            f"cryptography {version} over {library} has no ML-KEM "
            f"({needed} or newer has; 47 only over AWS-LC or BoringSSL)"
        )
    if library == "OpenSSL" and openssl_number < OPENSSL_MLKEM:
        return f"cryptography's {openssl_text} has no ML-KEM (OpenSSL 3.5 or newer has)"
    if backend_supports is False:
        return f"cryptography's {openssl_text} build does not support ML-KEM"
    return None


def _liboqs_present() -> bool:
    """Whether liboqs-python's own search would find a loadable liboqs (without installing).

    Mirrors ``oqs.oqs._load_liboqs``: ``$OQS_INSTALL_PATH``, else the install
    directory written into the module (nixpkgs patches it to the liboqs store
    path), else ``~/_oqs``; each with ``lib``/``lib64``; then the linker's search.
    """
    roots: list[Path] = []
    install = os.environ.get("OQS_INSTALL_PATH")
    if install:
        roots.append(Path(install))
    else:
        spec = importlib.util.find_spec("oqs")
        if spec is not None and spec.origin:
            module = Path(spec.origin).with_name("oqs.py")
            try:
                patched = re.search(r'oqs_install_dir = Path\("([^"]+)"\)', module.read_text())
            except OSError:
                patched = None
            if patched:
                roots.append(Path(patched.group(1)))
        if not roots:
            with contextlib.suppress(RuntimeError):  # no home directory
                roots.append(Path.home() / "_oqs")
    candidates = [str(root / lib / "liboqs.so") for root in roots for lib in ("lib", "lib64")]
    found = ctypes.util.find_library("oqs")
    if found:
        candidates.append(found)
    for candidate in candidates:
        try:
            ctypes.CDLL(candidate)
        except OSError:
            continue
        return True
    return False


BACKENDS: dict[str, type[CryptographyKem] | type[OqsKem]] = {
    "cryptography": CryptographyKem,
    "oqs": OqsKem,
}


def available_backends() -> dict[str, str | None]:
    """Each backend's name and why it cannot load (``None``: it can)."""
    return {name: cls.unavailable_reason() for name, cls in BACKENDS.items()}


def get_kem(backend: str | None = None) -> Kem:
    """The named ML-KEM-768 backend, or the first that loads; ``KemUnavailable`` if none."""
    if backend is not None:
        if backend not in BACKENDS:
            raise KemUnavailable(
                f"unknown ML-KEM backend {backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        return BACKENDS[backend]()
    reasons = []
    for name, cls in BACKENDS.items():
        reason = cls.unavailable_reason()
        if reason is None:
            return cls()
        reasons.append(f"{name}: {reason}")
    raise KemUnavailable(
        "no ML-KEM-768 implementation available (" + "; ".join(reasons) + "); install "
        "cryptography>=48 over OpenSSL 3.5+ (or >=47 over AWS-LC or BoringSSL), or liboqs with "
        "liboqs-python>=0.14"
    )
