"""What an agent may do on the mesh: its grant, declared in its spec. Pure.

An agent spec may carry a ``mesh`` section::

    "mesh": {"sendTo": ["*"], "receiveFrom": ["ops@NODE_ID"], "topics": ["jobs", "reports.*"]}

- ``sendTo``: whom the agent may send to, each entry one of

  - ``"*"``: every member of the mesh and every agent on it;
  - ``NODE_ID`` (as ``keel mesh id`` prints it): that node, the whole node:
    the node itself and every agent on it;
  - ``"*@NODE_ID"``: every agent on that node, but not the node itself
    (a message naming no agent);
  - ``"AGENT@NODE_ID"``: that one agent on that node.

  A message to a node (naming no agent) needs ``"*"`` or ``NODE_ID``; a
  message to ``AGENT@NODE_ID`` is allowed by any of the four.
- ``receiveFrom``: whose messages the agent may read, in the same four forms,
  where the agent is the one the sending node stamped on the message (none:
  the node itself sent it, e.g. its operator's shell). A node never sends to
  itself, so every message in an inbox comes from another node: there is no
  ``local`` form. A message the agent may not receive is not delivered to it
  (it stays for the node's other readers; :mod:`keel.mesh.access`).
- ``topics``: the topics it may send on and read, each a topic or a prefix
  ending in ``*`` (``"reports.*"`` is every topic starting ``reports.``;
  ``"*"`` alone is every topic).

A key left out takes its tier's default: tiers 0 and 1 may send to and
receive from everyone on every topic; **tier 2 has no mesh** unless its spec
declares it, key by key (a tier-2 spec declaring only ``topics`` may neither
send nor receive). A declared empty list means nothing. The mesh node
enforces the grant on its control socket, knowing the agent from the kernel
(``SO_PEERCRED``), never from what the client says (``docs/mesh.md``, "Agents").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from keel.config import Section, describe
from keel.errors import ConfigError
from keel.mesh.ids import check_topic, is_agent_name, is_node_id

EVERYTHING: Final = "*"


def check_topic_pattern(pattern: object) -> str | None:
    """Why ``pattern`` is no topic pattern (``"*"``, a topic, or a prefix ending ``*``), or None."""
    if pattern == EVERYTHING:
        return None
    if not isinstance(pattern, str):
        return f"{describe(pattern)}: expected a topic, a prefix ending in '*', or '*'"
    try:
        check_topic(pattern[:-1] if pattern.endswith("*") else pattern)
    except ValueError as exc:
        return f"{exc} (a pattern may end in '*')"
    return None


def check_peer_pattern(pattern: object) -> str | None:
    """Why ``pattern`` is no ``sendTo``/``receiveFrom`` entry, or None.

    One of ``"*"``, ``NODE_ID``, ``"*@NODE_ID"`` or ``"AGENT@NODE_ID"``.
    """
    if pattern == EVERYTHING or is_node_id(pattern):
        return None
    if isinstance(pattern, str) and "@" in pattern:
        agent, _, node = pattern.rpartition("@")
        if not is_node_id(node):
            return f"{describe(pattern)}: {describe(node)} after '@' is not a node id"
        if agent != EVERYTHING and not is_agent_name(agent):
            return (
                f"{describe(pattern)}: {describe(agent)} before '@' is not an agent's name "
                "(1 to 20 of a-z, 0-9, '_' and '-', a letter first) or '*'"
            )
        return None
    return (
        f"{describe(pattern)}: expected '*', a node id (as `keel mesh id` prints it), "
        "'*@NODE_ID' or 'AGENT@NODE_ID'"
    )


def matches(patterns: Iterable[str], node: str, agent: str | None) -> bool:
    """Whether ``patterns`` (``sendTo``/``receiveFrom`` entries) cover ``agent`` on ``node``.

    ``agent`` None is the node itself (a message naming no agent): only
    ``"*"`` and ``NODE_ID`` cover it.
    """
    for pattern in patterns:
        if pattern in (EVERYTHING, node):
            return True
        if agent is not None and pattern in (f"*@{node}", f"{agent}@{node}"):
            return True
    return False


@dataclass(frozen=True)
class MeshGrant:
    """An agent's mesh grant, tier defaults applied (see the module's docstring)."""

    send_to: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    receive_from: tuple[str, ...] = ()

    @classmethod
    def default(cls, tier: int) -> MeshGrant:
        """What an agent of ``tier`` may do when its spec declares nothing."""
        return cls() if tier >= 2 else cls((EVERYTHING,), (EVERYTHING,), (EVERYTHING,))

    @classmethod
    def resolve(
        cls,
        tier: int,
        send_to: Iterable[str] | None,
        topics: Iterable[str] | None,
        receive_from: Iterable[str] | None = None,
    ) -> MeshGrant:
        """The declared keys, the tier's default for those left out (None)."""
        base = cls.default(tier)
        return cls(
            base.send_to if send_to is None else tuple(dict.fromkeys(send_to)),
            base.topics if topics is None else tuple(dict.fromkeys(topics)),
            base.receive_from if receive_from is None else tuple(dict.fromkeys(receive_from)),
        )

    @property
    def empty(self) -> bool:
        """No mesh at all: the agent may neither send nor read."""
        return not self.topics

    def may_send_to(self, node: str, agent: str | None = None) -> bool:
        """Whether the agent may send to ``node`` (``agent`` on it, if not None)."""
        return matches(self.send_to, node, agent)

    def receives(self, node: str, agent: str | None) -> bool:
        """Whether the agent may read what ``agent`` on ``node`` (None: the node) sent."""
        return matches(self.receive_from, node, agent)

    @property
    def receives_all(self) -> bool:
        return EVERYTHING in self.receive_from

    def covers(self, topic: str) -> bool:
        """Whether ``topic`` is one of the agent's topics."""
        for pattern in self.topics:
            if pattern.endswith("*"):
                if topic.startswith(pattern[:-1]):
                    return True
            elif topic == pattern:
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "sendTo": list(self.send_to),
            "receiveFrom": list(self.receive_from),
            "topics": list(self.topics),
        }


@dataclass(frozen=True)
class DeclaredGrant:
    """A spec's ``mesh`` section as written (None: the key was left out)."""

    send_to: tuple[str, ...] | None = None
    topics: tuple[str, ...] | None = None
    receive_from: tuple[str, ...] | None = None

    def resolve(self, tier: int) -> MeshGrant:
        return MeshGrant.resolve(tier, self.send_to, self.topics, self.receive_from)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.send_to is not None:
            out["sendTo"] = list(self.send_to)
        if self.receive_from is not None:
            out["receiveFrom"] = list(self.receive_from)
        if self.topics is not None:
            out["topics"] = list(self.topics)
        return out


def read_grant(spec: Section) -> DeclaredGrant:
    """A spec's optional ``mesh`` section; ``ConfigError`` naming the key on bad values."""
    with spec.section("mesh", optional=True) as mesh:
        send_to = _list(mesh, "sendTo", check_peer_pattern)
        receive_from = _list(mesh, "receiveFrom", check_peer_pattern)
        topics = _list(mesh, "topics", check_topic_pattern)
    return DeclaredGrant(send_to, topics, receive_from)


def _list(section: Section, key: str, check: Any) -> tuple[str, ...] | None:
    if key not in section:
        return None
    values = section.strings(key)
    for i, value in enumerate(values):
        if (problem := check(value)) is not None:
            raise ConfigError(f"{section.source}: {section.key_path(key)}[{i}]: {problem}")
    return tuple(dict.fromkeys(values))
