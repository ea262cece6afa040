"""The agent spec: one JSON object per agent, shared by Nix and Python.

The NixOS module writes it from ``services.keel.agents.<name>``; on a plain
systemd host the operator writes it by hand and ``keel agents install`` reads
it. Both end up with the same unit (:mod:`keel.agents.units`). The format is
specified in ``docs/agents.md``; this module is its validator::

    spec = load_spec(Path("echo.json"))       # ConfigError naming the key if bad
    spec.unit_name                            # "keel-agent-echo.service"
    spec.to_json()                            # the normalised spec, defaults filled in

Validation is pure: no file other than the spec itself is read, and nothing
about the host (users, paths) is checked here; ``install`` does that.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from keel.config import Section, describe, load_json_file
from keel.errors import ConfigError

# An agent name becomes part of a unit name (keel-agent-NAME.service) and of a
# user name (keel-agent-NAME, at most 32 characters for useradd), so it must be
# safe in both: lowercase letters, digits, '-' and '_', starting with a letter.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]*\Z")
USER_PREFIX = "keel-agent-"
MAX_USER_LENGTH = 32
MAX_NAME_LENGTH = MAX_USER_LENGTH - len(USER_PREFIX)
USER_PATTERN = re.compile(r"[a-z_][a-z0-9_-]*\Z")

TIERS = (0, 1, 2)
PROBE_TYPES = ("http", "tcp", "exec")
# The same defaults as keel watch's own config (docs/watch.md): a timeout of
# min(2, interval), 3 failures, no grace, TCP to 127.0.0.1.
PROBE_DEFAULTS: dict[str, float] = {"interval": 5.0, "timeout": 2.0, "failures": 3, "grace": 0.0}

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_SIZE = re.compile(r"[0-9]+[KMGT]?\Z")
_PERCENT = re.compile(r"[0-9]+(\.[0-9]+)?%\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CAPABILITY = re.compile(r"CAP_[A-Z_]+\Z")


@dataclass(frozen=True)
class Probe:
    """One health probe, in the shape keel watch reads (``docs/watch.md``)."""

    type: str
    interval: float
    timeout: float
    failures: int
    grace: float
    name: str | None = None
    url: str | None = None
    expect_status: tuple[int, ...] = ()
    expect_body: str | None = None
    host: str | None = None
    port: int | None = None
    command: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.name is not None:
            out["name"] = self.name
        if self.type == "http":
            out["url"] = self.url
            if self.expect_status:
                out["expect_status"] = list(self.expect_status)
            if self.expect_body is not None:
                out["expect_body"] = self.expect_body
        elif self.type == "tcp":
            out["host"] = self.host
            out["port"] = self.port
        else:
            out["command"] = list(self.command)
        out.update(
            interval=self.interval, timeout=self.timeout, failures=self.failures, grace=self.grace
        )
        return out


@dataclass(frozen=True)
class Resources:
    """cgroup limits, passed to systemd as MemoryMax=, CPUQuota=, TasksMax=."""

    memory_max: str | None = None
    cpu_quota: str | None = None
    tasks_max: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.memory_max is not None:
            out["memoryMax"] = self.memory_max
        if self.cpu_quota is not None:
            out["cpuQuota"] = self.cpu_quota
        if self.tasks_max is not None:
            out["tasksMax"] = self.tasks_max
        return out


@dataclass(frozen=True)
class Role:
    """What a unit rendered from a spec runs: names its unit, state directory and description.

    Agents are one role; keel's MCP servers (:mod:`keel.mcp`) are another, run
    under the same tiers by the same renderer (:mod:`keel.agents.units`).
    """

    title: str  # "agent", in "keel agent NAME (tier N)"
    unit_prefix: str  # "keel-agent-", in "keel-agent-NAME.service"
    state_root: str  # "keel-agents", in "/var/lib/keel-agents/NAME"


AGENT = Role(title="agent", unit_prefix=USER_PREFIX, state_root="keel-agents")


@dataclass(frozen=True)
class AgentSpec:
    """A validated agent spec; ``to_json`` gives it back normalised."""

    name: str
    command: tuple[str, ...]
    tier: int
    user: str
    working_directory: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    environment_files: tuple[str, ...] = ()
    read_write_paths: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    egress_allow: tuple[str, ...] = ()
    probes: tuple[Probe, ...] = ()
    watchdog_sec: float | None = None
    resources: Resources = Resources()
    # Where the spec came from, for error messages about it (not part of it).
    source: str = field(default="", compare=False)
    role: Role = AGENT

    @property
    def unit_name(self) -> str:
        return f"{self.role.unit_prefix}{self.name}.service"

    @property
    def state_directory(self) -> str:
        """The agent's own writable directory, made by systemd (StateDirectory=)."""
        return f"/var/lib/{self.role.state_root}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "command": list(self.command),
            "tier": self.tier,
            "user": self.user,
            "environment": dict(self.environment),
            "environmentFiles": list(self.environment_files),
            "readWritePaths": list(self.read_write_paths),
            "capabilities": list(self.capabilities),
            "egress": {"allow": list(self.egress_allow)},
            "health": {"probes": [p.to_json() for p in self.probes]},
            "resources": self.resources.to_json(),
        }
        if self.working_directory is not None:
            out["workingDirectory"] = self.working_directory
        if self.watchdog_sec is not None:
            out["health"]["watchdogSec"] = self.watchdog_sec
        return out


