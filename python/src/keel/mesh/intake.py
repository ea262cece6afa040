"""Which inbound connections the mesh takes while they handshake. Pure, clocked.

Before its handshake finishes a connection proves nothing, yet it costs a
descriptor, memory and the handshake's CPU. :class:`Intake` keeps the
bookkeeping of those handshakes in progress and decides on each newcomer:

- at most ``per_source`` in progress from one **source** (an IPv4 address,
  or an IPv6 address's /64: one host usually holds a whole /64);
- at most ``total`` in progress in all. When that is full, a newcomer whose
  source holds fewer handshakes than the busiest source takes the place of
  that source's oldest one (the shell closes it); otherwise it is refused. So
  neither one busy address nor many can keep a peer that has no handshake in
  progress from starting one;
- each handshake has a deadline, ``timeout`` after it was admitted, whatever
  the connection does: :meth:`overdue` gives those past it.

A refused newcomer is closed at once by the shell: it never counts. The
shell tells the intake when a handshake is over (finished, failed or the
connection gone) with :meth:`finished`; a ticket the intake no longer holds
(evicted, overdue) is ignored there.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_TOTAL = 64
DEFAULT_PER_SOURCE = 8


@dataclass(frozen=True)
class Admitted:
    ticket: int
    evicted: int | None = None  # the ticket whose place this one took: close that connection


@dataclass(frozen=True)
class Refused:
    reason: str  # one line, for the log


def source_of(host: str) -> str:
    """The source an address counts against: the IPv4 address, or the IPv6 /64."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host  # not an IP address (a test's Unix socket, say): itself
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Intake:
    """Handshakes in progress, per source and in all; see the module's docstring."""

    def __init__(
        self,
        *,
        total: int = DEFAULT_TOTAL,
        per_source: int = DEFAULT_PER_SOURCE,
        timeout: float,
        clock: Callable[[], float],
    ) -> None:
        if total < 1 or per_source < 1:
            raise ValueError("the handshake limits must be at least 1")
        if not timeout > 0:
            raise ValueError("the handshake deadline must be positive")
        self.total = total
        self.per_source = per_source
        self.timeout = timeout
        self.clock = clock
        self._next_ticket = 1
        # Both in admission order, so the first entry is the oldest (the next deadline).
        self._started: dict[int, tuple[str, float]] = {}  # ticket: (source, admitted at)
        self._by_source: dict[str, dict[int, None]] = {}

    def __len__(self) -> int:
        return len(self._started)

    def in_progress(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def offer(self, source: str) -> Admitted | Refused:
        """A connection from ``source`` arrived: admit it (maybe in another's place) or refuse."""
        mine = self.in_progress(source)
        if mine >= self.per_source:
            return Refused(
                f"{mine} handshakes from {source} are in progress already "
                f"(at most {self.per_source} per address)"
            )
        evicted = None
        if len(self._started) >= self.total:
            busiest = self._busiest()
            if busiest is None or self.in_progress(busiest) <= mine:
                return Refused(
                    f"{len(self._started)} handshakes are in progress (at most {self.total})"
                )
            evicted = next(iter(self._by_source[busiest]))
            self._forget(evicted)
        ticket = self._next_ticket
        self._next_ticket += 1
        self._started[ticket] = (source, self.clock())
        self._by_source.setdefault(source, {})[ticket] = None
        return Admitted(ticket, evicted)

    def _busiest(self) -> str | None:
        """The source with the most handshakes in progress (the oldest of those on a tie)."""
        best: str | None = None
        best_count = 0
        best_age = 0.0
        for source, tickets in self._by_source.items():
            count = len(tickets)
            age = self._started[next(iter(tickets))][1]
            if count > best_count or (count == best_count and age < best_age):
                best, best_count, best_age = source, count, age
        return best

    def finished(self, ticket: int) -> None:
        """The handshake is over (done, failed, or the connection gone)."""
        self._forget(ticket)

    def _forget(self, ticket: int) -> None:
        entry = self._started.pop(ticket, None)
        if entry is None:
            return
        tickets = self._by_source[entry[0]]
        del tickets[ticket]
        if not tickets:
            del self._by_source[entry[0]]

    def overdue(self) -> list[int]:
        """The handshakes past their deadline, forgotten here: the shell closes them."""
        limit = self.clock() - self.timeout
        late = []
        for ticket, (_, started) in self._started.items():
            if started > limit:
                break
            late.append(ticket)
        for ticket in late:
            self._forget(ticket)
        return late

    def next_deadline(self) -> float | None:
        """When :meth:`overdue` next has something (clock time), or None."""
        for _, started in self._started.values():
            return started + self.timeout
        return None


class TokenBucket:
    """``burst`` at once, then ``rate`` a second: how often something may be told (logged)."""

    def __init__(self, burst: float, rate: float, *, clock: Callable[[], float]) -> None:
        self.burst = burst
        self.rate = rate
        self.clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
