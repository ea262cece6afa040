"""The probe engine: every plain-HTTP and TCP probe, on one thread with one epoll.

At a hundred agents probed every second, what a probe costs is the budget
(2% of a core is 200 us per probe, the kernel's share of a loopback TCP
connection included). Going through the asyncio loop costs each probe a
task wake-up, futures, a timer handle and selector bookkeeping; this engine
keeps its own schedule (a heap of due times) and its own epoll set, runs each
probe as a small state machine on a non-blocking socket, and hands the
results to the event loop in one batch per wake-up.

It takes TCP and ``http://`` checks whose host is an IP address (no name
resolution on this thread); the daemon runs the others (``https://``, host
names, exec) as asyncio tasks. Probing semantics are the same on both paths:
the first probe ``min(interval, 0.25)`` s after the start, then every
``interval`` s at a fixed rate; while a probe has not passed yet and the
agent is within its grace period, every ``min(interval, 0.25)`` s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import heapq
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from keel.watch import httpwire
from keel.watch.probes import Check, HttpCheck, Outcome, TcpCheck, judge, judge_status

log = logging.getLogger("keel.watch.probes")

FAST_PROBE = 0.25
COALESCE = 0.002  # seconds
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Result:
    key: Hashable
    outcome: Outcome
    at: float  # monotonic time the probe finished


def supported(check: Check) -> bool:
    """Can the engine run this check (TCP or plain HTTP to an IP address)?"""
    if isinstance(check, TcpCheck):
        host = check.host
    elif isinstance(check, HttpCheck) and check.url.scheme == "http":
        host = check.url.host
    else:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(eq=False)
class _Probe:
    key: Hashable
    check: TcpCheck | HttpCheck
    interval: float
    timeout: float
    started: float
    grace: float
    family: socket.AddressFamily
    address: tuple[str, int]
    request: bytes
    due: float = 0.0
    passed: bool = False
    cancelled: bool = False
    # the run in flight
    sock: socket.socket | None = None
    deadline: float = 0.0
    pending: bytes = b""
    parser: httpwire.ResponseParser | None = None
    head: bytearray = field(default_factory=bytearray)  # the status line, when that is enough
    waiting: int = 0  # registered with the epoll set
    connecting: bool = False


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    probe: _Probe = field(compare=False)


class ProbeEngine:
    def __init__(
        self,
        deliver: Callable[[list[Result]], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._deliver = deliver
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands: collections.deque[tuple[str, _Probe | Hashable]] = collections.deque()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._thread: threading.Thread | None = None
        self._running = False
        # Engine-thread state:
        self._probes: dict[Hashable, _Probe] = {}
        self._schedule: list[_Due] = []
        self._seq = 0
        self._by_fd: dict[int, _Probe] = {}
        self._results: list[Result] = []

    # --- the asyncio side ----------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="keel-watch-probes", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._running = False
        self._wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        for probe in list(self._by_fd.values()):
            self._finish_socket(probe)
        self._epoll.close()
        os.close(self._wakeup)

    def schedule(
        self,
        key: Hashable,
        check: Check,
        *,
        interval: float,
        timeout: float,
        grace: float,
        started: float,
    ) -> None:
        """Probe ``check`` from now on, as the probe of ``key`` (replacing an older one)."""
        if not isinstance(check, TcpCheck | HttpCheck) or not supported(check):
            raise ValueError(f"the probe engine cannot run {check!r}")
        if isinstance(check, TcpCheck):
            host, port, request = check.host, check.port, b""
        else:
            host, port = check.url.host, check.url.port
            request = httpwire.build_request("GET", check.url)
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        probe = _Probe(key, check, interval, timeout, started, grace, family, (host, port), request)
        probe.due = started + min(interval, FAST_PROBE)
        self._commands.append(("schedule", probe))
        self._wake()

    def cancel(self, key: Hashable) -> None:
        self._commands.append(("cancel", key))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wakeup, 1)

    # --- the engine thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._running:
                self._apply_commands()
                now = self._clock()
                self._start_due(now)
                self._expire(now)
                self._flush()
                events = self._epoll.poll(self._poll_timeout(self._clock()))
                for fd, mask in events:
                    if fd == self._wakeup:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wakeup)
                        continue
                    probe = self._by_fd.get(fd)
                    if probe is not None:
                        self._on_event(probe, mask)
                self._flush()
                if self._by_fd:
                    # Probes in flight: let their answers gather for a moment, so
                    # that one wake-up handles many (a hundred agents probed at
                    # once otherwise wake this thread a hundred times).
                    time.sleep(COALESCE)
        except Exception:  # pragma: no cover - a bug; the daemon must hear of it
            log.exception("the probe engine failed")
            raise

    def _apply_commands(self) -> None:
        while self._commands:
            command, item = self._commands.popleft()
            if command == "schedule":
                assert isinstance(item, _Probe)
                old = self._probes.get(item.key)
                if old is not None:
                    self._drop(old)
                self._probes[item.key] = item
                self._push(item)
            else:
                old = self._probes.pop(item, None)
                if old is not None:
                    self._drop(old)

    def _drop(self, probe: _Probe) -> None:
        probe.cancelled = True
        if probe.sock is not None:
            self._finish_socket(probe)

    def _push(self, probe: _Probe) -> None:
        self._seq += 1
        heapq.heappush(self._schedule, _Due(probe.due, self._seq, probe))

    def _poll_timeout(self, now: float) -> float:
        times = [entry.at for entry in self._schedule[:1]]
        times += [p.deadline for p in self._by_fd.values()]
        if not times:
            return -1
        return max(0.0, min(times) - now)

    def _start_due(self, now: float) -> None:
        schedule = self._schedule
        while schedule and schedule[0].at <= now:
            probe = heapq.heappop(schedule).probe
            if probe.cancelled or probe.sock is not None:
                continue
            self._begin(probe, now)

    def _expire(self, now: float) -> None:
        for probe in [p for p in self._by_fd.values() if p.deadline <= now]:
            self._done(probe, Outcome(False, f"timeout after {probe.timeout:g}s"), now)

    def _begin(self, probe: _Probe, now: float) -> None:
        sock = socket.socket(
            probe.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        code = sock.connect_ex(probe.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._done(probe, Outcome(False, _reason(code)), now)
            return
        fd = sock.fileno()
        probe.sock = sock
        probe.deadline = now + probe.timeout
        probe.pending = probe.request
        probe.parser = httpwire.ResponseParser(max_body=MAX_BODY) if probe.request else None
        probe.connecting = True
        probe.head = bytearray()
        self._by_fd[fd] = probe
        # One registration, edge-triggered, for the whole exchange: closing the
        # socket removes it from the epoll set.
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
        probe.waiting = 1

    def _on_event(self, probe: _Probe, mask: int) -> None:
        sock = probe.sock
        if sock is None:
            return
        now = self._clock()
        if probe.connecting:
            if mask & (select.EPOLLERR | select.EPOLLHUP):
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self._done(probe, Outcome(False, _reason(code)), now)
                return
            if not mask & select.EPOLLOUT:
                return
            probe.connecting = False
            if probe.parser is None:
                self._done(probe, Outcome(True, "connected"), now)
                return
        if probe.pending:
            try:
                sent = sock.send(probe.pending)
            except BlockingIOError:
                return
            except OSError as exc:
                self._done(probe, Outcome(False, _reason(exc.errno or 0)), now)
                return
            probe.pending = probe.pending[sent:]
            if probe.pending:
                return  # the rest when there is room (the next EPOLLOUT)
        self._receive(probe, now)

    def _receive(self, probe: _Probe, now: float) -> None:
        sock, parser = probe.sock, probe.parser
        assert sock is not None
        assert parser is not None
        check = probe.check
        assert isinstance(check, HttpCheck)
        while True:  # edge-triggered: read until the kernel has nothing more
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                self._done(probe, Outcome(False, _reason(exc.errno or 0)), now)
                return
            if check.expect_body is None:
                # Only the status counts: judge on the status line and hang up
                # (the reset also spares both kernels the rest of the exchange).
                probe.head += data
                end = probe.head.find(b"\r\n")
                if end < 0 and data and len(probe.head) < 1024:
                    continue
                line = bytes(probe.head[: end if end >= 0 else 1024]).decode("latin-1")
                try:
                    status, _ = httpwire.parse_status_line(line)
                except httpwire.HttpError as exc:
                    self._done(probe, Outcome(False, f"bad HTTP response: {exc}"), now)
                    return
                self._done(probe, judge_status(check, status), now)
                return
            try:
                response = parser.close() if not data else parser.feed(data)
            except httpwire.HttpError as exc:
                self._done(probe, Outcome(False, f"bad HTTP response: {exc}"), now)
                return
            if response is not None:
                self._done(probe, judge(check, response), now)
                return

    def _finish_socket(self, probe: _Probe) -> None:
        sock = probe.sock
        if sock is None:
            return
        self._by_fd.pop(sock.fileno(), None)
        probe.waiting = 0
        probe.sock = None
        probe.parser = None
        probe.connecting = False
        sock.close()

    def _done(self, probe: _Probe, outcome: Outcome, now: float) -> None:
        self._finish_socket(probe)
        if probe.cancelled:
            return
        self._results.append(Result(probe.key, outcome, now))
        if outcome.ok:
            probe.passed = True
        fast = not probe.passed and now < probe.started + probe.grace
        probe.due = max(
            probe.due + (min(probe.interval, FAST_PROBE) if fast else probe.interval), now
        )
        self._push(probe)

    def _flush(self) -> None:
        if not self._results or self._loop is None:
            return
        batch, self._results = self._results, []
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._deliver, batch)


def _reason(code: int) -> str:
    if code == errno.ECONNREFUSED:
        return "connection refused"
    if code == errno.ECONNRESET:
        return "connection reset"
    return os.strerror(code) if code else "connection failed"
