"""The agents a daemon tells apart by uid, read from its config. Shared by mesh and mcp.

A daemon's ``agents`` key is either the directory of installed agent specs
(the default: ``/etc/keel/agents``, ``./.keel/agents`` in dev mode) or an
object by agent name::

    "agents": {"scout": {"user": "keel-agent-scout", "tier": 2,
                         "mesh": {"sendTo": ["*"], "receiveFrom": ["*"],
                                  "topics": ["jobs"]}}}

where ``uid`` may stand for ``user`` (the default user is
``keel-agent-<name>``) and ``mesh`` is the agent's mesh grant
(:mod:`keel.agents.meshgrant`; its tier's default when left out). An agent
that runs as root cannot be told apart from root: it is no agent here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keel import paths
from keel.agents.identity import AgentDirectory, default_user
from keel.agents.meshgrant import MeshGrant, read_grant
from keel.agents.spec import TIERS, load_specs
from keel.config import Section, describe
from keel.errors import ConfigError


@dataclass(frozen=True)
class AgentEntry:
    """One agent as a daemon knows it."""

    name: str
    uid: int
    tier: int
    mesh: MeshGrant


def default_agents_dir() -> Path:
    return (paths.DEV_ROOT if paths.dev_mode() else paths.ETC) / "agents"


def directory_of(entries: Mapping[str, AgentEntry]) -> AgentDirectory:
    """uid -> agent for ``entries`` (``ConfigError`` if two share a uid)."""
    return AgentDirectory({name: entry.uid for name, entry in entries.items()})


def read_agents(cfg: Section, key: str = "agents") -> dict[str, AgentEntry]:
    """``key`` of ``cfg``: a directory of agent specs or an object by agent name, checked."""
    raw = cfg.raw(key, str(default_agents_dir()))
    if isinstance(raw, str):
        entries = _from_specs(Path(raw))
    elif isinstance(raw, dict):
        entries = _inline(cfg, key)
    else:
        raise cfg.error(
            key,
            f"expected a directory of agent specs or an object by agent name, got {describe(raw)}",
        )
    try:
        directory_of(entries)
    except ConfigError as exc:
        raise cfg.error(key, str(exc)) from None
    return entries


def _from_specs(directory: Path) -> dict[str, AgentEntry]:
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    specs = [spec for spec in load_specs(files) if spec.user != "root"]
    users = AgentDirectory.from_users({spec.name: spec.user for spec in specs})
    out: dict[str, AgentEntry] = {}
    for spec in specs:
        uid = users.uid_of(spec.name)
        assert uid is not None
        out[spec.name] = AgentEntry(spec.name, uid, spec.tier, spec.mesh_grant)
    return out


def _inline(cfg: Section, key: str) -> dict[str, AgentEntry]:
    entries: dict[str, AgentEntry] = {}
    with cfg.section(key) as agents:
        for name, agent in agents.sections():
            with agent:
                tier = agent.integer("tier", minimum=min(TIERS), maximum=max(TIERS))
                if "uid" in agent:
                    uid = agent.integer("uid", minimum=1)
                else:
                    user = agent.string("user", default_user(name))
                    uid_of = AgentDirectory.from_users({name: user}).uid_of(name)
                    assert uid_of is not None
                    uid = uid_of
                grant = read_grant(agent).resolve(tier)
                entries[name] = AgentEntry(name, uid, tier, grant)
    return entries
