"""The binary stream (``keel.mesh.local``) to the node's daemon, blocking (its callers wait).

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from keel.api import Connection
from keel.errors import BadRequest, Forbidden, Unavailable
from keel.mesh import local
from keel.mesh.local import Kind, LocalStreamError, Status

Buffer = bytes | bytearray | memoryview
HEAD: Final = local.FRAME.size
READ_AHEAD: Final = 64 << 10  # bytes asked for when a frame's head is needed: small frames
# come several to a read; the rest of a large frame is read straight after them
KEEP: Final = 4 << 20  # the read buffer is kept at up to this size (a larger frame's goes)
IOV_MAX: Final = 1024  # pieces per sendmsg (Linux's limit)
HEAP_KEPT: Final = 4 << 20  # freed heap malloc keeps rather than hands back (keep_heap)
_heap = {"kept": False}


def keep_heap() -> None:
    """Have glibc's malloc keep ``HEAP_KEPT`` bytes of freed heap (once a process).

    An agent that streams large payloads frees them in bursts: a Sender a
    batch (about 1 MiB) once its SENT comes, the agent what ``recv``
    returned. With glibc's defaults, a burst that leaves more than 128 KiB
    free at the top of the heap is handed back to the kernel (``brk``) and
    faulted in again, page by page, by the next batch: measured, 20 to 25 us
    more per 64 KiB payload (its copy into new memory costs 4 to 6 us
    otherwise). glibc raises its thresholds when a mapped block is freed
    (mapping to that block's size, trimming to twice it: ``mallopt(3)``,
    the dynamic threshold), so one block of ``HEAP_KEPT`` is allocated and
    freed here (``calloc``: its pages are never touched). No effect where
    the thresholds were set (``MALLOC_TRIM_THRESHOLD_``...) or with another
    malloc.
    """
    if not _heap["kept"]:
        _heap["kept"] = True
        bytes(HEAP_KEPT)


def send_all(
    sock: socket.socket, parts: Sequence[Buffer], wait: Callable[[], None] | None = None
) -> None:
    """Send ``parts`` in order with ``sendmsg`` (no join), carrying on after short writes;
    on a non-blocking socket, ``wait`` until it takes more when it takes nothing."""
    pending: list[Buffer] = [p for p in parts if len(p)]
    left = sum(len(p) for p in pending)
    at = 0  # the first piece not (wholly) sent
    while left:
        try:
            sent = sock.sendmsg(pending[at : at + IOV_MAX])
        except BlockingIOError:
            if wait is None:
                raise
            wait()
            continue
        left -= sent
        while sent and left:  # skip what went; cut into the piece that went in part
            size = len(pending[at])
            if sent < size:
                pending[at] = memoryview(pending[at])[sent:]
                break
            sent -= size
            at += 1


class Stream:
    """One upgraded connection; ``request`` numbers its SEND frames.

    The socket is non-blocking: a read or a write is one system call when the
    socket is ready, and a ``poll`` (up to ``timeout``) only when it is not.
    Frames are read into one buffer, kept from frame to frame (no allocation,
    no zeroing per frame): small ones several to a read, a large one's body
    straight after its head.
    """

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
        keep_heap()
        self.sock = sock
        self.request = 0
        self.sock.setblocking(False)
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(sock, select.POLLOUT)
        # frames read and not yet handed out are in buffer[_start:_end]
        self._buffer = bytearray(max(READ_AHEAD, len(rest)))
        self._view = memoryview(self._buffer)
        self._buffer[: len(rest)] = rest
        self._start = 0
        self._end = len(rest)

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
            send_all(self.sock, parts, self._wait_writable)
        except OSError as exc:
            raise self._broken(what, exc) from exc

    def _wait_writable(self) -> None:
        if not self._writable.poll(self.timeout * 1000):
            raise TimeoutError("timed out")

    def buffered(self) -> bool:
        """Bytes of a frame not yet handed out were read already."""
        return self._end > self._start

    def frame(self, timeout: float | None, what: str) -> tuple[int, memoryview] | None:
        """The next frame; ``None`` if none is complete within ``timeout`` (None: block).

        Its body is a view of the stream's buffer, valid until the next call
        (decode it first). A frame's body is read into that buffer once (the
        kernel's copy), a large one straight after its head. A frame cut
        short by ``timeout`` is carried on by the next call.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            start, end = self._start, self._end
            have = end - start
            want = HEAD  # bytes of the frame at _start needed to go on
            if have >= HEAD:
                kind, length = local.FRAME.unpack_from(self._buffer, start)
                if length > local.MAX_FRAME:
                    error = LocalStreamError(f"frame of {length} bytes is over {local.MAX_FRAME}")
                    raise self._broken(what, error)
                want = HEAD + length
                if have >= want:
                    self._start = start + want
                    if self._start == end:
                        self._start = self._end = 0
                    body = self._view[start + HEAD : start + want]
                    if len(self._buffer) > KEEP:  # a huge frame's buffer is not kept
                        self._make_room(HEAD)
                    if kind == Kind.ERROR:
                        self.close()
                        text = bytes(body).decode(errors="replace")
                        if text.startswith(local.REFUSED):  # what the caller may not do
                            raise Forbidden(text.removeprefix(local.REFUSED))
                        raise BadRequest(f"{self.path}: {text}")
                    return kind, body
            if start + want > len(self._buffer):
                self._make_room(want)
                start, end = self._start, self._end
            # a small frame (or a head): read ahead, for the frames after it;
            # a large one: its rest, straight
            stop = min(len(self._buffer), start + max(want, have + READ_AHEAD))
            if not self._receive(self._view[end:stop], deadline, what):
                return None

    def _make_room(self, want: int) -> None:
        """Room for ``want`` bytes from the frame at ``_start``: it moves to the front of
        the buffer; or into a larger one (doubling, up to ``KEEP``: exactly beyond); or,
        once a frame beyond ``KEEP`` is handed out, into one of the size needed."""
        start, end = self._start, self._end
        size = len(self._buffer)
        if want <= size <= KEEP:
            self._view[: end - start] = self._view[start:end]
        else:
            if want > size:
                size = want if want > KEEP else min(KEEP, max(want, 2 * size))
            else:
                size = max(READ_AHEAD, want, end - start)
            buffer = bytearray(size)
            buffer[: end - start] = self._view[start:end]
            self._buffer, self._view = buffer, memoryview(buffer)
        self._start, self._end = 0, end - start

    def _receive(self, into: memoryview, deadline: float | None, what: str) -> bool:
        """Read into ``into``; False once ``deadline`` passed with nothing read (None: wait
        up to the stream's timeout, then fail)."""
        while True:
            if deadline is not None and deadline <= time.monotonic():
                return False  # (a timeout of 0: only what was read already)
            try:
                got = self.sock.recv_into(into)
            except BlockingIOError:
                if deadline is None:
                    if not self._readable.poll(self.timeout * 1000):
                        raise self._broken(what, TimeoutError("no answer")) from None
                else:
                    self._readable.poll(max(0.0, deadline - time.monotonic()) * 1000)
                continue
            except OSError as exc:
                raise self._broken(what, exc) from exc
            if not got:
                raise self._broken(what, ConnectionResetError("the daemon closed the connection"))
            self._end += got
            return True

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

    def finish(self) -> None:
        """Hang up cleanly: say so (EOF), and read until the daemon hung up too.

        Closing a Unix socket with data still unread makes the daemon's side
        fail at once (``ECONNRESET``), losing the frames it had not read yet,
        such as the last ACK; this way it reads them all first.
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while True:
                try:
                    if not self.sock.recv(1 << 16):
                        break
                except BlockingIOError:
                    if not self._readable.poll(self.timeout * 1000):
                        break
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
