"""Whom a node lets in once a handshake is over, and what a joiner adopts. Pure.

:func:`decide` takes the node's membership, its identity, the completed
handshake (the peer's proven node record and signing key, its invite claim,
what it says about itself in ``extra``) and, for an invite claim, the
invite this node stored under that id. The answer is one of:

- :class:`Refuse` (with a reason in ``<code>: <text>`` form for the CLOSE
  record, and records to send first: a removed node hears of its removal);
- :class:`Redeem`: the invite holds; store its counted-down record and the
  signed ``join`` record (one transaction), then the peer is in;
- :class:`Merge`: the peer is not a member here yet but names this mesh and
  shows the join records that admitted it (its *admission chain*): merge
  them, then decide again (``merged=True``);
- :class:`Admit`: register the connection.

The joining side adopts the inviter's records once they make it a member
(:func:`adopt`). :func:`hello` is what a node says about itself in its own
handshakes (addresses, mesh, admission chain).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keel.mesh.errors import InviteError
from keel.mesh.hello import MAX_ADMISSION_CHAIN, make_hello, parse_hello
from keel.mesh.identity import NodeIdentity
from keel.mesh.invite import InviteRecord
from keel.mesh.membership import Membership, SignedRecord
from keel.mesh.session import HandshakeComplete


@dataclass(frozen=True)
class Refuse:
    reason: str
    records: tuple[SignedRecord, ...] = ()  # to send before the CLOSE


@dataclass(frozen=True)
class Redeem:
    invite: InviteRecord  # with one use fewer
    join: SignedRecord  # signed by this node; the shell stores it, then adds it


@dataclass(frozen=True)
class Merge:
    records: tuple[Mapping[str, Any], ...]  # raw: checked when merged


@dataclass(frozen=True)
class Admit:
    pass


Decision = Refuse | Redeem | Merge | Admit


def decide(
    membership: Membership,
    identity: NodeIdentity,
    handshake: HandshakeComplete,
    *,
    invite: InviteRecord | None,
    now: float,
    merged: bool = False,
) -> Decision:
    """Let the peer of ``handshake`` in, or not (see the module's docstring).

    ``invite``: the stored invite named by the handshake's claim (None if
    there is no claim or no such invite); ``now``: Unix seconds.
    """
    view = membership.view
    me = identity.node_id
    remote = handshake.remote_node_id
    if remote == me:
        return Refuse("self: this is the node itself")
    if remote in view.removed:
        removal = tuple(
            r
            for r in membership.records()
            if r.kind == "remove" and r.body["node"] == remote and r.id in view.effective
        )
        return Refuse(f"removed: {remote} was removed from the mesh", removal)
    if not view.is_member(me):
        return Refuse("removed: this node was removed from the mesh")
    hello = parse_hello(handshake.extra)
    if not view.is_member(remote):
        if handshake.invite is not None:
            return _redeem(membership, identity, handshake, invite, now)
        if not merged and hello.mesh == membership.mesh_id and hello.admission:
            return Merge(hello.admission)
        return Refuse(f"unknown-node: {remote} is not a member of this mesh")
    if view.admitted[remote].node.signing_key != handshake.remote_signing_key:
        return Refuse(f"identity: {remote} presented another signing key")
    return Admit()


def _redeem(
    membership: Membership,
    identity: NodeIdentity,
    handshake: HandshakeComplete,
    invite: InviteRecord | None,
    now: float,
) -> Refuse | Redeem:
    claim = handshake.invite
    assert claim is not None
    if invite is None:
        return Refuse("invite-unknown: this node issued no such invite (or it was pruned)")
    if not claim.verify(invite.secret):
        return Refuse("invite-forged: the invite proof does not verify")
    if claim.invite_id.hex() in membership.view.revoked_invites:
        return Refuse("invite-revoked: an operator node revoked this invite; ask for a new token")
    try:
        redeemed = invite.redeem(now)
    except InviteError as exc:
        return Refuse(f"invite-{exc.reason}: {exc}")
    join = SignedRecord.make(
        identity,
        "join",
        membership.next_at(int(now * 1000)),
        node=handshake.remote_record().to_json(),
        addrs=list(parse_hello(handshake.extra).addresses),
    )
    return Redeem(redeemed, join)


def adopt(records: Sequence[SignedRecord], me: str) -> Membership | None:
    """The inviter's mesh from its records, once they make ``me`` a member (else None).

    ``RemoteProtocolError`` if the records do not make a mesh (a forged or
    broken genesis, another mesh's records mixed in).
    """
    genesis = [r for r in records if r.kind == "genesis"]
    if len(genesis) != 1:
        return None
    adopted = Membership(genesis[0], (r for r in records if r.kind != "genesis"))
    return adopted if adopted.view.is_member(me) else None


def admission_chain(membership: Membership, me: str) -> list[dict[str, Any]]:
    """The effective join records from ``me`` back towards the founder (at most 16)."""
    view = membership.view
    joins = {
        r.body["node"]["node_id"]: r
        for r in membership.records()
        if r.kind == "join" and r.id in view.effective
    }
    chain: list[dict[str, Any]] = []
    node = me
    while len(chain) < MAX_ADMISSION_CHAIN:
        member = view.admitted.get(node)
        join = joins.get(node)
        if member is None or member.admitted_by is None or join is None:
            break
        chain.append(join.to_json())
        node = member.admitted_by
    return chain


def hello(
    membership: Membership, me: str, addresses: Sequence[str], agents: Sequence[str] = ()
) -> dict[str, Any]:
    """This node's handshake ``extra``: its addresses, its mesh, how it was admitted."""
    return make_hello(addresses, membership.mesh_id, admission_chain(membership, me), agents)
