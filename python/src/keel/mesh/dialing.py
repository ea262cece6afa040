"""Connection policy: whom to dial when, and which connection to keep. Pure.

- **One connection per peer pair.** When two connections to the same peer
  are open (both sides dialed at once, or a peer re-dialed while we still
  held its old connection), :func:`preferred` picks the one to keep and both
  sides pick the same: the connection *initiated by the lower node id* wins;
  between two connections with the same initiator, the newer one wins (the
  older is most likely dead on the other side).
- **Reconnect with jittered exponential back-off.** :class:`Dialer` dials
  every member it is not connected to, rotating through the addresses it
  knows (from gossip and handshakes); after a failure, or a connection that
  did not last, it waits ``base * 2^(attempts-1)`` capped at ``cap``, times a
  random factor in [0.5, 1), so that a mesh coming back from a partition does
  not reconnect in lock-step.
"""

from __future__ import annotations

import random as random_module
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Link:
    """What identifies an open connection for :func:`preferred`."""

    peer: str
    initiator: str  # the node id that dialed
    serial: int  # local, increasing: the order in which connections opened here


def preferred(local: str, first: Link, second: Link) -> Link:
    """The connection to keep of two to the same peer; the peer chooses the same one."""
    if first.peer != second.peer:
        raise ValueError("preferred() compares two connections to the same peer")
    lower = min(local, first.peer)
    first_lower, second_lower = first.initiator == lower, second.initiator == lower
    if first_lower != second_lower:
        return first if first_lower else second
    return first if first.serial > second.serial else second


@dataclass(frozen=True)
class Dial:
    peer: str
    address: str


@dataclass
class _Target:
    addresses: list[str] = field(default_factory=list)
    next_address: int = 0
    attempts: int = 0
    not_before: float = 0.0
    dialing: bool = False
    connected: bool = False
    connected_since: float = 0.0


class Dialer:
    def __init__(
        self,
        local: str,
        *,
        clock: Callable[[], float],
        random: Callable[[], float] = random_module.random,
        base: float = 0.5,
        cap: float = 30.0,
        stable_after: float = 10.0,
    ) -> None:
        if not 0 < base <= cap:
            raise ValueError("back-off base must be positive and at most the cap")
        self.local = local
        self.clock = clock
        self.random = random
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        self._targets: dict[str, _Target] = {}

    def update(self, peers: Mapping[str, Sequence[str]]) -> None:
        """The members to stay connected to, with the addresses gossip knows for them."""
        for peer in list(self._targets):
            if peer not in peers:
                del self._targets[peer]
        for peer, addresses in peers.items():
            if peer == self.local:
                continue
            target = self._targets.setdefault(peer, _Target())
            for address in addresses:
                self._learn(target, address)

    def learn(self, peer: str, address: str) -> None:
        """An address seen for ``peer`` outside gossip (a handshake, an invite token)."""
        target = self._targets.get(peer)
        if target is not None:
            self._learn(target, address)

    @staticmethod
    def _learn(target: _Target, address: str) -> None:
        if address not in target.addresses:
            target.addresses.append(address)

    def backoff(self, attempts: int) -> float:
        delay = min(self.cap, self.base * 2 ** min(max(attempts - 1, 0), 30))
        return float(delay * (0.5 + self.random() / 2))

    def due(self) -> list[Dial]:
        """The dials to start now (each then ends in ``failed`` or ``connected``)."""
        now = self.clock()
        dials = []
        for peer, target in self._targets.items():
            if target.connected or target.dialing or not target.addresses:
                continue
            if now < target.not_before:
                continue
            address = target.addresses[target.next_address % len(target.addresses)]
            target.next_address += 1
            target.dialing = True
            dials.append(Dial(peer, address))
        return dials

    def failed(self, peer: str) -> None:
        """A dial did not end in an open session."""
        target = self._targets.get(peer)
        if target is None:
            return
        target.dialing = False
        target.attempts += 1
        target.not_before = self.clock() + self.backoff(target.attempts)

    def connected(self, peer: str) -> None:
        target = self._targets.setdefault(peer, _Target())
        target.dialing = False
        target.connected = True
        target.connected_since = self.clock()

    def disconnected(self, peer: str) -> None:
        """The session ended; a session that lasted resets the back-off."""
        target = self._targets.get(peer)
        if target is None or not target.connected:
            return
        now = self.clock()
        target.connected = False
        if now - target.connected_since >= self.stable_after:
            target.attempts = 0
        target.attempts += 1
        target.not_before = now + self.backoff(target.attempts)

    def next_deadline(self) -> float | None:
        times = [
            t.not_before
            for t in self._targets.values()
            if not (t.connected or t.dialing) and t.addresses
        ]
        return min(times) if times else None

    def state(self, peer: str) -> dict[str, object] | None:
        target = self._targets.get(peer)
        if target is None:
            return None
        return {
            "addresses": list(target.addresses),
            "attempts": target.attempts,
            "connected": target.connected,
            "dialing": target.dialing,
        }
