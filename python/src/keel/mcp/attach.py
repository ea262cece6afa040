"""``keel mcp exec``: give a stdio MCP server its connection to the gateway as stdin and stdout.

A stdio MCP server reads JSON-RPC on stdin and answers on stdout. keel runs it
as its own unit (``keel-mcp-<name>.service``) whose ``ExecStart`` is this
launcher followed by the server's command. The launcher:

1. takes a listening Unix socket: the one systemd passes (socket activation,
   ``keel-mcp-<name>.socket``, fd 3) or, without systemd (dev mode, watch's
   process backend), one it binds itself at ``--listen PATH``;
2. accepts one connection (the gateway's);
3. makes that connection the process's stdin and stdout, closes the rest
   (the listening socket stays with systemd, or goes away with ``--listen``);
4. ``exec``s the server: the same pid, no relay process, no copy.

So there is one process per server, the one systemd (or watch) supervises,
and when it dies the gateway sees its connection close at once. With socket
activation the socket outlives the process: the gateway's next connection
waits in the socket's queue until systemd has restarted the server.

Only the socket's owner can connect (mode 0600: the gateway's user, and root).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from keel.errors import KeelError

SD_LISTEN_FDS_START = 3


def _inherited_listener() -> socket.socket | None:
    """The socket systemd passed (``LISTEN_FDS``), if it was passed to this process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    if count > 1:
        raise KeelError(
            f"systemd passed {count} sockets; an MCP server's socket unit has exactly one "
            "ListenStream="
        )
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise KeelError("the socket systemd passed is not a Unix stream socket")
    return sock


def _bound_listener(path: Path) -> socket.socket:
    """Listen at ``path`` (mode 0600), replacing a stale socket a dead server left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise KeelError(f"{path}: exists and is not a socket; remove it or choose another path")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise KeelError(f"{path}: cannot listen: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.listen(1)
    return sock


def accept_and_exec(command: Sequence[str], listen: Path | None) -> None:
    """Wait for the gateway, then become the server with the connection as stdin/stdout."""
    if not command:
        raise KeelError("no server command given after `--`")
    listener = _inherited_listener()
    bound_here = listener is None
    if listener is None:
        if listen is None:
            raise KeelError(
                "no socket: run under the server's socket unit (systemd passes it) or give "
                "--listen PATH"
            )
        listener = _bound_listener(listen)
    try:
        connection, _ = listener.accept()
    finally:
        listener.close()
        if bound_here and listen is not None:
            # One gateway connection per process: a second one finds no socket
            # (the server is busy) instead of waiting in a queue nobody reads.
            with contextlib.suppress(OSError):
                listen.unlink()
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    connection.setblocking(True)
    os.dup2(connection.fileno(), 0)
    os.dup2(connection.fileno(), 1)
    connection.close()
    sys.stdout.flush()
    try:
        os.execvp(command[0], list(command))  # noqa: S606 - becoming the server is the point
    except OSError as exc:
        raise KeelError(f"{command[0]}: cannot run the MCP server: {exc.strerror}") from None
