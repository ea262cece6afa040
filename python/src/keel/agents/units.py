"""Render an agent's systemd unit from its spec and ``tiers.json``, nothing else.

``modules/tiers.json`` holds each trust tier's directives once; the NixOS
module merges them the same way (``common // tiers.<n> // per-agent``, later
keys replacing earlier ones), so a Debian host, the system tests and NixOS run
an agent under the same sandbox::

    tiers = load_tiers()                       # the packaged tiers.json
    text = render_unit(spec, tiers)            # the unit file, as a string

The per-agent directives, in the order they are rendered, are listed in
``docs/agents.md`` ("From spec to unit").
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

from keel.agents.spec import TIERS, AgentSpec
from keel.config import Section, describe, load_json_file
from keel.errors import ConfigError

Value = str | bool | int | list[str]
Directives = dict[str, Value]

_DIRECTIVE = re.compile(r"[A-Z][A-Za-z0-9]*\Z")
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+\Z")


@dataclass(frozen=True)
class Tier:
    description: str
    unit: Directives
    service: Directives
    # The capabilities an agent of this tier may declare; None: any known one.
    capabilities: frozenset[str] | None = None


@dataclass(frozen=True)
class Tiers:
    """The parsed ``tiers.json``: directives common to all agents and per tier."""

    source: str
    common_unit: Directives
    common_service: Directives
    tiers: dict[int, Tier]
    known_capabilities: frozenset[str] = frozenset()

    def service_directives(self, tier: int) -> Directives:
        return {**self.common_service, **self.tiers[tier].service}

    def unit_directives(self, tier: int) -> Directives:
        return {**self.common_unit, **self.tiers[tier].unit}


def packaged_tiers() -> Path:
    """Where the installed package keeps ``tiers.json`` (a copy of ``modules/tiers.json``)."""
    resource = importlib.resources.files("keel") / "data" / "tiers.json"
    return Path(str(resource))


def _directives(section: Section, key: str) -> Directives:
    out: Directives = {}
    with section.section(key, optional=True) as block:
        names = block.keys()
        for name in names:
            value = block.raw(name)
            if not _DIRECTIVE.match(name):
                raise block.error(
                    name, "not a systemd directive name (CamelCase, e.g. ProtectHome)"
                )
            if isinstance(value, list):
                if not all(isinstance(item, str) for item in value):
                    raise block.error(name, "a list must hold strings only")
            elif not isinstance(value, str | bool | int):
                raise block.error(
                    name, "expected a string, true/false, a number or a list of strings"
                )
            for item in value if isinstance(value, list) else [str(value)]:
                if (problem := raw_value_problem(item)) is not None:
                    raise block.error(name, problem)
            out[name] = value
    return out


def raw_value_problem(text: str) -> str | None:
    """Why ``text`` cannot be written after ``Directive=`` as it is, or None.

    tiers.json holds systemd syntax (``~@privileged @resources``), written to
    the unit unchanged; it must stay on its line: no control or other invisible
    character (a '\\r' or NUL would end the line and start a directive of its
    own), and no backslash at the end (which joins the next line to it).
    """
    odd = next((c for c in text if not c.isprintable()), None)
    if odd is not None:
        return (
            f"{describe(text)} contains {describe(odd)}: values in tiers.json are single "
            "lines of printable text"
        )
    if text.endswith("\\"):
        return f"{describe(text)} ends with a backslash, which would join the next line to it"
    return None


def parse_tiers(data: object, *, source: str) -> Tiers:
    with Section(data, source=source) as top:
        top.raw("$comment", None)
        version = top.integer("version")
        if version != 1:
            raise top.error("version", f"this keel reads version 1, got {version}")
        known = frozenset(top.strings("capabilities", []))
        with top.section("common") as common:
            common_unit = _directives(common, "unitConfig")
            common_service = _directives(common, "serviceConfig")
        tiers: dict[int, Tier] = {}
        with top.section("tiers") as tier_sections:
            for key, tier_section in tier_sections.sections():
                if key not in {str(t) for t in TIERS}:
                    raise tier_sections.error(key, 'tiers are named "0", "1" and "2"')
                with tier_section:
                    tiers[int(key)] = Tier(
                        description=tier_section.string("description", check=raw_value_problem),
                        unit=_directives(tier_section, "unitConfig"),
                        service=_directives(tier_section, "serviceConfig"),
                        capabilities=_tier_capabilities(tier_section, known),
                    )
        missing = [t for t in TIERS if t not in tiers]
        if missing:
            raise top.error("tiers", f"tier {missing[0]} is not defined")
    return Tiers(source, common_unit, common_service, tiers, known)


def _tier_capabilities(section: Section, known: frozenset[str]) -> frozenset[str] | None:
    """A tier's ``capabilities``: ``"any"`` (the default) or a list of known ones."""
    raw = section.raw("capabilities", "any")
    if raw == "any":
        return None
    allowed = section.strings("capabilities")
    for name in allowed:
        if name not in known:
            raise section.error("capabilities", f"{describe(name)} is not in the top-level list")
    return frozenset(allowed)


