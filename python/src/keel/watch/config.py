"""Reading ``watch.json`` (documented in ``docs/watch.md``) into checked values.

Everything is validated before the daemon starts anything: unknown keys, bad
values, alert routes an agent names but nobody defined, a Telegram token file
that cannot be read. Each error names the file and the key path.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from keel import launch, paths
from keel.config import Section, describe, type_name
from keel.errors import ConfigError
from keel.service import Common, read_common
from keel.telegram import TELEGRAM_API, read_token
from keel.watch import httpwire
from keel.watch.alert_routes import (
    Route,
    RouteLimits,
    TelegramRoute,
    WebhookRoute,
)
from keel.watch.policy import AgentRules, AlertRules, ProbeRules, RestartRules
from keel.watch.probes import Check, ExecCheck, HttpCheck, ProbeSpec, TcpCheck

Backend = Literal["systemd", "process"]
BusChoice = Literal["auto", "private", "system"]

_AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
_UNIT = re.compile(r"[A-Za-z0-9:_.@\\-]{1,255}\Z")


@dataclass(frozen=True)
class AgentConfig:
    name: str
    unit: str  # systemd backend
    command: tuple[str, ...]  # process backend
    environment: dict[str, str]
    working_directory: str | None
    log: Path | None
    stop_timeout: float
    probes: tuple[ProbeSpec, ...]
    rules: AgentRules


@dataclass(frozen=True)
class WatchConfig:
    """watch.json, checked (docs/watch.md)."""

    source: str
    backend: Backend
    common: Common  # socket, ledger, checkpoint_every: read as every daemon reads them
    metrics: tuple[str, int] | None
    state_file: Path
    systemd_bus: BusChoice
    host: str
    agents: dict[str, AgentConfig]
    routes: dict[str, Route]

    @property
    def socket(self) -> Path:
        return self.common.socket

    @property
    def ledger(self) -> Path | None:
        return self.common.ledger


def load(path: Path) -> WatchConfig:
    """Read and check ``path``; :class:`ConfigError` names the key on any problem."""
    with Section.load(path) as cfg:
        return parse(cfg)


TOP_LEVEL_KEYS = (
    "agents",
    "alerts",
    "backend",
    "checkpoint_every",
    "host",
    "ledger",
    "metrics",
    "socket",
    "state_file",
    "systemd_bus",
)


def parse(cfg: Section) -> WatchConfig:
    # A misspelt top-level key ("agentz") is named as such, not reported as a
    # missing "agents".
    unknown = sorted(set(cfg.keys()) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise cfg.error(unknown[0], f"unknown key (known keys here: {', '.join(TOP_LEVEL_KEYS)})")
    backend: Backend = (
        "process" if cfg.choice("backend", ["systemd", "process"]) == "process" else "systemd"
    )
    common = read_common(cfg, "watch")
    metrics = cfg.string("metrics", None, check=_metrics_problem)
    state_file = Path(
        cfg.string(
            "state_file",
            default=str(paths.runtime_dir() / "watch-processes.json"),
            check=_path_problem,
        )
    )
    bus_choice = cfg.choice("systemd_bus", ["auto", "private", "system"], default="auto")
    bus: BusChoice = "auto"
    if bus_choice in ("private", "system"):
        bus = "private" if bus_choice == "private" else "system"
    host = cfg.string("host", default=socket.gethostname() or "localhost")
    routes = _routes(cfg)
    agents: dict[str, AgentConfig] = {}
    with cfg.section("agents") as agents_section:
        for name, agent in agents_section.sections():
            if not _AGENT_NAME.match(name):
                raise agents_section.error(
                    name,
                    "agent names are letters, digits, '_', '.', '@' and '-' (at most 63), "
                    "starting with a letter or digit",
                )
            with agent:
                agents[name] = _agent(name, agent, backend, routes)
    return WatchConfig(
        source=cfg.source,
        backend=backend,
        common=common,
        metrics=_split_host_port(metrics) if metrics else None,
        state_file=state_file,
        systemd_bus=bus,
        host=host,
        agents=agents,
        routes=routes,
    )


def _metrics_problem(value: str) -> str | None:
    try:
        _split_host_port(value)
    except ValueError as exc:
        return str(exc)
    return None


def _split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not host:
        raise ValueError(f'expected "HOST:PORT" (e.g. "127.0.0.1:9101"), got {describe(value)}')
    if len(port) > 5 or int(port) > 65535:
        raise ValueError(f"port must be at most 65535, got {describe(port)}")
    if (problem := httpwire.host_problem(host.strip("[]"))) is not None:
        raise ValueError(problem)
    return host.strip("[]"), int(port)


# --- agents ------------------------------------------------------------------------------


def _unit_problem(value: str) -> str | None:
    if _UNIT.match(value):
        return None
    return (
        f"{describe(value)} is not a systemd unit name (letters, digits and ':', '_', '.', "
        "'@', '-', '\\', at most 255 characters)"
    )


def _path_problem(value: str) -> str | None:
    """A file or directory name this daemon opens: text without NUL."""
    problem = launch.text_problem(value)
    return None if problem is None else f"{describe(value)} {problem}"


def _agent(name: str, agent: Section, backend: Backend, routes: dict[str, Route]) -> AgentConfig:
    if backend == "process":
        command = launch.read_command(agent, "command")
        if "unit" in agent:
            raise agent.error(
                "unit", 'only the systemd backend runs units; remove it or set backend to "systemd"'
            )
        unit = ""
    else:
        for key in ("command", "environment", "working_directory", "log"):
            if key in agent:
                raise agent.error(
                    key,
                    "only used by the process backend; the systemd backend runs the unit "
                    "named by `unit` (its ExecStart= holds the command)",
                )
        unit = agent.string("unit", default=f"keel-agent-{name}.service", check=_unit_problem)
        if "." not in unit:
            unit += ".service"
        command = ()
    environment = launch.read_environment(agent, "environment")
    launch.check_exec_size(agent, "environment", command, environment)
    working_directory = agent.string("working_directory", None, check=_path_problem)
    log = agent.string("log", None, check=_path_problem)
    stop_timeout = agent.number("stop_timeout", 5.0, positive=True)
    probes = tuple(
        _probe(i, probe) for i, probe in enumerate(agent.section_list("probes", default=[]))
    )
    seen: set[str] = set()
    for i, probe in enumerate(probes):
        if probe.name in seen:
            raise ConfigError(
                f"{agent.source}: {agent.key_path('probes')}[{i}].name: two probes named "
                f"{describe(probe.name)}; give them distinct names"
            )
        seen.add(probe.name)
    restart = agent.parse("restart", _restart) if "restart" in agent else RestartRules()
    alert_rules = _agent_alerts(agent, routes, restart)
    rules = AgentRules(
        name=name,
        probes=tuple(ProbeRules(p.name, p.failures, p.grace) for p in probes),
        restart=restart,
        alerts=alert_rules,
    )
    return AgentConfig(
        name=name,
        unit=unit,
        command=command,
        environment=environment,
        working_directory=working_directory,
        log=Path(log) if log else None,
        stop_timeout=stop_timeout,
        probes=probes,
        rules=rules,
    )


def _probe(index: int, probe: Section) -> ProbeSpec:
    with probe:
        kind = probe.choice("type", ["http", "tcp", "exec"])
        name = probe.string("name", default=kind if index == 0 else f"{kind}{index}")
        check: Check
        if kind == "http":
            url_text = probe.string("url")
            try:
                url = httpwire.parse_url(url_text)
            except ValueError as exc:
                raise probe.error("url", str(exc)) from None
            expect = _expect_status(probe)
            body = probe.string("expect_body", None, nonempty=False, check=launch.text_problem)
            check = HttpCheck(url, expect, body)
        elif kind == "tcp":
            check = TcpCheck(
                probe.string("host", default="127.0.0.1", check=httpwire.host_problem),
                probe.integer("port", minimum=1, maximum=65535),
            )
        else:
            check = ExecCheck(launch.read_command(probe, "command"))
        interval = probe.number("interval", 5.0, positive=True)
        timeout = probe.number("timeout", min(2.0, interval), positive=True)
        if timeout > interval:
            raise probe.error(
                "timeout",
                f"must be at most interval ({interval:g}), got {describe(timeout)}: "
                "a probe must finish before the next one is due",
            )
        return ProbeSpec(
            name=name,
            check=check,
            interval=interval,
            timeout=timeout,
            failures=probe.integer("failures", 3, minimum=1),
            grace=probe.number("grace", 0.0, minimum=0),
        )


def _expect_status(probe: Section) -> tuple[int, ...]:
    raw = probe.raw("expect_status", None)
    if raw is None:
        return ()
    values = raw if isinstance(raw, list) else [raw]
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
            raise probe.error(
                "expect_status",
                f"expected an HTTP status (100-599) or a list of them, got {describe(raw)}",
            )
        out.append(value)
    if not out:
        raise probe.error("expect_status", "must not be an empty list")
    return tuple(out)


def _restart(section: Section) -> RestartRules:
    initial = section.number("backoff_initial", 1.0, positive=True)
    maximum = section.number("backoff_max", 60.0, positive=True)
    if maximum < initial:
        raise section.error(
            "backoff_max", f"must be at least backoff_initial ({initial:g}), got {maximum:g}"
        )
    return RestartRules(
        backoff_initial=initial,
        backoff_factor=section.number("backoff_factor", 2.0, minimum=1.0),
        backoff_max=maximum,
        stable_after=section.number("stable_after", 30.0, positive=True),
        quarantine_after=section.integer("quarantine_after", None, minimum=1),
    )


def _agent_alerts(agent: Section, routes: dict[str, Route], restart: RestartRules) -> AlertRules:
    raw = agent.raw("alerts", None)
    if raw is None:
        return AlertRules(routes=tuple(routes), resolve_after=restart.stable_after)
    if isinstance(raw, list):
        names = agent.strings("alerts")
        key_path = agent.key_path("alerts")
        rules = AlertRules(routes=tuple(names), resolve_after=restart.stable_after)
    elif isinstance(raw, dict):
        with agent.section("alerts") as section:
            names = section.strings("routes", default=list(routes))
            key_path = section.key_path("routes")
            rules = AlertRules(
                routes=tuple(names),
                resolve_after=section.number("resolve_after", restart.stable_after, positive=True),
                flap_window=section.number("flap_window", 600.0, positive=True),
                flap_threshold=section.integer("flap_threshold", 3, minimum=1),
            )
    else:
        raise agent.error(
            "alerts",
            f"expected a list of route names or an object, got {type_name(raw)}",
        )
    for i, route in enumerate(rules.routes):
        if route not in routes:
            known = ", ".join(sorted(routes)) or "none are defined"
            raise ConfigError(
                f"{agent.source}: {key_path}[{i}]: no alert route {describe(route)} "
                f"(routes are defined under the top-level `alerts` key; {known})"
            )
    return rules


# --- alert routes -----------------------------------------------------------------------


def load_routes(path: Path) -> dict[str, Route]:
    """Only the alert routes of the watch config at ``path`` (safeswitch alerts through them).

    The rest of the file is not checked here: a switch must be able to alert
    even when a watch setting elsewhere in the file is wrong.
    """
    return _routes(Section.load(path))


def _routes(cfg: Section) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    with cfg.section("alerts", optional=True) as alerts:
        for name, route in alerts.sections():
            with route:
                routes[name] = _route(name, route)
    return routes


def _route(name: str, route: Section) -> Route:
    kind = route.choice("type", ["telegram", "webhook"])
    limits = _limits(route)
    if kind == "telegram":
        token_file = Path(route.string("token_file", check=_path_problem))
        read_token(token_file, route)
        chat = route.raw("chat_id")
        if isinstance(chat, bool) or not isinstance(chat, int | str) or chat == "":
            raise route.error(
                "chat_id", f'expected a chat id (an integer or "@channel"), got {describe(chat)}'
            )
        api_text = route.string("api", default=TELEGRAM_API)
        try:
            api = httpwire.parse_url(api_text)
        except ValueError as exc:
            raise route.error("api", str(exc)) from None
        return TelegramRoute(name, token_file, str(chat), api, limits)
    url_text = route.string("url")
    try:
        url = httpwire.parse_url(url_text)
    except ValueError as exc:
        raise route.error("url", str(exc)) from None
    return WebhookRoute(name, url, limits)


def _limits(route: Section) -> RouteLimits:
    count, period = 20, 60.0
    if "rate_limit" in route:
        with route.section("rate_limit") as rate:
            count = rate.integer("count", minimum=1)
            period = rate.number("per", positive=True)
    return RouteLimits(
        rate_count=count,
        rate_period=period,
        attempts=route.integer("attempts", 6, minimum=1),
        timeout=route.number("timeout", 10.0, positive=True),
        retry_initial=route.number("retry_initial", 1.0, positive=True),
        retry_max=route.number("retry_max", 60.0, positive=True),
    )
