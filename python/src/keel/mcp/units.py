"""An MCP server's units, rendered by the same code as agents' units.

A stdio server keel runs is two units:

- ``keel-mcp-<name>.socket``: the Unix socket the gateway connects to, held
  by systemd (mode 0600, owned by the gateway's user), so it outlives the
  server's restarts;
- ``keel-mcp-<name>.service``: the server at its trust tier, rendered by
  :func:`keel.agents.units.render_unit` from ``tiers.json`` exactly as an
  agent's unit is (the sandbox, ``Restart=always``, resources, environment),
  with ``ExecStart=`` being ``keel mcp exec -- <command>``
  (:mod:`keel.mcp.attach`), which hands the server the gateway's connection
  as stdin and stdout and execs it.

A server with a ``url`` and a ``command`` serves HTTP itself: one service unit,
run as it is. In dev mode (watch's process backend) the same launcher binds
the socket itself (``--listen``); :func:`watch_entries` gives watch either form.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from keel.agents.units import Directives, Tiers, render_unit
from keel.errors import KeelError
from keel.mcp.spec import ServerSpec

RUN_DIR = Path("/run/keel/mcp")


def keel_program() -> str:
    """The absolute path of the ``keel`` command units run (the one running now)."""
    beside = Path(sys.executable).parent / "keel"
    if beside.is_file():
        return str(beside)
    found = shutil.which("keel")
    if found is None:
        raise KeelError("cannot find the `keel` command to put in the units; is keel installed?")
    return str(Path(found).resolve())


def launcher(program: str | None = None, *, listen: Path | None = None) -> tuple[str, ...]:
    """``keel mcp exec [--listen PATH] --``: what precedes a stdio server's command."""
    argv: tuple[str, ...] = (program or keel_program(), "mcp", "exec")
    if listen is not None:
        argv += ("--listen", str(listen))
    return (*argv, "--")


def socket_unit(spec: ServerSpec, *, run_dir: Path = RUN_DIR, owner: str = "root") -> str:
    path = run_dir / f"{spec.name}.sock"
    return "\n".join(
        [
            f"# keel MCP server {spec.name!r}: the gateway's connection to it, held by systemd",
            "# Rendered by keel from the server's spec; edit the spec, not this file.",
            "",
            "[Unit]",
            f"Description=keel MCP server {spec.name}: socket",
            f"PartOf={spec.unit_name}",
            "",
            "[Socket]",
            f"ListenStream={path}",
            "Accept=no",
            f"SocketUser={owner}",
            "SocketMode=0600",
            "DirectoryMode=0750",
            "",
            "[Install]",
            "WantedBy=sockets.target",
            "",
        ]
    )


def render_units(
    spec: ServerSpec,
    tiers: Tiers,
    *,
    program: str | None = None,
    run_dir: Path = RUN_DIR,
    owner: str = "root",
) -> dict[str, str]:
    """The unit files of ``spec`` by file name (none for a server reached by ``url`` alone)."""
    if not spec.runs_here:
        return {}
    if spec.url is not None:
        return {spec.unit_name: render_unit(spec.unit_spec(()), tiers)}
    after = tiers.unit_directives(spec.tier or 0).get("After", [])
    extra: Directives = {
        "Requires": spec.socket_unit_name,
        "After": [
            *(
                [after]
                if isinstance(after, str)
                else list(after)
                if isinstance(after, list)
                else []
            ),
            spec.socket_unit_name,
        ],
    }
    return {
        spec.socket_unit_name: socket_unit(spec, run_dir=run_dir, owner=owner),
        spec.unit_name: render_unit(spec.unit_spec(launcher(program)), tiers, unit_extra=extra),
    }


def watch_entries(
    servers: Iterable[ServerSpec], *, backend: str, sockets: Path, program: str | None = None
) -> dict[str, Any]:
    """watch.json ``agents`` entries supervising ``servers`` (those keel runs)."""
    entries: dict[str, Any] = {}
    for spec in servers:
        if not spec.runs_here:
            continue
        name = spec.unit_name.removesuffix(".service")
        if backend == "systemd":
            entries[name] = {"unit": spec.unit_name}
            continue
        command = list(spec.command)
        if spec.url is None:
            command = [*launcher(program, listen=sockets / f"{spec.name}.sock"), *command]
        entry: dict[str, Any] = {"command": command}
        if spec.environment:
            entry["environment"] = dict(spec.environment)
        if spec.working_directory:
            entry["working_directory"] = spec.working_directory
        entries[name] = entry
    return entries
