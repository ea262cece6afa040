"""Install agents on a plain systemd host (Debian, Ubuntu): what the NixOS module
does declaratively, done imperatively and idempotently.

For each spec: its system user (``useradd --system``) if missing, its missing
``readWritePaths`` (owned by that user, mode 0750), its normalised spec in
``/etc/keel/agents/<name>.json`` (where ``keel agents list``, watch and egress
read it), its unit in ``/etc/systemd/system``; then one ``daemon-reload`` if
any unit changed, ``enable`` every unit, ``restart`` those whose unit changed
and ``start`` the others (a no-op when running). Running it twice changes
nothing the second time. :func:`plan` computes the steps without touching
anything (``--dry-run`` prints them).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from keel.agents.spec import AgentSpec
from keel.agents.units import Tiers, render_unit
from keel.errors import KeelError

UNIT_DIR = Path("/etc/systemd/system")
SPEC_DIR = Path("/etc/keel/agents")


def spec_text(spec: AgentSpec) -> str:
    return json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n"


@dataclass
class Plan:
    """The steps an install takes, in order; ``describe`` says each in a line."""

    users: list[tuple[str, str]] = field(default_factory=list)  # (user, home)
    directories: list[tuple[Path, str]] = field(default_factory=list)  # (path, owner)
    files: list[tuple[Path, str]] = field(default_factory=list)  # (path, content)
    changed_units: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = [f"create system user {user} (home {home}, no login)" for user, home in self.users]
        lines += [
            f"create directory {path} (owner {owner}, mode 0750)"
            for path, owner in self.directories
        ]
        lines += [f"write {path}" for path, _ in self.files]
        if self.changed_units:
            lines.append("systemctl daemon-reload")
        for unit in self.units:
            verb = "restart" if unit in self.changed_units else "start"
            lines.append(f"systemctl enable {unit}; systemctl {verb} {unit}")
        return lines


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _current(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeelError(f"{path}: cannot read: {exc.strerror}") from None


def plan(
    specs: Sequence[AgentSpec],
    tiers: Tiers,
    *,
    unit_dir: Path = UNIT_DIR,
    spec_dir: Path = SPEC_DIR,
    user_exists: Callable[[str], bool] = _user_exists,
) -> Plan:
    """What installing ``specs`` would change on this host (reads, never writes)."""
    result = Plan()
    new_users: set[str] = set()
    for spec in specs:
        if not user_exists(spec.user) and spec.user not in new_users:
            new_users.add(spec.user)
            result.users.append((spec.user, spec.state_directory))
        for path in map(Path, spec.read_write_paths):
            if not path.exists():
                result.directories.append((path, spec.user))
        spec_file = spec_dir / f"{spec.name}.json"
        if _current(spec_file) != spec_text(spec):
            result.files.append((spec_file, spec_text(spec)))
        unit_file = unit_dir / spec.unit_name
        unit = render_unit(spec, tiers)
        if _current(unit_file) != unit:
            result.files.append((unit_file, unit))
            result.changed_units.append(spec.unit_name)
        result.units.append(spec.unit_name)
    return result


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise KeelError(f"{argv[0]}: not found; keel agents install needs a systemd host") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        hint = detail[-1] if detail else f"exit status {proc.returncode}"
        raise KeelError(f"`{' '.join(argv)}` failed: {hint}")


def _write_atomically(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.keel-tmp")
    temporary.write_text(content, encoding="utf-8")
    temporary.chmod(0o644)
    os.replace(temporary, path)


def apply(steps: Plan, *, run: Callable[[list[str]], None] = _run) -> None:
    """Carry out a plan: users, directories, files, then systemd."""
    if os.geteuid() != 0:
        raise KeelError(
            "keel agents install must run as root (it creates users and writes "
            "/etc/systemd/system); try --dry-run to see what it would do"
        )
    if shutil.which("systemctl") is None:
        raise KeelError("systemctl: not found; keel agents install needs a systemd host")
    nologin = next(
        (s for s in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false") if Path(s).exists()),
        "/bin/false",
    )
    for user, home in steps.users:
        run(
            [
                "useradd", "--system", "--user-group", "--no-create-home",
                "--home-dir", home, "--shell", nologin, user,
            ]
        )  # fmt: skip
    for path, owner in steps.directories:
        path.mkdir(mode=0o750, parents=True, exist_ok=True)
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    for path, content in steps.files:
        _write_atomically(path, content)
    if steps.changed_units:
        run(["systemctl", "daemon-reload"])
    for unit in steps.units:
        run(["systemctl", "enable", "--quiet", unit])
        try:
            run(["systemctl", "restart" if unit in steps.changed_units else "start", unit])
        except KeelError as exc:
            raise KeelError(f"{unit} did not start ({exc}); see `journalctl -u {unit}`") from None


def installed_specs(spec_dir: Path = SPEC_DIR) -> list[Path]:
    """The spec files of the agents installed on this host, by name."""
    if not spec_dir.is_dir():
        return []
    return sorted(spec_dir.glob("*.json"))


def unit_states(units: Sequence[str]) -> dict[str, dict[str, str]]:
    """``systemctl show`` of each unit (ActiveState, SubState, MainPID, NRestarts)."""
    if not units or shutil.which("systemctl") is None:
        return {}
    proc = subprocess.run(
        [
            "systemctl", "show", "--property=Id,ActiveState,SubState,MainPID,NRestarts",
            *units,
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    states: dict[str, dict[str, str]] = {}
    for block in proc.stdout.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in fields:
            states[fields["Id"]] = fields
    return states
