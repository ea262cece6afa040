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
Unknown keys and bad values fail with the file and the key path.
"""

from __future__ import annotations

import ipaddress
import pwd
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keel.agents.spec import check_name, check_user
from keel.config import Section, describe
from keel.egress.allowlist import Allowlist, EntryError, parse_entry
from keel.errors import ConfigError
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


@dataclass(frozen=True)
class Upstream:
    """A resolver the proxy asks (an address: a name would need a resolver to find it)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AgentEgress:
    name: str
    port: int
    mode: str
    allow: Allowlist
    uid: int | None = None
    user: str | None = None

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


def _agent(name: str, section: Section) -> AgentEgress:
    if (problem := check_name(name)) is not None:
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
        name=name,
        uid=uid,
        user=user,
        port=port,
        mode=section.choice("mode", MODES, "enforce"),
        allow=_allowlist(section),
    )


def parse(cfg: Section) -> EgressConfig:
    """Read an egress config from its top-level section (every key checked)."""
    common = read_common(cfg, "egress")
    texts = cfg.strings("upstream", nonempty=True)
    upstream = []
    for i, text in enumerate(texts):
        try:
            upstream.append(parse_upstream(text))
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: upstream[{i}]: {exc}") from None
    agents: dict[str, AgentEgress] = {}
    ports: dict[int, str] = {}
    uids: dict[object, str] = {}
    for name, section in cfg.section("agents", optional=True).sections():
        with section:
            agent = _agent(name, section)
        if agent.port in ports:
            raise section.error(
                "port", f"{agent.port} is already the port of {ports[agent.port]!r}"
            )
        identity = agent.uid if agent.uid is not None else agent.user
        if identity in uids:
            key = "uid" if agent.uid is not None else "user"
            raise section.error(
                key,
                f"{describe(identity)} is also {uids[identity]!r}'s: each agent needs a user of "
                "its own (egress tells agents apart by it)",
            )
        ports[agent.port] = name
        uids[identity] = name
        agents[name] = agent
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
                    f"{config.source}: agents.{name}.user: no such user {agent.user!r} "
                    "(install the agent first: `keel agents install`, or services.keel.agents)"
                ) from None
        if uid == 0:
            raise ConfigError(f"{config.source}: agents.{name}.user: {agent.user!r} is root")
        if uid in owners:
            raise ConfigError(
                f"{config.source}: agents.{name}: uid {uid} is also {owners[uid]!r}'s: "
                "each agent needs a user of its own"
            )
        owners[uid] = name
        uids[name] = uid
    return uids
