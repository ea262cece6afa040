"""``keel switch ...`` and ``keel rebuild ...``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from keel.errors import KeelError, UsageError
from keel.output import print_json, print_table

EXIT_CODES_TEXT = """\
exit codes:
  0  committed: the new system runs and is the boot default
  1  rolled back: the old system runs again, the profile is as it was
  2  refused: nothing was changed (not a system, another switch runs, bad options)
  3  the rollback failed: the host needs an operator (the message says its state)
"""

DESCRIPTION = f"""\
Switch this host to a built NixOS system behind a health gate, and roll back
by itself when anything goes wrong.

  keel switch [options] TOPLEVEL   switch to a built system (below)
  keel switch rollback [--to PATH] roll back the switch in progress, or to the
                                   previous generation
  keel switch status [--json]      is a switch in progress, which timer, time left
  keel switch history [--json]     past switches, from the ledger
  keel switch check [--gate S]     hold the health gate now, without switching
  keel switch reconcile            record switches a reboot interrupted (run at boot)
  keel switch install-units        keel-switch@.service and the boot's reconcile unit
                                   on a plain systemd host (--allow USER: polkit rule)

A switch: arm a rollback timer outside this process (a transient systemd
timer, or a detached process with --timer process), activate TOPLEVEL with
`switch-to-configuration test` in its own unit, hold the gate (every check
passes continuously for --gate seconds), then commit (new profile generation,
`switch-to-configuration boot`). Any failure, a deadline passed, Ctrl-C, or
this process killed: the old system is activated again and the profile is
left as it was. A reboot during the switch boots the old system. Settings
come from /etc/keel/safeswitch.json (./.keel/safeswitch.json in dev mode);
see docs/safeswitch.md.

