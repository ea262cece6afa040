"""``keel mcp``: the gateway, its servers, and what each agent may use."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from keel import commands as daemon
from keel import paths
from keel.errors import ApiError, UsageError
from keel.output import print_json, print_table

DESCRIPTION = """\
keel runs each MCP tool server once per host, as its own unit at a trust tier,
supervised by keel watch, and serves them to agents through one gateway. Each
agent sees (tools/list) and may call (tools/call) only the tools a server's
`share` grants it, decided from the kernel's word on who is calling. Every
call is recorded in the ledger (hashes, never content). See docs/mcp.md.

examples:
  keel mcp list                          servers, state, tools, who may use them
  keel mcp tools scout                   what agent scout sees
  keel mcp call files.read_file --arg path=/srv/notes.txt
  keel mcp call files.read_file --as scout --json-args '{"path": "/x"}'
  keel mcp add files.json                install a server (plain systemd hosts)
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    mcp = subparsers.add_parser(
        "mcp",
        help="shared MCP tool servers: one per host, policed per agent",
        description=DESCRIPTION,
        formatter_class=formatter,
    )
    commands = mcp.add_subparsers(dest="mcp_command", metavar="COMMAND", required=True)
    socket_help = "the gateway's control socket (default: /run/keel/mcp.sock, ./.keel/run/mcp.sock)"

    daemon.add_serve(commands, "mcp", help="run the gateway", what="the MCP gateway", func=_serve)
    daemon.add_check_config(
        commands,
        "mcp",
        help="validate the gateway's config and its server specs, then exit",
        json_help="print servers and grants as JSON",
        func=_check_config,
    )

    listing = commands.add_parser(
        "list",
        help="servers, their state and tools, and who may use them",
        description="Ask the gateway for every MCP server: transport, state (ready, starting, "
        "down), its tools, its share grants and the local agents that see its tools.",
    )
    listing.add_argument("--socket", type=Path, metavar="PATH", help=socket_help)
    listing.add_argument("--json", action="store_true", help="print the gateway's full status")
    listing.set_defaults(func=_list)

    tools = commands.add_parser(
        "tools",
        help="the tools an agent sees",
        description="The tools AGENT gets from tools/list, exactly as the gateway decides them.",
    )
    tools.add_argument("agent", help="the agent's name")
    tools.add_argument("--socket", type=Path, metavar="PATH", help=socket_help)
    tools.add_argument("--json", action="store_true", help="machine-readable output")
    tools.set_defaults(func=_tools)

    call = commands.add_parser(
        "call",
        help="call a tool as an operator (recorded in the ledger)",
        description="Call SERVER.TOOL through the gateway. Operators (whoever can open the "
        "control socket) may call any tool; --as AGENT checks the call against that agent's "
        "grants instead, as if the agent had made it.",
        formatter_class=formatter,
        epilog="examples:\n  keel mcp call clock.now\n  keel mcp call files.read --arg path=/etc/hostname\n"
        '  keel mcp call files.write --json-args \'{"path": "/tmp/x", "text": "hi"}\' --as scout',
    )
    call.add_argument("tool", metavar="SERVER.TOOL")
    call.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an argument (VALUE is read as JSON when it parses, else as a string); repeatable",
    )
    call.add_argument("--json-args", metavar="JSON", help="all arguments as one JSON object")
    call.add_argument("--as", dest="as_agent", metavar="AGENT", help="check the call as this agent")
    call.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long")
    call.add_argument("--socket", type=Path, metavar="PATH", help=socket_help)
    call.add_argument("--json", action="store_true", help="print the whole MCP result as JSON")
    call.set_defaults(func=_call)

    add = commands.add_parser(
        "add",
        help="install MCP servers from spec files (plain systemd hosts)",
        description="Install each server: its spec in /etc/keel/mcp/servers, its user, its "
        "socket and service units in /etc/systemd/system; then daemon-reload, enable and "
        "start, and restart the gateway so it serves the new servers. Idempotent. On NixOS "
        "declare services.keel.mcp.servers instead.",
    )
    add.add_argument("specs", type=Path, nargs="+", metavar="SPEC.json")
    add.add_argument(
        "--dry-run", action="store_true", help="print what would be done, change nothing"
    )
    add.add_argument("--unit-dir", type=Path, default=None, help=argparse.SUPPRESS)
    add.add_argument("--spec-dir", type=Path, default=None, help=argparse.SUPPRESS)
    add.add_argument("--config", type=Path, default=None, help=argparse.SUPPRESS)
    add.set_defaults(func=_add)

    remove = commands.add_parser(
        "remove",
        help="stop and uninstall MCP servers (plain systemd hosts)",
        description="Stop and disable each server's units, remove them and its spec, and "
        "restart the gateway. The server's user and state directory are kept.",
    )
    remove.add_argument("names", nargs="+", metavar="NAME")
    remove.add_argument(
        "--dry-run", action="store_true", help="print what would be done, change nothing"
    )
    remove.add_argument("--unit-dir", type=Path, default=None, help=argparse.SUPPRESS)
    remove.add_argument("--spec-dir", type=Path, default=None, help=argparse.SUPPRESS)
    remove.set_defaults(func=_remove)

    render = commands.add_parser(
        "render-units",
        help="print the systemd units of a server spec",
        description="Print the socket and service units keel renders for SPEC (from the spec "
        "and tiers.json alone, by the renderer agents' units come from).",
    )
    render.add_argument("spec", type=Path, metavar="SPEC.json")
    render.add_argument("--tiers", type=Path, metavar="FILE", help="a tiers.json to use instead")
    render.set_defaults(func=_render)

    watch = commands.add_parser(
        "watch-entries",
        help="the watch.json entries that supervise the servers",
        description="Print the `agents` entries of watch.json that supervise every server of "
        "the gateway's config: the unit (systemd backend) or the command (process backend, "
        "dev mode).",
    )
    watch.add_argument("--config", type=Path, metavar="FILE", help=daemon.config_help("mcp"))
    watch.add_argument("--backend", choices=["systemd", "process"], default=None)
    watch.set_defaults(func=_watch_entries)

    connect = commands.add_parser(
        "connect",
        help="bridge stdin/stdout to the gateway (for stdio-only MCP clients)",
        description="Copy stdin to the gateway's agent socket and its answers to stdout: an "
        "agent whose MCP client only starts stdio servers uses `keel mcp connect` as the "
        "server command. The gateway still names the agent from the kernel.",
    )
    connect.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="the gateway's agent socket (default: /run/keel-mcp/mcp.sock, "
        "./.keel/run/mcp-agents.sock in dev mode)",
    )
    connect.set_defaults(func=_connect)

    execute = commands.add_parser(
        "exec",
        help=argparse.SUPPRESS,
        description="Run a stdio MCP server with the gateway's connection as its stdin and "
        "stdout: the socket systemd passes (socket activation) or one bound at --listen. "
        "Used in the ExecStart= of keel-mcp-NAME.service.",
    )
    execute.add_argument(
        "--listen", type=Path, metavar="PATH", help="bind this socket (no systemd)"
    )
    execute.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    execute.set_defaults(func=_exec)


