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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel import launch
from keel.agents.meshgrant import DeclaredGrant, MeshGrant, read_grant
from keel.config import Section, describe, load_json_file
from keel.egress.allowlist import EntryError, parse_entry
from keel.errors import ConfigError
from keel.watch import httpwire

# An agent name becomes part of a unit name (keel-agent-NAME.service) and of a
# user name (keel-agent-NAME), so it must be safe in both: lowercase letters,
# digits, '-' and '_', starting with a letter. User names stay under 32
# characters: useradd takes 32, but NixOS refuses 32 or more, and an agent must
# be valid on both.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]*\Z")
USER_PREFIX = "keel-agent-"
MAX_USER_LENGTH = 31
MAX_NAME_LENGTH = MAX_USER_LENGTH - len(USER_PREFIX)
USER_PATTERN = re.compile(r"[a-z_][a-z0-9_-]*\Z")

TIERS = (0, 1, 2)
PROBE_TYPES = ("http", "tcp", "exec")
# The same defaults as keel watch's own config (docs/watch.md): a timeout of
# min(2, interval), 3 failures, no grace, TCP to 127.0.0.1.
PROBE_DEFAULTS: dict[str, float] = {"interval": 5.0, "timeout": 2.0, "failures": 3, "grace": 0.0}

_SIZE = re.compile(r"([0-9]{1,20})([KMGT]?)\Z")
_PERCENT = re.compile(r"([0-9]{1,9})(?:\.([0-9]{1,2}))?%\Z")
_CAPABILITY = re.compile(r"CAP_[A-Z_]+\Z")

# What systemd 252 reads back (measured, tests/integration/test_units_systemd.py);
# beyond these it logs a warning and drops the directive, and the agent would
# silently run without the limit.
PATH_MAX_BYTES = 4095  # PATH_MAX less the terminating NUL
NAME_MAX_BYTES = 255  # one path component
MAX_BYTES = 2**64 - 2  # MemoryMax=: below UINT64_MAX, which means infinity
MAX_TASKS = 2**64 - 2  # TasksMax=
MAX_CPU_QUOTA_HUNDREDTHS = 2**31 - 1  # CPUQuota=: 21474836.47%
WATCHDOG_RANGE = (0.001, 86400.0)  # WatchdogSec=, seconds; rendered to the microsecond


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
    mesh: DeclaredGrant = field(default_factory=DeclaredGrant)
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

    @property
    def mesh_grant(self) -> MeshGrant:
        """What the agent may do on the mesh, its tier's defaults filled in."""
        return self.mesh.resolve(self.tier)

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
        if mesh := self.mesh.to_json():
            out["mesh"] = mesh
        return out


# --- checks: each returns an error message or None -------------------------


def check_unit_name(name: str, *, title: str, prefix: str) -> str | None:
    """A name that becomes the unit and the user ``<prefix><name>`` (agents, MCP servers)."""
    if not NAME_PATTERN.match(name):
        return (
            f"{describe(name)} is not a valid {title} name: use lowercase letters, digits, '-' "
            "and '_', starting with a letter (it becomes a unit and a user name)"
        )
    longest = MAX_USER_LENGTH - len(prefix)
    if len(name) > longest:
        return (
            f"{describe(name)} is too long: at most {longest} characters, so that "
            f"the user name '{prefix}<name>' fits the {MAX_USER_LENGTH}-character limit"
        )
    return None


def check_name(name: str) -> str | None:
    return check_unit_name(name, title="agent", prefix=USER_PREFIX)


def check_user(user: str) -> str | None:
    if not USER_PATTERN.match(user) or len(user) > MAX_USER_LENGTH:
        return (
            f"{describe(user)} is not a valid user name: lowercase letters, digits, '-' and "
            f"'_', starting with a letter or '_', at most {MAX_USER_LENGTH} characters"
        )
    return None