# --- checks: each returns an error message or None -------------------------


def check_name(name: str) -> str | None:
    if not NAME_PATTERN.match(name):
        return (
            f"{name!r} is not a valid agent name: use lowercase letters, digits, '-' and '_', "
            "starting with a letter (it becomes a unit and a user name)"
        )
    if len(name) > MAX_NAME_LENGTH:
        return (
            f"{name!r} is too long: at most {MAX_NAME_LENGTH} characters, so that "
            f"'{USER_PREFIX}{name}' fits the {MAX_USER_LENGTH}-character user name limit"
        )
    return None


def check_user(user: str) -> str | None:
    if not USER_PATTERN.match(user) or len(user) > MAX_USER_LENGTH:
        return (
            f"{user!r} is not a valid user name: lowercase letters, digits, '-' and '_', "
            f"starting with a letter or '_', at most {MAX_USER_LENGTH} characters"
        )
    return None


def check_absolute_path(path: str) -> str | None:
    pure = PurePosixPath(path)
    if not pure.is_absolute():
        return f"{path!r} is not an absolute path (start it with '/')"
    if ".." in pure.parts:
        return f"{path!r} contains '..'; write the path it means"
    if any(c in path for c in "\n\0") or any(c.isspace() for c in path):
        return f"{path!r} contains whitespace or control characters, which unit files cannot carry"
    if path == "/":
        return "'/' is the whole file system; name the directories the agent needs"
    return None


def check_domain(domain: str) -> str | None:
    """An egress allowlist entry: ``example.com`` or ``*.example.com``, lowercase ASCII."""
    if domain != domain.lower():
        return f"{domain!r}: write domain names in lowercase"
    if not domain.isascii():
        return f"{domain!r}: write internationalised names in their ASCII form (xn--...)"
    name = domain.removesuffix(".")
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    if "*" in name:
        return f"{domain!r}: '*' is only allowed as the whole first label ('*.example.com')"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return f"{domain!r}: egress.allow takes domain names, not addresses"
    if len(name) > 253:
        return f"{domain!r}: longer than 253 characters"
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            return (
                f"{domain!r}: label {label!r} is not a valid host name label "
                "(letters, digits and inner '-', 1 to 63 characters)"
            )
    if labels[-1].isdigit():
        return f"{domain!r}: the last label cannot be all digits"
    if wildcard and len(labels) < 2:
        return f"{domain!r}: a wildcard must sit under a registered name ('*.example.com')"
    return None


