"""What an agent may do on the mesh: its grant, declared in its spec. Pure.

An agent spec may carry a ``mesh`` section::

    "mesh": {"sendTo": ["*"], "topics": ["jobs", "reports.*"]}

- ``sendTo``: the nodes the agent may send to, as node ids, or ``"*"`` for
  every member of the mesh;
- ``topics``: the topics it may send on and read, each a topic or a prefix
  ending in ``*`` (``"reports.*"`` is every topic starting ``reports.``;
  ``"*"`` alone is every topic).

A key left out takes its tier's default: tiers 0 and 1 may send to every
node on every topic; **tier 2 has no mesh** unless its spec declares it. A
declared empty list means nothing. The mesh node enforces the grant on its
control socket, knowing the agent from the kernel (``SO_PEERCRED``), never
from what the client says (``docs/mesh.md``, "Agents").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from keel.config import Section, describe
from keel.errors import ConfigError
from keel.mesh.ids import check_topic, is_node_id

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


def check_node_pattern(pattern: object) -> str | None:
    """Why ``pattern`` is neither a node id nor ``"*"``, or None."""
    if pattern == EVERYTHING or is_node_id(pattern):
        return None
    return f"{describe(pattern)}: expected a node id (as `keel mesh id` prints it) or '*'"


@dataclass(frozen=True)
class MeshGrant:
    """An agent's mesh grant, tier defaults applied (see the module's docstring)."""

    send_to: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()

    @classmethod
    def default(cls, tier: int) -> MeshGrant:
        """What an agent of ``tier`` may do when its spec declares nothing."""
        return cls() if tier >= 2 else cls((EVERYTHING,), (EVERYTHING,))

    @classmethod
    def resolve(
        cls, tier: int, send_to: Iterable[str] | None, topics: Iterable[str] | None
    ) -> MeshGrant:
        """The declared keys, the tier's default for those left out (None)."""
        base = cls.default(tier)
        return cls(
            base.send_to if send_to is None else tuple(dict.fromkeys(send_to)),
            base.topics if topics is None else tuple(dict.fromkeys(topics)),
        )

    @property
    def empty(self) -> bool:
        """No mesh at all: the agent may neither send nor read."""
        return not self.topics

    def may_send_to(self, node: str) -> bool:
        return EVERYTHING in self.send_to or node in self.send_to

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
        return {"sendTo": list(self.send_to), "topics": list(self.topics)}


@dataclass(frozen=True)
class DeclaredGrant:
    """A spec's ``mesh`` section as written (None: the key was left out)."""

    send_to: tuple[str, ...] | None = None
    topics: tuple[str, ...] | None = None

    def resolve(self, tier: int) -> MeshGrant:
        return MeshGrant.resolve(tier, self.send_to, self.topics)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.send_to is not None:
            out["sendTo"] = list(self.send_to)
        if self.topics is not None:
            out["topics"] = list(self.topics)
        return out


def read_grant(spec: Section) -> DeclaredGrant:
    """A spec's optional ``mesh`` section; ``ConfigError`` naming the key on bad values."""
    with spec.section("mesh", optional=True) as mesh:
        send_to = _list(mesh, "sendTo", check_node_pattern)
        topics = _list(mesh, "topics", check_topic_pattern)
    return DeclaredGrant(send_to, topics)


def _list(section: Section, key: str, check: Any) -> tuple[str, ...] | None:
    if key not in section:
        return None
    values = section.strings(key)
    for i, value in enumerate(values):
        if (problem := check(value)) is not None:
            raise ConfigError(f"{section.source}: {section.key_path(key)}[{i}]: {problem}")
    return tuple(dict.fromkeys(values))
