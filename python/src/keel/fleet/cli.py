"""``keel fleet ...``: every node in one view, the audit, operators' commands."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from keel import paths
from keel.errors import ApiError
from keel.output import human_duration, print_json, print_table

DESCRIPTION = """\
The fleet: every keel host of the mesh in one view, operators' commands
across hosts, and one audit record no single host can rewrite (every node
witnesses and cosigns the others' ledger checkpoints). Each host runs
`keel fleet serve`; the other commands ask it. See docs/fleet.md.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    fleet = subparsers.add_parser(
        "fleet",
        help="every host in one view, the fleet audit, commands across hosts",
        description=DESCRIPTION,
        formatter_class=formatter,
    )
    commands = fleet.add_subparsers(dest="fleet_command", metavar="COMMAND", required=True)
    config_help = "config file (default: /etc/keel/fleet.json, ./.keel/fleet.json in dev mode)"
    socket_help = (
        "the fleet daemon's socket (default: /run/keel/fleet.sock, ./.keel/run/fleet.sock)"
    )

    serve = commands.add_parser(
        "serve",
        help="run the fleet daemon",
        description="Run the fleet daemon in the foreground (systemd runs it as "
        "keel-fleet.service). It speaks for this host over the local mesh node.",
    )
    serve.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    serve.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check-config",
        help="validate a fleet config and exit",
        description="Read the config as `serve` would; exit 0 when valid, 2 naming the key when not.",
    )
    check.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    check.add_argument("--json", action="store_true", help="print the settings as JSON")
    check.set_defaults(func=_check_config)

    def client(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=description)
        parser.add_argument("--socket", type=Path, metavar="PATH", help=socket_help)
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
        return parser

    status = client(
        "status",
        "every node: agents, services, system generation, last seen",
        "Ask every node of the mesh for its status (each answers for itself) and print one "
        "line per node and its agents. A node that does not answer within --timeout shows as "
        "unreachable, with its last report and when it was last seen. Exit 0 when every node "
        "is healthy, 1 when one is degraded or unreachable.",
    )
    status.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="wait this long for answers (default: status_timeout in fleet.json, 1 s)",
    )
    status.set_defaults(func=_status)

    audit = client(
        "audit",
        "check every node's ledger against what the others witnessed",
        "Ask every node what it has witnessed of the others' ledgers, then every node for its "
        "current checkpoint and consistency proofs from those sizes, and name any node whose "
        "log forked, went back or changed its key. Exit 0: every node consistent; 1: a problem; "
        "3: nothing wrong found, but a node or witness did not answer.",
    )
    audit.add_argument("--timeout", type=float, metavar="SECONDS", help="per round (default 10)")
    audit.set_defaults(func=_audit)

    witness = client(
        "witness",
        "what this node witnessed of the others, its alarms, who cosigned it",
        "This node's witness records: the largest checkpoint of each node it cosigned, the "
        "alarms it raised (with both notes as evidence), and the other nodes' cosignatures of "
        "this node's checkpoints.",
    )
    witness.set_defaults(func=_witness)

    forget = client(
        "forget",
        "drop what this node witnessed of NODE, its alarms and pinned keys",
        "After an operator has dealt with an alarm (a ledger that was really recreated, a key "
        "that was really rotated): this node forgets NODE's witnessed checkpoint, alarms and "
        "witness key, and pins what NODE presents next. Recorded in the ledger.",
    )
    forget.add_argument("node", metavar="NODE", help="the node's mesh id")
    forget.set_defaults(func=_forget)

    checkpoint = client(
        "checkpoint",
        "this node's checkpoint with the other nodes' cosignatures",
        "Print the newest checkpoint of this node's ledger that other nodes cosigned, as one "
        "C2SP signed note carrying this node's signature and every cosignature: what an "
        "auditor keeps to hold this ledger to later (`keel ledger verify --checkpoint`).",
    )
    checkpoint.set_defaults(func=_checkpoint)

    switch = client(
        "switch",
        "a rolling safe switch across nodes: canary first, then batches",
        "Switch NODES to a new configuration one safe switch (`keel switch`) each: the first "
        "node alone (the canary), then --batch nodes at a time. The first node whose switch "
        "does not commit (it rolled back by itself, refused, needs an operator, or gave no "
        "outcome in time) halts the rollout; the nodes already switched are reported, and "
        "switched back with --rollback. Each node carries it out only if this node is one of "
        "its operators. Exit 0 when every node committed, 1 when the rollout halted.",
    )
    what = switch.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--flake",
        metavar="REF[#HOST]",
        help="each node builds REF#HOST (without #HOST: its own host name) and switches to it",
    )
    what.add_argument("--system", metavar="PATH", help="a built system present on every node")
    what.add_argument(
        "--specialisation",
        metavar="NAME",
        help="each node switches to its running system's specialisation NAME",
    )
    switch.add_argument(
        "--nodes",
        required=True,
        metavar="N1,N2,...",
        help="the nodes, in order (ids, id prefixes or host names); the first is the canary",
    )
    switch.add_argument(
        "--batch",
        type=int,
        default=1,
        metavar="K",
        help="nodes at once after the canary (default 1)",
    )
    switch.add_argument(
        "--rollback",
        action="store_true",
        help="when the rollout halts, switch the nodes that committed back to their old system",
    )
    switch.add_argument("--gate", type=float, metavar="SECONDS", help="each node's health gate")
    switch.add_argument("--deadline", type=float, metavar="SECONDS", help="each node's deadline")
    switch.set_defaults(func=_switch)

    rollout = client(
        "rollout",
        "the rollout running from this node, or the last one",
        "Where the rolling switch started from this node stands: each node's outcome, the "
        "node that halted it and why, the nodes switched, not started, switched back.",
    )
    rollout.set_defaults(func=_rollout)

    for verb, text in (
        ("restart", "restart an agent on a node (a stop, then a start)"),
        ("stop", "stop an agent on a node and keep it stopped"),
        ("start", "start an agent on a node (also lifts a quarantine)"),
    ):
        parser = client(
            verb,
            text,
            text[0].upper() + text[1:] + ". The node carries it out only if this node is one "
            "of its operators; both nodes record the command and its outcome in their ledgers.",
        )
        parser.add_argument(
            "node",
            metavar="NODE",
            help="node id, host name, or a unique prefix (4+ characters) of a node id",
        )
        parser.add_argument("agent", metavar="AGENT", help="the agent's name on that node")
        parser.set_defaults(func=_command, verb=verb)


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else paths.config_file("fleet")


