"""``keel switch install-units``: safeswitch's units on a plain systemd host.

What modules/safeswitch.nix declares on NixOS, done imperatively and
idempotently with :mod:`keel.agents.install`'s steps: the unit files
(:mod:`keel.safeswitch.units`), the polkit rule when users are allowed,
``daemon-reload`` when a unit changed, and the reconcile unit enabled and
started (it records nothing on a host that did not reboot mid-switch).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from keel.agents import install as agents_install
from keel.errors import KeelError, UsageError
from keel.mcp.units import keel_program
from keel.safeswitch import units

UNIT_DIR = agents_install.UNIT_DIR


def plan(
    *,
    allow: Sequence[str],
    unit_dir: Path = UNIT_DIR,
    rule: Path = Path(units.POLKIT_RULE),
    program: str | None = None,
    user_exists: Callable[[str], bool] = agents_install._user_exists,
) -> agents_install.Plan:
    """What installing would change here (reads, never writes)."""
    for user in allow:
        if not user_exists(user):
            raise UsageError(f"--allow {user}: no such user on this host")
    keel = program or keel_program()
    wanted = {
        unit_dir / units.TEMPLATE_UNIT: units.template_unit(keel),
        unit_dir / units.RECONCILE_UNIT: units.reconcile_unit(keel),
    }
    if allow:
        wanted[rule] = units.polkit_rule(allow)
    result = agents_install.Plan()
    for path, text in wanted.items():
        if agents_install._current(path) != text:
            result.files.append((path, text))
            if path.parent == unit_dir:
                result.changed_units.append(path.name)
    result.units.append(units.RECONCILE_UNIT)
    return result


def apply(steps: agents_install.Plan) -> None:
    if os.geteuid() != 0:
        raise KeelError(
            "keel switch install-units must run as root (it writes /etc/systemd/system and "
            "/etc/polkit-1); try --dry-run"
        )
    if shutil.which("systemctl") is None:
        raise KeelError("systemctl: not found; keel switch install-units needs a systemd host")
    agents_install.apply(steps)