def check_size(value: str) -> str | None:
    if value == "infinity" or _SIZE.match(value) or _PERCENT.match(value):
        return None
    return f"{value!r}: expected bytes with an optional K/M/G/T suffix ('512M'), a percentage or 'infinity'"


def check_percent(value: str) -> str | None:
    if _PERCENT.match(value) and float(value[:-1]) > 0:
        return None
    return f"{value!r}: expected a percentage of one CPU ('50%', '200%' for two CPUs)"


# --- parsing -----------------------------------------------------------------


def item_error(section: Section, key: str, index: int, problem: str) -> ConfigError:
    return ConfigError(f"{section.source}: {section.key_path(key)}[{index}]: {problem}")


def _probe(section: Section) -> Probe:
    kind = section.choice("type", PROBE_TYPES)
    name = section.string("name", None)
    interval = section.number("interval", PROBE_DEFAULTS["interval"], positive=True)
    timeout = section.number("timeout", min(PROBE_DEFAULTS["timeout"], interval), positive=True)
    if timeout > interval:
        raise section.error("timeout", f"must not exceed interval ({interval:g} s)")
    failures = section.integer("failures", int(PROBE_DEFAULTS["failures"]), minimum=1)
    grace = section.number("grace", PROBE_DEFAULTS["grace"], minimum=0)
    common: dict[str, Any] = {
        "type": kind,
        "name": name,
        "interval": interval,
        "timeout": timeout,
        "failures": failures,
        "grace": grace,
    }
    if kind == "http":
        url = section.string(
            "url",
            check=lambda u: (
                None
                if re.match(r"https?://[^/\s]+", u)
                else f"{u!r}: expected an http:// or https:// URL"
            ),
        )
        return Probe(
            **common,
            url=url,
            expect_status=_expect_status(section),
            expect_body=section.string("expect_body", None, nonempty=False),
        )
    if kind == "tcp":
        return Probe(
            **common,
            host=section.string("host", "127.0.0.1"),
            port=section.integer("port", minimum=1, maximum=65535),
        )
    return Probe(**common, command=tuple(section.strings("command", nonempty=True)))


def _expect_status(section: Section) -> tuple[int, ...]:
    """An HTTP status or a list of them, as keel watch reads it."""
    raw = section.raw("expect_status", None)
    if raw is None:
        return ()
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(
        isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 for v in values
    ):
        raise section.error(
            "expect_status",
            f"expected an HTTP status (100-599) or a non-empty list of them, got {describe(raw)}",
        )
    return tuple(values)


def _environment(spec: Section) -> dict[str, str]:
    environment = spec.string_map("environment", {})
    for key in environment:
        if not _ENV_NAME.match(key):
            raise spec.error(
                "environment",
                f"{key!r} is not a valid variable name (letters, digits and '_', not starting with a digit)",
            )
    return environment


def _paths(spec: Section, key: str) -> tuple[str, ...]:
    paths = spec.strings(key, [])
    for i, path in enumerate(paths):
        if (problem := check_absolute_path(path)) is not None:
            raise item_error(spec, key, i, problem)
    return tuple(dict.fromkeys(paths))


@dataclass(frozen=True)
class Sandboxed:
    """What a spec of something keel runs at a tier says about how it runs.

    Agents and MCP servers (:mod:`keel.mcp.spec`) share these keys, read
    by :func:`parse_sandboxed` alike.
    """

    tier: int
    user: str
    working_directory: str | None
    environment: dict[str, str]
    environment_files: tuple[str, ...]
    read_write_paths: tuple[str, ...]
    egress_allow: tuple[str, ...]
    resources: Resources


def parse_command(spec: Section) -> tuple[str, ...]:
    command = tuple(spec.strings("command", nonempty=True))
    if not PurePosixPath(command[0]).is_absolute():
        raise item_error(
            spec,
            "command",
            0,
            f"{command[0]!r}: the program must be an absolute path "
            "(systemd does not search PATH the way a shell does)",
        )
    return command


