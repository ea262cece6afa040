"""``keel rebuild switch|dry-run --flake REF#HOST``: build with Nix, show the change, switch safely.

The ``nixos-rebuild`` front of ``keel switch``:

1. build ``REF#nixosConfigurations."HOST".config.system.build.toplevel`` with
   ``nix build`` (flakes enabled for this call, whatever nix.conf says);
2. run the built system's ``switch-to-configuration dry-activate``, which
   prints the units it would stop, restart, start and reload;
3. ``switch``: hand the built system to ``keel switch`` (gate, timer,
   rollback); ``dry-run``: stop after step 2.

``HOST`` defaults to this host's name, as with ``nixos-rebuild``.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from keel.errors import KeelError, UsageError
from keel.safeswitch.generations import SWITCH, system_problem
from keel.safeswitch.report import Output
from keel.safeswitch.runners import capture

_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
BUILD_TIMEOUT = 6 * 3600.0
DRY_TIMEOUT = 300.0


@dataclass(frozen=True)
class FlakeTarget:
    ref: str
    host: str

    @property
    def installable(self) -> str:
        return f'{self.ref}#nixosConfigurations."{self.host}".config.system.build.toplevel'


def parse_flake(text: str, *, default_host: str | None = None) -> FlakeTarget:
    """``REF#HOST`` (or ``REF`` alone: this host's name); UsageError says what is wrong."""
    ref, sep, host = text.partition("#")
    if not ref:
        raise UsageError(
            f"--flake {text!r}: expected REF#HOST, e.g. /etc/nixos#web1 or github:org/fleet#web1"
        )
    if not sep or not host:
        host = default_host or socket.gethostname().split(".")[0]
    if not _HOST.match(host):
        raise UsageError(
            f"--flake {text!r}: {host!r} is not a host name (letters, digits, '-', '_', '.')"
        )
    return FlakeTarget(ref, host)


async def _run(argv: list[str], timeout: float) -> tuple[int, str, str]:
    try:
        return await capture(argv, timeout=timeout)
    except TimeoutError:
        raise KeelError(f"{argv[0]} did not finish within {timeout:g} s") from None


async def build(target: FlakeTarget, out: Output) -> str:
    """The built system's store path."""
    nix = shutil.which("nix")
    if nix is None:
        raise KeelError("nix not found in PATH: `keel rebuild` builds with `nix build`")
    argv = [
        nix,
        "--extra-experimental-features",
        "nix-command flakes",
        "build",
        "--no-link",
        "--json",
        target.installable,
    ]
    out.line(f"building {target.installable}")
    code, stdout, stderr = await _run(argv, BUILD_TIMEOUT)
    if code != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        raise KeelError(
            f"nix build of {target.ref}#{target.host} failed (exit {code})"
            + (f": {lines[-1].strip()}" if lines else "")
        )
    try:
        built = json.loads(stdout)
        path = built[0]["outputs"]["out"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise KeelError(f"nix build printed no output path for {target.installable}") from None
    if not isinstance(path, str) or (problem := system_problem(Path(path))) is not None:
        raise KeelError(f"{target.ref}#{target.host} did not build a NixOS system: {problem}")
    out.line(f"built {path}")
    return path


async def dry_activate(system: str, out: Output) -> None:
    """What switching to ``system`` would change, as switch-to-configuration says it."""
    out.line("what the switch would change (switch-to-configuration dry-activate):")
    code, stdout, stderr = await _run([f"{system}/{SWITCH}", "dry-activate"], DRY_TIMEOUT)
    said = (stdout + stderr).strip()
    for line in said.splitlines() or ["(nothing)"]:
        out.line(f"  {line}")
    if code != 0:
        raise KeelError(
            f"{system}/{SWITCH} dry-activate exited {code}: the system is not switched to"
        )
