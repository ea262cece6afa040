"""The ``keel`` command: one entry point, a subcommand per service.

Each service package has a ``cli`` module with ``register(subparsers)``, which
adds its subcommands and sets ``func`` (``args -> exit code``) on each. Service
modules import their heavy dependencies inside the handlers so that
``keel --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from keel import __version__, signals
from keel.errors import KeelError

# Order is the order of `keel --help`.
SERVICE_CLIS: tuple[str, ...] = (
    "keel.agents.cli",
    "keel.watch.cli",
    "keel.egress.cli",
    "keel.ledger.cli",
    "keel.mesh.cli",
    "keel.safeswitch.cli",
    "keel.mcp.cli",
    "keel.fleet.cli",
    "keel.chat.cli",
    "keel.appliance.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keel",
        description="keel: supervision, egress control, safe switches, a post-quantum mesh "
        "and a tamper-evident ledger for fleets of AI agents.",
        epilog="Run `keel COMMAND --help` for the options of each command. Files default to "
        "/etc/keel, /var/lib/keel and /run/keel on an installed host, and to ./.keel in dev "
        "mode (no /etc/keel, or KEEL_DEV=1).",
    )
    parser.add_argument("--version", action="version", version=f"keel {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SERVICE_CLIS:
        importlib.import_module(module_name).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``keel`` command; returns its exit status.

    SIGINT and SIGTERM are handled as :mod:`keel.signals` says while it runs
    (even when they were inherited as ignored): the command stops wherever it
    is, cleans up, and this returns 130 or 143 without printing anything.
    """
    with signals.handled():
        try:
            args = build_parser().parse_args(argv)
            code = int(args.func(args))
            sys.stdout.flush()  # here, so a broken pipe or a signal is handled below
        except KeelError as exc:
            print(f"keel: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            return exc.exit_code if isinstance(exc, signals.Interrupted) else 130
        except BrokenPipeError:
            # `keel ledger tail | head`: the reader left; that is not an error.
            _quiet_stdout()
            return 0
        return code


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit cannot fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
