"""chat.json: every key checked, every error naming the key, the token never shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from keel.chat import config as chat_config
from keel.errors import ConfigError

TOKEN = "123456:ABC-def_ghi"


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def load(tmp_path: Path, data: dict[str, Any]) -> chat_config.ChatConfig:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(data))
    return chat_config.load(path)


def error(tmp_path: Path, data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'chat.json'}: ")
    return text.split(": ", 1)[1]


def test_a_minimal_config_is_read_only(tmp_path: Path, token: Path) -> None:
    config = load(tmp_path, {"token_file": str(token), "allowed_users": [111]})
    assert config.token == TOKEN
    assert config.policy.allowed_users == frozenset({111})
    assert config.policy.commands == frozenset({"status", "agents", "log", "fleet"})
    assert config.policy.confirm_timeout == 60
    assert config.api.host == "api.telegram.org"
    assert config.poll_timeout == 25
    assert config.common.socket.name == "chat.sock"
    assert config.watch_socket.name == "watch.sock"


def test_a_full_config(tmp_path: Path, token: Path) -> None:
    config = load(
        tmp_path,
        {
            "token_file": str(token),
            "allowed_users": [111, 222, 111],
            "commands": ["status", "restart"],
            "api": "http://127.0.0.1:8081/",
            "watch_socket": "/run/w.sock",
            "socket": "/run/c.sock",
            "ledger": str(tmp_path / "l.db"),
            "host": "edge-1",
            "confirm_timeout": 30,
            "max_age": 60,
            "poll_timeout": 50,
            "checkpoint_every": None,
        },
    )
    assert config.policy.allowed_users == frozenset({111, 222})
    assert config.policy.commands == frozenset({"status", "restart"})
    assert (config.api.host, config.api.port) == ("127.0.0.1", 8081)
    assert str(config.watch_socket) == "/run/w.sock"
    assert config.policy.host == "edge-1"
    assert config.policy.confirm_timeout == 30
    assert config.policy.max_age == 60
    assert config.common.checkpoint_every is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "token_file: required key is missing"),
        ({"allowed_users": []}, "allowed_users: is empty, so nobody could use the bot"),
        ({"allowed_users": 111}, "allowed_users: expected a list of Telegram user ids"),
        (
            {"allowed_users": [-100123]},
            "allowed_users: [0]: expected a user id (a positive number; group",
        ),
        ({"allowed_users": [True]}, "allowed_users: [0]: expected a user id"),
        ({"allowed_users": ["111"]}, "allowed_users: [0]: expected a user id"),
        (
            {"commands": ["shell"]},
            'commands: [0]: no command "shell" (known: status, agents, log, fleet, restart, switch)',
        ),
        (
            {"commands": ["restart"], "ledger": None},
            "commands: restart change things and every approval is recorded",
        ),
        ({"confirm_timeout": 61}, "confirm_timeout: must be at most 60"),
        ({"confirm_timeout": 0}, "confirm_timeout: expected a number > 0"),
        ({"poll_timeout": 51}, "poll_timeout: must be at most 50"),
        ({"api": "ftp://x"}, "api: expected an http:// or https:// URL"),
        ({"allowed_userz": [1]}, "allowed_userz: unknown key"),
        ({"socket": "a\u0000b"}, "socket: "),
    ],
)
def test_errors_name_the_key(
    tmp_path: Path, token: Path, data: dict[str, Any], message: str
) -> None:
    full: dict[str, Any] = {"token_file": str(token), "allowed_users": [111]}
    full.update(data)
    if data == {}:
        full.pop("token_file")
    assert message in error(tmp_path, full)


def test_token_file_problems_never_show_the_token(tmp_path: Path) -> None:
    missing = error(tmp_path, {"token_file": str(tmp_path / "nope"), "allowed_users": [1]})
    assert missing == f"token_file: {tmp_path / 'nope'} does not exist"
    bad = tmp_path / "bad"
    bad.write_text("not a token, secret-ish\n")
    text = error(tmp_path, {"token_file": str(bad), "allowed_users": [1]})
    assert "does not hold a Telegram bot token" in text
    assert "secret-ish" not in text
