"""keel.appliance.seed: the first-boot seed (SSH keys, a mesh invite)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from keel.appliance.seed import (
    APPLIED_SUFFIX,
    INVITE,
    KEYS,
    MAX_SEED_FILE,
    apply_keys,
    join_mesh,
    merge_authorized_keys,
    parse_authorized_keys,
    parse_public_key,
)
from keel.cli import main
from keel.errors import ConfigError, KeelError
from keel.mesh.errors import InviteError
from keel.mesh.identity import NodeIdentity
from keel.mesh.invite import new_invite

from tests.unit.mesh.conftest import seeded


def blob(kind: str, body: bytes = b"\x00" * 32) -> str:
    """An SSH public key blob: the type as an SSH string, then key material."""
    return base64.b64encode(len(kind).to_bytes(4, "big") + kind.encode() + body).decode()


ED = f"ssh-ed25519 {blob('ssh-ed25519')} alice@laptop"
ED2 = "ssh-ed25519 " + blob("ssh-ed25519", bytes([1]) * 32)
ECDSA = f"ecdsa-sha2-nistp256 {blob('ecdsa-sha2-nistp256')} bob"


def test_keys_are_parsed_with_their_comments() -> None:
    keys = parse_authorized_keys(f"# the operator\n\n{ED}\n  {ECDSA}  \n", source="seed")
    assert [(k.type, k.comment) for k in keys] == [
        ("ssh-ed25519", "alice@laptop"),
        ("ecdsa-sha2-nistp256", "bob"),
    ]
    assert keys[0].line == ED


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("ssh-ed25519", "expected an OpenSSH public key"),
        ("ssh-dss AAAA", "expected an OpenSSH public key"),
        ('command="/bin/sh" ' + ED, "expected an OpenSSH public key"),
        ("ssh-ed25519 not*base64", "not valid base64"),
        (f"ssh-ed25519 {blob('ssh-rsa')}", "does not hold a ssh-ed25519 key"),
        ("ssh-ed25519 AAAA", "does not hold a ssh-ed25519 key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "expected an OpenSSH public key"),
    ],
)
def test_anything_but_a_public_key_is_refused_by_line(line: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        parse_authorized_keys(f"{ED}\n{line}\n", source="/boot/keel-seed/authorized_keys")
    assert str(caught.value).startswith("/boot/keel-seed/authorized_keys:2: ")
    assert "\n" not in str(caught.value)


def test_a_long_bad_line_is_cut_in_the_message() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_public_key("x" * 10_000, where="seed:1")
    assert len(str(caught.value)) < 300


def test_a_seed_without_keys_is_refused() -> None:
    with pytest.raises(ConfigError, match="seed: no public key in it"):
        parse_authorized_keys("# nothing yet\n\n", source="seed")


def test_merging_adds_only_missing_keys_and_keeps_the_file() -> None:
    existing = f'# mine\nfrom="10.0.0.0/8" {ED.replace("alice@laptop", "old comment")}'
    keys = parse_authorized_keys(f"{ED}\n{ECDSA}\n{ECDSA}\n", source="seed")
    text, added = merge_authorized_keys(existing, keys)
    assert [k.line for k in added] == [ECDSA]
    assert text == existing + "\n" + ECDSA + "\n"
    again, none = merge_authorized_keys(text, keys)
    assert (again, none) == (text, [])


def test_keys_are_applied_once(tmp_path: Path) -> None:
    seed, target = tmp_path / "seed", tmp_path / "root" / ".ssh" / "authorized_keys"
    seed.mkdir()
    (seed / KEYS).write_text(f"{ED}\n{ED2}\n")
    done = apply_keys(seed, target)
    assert done == {"target": str(target), "keys": 2, "added": [ED, ED2]}
    assert target.read_text() == f"{ED}\n{ED2}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert not (seed / KEYS).exists()
    assert (seed / (KEYS + APPLIED_SUFFIX)).read_text() == f"{ED}\n{ED2}\n"
    # The next boot finds nothing to do; a key removed since stays removed.
    target.write_text(f"{ED}\n")
    assert apply_keys(seed, target) is None
    assert target.read_text() == f"{ED}\n"


def test_a_bad_seed_changes_nothing(tmp_path: Path) -> None:
    seed, target = tmp_path / "seed", tmp_path / "authorized_keys"
    seed.mkdir()
    target.write_text("# existing\n")
    (seed / KEYS).write_text(f"{ED}\nssh-ed25519 broken\n")
    with pytest.raises(ConfigError):
        apply_keys(seed, target)
    assert target.read_text() == "# existing\n"
    assert (seed / KEYS).exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"\xff\xfe" + b"x" * 10, "not UTF-8 text"), (b"x" * (MAX_SEED_FILE + 1), "larger than")],
)
def test_a_seed_file_that_is_not_keys_text_is_refused(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    (tmp_path / KEYS).write_bytes(content)
    with pytest.raises(ConfigError, match=problem):
        apply_keys(tmp_path, tmp_path / "target")


NOW = 1_700_000_000.0


def invite_text(ttl: float = 600) -> str:
    inviter = NodeIdentity.generate(seeded("inviter"))
    token = new_invite(
        inviter, ["192.0.2.1:7400"], now=int(NOW), ttl=ttl, uses=1, random=seeded("s")
    )
    return token.encode()


def test_the_invite_is_joined_then_deleted(tmp_path: Path) -> None:
    token = invite_text()
    (tmp_path / INVITE).write_text(token + "\n")
    calls: list[str] = []

    def join(text: str) -> dict[str, Any]:
        calls.append(text)
        return {"joined": True, "mesh": "m1", "via": "n1", "members": 2}

    done = join_mesh(tmp_path, join, now=lambda: NOW)
    assert done is not None
    assert done["mesh"] == "m1"
    assert calls == [token]
    assert not (tmp_path / INVITE).exists()
    assert join_mesh(tmp_path, join, now=lambda: NOW) is None


def test_a_failed_join_keeps_the_invite_for_the_next_try(tmp_path: Path) -> None:
    (tmp_path / INVITE).write_text(invite_text())

    def join(text: str) -> dict[str, Any]:
        raise KeelError("handshake not finished after 10 s")

    with pytest.raises(KeelError, match="handshake"):
        join_mesh(tmp_path, join, now=lambda: NOW)
    assert (tmp_path / INVITE).exists()


@pytest.mark.parametrize(
    ("text", "now", "kind"),
    [("not a token", NOW, "malformed"), (None, NOW + 601, "expired")],
)
def test_a_bad_invite_is_refused_before_joining(
    tmp_path: Path, text: str | None, now: float, kind: str
) -> None:
    (tmp_path / INVITE).write_text(text if text is not None else invite_text(ttl=600))

    def join(text: str) -> dict[str, Any]:
        raise AssertionError("must not be called")

    with pytest.raises(InviteError) as caught:
        join_mesh(tmp_path, join, now=lambda: now)
    assert caught.value.reason == kind


def test_the_cli_applies_keys_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / KEYS).write_text(ED + "\n")
    target = tmp_path / "ak"
    argv = ["appliance", "seed", "--dir", str(seed), "--authorized-keys", str(target)]
    assert main([*argv, "--only", "keys"]) == 0
    assert capsys.readouterr().out == f"keel: 1 of 1 seed key(s) added to {target}\n"
    assert main(argv) == 0
    assert capsys.readouterr().out == f"keel: nothing to apply in {seed}\n"


def test_the_cli_reports_a_bad_seed_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / KEYS).write_text("ssh-rsa x\n")
    code = main(["appliance", "seed", "--dir", str(tmp_path), "--authorized-keys", os.devnull])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"keel: error: {tmp_path / KEYS}:1: ")
    assert err.count("\n") == 1
