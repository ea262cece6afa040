"""Reading ``mcp.json``, the gateway's config (documented in ``docs/mcp.md``).

Everything is checked before the gateway starts anything: the keys every
daemon shares (``socket``, ``ledger``, ``checkpoint_every``), where agents
connect, the MCP servers (inline, or a directory of spec files), the agents
the gateway tells apart by uid (inline, or the installed agent specs), and the
policy those make (:class:`~keel.mcp.policy.Policy`, which refuses a grant
that would let an agent out of its tier). Each error names the file and key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from keel import paths
from keel.agents.identity import AgentDirectory
from keel.agents.roster import AgentEntry, directory_of, read_agents
from keel.config import Section, describe, type_name
from keel.mcp.policy import Policy
from keel.mcp.spec import (
    ServerSpec,
    check_node,
    check_server_name,
    load_server_specs,
    names_or_any,
    parse_server_spec,
)
from keel.mcp.wire import DEFAULT_MAX_MESSAGE, DEFAULT_WRITE_TIMEOUT
from keel.service import Common, read_common

TOP_LEVEL_KEYS = (
    "agents",
    "checkpoint_every",
    "http",
    "ledger",
    "listen",
    "max_connections",
    "max_message",
    "mesh",
    "node",
    "remote",
    "servers",
    "socket",
    "sockets",
    "unavailable_wait",
    "write_timeout",
)


def default_listen() -> Path:
    """Where agents connect: outside /run/keel, which tier-2 sandboxes hide."""
    return (
        paths.DEV_ROOT / "run" / "mcp-agents.sock"
        if paths.dev_mode()
        else Path("/run/keel-mcp/mcp.sock")
    )


def default_sockets() -> Path:
    """The directory of the stdio servers' sockets (``<name>.sock``)."""
    return paths.runtime_dir() / "mcp"


def default_servers_dir() -> Path:
    return (paths.DEV_ROOT if paths.dev_mode() else paths.ETC) / "mcp" / "servers"


LABEL = re.compile(r"[a-z][a-z0-9_-]{0,22}\Z")  # a remote node's label, like a server's name
DEFAULT_DEADLINE = 10.0  # s a call to another node's tool may take, there and back
DEFAULT_LIST_TTL = 30.0  # s a remote node's tools/list answer is kept
MAX_DEADLINE = 3600.0


@dataclass(frozen=True)
class MeshLink:
    """``mesh``: how the gateway reaches the node's mesh daemon for remote tools."""

    socket: Path
    deadline: float
    list_ttl: float


@dataclass(frozen=True)
class Remote:
    """One entry of ``remote``: the tools of ``servers`` on ``node``, shown as ``LABEL.SERVER.TOOL``."""

    label: str
    node: str
    servers: frozenset[str] | None  # None: every server the node shares

    def offers(self, server: str) -> bool:
        return self.servers is None or server in self.servers


@dataclass(frozen=True)
class McpConfig:
    """mcp.json, checked."""

    source: str
    common: Common
    listen: Path
    http: Path | None
    sockets: Path
    servers: dict[str, ServerSpec]
    agents: dict[str, AgentEntry]
    node: str | None
    max_message: int
    max_connections: int
    write_timeout: float
    unavailable_wait: float
    policy: Policy
    mesh: MeshLink
    remote: dict[str, Remote]

    @property
    def hosts_for_mesh(self) -> bool:
        """Whether any server shares tools with other nodes (the gateway then reads the mesh)."""
        return any(grant.remote for spec in self.servers.values() for grant in spec.share)

    @property
    def directory(self) -> AgentDirectory:
        return directory_of(self.agents)

    def socket_of(self, server: str) -> Path:
        return self.sockets / f"{server}.sock"


def load(path: Path) -> McpConfig:
    with Section.load(path) as cfg:
        return parse(cfg)


