"""The subcommands every daemon's CLI has, made the same way: ``serve`` and ``check-config``.

::

    serve = commands.add_serve(sub, "mesh", unit_help="...", func=_serve)
    commands.add_check_config(sub, "mesh", help="...", json_help="...", func=_check)
    ...
    path = commands.config_path(args, "mesh")  # --config, or /etc/keel/mesh.json

(Imported by ``keel --help``: it loads nothing but :mod:`argparse`.)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from keel import paths

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Command = Callable[[argparse.Namespace], int]


def config_help(service: str) -> str:
    return f"config file (default: /etc/keel/{service}.json, ./.keel/{service}.json in dev mode)"


def config_path(args: argparse.Namespace, service: str) -> Path:
    """``--config``, or the service's default config file."""
    return Path(args.config) if args.config else paths.config_file(service)


def add_serve(
    commands: Subcommands, service: str, *, help: str, what: str, func: Command
) -> argparse.ArgumentParser:
    """``keel SERVICE serve [--config FILE] [--verbose]``; ``what`` names the daemon."""
    description = (
        f"Run {what} in the foreground (systemd runs it as keel-{service}.service, "
        "Type=notify with WatchdogSec)."
    )
    serve = _command(
        commands, "serve", service=service, help=help, description=description, func=func
    )
    serve.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    return serve


def add_check_config(
    commands: Subcommands, service: str, *, help: str, json_help: str, func: Command
) -> argparse.ArgumentParser:
    """``keel SERVICE check-config [--config FILE] [--json]``."""
    description = (
        "Read the config as `serve` would and report the first problem, naming the file and "
        "key. Exit 0 when it is valid, 2 when it is not."
    )
    check = _command(
        commands, "check-config", service=service, help=help, description=description, func=func
    )
    check.add_argument("--json", action="store_true", help=json_help)
    return check


def _command(
    commands: Subcommands, name: str, *, service: str, help: str, description: str, func: Command
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("--config", type=Path, metavar="FILE", help=config_help(service))
    parser.set_defaults(func=func)
    return parser
