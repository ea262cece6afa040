"""What egress tells the ledger and the operator about what it stopped, without flooding either.

Two kinds of events reach here: a name an agent may not resolve (the proxy
answered NXDOMAIN, or in audit mode would have) and a packet the kernel
dropped (or in audit mode would have), from the NFLOG group the rules log to.

:class:`Aggregator` turns them into ledger entries: the first occurrence of
each (agent, what) in a window is recorded at once, repeats are counted and
recorded once when the window closes, and past ``max_keys`` distinct things
per agent and window only a count of what was not itemised is kept. However
hard an agent hammers, one agent yields at most ``2 * max_keys + 1`` entries
per window.

:class:`Observations` keeps, per agent, the names it asked for and the
addresses it tried without a name (bounded), for ``status`` and for
:func:`suggest`, which turns them into an allowlist. Pure: the clock is a
parameter.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from keel.egress.allowlist import Allowlist, EntryError, parse_entry

DEFAULT_WINDOW = 60.0  # seconds
DEFAULT_MAX_KEYS = 50  # distinct denials itemised per agent and window
RECENT = 20  # denials kept per agent for `keel egress status`
MAX_NAMES = 5_000  # names remembered per agent for `suggest`


@dataclass(frozen=True)
class DeniedName:
    agent: str
    name: str
    qtype: str
    enforced: bool

    def key(self) -> tuple[str, ...]:
        return ("name", self.name, self.qtype)

    def data(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.qtype, "mode": _mode(self.enforced)}

    def describe(self) -> str:
        return f"{self.name} ({self.qtype})"


@dataclass(frozen=True)
class BlockedFlow:
    agent: str
    protocol: str  # tcp, udp, icmp, icmpv6 or a number
    address: str
    port: int | None
    enforced: bool

    def key(self) -> tuple[str, ...]:
        return ("flow", self.protocol, self.address, str(self.port))

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "protocol": self.protocol,
            "address": self.address,
            "mode": _mode(self.enforced),
        }
        if self.port is not None:
            data["port"] = self.port
        return data

    def describe(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return (
            f"{self.protocol} {host}:{self.port}"
            if self.port is not None
            else f"{self.protocol} {self.address}"
        )


Event = DeniedName | BlockedFlow


def _mode(enforced: bool) -> str:
    return "enforce" if enforced else "audit"


def kind_of(event: Event) -> str:
    return "egress.denied" if isinstance(event, DeniedName) else "egress.blocked"


@dataclass(frozen=True)
class Entry:
    """A ledger entry to record: ``kind``, ``subject`` (the agent) and ``data``."""

    kind: str
    subject: str
    data: dict[str, Any]


@dataclass
class _Count:
    event: Event
    repeats: int = 0
    first: float = 0.0
    last: float = 0.0


@dataclass
class _Window:
    started: float
    counts: dict[tuple[str, ...], _Count] = field(default_factory=dict)
    suppressed: int = 0


class Aggregator:
    """Denials in, a bounded number of ledger entries out."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        window: float = DEFAULT_WINDOW,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.clock = clock
        self.window = window
        self.max_keys = max_keys
        self._windows: dict[str, _Window] = {}

    def observe(self, event: Event) -> list[Entry]:
        """Entries to record now for ``event`` (the first of its kind in the window, or none)."""
        now = self.clock()
        entries = self._close(event.agent, now)
        current = self._windows.setdefault(event.agent, _Window(now))
        count = current.counts.get(event.key())
        if count is not None:
            count.repeats += 1
            count.last = now
            return entries
        if len(current.counts) >= self.max_keys:
            current.suppressed += 1
            return entries
        current.counts[event.key()] = _Count(event, 0, now, now)
        entries.append(Entry(kind_of(event), event.agent, {**event.data(), "count": 1}))
        return entries

    def flush(self, *, force: bool = False) -> list[Entry]:
        """Entries of windows that have ended (all of them when ``force``, at shutdown)."""
        now = self.clock()
        entries: list[Entry] = []
        for agent in list(self._windows):
            entries += self._close(agent, now, force=force)
        return entries

    def _close(self, agent: str, now: float, *, force: bool = False) -> list[Entry]:
        current = self._windows.get(agent)
        if current is None or (not force and now < current.started + self.window):
            return []
        del self._windows[agent]
        entries = [
            Entry(
                kind_of(count.event),
                agent,
                {
                    **count.event.data(),
                    "count": count.repeats,
                    "repeated": True,
                    "first": round(count.first, 3),
                    "last": round(count.last, 3),
                },
            )
            for count in current.counts.values()
            if count.repeats
        ]
        if current.suppressed:
            entries.append(
                Entry(
                    "egress.suppressed",
                    agent,
                    {
                        "count": current.suppressed,
                        "window": self.window,
                        "reason": f"more than {self.max_keys} distinct denials in the window",
                    },
                )
            )
        return entries