def _socket(args: argparse.Namespace) -> Path:
    return Path(args.socket) if args.socket else paths.socket_file("fleet")


def _serve(args: argparse.Namespace) -> int:
    from keel import service
    from keel.fleet import config as fleet_config
    from keel.fleet.daemon import Fleet

    return service.main(
        "fleet", _config_path(args), load=fleet_config.load, make=Fleet, verbose=args.verbose
    )


def _check_config(args: argparse.Namespace) -> int:
    from keel.fleet import config as fleet_config

    config = fleet_config.load(_config_path(args))
    if args.json:
        print_json(
            {
                "mesh": str(config.mesh),
                "state": str(config.state),
                "operators": sorted(config.operators),
                "services": sorted(config.services),
                "witness_every": config.witness_every,
                "witness_name": config.witness_name,
            }
        )
    else:
        print(
            f"{config.source}: valid ({len(config.operators)} operator nodes, "
            f"witnessing every {config.witness_every:g} s)"
        )
    return 0


def _call(args: argparse.Namespace, verb: str, request: dict[str, Any], timeout: float) -> Any:
    from keel.api import call

    return call(_socket(args), verb, request, timeout=timeout, service="fleet")


def _positive(value: float | None, name: str) -> None:
    from keel.errors import UsageError

    if value is not None and not 0 < value <= 300:
        raise UsageError(f"{name} must be more than 0 and at most 300 seconds, got {value:g}")


def _status(args: argparse.Namespace) -> int:
    _positive(args.timeout, "--timeout")
    request = {} if args.timeout is None else {"timeout": args.timeout}
    result = _call(args, "fleet_status", request, (args.timeout or 1.0) + 10)
    if not isinstance(result, dict) or not isinstance(result.get("nodes"), list):
        raise ApiError(f"{_socket(args)}: the fleet daemon sent a status without nodes")
    if args.json:
        print_json(result)
    else:
        print_table(
            ["node", "host", "state", "last seen", "keel", "generation", "agents", "problems"],
            node_rows(result, now=time.time()),
        )
        agents = agent_rows(result)
        if agents:
            print()
            print_table(["node", "agent", "state", "restarts", "last error"], agents)
    return 0 if all(row.get("state") == "healthy" for row in result["nodes"]) else 1


def node_rows(result: dict[str, Any], *, now: float) -> list[list[object]]:
    rows: list[list[object]] = []
    for row in result["nodes"]:
        report = row.get("report") or {}
        seen = row.get("last_seen")
        state = row.get("state")
        if state == "unreachable":
            state = f"UNREACHABLE ({row.get('error')})"
        generation = (report.get("system") or {}).get("generation")
        agents = report.get("agents") or {}
        problems = report.get("problems") or []
        rows.append(
            [
                str(row.get("node"))[:12],
                report.get("host"),
                state,
                "now" if seen == now or (not row.get("stale") and seen) else _ago(seen, now),
                report.get("version"),
                generation,
                len(agents) if report else None,
                " ".join(
                    part
                    for part in ("(stale)" if row.get("stale") else "", "; ".join(problems)[:80])
                    if part
                )
                or None,
            ]
        )
    return rows


