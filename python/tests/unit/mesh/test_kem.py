"""ML-KEM-768: every backend against kyber-py and the CCTV edge cases."""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.mesh import kem as kem_module
from keel.mesh.errors import KemUnavailable, LocalProtocolError, RemoteProtocolError
from keel.mesh.kem import Kem, check_encapsulation_key, get_kem

from tests.kyberpy_kem import KyberPyKem

BACKENDS = ["cryptography", "oqs"]


def load_backend(name: str) -> Kem:
    if name == "kyber-py":
        return KyberPyKem()
    reason = kem_module.available_backends()[name]
    if reason is not None:
        pytest.skip(f"ML-KEM backend {name} unavailable here: {reason}")
    return get_kem(name)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Kem:
    return load_backend(request.param)


def cctv(vectors_dir: Path, case: str) -> dict[str, bytes]:
    """``name = hex`` lines; the first occurrence of a name wins (later ones are intermediates)."""
    values: dict[str, bytes] = {}
    for line in (vectors_dir / "mlkem" / "cctv" / case / "ML-KEM-768.txt").read_text().splitlines():
        name, _, value = line.partition(" = ")
        if name and name not in values:
            try:
                values[name] = bytes.fromhex(value)
            except ValueError:
                continue  # polynomial listings such as A[0, 0] = {...}
    return values


def test_sizes(backend: Kem) -> None:
    pair = backend.keygen(os.urandom(64))
    ciphertext, shared = backend.encapsulate(pair.public_key)
    assert (len(pair.public_key), len(ciphertext), len(shared)) == (1184, 1088, 32)
    assert backend.decapsulate(pair, ciphertext) == shared
    assert (backend.public_key_size, backend.ciphertext_size) == (1184, 1088)


def test_keygen_is_deterministic_and_matches_kyber_py(backend: Kem) -> None:
    seed = bytes(range(64))
    assert backend.keygen(seed).public_key == backend.keygen(seed).public_key
    assert backend.keygen(seed).public_key == KyberPyKem().keygen(seed).public_key
    assert backend.keygen(bytes(64)).public_key != backend.keygen(seed).public_key


def test_cross_check_with_kyber_py_both_directions(backend: Kem) -> None:
    reference = KyberPyKem()
    for _ in range(3):
        seed = os.urandom(64)
        # backend encapsulates, kyber-py decapsulates
        theirs = reference.keygen(seed)
        ciphertext, shared = backend.encapsulate(theirs.public_key)
        assert reference.decapsulate(theirs, ciphertext) == shared
        # kyber-py encapsulates, backend decapsulates
        ours = backend.keygen(seed)
        ciphertext, shared = reference.encapsulate(ours.public_key)
        assert backend.decapsulate(ours, ciphertext) == shared


def test_cctv_keys_come_from_the_draft_keygen(vectors_dir: Path) -> None:
    """Why no test derives the CCTV keys from ``d || z``.

    These CCTV files (1e3d2860) were made with the FIPS 203 draft KeyGen,
    ``(rho, sigma) = G(d)``; the final standard, which every backend and
    kyber-py implement, uses ``G(d || k)``. The vectors' ``ek``/``dk`` are
    therefore used as given, and seeded key generation is cross-checked
    against kyber-py instead (``test_keygen_is_deterministic_and_matches_kyber_py``).
    """
    v = cctv(vectors_dir, "intermediate")
    assert hashlib.sha3_512(v["d"]).digest()[:32] == v["\u03c1"]  # rho
    assert KyberPyKem().keygen(v["d"] + v["z"]).public_key != v["ek"]


@pytest.mark.parametrize("case", ["intermediate", "unluckysample"])
def test_cctv_encapsulation_with_kyber_py(vectors_dir: Path, case: str) -> None:
    v = cctv(vectors_dir, case)
    kem = KyberPyKem(encaps_random=lambda n: v["m"])
    assert kem.encapsulate(v["ek"]) == (v["c"], v["K"])


@pytest.mark.parametrize("case", ["intermediate", "unluckysample"])
@pytest.mark.parametrize("name", ["kyber-py", *BACKENDS])
def test_cctv_encapsulation_keys(vectors_dir: Path, name: str, case: str) -> None:
    """Each backend encapsulates to the vector's key (unlucky: a long SampleNTT)."""
    kem = load_backend(name)
    v = cctv(vectors_dir, case)
    assert v["dk"][1152 : 1152 + 1184] == v["ek"]
    assert hashlib.sha3_256(v["ek"]).digest() == v["dk"][2336:2368]
    reference = KyberPyKem()
    holder = reference.import_expanded_key(v["dk"])
    for _ in range(2):
        ciphertext, shared = kem.encapsulate(v["ek"])
        assert reference.decapsulate(holder, ciphertext) == shared