def _path_length_problem(path: str) -> str | None:
    if len(path.encode()) > PATH_MAX_BYTES:
        return f"{describe(path)} is longer than {PATH_MAX_BYTES} bytes (PATH_MAX)"
    for part in path.split("/"):
        if len(part.encode()) > NAME_MAX_BYTES:
            return (
                f"{describe(path)}: the name {describe(part)} is longer than {NAME_MAX_BYTES} bytes"
            )
    return None


def normalise_path(path: str) -> str:
    """``/srv//data/./x/`` as systemd reads it: ``/srv/data/x``."""
    return "/" + "/".join(part for part in path.split("/") if part not in ("", "."))


def check_absolute_path(path: str) -> str | None:
    """A path for WorkingDirectory=, EnvironmentFile=, ReadWritePaths=.

    Written into the unit as it is (``%`` doubled), so it must not hold what
    systemd would read otherwise: whitespace (a word separator), quotes and
    backslashes (unquoted, unescaped by ReadWritePaths=), control characters.
    """
    if not path.startswith("/"):
        return f"{describe(path)} is not an absolute path (start it with '/')"
    if ".." in path.split("/"):
        return f"{describe(path)} contains '..'; write the path it means"
    odd = next((c for c in path if not c.isprintable() or c.isspace() or c in "\"'\\"), None)
    if odd is not None:
        return (
            f"{describe(path)} contains {describe(odd)}: paths in a unit cannot hold "
            "whitespace, quotes, backslashes or control characters"
        )
    if normalise_path(path) == "/":
        return "'/' is the whole file system; name the directories the agent needs"
    return _path_length_problem(normalise_path(path))


def check_program(path: str) -> str | None:
    """``command[0]`` as systemd accepts it in ExecStart= and passes it back as argv[0].

    systemd refuses control characters, quotes and backslashes in the program
    (\"Executable name contains special characters\"), and expands ``$`` in
    argv[0] but not in the path it runs, so no quoting can carry a ``$``.
    """
    if not path.startswith("/"):
        return (
            f"{describe(path)}: the program must be an absolute path "
            "(systemd does not search PATH the way a shell does)"
        )
    odd = next((c for c in path if ord(c) < 0x20 or c in "\x7f\"'\\$"), None)
    if odd is not None:
        return (
            f"{describe(path)} contains {describe(odd)}: systemd runs no program whose path "
            "holds a control character, a quote, a backslash or '$' (move or link it)"
        )
    if path.endswith("/"):
        return f"{describe(path)} names a directory, not a program"
    return _path_length_problem(path)


def check_domain(domain: str) -> str | None:
    """An egress allowlist entry: ``example.com`` or ``*.example.com``.

    Judged by keel egress's own parser (:func:`keel.egress.allowlist.parse_entry`),
    which has the last word: what it accepts here the egress config accepts,
    case-insensitively, internationalised names in either form.
    """
    try:
        parse_entry(domain)
    except EntryError as exc:
        return str(exc)
    return None


def _hundredths(value: str) -> int | None:
    """``"12.5%"`` as 1250 (hundredths of a percent), the precision systemd reads."""
    match = _PERCENT.match(value)
    if match is None:
        return None
    return int(match.group(1)) * 100 + int((match.group(2) or "0").ljust(2, "0"))


