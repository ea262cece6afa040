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

from keel.files import write_durably
from keel.ledger.core import Signer, Verifier
from keel.ledger.errors import KeyFileError, MalformedError


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
        if stat.S_ISDIR(info.st_mode):
            raise KeyFileError(f"signing key {path} is a directory, not a key file")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"signing key {path} has mode {stat.S_IMODE(info.st_mode):04o}, "
                f"readable by others: chmod 600 {path}"
            )
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyFileError(f"no signing key at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise KeyFileError(f"cannot read signing key {path}: {reason}") from None
    try:
        return Signer.parse(text)
    except MalformedError as exc:
        raise KeyFileError(f"signing key {path} is malformed: {exc}") from None


def create_signer(path: Path, name: str, seed: bytes | None = None) -> Signer:
    """Create a new key file at ``path`` (mode 0600) unless one appears first.

    Two processes racing to create the key both end up with the same key: the
    file is linked into place, which fails if another process got there first,
    and then that key is read instead.
    """
    signer = Signer(name, seed if seed is not None else secrets.token_bytes(32))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        made = write_durably(path, (str(signer) + "\n").encode("ascii"), mode=0o600, replace=False)
    except OSError as exc:
        raise KeyFileError(f"cannot create signing key {path}: {exc.strerror or exc}") from None
    return signer if made else load_signer(path)


def load_verifier(spec: str) -> Verifier:
    """A verifier key given as the key string itself or as a file holding it."""
    candidate = Path(spec)
    if candidate.is_file():
        try:
            text = candidate.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read verifier key {candidate}: {exc}") from None
        try:
            return Verifier.parse(text)
        except MalformedError as exc:
            raise MalformedError(f"{candidate}: {exc}") from None
    return Verifier.parse(spec)
