"""How long an address stays allowed, and what must be written to the kernel for it.

Every address of an allowed answer goes into the agent's set with the
timeout ``max(TTL, min_ttl) + grace``: the floor keeps short-TTL names usable
between two lookups, the grace covers a client that connects a moment after
its cache expired. A :class:`SetBook` mirrors what keel put in each agent's
sets (address, when it expires, which name brought it) so that the proxy
knows, without asking the kernel, whether an answer needs an insertion, a
refresh (the element is there but would expire sooner than the answer
allows: delete and add again in one transaction, since adding an existing
element does not change its timeout), or nothing at all.

The book is rebuilt from the kernel when the daemon starts
(:meth:`SetBook.load`), so a restarted proxy refreshes what the previous one
inserted. Pure: the clock is a parameter.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from keel.egress.answers import Address, IPAddress

MAX_TIMEOUT = 86_400  # seconds: a week-long TTL does not keep an address open for a week
MAX_SLACK = 30.0  # seconds an element may fall short of its answer before it is refreshed
SLACK_FRACTION = 0.25


def element_timeout(ttl: int, *, min_ttl: int, grace: int) -> int:
    """Seconds an address stays in the set after an answer with ``ttl``."""
    return min(max(ttl, min_ttl), MAX_TIMEOUT) + grace


def family_of(address: IPAddress) -> int:
    return 4 if isinstance(address, ipaddress.IPv4Address) else 6


@dataclass(frozen=True)
class Insert:
    """One element to write: ``replace`` means it exists and is deleted first (same transaction)."""

    address: IPAddress
    timeout: int  # seconds
    name: str
    replace: bool

    @property
    def family(self) -> int:
        return family_of(self.address)


@dataclass
class _Element:
    expires: float
    name: str
    written: float = 0.0  # when keel wrote it (0: learnt from the kernel)


class SetBook:
    """What keel put into each agent's v4 and v6 sets, and until when."""

    def __init__(self, *, clock: Callable[[], float], min_ttl: int, grace: int) -> None:
        self.clock = clock
        self.min_ttl = min_ttl
        self.grace = grace
        self._sets: dict[str, dict[IPAddress, _Element]] = {}
        # Agents whose sets hold elements the book has not read yet (a
        # restart, until the kernel's listing is adopted): an address the
        # book does not know may be there, so it is replaced, never just added.
        self._unsure: set[str] = set()

    def expect(self, agent: str) -> None:
        """The kernel may hold elements of ``agent`` that the book does not know yet."""
        self._unsure.add(agent)

    def load(self, agent: str, elements: Iterable[tuple[IPAddress, float, str]]) -> None:
        """What the kernel holds for ``agent``: (address, seconds left, name) each."""
        now = self.clock()
        book = self._sets.setdefault(agent, {})
        book.clear()
        for address, remaining, name in elements:
            if remaining > 0:
                book[address] = _Element(now + remaining, name)
        self._unsure.discard(agent)

    def adopt(
        self, agent: str, elements: Iterable[tuple[IPAddress, float, str]], *, listed: float
    ) -> None:
        """A kernel listing begun at ``listed``: it wins, but for what keel wrote since."""
        now = self.clock()
        book = self._sets.setdefault(agent, {})
        for address, remaining, name in elements:
            current = book.get(address)
            if current is not None and current.written >= listed:
                continue
            if remaining > 0:
                book[address] = _Element(now + remaining, name)
        self._unsure.discard(agent)

    def written_since(self, agent: str, address: IPAddress, when: float) -> bool:
        element = self._sets.get(agent, {}).get(address)
        return element is not None and element.written >= when

    def plan(self, agent: str, addresses: Sequence[Address]) -> list[Insert]:
        """The writes that make every address last as long as this answer allows."""
        now = self.clock()
        book = self._sets.get(agent, {})
        inserts: list[Insert] = []
        for item in addresses:
            timeout = element_timeout(item.ttl, min_ttl=self.min_ttl, grace=self.grace)
            current = book.get(item.address)
            present = current is not None and current.expires > now
            if present and current is not None:
                slack = min(MAX_SLACK, timeout * SLACK_FRACTION)
                if current.expires >= now + timeout - slack:
                    continue
            maybe_there = present or agent in self._unsure
            inserts.append(Insert(item.address, timeout, item.name, replace=maybe_there))
        return inserts

    def committed(self, agent: str, inserts: Iterable[Insert]) -> None:
        """The kernel took ``inserts``: remember their new expiry."""
        now = self.clock()
        book = self._sets.setdefault(agent, {})
        for insert in inserts:
            book[insert.address] = _Element(now + insert.timeout, insert.name, written=now)

    def forget(self, agent: str, addresses: Iterable[IPAddress] = ()) -> None:
        """Addresses that are no longer in the kernel (all of the agent's when none are named)."""
        book = self._sets.get(agent)
        if book is None:
            return
        names = list(addresses)
        if not names:
            book.clear()
        for address in names:
            book.pop(address, None)

    def prune(self) -> int:
        """Drop what has expired (the kernel did the same); returns how many."""
        now = self.clock()
        removed = 0
        for book in self._sets.values():
            gone = [address for address, element in book.items() if element.expires <= now]
            for address in gone:
                del book[address]
            removed += len(gone)
        return removed

    def sizes(self, agent: str) -> tuple[int, int]:
        """(v4, v6) addresses in the agent's sets that have not expired."""
        now = self.clock()
        book = self._sets.get(agent, {})
        v4 = v6 = 0
        for address, element in book.items():
            if element.expires > now:
                if family_of(address) == 4:
                    v4 += 1
                else:
                    v6 += 1
        return v4, v6

    def entries(self, agent: str) -> list[tuple[IPAddress, float, str]]:
        """(address, seconds left, name), soonest to expire first."""
        now = self.clock()
        book = self._sets.get(agent, {})
        rows = [
            (address, math.ceil(element.expires - now), element.name)
            for address, element in book.items()
            if element.expires > now
        ]
        return sorted(rows, key=lambda row: (row[1], str(row[0])))