@pytest.mark.parametrize("case", ["intermediate", "unluckysample", "strcmp"])
@pytest.mark.parametrize("name", ["kyber-py", "oqs"])
def test_cctv_decapsulation(vectors_dir: Path, name: str, case: str) -> None:
    """Decapsulate with the vector's expanded key; strcmp is the implicit-rejection case.

    cryptography imports seeds only (not 2400-byte keys); its implicit
    rejection is checked in ``test_implicit_rejection``.
    """
    kem = load_backend(name)
    v = cctv(vectors_dir, case)
    pair = kem.import_expanded_key(v["dk"])
    assert pair.public_key == v["dk"][1152 : 1152 + 1184]
    assert kem.decapsulate(pair, v["c"]) == v["K"]
    z = v["dk"][-32:]
    rejected = hashlib.shake_256(z + v["c"]).digest(32)
    if case == "strcmp":
        assert v["K"] == rejected  # the re-encryption differs: K is J(z || c)
    else:
        assert v["K"] != rejected
        assert rejected == v.get("KBar", rejected)


def test_cctv_implicit_rejection_value(vectors_dir: Path) -> None:
    v = cctv(vectors_dir, "intermediate")
    assert hashlib.shake_256(v["z"] + v["c"]).digest(32) == v["KBar"]


def test_implicit_rejection(backend: Kem) -> None:
    """A tampered ciphertext decapsulates to J(z || c'), z the second half of the seed."""
    seed = os.urandom(64)
    pair = backend.keygen(seed)
    ciphertext, shared = KyberPyKem().encapsulate(pair.public_key)
    for position in (0, 500, len(ciphertext) - 1):
        tampered = bytearray(ciphertext)
        tampered[position] ^= 0x80
        expected = hashlib.shake_256(seed[32:] + bytes(tampered)).digest(32)
        assert backend.decapsulate(pair, bytes(tampered)) == expected != shared


def test_cryptography_refuses_expanded_keys() -> None:
    kem = load_backend("cryptography")
    with pytest.raises(LocalProtocolError, match="cannot import expanded"):
        kem.import_expanded_key(bytes(2400))


def modulus_keys(vectors_dir: Path) -> list[bytes]:
    path = vectors_dir / "mlkem" / "cctv" / "modulus" / "ML-KEM-768.txt.gz"
    with gzip.open(path, "rt") as lines:
        return [bytes.fromhex(line.strip()) for line in lines if line.strip()]


@pytest.mark.parametrize("name", ["kyber-py", *BACKENDS])
def test_cctv_invalid_modulus_keys_are_refused(vectors_dir: Path, name: str) -> None:
    kem = load_backend(name)
    keys = modulus_keys(vectors_dir)
    assert len(keys) > 700
    for key in keys:
        with pytest.raises(RemoteProtocolError, match="not reduced modulo q"):
            kem.encapsulate(key)


@pytest.mark.parametrize("name", ["kyber-py", *BACKENDS])
def test_backends_refuse_invalid_modulus_keys_on_their_own(vectors_dir: Path, name: str) -> None:
    """Below our FIPS 203 7.2 check, each implementation refuses the same keys."""
    kem = load_backend(name)
    for key in modulus_keys(vectors_dir)[:50]:
        with pytest.raises((RemoteProtocolError, ValueError)):
            kem._encapsulate(key)


def reference_modulus_check(public_key: bytes) -> bool:
    """FIPS 203 7.2 written out plainly: every decoded coefficient below q."""
    encoded = public_key[:1152]
    for i in range(0, 1152, 3):
        c0 = encoded[i] | (encoded[i + 1] & 0x0F) << 8
        c1 = encoded[i + 1] >> 4 | encoded[i + 2] << 4
        if c0 >= 3329 or c1 >= 3329:
            return False
    return True


@functools.cache
def sample_keys() -> list[bytes]:
    return [KyberPyKem().keygen(bytes([i]) * 64).public_key for i in range(4)]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    which=st.integers(0, 3),
    edits=st.lists(st.tuples(st.integers(0, 1151), st.integers(0, 255)), max_size=4),
)
def test_fast_modulus_check_agrees_with_the_plain_one(
    which: int, edits: list[tuple[int, int]]
) -> None:
    key = bytearray(sample_keys()[which])
    for position, value in edits:
        key[position] = value
    expected = reference_modulus_check(bytes(key))
    try:
        check_encapsulation_key(bytes(key))
        accepted = True
    except RemoteProtocolError:
        accepted = False
    assert accepted == expected


