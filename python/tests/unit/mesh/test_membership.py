"""Membership records: signatures, the view, removal, and convergence whatever the order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.mesh.encoding import b64u_encode, is_address
from keel.mesh.errors import RemoteProtocolError
from keel.mesh.identity import NodeIdentity
from keel.mesh.membership import Membership, MembershipError, SignedRecord, room_id_of

from .conftest import seeded

T0 = 1_700_000_000_000


def ident(name: str) -> NodeIdentity:
    return NodeIdentity.generate(seeded(name))


A, B, C, D, E = (ident(n) for n in "abcde")


def join(
    by: NodeIdentity, who: NodeIdentity, at: int, addrs: list[str] | None = None
) -> SignedRecord:
    return SignedRecord.make(by, "join", at, node=who.record().to_json(), addrs=addrs or [])


def remove(by: NodeIdentity, who: NodeIdentity, at: int) -> SignedRecord:
    return SignedRecord.make(by, "remove", at, node=who.node_id)


def grant(by: NodeIdentity, who: NodeIdentity, at: int, *, to: bool = True) -> SignedRecord:
    return SignedRecord.make(by, "operator", at, node=who.node_id, grant=to)


INVITE = "0123456789abcdef" * 2  # an invite id (never the invite's secret)


def revoke_invite(by: NodeIdentity, at: int, invite: str = INVITE) -> SignedRecord:
    return SignedRecord.make(by, "revoke-invite", at, invite=invite)


def mesh() -> Membership:
    return Membership.found(A, ["10.0.0.1:7400"], T0)


def test_founder_is_the_only_member_of_a_new_mesh() -> None:
    m = mesh()
    assert m.view.founder == A.node_id
    assert set(m.view.members) == {A.node_id}
    assert m.mesh_id == m.genesis.id
    assert m.view.admitted[A.node_id].addresses == ("10.0.0.1:7400",)


def test_a_chain_of_invites_admits_everyone() -> None:
    m = mesh()
    m.add(join(A, B, T0 + 1))
    m.add(join(B, C, T0 + 2))
    m.add(join(C, D, T0 + 3))
    assert set(m.view.members) == {A.node_id, B.node_id, C.node_id, D.node_id}
    assert m.view.admitted[D.node_id].admitted_by == C.node_id


def test_a_join_by_a_stranger_takes_no_effect_until_its_signer_is_in() -> None:
    m = mesh()
    late = join(B, C, T0 + 5)
    m.add(late)
    assert not m.view.is_member(C.node_id)
    m.add(join(A, B, T0 + 1))
    assert m.view.is_member(C.node_id)


def test_a_forged_signature_takes_no_effect() -> None:
    m = mesh()
    good = join(A, B, T0 + 1)
    forged = SignedRecord.from_json({**good.to_json(), "sig": b64u_encode(bytes(64))})
    m.add(forged)
    assert not m.view.is_member(B.node_id)
    # a record claiming to be by A but signed by C
    fake = SignedRecord.make(C, "join", T0 + 2, node=D.record().to_json(), addrs=[])
    m.add(SignedRecord.from_json({**fake.to_json(), "by": A.node_id}))
    assert not m.view.is_member(D.node_id)


def test_removal_wins_over_any_later_join() -> None:
    m = mesh()
    m.add(join(A, B, T0 + 1))
    m.add(join(A, C, T0 + 2))
    m.add(remove(A, C, T0 + 3))
    m.add(join(B, C, T0 + 4))
    assert not m.view.is_member(C.node_id)
    assert m.view.removed[C.node_id] == T0 + 3
    assert m.view.admitted[C.node_id].removed_at == T0 + 3


def test_a_removed_node_can_no_longer_admit_or_remove() -> None:
    m = mesh()
    m.add(join(A, B, T0 + 1))
    m.add(join(B, C, T0 + 2))  # before B's removal: stands
    m.add(remove(A, B, T0 + 3))
    m.add(join(B, D, T0 + 4))  # after: void
    m.add(remove(B, A, T0 + 5))  # after: void
    view = m.view
    assert view.is_member(C.node_id)
    assert not view.is_member(D.node_id)
    assert view.is_member(A.node_id)


def test_only_operator_nodes_remove_and_the_founder_is_the_first() -> None:
    m = mesh()
    m.add(join(A, B, T0 + 1))
    m.add(join(A, C, T0 + 2))
    assert m.view.operators == {A.node_id}
    m.add(remove(B, C, T0 + 3))  # B is a member, not an operator: void
    assert m.view.is_member(C.node_id)
    m.add(grant(A, B, T0 + 4))
    m.add(remove(B, C, T0 + 5))  # now it counts
    assert not m.view.is_member(C.node_id)
    assert m.view.operators == {A.node_id, B.node_id}


def test_a_node_cannot_promote_itself_nor_be_promoted_by_a_member() -> None:
    with pytest.raises(RemoteProtocolError, match="its own operator role"):
        grant(B, B, T0 + 2)
    forged = SignedRecord.make(B, "operator", T0 + 2, node=C.node_id, grant=True)
    with pytest.raises(RemoteProtocolError, match="its own operator role"):
        SignedRecord.from_json({**forged.to_json(), "by": C.node_id})
    m = mesh()
    m.add(join(A, B, T0 + 1))
    m.add(join(A, C, T0 + 1))
    m.add(grant(C, B, T0 + 2))  # C is no operator
    m.add(grant(B, C, T0 + 2))
    assert m.view.operators == {A.node_id}
    # a grant claimed in A's name but signed by B takes no effect
    claim = SignedRecord.from_json({**grant(B, C, T0 + 3).to_json(), "by": A.node_id})
    m.add(claim)
    assert m.view.operators == {A.node_id}


def test_the_role_is_taken_back_and_a_removed_operator_loses_it() -> None:
    m = mesh()
    m.add(join(A, B, T0 + 1))
    m.add(join(A, C, T0 + 1))
    m.add(grant(A, B, T0 + 2))
    m.add(grant(A, C, T0 + 2))
    m.add(grant(B, C, T0 + 3, to=False))
    assert m.view.operators == {A.node_id, B.node_id}
    m.add(remove(B, A, T0 + 4))  # an operator may remove the founder
    assert m.view.operators == {B.node_id}
    m.add(grant(A, C, T0 + 5))  # A is out: void
    m.add(grant(B, D, T0 + 5))  # D is no member: void
    assert m.view.operators == {B.node_id}


def test_an_operator_record_is_well_formed() -> None:
    good = grant(A, B, T0 + 1).to_json()
    for bad, problem in (
        ({**good, "grant": 1}, "grant must be true or false"),
        ({**good, "node": "x"}, "node is not a node id"),
        ({k: v for k, v in good.items() if k != "grant"}, "exactly the fields"),
    ):
        with pytest.raises(RemoteProtocolError, match=problem):
            SignedRecord.from_json(bad)


def test_a_revoke_invite_record_is_well_formed() -> None:
    good = revoke_invite(A, T0 + 1).to_json()
    assert good["invite"] == INVITE
    for bad, problem in (
        ({**good, "invite": INVITE.upper()}, "invite is not an invite id"),
        ({**good, "invite": INVITE[:-2]}, "invite is not an invite id"),
        ({**good, "invite": 7}, "invite is not an invite id"),
        ({k: v for k, v in good.items() if k != "invite"}, "exactly the fields"),
        ({**good, "node": B.node_id}, "exactly the fields"),
    ):
        with pytest.raises(RemoteProtocolError, match=problem):
            SignedRecord.from_json(bad)
    assert SignedRecord.from_json(good) == revoke_invite(A, T0 + 1)


def test_only_an_operator_node_revokes_an_invite() -> None:
    m = mesh()
    m.add(join(A, B, T0 + 1))
    m.add(join(A, C, T0 + 1))
    by_member = revoke_invite(B, T0 + 2)  # B is a member, not an operator: void
    m.add(by_member)
    by_stranger = revoke_invite(D, T0 + 2)  # D is no member at all: void
    m.add(by_stranger)
    # claimed in A's name but signed by C: void
    forged = SignedRecord.from_json({**revoke_invite(C, T0 + 2).to_json(), "by": A.node_id})
    m.add(forged)
    view = m.view
    assert dict(view.revoked_invites) == {}
    assert not {by_member.id, by_stranger.id, forged.id} & view.effective
    m.add(grant(A, B, T0 + 3))
    m.add(revoke_invite(B, T0 + 4))  # an operator now: it counts
    assert dict(m.view.revoked_invites) == {INVITE: T0 + 4}
    # B's earlier record stays void (B was no operator at its point of the walk)
    assert by_member.id not in m.view.effective


def test_the_founder_revokes_and_the_first_revocation_counts() -> None:
    m = mesh()
    first = revoke_invite(A, T0 + 2)
    again = revoke_invite(A, T0 + 5)
    other = revoke_invite(A, T0 + 3, "f" * 32)
    for record in (again, other, first):
        m.add(record)
    view = m.view
    assert dict(view.revoked_invites) == {INVITE: T0 + 2, "f" * 32: T0 + 3}
    assert first.id in view.effective
    assert again.id not in view.effective
    assert set(view.members) == {A.node_id}  # no membership change


def test_a_removed_or_demoted_operator_no_longer_revokes() -> None:
    m = mesh()
    m.add(join(A, B, T0 + 1))
    m.add(join(A, C, T0 + 1))
    m.add(grant(A, B, T0 + 2))
    m.add(grant(A, C, T0 + 2))
    m.add(grant(A, B, T0 + 3, to=False))
    m.add(remove(A, C, T0 + 3))
    m.add(revoke_invite(B, T0 + 4))
    m.add(revoke_invite(C, T0 + 4, "e" * 32))
    assert dict(m.view.revoked_invites) == {}


def test_remove_of_an_unknown_node_is_preemptive() -> None:
    m = mesh()
    m.add(remove(A, E, T0 + 1))
    m.add(join(A, E, T0 + 2))
    assert not m.view.is_member(E.node_id)


def test_addresses_last_writer_wins_and_only_own() -> None:
    m = mesh()
    m.add(join(A, B, T0 + 1, ["10.0.0.2:1"]))
    m.add(SignedRecord.make(B, "addr", T0 + 5, addrs=["10.0.0.2:2"]))
    m.add(SignedRecord.make(B, "addr", T0 + 3, addrs=["10.0.0.2:3"]))
    assert m.view.admitted[B.node_id].addresses == ("10.0.0.2:2",)


def test_another_mesh_genesis_is_refused() -> None:
    m = mesh()
    other = Membership.found(B, [], T0)
    with pytest.raises(MembershipError, match="another mesh"):
        m.add(other.genesis)


def test_next_at_is_after_every_record_held() -> None:
    m = mesh()
    m.add(join(A, B, T0 + 10_000))
    assert m.next_at(T0) == T0 + 10_001
    assert m.next_at(T0 + 20_000) == T0 + 20_000
    record = m.make(A, "addr", T0, addrs=[])
    assert record.at == T0 + 10_001


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"kind": "nope"}, "unknown kind"),
        ({"by": "xyz"}, "by is not a node id"),
        ({"at": -1}, "at must be"),
        ({"at": 1.5}, "at must be"),
        ({"addrs": ["nohost"]}, "addrs"),
        ({"addrs": ["h:1"] * 17}, "addrs"),
        ({"extra": 1}, "exactly the fields"),
        ({"sig": "!!"}, "sig"),
    ],
)
def test_malformed_records_are_refused(change: dict[str, object], problem: str) -> None:
    good = join(A, B, T0).to_json()
    with pytest.raises(RemoteProtocolError, match=problem):
        SignedRecord.from_json({**good, **change})


def test_a_node_cannot_admit_itself_and_genesis_is_self_signed() -> None:
    with pytest.raises(RemoteProtocolError, match="admit itself"):
        SignedRecord.make(A, "join", T0, node=A.record().to_json(), addrs=[])
    with pytest.raises(RemoteProtocolError, match="genesis"):
        SignedRecord.make(A, "genesis", T0, node=B.record().to_json(), addrs=[])


def test_room_records_must_derive_their_id_from_the_owner() -> None:
    nonce = bytes(16)
    good = SignedRecord.make(
        A,
        "room",
        T0,
        room=room_id_of(A.node_id, nonce),
        nonce=b64u_encode(nonce),
        name="ops",
        version=1,
        members=sorted([A.node_id, B.node_id]),
    )
    assert good.kind == "room"
    with pytest.raises(RemoteProtocolError, match="derive"):
        SignedRecord.make(
            B,
            "room",
            T0,
            room=room_id_of(A.node_id, nonce),
            nonce=b64u_encode(nonce),
            name="ops",
            version=2,
            members=sorted([A.node_id, B.node_id]),
        )
    with pytest.raises(RemoteProtocolError, match="owner is one of its members"):
        SignedRecord.make(
            A,
            "room",
            T0,
            room=room_id_of(A.node_id, nonce),
            nonce=b64u_encode(nonce),
            name="ops",
            version=1,
            members=[B.node_id],
        )


def test_record_json_round_trip_and_id() -> None:
    record = join(A, B, T0)
    again = SignedRecord.from_json(record.to_json())
    assert again == record
    assert again.id == record.id
    assert len(record.id) == 32


def test_is_address() -> None:
    assert is_address("10.0.0.1:7400")
    assert is_address("[::1]:7400")
    assert is_address("host.example:1")
    for bad in (
        "x",
        ":1",
        "h:0",
        "h:70000",
        "h:p",
        "a b:1",
        7,
        "h:\u00b2",
        "h:\u0661",
        "h:-1",
        "h:+1",
    ):
        assert not is_address(bad)


HISTORY = [
    join(A, B, T0 + 1),
    join(B, C, T0 + 2),
    join(A, D, T0 + 3),
    SignedRecord.make(C, "addr", T0 + 4, addrs=["10.0.0.3:7400"]),
    grant(A, D, T0 + 4),
    grant(D, C, T0 + 5),
    remove(D, B, T0 + 6),
    join(B, E, T0 + 7),  # void: B is out by then
    remove(C, D, T0 + 8),
    join(A, E, T0 + 9),
    remove(E, A, T0 + 10),  # void: E is no operator
    revoke_invite(C, T0 + 11),  # C is an operator by then
    revoke_invite(E, T0 + 12, "e" * 32),  # void: E is no operator
    revoke_invite(D, T0 + 12, "d" * 32),  # void: D is out by then
]


@settings(max_examples=60, deadline=None)
@given(st.permutations(HISTORY), st.data())
def test_any_arrival_order_and_any_split_converge(
    order: list[SignedRecord], data: st.DataObject
) -> None:
    reference = mesh()
    for record in HISTORY:
        reference.add(record)
    # two nodes see different subsets in different orders, then exchange everything
    cut = data.draw(st.integers(0, len(order)))
    left, right = mesh(), mesh()
    for record in order[:cut]:
        left.add(record)
    for record in reversed(order[cut:]):
        right.add(record)
    for record in right.records():
        if record.kind != "genesis":
            left.add(record)
    for record in left.records():
        if record.kind != "genesis":
            right.add(record)
    for node in (left, right):
        assert node.view == reference.view
    view = reference.view
    assert set(view.members) == {A.node_id, C.node_id, E.node_id}
    assert set(view.removed) == {B.node_id, D.node_id}
    assert view.operators == {A.node_id, C.node_id}  # D lost the role with its removal
    assert view.admitted[C.node_id].addresses == ("10.0.0.3:7400",)
    assert dict(view.revoked_invites) == {INVITE: T0 + 11}
