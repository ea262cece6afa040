"""Which agent is calling: from the kernel, never from what the client says.

An agent's identity in the kernel is its system user (``keel-agent-<name>``
unless its spec names another; two sandboxed agents never share one). A
daemon that serves agents on a Unix socket (the mesh, mcp) reads the peer's
uid with ``SO_PEERCRED`` (:class:`keel.api.Peer`) and asks an
:class:`AgentDirectory`, built from the agents it was configured with, which
agent that uid runs. A uid that runs no agent is a :class:`Caller` with
``agent=None``: root (the operator's shell, keel's own daemons) or another
process, and the daemon's policy decides what such callers may do.
"""

from __future__ import annotations

import pwd
from collections.abc import Mapping
from dataclasses import dataclass

from keel.api import Peer
from keel.errors import ConfigError

AGENT_USER_PREFIX = "keel-agent-"


def default_user(agent: str) -> str:
    """The system user an agent runs as unless its spec names another."""
    return AGENT_USER_PREFIX + agent


@dataclass(frozen=True)
class Caller:
    """The process on the other end of a socket, named as keel knows it."""

    pid: int
    uid: int
    gid: int
    agent: str | None

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def describe(self) -> str:
        """``agent scout (uid 1001)``, ``root (pid 42)``, ``uid 1000 (not an agent)``."""
        if self.agent is not None:
            return f"agent {self.agent} (uid {self.uid})"
        if self.is_root:
            return f"root (pid {self.pid})"
        return f"uid {self.uid} (not an agent)"


class AgentDirectory:
    """uid -> agent, for the agents one daemon knows."""

    def __init__(self, uids: Mapping[str, int]) -> None:
        by_uid: dict[int, str] = {}
        for agent, uid in sorted(uids.items()):
            if uid == 0:
                raise ConfigError(f"agent {agent!r}: runs as root, so it cannot be told apart")
            other = by_uid.get(uid)
            if other is not None:
                raise ConfigError(
                    f"agents {other!r} and {agent!r} run as the same uid {uid}, so they "
                    "cannot be told apart: give each agent its own user"
                )
            by_uid[uid] = agent
        self._by_uid = by_uid
        self._by_agent = {agent: uid for uid, agent in by_uid.items()}

    @classmethod
    def from_users(cls, users: Mapping[str, str]) -> AgentDirectory:
        """Look up each agent's user (``agent -> user name``) in the system's user database."""
        uids: dict[str, int] = {}
        missing: list[str] = []
        for agent, user in users.items():
            try:
                uids[agent] = pwd.getpwnam(user).pw_uid
            except KeyError:
                missing.append(f"{agent} ({user})")
        if missing:
            raise ConfigError(
                "no such user for agent(s) " + ", ".join(sorted(missing)) + ": install the "
                "agents first (`keel agents install`, or services.keel.agents on NixOS)"
            )
        return cls(uids)

    def __contains__(self, agent: object) -> bool:
        return agent in self._by_agent

    def agents(self) -> list[str]:
        return sorted(self._by_agent)

    def uid_of(self, agent: str) -> int | None:
        return self._by_agent.get(agent)

    def agent_of(self, uid: int) -> str | None:
        return self._by_uid.get(uid)

    def caller(self, peer: Peer) -> Caller:
        return Caller(peer.pid, peer.uid, peer.gid, self.agent_of(peer.uid))
