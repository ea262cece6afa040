"""The local control API every keel daemon serves on a Unix socket.

Wire format: newline-delimited JSON, one request and one response per line, as
many requests per connection as the client likes::

    -> {"verb": "status", "args": {}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "unknown agent 'web'"}

Access control is the socket file itself: it is created with ``mode`` (0660 by
default) inside a directory only keel and its group can enter. The peer's
uid/gid/pid (``SO_PEERCRED``) and supplementary groups (``SO_PEERGROUPS``)
reach every handler, for verbs that need to know who is calling (the mesh
keeps its administrative verbs to operators this way). Requests are parsed
with :func:`keel.config.parse_json` (no duplicate keys, ``NaN`` or deep
nesting); a malformed one gets an error reply saying why.

A handler is ``async def handler(args: dict, peer: Peer) -> JSON``; raising
:class:`~keel.errors.KeelError` sends its message back as the error; any other
exception is logged and answered with "internal error", and the daemon goes on.
A handler may instead return :class:`Upgrade`: its ``result`` is the reply, and
then the connection belongs to ``Upgrade.serve`` (a binary protocol, say)
until that returns; JSON lines stop there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.config import parse_json
from keel.errors import ApiError, ConfigError, KeelError

log = logging.getLogger("keel.api")

MAX_REQUEST = 1 << 20  # bytes per line; a request larger than this closes the connection


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; Python 3.11 lacks the name


@dataclass(frozen=True)
class Peer:
    """The process on the other end of a control connection (from SO_PEERCRED).

    ``groups``: its supplementary groups when it connected (``SO_PEERGROUPS``;
    on older kernels, read from ``/proc/PID/status``).
    """

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


Handler = Callable[[dict[str, Any], Peer], Awaitable[Any]]


@dataclass(frozen=True)
class Upgrade:
    """A handler's answer that takes the connection over after the reply line."""

    result: Any
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _peer_of(writer: asyncio.StreamWriter) -> Peer:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return Peer(-1, -1, -1)
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return Peer(-1, -1, -1)
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid, _peer_groups(sock, pid))


def _peer_groups(sock: Any, pid: int) -> frozenset[int]:
    """The peer's supplementary groups, as the kernel recorded them when it connected."""
    size = 4 * 64
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < 4 * 65536:
                size *= 16
                continue
            return _proc_groups(pid)  # an old kernel: the process's groups now
        count = len(raw) // 4
        return frozenset(struct.unpack(f"{count}I", raw[: count * 4]))


def _proc_groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    except OSError:
        pass
    return frozenset()


class ControlServer:
    """Serve ``handlers`` on a Unix socket at ``path``."""

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        mode: int = 0o660,
        name: str = "keel",
    ) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.mode = mode
        self.name = name
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(self.path)
        self._server = await asyncio.start_unix_server(
            self._serve_connection, path=str(self.path), limit=MAX_REQUEST
        )
        os.chmod(self.path, self.mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = _peer_of(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _send(writer, {"ok": False, "error": "request too large"})
                    return
                except ConnectionError:
                    return
                if not line:
                    return
                response = await self._dispatch(line, peer)
                if isinstance(response, Upgrade):
                    await _send(writer, {"ok": True, "result": response.result})
                    await response.serve(reader, writer)
                    return
                await _send(writer, response)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes, peer: Peer) -> dict[str, Any] | Upgrade:
        try:
            request = parse_json(line, source="malformed request")
        except ConfigError as exc:
            return {"ok": False, "error": str(exc)}
        if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
            return {
                "ok": False,
                "error": 'malformed request: expected {"verb": ..., "args": {...}}',
            }
        verb = request["verb"]
        args = request.get("args", {})
        if not isinstance(args, dict):
            return {"ok": False, "error": "malformed request: args must be an object"}
        handler = self.handlers.get(verb)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown verb {verb!r} (this daemon knows: {known})"}
        try:
            result = await handler(args, peer)
        except KeelError as exc:
            return {"ok": False, "error": str(exc)}
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: control verb %r failed", self.name, verb)
            return {"ok": False, "error": f"internal error in {verb!r}; see the daemon's log"}
        if isinstance(result, Upgrade):
            return result
        return {"ok": True, "result": result}


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead daemon; refuse to steal a live one."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise KeelError(f"{path}: exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise KeelError(f"{path}: another daemon is already serving this socket")


# --- clients ---------------------------------------------------------------


def _unwrap(path: Path, verb: str, raw: bytes) -> Any:
    if not raw:
        raise ApiError(f"{path}: the daemon closed the connection during {verb!r}")
    try:
        response = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(f"{path}: the daemon sent a malformed response to {verb!r}") from None
    if not isinstance(response, dict) or "ok" not in response:
        raise ApiError(f"{path}: the daemon sent a malformed response to {verb!r}")
    if not response["ok"]:
        raise ApiError(str(response.get("error", "request failed")))
    return response.get("result")


def _unreachable(path: Path, exc: OSError, service: str) -> ApiError:
    reason = exc.strerror or type(exc).__name__
    return ApiError(
        f"cannot reach the {service} daemon at {path}: {reason} "
        f"(is `keel {service} serve` running, and may you open its socket?)"
    )


def call(
    path: Path,
    verb: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = 10.0,
    service: str = "keel",
) -> Any:
    """Send one request and return its result; raise :class:`ApiError` on failure."""
    request = json.dumps({"verb": verb, "args": dict(args or {})}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise _unreachable(path, exc, service) from None
        try:
            sock.sendall(request)
            raw = _read_line(sock)
        except TimeoutError:
            raise ApiError(f"{path}: no answer to {verb!r} within {timeout:g} s") from None
        except OSError as exc:
            raise ApiError(f"{path}: connection failed during {verb!r}: {exc.strerror}") from None
    return _unwrap(path, verb, raw)


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)


async def acall(
    path: Path,
    verb: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = 10.0,
    service: str = "keel",
) -> Any:
    """The asyncio form of :func:`call`."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=MAX_REQUEST * 64), timeout
        )
    except OSError as exc:
        raise _unreachable(path, exc, service) from None
    except TimeoutError:
        raise ApiError(f"{path}: no answer within {timeout:g} s") from None
    try:
        writer.write(json.dumps({"verb": verb, "args": dict(args or {})}).encode() + b"\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        raise ApiError(f"{path}: no answer to {verb!r} within {timeout:g} s") from None
    except OSError as exc:
        raise ApiError(f"{path}: connection failed during {verb!r}: {exc.strerror}") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return _unwrap(path, verb, raw)