def load_tiers(path: Path | None = None) -> Tiers:
    """Read ``tiers.json`` (the packaged copy unless ``path`` is given)."""
    path = path or packaged_tiers()
    return parse_tiers(load_json_file(path, what="tiers"), source=str(path))


# --- quoting (systemd.syntax(7), systemd.service(5) "Command lines") -----------
#
# systemd reads an ExecStart= or Environment= value as words (extract_first_word
# with EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE): double quotes group, and C escapes
# are decoded inside and outside them. It then expands specifiers ("%n") in each
# word, so a literal '%' is written "%%"; ExecStart= words are also expanded for
# environment variables when the program starts ("$X", "${X}"), so a literal '$'
# is written "$$" there (Environment= values are never expanded). A line ends
# at '\n', '\r' or NUL whatever the quoting, which is why no raw control
# character may reach the file: each one is written as an escape instead.
# Values hold no NUL (keel.launch refuses it: no escape can carry one).

_C_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def _escape_char(char: str) -> str:
    if (escaped := _C_ESCAPES.get(char)) is not None:
        return escaped
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    if code > 0xFFFF:
        return f"\\U{code:08x}"
    return f"\\u{code:04x}"


def escape_word(text: str, *, dollar: bool) -> str:
    """``text`` as the inside of a double-quoted word that systemd reads back as ``text``.

    Backslashes, quotes and every character that is not printable (controls,
    line and paragraph separators, bidi and other format characters) become C
    escapes, ``%`` becomes ``%%`` and, with ``dollar``, ``$`` becomes ``$$``.
    """
    out: list[str] = []
    for char in text:
        if char == "%":
            out.append("%%")
        elif char == "$" and dollar:
            out.append("$$")
        elif char in _C_ESCAPES or not char.isprintable():
            out.append(_escape_char(char))
        else:
            out.append(char)
    return "".join(out)


def quote_exec_arg(arg: str) -> str:
    """One argv word for ExecStart=: specifiers (%) and variables ($) kept literal."""
    escaped = escape_word(arg, dollar=True)
    if escaped and _PLAIN_WORD.match(escaped):
        return escaped
    return f'"{escaped}"'


def quote_assignment(key: str, value: str) -> str:
    """One ``Environment=`` word, ``"KEY=value"`` (``key`` is a valid variable name)."""
    return f'"{key}={escape_word(value, dollar=False)}"'


def format_seconds(seconds: float) -> str:
    """A time span for systemd, to the microsecond: ``2.5s``, ``10s``, ``0.001s``."""
    usec = round(seconds * 1_000_000)
    whole, fraction = divmod(usec, 1_000_000)
    return f"{whole}.{fraction:06d}".rstrip("0").rstrip(".") + "s"


def _render_value(value: Value) -> list[str]:
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, list):
        return list(value)
    return [str(value)]


def agent_directives(spec: AgentSpec) -> Directives:
    """The directives that come from the spec itself (see docs/agents.md)."""
    directives: Directives = {
        "User": spec.user,
        "ExecStart": " ".join(quote_exec_arg(arg) for arg in spec.command),
        "StateDirectory": f"{spec.role.state_root}/{spec.name}",
        "WorkingDirectory": (spec.working_directory or spec.state_directory).replace("%", "%%"),
    }
    if spec.environment:
        directives["Environment"] = [quote_assignment(k, v) for k, v in spec.environment.items()]
    if spec.environment_files:
        directives["EnvironmentFile"] = [p.replace("%", "%%") for p in spec.environment_files]
    if spec.read_write_paths:
        directives["ReadWritePaths"] = [p.replace("%", "%%") for p in spec.read_write_paths]
    if spec.resources.memory_max is not None:
        directives["MemoryMax"] = spec.resources.memory_max
    if spec.resources.cpu_quota is not None:
        directives["CPUQuota"] = spec.resources.cpu_quota
    if spec.resources.tasks_max is not None:
        directives["TasksMax"] = spec.resources.tasks_max
    if spec.watchdog_sec is not None:
        directives["WatchdogSec"] = format_seconds(spec.watchdog_sec)
    return directives


