"""Tier 4 helpers: running Nix's evaluator on keel's flake, package and modules.

Four levels, each skipped with its reason when its prerequisite is missing:

- ``nix-instantiate`` (Debian's ``nix-bin``): every ``.nix`` file parses, the
  lock agrees with the flake, the flake's outputs have the expected names;
- ``NIXPKGS_LIB`` (a checkout of nixpkgs' ``lib``; the ``lib`` of
  ``KEEL_NIXPKGS`` when unset): the package and the flake's outputs evaluate
  with the real ``lib``, against the stand-in ``pkgs`` of ``stub-pkgs.nix``;
- ``KEEL_NIXPKGS`` (a nixpkgs tree: its ``lib``, ``nixos/`` and
  ``pkgs/pkgs-lib``): keel's NixOS modules evaluate together with the real
  NixOS module files that declare what they set (``nixos-modules.nix``), with
  stand-ins (``nixos-stubs.nix``) only for what those files read from the rest
  of NixOS: real option types, merge rules, assertions and unit file text
  (:func:`evaluate_modules`);
- a Nix that can fetch the locked nixpkgs and build: ``nix build`` of the
  package (its check phase runs the unit tier) and ``nix flake check``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

HERE = Path(__file__).parent
NIX_FLAGS = ("--extra-experimental-features", "nix-command flakes")
# Offline, a download should fail at once rather than retry for a minute.
NIX_OFFLINE_FRIENDLY = ("--option", "download-attempts", "1", "--option", "connect-timeout", "10")


def nix_instantiate_path() -> str | None:
    return shutil.which("nix-instantiate")


def resolve_nixpkgs_lib(value: str) -> Path | None:
    """The ``lib`` folder of a nixpkgs or nixpkgs.lib checkout, or of ``lib`` itself."""
    path = Path(value).expanduser()
    for candidate in (path / "lib", path):
        if (candidate / "default.nix").is_file() and (candidate / "modules.nix").is_file():
            return candidate.resolve()
    return None


def resolve_nixpkgs_tree(value: str) -> Path | None:
    """A nixpkgs tree with what tier 4 evaluates: ``lib``, ``nixos/`` and ``pkgs/pkgs-lib``."""
    path = Path(value).expanduser()
    needed = (
        "lib/default.nix",
        "nixos/modules/system/boot/systemd.nix",
        "nixos/lib/systemd-lib.nix",
        "nixos/lib/utils.nix",
        "pkgs/pkgs-lib/default.nix",
    )
    if all((path / name).is_file() for name in needed):
        return path.resolve()
    return None


def nix_eval_file(
    nix_instantiate: str,
    expression: Path,
    *,
    args: dict[str, Path | str] | None = None,
    timeout: float = 120,
) -> Any:
    """``nix-instantiate --eval --strict --json`` of a file, with ``--arg`` values.

    A ``Path`` is passed as a Nix path, a ``str`` as a Nix expression.
    """
    argv = [nix_instantiate, "--eval", "--strict", "--json", str(expression)]
    for name, value in (args or {}).items():
        argv += ["--arg", name, str(value) if isinstance(value, Path) else value]
    # Nix prints strings byte for byte; a test may feed it bytes that are not
    # UTF-8 on purpose.
    proc = subprocess.run(
        argv,
        capture_output=True,
        encoding="utf-8",
        errors="surrogateescape",
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise NixEvalError(proc.stderr.strip())
    return json.loads(proc.stdout)


def nix_eval_expr(nix_instantiate: str, expression: str, *, timeout: float = 60) -> Any:
    proc = subprocess.run(
        [nix_instantiate, "--eval", "--strict", "--json", "--expr", expression],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise NixEvalError(proc.stderr.strip())
    return json.loads(proc.stdout)


class NixEvalError(Exception):
    """Nix refused an expression; the message is its error output."""


def evaluate_modules(
    nix_instantiate: str,
    nixpkgs: Path,
    host_config: str = "{ }",
    *,
    paths: str = "[ ]",
    with_keel: bool = True,
    overlay: str = "final: prev: { }",
    extra_nixos_modules: tuple[str, ...] = (),
    extra_modules: str = "[ ]",
    units: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """What keel's modules make of a host configuration, against real NixOS.

    ``host_config`` is a Nix expression (a module); ``nixpkgs`` the tree of the
    ``nixpkgs_tree`` fixture. The result (see ``eval-modules.nix``) holds
    ``failedAssertions``, ``warnings``, the keel ``services`` (their options),
    ``units`` (the unit files NixOS generates, by unit name), ``users``,
    ``groups``, ``etc`` (``/etc/keel/...``, JSON files as ``{"json": value}``),
    ``tmpfiles``, ``systemPackages``, ``checks`` and
    ``values``: the value of each option path in ``paths`` (a Nix list of
    lists of attribute names). ``extra_nixos_modules`` adds real NixOS files
    (relative to ``nixos/modules``) for a module that sets options the default
    set (``nixos-modules.nix``) does not declare; ``extra_modules`` is a Nix
    list of further modules. A type error or a missing option raises
    :class:`NixEvalError` with Nix's message.
    """
    nix_list = "[ " + " ".join(json.dumps(name) for name in extra_nixos_modules) + " ]"
    args: dict[str, Path | str] = {
        "repo": Path(nix_string(REPO)),
        "nixpkgs": Path(nix_string(nixpkgs)),
        "hostConfig": host_config,
        "paths": paths,
        "withKeel": "true" if with_keel else "false",
        "overlay": overlay,
        "extraNixosModules": nix_list,
        "extraModules": extra_modules,
    }
    if units is not None:
        args["units"] = "[ " + " ".join(json.dumps(name) for name in units) + " ]"
    result: dict[str, Any] = nix_eval_file(nix_instantiate, HERE / "eval-modules.nix", args=args)
    return result


def nix_string(path: Path) -> str:
    """A Nix path literal for an absolute path (no spaces or quotes expected)."""
    text = str(path.resolve())
    if any(c.isspace() or c in "\"'$;{}" for c in text):
        pytest.skip(f"path {text} cannot be written as a Nix path literal")
    return text


def nix_text(value: str) -> str:
    """A Nix expression for the string ``value``, whatever it holds.

    Through JSON: Nix string literals have no escape for most control
    characters, and ``${`` in them interpolates.
    """
    literal = json.dumps(json.dumps(value)).replace("$", "\\$")
    return f"(builtins.fromJSON {literal})"


def flake_ref() -> str | None:
    """``git+file://`` of the checkout: Nix then sees the tracked files only."""
    if not (REPO / ".git").exists():
        return None
    return f"git+file://{REPO}"


def nix_command_blocker() -> str | None:
    """Why the ``nix`` command cannot be used here, or None."""
    if shutil.which("nix") is None:
        return "no `nix` command (Debian's nix-bin provides it)"
    if flake_ref() is None:
        return f"{REPO} is not a git checkout, so Nix cannot take it as a flake"
    daemon = Path("/nix/var/nix/daemon-socket/socket")
    if os.geteuid() != 0 and not daemon.exists():
        return "not root and no nix-daemon: Nix cannot write the flake into /nix/store"
    return None


def run_nix(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    nix = shutil.which("nix")
    assert nix is not None
    return subprocess.run(
        [nix, *NIX_FLAGS, *NIX_OFFLINE_FRIENDLY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


@functools.cache
def nix_build_blocker() -> str | None:
    """Why Nix cannot build keel's flake here, or None when it can.

    Building needs the locked nixpkgs (fetched from GitHub, its narHash checked
    against flake.lock) and a way to realise its packages (a binary cache, or
    building from source). Fetching the input is the probe: a machine that can
    reach GitHub is taken to reach the cache too.
    """
    if os.environ.get("KEEL_NIX_BUILD", "").strip() == "0":
        return "KEEL_NIX_BUILD=0 is set"
    blocker = nix_command_blocker()
    if blocker is not None:
        return blocker
    ref = flake_ref()
    assert ref is not None
    proc = run_nix("flake", "archive", "--json", ref, timeout=600)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        detail = lines[-1].removeprefix("error: ") if lines else proc.stderr.strip()[-200:]
        return f"the locked nixpkgs cannot be fetched ({detail})"
    return None
