"""Who may do what through the control socket. Pure.

Callers are told apart by their credentials as the kernel gives them
(``SO_PEERCRED`` and the peer's groups), never by what the client says:

- **agents** (a uid the node's ``agents`` config names, :mod:`keel.agents.roster`)
  may use the mesh only within their grant (:mod:`keel.agents.meshgrant`):
  send to the nodes and agents of ``sendTo`` on their ``topics``, read and
  acknowledge only messages on their ``topics`` from the nodes and agents of
  ``receiveFrom``; a tier-2 agent has no mesh unless its spec declares one.
  :class:`Agents` decides.
- **every other caller** (root, keel's own daemons, the operator's shell) is
  the node itself: it may send and read everything, as before agents were
  told apart.
- the verbs that change the mesh for everyone (invite new members or revoke
  an invite, remove one for good, grant the operator role, join another
  mesh, create or change rooms) are kept for the operators: root, the
  daemon's own user, and the members of the operator group the config names
  (``operator_group``). :class:`Operators` decides.

Topics beginning ``keel.`` (:data:`RESERVED`) are keel's own daemons': no
agent grant covers them, not even ``"*"``, so an agent can neither send on
them nor read, acknowledge or subscribe to them. A node-level caller may
send on behalf of one of the node's agents (``send``'s ``as_agent``): the
agent's ``sendTo`` still decides where it may go (:meth:`Agents.refuse_on_behalf`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from keel.agents.identity import Caller
from keel.agents.meshgrant import MeshGrant
from keel.agents.roster import AgentEntry, directory_of
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

RESERVED = "keel."  # topics for keel's own daemons (the MCP gateway's keel.mcp.*)

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


def agents_only(handlers: Mapping[str, Handler], agents: Agents) -> dict[str, Handler]:
    """``handlers`` for the agents' socket: agents (and root) only, no administration.

    The agents' socket is reachable by every local user (tier-2 sandboxes
    hide ``/run/keel``), so a caller there that is no agent is refused rather
    than taken for the node, as it is on the control socket.
    """

    def only(verb: str, handler: Handler) -> Handler:
        async def check(args: dict[str, Any], peer: Peer) -> Any:
            if peer.uid != 0 and agents.caller(peer).agent is None:
                raise NotPermitted(
                    f"this socket is for the node's agents, and uid {peer.uid} runs none: "
                    "use the node's control socket (docs/mesh.md, Agents)"
                )
            return await handler(args, peer)

        return check

    return {verb: only(verb, h) for verb, h in handlers.items() if verb not in ADMIN_VERBS}


class Agents:
    """The agents a node tells apart, and what each may do on the mesh."""

    def __init__(self, agents: Mapping[str, AgentEntry]) -> None:
        self.entries = dict(agents)
        self.directory = directory_of(agents)

    def announced(self) -> list[str]:
        """The agents this node names to its peers: those that may use the mesh."""
        return sorted(name for name, entry in self.entries.items() if not entry.mesh.empty)

    def caller(self, peer: Peer) -> Caller:
        return self.directory.caller(peer)

    def grant(self, caller: Caller) -> MeshGrant | None:
        """The caller's grant; None for a caller that is no agent (the node itself)."""
        return None if caller.agent is None else self.entries[caller.agent].mesh

    def _agent(self, caller: Caller) -> str:
        entry = self.entries[caller.agent or ""]
        return f"agent {entry.name} (tier {entry.tier}, uid {entry.uid})"

    def refuse_use(self, caller: Caller) -> str | None:
        """Why the caller may not use the mesh at all, or None."""
        grant = self.grant(caller)
        if grant is None or not grant.empty:
            return None
        return (
            f"{self._agent(caller)} has no mesh: declare mesh.topics (and mesh.sendTo, "
            "mesh.receiveFrom) in its spec to grant it (docs/mesh.md, Agents)"
        )

    def refuse_topic(self, caller: Caller, topic: str) -> str | None:
        """Why the caller may not send on or read ``topic``, or None."""
        grant = self.grant(caller)
        if grant is None:
            return None
        if reserved(topic):
            return (
                f"{self._agent(caller)} may not use topic {topic!r}: topics beginning "
                f"{RESERVED!r} are for keel's own daemons, and no agent grant covers them"
            )
        if grant.covers(topic):
            return None
        return self.refuse_use(caller) or (
            f"{self._agent(caller)} may not use topic {topic!r}: its mesh.topics are "
            f"{_listed(grant.topics)}"
        )

    def refuse_send(
        self, caller: Caller, to: Sequence[str], topic: str, *, to_agent: str | None = None
    ) -> str | None:
        """Why the caller may not send on ``topic`` to each node of ``to`` (to the agent
        ``to_agent`` on it, if not None), or None."""
        return self.refuse_topic(caller, topic) or self.refuse_nodes(caller, to, to_agent=to_agent)

    def refuse_nodes(
        self, caller: Caller, to: Sequence[str], *, to_agent: str | None = None
    ) -> str | None:
        """Why the caller may not send to each node of ``to`` (``to_agent`` on it), or None."""
        grant = self.grant(caller)
        if grant is None:
            return None
        for node in to:
            if not grant.may_send_to(node, to_agent):
                whom = node if to_agent is None else f"{to_agent}@{node}"
                return (
                    f"{self._agent(caller)} may not send to {whom}: its mesh.sendTo is "
                    f"{_listed(grant.send_to)}"
                )
        return None

    def refuse_room(
        self, caller: Caller, room: str, members: Iterable[tuple[str, str | None]]
    ) -> str | None:
        """Why the caller may not send to the room ``room`` (its name and id, for the
        message) whose recipients are ``members``, or None.

        ``members``: (node, agent) of each member on another node, the agent
        None for a node in as a whole. A whole node needs ``"*"`` or
        ``NODE_ID`` in the caller's ``sendTo``, a listed agent any entry that
        covers it: an agent reaches through a room no one it may not send to
        directly. The refusal names the first member not covered.
        """
        grant = self.grant(caller)
        if grant is None:
            return None
        for node, agent in members:
            if not grant.may_send_to(node, agent):
                return (
                    f"{self._agent(caller)} may not send to room {room}: its member "
                    f"{_sender(node, agent)} is not covered by its mesh.sendTo, "
                    f"{_listed(grant.send_to)}"
                )
        return None

    def refuse_on_behalf(
        self,
        caller: Caller,
        agent: str,
        to: Sequence[str],
        topic: str,
        *,
        to_agent: str | None = None,
    ) -> tuple[Caller, str | None]:
        """``caller`` sending as the node's ``agent``: that agent as a caller, and why not (or None).

        Only a caller that is the node itself may; the agent's ``sendTo``
        applies, and its ``topics`` too unless the topic is reserved (the
        node's daemons carrying something for the agent, as the MCP gateway
        carries its tool calls).
        """
        if caller.agent is not None:
            return caller, (
                f"{self._agent(caller)} may not send as another agent: as_agent is for the "
                "node's own processes (root, keel's daemons)"
            )
        entry = self.entries.get(agent)
        if entry is None:
            return caller, f"no agent {agent!r} on this node to send as"
        behalf = replace(caller, uid=entry.uid, agent=agent)
        if reserved(topic):
            return behalf, self.refuse_nodes(behalf, to, to_agent=to_agent)
        return behalf, self.refuse_send(behalf, to, topic, to_agent=to_agent)

    def refuse_delivery(
        self, agent: str, topic: str, sender: tuple[str, str | None] | None = None
    ) -> str | None:
        """Why a message from another node for ``agent`` on ``topic`` is refused here, or None.

        ``sender``: (node, agent or None) that sent it, checked against the
        agent's ``receiveFrom``.
        """
        entry = self.entries.get(agent)
        if entry is None:
            return f"no agent {agent} on this node"
        if reserved(topic) or not entry.mesh.covers(topic):
            return f"agent {agent} does not take topic {topic!r} (its mesh.topics)"
        if sender is not None and not entry.mesh.receives(*sender):
            return (
                f"agent {agent} does not receive from {_sender(*sender)} "
                f"(its mesh.receiveFrom is {_listed(entry.mesh.receive_from)})"
            )
        return None

    def senders(self, agent: str | None) -> tuple[str, ...] | None:
        """The ``receiveFrom`` of ``agent`` (None: it receives from everyone, or is no agent)."""
        entry = None if agent is None else self.entries.get(agent)
        if entry is None or entry.mesh.receives_all:
            return None
        return entry.mesh.receive_from

    def refuse_senders(
        self, agent: str, topic: str, refused: Sequence[tuple[str, str | None]]
    ) -> str:
        """The ledger's reason for messages on ``topic`` ``agent`` was not given: their
        senders ``refused`` (node, agent or None) are not in its ``receiveFrom``."""
        entry = self.entries[agent]
        named = ", ".join(_sender(node, by) for node, by in refused)
        return (
            f"agent {agent} (tier {entry.tier}, uid {entry.uid}) is not given messages on "
            f"{topic!r} from {named}: its mesh.receiveFrom is {_listed(entry.mesh.receive_from)} "
            "(they stay for the node's other readers)"
        )

    def reads(self, caller: Caller) -> Callable[[str], bool] | None:
        """Which topics the caller may read (None: every topic, the node itself)."""
        grant = self.grant(caller)
        if grant is None:
            return None
        covers = grant.covers
        return lambda topic: not reserved(topic) and covers(topic)


def reserved(topic: str) -> bool:
    """Whether ``topic`` is keel's own (no agent grant covers it)."""
    return topic.startswith(RESERVED)


def _sender(node: str, agent: str | None) -> str:
    return node if agent is None else f"{agent}@{node}"


def _listed(values: Sequence[str]) -> str:
    return ", ".join(repr(v) for v in values) if values else "empty"