{EXIT_CODES_TEXT}"""

BOOTED_SYSTEM = "/run/booted-system"  # the system this boot started (NixOS)
VERBS = ("rollback", "status", "history", "check", "reconcile", "request", "install-units")


def _switch_options(parser: argparse.ArgumentParser, *, gate_only: bool = False) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="settings (default: /etc/keel/safeswitch.json, ./.keel/safeswitch.json in dev mode)",
    )
    parser.add_argument(
        "--gate", type=float, metavar="SECONDS", help="how long every check must pass (default 30)"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help="activation and gate together must end within this time, else roll back (default 300)",
    )
    parser.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="CMD",
        help="a shell command that must exit 0 throughout the gate (repeatable; "
        "added to the configured checks)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    if gate_only:
        return
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="PATH",
        help="the system profile (default /nix/var/nix/profiles/system)",
    )
    parser.add_argument(
        "--current",
        type=Path,
        metavar="PATH",
        help="the running system's link (default /run/current-system)",
    )
    parser.add_argument(
        "--timer",
        choices=("systemd", "process"),
        help="where the rollback timer and activations run: transient systemd units "
        "(default) or detached processes (hosts and tests without systemd)",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser(
        "switch",
        help="switch to a built NixOS system behind a health gate; roll back by itself",
        description=DESCRIPTION,
        formatter_class=formatter,
        usage="keel switch [options] TOPLEVEL | rollback | status | history | check | reconcile "
        "| install-units",
    )
    _switch_options(parser)
    parser.add_argument(
        "toplevel", metavar="TOPLEVEL", nargs="?", help="a built system (or a verb above)"
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=_dispatch, parser=parser)

    rebuild = subparsers.add_parser(
        "rebuild",
        help="build a flake's NixOS system and switch to it safely (nixos-rebuild's front)",
        description="Build REF#nixosConfigurations.HOST.config.system.build.toplevel with "
        "`nix build`, show what `switch-to-configuration dry-activate` would change, then "
        "(switch) hand it to `keel switch`.\n\n" + EXIT_CODES_TEXT,
        formatter_class=formatter,
    )
    actions = rebuild.add_subparsers(dest="rebuild_action", metavar="ACTION", required=True)
    for action, text in (
        ("switch", "build, show the change, switch behind the gate"),
        ("dry-run", "build and show what the switch would change; change nothing"),
    ):
        sub = actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument(
            "--flake",
            required=True,
            metavar="REF#HOST",
            help="the flake and its nixosConfigurations host (HOST defaults to this host's name)",
        )
        _switch_options(sub)
        sub.set_defaults(func=_rebuild, action=action)


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"keel switch {verb}")
    config_help = "settings (default: /etc/keel/safeswitch.json, ./.keel/safeswitch.json)"
    if verb == "check":
        parser.description = (
            "Hold the health gate now, without switching: every check must pass for --gate "
            "seconds. Exit 0 when it held, 1 when a check failed or it did not hold within "
            "--deadline seconds. The boot check of docs/safeswitch.md runs this."
        )
        _switch_options(parser, gate_only=True)
        parser.add_argument(
            "--skip-check",
            action="append",
            default=[],
            metavar="NAME",
            help="leave out the configured check of this name (repeatable)",
        )
        return parser
    parser.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    if verb == "rollback":
        parser.description = (
            "Roll back the switch in progress (asking its switcher, or taking over when it is "
            "gone), or, with no switch in progress, return to the profile's previous generation "
            "(or to --to SYSTEM): activate it, point the profile at it, make it the boot "
            "default. Exit 0 when the host is back, 2 when nothing was done, 3 when the "
            "rollback failed."
        )
        parser.add_argument("--to", type=Path, metavar="PATH", help="the system to return to")
        parser.add_argument("--profile", type=Path, metavar="PATH", help=argparse.SUPPRESS)
        parser.add_argument("--current", type=Path, metavar="PATH", help=argparse.SUPPRESS)
        parser.add_argument("--timer", choices=("systemd", "process"), help=argparse.SUPPRESS)
        # What the rollback timer runs (docs/safeswitch.md); not for people.
        parser.add_argument("--switch-id", help=argparse.SUPPRESS)
        parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
        parser.add_argument("--not-before", type=float, help=argparse.SUPPRESS)
    elif verb == "reconcile":
        parser.description = (
            "Record in the ledger every switch (or rollback) a reboot interrupted: those whose "
            "trace in the state directory (/var/lib/keel/safeswitch/unfinished) is from an "
            "earlier boot. Each gets an `interrupted` entry naming the phase it was in and the "
            "system that booted; its GC roots are dropped. keel-safeswitch-reconcile.service "
            "runs this at boot. Exit 0, or 1 when a trace could not be read (moved aside) or "
            "recorded (kept for the next run)."
        )
        parser.add_argument("--booted", type=Path, help=argparse.SUPPRESS)
    elif verb == "request":
        parser.description = (
            "What keel-switch@INSTANCE.service runs as root: a switch to a target declared in "
            "safeswitch.json (targets), asked for by someone who is not root (keel chat). "
            "INSTANCE is NAME:OLD:NEW:REQUEST as systemd-escape writes it; the running system "
            "and the target must still be the ones OLD and NEW name, else nothing is done "
            "(exit 2). The result goes to RUN_DIR/requests/REQUEST.json and the ledger. Exit "
            "codes as keel switch."
        )
        parser.add_argument("instance", metavar="INSTANCE", help="the unit's instance (%%i)")
    elif verb == "install-units":
        from keel.safeswitch.units import POLKIT_RULE

        parser.description = (
            "On a plain systemd host (NixOS: services.keel.safeswitch does this): write "
            "keel-switch@.service (switches to declared targets for users that are not root), "
            "keel-safeswitch-reconcile.service (enabled: records switches a reboot "
            f"interrupted) and, with --allow, the polkit rule {POLKIT_RULE} that lets "
            "those users start keel-switch@ instances and nothing else; then daemon-reload. "
            "Running it twice changes nothing the second time."
        )
        parser.add_argument(
            "--allow",
            action="append",
            default=[],
            metavar="USER",
            help="a user that may start keel-switch@ instances (keel chat's: keel-chat); "
            "repeatable",
        )
        parser.add_argument("--dry-run", action="store_true", help="print the steps, do nothing")
    elif verb == "status":
        parser.description = (
            "Is a switch in progress: its phase, both systems, the rollback timer and the time "
            "left, the checks; or how the last one ended."
        )
    else:
        parser.description = "The switches recorded in the ledger, oldest first."
        parser.add_argument(
            "--db", type=Path, metavar="PATH", help="the ledger (default: the config's)"
        )
        parser.add_argument("-n", "--limit", type=int, default=20, help="how many (default 20)")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.toplevel is None:
        args.parser.error("the following arguments are required: TOPLEVEL (or a verb)")
    if args.toplevel in VERBS:
        verb_args = _verb_parser(args.toplevel).parse_args(args.rest)
        handler = {
            "rollback": _rollback,
            "status": _status,
            "history": _history,
            "check": _check,
            "reconcile": _reconcile,
            "request": _request,
            "install-units": _install_units,
        }
        return handler[args.toplevel](verb_args)
    if args.rest:
        # Options after TOPLEVEL: parse them as the switch's own.
        late = argparse.ArgumentParser(prog="keel switch", add_help=False)
        _switch_options(late)
        extra = late.parse_args(args.rest)
        for key, value in vars(extra).items():
            if key == "check":
                args.check = list(args.check) + list(value)
            elif value not in (None, False):
                setattr(args, key, value)
    return _switch(args)


def _config(args: argparse.Namespace) -> Any:
    from keel.safeswitch import config as ss_config
    from keel.safeswitch.switcher import with_overrides

    config = ss_config.load(getattr(args, "config", None))
    return with_overrides(
        config,
        gate=getattr(args, "gate", None),
        deadline=getattr(args, "deadline", None),
        profile=getattr(args, "profile", None),
        current=getattr(args, "current", None),
        timer=getattr(args, "timer", None),
    )


def _finish(result: Any, args: argparse.Namespace, exit_code: int | None = None) -> int:
    if args.json:
        print_json(result.to_json())
    return result.exit_code if exit_code is None else exit_code


def _switch(args: argparse.Namespace) -> int:
    from keel.safeswitch import config as ss_config
    from keel.safeswitch.report import Output
    from keel.safeswitch.switcher import Request, switch

    config = _config(args)
    extra = tuple(ss_config.command_check(text) for text in args.check)
    out = Output(json_mode=args.json)
    result = asyncio.run(switch(Request(Path(args.toplevel), config, extra), out))
    return _finish(result, args)


def _rebuild(args: argparse.Namespace) -> int:
    from keel.safeswitch import config as ss_config
    from keel.safeswitch import rebuild
    from keel.safeswitch.report import Output
    from keel.safeswitch.switcher import Request, switch

    target = rebuild.parse_flake(args.flake)
    config = _config(args)
    extra = tuple(ss_config.command_check(text) for text in args.check)
    out = Output(json_mode=args.json)

    async def run() -> int:
        try:
            system = await rebuild.build(target, out)
            await rebuild.dry_activate(system, out)
        except KeelError as exc:
            out.line(f"refused, nothing changed: {exc}")
            if args.json:
                print_json({"outcome": "refused", "exit_code": 2, "message": str(exc)})
            return 2
        if args.action == "dry-run":
            if args.json:
                print_json({"outcome": "dry-run", "exit_code": 0, "system": system})
            return 0
        result = await switch(Request(Path(system), config, extra), out)
        return _finish(result, args)

    return asyncio.run(run())


def _rollback(args: argparse.Namespace) -> int:
    from keel.safeswitch import rollback
    from keel.safeswitch.report import Output
    from keel.safeswitch.state import StateFile

    out = Output(json_mode=args.json)
    if args.switch_id:
        if args.run_dir is None:
            raise UsageError("--switch-id needs --run-dir")

        async def timer() -> Any:
            if args.not_before is not None:
                await rollback.wait_until(args.not_before)
            return await rollback.by_timer(StateFile(args.run_dir), args.switch_id, out)

        return _finish(asyncio.run(timer()), args)
    config = _config(args)
    # A hangup (the SSH session dropped) must not stop a rollback half way, as for a switch.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    result = asyncio.run(rollback.by_operator(config, to=args.to, out=out))
    return _finish(result, args)


def _reconcile(args: argparse.Namespace) -> int:
    from keel.safeswitch import evidence
    from keel.safeswitch.report import Output

    config = _config(args)
    out = Output(json_mode=args.json)
    done = asyncio.run(
        evidence.reconcile(
            evidence.Evidence(config.state_dir),
            current=config.current,
            booted=args.booted or Path(BOOTED_SYSTEM),
            out=out,
        )
    )
    if args.json:
        print_json(done)
    elif not done:
        print("no interrupted switch")
    return 0 if all(item["outcome"] == "interrupted" for item in done) else 1


def _status(args: argparse.Namespace) -> int:
    from keel.safeswitch import views
    from keel.safeswitch.report import status_lines

    result = views.status(_config(args))
    if args.json:
        print_json(result)
    else:
        print("\n".join(status_lines(result)))
    return 0


def _history(args: argparse.Namespace) -> int:
    from keel.safeswitch import views
    from keel.safeswitch.report import history_table
    from keel.safeswitch.state import StateFile

    config = _config(args)
    db = args.db or config.ledger
    if db is None:
        raise UsageError(
            f"{config.source}: ledger is null: no switch history is recorded (give --db PATH)"
        )
    if args.limit < 0:
        raise UsageError("--limit: expected a number >= 0")
    state = StateFile(config.run_dir).read()
    in_progress = state.id if state is not None and state.in_progress else None
    rows = views.read_history(Path(db), limit=args.limit, in_progress=in_progress)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"no switch recorded in {db}")
        return 0
    headers, table = history_table(rows)
    print_table(headers, table)
    return 0


def _check(args: argparse.Namespace) -> int:
    from keel.safeswitch import config as ss_config
    from keel.safeswitch.checks import named
    from keel.safeswitch.switcher import choose_checks, gate_check

    config = _config(args)
    extra = tuple(ss_config.command_check(text) for text in args.check)
    specs = named(choose_checks(config, extra))
    unknown = sorted(set(args.skip_check) - {name for name, _ in specs})
    if unknown:
        known = ", ".join(name for name, _ in specs) or "none"
        raise UsageError(f"--skip-check {unknown[0]}: no such check (the checks: {known})")
    specs = [(name, spec) for name, spec in specs if name not in args.skip_check]
    hold = config.limits.gate
    deadline = args.deadline if args.deadline is not None else hold + 60.0
    if deadline < hold:
        raise UsageError(f"--deadline ({deadline:g} s) must be at least --gate ({hold:g} s)")
    gate = asyncio.run(gate_check(specs, hold=hold, deadline=deadline, interval=config.interval))
    held = gate.failure is None and all(s.verdict == "pass" for s in gate.checks.values())
    result = {
        "held": held,
        "gate": hold,
        "checks": gate.summary(),
        "failed": None if gate.failure is None else gate.failure.name,
    }
    if args.json:
        print_json(result)
    else:
        for check in gate.checks.values():
            detail = f": {check.detail}" if check.detail else ""
            print(f"{check.name}: {check.verdict or 'no result'}{detail}")
        if held:
            print(f"gate held for {hold:g} s")
        elif gate.failure is not None:
            print(f"gate failed: {gate.failure.name}: {gate.failure.detail}")
        else:
            print(f"gate did not hold within {deadline:g} s")
    return 0 if held else 1


def _request(args: argparse.Namespace) -> int:
    from keel.safeswitch import requests
    from keel.safeswitch.report import Output

    instance = requests.parse_instance(args.instance)
    config = _config(args)
    result = asyncio.run(requests.serve(instance, config, Output(json_mode=args.json)))
    if args.json:
        print_json(result)
    return int(result["exit_code"])


def _install_units(args: argparse.Namespace) -> int:
    from keel.safeswitch import install

    plan = install.plan(allow=args.allow)
    if args.dry_run or args.json:
        steps = plan.describe() or ["nothing to do"]
        if args.json:
            print_json({"steps": steps, "dry_run": args.dry_run})
        else:
            print("\n".join(steps))
        if args.dry_run:
            return 0
    install.apply(plan)
    return 0
