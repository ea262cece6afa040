"""/etc/keel/egress.json: what `keel egress serve` enforces (docs/egress.md).

::

    {
      "socket": "/run/keel/egress.sock",
      "ledger": "/var/lib/keel/ledger.db",
      "upstream": ["192.0.2.53:53", "[2001:db8::53]:53"],
      "min_ttl": 30, "grace": 30, "on_stop": "keep",
      "agents": {
        "scout": {"user": "keel-agent-scout", "port": 5301, "mode": "enforce",
                  "allow": ["example.org", "*.wikipedia.org"]}
      }
    }

An agent is named by ``uid`` (a number) or ``user`` (looked up when the
daemon starts: the NixOS module cannot know the uid a system user gets).
MCP servers keel runs are governed the same way, under ``servers`` (their
name in egress is ``mcp.<name>``: never an agent's, which holds no dot).

Either list may instead be a directory of installed specs
(``"agents": "/etc/keel/agents"``, ``"servers": "/etc/keel/mcp/servers"``,
where ``keel agents install`` and ``keel mcp add`` put them): egress then
governs what the NixOS module would, every tier-2 spec and every tier-1 spec
with an ``egress.allow``, with proxy ports ``base_port`` + 1, + 2, ... (agents
in name order, then servers) and ``audit`` naming those in audit mode.
Unknown keys and bad values fail with the file and the key path.
"""

from __future__ import annotations

import ipaddress
import pwd
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from keel.agents.spec import AgentSpec, check_name, check_user, load_specs
from keel.config import Section, describe, type_name
from keel.egress.allowlist import Allowlist, EntryError, parse_entry
from keel.errors import ConfigError
from keel.mcp.spec import ServerSpec, check_server_name, load_server_specs
from keel.service import Common, read_common

MODES = ("enforce", "audit")
ON_STOP = ("keep", "remove")
DEFAULT_MIN_TTL = 30
DEFAULT_GRACE = 30
DEFAULT_LOG_GROUP = 17
DEFAULT_UPSTREAM_TIMEOUT = 2.0
DEFAULT_CACHE_SIZE = 10_000
DEFAULT_TABLE_CHECK = 30.0
DNS_PORT = 53
DEFAULT_BASE_PORT = 5300
SERVER_PREFIX = "mcp."  # an MCP server's name in egress (chains, sets, ledger, status)