@dataclass
class _AgentSeen:
    names: collections.Counter[str] = field(default_factory=collections.Counter)
    denied: collections.Counter[str] = field(default_factory=collections.Counter)
    addresses: collections.Counter[str] = field(default_factory=collections.Counter)
    recent: collections.deque[tuple[float, str, str]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT)
    )
    overflow: int = 0


class Observations:
    """Per agent: names asked, names denied, addresses blocked, the latest denials."""

    def __init__(self, *, clock: Callable[[], float], max_names: int = MAX_NAMES) -> None:
        self.clock = clock
        self.max_names = max_names
        self._agents: dict[str, _AgentSeen] = {}

    def _seen(self, agent: str) -> _AgentSeen:
        return self._agents.setdefault(agent, _AgentSeen())

    def _count(self, seen: _AgentSeen, counter: collections.Counter[str], key: str) -> None:
        if key in counter or len(counter) < self.max_names:
            counter[key] += 1
        else:
            seen.overflow += 1

    def asked(self, agent: str, name: str) -> None:
        seen = self._seen(agent)
        self._count(seen, seen.names, name)

    def denied(self, event: Event) -> None:
        seen = self._seen(event.agent)
        seen.recent.append((self.clock(), kind_of(event).split(".")[1], event.describe()))
        if isinstance(event, DeniedName):
            self._count(seen, seen.denied, event.name)
        else:
            self._count(seen, seen.addresses, event.address)

    def recent(self, agent: str) -> list[dict[str, Any]]:
        seen = self._agents.get(agent)
        if seen is None:
            return []
        return [
            {"at": at, "what": what, "detail": detail} for at, what, detail in reversed(seen.recent)
        ]

    def summary(self, agent: str) -> dict[str, Any]:
        seen = self._agents.get(agent) or _AgentSeen()
        return {
            "names": dict(seen.names),
            "denied": dict(seen.denied),
            "addresses": dict(seen.addresses),
            "overflow": seen.overflow,
        }


def suggest(
    names: Iterable[str],
    *,
    current: Allowlist | None = None,
    collapse: int = 0,
) -> list[str]:
    """An allowlist covering ``names`` (beyond what ``current`` already allows).

    With ``collapse`` >= 2, names with at least that many siblings under one
    parent of two or more labels become ``*.parent``; otherwise exact names.
    Names that cannot be entries (addresses, malformed) are left out.
    """
    entries = []
    for name in set(names):
        try:
            entry = parse_entry(name)
        except EntryError:
            continue
        if entry.wildcard or (current is not None and current.allows(entry.labels)):
            continue
        entries.append(entry)
    exact = {entry.labels for entry in entries}
    proposed: set[str] = set()
    if collapse >= 2:
        by_parent: dict[tuple[bytes, ...], set[tuple[bytes, ...]]] = collections.defaultdict(set)
        for labels in exact:
            if len(labels) >= 3:
                by_parent[labels[1:]].add(labels)
        for parent, children in by_parent.items():
            if len(children) >= collapse:
                proposed.add("*." + b".".join(parent).decode())
                exact -= children
    proposed |= {b".".join(labels).decode() for labels in exact}
    return sorted(proposed, key=lambda text: (text.lstrip("*.").split(".")[::-1], text))