# --- the daemon ---------------------------------------------------------------------------


def _config_path(args: argparse.Namespace) -> Path:
    return daemon.config_path(args, "mcp")


def _serve(args: argparse.Namespace) -> int:
    from keel import service
    from keel.mcp import config as mcp_config
    from keel.mcp.gateway import McpGateway

    return service.main(
        "mcp", _config_path(args), load=mcp_config.load, make=McpGateway, verbose=args.verbose
    )


def _check_config(args: argparse.Namespace) -> int:
    from keel.mcp import config as mcp_config

    config = mcp_config.load(_config_path(args))
    if args.json:
        print_json(
            {
                "servers": {name: spec.to_json() for name, spec in config.servers.items()},
                "agents": {
                    name: {"uid": entry.uid, "tier": entry.tier}
                    for name, entry in config.agents.items()
                },
                "listen": str(config.listen),
                "mesh": {
                    "socket": str(config.mesh.socket),
                    "deadline": config.mesh.deadline,
                    "list_ttl": config.mesh.list_ttl,
                },
                "remote": {
                    label: {
                        "node": entry.node,
                        "servers": "*" if entry.servers is None else sorted(entry.servers),
                    }
                    for label, entry in sorted(config.remote.items())
                },
            }
        )
    else:
        remote = f"; tools of {len(config.remote)} other nodes" if config.remote else ""
        print(
            f"{config.source}: valid ({len(config.servers)} MCP servers, "
            f"{len(config.agents)} agents; agents connect to {config.listen}{remote})"
        )
    return 0