def agent_rows(result: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    for row in result["nodes"]:
        report = row.get("report") or {}
        for name, agent in sorted((report.get("agents") or {}).items()):
            state = agent.get("state")
            if row.get("stale"):
                state = f"{state} (stale)"
            rows.append(
                [
                    report.get("host") or str(row.get("node"))[:12],
                    name,
                    state,
                    agent.get("restarts"),
                    agent.get("last_error"),
                ]
            )
    return rows


def _ago(at: object, now: float) -> str:
    if not isinstance(at, int | float):
        return "never"
    return f"{human_duration(max(0.0, now - at))} ago"


def _audit(args: argparse.Namespace) -> int:
    _positive(args.timeout, "--timeout")
    request = {} if args.timeout is None else {"timeout": args.timeout}
    result = _call(args, "audit", request, 2 * (args.timeout or 10.0) + 15)
    if not isinstance(result, dict) or not isinstance(result.get("nodes"), list):
        raise ApiError(f"{_socket(args)}: the fleet daemon sent an audit without nodes")
    if args.json:
        print_json(result)
        return int(result.get("exit_code", 1))
    rows = []
    for node in result["nodes"]:
        current = node.get("current") or {}
        latest = node.get("latest_witnessed") or {}
        rows.append(
            [
                str(node.get("node"))[:12],
                node.get("verdict"),
                current.get("size"),
                latest.get("size"),
                ",".join(str(w)[:8] for w in node.get("witnessed_by", [])) or None,
            ]
        )
    print_table(["node", "verdict", "size now", "witnessed", "witnesses"], rows)
    for node in result["nodes"]:
        for finding in node.get("findings", []):
            print(f"{node['node']}: {finding['kind']}: {finding['detail']}")
    for witness in result.get("silent_witnesses", []):
        print(f"{witness}: did not say what it witnessed")
    return int(result.get("exit_code", 1))


def _witness(args: argparse.Namespace) -> int:
    result = _call(args, "witness", {}, 10)
    if args.json:
        print_json(result)
        return 0
    print(f"witness key: {result['witness_key']}")
    print_table(
        ["node", "size", "cosigned", "ledger key"],
        [
            [w["node"][:12], w["size"], _ago(w["at"], time.time()), w["ledger_key"]]
            for w in result["witnessed"]
        ],
    )
    for alarm in result["alarms"]:
        print(f"ALARM {alarm['node']}: {alarm['kind']}: {alarm['detail']}")
    for c in result["cosigned_by"]:
        print(f"cosigned by {c['witness']} at size {c['size']} ({_ago(c['at'], time.time())})")
    return 1 if result["alarms"] else 0


def _forget(args: argparse.Namespace) -> int:
    result = _call(args, "forget", {"node": args.node}, 10)
    if args.json:
        print_json(result)
    else:
        print(
            f"forgot {result['node']}: {result['witnessed']} witnessed checkpoint, "
            f"{result['alarms']} alarms"
        )
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    result = _call(args, "checkpoint", {}, 10)
    if args.json:
        print_json(result)
    else:
        print(result["note"], end="")
    return 0


def _command(args: argparse.Namespace) -> int:
    request = {"node": args.node, "verb": args.verb, "agent": args.agent}
    result = _call(args, "command", request, 75)
    if args.json:
        print_json(result)
    else:
        print(f"{result['agent']} on {result['node']}: {args.verb}: {result.get('state')}")
    return 0


ROLLOUT_WAIT = 7 * 24 * 3600.0  # the daemon bounds each node's switch itself (switch_timeout)


def _switch(args: argparse.Namespace) -> int:
    from keel.errors import UsageError

    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    if not nodes:
        raise UsageError("--nodes: name at least one node")
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    for name in ("gate", "deadline"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 86400:
            raise UsageError(f"--{name} must be 0 to 86400 seconds, got {value:g}")
    if args.flake is not None:
        target = {"flake": args.flake}
    elif args.system is not None:
        target = {"system": args.system}
    else:
        target = {"specialisation": args.specialisation}
    request: dict[str, Any] = {
        "target": target,
        "nodes": nodes,
        "batch": args.batch,
        "revert": args.rollback,
    }
    request.update(
        {k: getattr(args, k) for k in ("gate", "deadline") if getattr(args, k) is not None}
    )
    report = _call(args, "switch", request, ROLLOUT_WAIT)
    _print_rollout(report, args.json)
    return 0 if report.get("outcome") == "completed" else 1


def _rollout(args: argparse.Namespace) -> int:
    report = _call(args, "rollout", {}, 10)
    _print_rollout(report, args.json)
    return 0


def _print_rollout(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(report)
        return
    state = "running" if report.get("running") else report.get("outcome")
    print(f"rollout {report.get('id')} of {report.get('target')}: {state}")
    rows = []
    for node, item in (report.get("nodes") or {}).items():
        rows.append([node[:12], item.get("switch"), item.get("revert"), item.get("reason")])
    print_table(["node", "switch", "switched back", "reason"], rows)
    if report.get("halted_by"):
        print(f"halted by {report['halted_by']}: {report.get('reason') or 'no reason given'}")
    for key, text in (
        ("switched", "running the new configuration"),
        ("not_started", "not started"),
        ("reverted", "switched back"),
        ("revert_failed", "FAILED to switch back"),
    ):
        if report.get(key):
            print(f"{text}: {', '.join(report[key])}")
