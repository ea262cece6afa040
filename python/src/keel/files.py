"""Small files written so that no reader ever sees half of one (keys, heads).

The ledger's signing key and the mesh node's identity key are written the
same way, here: a private temporary file in the same directory, fsynced,
then linked (or renamed) into place, and the directory fsynced so the name
survives a crash.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_durably(path: Path, data: bytes, *, mode: int, replace: bool) -> bool:
    """Write ``data`` to ``path`` through a private temporary file, fsynced, then moved in.

    With ``replace`` the file takes the place of any old one (``rename``);
    without, it is linked into place only if ``path`` does not exist yet, and
    False says another process got there first (its file is left as it is).
    The directory is fsynced too, so the new name survives a crash. The
    directory must exist; :class:`OSError` otherwise.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # whatever the umask said
            with memoryview(data) as view:
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        temporary.unlink(missing_ok=True)
    return True
