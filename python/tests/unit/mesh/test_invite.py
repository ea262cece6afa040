"""Invite tokens: encoding, every refusal, the inviter's record and the proof."""

from __future__ import annotations

import json

import pytest
from keel.errors import UsageError
from keel.mesh.encoding import b64u_decode, b64u_encode
from keel.mesh.errors import InviteError
from keel.mesh.identity import NodeIdentity
from keel.mesh.invite import (
    TOKEN_PREFIX,
    InviteClaim,
    InviteRecord,
    InviteToken,
    invite_id_of,
    invite_proof,
    new_invite,
)

from .conftest import seeded

NOW = 1_700_000_000


def make_token(**overrides: object) -> InviteToken:
    inviter = NodeIdentity.generate(seeded("inviter"))
    return new_invite(
        inviter,
        ["192.0.2.1:7400", "[2001:db8::1]:7400"],
        now=NOW,
        ttl=3600,
        uses=2,
        random=seeded("secret"),
    )


def raw_token(token: InviteToken, old: str, new: str) -> str:
    text = b64u_decode(token.encode()[len(TOKEN_PREFIX) :], "token").decode()
    assert old in text
    return TOKEN_PREFIX + b64u_encode(text.replace(old, new, 1).encode())


def edit(token: InviteToken, **changes: object) -> str:
    body = json.loads(b64u_decode(token.encode()[len(TOKEN_PREFIX) :], "token"))
    body.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del body[key]
    return TOKEN_PREFIX + b64u_encode(json.dumps(body).encode())


def test_round_trip() -> None:
    token = make_token()
    text = token.encode()
    assert text.startswith("keelinv1.")
    assert InviteToken.decode(text) == token
    assert InviteToken.decode(f"  {text}\n") == token
    assert token.expires == NOW + 3600
    assert token.uses == 2
    assert token.secret.hex() not in repr(token)


@pytest.mark.parametrize(
    ("mangle", "reason", "words"),
    [
        (lambda t: "hello", "malformed", "should start with 'keelinv1.'"),
        (lambda t: t.encode()[:-10], "malformed", "damaged"),
        (lambda t: t.encode() + "!", "malformed", "damaged"),
        (lambda t: TOKEN_PREFIX + "A" * 9000, "malformed", "too long"),
        (lambda t: edit(t, extra=1), "malformed", "fields must be exactly"),
        (lambda t: edit(t, v=2), "malformed", "unsupported token version 2"),
        (lambda t: edit(t, v=True), "malformed", "unsupported token version"),
        (lambda t: edit(t, addrs=[]), "malformed", "addrs"),
        (lambda t: edit(t, addrs=["no-port"]), "malformed", "addrs"),
        (lambda t: edit(t, addrs=["192.0.2.1:99999"]), "malformed", "addrs"),
        (lambda t: edit(t, addrs=["192.0.2.1:0"]), "malformed", "addrs"),
        (lambda t: edit(t, addrs=["192.0.2.1:\u00b2"]), "malformed", "addrs"),
        (lambda t: raw_token(t, '"uses":2', '"uses":2,"uses":3'), "malformed", "appears twice"),
        (lambda t: raw_token(t, '"exp":', '"exp":NaN,"x":'), "malformed", "NaN is not"),
        (lambda t: edit(t, exp="soon"), "malformed", "exp must be"),
        (lambda t: edit(t, uses=-1), "malformed", "uses must be"),
        (lambda t: edit(t, secret="AAAA"), "malformed", "secret must be 32 bytes"),
        (lambda t: edit(t, node="a" * 32), "forged", "edited or forged"),
    ],
)
def test_refusals(mangle: object, reason: str, words: str) -> None:
    token = make_token()
    with pytest.raises(InviteError, match=words) as caught:
        InviteToken.decode(mangle(token))  # type: ignore[operator]
    assert caught.value.reason == reason


def test_expiry_on_the_joiners_side() -> None:
    token = make_token()
    token.check_fresh(NOW + 3599)
    with pytest.raises(InviteError, match="expired") as caught:
        token.check_fresh(NOW + 3600)
    assert caught.value.reason == "expired"


def test_the_inviters_record_counts_down() -> None:
    record = InviteRecord.from_token(make_token())
    assert record.uses_left == 2
    record = record.redeem(NOW).redeem(NOW + 1)
    with pytest.raises(InviteError, match="used up") as caught:
        record.redeem(NOW + 2)
    assert caught.value.reason == "used-up"
    fresh = InviteRecord.from_token(make_token())
    with pytest.raises(InviteError, match="expired"):
        fresh.redeem(NOW + 3600)
    assert InviteRecord.from_json(json.loads(json.dumps(fresh.to_json()))) == fresh
    with pytest.raises(ValueError, match="does not match"):
        InviteRecord.from_json(dict(fresh.to_json(), invite_id=b64u_encode(bytes(16))))


def test_proof_and_claim() -> None:
    token = make_token()
    h2 = bytes(range(32))
    joiner = bytes(range(32, 64))
    proof = invite_proof(token.secret, h2, joiner)
    claim = InviteClaim(invite_id_of(token.secret), proof, h2, joiner)
    assert claim.verify(token.secret)
    assert not claim.verify(bytes(32))
    assert not InviteClaim(claim.invite_id, proof, bytes(32), joiner).verify(token.secret)
    assert not InviteClaim(claim.invite_id, proof, h2, bytes(32)).verify(token.secret)
    assert not InviteClaim(bytes(16), proof, h2, joiner).verify(token.secret)


def test_known_answers_from_the_protocol_doc() -> None:
    assert invite_id_of(bytes(32)).hex() == "abec28a72078f0b6986e3148e4658ab8"
    proof = invite_proof(bytes(32), bytes(range(32)), bytes(range(32, 64)))
    assert proof.hex() == "c757a92fe92fb3948de06e6203f8e678ef57720fd42c6ccfb02959e28dbd7f81"


def test_new_invite_checks_its_input() -> None:
    inviter = NodeIdentity.generate()
    with pytest.raises(UsageError, match="ttl must be positive"):
        new_invite(inviter, ["a:1"], now=NOW, ttl=0)
    with pytest.raises(UsageError, match="uses must be"):
        new_invite(inviter, ["a:1"], now=NOW, ttl=1, uses=0)
    with pytest.raises(UsageError, match="not host:port"):
        new_invite(inviter, ["a b:1"], now=NOW, ttl=1)
    with pytest.raises(UsageError, match="1 to 16 addresses"):
        new_invite(inviter, [], now=NOW, ttl=1)


def test_invite_error_reasons_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown invite error reason"):
        InviteError("x", "bogus")