def _connect(args: argparse.Namespace) -> int:
    from keel.mcp.client import bridge
    from keel.mcp.config import default_listen

    return bridge(Path(args.socket) if args.socket else default_listen())


def _exec(args: argparse.Namespace) -> int:
    from keel.mcp.attach import accept_and_exec

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    accept_and_exec(command, args.listen)
    return 1  # not reached: exec replaced this process


# --- the control socket ---------------------------------------------------------------------


def _socket(args: argparse.Namespace) -> Path:
    return Path(args.socket) if args.socket else paths.socket_file("mcp")


def _list(args: argparse.Namespace) -> int:
    from keel.api import call

    result = call(_socket(args), "status", service="mcp")
    if not isinstance(result, dict) or not isinstance(result.get("servers"), dict):
        raise ApiError(f"{_socket(args)}: the gateway sent a status without servers")
    if args.json:
        print_json(result)
        return 0
    rows = []
    for name, server in sorted(result["servers"].items()):
        state = server.get("state")
        if state != "ready" and server.get("last_error"):
            state = f"{state}: {_clip(str(server['last_error']), 40)}"
        rows.append(
            [
                name,
                server.get("transport"),
                server.get("tier"),
                state,
                ", ".join(server.get("tools") or []) or None,
                ", ".join(server.get("agents") or []) or None,
                _share_cell(server.get("share") or []),
            ]
        )
    mesh = result.get("mesh") or {}
    for label, entry in sorted((mesh.get("remote") or {}).items()):
        servers = entry.get("servers")
        shown = f"{label}.*" if servers == "*" else ", ".join(f"{label}.{s}" for s in servers)
        rows.append(
            [
                shown,
                "mesh",
                None,
                f"node {entry.get('node')}",
                f"as the host shares them: keel mcp tools AGENT lists them as {label}.SERVER.TOOL",
                None,
                None,
            ]
        )
    print_table(["server", "transport", "tier", "state", "tools", "agents", "shared with"], rows)
    return 0


def _share_cell(grants: list[dict[str, Any]]) -> str | None:
    parts = []
    for grant in grants:
        agents = grant.get("agents")
        tools = grant.get("tools")
        who = "every agent" if agents == "*" else ",".join(agents or []) or "nobody"
        if "nodes" in grant:
            nodes = grant["nodes"]
            who += f"@{'any node' if nodes == '*' else ','.join(n[:8] for n in nodes or [])}"
        what = "all tools" if tools == "*" else ",".join(tools or []) or "no tools"
        parts.append(f"{who}: {what}")
    return "; ".join(parts) or None


def _tools(args: argparse.Namespace) -> int:
    from keel.api import call

    # Other nodes' tools are asked for (each within the gateway's mesh deadline).
    result = call(_socket(args), "tools", {"agent": args.agent}, service="mcp", timeout=3600)
    if args.json:
        print_json(result)
        return 0
    tools = result.get("tools", [])
    if not tools:
        print(f"agent {args.agent} sees no tools")
        return 0
    print_table(
        ["tool", "description"],
        [
            [
                t["name"],
                _clip(t.get("description", "").splitlines()[0] if t.get("description") else "", 70),
            ]
            for t in tools
        ],
    )
    return 0


