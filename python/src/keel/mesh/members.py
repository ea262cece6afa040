"""The node's membership records: on disk, merged from peers, signed here, gossiped.

:class:`~keel.mesh.membership.Membership` (pure) says what a record set
means; this keeps the node's set in the store, merges what peers send (and
passes new records on to every other peer), signs the node's own records
(remove, operator, revoke-invite, rooms, a changed address) and adopts another mesh's records when
the node joins one. After every change it calls ``changed`` so the node
brings its connections, dials and queues in line with the new view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from keel.mesh import admission
from keel.mesh.admission import Redeem
from keel.mesh.errors import RemoteProtocolError
from keel.mesh.identity import NodeIdentity
from keel.mesh.membership import Membership, MembershipError, SignedRecord, View
from keel.mesh.store import StateError, Store, state_failed

log = logging.getLogger("keel.mesh")

Record = Callable[[str, str, Mapping[str, Any]], None]
Gossip = Callable[[Sequence[SignedRecord], object | None], None]  # records, the source to skip


class Members:
    def __init__(
        self,
        *,
        store: Store,
        identity: NodeIdentity,
        addresses: Sequence[str],
        wall: Callable[[], float],
        record: Record,
        gossip: Gossip,
        changed: Callable[[], None],
        agents: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.agents = list(agents)  # named to peers in the handshake
        self.identity = identity
        self.me = identity.node_id
        self.addresses = list(addresses)
        self.wall = wall
        self.record = record
        self.gossip = gossip
        self.changed = changed
        self.membership = self._load()

    @property
    def view(self) -> View:
        return self.membership.view

    def hello(self) -> dict[str, Any]:
        """What this node says about itself in its handshakes."""
        return admission.hello(self.membership, self.me, self.addresses, self.agents)

    def _now_ms(self) -> int:
        return int(self.wall() * 1000)

    def _load(self) -> Membership:
        records = []
        for item in self.store.load_records():
            try:
                records.append(SignedRecord.from_json(item))
            except RemoteProtocolError as exc:
                log.error("mesh: skipping a damaged stored record: %s", exc)  # noqa: TRY400 (no traceback wanted)
        mesh_id = self.store.get_meta("mesh")
        genesis = next((r for r in records if r.id == mesh_id and r.kind == "genesis"), None)
        if genesis is None:
            founded = Membership.found(self.identity, self.addresses, self._now_ms())
            self.store.replace_records(founded.records(), founded.mesh_id)
            log.info("mesh: founded mesh %s", founded.mesh_id)
            return founded
        membership = Membership(genesis)
        for record in records:
            if record.kind != "genesis":
                try:
                    membership.add(record)
                except MembershipError as exc:
                    log.error("mesh: skipping a stored record: %s", exc)  # noqa: TRY400
        self._announce_addresses(membership)
        return membership

    def _announce_addresses(self, membership: Membership) -> None:
        """An ``addr`` record if this node listens elsewhere than its records say."""
        view = membership.view
        me = view.admitted.get(self.me)
        if me is None or not view.is_member(self.me) or set(me.addresses) == set(self.addresses):
            return
        record = membership.make(self.identity, "addr", self._now_ms(), addrs=self.addresses)
        self.store.add_records([record])

    def merge(self, raw: Iterable[Any], source: Any = None) -> list[SignedRecord]:
        """Records from a peer (``source``: its link, which is not sent them back)."""
        new = []
        for item in raw:
            try:
                record = SignedRecord.from_json(item)
                if self.membership.add(record):
                    new.append(record)
            except RemoteProtocolError as exc:
                where = source.describe() if source is not None else "a peer's handshake"
                log.warning("mesh: ignoring a record from %s: %s", where, exc)
        if not new:
            return new
        try:
            self.store.add_records(new)
        except StateError as exc:  # they hold in memory; peers send them again after a restart
            state_failed(f"cannot store {len(new)} membership record(s)", exc)
        self.gossip(new, source)
        view = self.view
        for record in new:
            if record.id in view.effective and record.kind in ("join", "remove"):
                target = record.body["node"]
                target = target["node_id"] if isinstance(target, dict) else target
                log.info("mesh: %s %s (by %s)", record.kind, target, record.by)
                self.record(f"member-{record.kind}", target, {"node": target, "by": record.by})
            elif record.id in view.effective and record.kind == "revoke-invite":
                invite = str(record.body["invite"])
                log.info("mesh: invite %s revoked (by %s)", invite, record.by)
                self.record("invite-revoke", invite, {"invite": invite, "by": record.by})
        self.changed()
        return new

    def sign(self, kind: str, **fields: Any) -> SignedRecord:
        """A record of this node's: stored, added, gossiped (``StateError`` if not stored)."""
        record = SignedRecord.make(
            self.identity, kind, self.membership.next_at(self._now_ms()), **fields
        )
        self.store.add_records([record])
        self.membership.add(record)
        self.gossip([record], None)
        self.changed()
        return record

    def redeem(self, decision: Redeem, remote: str) -> None:
        """An invite redeemed: its use counted and the join stored together, then told."""
        self.store.redeem_invite(decision.invite, decision.join)
        self.membership.add(decision.join)
        log.info("mesh: admitted %s by invite", remote)
        self.record("member-join", remote, {"node": remote, "by": decision.join.by})
        self.gossip([decision.join], None)
        self.changed()

    def adopt(self, adopted: Membership, via: str) -> None:
        """This node joined ``adopted``'s mesh: its records replace the node's own."""
        self.store.replace_records(adopted.records(), adopted.mesh_id)
        self.membership = adopted
        self._announce_addresses(adopted)
        log.info("mesh: joined mesh %s through %s", adopted.mesh_id, via)
        self.record("joined", adopted.mesh_id, {"mesh": adopted.mesh_id, "via": via})
        self.changed()
