"""``keel egress serve|check|status|suggest|sets``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from keel import paths
from keel.output import human_duration, print_json, print_table

DESCRIPTION = """\
egress is a per-agent, deny-by-default outbound firewall: each agent's DNS
goes to keel's proxy, which resolves only the names on the agent's allowlist
and opens exactly their addresses in nftables (table inet keel) before it
answers; everything else the agent sends is dropped in the kernel and
recorded in the ledger. See docs/egress.md.
"""

EXIT_ALLOW = 0
EXIT_DENY = 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    egress = subparsers.add_parser(
        "egress",
        help="per-agent outbound firewall opened only for allowlisted domains",
        description=DESCRIPTION,
        formatter_class=formatter,
    )
    commands = egress.add_subparsers(dest="egress_command", metavar="COMMAND", required=True)
    config_help = "config file (default: /etc/keel/egress.json, ./.keel/egress.json in dev mode)"
    socket_help = (
        "egress's control socket (default: /run/keel/egress.sock, ./.keel/run/egress.sock)"
    )

    serve = commands.add_parser(
        "serve",
        help="run the egress daemon (rules, DNS proxy, ledger)",
        description="Install the agents' rules in nftables (table inet keel, replaced atomically, "
        "sets kept) and serve their DNS. Needs CAP_NET_ADMIN. systemd runs it as "
        "keel-egress.service (Type=notify).",
    )
    serve.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    serve.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check",
        help="would AGENT be allowed to resolve NAME?",
        description="Decide, with the proxy's own code and the config's allowlist, whether "
        "AGENT may resolve NAME. Prints allow or deny. Exit 0 for allow, 1 for deny, 2 for an "
        "error (bad config, unknown agent, a NAME that is no host name).",
    )
    check.add_argument("agent", metavar="AGENT")
    check.add_argument("name", metavar="NAME")
    check.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.set_defaults(func=_check)

    status = commands.add_parser(
        "status",
        help="each agent's mode, set sizes, drops and recent denials",
        description="Ask the egress daemon for each agent's mode, the addresses in its sets, "
        "the packets dropped (or, in audit mode, that would have been) and its latest denials.",
    )
    status.add_argument("--socket", type=Path, metavar="PATH", help=socket_help)
    status.add_argument("--json", action="store_true", help="print the full status as JSON")
    status.set_defaults(func=_status)

    suggest = commands.add_parser(
        "suggest",
        help="an allowlist for AGENT from the names it asked for",
        description="Print an allowlist for AGENT: its current entries plus every name it "
        "asked for since the daemon started that they do not cover (run the agent in audit "
        "mode to see everything it would need). Review it before use: an agent asks for "
        "what its input tells it to.",
    )
    suggest.add_argument("agent", metavar="AGENT")
    suggest.add_argument(
        "--collapse",
        type=int,
        default=0,
        metavar="N",
        help="propose *.parent for N or more names under one parent (default: exact names only)",
    )
    suggest.add_argument("--socket", type=Path, metavar="PATH", help=socket_help)
    suggest.add_argument(
        "--json", action="store_true", help="print names, denials and the proposal as JSON"
    )
    suggest.set_defaults(func=_suggest)

    sets = commands.add_parser(
        "sets",
        help="the addresses in AGENT's sets, with seconds left and the names they came from",
        description="List what keel put into AGENT's nftables sets (address, seconds left, "
        "every name the agent asked for that led to it, oldest first).",
    )
    sets.add_argument("agent", metavar="AGENT")
    sets.add_argument("--socket", type=Path, metavar="PATH", help=socket_help)
    sets.add_argument("--json", action="store_true", help="print as JSON")
    sets.set_defaults(func=_sets)


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else paths.config_file("egress")


def _socket(args: argparse.Namespace) -> Path:
    return Path(args.socket) if args.socket else paths.socket_file("egress")


def _serve(args: argparse.Namespace) -> int:
    from keel import service
    from keel.egress import config
    from keel.egress.daemon import Egress

    return service.main(
        "egress", _config_path(args), load=config.load, make=Egress, verbose=args.verbose
    )


def _check(args: argparse.Namespace) -> int:
    from keel.egress import config
    from keel.egress.allowlist import EntryError, text_labels
    from keel.errors import UsageError

    loaded = config.load(_config_path(args))
    agent = loaded.agents.get(args.agent)
    if agent is None:
        known = ", ".join(sorted(loaded.agents)) or "none"
        raise UsageError(f"{loaded.source}: no agent {args.agent!r} (agents: {known})")
    try:
        labels = text_labels(args.name)
    except EntryError as exc:
        raise UsageError(str(exc)) from None
    allowed = agent.allow.allows(labels)
    verdict = "allow" if allowed else "deny"
    if args.json:
        print_json(
            {"agent": agent.name, "name": args.name, "mode": agent.mode, "decision": verdict}
        )
    else:
        print(verdict)
    return EXIT_ALLOW if allowed else EXIT_DENY


def _call(args: argparse.Namespace, verb: str, request: dict[str, Any] | None = None) -> Any:
    from keel.api import call

    return call(_socket(args), verb, request or {}, service="egress")


def _status(args: argparse.Namespace) -> int:
    result = _call(args, "status")
    if args.json:
        print_json(result)
        return 0
    print_table(
        [
            "agent",
            "mode",
            "uid",
            "port",
            "allow",
            "v4",
            "v6",
            "blocked",
            "denied names",
            "last denial",
        ],
        status_rows(result, now=time.time()),
    )
    return 0


def status_rows(result: dict[str, Any], *, now: float) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, agent in sorted(result.get("agents", {}).items()):
        recent = agent.get("recent") or []
        last = None
        if recent:
            newest = recent[0]
            ago = human_duration(max(0.0, now - float(newest.get("at", now))))
            last = f"{newest.get('what')} {newest.get('detail')} ({ago} ago)"
        rows.append(
            [
                name,
                agent.get("mode"),
                agent.get("uid"),
                agent.get("port"),
                len(agent.get("allow", [])),
                agent.get("sets", {}).get("v4"),
                agent.get("sets", {}).get("v6"),
                agent.get("blocked", {}).get("packets"),
                agent.get("dns", {}).get("denied"),
                last,
            ]
        )
    return rows


def _suggest(args: argparse.Namespace) -> int:
    result = _call(args, "suggest", {"agent": args.agent, "collapse": args.collapse})
    if args.json:
        print_json(result)
        return 0
    print(
        f"# allowlist for {result['agent']} ({result['mode']} mode): current entries, then new ones"
    )
    for entry in result["current"]:
        print(entry)
    for entry in result["add"]:
        count = result["names"].get(entry)
        print(f"{entry}" + (f"  # asked {count} times" if count else ""))
    addresses = result.get("addresses") or {}
    if addresses:
        print("# contacted without a name (cannot be allowlisted; the agent must use DNS):")
        for address, count in sorted(addresses.items()):
            print(f"#   {address} ({count} times)")
    return 0


def _sets(args: argparse.Namespace) -> int:
    result = _call(args, "sets", {"agent": args.agent})
    if args.json:
        print_json(result)
        return 0
    print_table(
        ["address", "expires", "names"],
        [
            [e["address"], f"{e['expires']}s", " ".join(e.get("names") or [e["name"]])]
            for e in result["elements"]
        ],
    )
    return 0
