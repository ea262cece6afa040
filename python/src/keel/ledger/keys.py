"""The checkpoint signing key on disk.

The key file holds one line, the signer key in the format of Go's
``golang.org/x/mod/sumdb/note`` (``PRIVATE+KEY+name+hexid+base64``). It lives
next to the database (``ledger.db`` -> ``ledger.key``), is created on first use
with mode 0600 (written to a private temporary file, then linked into place,
so no other process ever sees a partial or world-readable key), and is refused
when group or others can read it. Its public half, the verifier key, is what
an auditor needs to check checkpoints offline.

**Whose key it is.** Many daemons append to one ledger, as different users
(on NixOS: watch, egress and fleet as root, the mesh, chat and mcp as their
own users). The key belongs to the owner of the directory it lives in (root,
for ``/var/lib/keel``; the developer, for ``./.keel``): only a process running
as that user creates it (:func:`create_signer`), takes it back from another
owner (:func:`provision`), or signs by default (:func:`signs_here`; the
service shell turns a daemon's periodic checkpoints off otherwise). Whoever
starts first no longer decides who can sign.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import socket
import stat
from collections.abc import Callable
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


def user_name(uid: int) -> str:
    """``root``, ``keel-mesh (uid 997)``: a uid as people read it."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
    return "root" if uid == 0 else f"{name} (uid {uid})"


def directory_owner(directory: Path) -> int | None:
    """The owner of ``directory``, or of its nearest existing ancestor (None: none can be read).

    A directory not made yet would be made by this process inside that ancestor.
    """
    for candidate in (directory, *directory.parents):
        try:
            return candidate.stat().st_uid
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return None
    return None


def signs_here(key_path: Path) -> bool:
    """Does this process sign with the key at ``key_path``: does it run as the key's owner?

    The key belongs to the owner of its directory; see the module's text.
    """
    return directory_owner(key_path.parent) == os.geteuid()


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
    text = _read_small(path, "signing key", denied=lambda: _not_ours(path, info.st_uid))
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
    owner = directory_owner(path.parent)
    if owner != os.geteuid():
        who = "nobody keel can name" if owner is None else user_name(owner)
        raise KeyFileError(
            f"cannot create signing key {path}: it is made by the owner of {path.parent} "
            f"({who}), and this process runs as {user_name(os.geteuid())}: run "
            f"`keel ledger key --provision` as {who}"
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


def provision(path: Path, name: str | None = None) -> Signer:
    """Make sure the key at ``path`` exists and is this process's (``keel ledger key --provision``).

    Made if missing (only by the owner of its directory, as always); a key
    another user made (the first daemon to start, before keel provisioned it)
    is taken back, as root, by ``chown``, its contents and mode unchanged. A
    key group or others can read is still refused: it may have leaked.
    """
    if not (path.exists() or path.is_symlink()):
        return create_signer(path, name or default_key_name())
    euid = os.geteuid()
    owner = directory_owner(path.parent)
    if owner != euid:
        who = "nobody keel can name" if owner is None else user_name(owner)
        raise KeyFileError(
            f"signing key {path} belongs to the owner of {path.parent} ({who}), and this "
            f"process runs as {user_name(euid)}: run `keel ledger key --provision` as {who}"
        )
    info = path.lstat()
    if stat.S_ISREG(info.st_mode) and info.st_uid != euid:
        try:
            os.chown(path, euid, -1, follow_symlinks=False)
        except OSError as exc:
            raise KeyFileError(
                f"signing key {path} belongs to {user_name(info.st_uid)}; cannot take it "
                f"back for {user_name(euid)}: {exc.strerror or exc}"
            ) from None
    return load_signer(path)


def _not_ours(path: Path, uid: int) -> str:
    owner = directory_owner(path.parent)
    if owner is not None and uid != owner:
        fix = (
            f"it should belong to {user_name(owner)}, the owner of {path.parent}: run "
            f"`keel ledger key --provision` as {user_name(owner)}"
        )
    else:
        fix = (
            f"only {user_name(uid)} signs this ledger's checkpoints (a daemon running as "
            "another user should have checkpoint_every null)"
        )
    return (
        f"cannot read signing key {path}: it belongs to {user_name(uid)} and this process "
        f"runs as {user_name(os.geteuid())}; {fix}"
    )


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


def _read_small(path: Path, what: str, denied: Callable[[], str] | None = None) -> str:
    """The text of a key file, refusing what cannot be one (too large, not ASCII)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"no {what} at {path}") from None
    except PermissionError as exc:
        if denied is None:
            raise KeyFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
        raise KeyFileError(denied()) from None
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
