"""Who may administer the mesh: the pure decision, the handler guard, the setting."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from keel.api import Peer
from keel.errors import Forbidden
from keel.mesh.access import ADMIN_VERBS, Operators, guard

OPERATORS = Operators(daemon_uid=990, group="ops", gid=1234)


def peer(uid: int, gid: int = 100, groups: frozenset[int] = frozenset()) -> Peer:
    return Peer(pid=1, uid=uid, gid=gid, groups=groups)


@pytest.mark.parametrize(
    ("caller", "allowed"),
    [
        (peer(0), True),  # root
        (peer(990), True),  # the daemon's own user
        (peer(1000, gid=1234), True),  # the operator group as primary group
        (peer(1000, groups=frozenset({5, 1234})), True),  # ... or a supplementary one
        (peer(1000), False),
        (peer(1000, gid=990, groups=frozenset({990})), False),  # the daemon's *group* is not enough
        (peer(-1, gid=-1), False),  # credentials unknown
    ],
)
def test_who_may_administer(caller: Peer, allowed: bool) -> None:
    for verb in ADMIN_VERBS:
        refusal = OPERATORS.refusal(verb, caller)
        assert (refusal is None) is allowed
        if refusal is not None:
            assert (
                refusal
                == f"`{verb}` needs root or membership of group ops (you are uid {caller.uid})"
            )
    for verb in ("status", "send", "send_many", "recv", "stream", "ack", "peers", "rooms"):
        assert OPERATORS.refusal(verb, caller) is None


def test_without_a_group_the_refusal_says_how_to_name_one() -> None:
    refusal = Operators(daemon_uid=0).refusal("remove", peer(1000))
    assert refusal is not None
    assert refusal.startswith("`remove` needs root (you are uid 1000)")
    assert '"operator_group"' in refusal
    refusal = Operators(daemon_uid=990).refusal("invite", peer(1000))
    assert refusal is not None
    assert "root or uid 990, the daemon's" in refusal


def test_the_guard_wraps_only_the_administrative_verbs() -> None:
    called: list[str] = []

    def handler(name: str) -> Any:
        async def run(args: dict[str, Any], who: Peer) -> str:
            called.append(name)
            return name

        return run

    handlers = guard({"invite": handler("invite"), "send": handler("send")}, OPERATORS)

    async def scenario() -> None:
        assert await handlers["send"]({}, peer(1000)) == "send"
        with pytest.raises(Forbidden, match="group ops"):
            await handlers["invite"]({}, peer(1000))
        assert await handlers["invite"]({}, peer(0)) == "invite"

    asyncio.run(scenario())
    assert called == ["send", "invite"]