def parse(cfg: Section) -> McpConfig:
    unknown = sorted(set(cfg.keys()) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise cfg.error(unknown[0], f"unknown key (known keys here: {', '.join(TOP_LEVEL_KEYS)})")
    common = read_common(cfg, "mcp")
    listen = cfg.filepath("listen", default=str(default_listen()))
    http = cfg.filepath("http") if cfg.raw("http", None) is not None else None
    sockets = cfg.filepath("sockets", default=str(default_sockets()))
    node = cfg.string("node", None)
    max_message = cfg.integer("max_message", DEFAULT_MAX_MESSAGE, minimum=1024)
    max_connections = cfg.integer("max_connections", 1024, minimum=1)
    write_timeout = cfg.number("write_timeout", DEFAULT_WRITE_TIMEOUT, positive=True)
    unavailable_wait = cfg.number("unavailable_wait", 0.5, minimum=0, maximum=1.0)
    servers = _servers(cfg)
    agents = read_agents(cfg)
    policy = Policy(servers, {name: entry.tier for name, entry in agents.items()})
    mesh = cfg.parse("mesh", _mesh) if cfg.raw("mesh", None) is not None else _mesh(None)
    remote = _remote(cfg, servers)
    return McpConfig(
        source=cfg.source,
        common=common,
        listen=listen,
        http=http,
        sockets=sockets,
        servers=servers,
        agents=agents,
        node=node,
        max_message=max_message,
        max_connections=max_connections,
        write_timeout=write_timeout,
        unavailable_wait=unavailable_wait,
        policy=policy,
        mesh=mesh,
        remote=remote,
    )


def _mesh(section: Section | None) -> MeshLink:
    """``mesh``: ``socket`` (the mesh's control socket), ``deadline``, ``list_ttl``."""
    default_socket = str(paths.socket_file("mesh"))
    if section is None:
        return MeshLink(Path(default_socket), DEFAULT_DEADLINE, DEFAULT_LIST_TTL)
    return MeshLink(
        socket=section.filepath("socket", default=default_socket),
        deadline=section.number("deadline", DEFAULT_DEADLINE, positive=True, maximum=MAX_DEADLINE),
        list_ttl=section.number("list_ttl", DEFAULT_LIST_TTL, minimum=0, maximum=86_400),
    )


def _remote(cfg: Section, servers: dict[str, ServerSpec]) -> dict[str, Remote]:
    """``remote``: ``{LABEL: {"node": NODE_ID, "servers": "*" or [names]}}``."""
    raw = cfg.raw("remote", None)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise cfg.error(
            "remote", f"expected an object of remote nodes by label, got {type_name(raw)}"
        )
    remote: dict[str, Remote] = {}
    with cfg.section("remote") as section:
        for label, entry in section.sections():
            if not LABEL.match(label):
                raise section.error(
                    label,
                    f"{describe(label)} is not a valid label: 1 to 23 lowercase letters, digits, "
                    "'-' and '_', starting with a letter (agents see LABEL.SERVER.TOOL)",
                )
            if label in servers:
                raise section.error(
                    label,
                    f"the label {label!r} is also a local MCP server's name; agents would not "
                    "know LABEL.SERVER.TOOL from SERVER.TOOL: choose another label",
                )
            with entry:
                node = entry.string("node", check=check_node)
                offered = names_or_any(entry, "servers", check_server_name)
            remote[label] = Remote(label, node, offered)
    return remote


def _servers(cfg: Section) -> dict[str, ServerSpec]:
    """``servers``: an object of inline specs by name, or a directory of spec files."""
    raw = cfg.raw("servers", str(default_servers_dir()))
    servers: dict[str, ServerSpec] = {}
    if isinstance(raw, str):
        directory = Path(raw)
        files = sorted(directory.glob("*.json")) if directory.is_dir() else []
        for spec in load_server_specs(files):
            servers[spec.name] = spec
        return servers
    if not isinstance(raw, dict):
        raise cfg.error(
            "servers",
            f"expected a directory of spec files or an object of specs by name, got {type_name(raw)}",
        )
    for name, data in raw.items():
        spec = parse_server_spec(data, source=f"{cfg.source}: servers.{name}")
        if spec.name != name:
            raise cfg.error(
                f"servers.{name}", f"the spec is named {spec.name!r}; use the same name as its key"
            )
        servers[name] = spec
    return servers
