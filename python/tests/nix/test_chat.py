"""modules/chat.nix: /etc/keel/chat.json and a hardened keel-chat.service from the options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import systemd_syntax
from tests.nix.nixeval import NixEvalError
from tests.nix.test_modules import evaluate

TOKEN_PATH = "/run/credentials/keel-chat.service/telegram-token"


def chat(
    nix_instantiate: str,
    nixpkgs_tree: Path,
    body: str = "",
    *,
    token_file: str = '"/run/secrets/keel-chat-token"',
    users: str = "[ 111 222 ]",
) -> dict[str, Any]:
    """The modules' result for a host with chat enabled, ``body`` added."""
    base = (
        "services.keel.chat.enable = true; "
        f"services.keel.chat.tokenFile = {token_file}; "
        f"services.keel.chat.allowedUsers = {users}; "
    )
    return evaluate(nix_instantiate, nixpkgs_tree, "{ " + base + body + " }")


def chat_json(result: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = result["etc"]["keel/chat.json"]["json"]
    return config


def test_defaults_make_a_read_only_bot(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = chat(nix_instantiate, nixpkgs_tree)
    assert result["failedAssertions"] == []
    assert chat_json(result) == {
        "token_file": TOKEN_PATH,
        "allowed_users": [111, 222],
        "commands": ["status", "agents", "log", "fleet"],
        "socket": "/run/keel/chat.sock",
        "watch_socket": "/run/keel/watch.sock",
        "fleet_socket": None,
        "ledger": "/var/lib/keel/ledger.db",
        "confirm_timeout": 60,
        "max_age": 300,
        # keel-chat appends to the ledger; only root's daemons sign it (the key is root's).
        "checkpoint_every": None,
    }
    assert "chat" in result["enabledServices"]
    assert result["users"]["keel-chat"]["group"] == "keel"
    assert result["users"]["keel-chat"]["isSystemUser"] is True


def test_the_daemon_is_a_hardened_notify_service_with_the_token_as_a_credential(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    result = chat(nix_instantiate, nixpkgs_tree, "services.keel.chat.watchdogSec = 9;")
    unit = result["services"]["keel-chat"]
    service = unit["serviceConfig"]
    # The unit file NixOS writes, read back as systemd reads it.
    text = result["units"]["keel-chat.service"]
    argv, _ = systemd_syntax.service_values(text)
    assert argv[0].endswith("-keel-0.1.0/bin/keel")
    assert argv[1:4] == ["chat", "serve", "--config"]
    assert argv[4].endswith("-chat.json")
    assert "LoadCredential=telegram-token:/run/secrets/keel-chat-token" in text.splitlines()
    assert service["Type"] == "notify"
    assert service["WatchdogSec"] == "9s"
    assert service["Restart"] == "always"
    # The token file is root's; systemd hands it over, the Nix store never sees it.
    assert service["LoadCredential"] == ["telegram-token:/run/secrets/keel-chat-token"]
    assert "/run/secrets/keel-chat-token" not in json.dumps(chat_json(result))
    # Its own user, no capabilities, a read-only system but for the ledger and sockets.
    assert service["User"] == "keel-chat"
    assert service["Group"] == "keel"
    assert service["CapabilityBoundingSet"] == ""
    assert service["AmbientCapabilities"] == ""
    assert service["NoNewPrivileges"] is True
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] is True
    assert service["PrivateTmp"] is True
    assert service["ProtectProc"] == "invisible"
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert service["ReadWritePaths"] == ["/var/lib/keel", "/run/keel"]
    assert service["UMask"] == "0007"
    assert unit["wantedBy"] == ["multi-user.target"]
    assert unit["after"] == ["network-online.target", "keel-watch.service"]
    assert unit["wants"] == ["network-online.target"]


def test_commands_and_settings_reach_the_config(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = chat(
        nix_instantiate,
        nixpkgs_tree,
        """
          services.keel.watch.enable = true;
          services.keel.chat.commands = [ "status" "restart" ];
          services.keel.chat.settings = { host = "edge-1"; confirm_timeout = 30; poll_timeout = 40; };
        """,
    )
    assert result["failedAssertions"] == []
    assert result["warnings"] == []
    config = chat_json(result)
    assert config["commands"] == ["status", "restart"]
    assert (config["host"], config["confirm_timeout"], config["poll_timeout"]) == ("edge-1", 30, 40)


def test_without_watch_the_module_warns(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    warnings = chat(nix_instantiate, nixpkgs_tree)["warnings"]
    assert any("without services.keel.watch" in w for w in warnings)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"users": "[ ]"},
            "services.keel.chat.allowedUsers is empty, so nobody could use the bot",
            id="nobody-allowed",
        ),
        pytest.param(
            {"token_file": '"/nix/store/abc-token"'},
            "services.keel.chat.tokenFile: expected an absolute path outside the Nix store",
            id="token-in-the-store",
        ),
        pytest.param(
            {"token_file": '"token"'},
            "services.keel.chat.tokenFile: expected an absolute path outside the Nix store",
            id="relative-token-file",
        ),
        pytest.param(
            {"body": 'services.keel.chat.settings.token = "123:abc";'},
            "services.keel.chat.settings: set the token through services.keel.chat.tokenFile",
            id="inline-token",
        ),
        pytest.param(
            {
                "body": 'services.keel.chat.commands = [ "restart" ]; '
                "services.keel.chat.settings.ledger = null;"
            },
            "services.keel.chat.commands: restart need a ledger",
            id="restart-without-ledger",
        ),
        pytest.param(
            {"body": "services.keel.chat.settings.checkpoint_every = 60;"},
            "services.keel.chat.settings.checkpoint_every: keel-chat cannot sign",
            id="chat-signing",
        ),
    ],
)
def test_bad_combinations_fail_an_assertion(
    nix_instantiate: str, nixpkgs_tree: Path, options: dict[str, str], message: str
) -> None:
    failed = chat(nix_instantiate, nixpkgs_tree, **options)["failedAssertions"]
    assert any(message in text for text in failed), failed


def test_an_unknown_command_is_a_type_error(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    with pytest.raises(NixEvalError) as info:
        chat(nix_instantiate, nixpkgs_tree, 'services.keel.chat.commands = [ "shell" ];')
    assert "services.keel.chat.commands" in str(info.value)
    assert '"shell"' in str(info.value)


def test_the_config_the_module_writes_is_one_keel_chat_accepts(
    nix_instantiate: str, nixpkgs_tree: Path, tmp_path: Path
) -> None:
    config = chat_json(
        chat(nix_instantiate, nixpkgs_tree, 'services.keel.chat.commands = [ "status" "restart" ];')
    )
    token = tmp_path / "token"
    token.write_text("123456:ABC-def\n")
    config["token_file"] = str(token)
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "keel", "chat", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_fleet_socket_is_set_when_keel_fleet_runs_here(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    body = (
        'services.keel.mesh = { enable = true; listen = "0.0.0.0:7400"; }; '
        "services.keel.fleet.enable = true; "
        'services.keel.chat.commands = [ "fleet" "restart" ];'
    )
    result = chat(nix_instantiate, nixpkgs_tree, body)
    assert result["failedAssertions"] == []
    assert chat_json(result)["fleet_socket"] == "/run/keel/fleet.sock"
    assert chat_json(result)["commands"] == ["fleet", "restart"]
