"""``keel watch serve|check-config|start|stop|restart`` and ``keel status``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from keel import commands as daemon
from keel import paths
from keel.errors import ApiError
from keel.output import human_duration, print_json, print_table

DESCRIPTION = """\
watch supervises every agent on its own: health probes (http, tcp, exec,
systemd's WatchdogSec), immediate restarts with exponential back-off in crash
loops, optional quarantine, and alerts to Telegram or webhooks, once per
incident. See docs/watch.md for the config file.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    watch = subparsers.add_parser(
        "watch",
        help="supervise agents: probes, restarts, back-off, alerts",
        description=DESCRIPTION,
        formatter_class=formatter,
    )
    commands = watch.add_subparsers(dest="watch_command", metavar="COMMAND", required=True)

    daemon.add_serve(
        commands, "watch", help="run the watch daemon", what="the watch daemon", func=_serve
    )
    daemon.add_check_config(
        commands,
        "watch",
        help="validate a watch config and exit",
        json_help="print the agents found as JSON",
        func=_check_config,
    )

    socket_help = "watch's control socket (default: /run/keel/watch.sock, ./.keel/run/watch.sock)"
    for verb, text in (
        ("start", "start an agent (also lifts a quarantine)"),
        ("stop", "stop an agent and keep it stopped until `keel watch start`"),
        ("restart", "stop an agent and start it again once it exited"),
    ):
        parser = commands.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        parser.add_argument("agent", help="the agent's name, as in the watch config")
        parser.add_argument("--socket", type=Path, metavar="PATH", help=socket_help)
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
        parser.set_defaults(func=_control, verb=verb)

    status = subparsers.add_parser(
        "status",
        help="the agents watch supervises: state, pid, uptime, restarts, probes, errors",
        description="Ask the watch daemon for the state of every agent. States: starting, "
        "healthy, unhealthy, backoff, quarantined, stopped.",
    )
    status.add_argument("--socket", type=Path, metavar="PATH", help=socket_help)
    status.add_argument("--json", action="store_true", help="print the full status as JSON")
    status.set_defaults(func=_status)


def _config_path(args: argparse.Namespace) -> Path:
    return daemon.config_path(args, "watch")


def _serve(args: argparse.Namespace) -> int:
    from keel import service
    from keel.watch import config as watch_config
    from keel.watch.daemon import Watch

    def make(config: watch_config.WatchConfig) -> Watch:
        return Watch(config, make_backend(config))

    return service.main(
        "watch", _config_path(args), load=watch_config.load, make=make, verbose=args.verbose
    )


def make_backend(config: Any) -> Any:
    """The backend the config names (imported lazily: D-Bus only for systemd)."""
    if config.backend == "process":
        from keel.watch.process_backend import ProcessBackend

        return ProcessBackend(config.agents, state_file=config.state_file)
    from keel.watch.systemd_backend import SystemdBackend

    return SystemdBackend(config.agents, bus=config.systemd_bus)


def _check_config(args: argparse.Namespace) -> int:
    from keel.watch import config as watch_config

    config = watch_config.load(_config_path(args))
    if args.json:
        print_json(
            {
                "backend": config.backend,
                "agents": {
                    name: {
                        "target": agent.unit or list(agent.command),
                        "probes": [p.name for p in agent.probes],
                        "alerts": list(agent.rules.alerts.routes),
                    }
                    for name, agent in config.agents.items()
                },
                "routes": {name: route.describe() for name, route in config.routes.items()},
            }
        )
    else:
        count = len(config.agents)
        print(
            f"{config.source}: valid ({count} agent{'s' if count != 1 else ''}, "
            f"{config.backend} backend, {len(config.routes)} alert routes)"
        )
    return 0


def _socket(args: argparse.Namespace) -> Path:
    return Path(args.socket) if args.socket else paths.socket_file("watch")


def _control(args: argparse.Namespace) -> int:
    from keel.api import call

    result = call(_socket(args), args.verb, {"agent": args.agent}, service="watch")
    if args.json:
        print_json(result)
    else:
        print(f"{result['agent']}: {result['state']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from keel.api import call

    result = call(_socket(args), "status", service="watch")
    if not isinstance(result, dict) or not isinstance(result.get("agents"), dict):
        raise ApiError(f"{_socket(args)}: the watch daemon sent a status without agents")
    if args.json:
        print_json(result)
        return 0
    print_table(
        ["agent", "state", "pid", "uptime", "restarts", "last probe", "last error"],
        status_rows(result, now=time.time()),
    )
    return 0


def status_rows(result: dict[str, Any], *, now: float) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, agent in sorted(result["agents"].items()):
        uptime = agent.get("uptime")
        rows.append(
            [
                name,
                agent.get("state"),
                agent.get("pid"),
                human_duration(uptime) if uptime is not None else None,
                agent.get("restarts"),
                _probe_cell(agent.get("last_probe"), now),
                _error_cell(agent.get("last_error"), agent.get("last_error_at"), now),
            ]
        )
    return rows


def _ago(at: object, now: float) -> str:
    if not isinstance(at, int | float):
        return ""
    return f"{human_duration(max(0.0, now - at))} ago"


def _probe_cell(probe: object, now: float) -> str | None:
    if not isinstance(probe, dict):
        return None
    verdict = "ok" if probe.get("ok") else f"failed: {_clip(str(probe.get('detail', '')), 32)}"
    return f"{probe.get('probe')} {verdict} ({_ago(probe.get('at'), now)})"


def _error_cell(error: object, at: object, now: float) -> str | None:
    if not error:
        return None
    return f"{_clip(str(error), 48)} ({_ago(at, now)})"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
