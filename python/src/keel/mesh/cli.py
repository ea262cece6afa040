"""``keel mesh ...``: run a node, pair nodes by invite, send and receive, rooms.

``serve`` runs the node's daemon from its config file (``--config``,
``/etc/keel/mesh.json`` by default, ``./.keel/mesh.json`` in dev mode);
``check-config`` reads that file as ``serve`` would. ``id`` reads the node's
identity in its directory. Every other command talks to the daemon through
its control socket (``--socket``, ``/run/keel/mesh.sock`` by default,
``./.keel/run/mesh.sock`` in dev mode).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from keel import commands
from keel.errors import KeelError, UsageError

SOCKET_HELP = (
    "the node's control socket (default: /run/keel/mesh.sock, or for a process that cannot "
    "open it the agents' socket /run/keel-mesh/agents.sock; ./.keel/run/mesh.sock in dev mode)"
)
MOVED = (
    "keel mesh serve reads its settings from --config FILE (default /etc/keel/mesh.json): "
    'write {{"directory": "{directory}", "listen": "{listen}"}} there (docs/mesh.md, '
    "upgrading); the node's identity and state stay where they are"
)


def register(subparsers: commands.Subcommands) -> None:
    mesh = subparsers.add_parser(
        "mesh",
        help="encrypted peer-to-peer messaging between keel hosts",
        description="The keel mesh: post-quantum hybrid encrypted messaging between nodes, "
        "paired by invite, with rooms and store-and-forward delivery. See docs/mesh.md.",
    )
    sub = mesh.add_subparsers(dest="mesh_command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        return _client_command(sub, name, help_text, func)

    p = commands.add_serve(
        sub, "mesh", help="run the node's daemon", what="the node's daemon", func=_serve
    )
    for moved in ("--dir", "--listen", "--ledger"):
        p.add_argument(moved, help=argparse.SUPPRESS)
    commands.add_check_config(
        sub,
        "mesh",
        help="validate a mesh config and exit",
        json_help="print the settings read as JSON",
        func=_check_config,
    )

    p = sub.add_parser(
        "id",
        help="print the node id (makes the identity if there is none)",
        description="Print the node id of the node's directory (from --dir, or the config's "
        "directory), making its identity if there is none yet.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help=commands.config_help("mesh"))
    p.add_argument(
        "--dir", type=Path, metavar="DIR", help="the node's directory (overrides the config's)"
    )
    p.set_defaults(func=_id)

    p = command("status", "the node: id, mesh, addresses, connections, queues, ledger", _status)
    p.add_argument("--json", action="store_true", help="print the daemon's whole status as JSON")

    p = command("invite", "print a single-use invite token for another node", _invite)
    p.add_argument(
        "--ttl", type=float, default=3600.0, metavar="SECONDS", help="valid for (default 3600)"
    )
    p.add_argument("--uses", type=int, default=1, metavar="N", help="joins allowed (default 1)")
    p.add_argument(
        "--json", action="store_true", help="print token, id (to revoke it), expires and uses"
    )

    p = command("invites", "list the invites this node issued, with their ids", _invites)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "revoke-invite",
        "revoke an invite: the node that issued it refuses it from then on "
        "(from an operator node of the mesh)",
        _revoke_invite,
    )
    p.add_argument(
        "invite", metavar="INVITE", help="the invite's id (`keel mesh invites`) or the token"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("join", "join the mesh of the node that made TOKEN", _join)
    p.add_argument("token", metavar="TOKEN")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("peers", "list the mesh's members", _peers)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "whoami",
        "who the node takes you for: an agent (named by your uid) and its mesh grant, "
        "or the node itself",
        _whoami,
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "agents",
        "list the agents this node tells apart, with their mesh grants, and those its "
        "connected peers announced",
        _agents,
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("send", "send DATA to a node, or to an agent there; prints the message id", _send)
    p.add_argument(
        "node", metavar="NODE_ID|AGENT@NODE_ID", help="the node, or an agent on it (AGENT@NODE_ID)"
    )
    p.add_argument("--topic", required=True, metavar="T")
    p.add_argument("data", metavar="DATA", help="the message; - reads it from stdin")

    p = command("recv", "print messages received on a topic", _recv)
    p.add_argument("--topic", required=True, metavar="T")
    p.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="exit after this long")
    p.add_argument("--json", action="store_true", help="JSON lines: id, from, topic, data")

    p = command(
        "dead-letters",
        "list this node's sends that could not be delivered, newest first, and why "
        "(an agent sees only its own)",
        _dead_letters,
    )
    p.add_argument(
        "--limit", type=int, default=100, metavar="N", help="at most N (default 100, up to 10000)"
    )
    p.add_argument(
        "--json", action="store_true", help="print JSON: id, to, agent, to_agent, room, topic, "
        "size, reason, at"
    )  # fmt: skip

    p = command(
        "remove",
        "revoke a node: it is refused from then on (from an operator node of the mesh)",
        _remove,
    )
    p.add_argument("node", metavar="NODE_ID")

    p = command(
        "operator",
        "grant a member the operator role (it may then remove nodes and grant the role), "
        "or take it back; from an operator node (the founder is the first)",
        _operator,
    )
    p.add_argument("action", choices=("grant", "revoke"))
    p.add_argument("node", metavar="NODE_ID")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    room = sub.add_parser("room", help="rooms: owner-managed groups of nodes and agents")
    room_sub = room.add_subparsers(dest="room_command", metavar="COMMAND", required=True)

    def room_command(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        return _client_command(room_sub, name, help_text, func)

    p = room_command("create", "create a room owned by this node; prints its id", _room_create)
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "members",
        metavar="MEMBER",
        nargs="*",
        help="initial members: NODE_ID (the node and every agent of its) or AGENT@NODE_ID "
        "(that agent only; the node is in by its agents)",
    )
    p.add_argument("--json", action="store_true", help="print the room as JSON")
    for name, verb in (("add", "add a member to"), ("remove", "remove a member from")):
        p = room_command(name, f"{verb} a room this node owns", _room_change)
        p.add_argument("room", metavar="ROOM", help="room id or name")
        p.add_argument("node", metavar="MEMBER", help="NODE_ID or AGENT@NODE_ID")
        p.add_argument("--json", action="store_true", help="print the room as JSON")
    p = room_command("send", "send DATA to every member of a room", _room_send)
    p.add_argument("room", metavar="ROOM", help="room id or name")
    p.add_argument("--topic", required=True, metavar="T")
    p.add_argument("data", metavar="DATA", help="the message; - reads it from stdin")
    p = room_command("members", "list a room's members", _room_members)
    p.add_argument("room", metavar="ROOM", help="room id or name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = room_command("list", "list the rooms this node knows", _room_list)
    p.add_argument("--json", action="store_true", help="print JSON")


def _client_command(
    sub: commands.Subcommands, name: str, help_text: str, func: Any
) -> argparse.ArgumentParser:
    """A command that talks to the daemon (``--socket``)."""
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--socket", type=Path, metavar="PATH", help=SOCKET_HELP)
    parser.set_defaults(func=func)
    return parser


def _client(args: argparse.Namespace) -> Any:
    from keel.mesh.client import MeshClient

    return MeshClient(args.socket)


def _payload(data: str) -> bytes:
    from keel.mesh.packets import MAX_PAYLOAD

    if data != "-":
        return os.fsencode(data)  # the argument's bytes, as given
    payload = sys.stdin.buffer.read(MAX_PAYLOAD + 1)  # no more than could be sent
    if len(payload) > MAX_PAYLOAD:
        raise UsageError(
            f"a message carries at most {MAX_PAYLOAD:,} bytes (960 KiB); stdin holds more"
        )
    return payload


def _serve(args: argparse.Namespace) -> int:
    if args.dir is not None or args.listen is not None or args.ledger is not None:
        _moved(args)
    from keel.mesh.serve import main

    return main(commands.config_path(args, "mesh"), verbose=args.verbose)


def _moved(args: argparse.Namespace) -> NoReturn:
    """``serve --dir/--listen/--ledger``, the flags before the config file: say what to write."""
    directory = args.dir or "/var/lib/keel/mesh"
    raise UsageError(MOVED.format(directory=directory, listen=args.listen or "0.0.0.0:7400"))


def _check_config(args: argparse.Namespace) -> int:
    from keel.mesh import config
    from keel.mesh.listener import format_address
    from keel.output import print_json

    loaded = config.load(commands.config_path(args, "mesh"))
    settings = loaded.settings
    if args.json:
        print_json(
            {
                "directory": str(loaded.directory),
                "listen": format_address(*loaded.listen),
                "socket": str(loaded.common.socket),
                "ledger": None if loaded.common.ledger is None else str(loaded.common.ledger),
                "operator_group": settings.operator_group,
                "durability": settings.durability,
            }
        )
    else:
        print(
            f"{loaded.source}: valid (node directory {loaded.directory}, listening on "
            f"{format_address(*loaded.listen)}, control socket {loaded.common.socket})"
        )
    return 0


def _id(args: argparse.Namespace) -> int:
    from keel.mesh.directory import IDENTITY_FILE, load_or_create_identity, prepare

    if args.dir is not None:
        directory, named = Path(args.dir), "--dir"
    else:
        from keel.mesh import config

        directory, named = config.load(commands.config_path(args, "mesh")).directory, "directory"
    key = directory / IDENTITY_FILE
    made = not os.path.lexists(key)  # (False also when the directory cannot be searched)
    if made:
        prepare(directory, 0o700, named=named)
    print(load_or_create_identity(key).node_id)
    if made:
        # A mistyped --dir must not pass for the node's identity unnoticed.
        print(f"keel: no identity in {directory} yet: made a new one in {key}", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    from keel.output import print_json

    status = _client(args).status()
    if args.json:
        print_json(status)
        return 0
    ledger = status.get("service", {}).get("ledger", {})
    problem = f" ({ledger['problem']})" if ledger.get("problem") else ""
    lines = [
        ("node", status["node"]),
        ("mesh", f"{status['mesh']}{'' if status['member'] else ' (this node was removed)'}"),
        ("addresses", ", ".join(status["addresses"])),
        ("members", status["members"]),
        ("connected", len(status["connected"])),
        ("outbox", f"{status['outbox']} message(s) waiting"),
        ("inbox", f"{status['inbox']} message(s) unread"),
        ("ledger", f"{ledger.get('state', '?')}{problem}"),
    ]
    for name, value in lines:
        print(f"{name + ':':11}{value}")
    return 0


def _invite(args: argparse.Namespace) -> int:
    from keel.mesh.arguments import MAX_TTL
    from keel.mesh.invite import MAX_USES

    if not (math.isfinite(args.ttl) and 0 < args.ttl <= MAX_TTL):
        raise UsageError(f"--ttl must be a number of seconds above 0, at most {MAX_TTL}")
    if not 1 <= args.uses <= MAX_USES:
        raise UsageError(f"--uses must be 1 to {MAX_USES}, got {args.uses}")
    client = _client(args)
    if args.json:
        from keel.output import print_json

        print_json(client.call("invite", {"ttl": args.ttl, "uses": args.uses}))
    else:
        print(client.invite(ttl=args.ttl, uses=args.uses))
    return 0


def _invites(args: argparse.Namespace) -> int:
    return _listing(
        args,
        _client(args).invites(),
        ["id", "state", "uses left", "expires"],
        lambda i: (
            i["id"],
            i["state"],
            i["uses_left"],
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(i["expires"])),
        ),
    )


def _revoke_invite(args: argparse.Namespace) -> int:
    from keel.mesh.invite import TOKEN_PREFIX, InviteToken
    from keel.output import print_json

    invite = args.invite.strip()
    if invite.startswith(TOKEN_PREFIX):  # a leaked token: its id, never its secret, is sent
        invite = InviteToken.decode(invite).invite_id.hex()
    result = _client(args).revoke_invite(invite)
    if args.json:
        print_json(result)
    else:
        where = (
            "" if result["issued_here"] else " (its issuer refuses it once the record reaches it)"
        )
        print(f"revoked invite {result['invite']}{where}")
    return 0


def _join(args: argparse.Namespace) -> int:
    from keel.mesh.invite import InviteToken
    from keel.output import print_json

    token = InviteToken.decode(args.token)  # malformed / forged tokens fail here, clearly
    token.check_fresh(time.time())
    result = _client(args).join(args.token)
    if args.json:
        print_json(result)
    elif result.get("joined"):
        print(f"joined mesh {result['mesh']} through {result['via']} ({result['members']} members)")
    else:
        print(f"already a member of mesh {result['mesh']}")
    return 0


def _listing(
    args: argparse.Namespace,
    items: list[dict[str, Any]],
    headers: list[str],
    row: Callable[[dict[str, Any]], tuple[Any, ...]],
) -> int:
    """``items`` as JSON (``--json``) or as a table of ``row(item)``."""
    from keel.output import print_json, print_table

    if args.json:
        print_json(items)
    else:
        print_table(headers, [row(item) for item in items])
    return 0


def _peers(args: argparse.Namespace) -> int:
    from keel.output import human_duration

    now = time.time()
    return _listing(
        args,
        _client(args).peers(),
        ["id", "addresses", "connected", "last seen", "queued", "operator"],
        lambda p: (
            p["id"],
            ",".join(p["addresses"]) or "-",
            "yes" if p["connected"] else "no",
            "now"
            if p["connected"]
            else (human_duration(now - p["last_seen"]) + " ago" if p["last_seen"] else "never"),
            p["queued"],
            "yes" if p.get("operator") else "no",
        ),
    )


def _grant_text(mesh: dict[str, Any] | None) -> tuple[str, str, str]:
    """(send to, receive from, topics) of a grant for a table; None is the node: everything."""
    if mesh is None:
        return "* (the node)", "* (the node)", "* (the node)"
    return (
        ",".join(mesh["sendTo"]) or "nobody",
        ",".join(mesh.get("receiveFrom", ())) or "nobody",
        ",".join(mesh["topics"]) or "none",
    )


def _whoami(args: argparse.Namespace) -> int:
    from keel.output import print_json

    me = _client(args).whoami()
    if args.json:
        print_json(me)
        return 0
    send_to, receive_from, topics = _grant_text(me["mesh"])
    print(f"node:      {me['node']}")
    print(f"you are:   {me['caller']}" + (f", tier {me['tier']}" if me["tier"] is not None else ""))
    print(f"send to:   {send_to}")
    print(f"read from: {receive_from}")
    print(f"topics:    {topics}")
    print(f"operator:  {'yes' if me['operator'] else 'no'}")
    return 0


def _agents(args: argparse.Namespace) -> int:
    return _listing(
        args,
        _client(args).agents(),
        ["agent", "tier", "uid", "send to", "read from", "topics", "node"],
        lambda a: (
            (a["agent"], a["tier"], a["uid"], *_grant_text(a["mesh"]), a["node"])
            if a["uid"] is not None
            else (a["agent"], "-", "-", *["(its node's)"] * 3, a["node"])
        ),
    )


def _send(args: argparse.Namespace) -> int:
    print(_client(args).send(args.node, args.topic, _payload(args.data)))
    return 0


def _recv(args: argparse.Namespace) -> int:
    from keel.output import print_json_line

    if args.count is not None and args.count < 1:
        raise UsageError(f"--count must be at least 1, got {args.count}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout >= 0):
        raise UsageError(f"--timeout must be a number of seconds, 0 or more, got {args.timeout:g}")
    client = _client(args)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    got = 0
    while args.count is None or got < args.count:
        remaining = 30.0 if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            break
        want = 1000 if args.count is None else min(1000, args.count - got)
        for message in client.recv(args.topic, max=want, wait=min(remaining, 30.0)):
            got += 1
            if args.json:
                line: dict[str, Any] = {
                    "id": message.id,
                    "from": message.sender,
                    "topic": message.topic,
                }
                if message.room:
                    line["room"] = message.room
                if message.agent:
                    line["agent"] = message.agent
                try:
                    line["data"] = message.data.decode("utf-8")
                except UnicodeDecodeError:
                    import base64

                    line["data_base64"] = base64.b64encode(message.data).decode()
                print_json_line(line)
            else:
                where = f" room {message.room}" if message.room else ""
                text = message.data.decode("utf-8", errors="backslashreplace")
                print(f"{message.sender} {message.topic}{where}: {text}", flush=True)
    client.ack()
    if args.count is not None and got < args.count:
        raise KeelError(
            f"timed out after {args.timeout:g} s with {got} of {args.count} messages on {args.topic}"
        )
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    return _listing(
        args,
        _client(args).dead_letters(limit=args.limit),
        ["at", "id", "from", "to", "topic", "room", "reason"],
        lambda d: (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d["at"])),
            d["id"],
            d["agent"] or "(the node)",
            d["to"] if d["to_agent"] is None else f"{d['to_agent']}@{d['to']}",
            d["topic"],
            d["room"] or "-",
            d["reason"],
        ),
    )


def _remove(args: argparse.Namespace) -> int:
    _client(args).remove(args.node)
    print(f"removed {args.node}")
    return 0


def _operator(args: argparse.Namespace) -> int:
    from keel.output import print_json

    result = _client(args).operator(args.node, grant=args.action == "grant")
    if args.json:
        print_json(result)
    else:
        print(f"{args.node} is {'an' if result['operator'] else 'no longer an'} operator node")
    return 0


def _print_room(room: dict[str, Any], as_json: bool) -> None:
    from keel.output import print_json, print_table

    if as_json:
        print_json(room)
        return
    print(f"room {room['name']} ({room['room']}), owner {room['owner']}, version {room['version']}")
    print_table(
        ["member", "node", "agent", "connected"],
        [
            (
                m["id"],
                m.get("node", m["id"]),
                m.get("agent") or "* (every agent)",
                "yes" if m["connected"] else "no",
            )
            for m in room["members"]
        ],
    )


def _room_create(args: argparse.Namespace) -> int:
    room = _client(args).room_create(args.name, args.members)
    if args.json:
        _print_room(room, True)
    else:
        print(room["room"])
    return 0


def _room_change(args: argparse.Namespace) -> int:
    client = _client(args)
    change = client.room_add if args.room_command == "add" else client.room_remove
    _print_room(change(args.room, args.node), args.json)
    return 0


def _room_send(args: argparse.Namespace) -> int:
    print(_client(args).room_send(args.room, args.topic, _payload(args.data)))
    return 0


def _room_members(args: argparse.Namespace) -> int:
    _print_room(_client(args).room_members(args.room), args.json)
    return 0


def _room_list(args: argparse.Namespace) -> int:
    return _listing(
        args,
        _client(args).rooms(),
        ["room", "name", "owner", "version", "members"],
        lambda r: (
            r["room"],
            r["name"],
            r["owner"],
            r["version"],
            " ".join(m["id"] for m in r["members"]),
        ),
    )
