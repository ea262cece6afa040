"""safeswitch.json: defaults, typed checks, and errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from keel.errors import ConfigError
from keel.safeswitch import checks
from keel.safeswitch import config as ss_config
from keel.safeswitch.switcher import with_overrides


def write(tmp_path: Path, value: object) -> Path:
    path = tmp_path / "safeswitch.json"
    path.write_text(json.dumps(value))
    return path


def test_a_full_config(tmp_path: Path) -> None:
    config = ss_config.load(
        write(
            tmp_path,
            {
                "gate": 20,
                "deadline": 120,
                "timer": "process",
                "interval": 0.5,
                "checks": [
                    {"type": "watch"},
                    {"type": "system", "allow_degraded": True},
                    {"type": "tcp", "port": 22, "name": "ssh"},
                    {"type": "http", "url": "http://127.0.0.1:8080/health", "expect_status": [200]},
                    {"type": "command", "command": "true", "timeout": 3},
                ],
                "alerts": {"watch_config": "/etc/keel/watch.json", "routes": ["ops"]},
                "ledger": None,
                "keel": ["/nix/store/x-keel/bin/keel"],
            },
        )
    )
    assert config.limits.gate == 20
    assert config.limits.deadline == 120
    assert config.timer == "process"
    assert config.ledger is None
    assert config.keel == ("/nix/store/x-keel/bin/keel",)
    assert config.alerts is not None
    assert config.alerts.routes == ("ops",)
    assert config.checks is not None
    kinds = [type(c).__name__ for c in config.checks]
    assert kinds == ["WatchCheck", "SystemCheck", "TcpCheck", "HttpCheck", "CommandCheck"]
    tcp = config.checks[2]
    assert isinstance(tcp, checks.TcpCheck)
    assert (tcp.host, tcp.port, tcp.name) == ("127.0.0.1", 22, "ssh")


def test_no_file_means_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEEL_DEV", "1")
    config = ss_config.load(None)
    assert config.source == "built-in defaults"
    assert config.checks is None  # chosen at switch time
    assert (config.limits.gate, config.limits.deadline) == (30.0, 300.0)
    assert str(config.profile) == "/nix/var/nix/profiles/system"
    assert str(config.run_dir) == ".keel/run/safeswitch"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"gat": 3}, "gat: unknown key"),
        ({"gate": 30, "deadline": 30}, "deadline: the deadline (30 s) must be longer than the gate"),
        ({"gate": -1}, "gate: must be at least 0"),
        ({"timer": "cron"}, "timer: expected one of 'systemd', 'process'"),
        ({"checks": [{"type": "ping"}]}, "checks[0].type: expected one of"),
        ({"checks": [{"type": "tcp"}]}, "checks[0].port: required key is missing"),
        ({"checks": [{"type": "tcp", "port": 70000}]}, "checks[0].port: must be at most 65535"),
        ({"checks": [{"type": "http", "url": "ftp://x"}]}, "checks[0].url: expected an http"),
        ({"checks": [{"type": "command", "command": ["ls"]}]}, "checks[0].command: expected a shell command"),
        ({"checks": [{"type": "watch", "sokcet": "x"}]}, "checks[0].sokcet: unknown key"),
        ({"alerts": {"routes": "ops"}}, "alerts.routes: expected a list of strings"),
        ({"run_dir": "/run/\u0000x"}, "run_dir: \"/run/\\u0000x\" contains a NUL character"),
        ({"keel": ["/bin/ke\u0000el"]}, "keel: [0]: "),
        ({"checks": [{"type": "command", "command": "true\u0000"}]}, "checks[0].command: "),
    ],
)  # fmt: skip
def test_errors_name_the_file_and_key(tmp_path: Path, value: object, message: str) -> None:
    path = write(tmp_path, value)
    with pytest.raises(ConfigError) as caught:
        ss_config.load(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_the_command_line_wins_and_is_checked(tmp_path: Path) -> None:
    config = ss_config.load(write(tmp_path, {"gate": 10, "deadline": 60}))
    changed = with_overrides(config, gate=5, deadline=None, timer="process", profile=None)
    assert (changed.limits.gate, changed.limits.deadline, changed.timer) == (5, 60, "process")
    with pytest.raises(ConfigError, match="--gate/--deadline: the deadline"):
        with_overrides(config, gate=90, deadline=None)
    with pytest.raises(ConfigError, match="--check: expected a shell command"):
        ss_config.command_check("  ")
