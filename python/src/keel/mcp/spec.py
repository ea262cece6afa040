"""The MCP server spec: one JSON object per tool server, shared by Nix and Python.

The NixOS module writes it from ``services.keel.mcp.servers.<name>``; on a
plain systemd host ``keel mcp add`` reads it. The format is specified in
``docs/mcp.md``; this module is its validator::

    spec = load_server_spec(Path("files.json"))   # ConfigError naming the key if bad
    spec.unit_name                                # "keel-mcp-files.service"
    spec.to_json()                                # the normalised spec, defaults filled in

A server keel runs (``command``) is sandboxed like an agent: the same trust
tiers, the same ``tiers.json``, the same renderer (:mod:`keel.agents.units`),
through :meth:`ServerSpec.unit_spec`. A server reached by ``url`` alone is run
by someone else; keel only talks to it.

``share`` says who may use which tools. It is a list of grants; a caller may
use a tool when a grant names it (or ``"*"``) and names the caller. Nothing is
shared unless a grant says so: an absent or empty ``share``, or a grant with
an empty list, gives nobody anything.

Validation is pure: nothing about the host (users, agents) is read here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keel.agents.spec import (
    AgentSpec,
    Resources,
    Role,
    Sandboxed,
    check_name,
    check_unit_name,
    item_error,
    parse_command,
    parse_sandboxed,
)
from keel.config import Section, describe, load_json_file, type_name
from keel.errors import ConfigError

USER_PREFIX = "keel-mcp-"
MCP_SERVER = Role(title="MCP server", unit_prefix=USER_PREFIX, state_root="keel-mcp")

# Tool names as the MCP specification allows them (SEP-986): letters, digits,
# '_', '-' and '.', 1 to 128 characters.
TOOL_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
_NODE_ID = re.compile(r"[a-z2-7]{32}\Z")  # keel.mesh.identity.NODE_ID_RE

ANY = "*"

DEFAULT_CALL_TIMEOUT = 60.0


@dataclass(frozen=True)
class Grant:
    """One entry of ``share``: these callers may use these tools.

    ``agents``/``tools``/``nodes`` are ``None`` for ``"*"`` (anyone, any tool,
    any node of the mesh) and a frozenset otherwise (possibly empty: nobody).
    ``remote`` grants (with ``nodes``) are for callers on other nodes only;
    the others for this node's agents only.
    """

    agents: frozenset[str] | None
    tools: frozenset[str] | None
    nodes: frozenset[str] | None = frozenset()
    remote: bool = False
    allow_lower_tier: bool = False

    def to_json(self) -> dict[str, Any]:
        def one(value: frozenset[str] | None) -> str | list[str]:
            return ANY if value is None else sorted(value)

        out: dict[str, Any] = {"agents": one(self.agents), "tools": one(self.tools)}
        if self.remote:
            out["nodes"] = one(self.nodes)
        if self.allow_lower_tier:
            out["allowLowerTier"] = True
        return out


@dataclass(frozen=True)
class ServerSpec:
    """A validated MCP server spec; ``to_json`` gives it back normalised."""

    name: str
    command: tuple[str, ...] = ()
    url: str | None = None
    tier: int | None = None
    user: str = ""
    working_directory: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    environment_files: tuple[str, ...] = ()
    read_write_paths: tuple[str, ...] = ()
    egress_allow: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    share: tuple[Grant, ...] = ()
    call_timeout: float = DEFAULT_CALL_TIMEOUT
    source: str = field(default="", compare=False)

    @property
    def runs_here(self) -> bool:
        """keel runs this server (it has a ``command``), as the unit :attr:`unit_name`."""
        return bool(self.command)

    @property
    def transport(self) -> str:
        """``stdio`` (keel holds the server's stdin/stdout) or ``http`` (Streamable HTTP)."""
        return "http" if self.url else "stdio"

    @property
    def unit_name(self) -> str:
        return f"{USER_PREFIX}{self.name}.service"

    @property
    def socket_unit_name(self) -> str:
        return f"{USER_PREFIX}{self.name}.socket"

    def unit_spec(self, launcher: tuple[str, ...]) -> AgentSpec:
        """The spec the unit renderer takes: this server run through ``launcher``.

        For a stdio server ``launcher`` is keel's ``mcp exec`` (which hands the
        server its connection to the gateway as stdin and stdout, see
        :mod:`keel.mcp.attach`); a server with a ``url`` serves HTTP itself
        and is run as it is.
        """
        if not self.runs_here or self.tier is None:
            raise ConfigError(
                f"{self.source or self.name}: MCP server {self.name!r} has no command"
            )
        command = self.command if self.url else (*launcher, *self.command)
        return AgentSpec(
            name=self.name,
            command=command,
            tier=self.tier,
            user=self.user,
            working_directory=self.working_directory,
            environment=dict(self.environment),
            environment_files=self.environment_files,
            read_write_paths=self.read_write_paths,
            egress_allow=self.egress_allow,
            resources=self.resources,
            source=self.source,
            role=MCP_SERVER,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.command:
            out.update(
                command=list(self.command),
                tier=self.tier,
                user=self.user,
                environment=dict(self.environment),
                environmentFiles=list(self.environment_files),
                readWritePaths=list(self.read_write_paths),
                egress={"allow": list(self.egress_allow)},
                resources=self.resources.to_json(),
            )
            if self.working_directory is not None:
                out["workingDirectory"] = self.working_directory
        if self.url is not None:
            out["url"] = self.url
        out["share"] = [grant.to_json() for grant in self.share]
        out["callTimeout"] = self.call_timeout
        return out


# --- checks --------------------------------------------------------------------


def check_server_name(name: str) -> str | None:
    return check_unit_name(name, title="MCP server", prefix=USER_PREFIX)


def check_url(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"{url!r}: expected an http:// or https:// URL of a Streamable HTTP MCP endpoint"
    if any(c.isspace() for c in url):
        return f"{url!r}: a URL cannot contain whitespace"
    return None


def check_tool(name: str) -> str | None:
    if TOOL_NAME.match(name):
        return None
    return (
        f"{name!r} is not a tool name (MCP tool names are 1 to 128 letters, digits, "
        "'_', '-' and '.')"
    )


def check_node(node: str) -> str | None:
    if _NODE_ID.match(node):
        return None
    return f"{node!r} is not a mesh node id (32 characters a-z and 2-7; `keel mesh id` prints it)"


# --- parsing ---------------------------------------------------------------------


def names_or_any(
    section: Section, key: str, check: Callable[[str], str | None]
) -> frozenset[str] | None:
    """A required ``"*"`` (None) or list of names, each checked."""
    if key not in section:
        raise section.error(key, 'required key is missing: "*" or a list of names')
    raw = section.raw(key)
    if raw == ANY:
        return None
    if not isinstance(raw, list):
        raise section.error(
            key, f'expected "*" or a list of names, got {type_name(raw)} {describe(raw)}'
        )
    names = section.strings(key)
    for i, name in enumerate(names):
        if name == ANY:
            raise item_error(section, key, i, 'write "*" instead of the list, not inside it')
        if (problem := check(name)) is not None:
            raise item_error(section, key, i, problem)
    return frozenset(names)


def _grant(section: Section) -> Grant:
    with section:
        remote = "nodes" in section
        nodes = names_or_any(section, "nodes", check_node) if remote else frozenset()
        agents = names_or_any(section, "agents", check_name)
        tools = names_or_any(section, "tools", check_tool)
        allow_lower_tier = section.boolean("allowLowerTier", False)
        if allow_lower_tier and remote:
            raise section.error(
                "allowLowerTier",
                "applies to this node's agents, whose tiers keel knows; remove it from a grant "
                "with nodes",
            )
    return Grant(agents, tools, nodes, remote, allow_lower_tier)


RUN_KEYS = (
    "tier",
    "user",
    "workingDirectory",
    "environment",
    "environmentFiles",
    "readWritePaths",
    "egress",
    "resources",
)


def parse_server_spec(data: object, *, source: str) -> ServerSpec:
    """Validate one MCP server spec (a parsed JSON object); ``source`` names it in errors."""
    with Section(data, source=source) as spec:
        name = spec.string("name", check=check_server_name)
        url = spec.string("url", None, check=check_url)
        command = parse_command(spec) if "command" in spec else ()
        if not command and url is None:
            raise spec.error(
                "command",
                "required key is missing: give `command` (a stdio server keel runs) or `url` "
                "(a Streamable HTTP server)",
            )
        run: Sandboxed | None = None
        if command:
            run = parse_sandboxed(spec, command, default_user=USER_PREFIX + name, what="servers")
        else:
            for key in RUN_KEYS:
                if key in spec:
                    raise spec.error(
                        key,
                        "only for a server keel runs (with `command`); a server reached by "
                        "`url` alone runs elsewhere, under its own sandbox",
                    )
        grants = tuple(_grant(grant) for grant in spec.section_list("share", default=[]))
        call_timeout = spec.number("callTimeout", DEFAULT_CALL_TIMEOUT, positive=True)
    if run is None:
        return ServerSpec(
            name=name, url=url, share=grants, call_timeout=call_timeout, source=source
        )
    return ServerSpec(
        name=name,
        command=command,
        url=url,
        tier=run.tier,
        user=run.user,
        working_directory=run.working_directory,
        environment=run.environment,
        environment_files=run.environment_files,
        read_write_paths=run.read_write_paths,
        egress_allow=run.egress_allow,
        resources=run.resources,
        share=grants,
        call_timeout=call_timeout,
        source=source,
    )


def load_server_spec(path: Path) -> ServerSpec:
    """Read and validate an MCP server spec file; errors name the file and the key."""
    return parse_server_spec(load_json_file(path, what="MCP server spec"), source=str(path))


def load_server_specs(paths: list[Path]) -> list[ServerSpec]:
    """Several specs at once; two specs with one name are refused."""
    specs: list[ServerSpec] = []
    seen: dict[str, Path] = {}
    for path in paths:
        spec = load_server_spec(path)
        if spec.name in seen:
            raise ConfigError(
                f"{path}: name: MCP server {spec.name!r} is already defined in {seen[spec.name]}"
            )
        seen[spec.name] = path
        specs.append(spec)
    return specs
