"""The node's connections: the ones it accepts, dials and joins through; one link per peer.

Every connection is a :class:`~keel.mesh.peer_link.PeerLink` reporting to
the node (its :class:`~keel.mesh.peer_link.LinkEvents`). This keeps them:
makes inbound links for the listener, dials the members the pure
:class:`~keel.mesh.dialing.Dialer` says to dial (on its own timer), opens
the connection a join goes through, and registers the link the node
admitted as *the* link of its peer (of two, the one
:func:`~keel.mesh.dialing.preferred` picks). Refusals are told in the log and
the ledger, a burst and then one a second, however many there are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

from keel.errors import KeelError
from keel.mesh.dialing import Dial, Dialer, preferred
from keel.mesh.encoding import split_address
from keel.mesh.identity import NodeIdentity
from keel.mesh.intake import TokenBucket
from keel.mesh.invite import InviteToken
from keel.mesh.kem import Kem
from keel.mesh.peer_link import Intake, LinkEvents, PeerLink
from keel.mesh.session import Session, SessionConfig

log = logging.getLogger("keel.mesh")

REFUSALS_BURST = 30

Spawn = Callable[[Coroutine[Any, Any, Any]], object]
Record = Callable[[str, str, Mapping[str, Any]], None]


class Links:
    def __init__(
        self,
        *,
        events: LinkEvents,
        identity: NodeIdentity,
        kem: Kem,
        session: SessionConfig,
        connect_timeout: float,
        dialer: Dialer,
        hello: Callable[[], dict[str, Any]],
        static_key: Callable[[str], bytes | None],
        spawn: Spawn,
        record: Record,
        clock: Callable[[], float],
    ) -> None:
        self.events = events
        self.identity = identity
        self.me = identity.node_id
        self.kem = kem
        self.session = session
        self.connect_timeout = connect_timeout
        self.dialer = dialer
        self.hello = hello
        self.static_key = static_key  # a member's X25519 key, for dialing it
        self.spawn = spawn
        self.record = record
        self.clock = clock
        self.connections: set[PeerLink] = set()
        self.by_peer: dict[str, PeerLink] = {}  # the registered link of each connected peer
        self._refusals = TokenBucket(REFUSALS_BURST, 1.0, clock=clock)
        self._untold = 0
        self._dial_timer: asyncio.TimerHandle | None = None

    def __iter__(self) -> Iterator[PeerLink]:
        return iter(list(self.connections))

    def close(self, reason: str) -> None:
        if self._dial_timer is not None:
            self._dial_timer.cancel()
        for link in self:
            link.close(reason)

    def _link(self, session: Session, **purpose: Any) -> PeerLink:
        return PeerLink(self.events, session, local_id=self.me, clock=self.clock, **purpose)

    # -- inbound

    def inbound(self, listener: Intake, ticket: int) -> PeerLink:
        """The protocol of a connection the listener admitted."""
        session = Session.responder(
            self.identity, kem=self.kem, clock=self.clock, config=self.session, extra=self.hello()
        )
        return self._link(session, admitted=(listener, ticket))

    # -- dialing members

    def dial_due(self) -> None:
        """Start the dials the dialer says are due; come back when the next one is."""
        if self._dial_timer is not None:
            self._dial_timer.cancel()
            self._dial_timer = None
        for dial in self.dialer.due():
            self.spawn(self._dial(dial))
        deadline = self.dialer.next_deadline()
        if deadline is not None:
            delay = max(deadline - self.clock(), 0.001)
            self._dial_timer = asyncio.get_running_loop().call_later(delay, self.dial_due)

    async def _dial(self, dial: Dial) -> None:
        static = self.static_key(dial.peer)
        if static is None:
            self.dialer.failed(dial.peer)
            return
        session = Session.initiator(
            self.identity,
            remote_static=static,
            kem=self.kem,
            clock=self.clock,
            config=self.session,
            extra=self.hello(),
        )
        try:
            await self._connect(dial.address, lambda: self._link(session, dial=dial))
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: IDNA, a bad address
            log.debug("mesh: dialing %s at %s failed: %s", dial.peer, dial.address, exc)
            self.dialer.failed(dial.peer)
            self.dial_due()

    async def _connect(self, address: str, link: Callable[[], PeerLink]) -> None:
        host, port = split_address(address)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            await loop.create_connection(link, host, port)

    # -- joining a mesh by invite

    async def join_via(self, token: InviteToken, address: str) -> dict[str, Any]:
        """Connect to the inviter at ``address``; the result once its records admit this node."""
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        session = Session.initiator(
            self.identity,
            remote_static=token.static_key,
            kem=self.kem,
            clock=self.clock,
            config=self.session,
            invite=token,
            extra=self.hello(),
        )
        try:
            await self._connect(address, lambda: self._link(session, joining=done))
        except (OSError, ValueError) as exc:  # ValueError: IDNA, a bad address
            raise KeelError(f"cannot connect: {getattr(exc, 'strerror', None) or exc}") from None
        return await done

    # -- registering

    def register(self, link: PeerLink) -> tuple[bool, bool]:
        """Make ``link`` its peer's link, of two the one :func:`preferred` keeps.

        Returns (kept, replaced): whether ``link`` is kept (else it closes),
        and whether it replaced an older link of the peer (which closes).
        """
        peer = link.peer
        assert peer is not None
        existing = self.by_peer.get(peer)
        replaced = False
        if existing is not None and existing is not link:
            keep = preferred(self.me, existing.link, link.link)
            reason = f"duplicate: keeping the connection initiated by {keep.initiator}"
            if keep != link.link:
                link.close(reason)
                if link.dial is not None:
                    self.dialer.connected(peer)
                return False, False
            existing.registered = False
            existing.close(reason)
            replaced = True
        self.by_peer[peer] = link
        link.registered = True
        self.dialer.connected(peer)
        return True, replaced

    def lost(self, link: PeerLink) -> bool:
        """``link`` is gone; True if it was its peer's registered link."""
        self.connections.discard(link)
        peer = link.peer
        if peer is not None and self.by_peer.get(peer) is link:
            del self.by_peer[peer]
            self.dialer.disconnected(peer)
            self.dial_due()
            return True
        if link.dial is not None and not link.registered:
            self.dialer.failed(link.dial.peer)
            self.dial_due()
        return False

    # -- refusing

    def refuse(self, link: PeerLink, reason: str) -> None:
        """Tell (log, ledger) and close with a CLOSE record saying why."""
        self.refused(link, reason)
        link.close(reason)

    def refused(self, link: PeerLink, reason: str, hint: str = "") -> None:
        """Log (and record) why a connection is being dropped, a burst, then one a second."""
        if not self._refusals.take():
            self._untold += 1
            return
        untold, self._untold = self._untold, 0
        log.warning(
            "mesh: dropping the connection with %s: %s%s%s",
            link.describe(),
            reason,
            f" ({hint})" if hint else "",
            f" ({untold} more refusals since the last one logged)" if untold else "",
        )
        self.record(
            "refused",
            link.peer or "",
            {"address": link.address, "peer": link.peer, "reason": reason[:200]},
        )