@dataclass(frozen=True)
class Upstream:
    """A resolver the proxy asks (an address: a name would need a resolver to find it)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AgentEgress:
    """An agent (or an MCP server: ``mcp.<name>``) egress governs."""

    name: str
    port: int
    mode: str
    allow: Allowlist
    uid: int | None = None
    user: str | None = None
    # Where it was declared, for messages: "egress.json: agents.scout" (an entry of the
    # config) or "/etc/keel/agents/scout.json" (derived from an installed spec).
    origin: str = ""
    derived: bool = False

    def where(self, key: str) -> str:
        """``origin`` and ``key`` as a message names them."""
        if self.derived:
            return f"{self.origin}: {key}"
        return f"{self.origin}.{key}" if self.origin else key

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"


@dataclass(frozen=True)
class EgressConfig:
    common: Common
    source: str
    upstream: tuple[Upstream, ...]
    min_ttl: int = DEFAULT_MIN_TTL
    grace: int = DEFAULT_GRACE
    on_stop: str = "keep"
    log_group: int = DEFAULT_LOG_GROUP
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    cache_size: int = DEFAULT_CACHE_SIZE
    table_check: float = DEFAULT_TABLE_CHECK
    agents: dict[str, AgentEgress] = field(default_factory=dict)


def parse_upstream(text: str) -> Upstream:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT``; raises ValueError with the reason."""
    host, port_text = text, str(DNS_PORT)
    if text.startswith("["):
        closing = text.find("]")
        if closing < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:closing], text[closing + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{text!r}: expected an IP address with an optional port ('192.0.2.53:53', "
            "'[2001:db8::53]:53'); a name would need a resolver to be found"
        ) from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return Upstream(str(address), int(port_text))


def _allowlist(section: Section) -> Allowlist:
    texts = section.strings("allow", [])
    entries = []
    for i, text in enumerate(texts):
        try:
            entries.append(parse_entry(text))
        except EntryError as exc:
            raise ConfigError(
                f"{section.source}: {section.key_path('allow')}[{i}]: {exc}"
            ) from None
    return Allowlist(entries)


def _agent(name: str, section: Section, *, server: bool = False) -> AgentEgress:
    problem = check_server_name(name) if server else check_name(name)
    if problem is not None:
        raise ConfigError(f"{section.source}: {section.path}: {problem}")
    has_uid, has_user = "uid" in section, "user" in section
    if has_uid == has_user:
        raise section.error(
            "uid", "give exactly one of uid (a number) and user (a name looked up at start)"
        )
    uid = section.integer("uid", None, minimum=1, maximum=2**32 - 2) if has_uid else None
    user = section.string("user", None, check=check_user) if has_user else None
    if user == "root":
        raise section.error("user", "an agent never runs as root; egress matches agents by user")
    port = section.integer("port", minimum=1, maximum=65535)
    if port == DNS_PORT:
        raise section.error("port", "53 is where the agent's DNS is caught; pick another port")
    return AgentEgress(
        name=SERVER_PREFIX + name if server else name,
        uid=uid,
        user=user,
        origin=f"{section.source}: {section.path}",
        port=port,
        mode=section.choice("mode", MODES, "enforce"),
        allow=_allowlist(section),
    )


class SpecReader(Protocol):
    """Where installed specs are read from (the local files; conformance reads a host's)."""

    def agents(self, directory: str) -> list[AgentSpec]: ...

    def servers(self, directory: str) -> list[ServerSpec]: ...


class LocalSpecs:
    """The ``*.json`` specs of a local directory (none when it does not exist)."""

    def agents(self, directory: str) -> list[AgentSpec]:
        return load_specs(_spec_files(directory))

    def servers(self, directory: str) -> list[ServerSpec]:
        return load_server_specs(_spec_files(directory))


def _spec_files(directory: str) -> list[Path]:
    path = Path(directory)
    return sorted(path.glob("*.json")) if path.is_dir() else []


def needs_egress(tier: int | None, allow: Sequence[str]) -> bool:
    """Whether egress governs a spec: tier 2 always, tier 1 with an allowlist (as NixOS)."""
    return tier == 2 or (tier == 1 and bool(allow))


@dataclass(frozen=True)
class _Derived:
    name: str
    user: str
    allow: tuple[str, ...]
    source: str


def _derived_agents(specs: Sequence[AgentSpec]) -> list[_Derived]:
    return sorted(
        (
            _Derived(spec.name, spec.user, spec.egress_allow, spec.source)
            for spec in specs
            if needs_egress(spec.tier, spec.egress_allow)
        ),
        key=lambda d: d.name,
    )


def _derived_servers(specs: Sequence[ServerSpec]) -> list[_Derived]:
    return sorted(
        (
            _Derived(SERVER_PREFIX + spec.name, spec.user, spec.egress_allow, spec.source)
            for spec in specs
            if spec.runs_here and needs_egress(spec.tier, spec.egress_allow)
        ),
        key=lambda d: d.name,
    )


def _entries(
    cfg: Section, key: str, specs: SpecReader
) -> tuple[dict[str, AgentEgress], list[_Derived]]:
    """``agents`` or ``servers``: inline entries, or the specs of a directory to derive them from."""
    raw = cfg.raw(key, None)
    if raw is None:
        return {}, []
    if isinstance(raw, str):
        if not raw.startswith("/"):
            raise cfg.error(key, f"{describe(raw)}: give the directory as an absolute path")
        if key == "agents":
            return {}, _derived_agents(specs.agents(raw))
        return {}, _derived_servers(specs.servers(raw))
    if not isinstance(raw, dict):
        raise cfg.error(
            key,
            f"expected an object of entries by name or the directory of installed specs, "
            f"got {type_name(raw)} {describe(raw)}",
        )
    entries: dict[str, AgentEgress] = {}
    for name, section in cfg.section(key).sections():
        with section:
            agent = _agent(name, section, server=key == "servers")
        entries[agent.name] = agent
    return entries, []


def _derive(
    cfg: Section, derived: list[_Derived], base_port: int, audit: list[str]
) -> dict[str, AgentEgress]:
    names = {d.name for d in derived}
    for i, name in enumerate(audit):
        if name not in names:
            known = ", ".join(sorted(names)) or "none"
            raise ConfigError(
                f"{cfg.source}: audit[{i}]: {describe(name)} is not an agent or server egress "
                f"governs from installed specs (those: {known})"
            )
    agents: dict[str, AgentEgress] = {}
    for offset, entry in enumerate(derived, start=1):
        port = base_port + offset
        if port > 65535 or port == DNS_PORT:
            raise cfg.error(
                "base_port",
                f"{base_port} gives {entry.name} port {port}; pick a base_port that leaves "
                f"{len(derived)} ports below 65536 and above or below 53",
            )
        agents[entry.name] = AgentEgress(
            name=entry.name,
            user=entry.user,
            origin=entry.source,
            derived=True,
            port=port,
            mode="audit" if entry.name in audit else "enforce",
            allow=Allowlist.parse(entry.allow),
        )
    return agents


def parse(cfg: Section, *, specs: SpecReader | None = None) -> EgressConfig:
    """Read an egress config from its top-level section (every key checked)."""
    common = read_common(cfg, "egress")
    texts = cfg.strings("upstream", nonempty=True)
    upstream = []
    for i, text in enumerate(texts):
        try:
            upstream.append(parse_upstream(text))
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: upstream[{i}]: {exc}") from None
    reader = specs or LocalSpecs()
    inline_agents, derived = _entries(cfg, "agents", reader)
    inline_servers, derived_servers = _entries(cfg, "servers", reader)
    base_port = cfg.integer("base_port", DEFAULT_BASE_PORT, minimum=0, maximum=65534)
    audit = cfg.strings("audit", [])
    listed = [
        *inline_agents.values(),
        *inline_servers.values(),
        *_derive(cfg, derived + derived_servers, base_port, audit).values(),
    ]
    agents: dict[str, AgentEgress] = {}
    ports: dict[int, str] = {}
    uids: dict[object, str] = {}
    for agent in listed:
        if agent.port in ports:
            where = (
                f"{cfg.source}: base_port: {agent.name}'s port"
                if agent.derived
                else agent.where("port")
            )
            raise ConfigError(f"{where}: {agent.port} is already the port of {ports[agent.port]!r}")
        identity = agent.uid if agent.uid is not None else agent.user
        if identity in uids:
            key = "uid" if agent.uid is not None else "user"
            raise ConfigError(
                f"{agent.where(key)}: {describe(identity)} is also {uids[identity]!r}'s: each "
                "agent needs a user of its own (egress tells agents apart by it)"
            )
        ports[agent.port] = agent.name
        uids[identity] = agent.name
        agents[agent.name] = agent
    for i, server in enumerate(upstream):
        local = ipaddress.ip_address(server.host).is_loopback
        if local and server.port in ports:
            raise ConfigError(
                f"{cfg.source}: upstream[{i}]: {server} is the proxy of agent "
                f"{ports[server.port]!r}; name the resolver keel should ask"
            )
    return EgressConfig(
        common=common,
        source=cfg.source,
        upstream=tuple(upstream),
        min_ttl=cfg.integer("min_ttl", DEFAULT_MIN_TTL, minimum=0, maximum=86_400),
        grace=cfg.integer("grace", DEFAULT_GRACE, minimum=0, maximum=86_400),
        on_stop=cfg.choice("on_stop", ON_STOP, "keep"),
        log_group=cfg.integer("log_group", DEFAULT_LOG_GROUP, minimum=0, maximum=65535),
        upstream_timeout=cfg.number("upstream_timeout", DEFAULT_UPSTREAM_TIMEOUT, positive=True),
        cache_size=cfg.integer("cache_size", DEFAULT_CACHE_SIZE, minimum=0),
        table_check=cfg.number("table_check", DEFAULT_TABLE_CHECK, positive=True),
        agents=agents,
    )


def load(path: Path) -> EgressConfig:
    """Read and validate ``path``; a :class:`ConfigError` names the file and the key."""
    with Section.load(path) as cfg:
        return parse(cfg)


def resolve_uids(
    config: EgressConfig, lookup: Callable[[str], int] | None = None
) -> dict[str, int]:
    """Every agent's uid; a ``user`` that does not exist is a ConfigError naming the key."""

    def by_name(user: str) -> int:
        return pwd.getpwnam(user).pw_uid

    find = lookup or by_name
    uids: dict[str, int] = {}
    owners: dict[int, str] = {}
    for name, agent in config.agents.items():
        if agent.uid is not None:
            uid = agent.uid
        else:
            assert agent.user is not None
            try:
                uid = find(agent.user)
            except KeyError:
                raise ConfigError(
                    f"{agent.where('user')}: no such user {agent.user!r} (install it first: "
                    "`keel agents install`, `keel mcp add`, or services.keel.agents)"
                ) from None
        if uid == 0:
            raise ConfigError(f"{agent.where('user')}: {agent.user!r} is root")
        if uid in owners:
            raise ConfigError(
                f"{config.source}: agents.{name}: uid {uid} is also {owners[uid]!r}'s: "
                "each agent needs a user of its own"
            )
        owners[uid] = name
        uids[name] = uid
    return uids
