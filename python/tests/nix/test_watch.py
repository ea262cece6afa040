"""modules/watch.nix: /etc/keel/watch.json and keel-watch.service from the options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.nix.test_modules import evaluate

SCOUT = """
  services.keel.egress = { enable = true; upstream = [ "192.0.2.53" ]; };
  services.keel.agents.scout = {
    command = [ "/bin/scout" ];
    tier = 2;
    health.probes = [ { type = "http"; url = "http://127.0.0.1:8702/health"; interval = 2; } ];
  };
"""


def watch(nix_instantiate: str, nixpkgs_tree: Path, body: str = "") -> dict[str, Any]:
    return evaluate(
        nix_instantiate, nixpkgs_tree, "{ services.keel.watch.enable = true; " + body + " }"
    )


def watch_json(result: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = result["etc"]["keel/watch.json"]["json"]
    return config


def test_defaults_make_a_complete_config(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = watch(nix_instantiate, nixpkgs_tree)
    assert result["failedAssertions"] == []
    assert watch_json(result) == {
        "backend": "systemd",
        "socket": "/run/keel/watch.sock",
        "ledger": "/var/lib/keel/ledger.db",
        "metrics": None,
        "systemd_bus": "auto",
        "alerts": {},
        "agents": {},
    }
    assert "watch" in result["enabledServices"]
    assert result["groups"] == ["keel"]


def test_the_daemon_is_a_hardened_notify_service(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    unit = watch(nix_instantiate, nixpkgs_tree, "services.keel.watch.watchdogSec = 7;")["services"][
        "keel-watch"
    ]
    service = unit["serviceConfig"]
    assert unit["wantedBy"] == ["multi-user.target"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"] == "7s"
    assert service["Restart"] == "always"
    command = service["ExecStart"].split()
    assert command[0].endswith("-keel-0.1.0/bin/keel")
    assert command[1:4] == ["watch", "serve", "--config"]
    assert command[4].endswith("-watch.json")
    # No capabilities, a read-only system but for keel's state and sockets.
    assert service["CapabilityBoundingSet"] == ""
    assert service["NoNewPrivileges"] is True
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == ["/var/lib/keel", "/run/keel"]
    assert service["Group"] == "keel"
    assert service["UMask"] == "0007"
    assert service["ProtectControlGroups"] is True
    assert "Delegate" not in service


def test_the_process_backend_gets_a_cgroup_subtree_to_give_its_agents(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    body = 'services.keel.watch.settings.backend = "process";'
    result = watch(nix_instantiate, nixpkgs_tree, body)
    assert result["failedAssertions"] == []
    service = result["services"]["keel-watch"]["serviceConfig"]
    assert service["Delegate"] is True
    assert service["ProtectControlGroups"] is False


def test_agents_are_supervised_with_the_probes_of_their_spec(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    result = watch(nix_instantiate, nixpkgs_tree, SCOUT)
    spec = result["etc"]["keel/agents/scout.json"]["json"]
    assert watch_json(result)["agents"] == {"scout": {"probes": spec["health"]["probes"]}}


def test_the_host_adds_rules_and_overrides_probes(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = watch(
        nix_instantiate,
        nixpkgs_tree,
        SCOUT
        + """
          services.keel.watch.settings.agents.scout = {
            restart.backoff_max = 120;
            probes = [ { type = "tcp"; port = 8702; } ];
          };
          services.keel.watch.settings.host = "edge-1";
        """,
    )
    config = watch_json(result)
    assert config["agents"]["scout"] == {
        "restart": {"backoff_max": 120},
        "probes": [{"type": "tcp", "port": 8702}],
    }
    assert config["host"] == "edge-1"


def test_supervising_agents_can_be_turned_off(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = watch(
        nix_instantiate, nixpkgs_tree, SCOUT + "services.keel.watch.superviseAgents = false;"
    )
    assert watch_json(result)["agents"] == {}


def test_alert_routes_carry_only_what_was_set(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = watch(
        nix_instantiate,
        nixpkgs_tree,
        """
          services.keel.watch.settings.alerts = {
            ops = { type = "telegram"; token_file = "/run/secrets/bot"; chat_id = -100123; };
            hook = { type = "webhook"; url = "https://hooks.example/keel"; rate_limit = { count = 5; per = 60; }; };
          };
        """,
    )
    assert result["failedAssertions"] == []
    assert watch_json(result)["alerts"] == {
        "ops": {"type": "telegram", "token_file": "/run/secrets/bot", "chat_id": -100123},
        "hook": {
            "type": "webhook",
            "url": "https://hooks.example/keel",
            "rate_limit": {"count": 5, "per": 60},
        },
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            SCOUT + 'services.keel.watch.settings.backend = "process";',
            "services.keel.watch.settings.backend: the process backend runs agents as its own children",
            id="process-backend-with-unit-agents",
        ),
        pytest.param(
            SCOUT + 'services.keel.watch.settings.agents.scout.alerts = [ "pager" ];',
            "services.keel.watch.settings.agents: scout -> pager: no such alert route",
            id="unknown-route",
        ),
        pytest.param(
            'services.keel.watch.settings.alerts.ops = { type = "telegram"; chat_id = 1; };',
            "services.keel.watch.settings.alerts: ops: a telegram route needs token_file and chat_id",
            id="telegram-without-token-file",
        ),
        pytest.param(
            "services.keel.watch.settings.alerts.ops = "
            '{ type = "telegram"; token_file = "/t"; chat_id = 1; token = "123:abc"; };',
            "services.keel.watch.settings.alerts: ops: put the bot token in a file",
            id="inline-token",
        ),
        pytest.param(
            'services.keel.watch.settings.metrics = "9101";',
            'services.keel.watch.settings.metrics: expected "HOST:PORT"',
            id="metrics-without-host",
        ),
    ],
)
def test_bad_settings_fail_with_a_message(
    nix_instantiate: str, nixpkgs_tree: Path, body: str, message: str
) -> None:
    failed = watch(nix_instantiate, nixpkgs_tree, body)["failedAssertions"]
    assert any(message in text for text in failed), failed


def test_nothing_without_enable(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = evaluate(nix_instantiate, nixpkgs_tree, "{" + SCOUT + "}")
    assert "keel-watch" not in result["services"]
    assert "keel/watch.json" not in result["etc"]


def test_keel_watch_accepts_the_config_the_module_writes(
    nix_instantiate: str, nixpkgs_tree: Path, tmp_path: Path
) -> None:
    from keel.config import Section
    from keel.watch.config import parse

    token = tmp_path / "bot-token"
    token.write_text("123456:ABC-def_ghi\n")
    result = watch(
        nix_instantiate,
        nixpkgs_tree,
        SCOUT
        + f"""
          services.keel.agents.notes = {{
            command = [ "/bin/notes" ];
            tier = 1;
            health.probes = [
              {{ type = "tcp"; port = 8701; name = "port"; }}
              {{ type = "exec"; command = [ "/bin/true" ]; interval = 10; timeout = 2.5; }}
              {{ type = "http"; url = "http://127.0.0.1:8701/ready"; expect_status = [ 200 204 ]; }}
            ];
          }};
          services.keel.watch.settings = {{
            metrics = "127.0.0.1:9101";
            alerts.ops = {{ type = "telegram"; token_file = "{token}"; chat_id = -100123; }};
            alerts.hook = {{ type = "webhook"; url = "http://127.0.0.1:9/hook"; }};
            agents.scout.alerts = [ "ops" ];
            agents.scout.restart = {{ backoff_initial = 0.5; backoff_max = 30; quarantine_after = 20; }};
          }};
        """,
    )
    assert result["failedAssertions"] == []
    written = watch_json(result)
    with Section(written, source="/etc/keel/watch.json") as section:
        config = parse(section)
    assert config.backend == "systemd"
    assert config.metrics == ("127.0.0.1", 9101)
    assert set(config.routes) == {"ops", "hook"}
    assert {name: agent.unit for name, agent in config.agents.items()} == {
        "scout": "keel-agent-scout.service",
        "notes": "keel-agent-notes.service",
    }
    assert [p.name for p in config.agents["notes"].probes] == ["port", "exec1", "http2"]
    assert config.agents["scout"].rules.restart.quarantine_after == 20
