"""Who may administer the mesh through the control socket. Pure.

Any process that can open the control socket (``/run/keel/mesh.sock``) may
send, receive and read the node's state. The verbs that change the mesh for
everyone (invite new members or revoke an invite, remove one for good, grant
the operator role, join another mesh, create or change rooms) are kept for
the operators: root, the daemon's own
user, and the members of the operator group the config names
(``operator_group``), decided from the caller's credentials as the kernel
gives them (``SO_PEERCRED`` and the peer's groups), never from what the
client says. Agents become identities
of their own in a later step; until then this is the line between an agent
and its operator.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from keel.api import Peer
from keel.errors import Forbidden

ADMIN_VERBS = frozenset(
    {
        "invite",
        "revoke_invite",
        "join",
        "remove",
        "operator",
        "room_create",
        "room_add",
        "room_remove",
    }
)

Handler = Callable[[dict[str, Any], Peer], Awaitable[Any]]


class NotPermitted(Forbidden):
    """The caller may not use this verb (answered as ``forbidden``)."""


@dataclass(frozen=True)
class Operators:
    """Who may use the administrative verbs: root, ``daemon_uid``, members of ``gid``."""

    daemon_uid: int
    group: str | None = None  # the operator group's name, for messages
    gid: int | None = None

    def permits(self, peer: Peer) -> bool:
        if peer.uid in (0, self.daemon_uid):
            return True
        return self.gid is not None and (peer.gid == self.gid or self.gid in peer.groups)

    def refusal(self, verb: str, peer: Peer) -> str | None:
        """Why ``peer`` may not use ``verb`` (one line), or None if it may."""
        if verb not in ADMIN_VERBS or self.permits(peer):
            return None
        if self.group is not None:
            return (
                f"`{verb}` needs root or membership of group {self.group} (you are uid {peer.uid})"
            )
        owner = "root" if self.daemon_uid == 0 else f"root or uid {self.daemon_uid}, the daemon's"
        return (
            f"`{verb}` needs {owner} (you are uid {peer.uid}); an operator group may be "
            'named with "operator_group" in the node\'s config file'
        )


def guard(handlers: Mapping[str, Handler], operators: Operators) -> dict[str, Handler]:
    """``handlers`` with the administrative ones refusing callers who are not operators."""

    def guarded(verb: str, handler: Handler) -> Handler:
        async def check(args: dict[str, Any], peer: Peer) -> Any:
            refusal = operators.refusal(verb, peer)
            if refusal is not None:
                raise NotPermitted(refusal)
            return await handler(args, peer)

        return check

    return {
        verb: guarded(verb, handler) if verb in ADMIN_VERBS else handler
        for verb, handler in handlers.items()
    }