def parse_sandboxed(spec: Section, *, default_user: str, what: str = "agents") -> Sandboxed:
    """``tier``, ``user``, paths, environment, ``egress`` and ``resources`` of a spec."""
    tier = spec.integer("tier")
    if tier not in TIERS:
        raise spec.error("tier", f"expected 0, 1 or 2, got {tier}")
    user = spec.string("user", default_user, check=check_user)
    if user == "root" and tier != 0:
        raise spec.error(
            "user", f"tier {tier} {what} run as their own user, not root; drop the key"
        )
    working_directory = spec.string("workingDirectory", None, check=check_absolute_path)
    environment = _environment(spec)
    environment_files = _paths(spec, "environmentFiles")
    read_write_paths = _paths(spec, "readWritePaths")
    with spec.section("egress", optional=True) as egress:
        allow = egress.strings("allow", [])
        for i, domain in enumerate(allow):
            if (problem := check_domain(domain)) is not None:
                raise item_error(egress, "allow", i, problem)
    allow = [d.removesuffix(".") for d in allow]
    if allow and tier == 0:
        raise spec.error(
            "egress.allow",
            f"tier 0 {what} have an open network; use tier 1 or 2 for an allowlist",
        )
    with spec.section("resources", optional=True) as res:
        resources = Resources(
            memory_max=res.string("memoryMax", None, check=check_size),
            cpu_quota=res.string("cpuQuota", None, check=check_percent),
            tasks_max=res.integer("tasksMax", None, minimum=1),
        )
    return Sandboxed(
        tier=tier,
        user=user,
        working_directory=working_directory,
        environment=environment,
        environment_files=environment_files,
        read_write_paths=read_write_paths,
        egress_allow=tuple(dict.fromkeys(allow)),
        resources=resources,
    )


def parse_spec(data: object, *, source: str) -> AgentSpec:
    """Validate one agent spec (a parsed JSON object); ``source`` names it in errors."""
    with Section(data, source=source) as spec:
        name = spec.string("name", check=check_name)
        command = parse_command(spec)
        run = parse_sandboxed(spec, default_user=USER_PREFIX + name)
        # Which capabilities exist and which a tier may take is tiers.json's
        # to say (keel.agents.units checks it); here only the form.
        capabilities = spec.strings("capabilities", [])
        for i, capability in enumerate(capabilities):
            if not _CAPABILITY.match(capability):
                raise item_error(
                    spec,
                    "capabilities",
                    i,
                    f"{capability!r}: write capabilities as in capabilities(7), e.g. 'CAP_NET_BIND_SERVICE'",
                )
        with spec.section("health", optional=True) as health:
            probes = tuple(
                _probe_checked(probe_section)
                for probe_section in health.section_list("probes", default=[])
            )
            watchdog_sec = health.number("watchdogSec", None, positive=True)

    return AgentSpec(
        name=name,
        command=command,
        tier=run.tier,
        user=run.user,
        working_directory=run.working_directory,
        environment=run.environment,
        environment_files=run.environment_files,
        read_write_paths=run.read_write_paths,
        capabilities=tuple(dict.fromkeys(capabilities)),
        egress_allow=run.egress_allow,
        probes=probes,
        watchdog_sec=watchdog_sec,
        resources=run.resources,
        source=source,
    )


def _probe_checked(section: Section) -> Probe:
    with section:
        return _probe(section)


def load_spec(path: Path) -> AgentSpec:
    """Read and validate an agent spec file; errors name the file and the key."""
    return parse_spec(load_json_file(path, what="agent spec"), source=str(path))


def load_specs(paths: list[Path]) -> list[AgentSpec]:
    """Several specs at once; two specs with one name are refused."""
    specs: list[AgentSpec] = []
    seen: dict[str, Path] = {}
    for path in paths:
        spec = load_spec(path)
        if spec.name in seen:
            raise ConfigError(
                f"{path}: name: agent {spec.name!r} is already defined in {seen[spec.name]}"
            )
        seen[spec.name] = path
        specs.append(spec)
    return specs
