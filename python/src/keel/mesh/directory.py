"""The node's directory on disk: its identity key and its state database.

A node keeps two files in its directory (the config's ``directory``,
``/var/lib/keel/mesh`` on an installed host): ``identity.key`` (both private
keys, mode 0600: whoever holds it *is* the node) and ``state.db`` (records,
invites, outbox, inbox, dedup ids: :mod:`keel.mesh.store`). The names are the
same as before the daemon read a config file, so a host upgrades in place by
pointing ``directory`` at its old ``--dir``.

The key file is created atomically (:func:`keel.files.write_durably`: a
private temporary file, fsynced, linked into place), so two first runs cannot
both win; it is refused when it is not a regular file of this user's, or
group or others may read it.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from keel.errors import KeelError
from keel.files import write_durably
from keel.mesh.errors import IdentityError
from keel.mesh.identity import NodeIdentity, parse_key_file

IDENTITY_FILE = "identity.key"
STATE_FILE = "state.db"
LEGACY_CONFIG = "config.json"  # settings before --config: no longer read
MAX_KEY_FILE = 64 * 1024
LOCK_FILE = "daemon.lock"


def prepare(directory: Path, mode: int, *, named: str = "directory") -> None:
    """Make the node's directory (``mode``) if need be; ``KeelError`` unless this user may write it.

    ``named``: how the user gave it (a config key, an option), for the message.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=mode)
    except OSError as exc:
        raise KeelError(
            f"{named} {directory}: cannot create the node's directory: {exc.strerror}"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise KeelError(
            f"{named} {directory}: not writable by this user (uid {os.getuid()}); the node keeps "
            "its identity and state there"
        )


def load_identity(path: Path) -> NodeIdentity:
    """Read a key file; ``IdentityError`` naming the file and the fix if anything is off."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise IdentityError(
            f"{path}: no identity key file (keel mesh creates one on first run)"
        ) from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot open the identity key file: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise IdentityError(f"{path}: the identity key file is not a regular file")
        if mode & 0o077:
            raise IdentityError(
                f"{path}: the identity key file is readable by others (mode {mode & 0o777:03o}); "
                f"run: chmod 600 {path}"
            )
        raw = handle.read(MAX_KEY_FILE)
    try:
        return parse_key_file(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IdentityError(f"{path}: malformed identity key file: {exc}") from None


def create_identity(
    path: Path, random: Callable[[int], bytes] = secrets.token_bytes
) -> NodeIdentity:
    """Make a new identity and write its key file (0600) atomically; never overwrites."""
    identity = NodeIdentity.generate(random)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        made = write_durably(path, identity.to_key_file().encode(), mode=0o600, replace=False)
    except OSError as exc:
        raise IdentityError(
            f"{path.parent}: cannot write the identity key file there: {exc.strerror}"
        ) from None
    if not made:
        raise IdentityError(f"{path}: an identity key file already exists")
    return identity


def load_or_create_identity(
    path: Path, random: Callable[[int], bytes] = secrets.token_bytes
) -> NodeIdentity:
    """The identity in ``path``, made on first use (if two processes race, both get the winner's)."""
    if not os.path.lexists(path):
        try:
            return create_identity(path, random)
        except IdentityError:
            if not os.path.lexists(path):
                raise
    return load_identity(path)


def lock(directory: Path) -> int:
    """Hold the directory for this daemon (``flock``); ``KeelError`` if another one does.

    Returns the lock file's descriptor: closing it (or exiting) lets go.
    """
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise KeelError(f"{path}: cannot open the node's lock file: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise KeelError(
            f"{directory}: another keel mesh daemon is already serving this directory"
            f"{f' (pid {holder})' if holder.isdigit() else ''}; stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
