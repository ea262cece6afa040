"""The checkpoint signing key on disk.

The key file holds one line, the signer key in the format of Go's
``golang.org/x/mod/sumdb/note`` (``PRIVATE+KEY+name+hexid+base64``). It lives
next to the database (``ledger.db`` -> ``ledger.key``), is created on first use
with mode 0600 (written to a private temporary file, then linked into place,
so no other process ever sees a partial or world-readable key), and is refused
when group or others can read it. Its public half, the verifier key, is what
an auditor needs to check checkpoints offline.
"""

from __future__ import annotations

import re
import secrets
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from keel.files import write_durably
from keel.ledger.core import Signer, Verifier
from keel.ledger.errors import KeyFileError, MalformedError

if TYPE_CHECKING:
    from keel.ledger.store import Ledger


def default_key_path(db: Path) -> Path:
    return db.with_name(db.stem + ".key")


def default_key_name() -> str:
    """``<hostname>/keel/ledger``: the key name, and so the checkpoint origin."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "localhost"
    return f"{host}/keel/ledger"


def load_signer(path: Path) -> Signer:
    """Read a signer key file; :class:`KeyFileError` says what is wrong and the fix."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"no signing key at {path}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise KeyFileError(f"signing key {path} is a directory, not a key file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"signing key {path} has mode {stat.S_IMODE(info.st_mode):04o}, "
            f"readable by others: chmod 600 {path}"
        )
    text = _read_small(path, "signing key")
    try:
        return Signer.parse(text)
    except MalformedError as exc:
        raise KeyFileError(f"signing key {path} is malformed: {exc}") from None


def create_signer(path: Path, name: str, seed: bytes | None = None) -> Signer:
    """Create a new key file at ``path`` (mode 0600) unless one appears first.

    Two processes racing to create the key both end up with the same key: the
    file is linked into place, which fails if another process got there first,
    and then that key is read instead. The directory must exist: a mistyped
    path is refused rather than silently given a new key.
    """
    signer = Signer(name, seed if seed is not None else secrets.token_bytes(32))
    if not path.parent.is_dir():
        raise KeyFileError(
            f"cannot create signing key {path}: there is no directory {path.parent} "
            "(a mistyped --db or --key?)"
        )
    try:
        made = write_durably(path, (str(signer) + "\n").encode("ascii"), mode=0o600, replace=False)
    except OSError as exc:
        raise KeyFileError(f"cannot create signing key {path}: {exc.strerror or exc}") from None
    return signer if made else load_signer(path)


def signer_for(ledger: Ledger, key_path: Path | None = None) -> Signer:
    """The key that signs ``ledger``'s checkpoints, created on first use.

    ``key_path`` defaults to the ``.key`` file next to the database. A missing
    key is created only while the ledger holds no checkpoints: once it does,
    a new key could not sign checkpoints that verify with the old one, so the
    missing file is a :class:`KeyFileError` that says to restore it.
    """
    path = key_path if key_path is not None else default_key_path(ledger.path)
    if path.exists() or path.is_symlink():
        return load_signer(path)
    existing = len(ledger.checkpoints())
    if existing:
        raise KeyFileError(
            f"no signing key at {path}, but {ledger.path} holds {existing} "
            f"checkpoint{'' if existing == 1 else 's'} signed with one: restore the key file "
            "(or pass --key PATH)"
        )
    return create_signer(path, default_key_name())


def load_verifier(spec: str) -> Verifier:
    """A verifier key given as the key string itself or as a file holding it."""
    candidate = Path(spec)
    try:
        is_file = candidate.is_file()
    except (OSError, ValueError):  # a name too long, a NUL: not a file name, so a key
        is_file = False
    if is_file:
        text = _read_small(candidate, "verifier key").strip()
        try:
            return Verifier.parse(text)
        except MalformedError as exc:
            raise MalformedError(f"{candidate}: {exc}") from None
    return Verifier.parse(spec)


MAX_KEY_FILE = 4096  # a key is about 100 bytes


def _read_small(path: Path, what: str) -> str:
    """The text of a key file, refusing what cannot be one (too large, not ASCII)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"no {what} at {path}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(
            f"cannot read {what} {path}: larger than {MAX_KEY_FILE} bytes, so not a key file"
        )
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(
            f"cannot read {what} {path}: not ASCII text, so not a key file"
        ) from None