def parse_call_arguments(pairs: list[str], json_args: str | None) -> dict[str, Any]:
    """``--json-args`` and ``--arg KEY=VALUE`` (VALUE as JSON when it parses) into one object."""
    arguments: dict[str, Any] = {}
    if json_args is not None:
        try:
            value = json.loads(json_args)
        except ValueError as exc:
            raise UsageError(f"--json-args: not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise UsageError("--json-args: expected a JSON object of arguments")
        arguments.update(value)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--arg {pair!r}: expected KEY=VALUE")
        try:
            arguments[key] = json.loads(text)
        except ValueError:
            arguments[key] = text
    return arguments


def _call(args: argparse.Namespace) -> int:
    from keel.api import call

    arguments = parse_call_arguments(args.arg, args.json_args)
    request: dict[str, Any] = {"tool": args.tool, "arguments": arguments}
    if args.as_agent:
        request["as"] = args.as_agent
    if args.timeout:
        request["timeout"] = args.timeout
    wait = (args.timeout or 60.0) + 10.0
    result = call(_socket(args), "call", request, service="mcp", timeout=wait)
    if args.json:
        print_json(result)
    else:
        for block in result.get("content", []):
            if block.get("type") == "text":
                print(block.get("text", ""))
            else:
                print(f"[{block.get('type')} content]")
        if "structuredContent" in result and not result.get("content"):
            print(json.dumps(result["structuredContent"], indent=2))
    if result.get("isError"):
        print(f"keel: the tool {args.tool} reported an error", file=sys.stderr)
        return 1
    return 0


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# --- units and installs ------------------------------------------------------------------------


def _render(args: argparse.Namespace) -> int:
    from keel.agents.units import load_tiers
    from keel.mcp.spec import load_server_spec
    from keel.mcp.units import render_units

    spec = load_server_spec(args.spec)
    units = render_units(spec, load_tiers(args.tiers))
    if not units:
        print(f"# {spec.name} is reached at {spec.url}; keel runs no unit for it")
    for name, text in units.items():
        print(f"# --- {name}")
        print(text, end="")
    return 0


def _add(args: argparse.Namespace) -> int:
    from keel.agents.units import load_tiers
    from keel.mcp import install
    from keel.mcp.spec import load_server_specs

    specs = load_server_specs(list(args.specs))
    steps = install.plan_add(
        specs,
        load_tiers(),
        unit_dir=args.unit_dir or install.UNIT_DIR,
        spec_dir=args.spec_dir or install.SPEC_DIR,
        config=args.config or install.CONFIG,
    )
    for line in steps.describe():
        print(f"{'would ' if args.dry_run else ''}{line}")
    if not args.dry_run:
        install.apply(steps)
        print(f"keel: MCP servers installed: {', '.join(spec.name for spec in specs)}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from keel.mcp import install

    steps = install.plan_remove(
        list(args.names),
        unit_dir=args.unit_dir or install.UNIT_DIR,
        spec_dir=args.spec_dir or install.SPEC_DIR,
    )
    for line in steps.describe():
        print(f"{'would ' if args.dry_run else ''}{line}")
    if not args.dry_run:
        install.apply(steps)
        print(f"keel: MCP servers removed: {', '.join(args.names)}")
    return 0


def _watch_entries(args: argparse.Namespace) -> int:
    from keel.mcp import config as mcp_config
    from keel.mcp.units import watch_entries

    config = mcp_config.load(_config_path(args))
    backend = args.backend or ("process" if paths.dev_mode() else "systemd")
    print_json(watch_entries(config.servers.values(), backend=backend, sockets=config.sockets))
    return 0