def check_size(value: str) -> str | None:
    if value == "infinity":
        return None
    if (match := _SIZE.match(value)) is not None:
        size = int(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")
        if 1 <= size <= MAX_BYTES:
            return None
        return f"{describe(value)}: out of range (1 byte to {MAX_BYTES} bytes, or 'infinity')"
    if (hundredths := _hundredths(value)) is not None:
        if 0 < hundredths <= 100_00:
            return None
        return f"{describe(value)}: a percentage of the memory is above 0% and at most 100%"
    return (
        f"{describe(value)}: expected bytes with an optional K/M/G/T suffix ('512M'), "
        "a percentage with at most two decimals ('12.5%') or 'infinity'"
    )


def check_percent(value: str) -> str | None:
    hundredths = _hundredths(value)
    if hundredths is not None and 0 < hundredths <= MAX_CPU_QUOTA_HUNDREDTHS:
        return None
    return (
        f"{describe(value)}: expected a percentage of one CPU with at most two decimals, "
        f"above 0% and at most {MAX_CPU_QUOTA_HUNDREDTHS / 100:.2f}% ('50%', '200%' for two CPUs)"
    )


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
        return Probe(
            **common,
            url=section.string("url", check=httpwire.url_problem),
            expect_status=_expect_status(section),
            expect_body=section.string(
                "expect_body", None, nonempty=False, check=launch.text_problem
            ),
        )
    if kind == "tcp":
        return Probe(
            **common,
            host=section.string("host", "127.0.0.1", check=httpwire.host_problem),
            port=section.integer("port", minimum=1, maximum=65535),
        )
    return Probe(**common, command=launch.read_command(section, "command"))


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


def _paths(spec: Section, key: str) -> tuple[str, ...]:
    paths = spec.strings(key, [])
    for i, path in enumerate(paths):
        if (problem := check_absolute_path(path)) is not None:
            raise item_error(spec, key, i, problem)
    return tuple(dict.fromkeys(normalise_path(path) for path in paths))


@dataclass(frozen=True)
class Sandboxed:
    """What a spec of something keel runs at a tier says about how it runs.

    Agents and MCP servers (:mod:`keel.mcp.spec`) share these keys, read by
    :func:`parse_sandboxed` alike.
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
    """``command``: an argv whose program is a path systemd can run."""
    command = launch.read_command(spec, "command")
    if (problem := check_program(command[0])) is not None:
        raise item_error(spec, "command", 0, problem)
    return command


def parse_sandboxed(
    spec: Section, command: tuple[str, ...], *, default_user: str, what: str = "agents"
) -> Sandboxed:
    """``tier``, ``user``, paths, ``environment``, ``egress`` and ``resources`` of a spec."""
    tier = spec.integer("tier")
    if tier not in TIERS:
        raise spec.error("tier", f"expected 0, 1 or 2, got {tier}")
    user = spec.string("user", default_user, check=check_user)
    if user == "root" and tier != 0:
        raise spec.error(
            "user", f"tier {tier} {what} run as their own user, not root; drop the key"
        )
    working_directory = spec.string("workingDirectory", None, check=check_absolute_path)
    if working_directory is not None:
        working_directory = normalise_path(working_directory)
    environment = launch.read_environment(spec, "environment")
    launch.check_exec_size(spec, "environment", command, environment)
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
            tasks_max=res.integer("tasksMax", None, minimum=1, maximum=MAX_TASKS),
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
        run = parse_sandboxed(spec, command, default_user=USER_PREFIX + name)
        # Which capabilities exist and which a tier may take is tiers.json's
        # to say (keel.agents.units checks it); here only the form.
        capabilities = spec.strings("capabilities", [])
        for i, capability in enumerate(capabilities):
            if not _CAPABILITY.match(capability):
                raise item_error(
                    spec,
                    "capabilities",
                    i,
                    f"{describe(capability)}: write capabilities as in capabilities(7), "
                    "e.g. 'CAP_NET_BIND_SERVICE'",
                )
        with spec.section("health", optional=True) as health:
            probes = tuple(
                _probe_checked(probe_section)
                for probe_section in health.section_list("probes", default=[])
            )
            watchdog_sec = health.number(
                "watchdogSec", None, minimum=WATCHDOG_RANGE[0], maximum=WATCHDOG_RANGE[1]
            )
        mesh = read_grant(spec)

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
        mesh=mesh,
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
                f"{path}: name: agent {describe(spec.name)} is already defined in {seen[spec.name]}"
            )
        seen[spec.name] = path
        specs.append(spec)
    return specs
