"""Reading ``mesh.json``, the config ``keel mesh serve --config FILE`` runs on.

Every key but ``listen`` has a default (``docs/mesh.md`` lists them all;
``agents``, the agents told apart on the control socket, defaults to the
installed agent specs: :mod:`keel.agents.roster`)::

    {"listen": "0.0.0.0:7400", "directory": "/var/lib/keel/mesh",
     "socket": "/run/keel/mesh.sock", "ledger": "/var/lib/keel/ledger.db",
     "checkpoint_every": 300, "operator_group": "keel-operators",
     "handshake_timeout": 10, "keepalive_interval": 15, "idle_timeout": 60,
     "rekey_interval": 120, "default_ttl": 86400, "ack_timeout": 10,
     "retry_base": 1, "retry_cap": 60, "dial_base": 0.5, "dial_cap": 30,
     "connect_timeout": 5, "max_handshakes": 64, "max_handshakes_per_address": 8,
     "lease": 30, "max_outbox_per_peer": 10000, "max_outbox": 100000,
     "max_outbox_bytes": 268435456, "max_inbox": 100000,
     "max_inbox_bytes": 268435456, "window_messages": 4096,
     "window_bytes": 16777216, "durability": "normal", "keep_dead_letters": 10000}

``socket``, ``ledger`` and ``checkpoint_every`` are read as every daemon reads
them (:func:`keel.service.read_common`). Unknown keys and bad values stop the
start with a message naming the key; nothing is half-started.
"""

from __future__ import annotations

import grp
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from keel import paths
from keel.agents.roster import read_agents
from keel.config import Section, describe
from keel.errors import UsageError
from keel.mesh.access import Agents, Operators
from keel.mesh.delivery import DEFAULT_TTL, InboxLimits, Limits
from keel.mesh.session import SessionConfig
from keel.service import Common, read_common

DEFAULT_PORT = 7400


@dataclass(frozen=True)
class Settings:
    """Timeouts and limits of a running node."""

    session: SessionConfig
    limits: Limits
    inbox: InboxLimits
    default_ttl: float = DEFAULT_TTL
    lease: float = 30.0
    dial_base: float = 0.5
    dial_cap: float = 30.0
    connect_timeout: float = 5.0
    max_handshakes: int = 64
    max_handshakes_per_address: int = 8
    durability: str = "normal"
    keep_dead_letters: int = 10_000  # the newest kept; older ones are deleted
    operator_group: str | None = None
    operator_gid: int | None = None
    agents: Agents = field(default_factory=lambda: Agents({}))

    def operators(self) -> Operators:
        """Who may administer the mesh through the control socket."""
        return Operators(os.getuid(), self.operator_group, self.operator_gid)


@dataclass(frozen=True)
class MeshConfig:
    """mesh.json, checked."""

    source: str
    common: Common  # socket, ledger, checkpoint_every: read as every daemon reads them
    directory: Path  # the node's identity.key and state.db
    listen: tuple[str, int]
    settings: Settings
    agent_socket: Path | None = None  # the agents' own socket (outside /run/keel), if any


def load(path: Path) -> MeshConfig:
    """Read and check ``path``; :class:`~keel.errors.ConfigError` names the key on any problem."""
    with Section.load(path) as cfg:
        return parse(cfg)


def parse(cfg: Section) -> MeshConfig:
    common = read_common(cfg, "mesh")
    directory = cfg.filepath("directory", default=str(paths.state_dir() / "mesh"))
    text = cfg.string("listen")
    try:
        listen = parse_listen(text)
    except UsageError as exc:
        raise cfg.error("listen", str(exc)) from None
    agent_socket = cfg.filepath("agent_socket") if cfg.raw("agent_socket", None) else None
    if agent_socket is not None and agent_socket == common.socket:
        raise cfg.error("agent_socket", "must differ from socket")
    return MeshConfig(cfg.source, common, directory, listen, _settings(cfg), agent_socket)


def _settings(cfg: Section) -> Settings:
    keepalive = cfg.number("keepalive_interval", 15.0, positive=True)
    idle = cfg.number("idle_timeout", 60.0, positive=True)
    if idle <= keepalive:
        raise cfg.error("idle_timeout", "must exceed keepalive_interval")
    session = SessionConfig(
        handshake_timeout=cfg.number("handshake_timeout", 10.0, positive=True),
        keepalive_interval=keepalive,
        idle_timeout=idle,
        rekey_interval=cfg.number("rekey_interval", 120.0, positive=True),
    )
    retry_base = cfg.number("retry_base", 1.0, positive=True)
    retry_cap = cfg.number("retry_cap", 60.0, positive=True)
    if retry_base > retry_cap:
        raise cfg.error("retry_base", "must not exceed retry_cap")
    limits = Limits(
        max_per_peer=cfg.integer("max_outbox_per_peer", 10_000, minimum=1),
        max_total=cfg.integer("max_outbox", 100_000, minimum=1),
        max_bytes=cfg.integer("max_outbox_bytes", 256 << 20, minimum=1),
        window_messages=cfg.integer("window_messages", 4096, minimum=1),
        window_bytes=cfg.integer("window_bytes", 16 << 20, minimum=1),
        ack_timeout=cfg.number("ack_timeout", 10.0, positive=True),
        retry_base=retry_base,
        retry_cap=retry_cap,
    )
    inbox = InboxLimits(
        max_messages=cfg.integer("max_inbox", 100_000, minimum=1),
        max_bytes=cfg.integer("max_inbox_bytes", 256 << 20, minimum=1),
    )
    group = cfg.string("operator_group", None)
    gid = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise cfg.error("operator_group", f"no group {describe(group)} on this host") from None
    settings = Settings(
        session,
        limits,
        inbox,
        default_ttl=cfg.number("default_ttl", DEFAULT_TTL, positive=True),
        lease=cfg.number("lease", 30.0, positive=True),
        dial_base=cfg.number("dial_base", 0.5, positive=True),
        dial_cap=cfg.number("dial_cap", 30.0, positive=True),
        connect_timeout=cfg.number("connect_timeout", 5.0, positive=True),
        max_handshakes=cfg.integer("max_handshakes", 64, minimum=1),
        max_handshakes_per_address=cfg.integer("max_handshakes_per_address", 8, minimum=1),
        durability=cfg.choice("durability", ["full", "normal"], "normal"),
        keep_dead_letters=cfg.integer("keep_dead_letters", 10_000, minimum=1),
        operator_group=group,
        operator_gid=gid,
        agents=Agents(read_agents(cfg)),
    )
    if settings.dial_base > settings.dial_cap:
        raise cfg.error("dial_base", "must not exceed dial_cap")
    return settings


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); ``UsageError`` naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise UsageError(
            f"{describe(text)}: expected HOST:PORT, e.g. 0.0.0.0:{DEFAULT_PORT} or [::]:{DEFAULT_PORT}"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{describe(text)}: HOST must be an IP address") from None
    return host, int(port)
