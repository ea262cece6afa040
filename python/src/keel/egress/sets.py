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

An address can be opened by several names (a shared CDN front, two aliases
of one host): the book keeps every name an element was opened for, and the
element's comment in the kernel lists them (:func:`comment_of`), so that an
allowlist that drops one of them keeps the address for the others, across
restarts too.

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
EXPIRY_MARGIN = 2.0  # seconds: an element the book saw expire so recently is replaced, not added
MAX_COMMENT = 127  # bytes of an element's comment (libnftnl's limit, less the NUL)
MORE = "..."  # ends a comment that could not hold every name (no DNS name reads so)

Names = tuple[str, ...]


def comment_of(names: Names) -> str:
    """The element comment for ``names`` (oldest first): the names newest first, separated
    by spaces; when they do not all fit, the most recent that do and then ``...``."""
    newest_first = list(reversed(names))
    text = " ".join(newest_first)
    if len(text.encode("ascii", "replace")) <= MAX_COMMENT:
        return text
    kept: list[str] = []
    for name in newest_first:
        if len(" ".join([*kept, name, MORE]).encode("ascii", "replace")) > MAX_COMMENT:
            break
        kept.append(name)
    return " ".join([*kept, MORE])


def names_of(comment: str) -> tuple[Names, bool]:
    """(names, oldest first; whether some were left out) from an element comment."""
    words = [word for word in comment.split(" ") if word]
    more = bool(words) and words[-1] == MORE
    if more:
        words.pop()
    return tuple(reversed(words)), more


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
    names: Names  # every name the address is open for, oldest first
    replace: bool

    @property
    def comment(self) -> str:
        return comment_of(self.names)

    @property
    def family(self) -> int:
        return family_of(self.address)


@dataclass
class _Element:
    expires: float
    names: Names  # oldest first
    written: float = 0.0  # when keel wrote or read it alone (0: from a whole listing)


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

    def load(self, agent: str, elements: Iterable[tuple[IPAddress, float, Names]]) -> None:
        """What the kernel holds for ``agent``: (address, seconds left, names) each."""
        now = self.clock()
        book = self._sets.setdefault(agent, {})
        book.clear()
        for address, remaining, names in elements:
            if remaining > 0:
                book[address] = _Element(now + remaining, names)
        self._unsure.discard(agent)

    def adopt(
        self, agent: str, elements: Iterable[tuple[IPAddress, float, Names]], *, listed: float
    ) -> None:
        """A kernel listing begun at ``listed``: it wins, but for what keel wrote since."""
        now = self.clock()
        book = self._sets.setdefault(agent, {})
        for address, remaining, names in elements:
            current = book.get(address)
            if current is not None and current.written >= listed:
                continue
            if remaining > 0:
                book[address] = _Element(now + remaining, names)
        self._unsure.discard(agent)

    def unknown(self, agent: str, addresses: Iterable[IPAddress]) -> list[IPAddress]:
        """Of ``addresses``, those the kernel may hold for ``agent`` with names the book
        does not know (a restart, before the sets are read): read them first
        (:meth:`learn`), or a rewrite would drop those names."""
        if agent not in self._unsure:
            return []
        book = self._sets.get(agent, {})
        return [address for address in addresses if address not in book]

    def learn(self, agent: str, address: IPAddress, found: tuple[float, Names] | None) -> None:
        """What the kernel holds for one address, read on its own: (seconds left, names),
        or None when it holds nothing."""
        now = self.clock()
        book = self._sets.setdefault(agent, {})
        if found is None or found[0] <= 0:
            book[address] = _Element(0.0, (), written=now)  # known to be absent
        else:
            book[address] = _Element(now + found[0], found[1], written=now)

    def written_since(self, agent: str, address: IPAddress, when: float) -> bool:
        element = self._sets.get(agent, {}).get(address)
        return element is not None and element.written >= when

    def plan(self, agent: str, addresses: Sequence[Address]) -> list[Insert]:
        """The writes that make every address last as long as this answer allows,
        and carry the answer's name among its names."""
        now = self.clock()
        book = self._sets.get(agent, {})
        inserts: list[Insert] = []
        for item in addresses:
            timeout = element_timeout(item.ttl, min_ttl=self.min_ttl, grace=self.grace)
            current = book.get(item.address)
            names: Names = (item.name,)
            # The book's expiry is the kernel's to the second: an element it
            # believes just expired may still be there, and adding an element
            # that is there changes nothing. Within the margin it is replaced.
            recent = current is not None and current.expires > now - EXPIRY_MARGIN
            if recent and current is not None:
                if current.expires > now:
                    slack = min(MAX_SLACK, timeout * SLACK_FRACTION)
                    fresh = current.expires >= now + timeout - slack
                    if fresh and item.name in current.names:
                        continue
                    timeout = max(timeout, math.ceil(current.expires - now))
                # Rewritten with every name, the latest last.
                names = (*(n for n in current.names if n != item.name), item.name)
            unread = agent in self._unsure and current is None
            inserts.append(Insert(item.address, timeout, names, replace=recent or unread))
        return inserts

    def committed(self, agent: str, inserts: Iterable[Insert]) -> None:
        """The kernel took ``inserts``: remember their new expiry."""
        now = self.clock()
        book = self._sets.setdefault(agent, {})
        for insert in inserts:
            book[insert.address] = _Element(now + insert.timeout, insert.names, written=now)

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

    def entries(self, agent: str) -> list[tuple[IPAddress, float, Names]]:
        """(address, seconds left, names oldest first), soonest to expire first."""
        now = self.clock()
        book = self._sets.get(agent, {})
        rows = [
            (address, math.ceil(element.expires - now), element.names)
            for address, element in book.items()
            if element.expires > now
        ]
        return sorted(rows, key=lambda row: (row[1], str(row[0])))
