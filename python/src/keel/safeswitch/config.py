"""``safeswitch.json``: the defaults of ``keel switch`` on this host (docs/safeswitch.md).

The file is optional: without it every setting has its default, and the
checks are chosen at switch time (watch when its socket exists, systemd when
it runs the host). Command-line options win over the file. Every error names
the file and the key.
"""

from __future__ import annotations

import pwd
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from keel import paths
from keel.config import Section, describe, path_problem
from keel.errors import ConfigError
from keel.safeswitch import targets
from keel.safeswitch.checks import (
    CheckSpec,
    CommandCheck,
    HttpCheck,
    RunAs,
    SystemCheck,
    TcpCheck,
    WatchCheck,
)
from keel.safeswitch.machine import Limits
from keel.safeswitch.targets import Target
from keel.watch import httpwire
from keel.watch.config import _expect_status as expect_status

TimerKind = Literal["systemd", "process"]

DEFAULT_PROFILE = "/nix/var/nix/profiles/system"
DEFAULT_CURRENT = "/run/current-system"
NIX_GCROOTS = "/nix/var/nix/gcroots/keel-safeswitch"

TOP_LEVEL_KEYS = (
    "alerts",
    "checks",
    "commit_timeout",
    "current",
    "deadline",
    "gate",
    "gcroots",
    "host",
    "interval",
    "keel",
    "ledger",
    "profile",
    "rollback_timeout",
    "run_dir",
    "state_dir",
    "targets",
    "timer",
)


@dataclass(frozen=True)
class AlertSettings:
    watch_config: Path  # the routes are watch's (keel.watch.config.load_routes)
    routes: tuple[str, ...] | None  # None: every route watch defines


@dataclass(frozen=True)
class SafeswitchConfig:
    source: str
    limits: Limits
    interval: float
    profile: Path
    current: Path
    timer: TimerKind
    checks: tuple[CheckSpec, ...] | None  # None: chosen at switch time
    alerts: AlertSettings | None
    ledger: Path | None
    gcroots: Path
    run_dir: Path
    state_dir: Path  # what must survive a reboot: the switches not decided yet (evidence.py)
    targets: Mapping[str, Target]  # declared systems others may switch to by name (targets.py)
    keel: tuple[str, ...] | None  # the command the rollback timer runs; None: this keel
    host: str


def default_run_dir() -> Path:
    return paths.runtime_dir() / "safeswitch"


def default_state_dir() -> Path:
    return paths.state_dir() / "safeswitch"


def default_gcroots() -> Path:
    return paths.state_dir() / "safeswitch" / "gcroots" if paths.dev_mode() else Path(NIX_GCROOTS)


def defaults(source: str = "built-in defaults") -> SafeswitchConfig:
    return SafeswitchConfig(
        source=source,
        limits=Limits(),
        interval=1.0,
        profile=Path(DEFAULT_PROFILE),
        current=Path(DEFAULT_CURRENT),
        timer="systemd",
        checks=None,
        alerts=None,
        ledger=paths.ledger_db(),
        gcroots=default_gcroots(),
        run_dir=default_run_dir(),
        state_dir=default_state_dir(),
        targets={},
        keel=None,
        host=socket.gethostname() or "localhost",
    )


def load(path: Path | None) -> SafeswitchConfig:
    """``path``, or the default file when it exists, or the defaults."""
    if path is None:
        default = paths.config_file("safeswitch")
        if not default.exists():
            return defaults()
        path = default
    with Section.load(path) as cfg:
        return parse(cfg)