@pytest.mark.parametrize(("c0", "c1"), [(3328, 3328), (3329, 0), (0, 3329), (4095, 0), (0, 4095)])
def test_modulus_check_at_the_boundary(c0: int, c1: int) -> None:
    key = bytearray(1184)
    key[0:3] = bytes([c0 & 0xFF, (c0 >> 8) | (c1 & 0x0F) << 4, c1 >> 4])
    assert reference_modulus_check(bytes(key)) == (c0 < 3329 and c1 < 3329)
    if c0 < 3329 and c1 < 3329:
        check_encapsulation_key(bytes(key))
    else:
        with pytest.raises(RemoteProtocolError, match="not reduced modulo q"):
            check_encapsulation_key(bytes(key))


def test_key_check_accepts_real_keys_and_refuses_wrong_lengths() -> None:
    check_encapsulation_key(KyberPyKem().keygen(os.urandom(64)).public_key)
    with pytest.raises(RemoteProtocolError, match="1183 bytes"):
        check_encapsulation_key(bytes(1183))


def test_wrong_sizes_are_refused(backend: Kem) -> None:
    pair = backend.keygen(os.urandom(64))
    with pytest.raises(LocalProtocolError, match="64 bytes"):
        backend.keygen(bytes(32))
    with pytest.raises(RemoteProtocolError, match="1087 bytes"):
        backend.decapsulate(pair, bytes(1087))
    with pytest.raises(RemoteProtocolError, match="0 bytes"):
        backend.encapsulate(b"")


def test_get_kem_prefers_a_loadable_backend() -> None:
    available = [n for n, reason in kem_module.available_backends().items() if reason is None]
    if not available:
        pytest.skip("no ML-KEM backend on this host")
    assert get_kem().backend == available[0]


def test_get_kem_explains_when_nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        kem_module.CryptographyKem, "unavailable_reason", staticmethod(lambda: "too old")
    )
    monkeypatch.setattr(
        kem_module.OqsKem, "unavailable_reason", classmethod(lambda cls: "no liboqs")
    )
    with pytest.raises(KemUnavailable) as caught:
        get_kem()
    message = str(caught.value)
    assert "cryptography: too old" in message
    assert "oqs: no liboqs" in message
    assert "install" in message
    with pytest.raises(KemUnavailable, match="too old"):
        get_kem("cryptography")
    with pytest.raises(KemUnavailable, match="unknown ML-KEM backend 'nope'"):
        get_kem("nope")


def test_oqs_reports_why_it_cannot_load() -> None:
    reason = kem_module.available_backends()["oqs"]
    if reason is None:
        pytest.skip("oqs loads here; nothing to explain")
    assert reason
    print(f"oqs backend unavailable: {reason}")


@pytest.fixture
def stand_in_library() -> Path:
    """Any real shared library, copied in as liboqs.so: only loadability is checked."""
    import ctypes.util

    name = ctypes.util.find_library("z") or ctypes.util.find_library("c")
    assert name is not None
    for folder in (
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib",
        "/usr/lib",
        "/lib64",
    ):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    pytest.skip(f"cannot locate {name} to stand in for liboqs")


def test_liboqs_search_follows_oqs_install_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stand_in_library: Path
) -> None:
    """Never import oqs unless its own search would find liboqs (it would download it)."""
    import ctypes.util

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path))
    assert not kem_module._liboqs_present()
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "liboqs.so").write_bytes(stand_in_library.read_bytes())
    assert kem_module._liboqs_present()


def test_liboqs_search_reads_the_nixpkgs_patched_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stand_in_library: Path
) -> None:
    import ctypes.util
    import importlib

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.delenv("OQS_INSTALL_PATH", raising=False)
    store = tmp_path / "store-liboqs"
    package = tmp_path / "site" / "oqs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise SystemExit('must not be imported')\n")
    (package / "oqs.py").write_text(f'        oqs_install_dir = Path("{store}")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert not kem_module._liboqs_present()
    (store / "lib").mkdir(parents=True)
    (store / "lib" / "liboqs.so").write_bytes(stand_in_library.read_bytes())
    assert kem_module._liboqs_present()
    assert "oqs" not in __import__("sys").modules
