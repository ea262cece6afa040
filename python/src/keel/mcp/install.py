"""``keel mcp add/remove`` on a plain systemd host: what the NixOS module declares.

``add`` is :mod:`keel.agents.install` for MCP servers (the same plan and the
same steps: users, spec files, units, daemon-reload, enable, start), plus the
socket unit of each stdio server, then a restart of the gateway
(``keel-mcp.service``, when installed) so it serves the new set. ``remove``
stops and disables a server's units, deletes them and its spec, and restarts
the gateway; the server's user and state directory stay (data is never
deleted by keel).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from keel.agents import install as agents_install
from keel.agents.units import Tiers
from keel.errors import KeelError
from keel.mcp.spec import USER_PREFIX, ServerSpec
from keel.mcp.units import keel_program, render_units

UNIT_DIR = agents_install.UNIT_DIR
SPEC_DIR = Path("/etc/keel/mcp/servers")
CONFIG = Path("/etc/keel/mcp.json")
GATEWAY_UNIT = "keel-mcp.service"


def gateway_unit(program: str | None = None) -> str:
    """keel-mcp.service for a plain systemd host (NixOS renders its own in mcp.nix)."""
    keel = program or keel_program()
    return "\n".join(
        [
            "# keel's MCP gateway. Rendered by `keel mcp add`; edit /etc/keel/mcp.json instead.",
            "[Unit]",
            "Description=keel mcp: the gateway between agents and MCP tool servers",
            "After=network.target sockets.target",
            "",
            "[Service]",
            "Type=notify",
            "NotifyAccess=main",
            f"ExecStart={keel} mcp serve --config {CONFIG}",
            "WatchdogSec=10s",
            "Restart=always",
            "RestartSec=500ms",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectControlGroups=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "CapabilityBoundingSet=",
            "UMask=0007",
            # /run/keel-mcp: the agents' socket; /run/keel: the control socket;
            # /var/lib/keel: the ledger. Kept across restarts (others use them too).
            "RuntimeDirectory=keel-mcp keel",
            "RuntimeDirectoryMode=0755",
            "RuntimeDirectoryPreserve=yes",
            "StateDirectory=keel",
            "StateDirectoryMode=0750",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def spec_text(spec: ServerSpec) -> str:
    return json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n"


# The same reads as `keel agents install`'s.
_current = agents_install._current
_user_exists = agents_install._user_exists


@dataclass
class AddPlan(agents_install.Plan):
    """An agents install plan, and the gateway restart that makes it take effect."""

    restart_gateway: bool = True

    def describe(self) -> list[str]:
        lines = super().describe()
        if self.restart_gateway:
            lines.append(f"systemctl try-restart {GATEWAY_UNIT}")
        return lines


def plan_add(
    specs: Sequence[ServerSpec],
    tiers: Tiers,
    *,
    unit_dir: Path = UNIT_DIR,
    spec_dir: Path = SPEC_DIR,
    config: Path = CONFIG,
    user_exists: Callable[[str], bool] | None = None,
    program: str | None = None,
) -> AddPlan:
    exists = user_exists or _user_exists
    result = AddPlan()
    # The gateway itself, the first time: its unit and a config of defaults
    # (servers from /etc/keel/mcp/servers, agents from /etc/keel/agents).
    if _current(config) is None:
        result.files.append((config, "{}\n"))
    gateway = gateway_unit(program)
    if _current(unit_dir / GATEWAY_UNIT) != gateway:
        result.files.append((unit_dir / GATEWAY_UNIT, gateway))
        result.changed_units.append(GATEWAY_UNIT)
    for spec in specs:
        spec_file = spec_dir / f"{spec.name}.json"
        if _current(spec_file) != spec_text(spec):
            result.files.append((spec_file, spec_text(spec)))
        if not spec.runs_here:
            continue
        if not exists(spec.user) and spec.user not in {u for u, _ in result.users}:
            result.users.append((spec.user, f"/var/lib/keel-mcp/{spec.name}"))
        for path in map(Path, spec.read_write_paths):
            if not path.exists():
                result.directories.append((path, spec.user))
        for name, text in render_units(spec, tiers, program=program).items():
            if _current(unit_dir / name) != text:
                result.files.append((unit_dir / name, text))
                result.changed_units.append(name)
        # The socket first: the service needs it.
        if spec.url is None:
            result.units.append(spec.socket_unit_name)
        result.units.append(spec.unit_name)
    result.units.append(GATEWAY_UNIT)
    result.restart_gateway = bool(result.files) and GATEWAY_UNIT not in result.changed_units
    return result


@dataclass
class RemovePlan:
    units: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = [f"systemctl disable --now {unit}" for unit in self.units]
        lines += [f"remove {path}" for path in self.files]
        if self.units:
            lines.append("systemctl daemon-reload")
        if self.files:
            lines.append(f"systemctl try-restart {GATEWAY_UNIT}")
        return lines


def plan_remove(
    names: Sequence[str], *, unit_dir: Path = UNIT_DIR, spec_dir: Path = SPEC_DIR
) -> RemovePlan:
    result = RemovePlan()
    for name in names:
        spec_file = spec_dir / f"{name}.json"
        units = [f"{USER_PREFIX}{name}.service", f"{USER_PREFIX}{name}.socket"]
        present = [unit for unit in units if (unit_dir / unit).exists()]
        if not spec_file.exists() and not present:
            raise KeelError(f"no MCP server named {name!r} is installed (no {spec_file})")
        result.units += present
        result.files += [unit_dir / unit for unit in present]
        if spec_file.exists():
            result.files.append(spec_file)
    return result


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise KeelError(f"`{' '.join(argv)}` failed: {detail[-1] if detail else proc.returncode}")


def apply(steps: AddPlan | RemovePlan, *, run: Callable[[list[str]], None] = _run) -> None:
    if os.geteuid() != 0:
        raise KeelError(
            "keel mcp add/remove must run as root (it writes /etc/systemd/system); try --dry-run"
        )
    if shutil.which("systemctl") is None:
        raise KeelError("systemctl: not found; keel mcp add/remove needs a systemd host")
    if isinstance(steps, AddPlan):
        agents_install.apply(steps, run=run)
        if steps.restart_gateway:
            run(["systemctl", "try-restart", GATEWAY_UNIT])
        return
    for unit in steps.units:
        run(["systemctl", "disable", "--now", "--quiet", unit])
    for path in steps.files:
        path.unlink(missing_ok=True)
    if steps.units:
        run(["systemctl", "daemon-reload"])
    if steps.files:
        run(["systemctl", "try-restart", GATEWAY_UNIT])
