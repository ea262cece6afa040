"""Control verbs across the fleet: who may ask, and what may be asked. Pure.

A node carries out a command from another node only if that node is one of
its *operators*. The node that acts decides, from its own configuration
(``operators`` in ``fleet.json``, ``services.keel.fleet.operators`` in Nix),
never from anything the asking node says about itself: a node cannot make
itself an operator of another. The mesh authenticates which node asked.

Commands on agents go to the acting node's watch: ``stop`` (and keep
stopped), ``start`` (also lifts a quarantine) and ``restart`` (a stop, then a
start).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keel.errors import BadRequest, Forbidden

AGENT_VERBS = ("restart", "stop", "start")
_AGENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}")


@dataclass(frozen=True)
class AgentCommand:
    verb: str
    agent: str

    def describe(self) -> str:
        return f"{self.verb} {self.agent}"

    def to_json(self) -> dict[str, Any]:
        return {"verb": self.verb, "agent": self.agent}


def parse_command(body: Mapping[str, Any]) -> AgentCommand:
    """A command from a request body; :class:`BadRequest` naming the problem."""
    verb = body.get("verb")
    if verb not in AGENT_VERBS:
        raise BadRequest(f"unknown command {str(verb)[:40]!r} (known: {', '.join(AGENT_VERBS)})")
    agent = body.get("agent")
    if not isinstance(agent, str) or not _AGENT.fullmatch(agent):
        raise BadRequest(
            f"{str(agent)[:70]!r} is not an agent name (letters, digits, '_', '.', '@', '-')"
        )
    unknown = sorted(set(body) - {"verb", "agent"})
    if unknown:
        raise BadRequest(f"unknown key {unknown[0][:40]!r} in a command")
    return AgentCommand(str(verb), agent)


def authorize(
    sender: str,
    operators: frozenset[str],
    here: str,
    mesh_operators: frozenset[str] | None = None,
) -> None:
    """Refuse (:class:`Forbidden`) a command from ``sender`` unless it is an operator here.

    ``operators``: this node's own declaration. ``mesh_operators``: the mesh's
    operator nodes as this node's signed membership records have them, or
    None when this node does not take those (``mesh_operators`` false).
    """
    if sender in operators or (mesh_operators is not None and sender in mesh_operators):
        return
    why = (
        "and it is no operator node of the mesh"
        if mesh_operators is not None
        else "(this node does not take the mesh's operator nodes: mesh_operators is false)"
    )
    raise Forbidden(
        f"node {sender} is not an operator of node {here}: "
        f"its fleet config's `operators` does not name it {why}"
    )
