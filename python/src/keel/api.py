"""The local control API every keel daemon serves on a Unix socket.

Wire format: newline-delimited JSON, one request and one response per line, as
many requests per connection as the client likes::

    -> {"verb": "status", "args": {}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "unknown agent 'web'", "kind": "refused"}

A failure's ``kind`` is ``bad_request`` (malformed request, unknown verb, bad
arguments: the handler raised :class:`~keel.errors.UsageError` or
:class:`~keel.errors.BadRequest`), ``forbidden`` (the caller may not:
:class:`~keel.errors.Forbidden`), ``refused`` (any other
:class:`~keel.errors.KeelError`) or ``internal`` (a bug, logged by the daemon).
The clients here (:class:`Connection`, :class:`AsyncConnection`, :func:`call`,
:func:`acall`) raise the matching error type, and :class:`~keel.errors.Unavailable`
when the daemon cannot be reached.

Access control is the socket file itself: it is created with ``mode`` (0660 by
default) inside a directory only keel and its group can enter. The peer's
uid/gid/pid (``SO_PEERCRED``) and supplementary groups (``SO_PEERGROUPS``)
reach every handler, for verbs that need to know who is calling (the mesh
keeps its administrative verbs to operators this way). Requests are parsed
with :func:`keel.config.parse_json` (no duplicate keys, ``NaN`` or deep
nesting); a malformed one gets an error reply saying why.

A handler is ``async def handler(args: dict, peer: Peer) -> JSON``; raising
:class:`~keel.errors.KeelError` sends its message back as the error; any other
exception is logged and answered with an ``internal`` error, and the daemon
goes on.
A handler may instead return :class:`Upgrade`: its ``result`` is the reply, and
then the connection belongs to ``Upgrade.serve`` (a binary protocol, say)
until that returns; JSON lines stop there. ``Upgrade.buffer_size`` (and the
client's ``Connection.upgrade(buffer_size=...)``) asks for bigger socket
buffers for such a stream.
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
from keel.errors import (
    ApiError,
    BadRequest,
    ConfigError,
    Forbidden,
    KeelError,
    Refused,
    Unavailable,
    UsageError,
)

log = logging.getLogger("keel.api")

# Bytes per line; a request larger than this gets an error and the connection closes.
# The mesh's `send` verb carries a payload of up to 960 KiB as base64 (1.25 MiB).
MAX_REQUEST = 2 << 20
MAX_RESPONSE = 64 << 20  # bytes per line a client accepts

# The ``kind`` of a refusal on the wire, and the error a client raises for it.
_ERRORS_BY_KIND: dict[str, type[ApiError]] = {
    "bad_request": BadRequest,
    "forbidden": Forbidden,
    "refused": Refused,
    "internal": Refused,
}


def _failure(message: str, kind: str) -> dict[str, Any]:
    return {"ok": False, "error": message, "kind": kind}


def _kind_of(error: KeelError) -> str:
    if isinstance(error, Forbidden):
        return "forbidden"
    if isinstance(error, UsageError | BadRequest):
        return "bad_request"
    return "refused"


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
    buffer_size: int | None = None  # SO_SNDBUF and SO_RCVBUF for the stream, if given


def take_unread(reader: asyncio.StreamReader) -> bytes:
    """What ``reader`` holds that nobody read yet, taken out of it.

    For an :class:`Upgrade`'s ``serve`` that reads the connection through a
    protocol of its own (``writer.transport.set_protocol``, done first, so
    nothing more reaches ``reader``): what the client sent right behind its
    request line may be in the reader's buffer already. ``reader.at_eof()``
    then says whether the client had finished sending.
    """
    held = getattr(reader, "_buffer", None)  # asyncio's (3.8 to 3.13): no public way to take it
    if not isinstance(held, bytearray):
        raise TypeError("this asyncio's StreamReader keeps its buffer elsewhere")
    data = bytes(held)
    held.clear()
    return data


def widen(sock: Any, size: int | None) -> None:
    """Ask for ``size`` bytes of socket buffers each way (the kernel caps it at its maximum)."""
    if sock is None or size is None:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):  # the default works, only slower
            sock.setsockopt(socket.SOL_SOCKET, option, size)


def peer_of(writer: asyncio.StreamWriter) -> Peer:
    """The peer of a Unix socket connection (SO_PEERCRED); -1s when the kernel cannot say."""
    return peer_of_socket(writer.get_extra_info("socket"))


def peer_of_socket(sock: socket.socket | None) -> Peer:
    """:func:`peer_of` for a socket object (other servers than asyncio's streams)."""
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
        remove_stale_socket(self.path)
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
        peer = peer_of(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    message = f"request too large (at most {MAX_REQUEST} bytes a line)"
                    await _send(writer, _failure(message, "bad_request"))
                    return
                except ConnectionError:
                    return
                if not line:
                    return
                response = await self._dispatch(line, peer)
                if isinstance(response, Upgrade):
                    widen(writer.get_extra_info("socket"), response.buffer_size)
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
            request = parse_json(line, source="request")
        except ConfigError as exc:
            return _failure(f"malformed {exc}", "bad_request")
        if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
            return _failure(
                'malformed request: expected {"verb": ..., "args": {...}}', "bad_request"
            )
        verb = request["verb"]
        args = request.get("args", {})
        if not isinstance(args, dict):
            return _failure("malformed request: args must be an object", "bad_request")
        handler = self.handlers.get(verb)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return _failure(
                f"unknown verb {verb[:64]!r} (this daemon knows: {known})", "bad_request"
            )
        try:
            result = await handler(args, peer)
        except KeelError as exc:
            return _failure(str(exc), _kind_of(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: control verb %r failed", self.name, verb)
            return _failure(f"internal error in {verb!r}; see the daemon's log", "internal")
        if isinstance(result, Upgrade):
            return result
        return {"ok": True, "result": result}


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def remove_stale_socket(path: Path) -> None:
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


def _request_line(verb: str, args: Mapping[str, Any] | None) -> bytes:
    return json.dumps({"verb": verb, "args": dict(args or {})}, separators=(",", ":")).encode() + (
        b"\n"
    )


def _unwrap(path: Path, verb: str, raw: bytes) -> Any:
    """The result of a response line, or the typed error it carries."""
    if not raw:
        raise Unavailable(f"{path}: the daemon closed the connection during {verb!r}")
    try:
        response = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Unavailable(f"{path}: the daemon sent a malformed response to {verb!r}") from None
    if not isinstance(response, dict) or "ok" not in response:
        raise Unavailable(f"{path}: the daemon sent a malformed response to {verb!r}")
    if response["ok"]:
        return response.get("result")
    message = str(response.get("error", "request failed"))
    raise _ERRORS_BY_KIND.get(str(response.get("kind")), Refused)(message)


def _unreachable(path: Path, exc: OSError, service: str) -> Unavailable:
    reason = exc.strerror or type(exc).__name__
    error = Unavailable(
        f"cannot reach the {service} daemon at {path}: {reason} "
        f"(is `keel {service} serve` running, and may you open its socket?)"
    )
    error.__cause__ = exc
    return error


def _broken(path: Path, verb: str, exc: BaseException, timeout: float) -> Unavailable:
    if isinstance(exc, TimeoutError):
        error = Unavailable(f"{path}: no answer to {verb!r} within {timeout:g} s")
    else:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        error = Unavailable(f"{path}: connection failed during {verb!r}: {reason}")
    error.__cause__ = exc
    return error


class Connection:
    """A blocking connection to a daemon's control socket, kept open between calls.

    It connects on first use and again, before a request, when the daemon
    closed its end since the last one (it restarted): a request is never sent
    twice. Errors are :class:`Unavailable`, :class:`Refused` (and its
    :class:`Forbidden`) or :class:`BadRequest`; after an ``Unavailable`` the
    next call reconnects.
    """

    def __init__(self, path: Path, *, service: str = "keel", timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.service = service
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buffer.clear()

    def call(
        self, verb: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request and return its result."""
        return _unwrap(self.path, verb, self._exchange(verb, args, timeout))

    def upgrade(
        self,
        verb: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        buffer_size: int | None = None,
    ) -> tuple[Any, socket.socket, bytes]:
        """Send a request the daemon answers with :class:`Upgrade`; hand the socket over.

        Returns the reply's result, the socket (now the caller's: this
        connection forgets it) and whatever the daemon sent after the reply
        line, which belongs to the upgraded protocol. ``buffer_size``: socket
        buffers to ask for, as :class:`Upgrade`'s.
        """
        raw = self._exchange(verb, args, timeout)
        try:
            result = _unwrap(self.path, verb, raw)
        except ApiError:
            self.close()
            raise
        sock, rest = self._sock, bytes(self._buffer)
        assert sock is not None
        widen(sock, buffer_size)
        self._sock = None
        self._buffer.clear()
        return result, sock, rest

    def _exchange(self, verb: str, args: Mapping[str, Any] | None, timeout: float | None) -> bytes:
        limit = self.timeout if timeout is None else timeout
        line = _request_line(verb, args)
        sock = self._connected(limit)
        try:
            sock.settimeout(limit)
            sock.sendall(line)
            return self._read_line(sock)
        except (OSError, ConnectionError) as exc:
            self.close()
            raise _broken(self.path, verb, exc, limit) from exc

    def _connected(self, timeout: float) -> socket.socket:
        if self._sock is not None and not _alive(self._sock):
            self.close()  # the daemon went away since the last call: a fresh connection
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                raise _unreachable(self.path, exc, self.service) from exc
            self._sock = sock
        return self._sock

    def _read_line(self, sock: socket.socket) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > MAX_RESPONSE:
                raise ConnectionResetError(0, "response larger than the client accepts")
            chunk = sock.recv(1 << 20)
            if not chunk:
                return b""
            self._buffer += chunk


def _alive(sock: socket.socket) -> bool:
    """False if the daemon's end is closed (EOF or an error waiting to be read)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)
    return bool(data)


def call(
    path: Path,
    verb: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = 10.0,
    service: str = "keel",
) -> Any:
    """One request on a connection of its own (see :class:`Connection` for the errors)."""
    with Connection(path, service=service, timeout=timeout) as connection:
        return connection.call(verb, args)


class AsyncConnection:
    """The asyncio form of :class:`Connection` (one request at a time)."""

    def __init__(self, path: Path, *, service: str = "keel", timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.service = service
        self.timeout = timeout
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def call(
        self, verb: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        limit = self.timeout if timeout is None else timeout
        async with self._lock:
            reader, writer = await self._connected(limit)
            try:
                writer.write(_request_line(verb, args))
                await writer.drain()
                raw = await asyncio.wait_for(reader.readline(), limit)
            except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
                await self.close()
                raise _broken(self.path, verb, exc, limit) from exc
            if not raw.endswith(b"\n"):
                await self.close()
            return _unwrap(self.path, verb, raw.rstrip(b"\n"))

    async def _connected(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._streams is not None and self._streams[0].at_eof():
            await self.close()
        if self._streams is None:
            try:
                self._streams = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.path), limit=MAX_RESPONSE), timeout
                )
            except OSError as exc:
                raise _unreachable(self.path, exc, self.service) from exc
            except TimeoutError as exc:
                raise _broken(self.path, "connect", exc, timeout) from exc
        return self._streams


async def acall(
    path: Path,
    verb: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = 10.0,
    service: str = "keel",
) -> Any:
    """The asyncio form of :func:`call`."""
    async with AsyncConnection(path, service=service, timeout=timeout) as connection:
        return await connection.call(verb, args)
