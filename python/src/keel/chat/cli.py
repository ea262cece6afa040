"""``keel chat serve|check-config|status``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from keel import paths
from keel.errors import ApiError
from keel.output import print_json

DESCRIPTION = """\
keel chat is a Telegram bot for the operators of this host: /status, /agents
and /log answer at once; /restart AGENT asks the person who sent it to confirm
with a button that only they can press, once, within 60 s. Only the people in
allowed_users are answered, whatever chat they write from; commands that change
things work only in a private chat. See docs/chat.md.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="the Telegram bot: status, agents, ledger, confirmed restarts",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = chat.add_subparsers(dest="chat_command", metavar="COMMAND", required=True)
    config_help = "config file (default: /etc/keel/chat.json, ./.keel/chat.json in dev mode)"

    serve = commands.add_parser(
        "serve",
        help="run the chat daemon",
        description="Run the chat daemon in the foreground (systemd runs it as "
        "keel-chat.service, Type=notify with WatchdogSec). It long-polls the Bot API; "
        "no port is opened.",
    )
    serve.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    serve.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check-config",
        help="validate a chat config and exit",
        description="Read the config as `serve` would (the token file included, whose "
        "content is never shown) and report the first problem, naming the key. Exit 0 "
        "when it is valid, 2 when it is not. Telegram is not contacted.",
    )
    check.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    check.add_argument("--json", action="store_true", help="print what the config allows as JSON")
    check.set_defaults(func=_check_config)

    status = commands.add_parser(
        "status",
        help="the chat daemon: Telegram connection, pending confirmations, counters",
        description="Ask the running chat daemon how it is doing.",
    )
    status.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="chat's control socket (default: /run/keel/chat.sock, ./.keel/run/chat.sock)",
    )
    status.add_argument("--json", action="store_true", help="print the full status as JSON")
    status.set_defaults(func=_status)


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else paths.config_file("chat")


def _serve(args: argparse.Namespace) -> int:
    from keel import service
    from keel.chat import config as chat_config
    from keel.chat.daemon import Chat

    return service.main(
        "chat", _config_path(args), load=chat_config.load, make=Chat, verbose=args.verbose
    )


def _check_config(args: argparse.Namespace) -> int:
    from keel.chat import config as chat_config

    config = chat_config.load(_config_path(args))
    policy = config.policy
    summary: dict[str, Any] = {
        "allowed_users": sorted(policy.allowed_users),
        "commands": sorted(policy.commands),
        "host": policy.host,
        "watch_socket": str(config.watch_socket),
        "ledger": str(config.common.ledger) if config.common.ledger else None,
        "api": f"{config.api.scheme}://{config.api.authority}{config.api.target}",
        "confirm_timeout": policy.confirm_timeout,
    }
    if args.json:
        print_json(summary)
        return 0
    people = len(policy.allowed_users)
    print(
        f"{config.source}: valid ({people} allowed user{'s' if people != 1 else ''}; "
        f"commands: {', '.join(summary['commands'])})"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from keel.api import call

    sock = Path(args.socket) if args.socket else paths.socket_file("chat")
    result = call(sock, "status", service="chat")
    if not isinstance(result, dict) or not isinstance(result.get("telegram"), dict):
        raise ApiError(f"{sock}: the chat daemon sent a status without its Telegram state")
    if args.json:
        print_json(result)
        return 0
    telegram = result["telegram"]
    bot = f"@{telegram['bot']}" if telegram.get("bot") else "(bot not known yet)"
    print(f"telegram: {telegram.get('state')} as {bot}")
    if telegram.get("problem"):
        print(f"problem: {telegram['problem']}")
    print(f"commands: {', '.join(result.get('commands', []))}")
    print(f"updates: {result.get('updates')}, ignored from strangers: {result.get('denied')}")
    confirmations = result.get("confirmations", {})
    for pending in confirmations.get("pending", []):
        print(
            f"waiting: {pending['id']} {pending['action']} {pending['target']} for user "
            f"{pending['user']} ({pending['expires_in']:.0f} s left)"
        )
    outbox = result.get("outbox", {})
    print(
        f"replies: {outbox.get('sent')} sent, {outbox.get('queued')} queued, "
        f"{outbox.get('failed')} failed, {outbox.get('dropped')} dropped"
    )
    return 0
