"""What the conformance checks share: reading a keel host through testinfra.

The contract checked here is the one keel's installers write: agent specs in
``/etc/keel/agents/<name>.json`` (``keel agents install``; the NixOS module
writes the same files), units ``keel-agent-<name>.service`` rendered from a
spec and ``tiers.json``, daemons ``keel-<service>.service`` serving
``/run/keel/<service>.sock``, the ledger at ``/var/lib/keel/ledger.db``.
"""

from __future__ import annotations

import errno
import json
import re
import shlex
from typing import Any

from keel.agents.spec import AgentSpec, parse_spec
from keel.agents.units import Directives, Tiers, capability_mask, service_directives
from keel.errors import ConfigError
from keel.mcp.spec import ServerSpec, parse_server_spec

SPEC_DIR = "/etc/keel/agents"
MCP_CONFIG = "/etc/keel/mcp.json"
MCP_SERVERS_DIR = "/etc/keel/mcp/servers"
RUNTIME_DIR = "/run/keel"
DAEMONS = ("watch", "egress", "safeswitch", "mesh")  # each serves /run/keel/<name>.sock


def show(host: Any, unit: str, *properties: str) -> dict[str, str]:
    """``systemctl show`` of ``unit``: the properties asked for, empty ones included."""
    argv = ["systemctl", "show", unit, *[f"--property={p}" for p in properties]]
    out = host.check_output(shlex.join(argv))
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {p: values.get(p, "") for p in properties}


def unit_files(host: Any, pattern: str, state: str | None = None) -> list[str]:
    argv = ["systemctl", "list-unit-files", "--no-legend", "--plain", "--type=service", pattern]
    if state:
        argv.append(f"--state={state}")
    out = host.check_output(shlex.join(argv))
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def _json_files(host: Any, directory: str) -> list[tuple[str, Any]]:
    """(path, parsed JSON) of every ``*.json`` in a directory of the host, by name."""
    if not host.file(directory).is_directory:
        return []
    found = []
    for name in sorted(host.file(directory).listdir()):
        if not name.endswith(".json"):
            continue
        path = f"{directory}/{name}"
        try:
            found.append((path, json.loads(host.file(path).content_string)))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    return found


def agent_specs(host: Any, directory: str = SPEC_DIR) -> list[AgentSpec]:
    """Every spec in /etc/keel/agents, validated; a bad one fails naming the file."""
    return [parse_spec(data, source=path) for path, data in _json_files(host, directory)]


def server_specs(host: Any, directory: str | None = None) -> list[ServerSpec]:
    """The MCP server specs of the host: ``directory``'s, or those /etc/keel/mcp.json
    holds (inline, as NixOS writes them, or in the directory it names)."""
    if directory is None:
        servers: Any = MCP_SERVERS_DIR
        if host.file(MCP_CONFIG).exists:
            servers = json.loads(host.file(MCP_CONFIG).content_string).get("servers", servers)
        if isinstance(servers, dict):
            return [
                parse_server_spec(data, source=f"{MCP_CONFIG}: servers.{name}")
                for name, data in sorted(servers.items())
            ]
        directory = str(servers)
    return [parse_server_spec(data, source=path) for path, data in _json_files(host, directory)]


class HostSpecs:
    """Installed specs read through testinfra (for configs that name a spec directory)."""

    def __init__(self, host: Any) -> None:
        self.host = host

    def agents(self, directory: str) -> list[AgentSpec]:
        return agent_specs(self.host, directory)

    def servers(self, directory: str) -> list[ServerSpec]:
        return server_specs(self.host, directory)


# --- comparing what systemd reports with what the unit should say ------------


