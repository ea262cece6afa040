"""The binary stream (``keel.mesh.local``) to the node's daemon, blocking.

A :class:`Stream` is a control connection (:class:`keel.api.Connection`)
upgraded by the ``stream`` verb: the socket is handed over and from then on
carries frames. Errors are told apart by type, as everywhere in keel:
:class:`~keel.errors.Unavailable` when the connection cannot be made or
broke (trying again later may work: the daemon may be restarting),
:class:`~keel.errors.BadRequest` when the daemon found a frame malformed,
:class:`~keel.errors.Refused` for what it refuses.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, overload

from keel.api import Connection
from keel.errors import BadRequest, Forbidden, Unavailable
from keel.mesh import local
from keel.mesh.local import Kind, LocalStreamError, Status

Buffer = bytes | bytearray | memoryview
HEAD: Final = local.FRAME.size
READ_AHEAD: Final = 64 << 10  # bytes asked for when a frame's head is needed: small frames
# come several to a read; a large body is read straight into its own buffer after them
IOV_MAX: Final = 1024  # pieces per sendmsg (Linux's limit)


def send_all(sock: socket.socket, parts: Sequence[Buffer]) -> None:
    """Send ``parts`` in order with ``sendmsg`` (no join), carrying on after short writes."""
    pending: list[Buffer] = [p for p in parts if len(p)]
    left = sum(len(p) for p in pending)
    at = 0  # the first piece not (wholly) sent
    while left:
        sent = sock.sendmsg(pending[at : at + IOV_MAX])
        left -= sent
        while sent and left:  # skip what went; cut into the piece that went in part
            size = len(pending[at])
            if sent < size:
                pending[at] = memoryview(pending[at])[sent:]
                break
            sent -= size
            at += 1


class Stream:
    """One upgraded connection; ``request`` numbers its SEND frames."""

    def __init__(
        self, path: Path, timeout: float, *, sock: socket.socket | None = None, rest: bytes = b""
    ) -> None:
        """Connect to the daemon at ``path`` and upgrade; or, with ``sock``, use that
        socket, upgraded already (``rest``: what followed the reply line)."""
        self.path = path
        self.timeout = timeout
        if sock is None:
            connection = Connection(path, service="mesh", timeout=timeout)
            _, sock, rest = connection.upgrade(
                "stream", timeout=timeout, buffer_size=local.SOCKET_BUFFER
            )
        self.sock = sock
        self.buffer = bytearray(rest)  # read past the last frame (its next one's start)
        self.request = 0
        self._timeout: float | None = timeout  # the socket's, as set last
        self.sock.settimeout(timeout)
        self._kind = 0  # the frame being read: its type, its body, how much of it is in
        self._body: bytearray | None = None
        self._filled = 0

    def close(self) -> None:
        self.sock.close()

    def _broken(self, what: str, exc: BaseException) -> Unavailable:
        self.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        error = Unavailable(f"{self.path}: connection failed during {what}: {reason}")
        error.__cause__ = exc
        return error

    def write(self, data: bytes, what: str) -> None:
        self.write_parts([data], what)

    def write_parts(self, parts: Sequence[Buffer], what: str) -> None:
        """Write ``parts`` in order, as one: the kernel gathers them (``sendmsg``), so a
        frame's pieces (heads, payloads) are never joined into one bytes first."""
        try:
            self._settimeout(self.timeout)
            send_all(self.sock, parts)
        except OSError as exc:
            raise self._broken(what, exc) from exc

    def _settimeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:  # a system call each time: only when it changes
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def frame(self, timeout: float | None, what: str) -> tuple[int, bytearray] | None:
        """The next frame; ``None`` if none is complete within ``timeout`` (None: block).

        A frame's body is read straight into a buffer of its own (``recv_into``):
        one copy, the kernel's; only its first bytes may come through
        ``self.buffer`` (read with the head of the frame). A frame cut short by
        ``timeout`` is carried on by the next call.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            body = self._body
            if body is None:
                if len(self.buffer) < HEAD:
                    chunk = self._receive(None, deadline, what)
                    if chunk is None:
                        return None
                    self.buffer += chunk
                    continue
                try:
                    self._kind, length = local.read_frame_head(bytes(self.buffer[:HEAD]))
                except LocalStreamError as exc:
                    raise self._broken(what, exc) from exc
                body = self._body = bytearray(length)
                taken = min(length, len(self.buffer) - HEAD)
                with memoryview(self.buffer) as view:
                    body[:taken] = view[HEAD : HEAD + taken]
                del self.buffer[: HEAD + taken]
                self._filled = taken
            if self._filled < len(body):
                with memoryview(body) as view:
                    got = self._receive(view[self._filled :], deadline, what)
                if got is None:
                    return None
                assert isinstance(got, int)
                self._filled += got
                continue
            kind, self._body = self._kind, None
            if kind == Kind.ERROR:
                self.close()
                text = body.decode(errors="replace")
                if text.startswith(local.REFUSED):  # what the caller may not do
                    raise Forbidden(text.removeprefix(local.REFUSED))
                raise BadRequest(f"{self.path}: {text}")
            return kind, body

    @overload
    def _receive(self, into: None, deadline: float | None, what: str) -> bytes | None: ...

    @overload
    def _receive(self, into: memoryview, deadline: float | None, what: str) -> int | None: ...

    def _receive(
        self, into: memoryview | None, deadline: float | None, what: str
    ) -> bytes | int | None:
        """Bytes read (up to ``READ_AHEAD``), or how many were read ``into`` its buffer;
        None once ``deadline`` passed (None: wait for them)."""
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                self._settimeout(left if left is not None else self.timeout)
                got = self.sock.recv(READ_AHEAD) if into is None else self.sock.recv_into(into)
            except TimeoutError as exc:
                if left is None:
                    raise self._broken(what, TimeoutError("no answer")) from exc
                continue
            except OSError as exc:
                raise self._broken(what, exc) from exc
            if not got:
                raise self._broken(what, ConnectionResetError("the daemon closed the connection"))
            return got

    def sent(self, what: str) -> tuple[int, Status, str]:
        """Wait for the next SENT: (request, status, error text)."""
        while True:
            got = self.frame(None, what)
            assert got is not None
            kind, body = got
            if kind == Kind.SENT:
                try:
                    return local.decode_sent(body)
                except LocalStreamError as exc:
                    raise self._broken(what, exc) from exc

    def readable(self) -> bool:
        if self.buffer or self._body is not None:
            return True
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def finish(self) -> None:
        """Hang up cleanly: say so (EOF), and read until the daemon hung up too.

        Closing a Unix socket with data still unread makes the daemon's side
        fail at once (``ECONNRESET``), losing the frames it had not read yet,
        such as the last ACK; this way it reads them all first.
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self._settimeout(self.timeout)
            while self.sock.recv(1 << 16):
                pass
        except OSError:
            pass  # it is gone already: nothing more to do


class Retrying:
    """Pauses that double (5 ms to 0.5 s) while ``seconds`` last: for riding out a restart."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._deadline: float | None = None
        self._pause = 0.0

    def again(self) -> bool:
        """Pause and say True while the time lasts; then False (and start afresh next time)."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.seconds
        if now >= self._deadline:
            self.reset()
            return False
        self._pause = min(0.5, max(0.005, self._pause * 2))
        time.sleep(min(self._pause, self._deadline - now))
        return True

    def reset(self) -> None:
        """It worked: the next failure starts a new retry time."""
        self._deadline = None
        self._pause = 0.0
