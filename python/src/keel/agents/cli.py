"""``keel agents``: render an agent's unit, install agents, list them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "agents",
        help="agent specs, their systemd units and trust tiers",
        description="Agents are systemd services at a trust tier (docs/agents.md).",
    )
    sub = parser.add_subparsers(dest="agents_command", metavar="COMMAND", required=True)

    render = sub.add_parser(
        "render-unit",
        help="print the systemd unit of an agent spec",
        description="Print the unit for SPEC, built from the spec and tiers.json alone.",
    )
    render.add_argument("spec", type=Path, metavar="SPEC.json")
    render.add_argument(
        "--tiers", type=Path, metavar="FILE", help="a tiers.json to use instead of keel's own"
    )
    render.set_defaults(func=_render)

    install = sub.add_parser(
        "install",
        help="create users, write units, start agents (plain systemd hosts)",
        description="Install agents on a systemd host: system users, specs in /etc/keel/agents, "
        "units in /etc/systemd/system, daemon-reload, enable and start. Idempotent: a second "
        "run changes nothing; a changed spec restarts only its agent.",
    )
    install.add_argument("specs", type=Path, nargs="+", metavar="SPEC.json")
    install.add_argument(
        "--dry-run", action="store_true", help="print what would be done, change nothing"
    )
    install.add_argument("--unit-dir", type=Path, default=None, help=argparse.SUPPRESS)
    install.add_argument("--spec-dir", type=Path, default=None, help=argparse.SUPPRESS)
    install.set_defaults(func=_install)

    listing = sub.add_parser(
        "list",
        help="the installed agents and their state",
        description="The agents installed on this host (/etc/keel/agents/*.json) and "
        "their units' state.",
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--spec-dir", type=Path, default=None, help=argparse.SUPPRESS)
    listing.set_defaults(func=_list)


def _render(args: argparse.Namespace) -> int:
    from keel.agents.spec import load_spec
    from keel.agents.units import load_tiers, render_unit

    spec = load_spec(args.spec)
    print(render_unit(spec, load_tiers(args.tiers)), end="")
    return 0


def _install(args: argparse.Namespace) -> int:
    from keel.agents import install
    from keel.agents.spec import load_specs
    from keel.agents.units import load_tiers

    specs = load_specs(list(args.specs))
    tiers = load_tiers()
    steps = install.plan(
        specs,
        tiers,
        unit_dir=args.unit_dir or install.UNIT_DIR,
        spec_dir=args.spec_dir or install.SPEC_DIR,
    )
    lines = steps.describe()
    for line in lines:
        print(f"{'would ' if args.dry_run else ''}{line}")
    if not args.dry_run:
        install.apply(steps)
        names = ", ".join(spec.name for spec in specs)
        print(f"keel: agents installed and running: {names}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from keel.agents import install
    from keel.agents.spec import load_specs
    from keel.output import print_json, print_table

    specs = load_specs(install.installed_specs(args.spec_dir or install.SPEC_DIR))
    states = install.unit_states([spec.unit_name for spec in specs])
    agents: dict[str, dict[str, Any]] = {}
    for spec in specs:
        state = states.get(spec.unit_name, {})
        pid = int(state.get("MainPID", "0") or 0)
        agents[spec.name] = {
            "tier": spec.tier,
            "user": spec.user,
            "unit": spec.unit_name,
            "state": state.get("ActiveState"),
            "sub_state": state.get("SubState"),
            "pid": pid or None,
            "restarts": int(state["NRestarts"]) if state.get("NRestarts", "").isdigit() else None,
        }
    if args.json:
        print_json({"agents": agents})
        return 0
    print_table(
        ["agent", "tier", "user", "state", "pid", "restarts"],
        [
            [
                name,
                a["tier"],
                a["user"],
                f"{a['state']}/{a['sub_state']}" if a["state"] else None,
                a["pid"],
                a["restarts"],
            ]
            for name, a in agents.items()
        ],
    )
    return 0
