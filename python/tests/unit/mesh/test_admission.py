"""Whom a node lets in after a handshake, and what a joiner adopts (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from keel.mesh import admission
from keel.mesh.admission import Admit, Merge, Redeem, Refuse
from keel.mesh.errors import RemoteProtocolError
from keel.mesh.identity import NodeIdentity
from keel.mesh.invite import InviteClaim, InviteRecord, invite_proof, new_invite
from keel.mesh.membership import Membership, SignedRecord
from keel.mesh.session import HandshakeComplete

from .conftest import seeded
from .test_membership import T0, A, B, C, D, grant, join, remove, revoke_invite

NOW = T0 / 1000
HASH = b"h" * 32


def handshake(
    peer: NodeIdentity, *, extra: dict[str, Any] | None = None, claim: InviteClaim | None = None
) -> HandshakeComplete:
    return HandshakeComplete(
        peer.static_public,
        peer.node_id,
        peer.signing_public,
        peer.binding,
        HASH,
        extra or {},
        claim,
    )


def founded() -> Membership:
    mesh = Membership.found(A, ["10.0.0.1:7400"], T0)
    mesh.add(join(A, B, T0 + 1))
    return mesh


def invite_for(joiner: NodeIdentity, *, uses: int = 1) -> tuple[InviteRecord, InviteClaim]:
    token = new_invite(A, ["10.0.0.1:7400"], now=NOW, ttl=60, uses=uses, random=seeded("inv"))
    proof = invite_proof(token.secret, HASH, joiner.static_public)
    return InviteRecord.from_token(token), InviteClaim(
        token.invite_id, proof, HASH, joiner.static_public
    )


def decide(mesh: Membership, shake: HandshakeComplete, **options: Any) -> admission.Decision:
    options.setdefault("invite", None)
    options.setdefault("now", NOW + 5)
    return admission.decide(mesh, A, shake, **options)


def test_a_member_is_admitted_and_a_stranger_refused() -> None:
    mesh = founded()
    assert decide(mesh, handshake(B)) == Admit()
    assert decide(mesh, handshake(C)) == Refuse(
        f"unknown-node: {C.node_id} is not a member of this mesh"
    )
    assert decide(mesh, handshake(A)) == Refuse("self: this is the node itself")


def test_a_member_with_another_signing_key_is_refused() -> None:
    mesh = founded()
    impostor = handshake(B)
    forged = HandshakeComplete(
        impostor.remote_static, B.node_id, C.signing_public, C.binding, HASH, {}, None
    )
    assert decide(mesh, forged) == Refuse(f"identity: {B.node_id} presented another signing key")


def test_a_removed_node_hears_of_its_removal_and_is_refused() -> None:
    mesh = founded()
    removal = remove(A, B, T0 + 2)
    mesh.add(removal)
    decision = decide(mesh, handshake(B))
    assert decision == Refuse(f"removed: {B.node_id} was removed from the mesh", (removal,))
    alone = founded()
    alone.add(grant(A, B, T0 + 2))
    alone.add(
        remove(B, A, T0 + 3)
    )  # B, an operator node, removed A: A is no member of its own mesh now
    assert decide(alone, handshake(B)) == Refuse("removed: this node was removed from the mesh")


def test_a_valid_invite_is_redeemed_once_with_a_signed_join() -> None:
    mesh = founded()
    stored, claim = invite_for(C)
    decision = decide(
        mesh, handshake(C, claim=claim, extra={"addrs": ["10.0.0.3:7400"]}), invite=stored
    )
    assert isinstance(decision, Redeem)
    assert decision.invite.uses_left == 0
    join_record = decision.join
    assert (join_record.kind, join_record.by) == ("join", A.node_id)
    assert join_record.body["node"]["node_id"] == C.node_id
    assert join_record.addresses == ("10.0.0.3:7400",)
    assert join_record.at > mesh.records()[-1].at  # after every record held
    assert C.node_id not in mesh.view.admitted  # the shell adds it once stored
    used = decide(mesh, handshake(C, claim=claim), invite=decision.invite)
    assert used == Refuse("invite-used-up: invite already used up; ask the inviter for a new token")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown", "invite-unknown: this node issued no such invite (or it was pruned)"),
        ("forged", "invite-forged: the invite proof does not verify"),
        ("expired", "invite-expired: invite expired; ask the inviter for a new token"),
    ],
)
def test_bad_invites_are_refused_with_their_code(case: str, reason: str) -> None:
    mesh = founded()
    stored, claim = invite_for(C)
    now = NOW + 5
    if case == "unknown":
        stored = None  # type: ignore[assignment]
    elif case == "forged":
        claim = InviteClaim(claim.invite_id, b"x" * len(claim.proof), HASH, C.static_public)
    else:
        now = NOW + 61
    assert decide(mesh, handshake(C, claim=claim), invite=stored, now=now) == Refuse(reason)


def test_a_revoked_invite_is_refused_and_only_an_operators_revocation_counts() -> None:
    mesh = founded()
    stored, claim = invite_for(C)
    invite_id = claim.invite_id.hex()
    shake = handshake(C, claim=claim)
    mesh.add(revoke_invite(B, T0 + 2, invite_id))  # B is a member, not an operator: void
    assert isinstance(decide(mesh, shake, invite=stored), Redeem)
    mesh.add(revoke_invite(A, T0 + 3, "0" * 32))  # another invite's revocation
    assert isinstance(decide(mesh, shake, invite=stored), Redeem)
    mesh.add(revoke_invite(A, T0 + 4, invite_id))
    revoked = Refuse("invite-revoked: an operator node revoked this invite; ask for a new token")
    assert decide(mesh, shake, invite=stored) == revoked
    # a bad proof is still reported as forged: only the secret's holder learns of the revocation
    forged = InviteClaim(claim.invite_id, b"x" * len(claim.proof), HASH, C.static_public)
    assert decide(mesh, handshake(C, claim=forged), invite=stored) == Refuse(
        "invite-forged: the invite proof does not verify"
    )
    # revoked and expired: revoked is said first
    assert decide(mesh, shake, invite=stored, now=NOW + 61) == revoked


def test_a_member_admitted_elsewhere_shows_its_chain_and_is_merged_once() -> None:
    here = founded()
    elsewhere = founded()
    elsewhere.add(join(B, C, T0 + 5))  # C joined through B; this node has not heard yet
    extra = admission.hello(elsewhere, C.node_id, ["10.0.0.3:7400"])
    decision = decide(here, handshake(C, extra=extra))
    assert isinstance(decision, Merge)
    for record in decision.records:
        here.add(SignedRecord.from_json(record))
    assert decide(here, handshake(C, extra=extra), merged=True) == Admit()
    stranger = {**extra, "mesh": "0" * 32}  # another mesh's chain: no merge
    assert isinstance(decide(founded(), handshake(C, extra=stranger)), Refuse)
    assert isinstance(decide(founded(), handshake(C, extra=extra), merged=True), Refuse)


def test_the_admission_chain_runs_back_towards_the_founder() -> None:
    mesh = founded()
    mesh.add(join(B, C, T0 + 5))
    mesh.add(join(C, D, T0 + 6))
    chain = admission.admission_chain(mesh, D.node_id)
    assert [(r["by"], r["node"]["node_id"]) for r in chain] == [
        (C.node_id, D.node_id),
        (B.node_id, C.node_id),
        (A.node_id, B.node_id),
    ]
    assert admission.admission_chain(mesh, A.node_id) == []  # the founder
    hello = admission.hello(mesh, D.node_id, ["10.0.0.4:7400"])
    assert (hello["mesh"], hello["addrs"], hello["admission"]) == (
        mesh.mesh_id,
        ["10.0.0.4:7400"],
        chain,
    )


def test_a_joiner_adopts_the_inviters_records_once_they_admit_it() -> None:
    mesh = founded()
    records = mesh.records()
    assert admission.adopt(records, C.node_id) is None  # not admitted (yet)
    mesh.add(join(A, C, T0 + 3))
    adopted = admission.adopt(mesh.records(), C.node_id)
    assert adopted is not None
    assert adopted.mesh_id == mesh.mesh_id
    assert adopted.view.is_member(C.node_id)
    assert admission.adopt([r for r in mesh.records() if r.kind != "genesis"], C.node_id) is None
    forged = SignedRecord(mesh.genesis.body, bytes(64))
    with pytest.raises(RemoteProtocolError, match="signature does not verify"):
        admission.adopt([forged, *mesh.records()[1:]], C.node_id)
