"""Reading ``chat.json`` (documented in ``docs/chat.md``) into checked values.

Everything is checked before the daemon starts: unknown keys, the allowlist,
which commands are enabled, the bot token's file (read here; the token is in
no error, log line or record). Each error names the file and the key.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from keel import paths
from keel.chat.core import COMMANDS, MAX_CONFIRM_TIMEOUT, READ_ONLY, Policy
from keel.config import Section, describe, path_problem, type_name
from keel.errors import ConfigError
from keel.safeswitch.config import SafeswitchConfig
from keel.service import Common, read_common
from keel.telegram import TELEGRAM_API, read_token
from keel.watch import httpwire

MAX_POLL_TIMEOUT = 50  # seconds: the longest long poll Telegram holds


@dataclass(frozen=True)
class ChatConfig:
    """chat.json, checked."""

    source: str
    common: Common
    token: str  # in memory only
    token_file: Path
    api: httpwire.Url
    policy: Policy
    watch_socket: Path
    fleet_socket: Path | None  # None: this host's chat speaks for this host only
    poll_timeout: int
    switching: SwitchSettings | None  # None unless the switch command is enabled


@dataclass(frozen=True)
class SwitchSettings:
    """How ``/switch`` reaches root (docs/chat.md, "Switching the host")."""

    safeswitch: SafeswitchConfig  # its targets, run directory and limits
    safeswitch_path: Path  # the file it came from
    runner: str  # "systemd": keel-switch@ over D-Bus; "process": a child (tests, dev)
    keel: tuple[str, ...]  # the keel the process runner runs


def load(path: Path) -> ChatConfig:
    """Read and check ``path``; :class:`ConfigError` names the key on any problem."""
    with Section.load(path) as cfg:
        return parse(cfg)


def parse(cfg: Section) -> ChatConfig:
    common = read_common(cfg, "chat")
    token_file = cfg.filepath("token_file")
    token = read_token(token_file, cfg)
    api_text = cfg.string("api", default=TELEGRAM_API)
    try:
        api = httpwire.parse_url(api_text)
    except ValueError as exc:
        raise cfg.error("api", str(exc)) from None
    allowed = _allowed_users(cfg)
    commands = _commands(cfg)
    mutating = sorted(name for name in commands if COMMANDS[name].mutating)
    if mutating and common.ledger is None:
        raise cfg.error(
            "commands",
            f"{', '.join(mutating)} change things and every approval is recorded before it is "
            "carried out, but ledger is null: set ledger, or enable read-only commands only",
        )
    host = cfg.string("host", default=socket.gethostname() or "localhost")
    policy = Policy(
        allowed_users=allowed,
        commands=commands,
        host=host,
        confirm_timeout=cfg.number(
            "confirm_timeout", MAX_CONFIRM_TIMEOUT, positive=True, maximum=MAX_CONFIRM_TIMEOUT
        ),
        max_age=cfg.number("max_age", 300.0, positive=True),
    )
    switching = _switching(cfg) if "switch" in commands else None
    for key in ("safeswitch_config", "switch_runner", "keel"):
        cfg.raw(key, None)  # read (known keys) even when switch is off
    return ChatConfig(
        source=cfg.source,
        common=common,
        token=token,
        token_file=token_file,
        api=api,
        policy=policy,
        watch_socket=cfg.filepath("watch_socket", default=str(paths.socket_file("watch"))),
        fleet_socket=_fleet_socket(cfg),
        poll_timeout=cfg.integer("poll_timeout", 25, minimum=1, maximum=MAX_POLL_TIMEOUT),
        switching=switching,
    )


def _switching(cfg: Section) -> SwitchSettings:
    """The switch command's settings: safeswitch's config (with targets) and the runner."""
    from keel.safeswitch import config as ss_config
    from keel.safeswitch.switcher import self_command

    default = paths.config_file("safeswitch")
    given = cfg.raw("safeswitch_config", None)
    path = cfg.filepath("safeswitch_config") if given is not None else default
    try:
        safeswitch = ss_config.load(path) if path.exists() or given is not None else None
    except ConfigError as exc:
        raise cfg.error("safeswitch_config", str(exc)) from None
    if safeswitch is None or not safeswitch.targets:
        raise cfg.error(
            "commands",
            f"switch is enabled, but {path} declares no targets: declare the systems the chat "
            "may switch to (targets in safeswitch.json, services.keel.safeswitch.targets)",
        )
    keel = cfg.strings("keel", [], nonempty=False)
    for index, part in enumerate(keel):
        if (problem := path_problem(part)) is not None:
            raise cfg.error("keel", f"[{index}]: {problem}")
    return SwitchSettings(
        safeswitch=safeswitch,
        safeswitch_path=path,
        runner=cfg.choice("switch_runner", ["systemd", "process"], default="systemd"),
        keel=tuple(keel) or tuple(self_command()),
    )


def _fleet_socket(cfg: Section) -> Path | None:
    """``fleet_socket``: keel fleet's control socket (default), or null for no /fleet."""
    if cfg.raw("fleet_socket", str(paths.socket_file("fleet"))) is None:
        return None
    return cfg.filepath("fleet_socket", default=str(paths.socket_file("fleet")))


def _allowed_users(cfg: Section) -> frozenset[int]:
    value = cfg.raw("allowed_users")
    if not isinstance(value, list):
        raise cfg.error(
            "allowed_users",
            f"expected a list of Telegram user ids (numbers), got {type_name(value)}",
        )
    if not value:
        raise cfg.error(
            "allowed_users",
            "is empty, so nobody could use the bot: add your Telegram user id (keel chat logs "
            "the id of everyone it ignores)",
        )
    users: set[int] = set()
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise cfg.error(
                "allowed_users",
                f"[{index}]: expected a user id (a positive number; group and channel ids are "
                f"negative and are never allowed: people are), got {describe(item)}",
            )
        users.add(item)
    return frozenset(users)


def _commands(cfg: Section) -> frozenset[str]:
    names = cfg.strings("commands", list(READ_ONLY))
    for index, name in enumerate(names):
        if name not in COMMANDS:
            known = ", ".join(COMMANDS)
            raise cfg.error("commands", f"[{index}]: no command {describe(name)} (known: {known})")
    return frozenset(names)
