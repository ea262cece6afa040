"""The mesh's TCP listener: the asyncio shell around :class:`~keel.mesh.intake.Intake`.

asyncio's own server accepts everything it can and, out of descriptors,
logs a traceback per attempt; this listener instead:

- accepts at most ``ACCEPT_BATCH`` connections per wakeup, so that in a
  flood the control socket and established peers still get their turn;
- asks the intake about each: a refused connection is closed at once, before
  any transport, session or timer exists for it; an admitted one gets its
  protocol from ``make_protocol(ticket)``;
- closes the handshakes the intake evicts, and those past their deadline;
- keeps descriptors free for everything else (the control socket above
  all): when ``accept`` fails for lack of descriptors or memory (``EMFILE``,
  ``ENFILE``, ``ENOBUFS``, ``ENOMEM``), it stops accepting (no busy loop: the
  socket leaves the event loop), hands back the shell's spare descriptors
  (:class:`keel.service.Reserve`) and starts again once they can be held
  again (tried when one of its connections closes, and every ``RETRY`` s);
- logs refusals as one line, then a sum every ``LOG_EVERY`` s, never a line
  per connection and never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from keel.errors import KeelError
from keel.mesh.intake import Intake, Refused, source_of
from keel.service import OUT_OF_RESOURCES, Reserve, descriptor_use

log = logging.getLogger("keel.mesh")

ACCEPT_BATCH = 32  # connections accepted per wakeup of the event loop
BACKLOG = 128
RETRY = 1.0  # s between attempts to start accepting again after running out
LOG_EVERY = 10.0  # s: refusals in between are summed up in one line
MAX_ADVERTISED = 16
SIOCGIFADDR = 0x8915

P = TypeVar("P", bound=asyncio.BaseProtocol)


def listening_socket(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket listening on ``host:port``; ``KeelError`` if it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise KeelError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class Listener(Generic[P]):
    """Accept connections on ``sock`` as the intake allows; see the module's docstring.

    ``make_protocol(ticket)`` makes an admitted connection's protocol; it must
    call :meth:`handshake_over` once its handshake is over (either way) and
    :meth:`closed` when the connection is lost. ``drop(protocol, reason,
    quietly)`` closes one the listener gives up on.
    """

    def __init__(
        self,
        sock: socket.socket,
        intake: Intake,
        make_protocol: Callable[[int], P],
        drop: Callable[[P, str, bool], None],
        *,
        reserve: Reserve,
    ) -> None:
        self.sock = sock
        self.intake = intake
        self.make_protocol = make_protocol
        self.drop = drop
        self.reserve = reserve
        self.paused = False
        self._loop = asyncio.get_running_loop()
        self._open: dict[int, P] = {}  # admitted, handshake not over yet
        self._doomed: set[int] = set()  # evicted before their transport was made
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deadline: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._summary: asyncio.TimerHandle | None = None
        self._refused = 0  # since the last log line
        self._evicted = 0
        self._closed = False

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        if self.reserve.hold():
            self._loop.add_reader(self.sock.fileno(), self._accept)
        else:
            self._pause(OSError(errno.EMFILE, os.strerror(errno.EMFILE)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.paused:
            self._loop.remove_reader(self.sock.fileno())
        for handle in (self._deadline, self._retry, self._summary):
            if handle is not None:
                handle.cancel()
        for task in self._tasks:
            task.cancel()
        self.sock.close()

    # -- what admitted connections report

    def handshake_over(self, ticket: int) -> None:
        """The connection's handshake finished or failed: it no longer counts."""
        self._open.pop(ticket, None)
        self.intake.finished(ticket)

    def closed(self, ticket: int) -> None:
        """The connection is gone: its descriptor is free again."""
        self.handshake_over(ticket)
        if self.paused and not self._closed:
            self._resume()

    # -- accepting

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the peer gave up while it waited in the backlog
            except OSError as exc:
                self._pause(exc)
                return
            self._take(conn, address)

    def _take(self, conn: socket.socket, address: Any) -> None:
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        verdict = self.intake.offer(source_of(host))
        if isinstance(verdict, Refused):
            conn.close()  # at once: a refused connection holds nothing here
            self._note_refusal(f"refusing a connection from {host}: {verdict.reason}")
            return
        if verdict.evicted is not None:
            self._evict(verdict.evicted)
        ticket = verdict.ticket

        def protocol() -> P:
            made = self.make_protocol(ticket)
            self._open[ticket] = made
            return made

        # asyncio turns Nagle off only for sockets whose proto is IPPROTO_TCP, which
        # accepted ones are not (their listener was made with proto 0): without this,
        # a small packet written right after another waits for the peer's delayed
        # ACK (40 ms on Linux) whenever traffic goes both ways back to back.
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self._loop.create_task(self._loop.connect_accepted_socket(protocol, conn))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._transport_made(t, ticket, conn))
        self._arm_deadline()

    def _evict(self, ticket: int) -> None:
        self._evicted += 1
        evicted = self._open.pop(ticket, None)
        if evicted is None:  # admitted in this very batch: its transport is not made yet
            self._doomed.add(ticket)
            return
        self.drop(evicted, "handshake closed to make room for another address's", True)

    def _transport_made(self, task: asyncio.Task[Any], ticket: int, conn: socket.socket) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is not None:
            if ticket not in self._open:  # no transport owns the socket: close it here
                conn.close()
            self._doomed.discard(ticket)
            self.closed(ticket)
            return
        if ticket in self._doomed:
            self._doomed.discard(ticket)
            made = self._open.pop(ticket, None)
            if made is not None:
                self.drop(made, "handshake closed to make room for another address's", True)

    # -- the handshake deadline

    def _arm_deadline(self) -> None:
        if self._deadline is not None or self._closed:
            return
        deadline = self.intake.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self.intake.clock())
            self._deadline = self._loop.call_later(delay, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        for ticket in self.intake.overdue():
            late = self._open.pop(ticket, None)
            if late is not None:
                self.drop(late, f"handshake not finished after {self.intake.timeout:g} s", False)
        self._arm_deadline()

    # -- running out of descriptors

    def _pause(self, exc: OSError) -> None:
        if self.paused:
            return
        self.paused = True
        self._loop.remove_reader(self.sock.fileno())
        if exc.errno in OUT_OF_RESOURCES:
            log.warning(
                "mesh: out of descriptors or memory (%s; %s): not accepting peer connections "
                "until some close",
                exc.strerror,
                descriptor_use(),
            )
            self.reserve.release()  # for the control socket while we wait
        else:
            log.warning("mesh: accepting a peer connection failed (%s); retrying", exc.strerror)
        self._retry = self._loop.call_later(RETRY, self._resume)

    def _resume(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._closed or not self.paused:
            return
        use = descriptor_use()  # before the spares take their share
        if not self.reserve.hold():
            self._retry = self._loop.call_later(RETRY, self._resume)
            return
        self.paused = False
        self._loop.add_reader(self.sock.fileno(), self._accept)
        log.info("mesh: accepting peer connections again (%s)", use)

    # -- logging refusals without flooding the log

    def _note_refusal(self, line: str) -> None:
        if self._summary is None:
            log.warning("mesh: %s (more refusals are summed up every %g s)", line, LOG_EVERY)
            self._summary = self._loop.call_later(LOG_EVERY, self._log_summary)
            return
        self._refused += 1

    def _log_summary(self) -> None:
        self._summary = None
        if not (self._refused or self._evicted):
            return  # a quiet period: the next refusal gets its own line again
        log.warning(
            "mesh: in the last %g s: refused %d connection(s) over the handshake limits, "
            "closed %d handshake(s) to make room (%d in progress)",
            LOG_EVERY,
            self._refused,
            self._evicted,
            len(self.intake),
        )
        self._refused = self._evicted = 0
        self._summary = self._loop.call_later(LOG_EVERY, self._log_summary)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advertised_addresses(host: str, port: int) -> list[str]:
    """The ``host:port`` strings peers should dial: the listen host, or every interface's."""
    address = ipaddress.ip_address(host)
    if not address.is_unspecified:
        return [format_address(host, port)]
    hosts = interface_addresses(ipv6=address.version == 6)
    public = [h for h in hosts if not ipaddress.ip_address(h).is_loopback]
    return [format_address(h, port) for h in (public or hosts)][:MAX_ADVERTISED]


def interface_addresses(*, ipv6: bool) -> list[str]:
    """IPv4 addresses of every interface (and global IPv6 ones for a ``[::]`` listener)."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue
            found.append(socket.inet_ntoa(answer[20:24]))
    if ipv6:
        try:
            lines = Path("/proc/net/if_inet6").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            raw = line.split()[0]
            v6 = ipaddress.IPv6Address(bytes.fromhex(raw))
            if not v6.is_link_local:
                found.append(str(v6))
    return found
