"""Which pyca/cryptography builds give the mesh ML-KEM (keel.mesh.kem).

47.0.0 brought ML-KEM for AWS-LC and BoringSSL builds only; 48.0.0 added
OpenSSL, which has ML-KEM from 3.5 on. nixos-26.05 ships cryptography 48.0.0
over OpenSSL 3.6 (docs/nix.md), which passes.
"""

from __future__ import annotations

import pytest
from keel.mesh.kem import CryptographyKem, cryptography_mlkem_problem

OPENSSL_3_0 = 0x30000100
OPENSSL_3_5 = 0x30500000
OPENSSL_3_6 = 0x30600020


@pytest.mark.parametrize(
    ("version", "library", "number", "supports", "ok"),
    [
        ("48.0.0", "OpenSSL", OPENSSL_3_6, True, True),  # nixos-26.05
        ("48.0.0", "OpenSSL", OPENSSL_3_5, True, True),
        ("48.0.0", "OpenSSL", OPENSSL_3_0, True, False),
        ("47.0.0", "OpenSSL", OPENSSL_3_6, True, False),
        ("47.0.0", "OpenSSL", OPENSSL_3_6, None, False),
        ("47.0.0", "AWS-LC", 0, True, True),
        ("47.0.0", "BoringSSL", 0, None, True),
        ("46.0.7", "AWS-LC", 0, None, False),
        ("51.0.1", "OpenSSL", 0x40100010, True, True),
        ("48.0.0", "OpenSSL", OPENSSL_3_6, False, False),
        ("48.0.0.dev1", "OpenSSL", OPENSSL_3_6, None, True),
    ],
)
def test_ml_kem_needs_48_over_openssl_or_47_over_aws_lc(
    version: str, library: str, number: int, supports: bool | None, ok: bool
) -> None:
    problem = cryptography_mlkem_problem(
        version, library, number, "OpenSSL x", has_module=True, backend_supports=supports
    )
    assert (problem is None) == ok, problem


def test_the_reasons_say_what_is_needed() -> None:
    old = cryptography_mlkem_problem(
        "47.0.0", "OpenSSL", OPENSSL_3_6, "OpenSSL 3.6.0", has_module=True, backend_supports=None
    )
    assert old == (
        "cryptography 47.0.0 over OpenSSL has no ML-KEM (48 or newer has; "
        "47 only over AWS-LC or BoringSSL)"
    )
    openssl = cryptography_mlkem_problem(
        "48.0.0", "OpenSSL", OPENSSL_3_0, "OpenSSL 3.0.1", has_module=True, backend_supports=None
    )
    assert openssl == "cryptography's OpenSSL 3.0.1 has no ML-KEM (OpenSSL 3.5 or newer has)"
    missing = cryptography_mlkem_problem(
        "48.0.0", "OpenSSL", OPENSSL_3_6, "OpenSSL 3.6.0", has_module=False, backend_supports=None
    )
    assert missing is not None
    assert "has no ML-KEM" in missing


def test_this_hosts_build_is_judged() -> None:
    # Whatever this machine has, the check runs on it without raising.
    reason = CryptographyKem.unavailable_reason()
    assert reason is None or "ML-KEM" in reason