def _seconds(span: str) -> float:
    """A systemd time span as printed by ``systemctl show`` (``1min 30s``, ``500ms``)."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)\s*(us|ms|min|s|h|d)", span):
        total += float(number) * units[unit]
    return total


def _bytes(size: str) -> int:
    factors = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if size[-1:] in factors:
        return int(size[:-1]) * factors[size[-1]]
    return int(size)


def _words(value: str) -> set[str]:
    return set(shlex.split(value))


def _rendered(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


# Directives whose `systemctl show` property has another name or form.
PROPERTY = {
    "RestartSec": "RestartUSec",
    "WatchdogSec": "WatchdogUSec",
    "CPUQuota": "CPUQuotaPerSecUSec",
    "EnvironmentFile": "EnvironmentFiles",
}
# What a SystemCallFilter of @system-service minus @privileged must not allow.
PRIVILEGED_SYSCALLS = ("reboot", "swapon", "init_module", "setuid", "chroot", "pivot_root")


def mismatch(directive: str, expected: Any, shown: str) -> str | None:
    """Why ``shown`` (from systemctl show) does not match the directive's value, or None."""
    lines = _rendered(expected)
    text = " ".join(lines)
    if directive == "SystemCallFilter":
        allowed = set(shown.split())
        leaks = [call for call in PRIVILEGED_SYSCALLS if call in allowed]
        if not allowed or "~" in shown:
            return f"expected an allow-list filter, systemd reports {shown[:60]!r}"
        return f"allows privileged system calls {leaks}" if leaks else None
    if directive == "SystemCallErrorNumber":
        number = getattr(errno, text, None)
        return None if shown in (text, str(number)) else f"expected {text}, got {shown!r}"
    if directive in ("RestartSec", "WatchdogSec"):
        ok = abs(_seconds(shown) - _seconds(text)) < 1e-6
        return None if ok else f"expected {text}, got {shown!r}"
    if directive == "CPUQuota":
        ok = abs(_seconds(shown) - float(text.rstrip("%")) / 100) < 1e-6
        return None if ok else f"expected {text} (of a second per second), got {shown!r}"
    if directive == "MemoryMax":
        return None if shown == str(_bytes(text)) else f"expected {text}, got {shown!r}"
    if directive in ("RestrictAddressFamilies", "ReadWritePaths", "InaccessiblePaths", "After"):
        wanted = {word for line in lines for word in line.split()}
        missing = wanted - set(shown.split())
        return f"missing {sorted(missing)} in {shown!r}" if missing else None
    if directive == "Environment":
        wanted = {word for line in lines for word in shlex.split(line.replace("%%", "%"))}
        missing = wanted - _words(shown)
        return f"missing {sorted(missing)}" if missing else None
    if directive == "EnvironmentFile":
        absent = [path for path in lines if path not in shown]
        return f"missing {absent} in {shown!r}" if absent else None
    if directive == "ExecStart":
        return None  # compared with the spec's argv in sandbox_problems
    if directive in ("WorkingDirectory",):
        return None if shown == text.replace("%%", "%") else f"expected {text}, got {shown!r}"
    return None if shown == text else f"expected {text!r}, got {shown!r}"


def sandbox_problems(host: Any, spec: AgentSpec, tiers: Tiers) -> list[str]:
    """Every directive of the agent's unit that systemd does not report as rendered."""
    expected: Directives = service_directives(spec, tiers)
    properties = [PROPERTY.get(d, d) for d in expected]
    shown = show(host, spec.unit_name, *properties, "ExecStart")
    problems = []
    for directive, value in expected.items():
        problem = mismatch(directive, value, shown[PROPERTY.get(directive, directive)])
        if problem:
            problems.append(f"{spec.unit_name}: {directive}: {problem}")
    argv = " ".join(spec.command)
    if f"argv[]={argv} ;" not in shown["ExecStart"]:
        problems.append(
            f"{spec.unit_name}: ExecStart: expected argv {argv!r}, got {shown['ExecStart'][:200]!r}"
        )
    return problems


def process_status(host: Any, pid: int) -> dict[str, str]:
    out = host.check_output(f"cat /proc/{pid}/status")
    return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def runtime_problems(host: Any, spec: AgentSpec) -> list[str]:
    """What the agent's running process shows of its sandbox (uid, privileges, seccomp)."""
    state = show(host, spec.unit_name, "MainPID", "ActiveState")
    pid = int(state["MainPID"] or 0)
    if state["ActiveState"] != "active" or pid == 0:
        return [f"{spec.unit_name}: not running (ActiveState={state['ActiveState']})"]
    status = process_status(host, pid)
    problems = []
    uid = host.user(spec.user).uid
    if status["Uid"].split()[0] != str(uid):
        problems.append(
            f"{spec.unit_name}: runs as uid {status['Uid'].split()[0]}, not {spec.user} ({uid})"
        )
    if spec.tier >= 1:
        if status["NoNewPrivs"] != "1":
            problems.append(f"{spec.unit_name}: NoNewPrivs is {status['NoNewPrivs']}")
        declared = capability_mask(spec.capabilities)
        if (int(status["CapEff"], 16) | int(status["CapBnd"], 16)) & ~declared:
            problems.append(
                f"{spec.unit_name}: has capabilities it did not declare "
                f"(CapEff {status['CapEff']}, CapBnd {status['CapBnd']})"
            )
    if spec.tier >= 2 and status["Seccomp"] != "2":
        problems.append(f"{spec.unit_name}: no seccomp filter (Seccomp {status['Seccomp']})")
    return problems
