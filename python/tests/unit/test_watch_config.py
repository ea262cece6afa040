"""watch.json: every key checked, every error naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from keel.errors import ConfigError
from keel.watch import config as watch_config
from keel.watch.alert_routes import TelegramRoute, WebhookRoute
from keel.watch.probes import ExecCheck, HttpCheck, TcpCheck

from tests.unit_values import CARRIED

TOKEN = "123456:ABC-def_ghi"


def load(tmp_path: Path, data: dict[str, Any]) -> watch_config.WatchConfig:
    path = tmp_path / "watch.json"
    path.write_text(json.dumps(data))
    return watch_config.load(path)


def error(tmp_path: Path, data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'watch.json'}: ")
    return text.split(": ", 1)[1]


def process(agents: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"backend": "process", "agents": agents, **top}


def test_a_full_config(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    config = load(
        tmp_path,
        {
            "backend": "systemd",
            "socket": "/run/x.sock",
            "ledger": None,
            "metrics": "127.0.0.1:9101",
            "systemd_bus": "private",
            "host": "box",
            "alerts": {
                "tg": {"type": "telegram", "token_file": str(token), "chat_id": -1001},
                "hook": {
                    "type": "webhook",
                    "url": "https://hooks.example/x",
                    "rate_limit": {"count": 5, "per": 30},
                    "attempts": 2,
                },
            },
            "agents": {
                "web": {
                    "probes": [
                        {
                            "type": "http",
                            "url": "http://127.0.0.1:8080/h",
                            "expect_status": [200, 204],
                        },
                        {"type": "tcp", "port": 8080, "interval": 1, "timeout": 0.5},
                        {"type": "exec", "command": ["check"], "name": "deep", "grace": 10},
                    ],
                    "restart": {"backoff_initial": 0.5, "backoff_max": 30, "quarantine_after": 10},
                    "alerts": {"routes": ["tg"], "resolve_after": 60, "flap_threshold": 5},
                },
                "worker": {"unit": "custom-worker", "alerts": []},
            },
        },
    )
    assert config.backend == "systemd"
    assert config.ledger is None
    assert config.metrics == ("127.0.0.1", 9101)
    assert config.systemd_bus == "private"
    web, worker = config.agents["web"], config.agents["worker"]
    assert web.unit == "keel-agent-web.service"
    assert worker.unit == "custom-worker.service"
    assert [p.name for p in web.probes] == ["http", "tcp1", "deep"]
    http, tcp, deep = web.probes
    assert isinstance(http.check, HttpCheck)
    assert http.check.expect_status == (200, 204)
    assert (http.interval, http.timeout, http.failures, http.grace) == (5.0, 2.0, 3, 0.0)
    assert isinstance(tcp.check, TcpCheck)
    assert tcp.check.host == "127.0.0.1"
    assert isinstance(deep.check, ExecCheck)
    assert web.rules.restart.quarantine_after == 10
    assert web.rules.alerts.routes == ("tg",)
    assert web.rules.alerts.resolve_after == 60
    assert worker.rules.alerts.routes == ()
    tg, hook = config.routes["tg"], config.routes["hook"]
    assert isinstance(tg, TelegramRoute)
    assert tg.chat_id == "-1001"
    assert tg.api.host == "api.telegram.org"
    assert isinstance(hook, WebhookRoute)
    assert hook.limits.rate_count == 5
    assert hook.limits.attempts == 2


def test_agents_default_to_every_route(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        process(
            {"a": {"command": ["x"]}},
            alerts={
                "one": {"type": "webhook", "url": "http://h/"},
                "two": {"type": "webhook", "url": "http://h/2"},
            },
        ),
    )
    assert config.agents["a"].rules.alerts.routes == ("one", "two")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"agents": {}}, "backend: required key is missing"),
        ({"backend": "docker", "agents": {}}, "backend: expected one of 'systemd', 'process'"),
        (process({}, extra=1), "extra: unknown key"),
        (process({}, metrics="9101"), 'metrics: expected "HOST:PORT"'),
        (process({}, metrics="h:99999"), "metrics: port must be at most 65535"),
        (process({"a b": {"command": ["x"]}}), 'agents["a b"]: agent names are letters'),
        (process({"a": {}}), "agents.a.command: required key is missing"),
        (process({"a": {"command": []}}), "agents.a.command: must not be an empty list"),
        (
            process({"a": {"command": ["x"], "unit": "a.service"}}),
            "agents.a.unit: only the systemd backend",
        ),
        (
            {"backend": "systemd", "agents": {"a": {"command": ["x"]}}},
            "agents.a.command: only used by the process backend",
        ),
        (
            process({"a": {"command": ["x"], "probes": [{"type": "ping"}]}}),
            "agents.a.probes[0].type: expected one of",
        ),
        (
            process({"a": {"command": ["x"], "probes": [{"type": "http"}]}}),
            "agents.a.probes[0].url: required key is missing",
        ),
        (
            process({"a": {"command": ["x"], "probes": [{"type": "http", "url": "ftp://x"}]}}),
            "agents.a.probes[0].url: expected an http:// or https:// URL",
        ),
        (
            process({"a": {"command": ["x"], "probes": [{"type": "tcp", "port": 0}]}}),
            "agents.a.probes[0].port: must be at least 1",
        ),
        (
            process(
                {
                    "a": {
                        "command": ["x"],
                        "probes": [{"type": "exec", "command": ["c"], "interval": 0}],
                    }
                }
            ),
            "agents.a.probes[0].interval: expected a number > 0",
        ),
        (
            process(
                {
                    "a": {
                        "command": ["x"],
                        "probes": [{"type": "exec", "command": ["c"], "interval": 1, "timeout": 2}],
                    }
                }
            ),
            "agents.a.probes[0].timeout: must be at most interval (1)",
        ),
        (
            process(
                {
                    "a": {
                        "command": ["x"],
                        "probes": [{"type": "exec", "command": ["c"], "failures": 0}],
                    }
                }
            ),
            "agents.a.probes[0].failures: must be at least 1",
        ),
        (
            process(
                {
                    "a": {
                        "command": ["x"],
                        "probes": [{"type": "http", "url": "http://h/", "expect_status": 700}],
                    }
                }
            ),
            "agents.a.probes[0].expect_status: expected an HTTP status",
        ),
        (
            process(
                {
                    "a": {
                        "command": ["x"],
                        "probes": [
                            {"type": "tcp", "port": 1},
                            {"type": "tcp", "port": 2, "name": "tcp"},
                        ],
                    }
                }
            ),
            'agents.a.probes[1].name: two probes named "tcp"',
        ),
        (
            process({"a": {"command": ["x"], "restart": {"backoff_max": 0.5}}}),
            "agents.a.restart.backoff_max: must be at least backoff_initial (1)",
        ),
        (
            process({"a": {"command": ["x"], "restart": {"quarantine_after": 0}}}),
            "agents.a.restart.quarantine_after: must be at least 1",
        ),
        (
            process({"a": {"command": ["x"], "restart": {"backof_max": 3}}}),
            "agents.a.restart.backof_max: unknown key",
        ),
        (
            process({"a": {"command": ["x"], "alerts": ["ops"]}}),
            'agents.a.alerts[0]: no alert route "ops"',
        ),
        (
            process({"a": {"command": ["x"], "alerts": {"routes": ["ops"]}}}),
            'agents.a.alerts.routes[0]: no alert route "ops"',
        ),
        (
            process({"a": {"command": ["x"], "alerts": "ops"}}),
            "agents.a.alerts: expected a list of route names or an object",
        ),
        (
            process({}, alerts={"x": {"type": "sms"}}),
            "alerts.x.type: expected one of 'telegram', 'webhook'",
        ),
        (process({}, alerts={"x": {"type": "webhook"}}), "alerts.x.url: required key is missing"),
        (
            process(
                {},
                alerts={
                    "x": {
                        "type": "webhook",
                        "url": "http://h/",
                        "rate_limit": {"count": 0, "per": 1},
                    }
                },
            ),
            "alerts.x.rate_limit.count: must be at least 1",
        ),
        (
            process({}, alerts={"x": {"type": "telegram", "chat_id": 1}}),
            "alerts.x.token_file: required key is missing",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    assert message in error(tmp_path, data)


def test_telegram_token_file_problems_never_show_the_token(tmp_path: Path) -> None:
    def route(token_file: Path, **extra: Any) -> dict[str, Any]:
        return process(
            {},
            alerts={
                "tg": {"type": "telegram", "token_file": str(token_file), "chat_id": 5, **extra}
            },
        )

    missing = error(tmp_path, route(tmp_path / "nope"))
    assert missing == f"alerts.tg.token_file: {tmp_path / 'nope'} does not exist"
    bad = tmp_path / "bad"
    bad.write_text("not a token at all, but secret-ish\n")
    text = error(tmp_path, route(bad))
    assert "does not hold a Telegram bot token" in text
    assert "secret-ish" not in text
    good = tmp_path / "good"
    good.write_text(TOKEN)
    assert "alerts.tg.chat_id: expected a chat id" in error(tmp_path, route(good, chat_id=True))
    assert "alerts.tg.api: expected an http:// or https:// URL" in error(
        tmp_path, route(good, api="x")
    )


def test_malformed_json_names_the_position(tmp_path: Path) -> None:
    path = tmp_path / "watch.json"
    path.write_text('{"backend": "process",\n "agents": {,}}')
    with pytest.raises(ConfigError, match=r"invalid JSON at line 2 column 13"):
        watch_config.load(path)


# --- hostile values (issue 8): what check-config accepts, serve can run ---------------------

HOSTILE_AGENT_CASES = [
    (
        {"command": ["/bin/sleep", "1"], "environment": {"A=B": "1"}},
        'agents.a.environment["A=B"]: ',
    ),
    ({"command": ["/bin/sleep", "1"], "environment": {"A": "x\x00y"}}, "agents.a.environment.A: "),
    ({"command": ["/bin/sleep", "1\x00"]}, "agents.a.command[1]: "),
    ({"command": ["/bin/sl\x00eep"]}, "agents.a.command[0]: "),
    ({"command": ["", "x"]}, "agents.a.command[0]: the program must not be empty"),
    ({"command": ["/bin/true", "\ufffe"]}, "agents.a.command[1]: "),
    ({"command": ["/bin/true"], "environment": {"": "1"}}, 'agents.a.environment[""]: '),
    ({"command": ["/bin/true"], "working_directory": "/tmp/\x00"}, "agents.a.working_directory: "),
    ({"command": ["/bin/true"], "log": "/tmp/a\x00.log"}, "agents.a.log: "),
    (
        {"command": ["/bin/true"], "probes": [{"type": "exec", "command": ["/bin/x", "\x00"]}]},
        "agents.a.probes[0].command[1]: ",
    ),
    (
        {"command": ["/bin/true"], "probes": [{"type": "tcp", "host": "a\x00b", "port": 1}]},
        "agents.a.probes[0].host: ",
    ),
    (
        {"command": ["/bin/true"], "probes": [{"type": "http", "url": "http://h/\u20ac"}]},
        "agents.a.probes[0].url: ",
    ),
    ({"command": ["/bin/true"], "environment": {"BIG": "x" * 200_000}}, "agents.a.environment: "),
]


@pytest.mark.parametrize(("agent", "where"), HOSTILE_AGENT_CASES, ids=ascii)
def test_values_a_process_cannot_be_given_are_refused(
    tmp_path: Path, agent: dict[str, Any], where: str
) -> None:
    message = error(tmp_path, process({"a": agent}))
    assert message.startswith(where), message
    assert len(message.splitlines()) == 1
    assert len(message) < 400


def test_every_hostile_but_valid_value_is_accepted(tmp_path: Path) -> None:
    env = {f"V{i}": value for i, value in enumerate(CARRIED)}
    config = load(
        tmp_path, process({"a": {"command": ["/bin/echo", *CARRIED], "environment": env}})
    )
    assert config.agents["a"].command == ("/bin/echo", *CARRIED)
    assert config.agents["a"].environment == env


@pytest.mark.parametrize("key", ["state_file"], ids=str)
def test_paths_with_a_nul_are_refused(tmp_path: Path, key: str) -> None:
    assert error(tmp_path, process({}, **{key: "/tmp/x\x00"})).startswith(f"{key}: ")


def test_systemd_unit_names_are_checked(tmp_path: Path) -> None:
    message = error(tmp_path, {"backend": "systemd", "agents": {"a": {"unit": "a b.service"}}})
    assert message.startswith('agents.a.unit: "a b.service" is not a systemd unit name')


def test_a_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "watch.json"
    path.write_text('{"backend": "process", "agents": {"a": {"command": ["/bin/true"]}, "a": {}}}')
    with pytest.raises(ConfigError) as info:
        watch_config.load(path)
    assert str(info.value) == f'{path}: key "a" appears twice in one object'


def test_a_long_agent_name_is_shortened_in_the_message(tmp_path: Path) -> None:
    message = error(tmp_path, process({"a" * 100_000: {"command": ["/bin/true"]}}))
    assert message.startswith('agents["aaaa')
    assert '..." (100000 characters)]: agent names are' in message
    assert len(message) < 300