def parse(cfg: Section) -> SafeswitchConfig:
    unknown = sorted(set(cfg.keys()) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise cfg.error(unknown[0], f"unknown key (known keys here: {', '.join(TOP_LEVEL_KEYS)})")
    base = defaults(cfg.source)
    limits = Limits(
        gate=cfg.number("gate", base.limits.gate, minimum=0),
        deadline=cfg.number("deadline", base.limits.deadline, positive=True),
        commit_timeout=cfg.number("commit_timeout", base.limits.commit_timeout, positive=True),
        rollback_timeout=cfg.number(
            "rollback_timeout", base.limits.rollback_timeout, positive=True
        ),
    )
    if (problem := limits.problem()) is not None:
        raise cfg.error("deadline", problem)
    timer: TimerKind = (
        "process"
        if cfg.choice("timer", ["systemd", "process"], "systemd") == "process"
        else "systemd"
    )
    checks: tuple[CheckSpec, ...] | None = None
    if "checks" in cfg:
        checks = tuple(_check(item) for item in cfg.section_list("checks"))
    alerts = None
    if "alerts" in cfg and cfg.raw("alerts") is not None:
        with cfg.section("alerts") as section:
            routes = None if section.raw("routes", None) is None else section.strings("routes")
            alerts = AlertSettings(
                watch_config=section.filepath("watch_config", str(paths.config_file("watch"))),
                routes=tuple(routes) if routes is not None else None,
            )
    ledger: Path | None = base.ledger
    if "ledger" in cfg and cfg.raw("ledger") is None:
        ledger = None
    elif "ledger" in cfg:
        ledger = cfg.filepath("ledger")
    keel_command = cfg.strings("keel", [], nonempty=False)
    for i, part in enumerate(keel_command):
        if (problem := path_problem(part)) is not None:
            raise cfg.error("keel", f"[{i}]: {problem}")
    return replace(
        base,
        limits=limits,
        interval=cfg.number("interval", base.interval, positive=True),
        profile=cfg.filepath("profile", str(base.profile)),
        current=cfg.filepath("current", str(base.current)),
        timer=timer,
        checks=checks,
        alerts=alerts,
        ledger=ledger,
        gcroots=cfg.filepath("gcroots", str(base.gcroots)),
        run_dir=cfg.filepath("run_dir", str(base.run_dir)),
        state_dir=cfg.filepath("state_dir", str(base.state_dir)),
        targets=_targets(cfg),
        keel=tuple(keel_command) or None,
        host=cfg.string("host", base.host),
    )


def _targets(cfg: Section) -> dict[str, Target]:
    """``targets``: name -> ``{specialisation: NAME}`` or ``{system: PATH}``."""
    if cfg.raw("targets", None) is None:
        return {}
    out: dict[str, Target] = {}
    with cfg.section("targets") as section:
        for name in list(section.keys()):
            if not targets.NAME.match(name):
                raise section.error(
                    name,
                    "a target's name is 1 to 32 letters, digits, '_', '.' or '-' (not first)",
                )
            with section.section(name) as item:
                kinds = [kind for kind in targets.KINDS if kind in item]
                if len(kinds) != 1:
                    raise section.error(
                        name, "expected exactly one of specialisation (a name) or system (a path)"
                    )
                (kind,) = kinds
                value = item.string(kind)
                if kind == "specialisation" and not targets.SPECIALISATION.match(value):
                    raise item.error(kind, f"{describe(value)} is not a specialisation name")
                if kind == "system" and (not value.startswith("/") or path_problem(value)):
                    raise item.error(kind, f"expected an absolute path, got {describe(value)}")
                out[name] = Target(name, kind, value)
    return out


def _check(item: Section) -> CheckSpec:
    with item:
        kind = item.choice("type", ["watch", "system", "tcp", "http", "command"])
        if kind == "watch":
            return WatchCheck(
                socket=str(item.filepath("socket", str(paths.socket_file("watch")))),
                name=item.string("name", "watch"),
                timeout=item.number("timeout", 5.0, positive=True),
            )
        if kind == "system":
            return SystemCheck(
                allow_degraded=item.boolean("allow_degraded", False),
                name=item.string("name", "system"),
                timeout=item.number("timeout", 10.0, positive=True),
            )
        name = item.string("name", "")
        timeout = item.number("timeout", 30.0 if kind == "command" else 5.0, positive=True)
        if kind == "tcp":
            return TcpCheck(
                host=item.string("host", "127.0.0.1"),
                port=item.integer("port", minimum=1, maximum=65535),
                name=name,
                timeout=timeout,
            )
        if kind == "http":
            text = item.string("url")
            try:
                url = httpwire.parse_url(text)
            except ValueError as exc:
                raise item.error("url", str(exc)) from None
            return HttpCheck(url, expect_status(item), name=name, timeout=timeout)
        command = item.raw("command")
        if not isinstance(command, str) or not command.strip():
            raise item.error(
                "command", f"expected a shell command (a string), got {describe(command)}"
            )
        if (problem := path_problem(command)) is not None:
            raise item.error("command", problem)
        run_as = None
        if item.raw("user", None) is not None:
            run_as = _run_as(item)
        return CommandCheck(command, name=name, timeout=timeout, run_as=run_as)


def _run_as(item: Section) -> RunAs:
    """The ``user`` of a command check: an existing user, looked up now (not at the gate)."""
    user = item.string("user")
    try:
        entry = pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise item.error("user", f"no such user {describe(user)} on this host") from None
    return RunAs(user=user, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir or "/")


def command_check(text: str) -> CommandCheck:
    """A ``--check CMD`` from the command line."""
    if not text.strip():
        raise ConfigError("--check: expected a shell command, got an empty string")
    if (problem := path_problem(text)) is not None:
        raise ConfigError(f"--check: {problem}")
    return CommandCheck(text)
