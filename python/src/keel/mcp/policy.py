"""Who may use which tool: the gateway's policy, pure.

The gateway names each caller from the kernel (a local agent, by its uid) or,
for calls relayed across the mesh, as the mesh authenticated it (a node and
the agent that node vouches for). :class:`Policy` answers, from the server
specs' ``share`` grants and the local agents' tiers alone:

- which of a server's tools a caller sees (``tools/list`` shows only those);
- whether a caller may call one (``tools/call`` of anything else is refused,
  with the reason).

Rules (docs/mcp.md, "Who sees which tool"):

1. Nothing is shared unless a grant says so; an empty list is nobody.
2. A grant without ``nodes`` is for this node's agents; one with ``nodes`` for
   agents on those nodes of the mesh only. ``"agents": "*"`` is every agent,
   never a process that is no agent (root, other users).
3. A server keel runs at a looser tier than the calling agent's (a tier-0
   server, a tier-2 agent) would let the agent act outside its sandbox: such a
   grant needs ``allowLowerTier``. Named in a grant, the combination is a
   config error; through ``"*"`` the agent just does not get the tools.

The gateway shows a tool as ``SERVER.TOOL`` (:func:`qualified`), so two
servers may have tools of one name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from keel.errors import ConfigError
from keel.mcp.spec import Grant, ServerSpec

SEPARATOR = "."


@dataclass(frozen=True)
class Principal:
    """A caller as the gateway knows it: never from what the client says."""

    agent: str | None  # None: a process that is no agent (root, another user)
    node: str | None = None  # None: this node; else the mesh node it called from
    uid: int | None = None  # local callers: their uid, for messages

    def describe(self) -> str:
        if self.agent is None:
            if self.node is not None:
                return f"a process of node {self.node} that is no agent"
            where = f"uid {self.uid}" if self.uid is not None else "an unknown caller"
            return f"{where} (not a keel agent)"
        if self.node is None:
            return f"agent {self.agent}"
        return f"agent {self.agent}@{self.node}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


ALLOWED = Decision(True)


def qualified(server: str, tool: str) -> str:
    """The name agents see: ``files.read``."""
    return f"{server}{SEPARATOR}{tool}"


def split(name: str) -> tuple[str, str] | None:
    """``files.read`` -> (``files``, ``read``); None when there is no server part."""
    server, sep, tool = name.partition(SEPARATOR)
    if not sep or not server or not tool:
        return None
    return server, tool


class Policy:
    """The share grants of every server, checked against the local agents' tiers."""

    def __init__(self, servers: Mapping[str, ServerSpec], agent_tiers: Mapping[str, int]) -> None:
        self.servers = dict(servers)
        self.agent_tiers = dict(agent_tiers)
        for spec in self.servers.values():
            for index, grant in enumerate(spec.share):
                if grant.remote or grant.agents is None or grant.allow_lower_tier:
                    continue
                for agent in sorted(grant.agents):
                    problem = self._tier_problem(spec, agent)
                    if problem is not None:
                        where = spec.source or f"MCP server {spec.name!r}"
                        raise ConfigError(
                            f"{where}: share[{index}].agents: {problem}; run the server at "
                            f"tier {self.agent_tiers[agent]} or set allowLowerTier on the grant"
                        )

    def _tier_problem(self, spec: ServerSpec, agent: str) -> str | None:
        agent_tier = self.agent_tiers.get(agent)
        if spec.tier is None or agent_tier is None or agent_tier <= spec.tier:
            return None
        return (
            f"{spec.name} runs at tier {spec.tier} and agent {agent} at tier {agent_tier}: "
            "through it the agent would act outside its sandbox"
        )

    def _matches(self, grant: Grant, spec: ServerSpec, who: Principal) -> bool:
        if who.agent is None:
            return False
        if who.node is None:
            if grant.remote or who.agent not in self.agent_tiers:
                return False
            if grant.agents is not None and who.agent not in grant.agents:
                return False
            return grant.allow_lower_tier or self._tier_problem(spec, who.agent) is None
        if not grant.remote:
            return False
        if grant.nodes is not None and who.node not in grant.nodes:
            return False
        return grant.agents is None or who.agent in grant.agents

    def granted(self, who: Principal, server: str) -> frozenset[str] | None:
        """The tools of ``server`` granted to ``who``: None for all, else the names (maybe none)."""
        spec = self.servers.get(server)
        if spec is None:
            return frozenset()
        tools: set[str] = set()
        for grant in spec.share:
            if self._matches(grant, spec, who):
                if grant.tools is None:
                    return None
                tools |= grant.tools
        return frozenset(tools)

    def visible(self, who: Principal, server: str, tools: Iterable[str]) -> list[str]:
        """Of the tools ``server`` offers, those ``who`` sees, in the server's order."""
        granted = self.granted(who, server)
        return [tool for tool in tools if granted is None or tool in granted]

    def may_call(self, who: Principal, server: str, tool: str) -> Decision:
        """May ``who`` call ``tool`` of ``server``? If not, the reason, for the caller."""
        if who.agent is None:
            return Decision(
                False,
                f"{who.describe()} may use no tool: the gateway serves keel agents, "
                "named by their uid (operators use `keel mcp call`)",
            )
        spec = self.servers.get(server)
        if spec is None:
            return Decision(False, f"no MCP server named {server!r} on this node")
        granted = self.granted(who, server)
        if granted is None or tool in granted:
            return ALLOWED
        if who.node is None and who.agent in self.agent_tiers:
            problem = self._tier_problem(spec, who.agent)
            if problem is not None and any(
                not g.remote and (g.tools is None or tool in g.tools) for g in spec.share
            ):
                return Decision(False, f"{qualified(server, tool)} is not yours to use: {problem}")
        return Decision(
            False,
            f"{qualified(server, tool)} is not shared with {who.describe()} "
            f"(the share list of MCP server {server!r} decides)",
        )

    def shared_with(self, server: str) -> list[dict[str, object]]:
        """The grants of ``server`` in their JSON form (``keel mcp list``)."""
        spec = self.servers.get(server)
        return [] if spec is None else [grant.to_json() for grant in spec.share]

    def agents_seeing(self, server: str) -> list[str]:
        """The local agents that see at least one tool of ``server``."""
        return [
            agent
            for agent in sorted(self.agent_tiers)
            if self.granted(Principal(agent), server) != frozenset()
        ]