# Bit numbers of the capabilities (linux/capability.h), to read /proc/PID/status.
CAPABILITY_BITS = {
    name: bit
    for bit, name in enumerate(
        [
            "CHOWN",
            "DAC_OVERRIDE",
            "DAC_READ_SEARCH",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "LINUX_IMMUTABLE",
            "NET_BIND_SERVICE",
            "NET_BROADCAST",
            "NET_ADMIN",
            "NET_RAW",
            "IPC_LOCK",
            "IPC_OWNER",
            "SYS_MODULE",
            "SYS_RAWIO",
            "SYS_CHROOT",
            "SYS_PTRACE",
            "SYS_PACCT",
            "SYS_ADMIN",
            "SYS_BOOT",
            "SYS_NICE",
            "SYS_RESOURCE",
            "SYS_TIME",
            "SYS_TTY_CONFIG",
            "MKNOD",
            "LEASE",
            "AUDIT_WRITE",
            "AUDIT_CONTROL",
            "SETFCAP",
            "MAC_OVERRIDE",
            "MAC_ADMIN",
            "SYSLOG",
            "WAKE_ALARM",
            "BLOCK_SUSPEND",
            "AUDIT_READ",
            "PERFMON",
            "BPF",
            "CHECKPOINT_RESTORE",
        ]
    )
}


def capability_mask(names: tuple[str, ...] | list[str]) -> int:
    """The /proc/PID/status bit mask (CapEff, CapBnd...) of these capabilities."""
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITY_BITS[name.removeprefix("CAP_")]
    return mask


def capability_directives(spec: AgentSpec, tiers: Tiers) -> Directives:
    """The declared capabilities, checked against what the agent's tier allows.

    Tier 0 keeps systemd's bounding set and gets the capabilities as ambient
    ones (for a tier-0 agent that is not root); tiers 1 and 2 get exactly the
    declared set, bounding and ambient, instead of tiers.json's empty one.
    """
    if not spec.capabilities:
        return {}
    allowed = tiers.tiers[spec.tier].capabilities
    where = spec.source or f"agent {spec.name!r}"
    for i, capability in enumerate(spec.capabilities):
        if capability not in tiers.known_capabilities:
            raise ConfigError(
                f"{where}: capabilities[{i}]: {describe(capability)} is not a Linux capability "
                f"known to {tiers.source}"
            )
        if allowed is not None and capability not in allowed:
            may = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(
                f"{where}: capabilities[{i}]: tier {spec.tier} agents may declare only {may}; "
                f"{capability} would let the agent out of its sandbox (use tier 1)"
            )
    declared = " ".join(spec.capabilities)
    if spec.tier == 0:
        return {"AmbientCapabilities": declared}
    return {"CapabilityBoundingSet": declared, "AmbientCapabilities": declared}


def service_directives(spec: AgentSpec, tiers: Tiers) -> Directives:
    """Everything in ``[Service]``: common, then the tier's, then the agent's own."""
    return {
        **tiers.service_directives(spec.tier),
        **capability_directives(spec, tiers),
        **agent_directives(spec),
    }


def render_unit(spec: AgentSpec, tiers: Tiers, *, unit_extra: Directives | None = None) -> str:
    """The unit file; ``unit_extra`` adds ``[Unit]`` directives (an MCP server's socket)."""
    if spec.tier not in tiers.tiers:
        raise ConfigError(f"{tiers.source}: tiers.{spec.tier}: not defined")
    unit: Directives = {
        "Description": f"keel {spec.role.title} {spec.name} (tier {spec.tier})",
        **tiers.unit_directives(spec.tier),
        **(unit_extra or {}),
    }
    sections: list[tuple[str, Directives]] = [
        ("Unit", unit),
        ("Service", service_directives(spec, tiers)),
        ("Install", {"WantedBy": "multi-user.target"}),
    ]
    lines = [
        f"# keel {spec.role.title} {spec.name!r}, tier {spec.tier}: {tiers.tiers[spec.tier].description}",
        "# Rendered by keel from the agent's spec and tiers.json; edit those, not this file.",
    ]
    for title, directives in sections:
        lines.append("")
        lines.append(f"[{title}]")
        for key, value in directives.items():
            lines.extend(f"{key}={item}" for item in _render_value(value))
    return "\n".join(lines) + "\n"
