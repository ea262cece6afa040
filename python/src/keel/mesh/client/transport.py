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
from pathlib import Path

from keel.api import Connection
from keel.errors import BadRequest, Forbidden, Unavailable
from keel.mesh import local
from keel.mesh.local import Kind, LocalStreamError, Status


class Stream:
    """One upgraded connection; ``request`` numbers its SEND frames."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        connection = Connection(path, service="mesh", timeout=timeout)
        _, self.sock, rest = connection.upgrade(
            "stream", timeout=timeout, buffer_size=local.SOCKET_BUFFER
        )
        self.buffer = bytearray(rest)  # what followed the reply line already
        self.request = 0

    def close(self) -> None:
        self.sock.close()

    def _broken(self, what: str, exc: BaseException) -> Unavailable:
        self.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        error = Unavailable(f"{self.path}: connection failed during {what}: {reason}")
        error.__cause__ = exc
        return error

    def write(self, data: bytes, what: str) -> None:
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(data)
        except OSError as exc:
            raise self._broken(what, exc) from exc

    def frame(self, timeout: float | None, what: str) -> tuple[int, bytes] | None:
        """The next frame; ``None`` if none is complete within ``timeout`` (None: block)."""
        head = local.FRAME.size
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if len(self.buffer) >= head:
                try:
                    kind, length = local.read_frame_head(bytes(self.buffer[:head]))
                except LocalStreamError as exc:
                    raise self._broken(what, exc) from exc
                if len(self.buffer) >= head + length:
                    with memoryview(self.buffer) as view:  # one copy, not two
                        body = bytes(view[head : head + length])
                    del self.buffer[: head + length]
                    if kind == Kind.ERROR:
                        self.close()
                        text = body.decode(errors="replace")
                        if text.startswith(local.REFUSED):  # what the caller may not do
                            raise Forbidden(text.removeprefix(local.REFUSED))
                        raise BadRequest(f"{self.path}: {text}")
                    return kind, body
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                self.sock.settimeout(left if left is not None else self.timeout)
                chunk = self.sock.recv(1 << 20)
            except TimeoutError as exc:
                if left is None:
                    raise self._broken(what, TimeoutError("no answer")) from exc
                continue
            except OSError as exc:
                raise self._broken(what, exc) from exc
            if not chunk:
                raise self._broken(what, ConnectionResetError("the daemon closed the connection"))
            self.buffer += chunk

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
        if self.buffer:
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
            self.sock.settimeout(self.timeout)
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
