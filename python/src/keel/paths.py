"""Default locations of keel's files, on an installed host and in dev mode.

An installed host (NixOS module or ``keel agents install``) has ``/etc/keel``;
its state lives under ``/var/lib/keel`` and its sockets under ``/run/keel``.
Anywhere else, or with ``KEEL_DEV=1``, keel runs in *dev mode* and keeps
everything under ``./.keel`` in the current directory, so a checkout can run the
whole appliance without root. ``KEEL_DEV=0`` forces the installed layout.
"""

from __future__ import annotations

import os
from pathlib import Path

ETC = Path("/etc/keel")
STATE = Path("/var/lib/keel")
RUNTIME = Path("/run/keel")
DEV_ROOT = Path(".keel")


def dev_mode() -> bool:
    """True when keel should keep its files under ``./.keel``."""
    flag = os.environ.get("KEEL_DEV", "").strip()
    if flag:
        return flag not in ("0", "false", "no")
    return not ETC.is_dir()


def state_dir() -> Path:
    return DEV_ROOT if dev_mode() else STATE


def runtime_dir() -> Path:
    return DEV_ROOT / "run" if dev_mode() else RUNTIME


def config_file(service: str) -> Path:
    return DEV_ROOT / f"{service}.json" if dev_mode() else ETC / f"{service}.json"


def socket_file(service: str) -> Path:
    return runtime_dir() / f"{service}.sock"


def ledger_db() -> Path:
    return state_dir() / "ledger.db"
