"""First boot of a keel image: the operator's SSH keys and a mesh invite from a seed.

A keel image is the same for everyone, so what makes a host the operator's
arrives beside it, in a *seed directory*: on a disk written from a rescue
system, ``keel-seed/`` on the image's EFI system partition (``/boot`` once
booted, a FAT file system any rescue system can mount and write); in the
``nix run .#vm`` VM, a directory of the host shared into the guest. It may
hold:

- ``authorized_keys``: OpenSSH public keys, one per line, for root. They are
  checked (every line must be a public key: a typo is refused whole, with its
  line, rather than half applied), added to root's ``authorized_keys``, and
  the seed file is renamed ``authorized_keys.applied``, so a key removed later
  does not come back at the next boot;
- ``mesh-invite``: a ``keel mesh invite`` token. The host joins that mesh;
  then the token, a secret, is deleted from the seed.

``keel appliance seed`` does both (the NixOS module runs it at boot: the keys
before sshd starts, the invite once the mesh node is up). The parsing and
merging here are pure; :func:`apply_keys` and :func:`join_mesh` do the I/O.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.errors import ConfigError, KeelError

KEYS = "authorized_keys"
INVITE = "mesh-invite"
APPLIED_SUFFIX = ".applied"

# The public key types OpenSSH (9.x) accepts in authorized_keys.
KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
MAX_SEED_FILE = 64 * 1024


@dataclass(frozen=True)
class PublicKey:
    type: str
    blob: str
    comment: str

    @property
    def line(self) -> str:
        return " ".join(part for part in (self.type, self.blob, self.comment) if part)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def parse_public_key(line: str, *, where: str) -> PublicKey:
    """One ``TYPE BASE64 [COMMENT]`` line; ``ConfigError`` naming ``where`` otherwise.

    Options before the key (``command=...``, ``from=...``) are refused: a seed
    gives the operator a login, nothing subtler.
    """
    fields = line.split(None, 2)
    if len(fields) < 2 or fields[0] not in KEY_TYPES:
        raise ConfigError(
            f"{where}: expected an OpenSSH public key (TYPE BASE64 [COMMENT], e.g. the line of "
            f"~/.ssh/id_ed25519.pub), got {_short(line)!r}"
        )
    kind, blob = fields[0], fields[1]
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: the key of type {kind} is not valid base64") from None
    # The blob starts with the key type again, as an SSH string.
    size = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if size != len(kind) or raw[4 : 4 + size] != kind.encode():
        raise ConfigError(f"{where}: the key's data does not hold a {kind} key (a truncated copy?)")
    comment = fields[2].strip() if len(fields) == 3 else ""
    return PublicKey(kind, blob, comment)


def parse_authorized_keys(text: str, *, source: str) -> list[PublicKey]:
    """Every key of a seed ``authorized_keys`` (blank lines and ``#`` comments skipped)."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keys.append(parse_public_key(stripped, where=f"{source}:{number}"))
    if not keys:
        raise ConfigError(f"{source}: no public key in it")
    return keys


def merge_authorized_keys(existing: str, keys: list[PublicKey]) -> tuple[str, list[PublicKey]]:
    """``existing`` with the keys it lacks appended; (new text, the keys added).

    A key is the same key whatever its comment; the file's own lines, options
    and comments are kept as they are.
    """
    present = set()
    for line in existing.splitlines():
        fields = line.split()
        for i, field in enumerate(fields[:-1]):
            if field in KEY_TYPES:
                present.add((field, fields[i + 1]))
                break
    added = []
    for key in keys:
        if (key.type, key.blob) not in present:
            present.add((key.type, key.blob))
            added.append(key)
    text = existing
    if added:
        if text and not text.endswith("\n"):
            text += "\n"
        text += "".join(key.line + "\n" for key in added)
    return text, added


def read_seed_file(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SEED_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    if len(data) > MAX_SEED_FILE:
        raise ConfigError(f"{path}: larger than {MAX_SEED_FILE // 1024} KiB; is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600, its directory 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def apply_keys(seed: Path, target: Path) -> dict[str, Any] | None:
    """Add the seed's keys to ``target``; None when the seed has none to apply."""
    source = seed / KEYS
    if not source.exists():
        return None
    keys = parse_authorized_keys(read_seed_file(source), source=str(source))
    try:
        existing = target.read_text(encoding="utf-8") if target.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise KeelError(f"{target}: cannot read it ({exc}); nothing was changed") from None
    text, added = merge_authorized_keys(existing, keys)
    if added:
        write_private(target, text)
    try:
        source.replace(source.with_name(KEYS + APPLIED_SUFFIX))
    except OSError as exc:
        raise KeelError(
            f"{source}: keys added to {target}, but the seed file could not be renamed "
            f"({exc.strerror}); they would be added again at the next boot"
        ) from None
    return {"target": str(target), "keys": len(keys), "added": [k.line for k in added]}


def join_mesh(
    seed: Path,
    join: Callable[[str], dict[str, Any]],
    *,
    now: Callable[[], float] = time.time,
) -> dict[str, Any] | None:
    """Join the mesh the seed's invite names, then delete the invite; None without one."""
    from keel.mesh.invite import InviteToken

    source = seed / INVITE
    if not source.exists():
        return None
    text = read_seed_file(source).strip()
    token = InviteToken.decode(text)  # malformed or forged: refused here, clearly
    token.check_fresh(now())
    result = join(text)
    try:
        source.unlink()
    except OSError as exc:
        raise KeelError(
            f"{source}: joined mesh {result.get('mesh')}, but the invite (a secret) could not "
            f"be deleted ({exc.strerror}); delete it by hand"
        ) from None
    return result
