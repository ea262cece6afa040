"""modules/safeswitch.nix: /etc/keel/safeswitch.json from typed options, and the boot check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from keel.safeswitch import units

from tests import systemd_syntax
from tests.nix.test_modules import evaluate


def safeswitch(
    nix_instantiate: str, nixpkgs_tree: Path, body: str = "", *, boot_counting: bool = False
) -> dict[str, Any]:
    counting = "boot.loader.systemd-boot.bootCounting.enable = true; " if boot_counting else ""
    host = "{ services.keel.safeswitch.enable = true; " + counting + body + " }"
    return evaluate(nix_instantiate, nixpkgs_tree, host)


def config_of(result: dict[str, Any]) -> dict[str, Any]:
    value: dict[str, Any] = result["etc"]["keel/safeswitch.json"]["json"]
    return value


def test_defaults(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = safeswitch(nix_instantiate, nixpkgs_tree)
    assert result["failedAssertions"] == []
    config = config_of(result)
    keel = config.pop("keel")
    assert len(keel) == 1
    assert keel[0].endswith("-keel-0.1.0/bin/keel")  # a store path: the rollback's keel
    assert config == {
        "gate": 30,
        "deadline": 300,
        "timer": "systemd",
        "ledger": "/var/lib/keel/ledger.db",
        "alerts": None,
        "checks": [{"type": "system", "allow_degraded": False}],
    }
    assert "safeswitch" in result["enabledServices"]
    assert "d /run/keel/safeswitch 2750 root keel - -" in result["tmpfiles"]
    assert "d /nix/var/nix/gcroots/keel-safeswitch 0755 root root - -" in result["tmpfiles"]
    assert "d /var/lib/keel/safeswitch 0750 root root - -" in result["tmpfiles"]
    # No daemon, no boot check without boot counting, no keel-switch@ without targets:
    # the ledger's key, and the oneshot that records switches a reboot interrupted.
    assert sorted(result["services"]) == ["keel-ledger-key", "keel-safeswitch-reconcile"]
    assert result["systemPackages"] == ["keel-0.1.0"]


def test_a_switch_a_reboot_interrupted_is_recorded_at_boot(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    result = safeswitch(nix_instantiate, nixpkgs_tree)
    unit = result["services"]["keel-safeswitch-reconcile"]
    assert unit["wantedBy"] == ["multi-user.target"]
    assert unit["after"] == ["keel-ledger-key.service"]
    service = unit["serviceConfig"]
    assert service["Type"] == "oneshot"
    argv, _ = systemd_syntax.service_values(result["units"]["keel-safeswitch-reconcile.service"])
    assert argv[1:4] == ["switch", "reconcile", "--config"]
    assert argv[4].endswith("-safeswitch.json")
    assert service["CapabilityBoundingSet"] == ""
    assert service["ReadWritePaths"] == [
        "/var/lib/keel/safeswitch",
        "/var/lib/keel",
        "/nix/var/nix/gcroots/keel-safeswitch",
    ]


TARGETS = """
  services.keel.safeswitch.targets = {
    next = { specialisation = "next"; };
    booted = { system = "/run/booted-system"; };
  };
"""


def test_targets_make_the_template_and_requesters_the_polkit_rule(
    nix_instantiate: str, nixpkgs_tree: Path, tmp_path: Path
) -> None:
    from keel.safeswitch import config as ss_config

    body = (
        TARGETS
        + 'services.keel.safeswitch.requesters = [ "keel-chat" "ops" ]; '
        + 'users.users.ops = { isSystemUser = true; group = "keel"; }; '
        + 'users.users.keel-chat = { isSystemUser = true; group = "keel"; };'
    )
    result = evaluate(
        nix_instantiate,
        nixpkgs_tree,
        "{ services.keel.safeswitch.enable = true; " + body + " }",
        paths='[ [ "security" "polkit" "extraConfig" ] [ "security" "polkit" "enable" ] ]',
    )
    assert result["failedAssertions"] == []
    config = config_of(result)
    assert config["targets"] == {
        "next": {"specialisation": "next"},
        "booted": {"system": "/run/booted-system"},
    }
    path = tmp_path / "safeswitch.json"
    path.write_text(json.dumps(config))
    assert sorted(ss_config.load(path).targets) == ["booted", "next"]
    # The rule is the one `keel switch install-units --allow` writes.
    rule, enabled = result["values"]
    assert enabled is True
    assert rule == units.polkit_rule(["ops", "keel-chat"])
    # The template: keel switch request, never restarted or stopped by a switch.
    unit = result["services"]["keel-switch@"]
    assert unit["restartIfChanged"] is False
    assert unit["unitConfig"]["X-StopOnRemoval"] is False
    assert unit["wantedBy"] == []  # started on request only
    text = result["units"]["keel-switch@.service"]
    argv, _ = systemd_syntax.service_values(text, keep=("%i",))
    assert argv[0].endswith("-keel-0.1.0/bin/keel")
    assert argv[1:4] == ["switch", "request", "--config"]
    assert argv[4].endswith("-safeswitch.json")
    assert argv[5] == "%i"
    assert [p.split("-", 1)[1] for p in unit["path"]][:2] == ["nix", "util-linux"]
    # Every directive keel's own rendering has, NixOS writes too (it adds PATH, TZDIR).
    mine = units.template_unit(argv[0], argv[4])
    for line in mine.splitlines():
        if "=" in line and not line.startswith("#"):
            assert line in text.splitlines(), line


def test_without_requesters_no_polkit_rule(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = evaluate(
        nix_instantiate,
        nixpkgs_tree,
        "{ services.keel.safeswitch.enable = true; " + TARGETS + " }",
        paths='[ [ "security" "polkit" "extraConfig" ] [ "security" "polkit" "enable" ] ]',
    )
    assert result["values"] == ["", False]
    assert "keel-switch@" in result["services"]


def test_typed_checks_and_watch_alerts(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = safeswitch(
        nix_instantiate,
        nixpkgs_tree,
        """
          services.keel.watch.enable = true;
          services.keel.watch.settings.alerts = {
            ops = { type = "webhook"; url = "https://hooks.example/keel"; };
            pager = { type = "webhook"; url = "https://pager.example/keel"; };
          };
          services.keel.safeswitch = {
            gate = 20;
            deadline = 120;
            alerts.routes = [ "pager" ];
            checks.system.allowDegraded = true;
            checks.tcp = [ { port = 22; name = "ssh"; } ];
            checks.http = [ { url = "http://127.0.0.1:8080/health"; expectStatus = [ 200 ]; } ];
            checks.commands = [ "curl -fsS http://127.0.0.1:8080/ready" { command = "true"; timeout = 3; name = "t"; } ];
          };
        """,
    )
    assert result["failedAssertions"] == []
    config = config_of(result)
    assert (config["gate"], config["deadline"]) == (20, 120)
    assert config["alerts"] == {"watch_config": "/etc/keel/watch.json", "routes": ["pager"]}
    assert config["checks"] == [
        {"type": "watch", "socket": "/run/keel/watch.sock"},
        {"type": "system", "allow_degraded": True},
        {"type": "tcp", "host": "127.0.0.1", "port": 22, "timeout": 5, "name": "ssh"},
        {
            "type": "http",
            "url": "http://127.0.0.1:8080/health",
            "timeout": 5,
            "expect_status": [200],
        },
        {"type": "command", "command": "curl -fsS http://127.0.0.1:8080/ready", "timeout": 30},
        {"type": "command", "command": "true", "timeout": 3, "name": "t"},
    ]


def test_keel_reads_the_file_the_module_writes(
    nix_instantiate: str, nixpkgs_tree: Path, tmp_path: Path
) -> None:
    from keel.safeswitch import config as ss_config

    result = safeswitch(
        nix_instantiate,
        nixpkgs_tree,
        """
          services.keel.watch.enable = true;
          services.keel.watch.settings.alerts.ops = { type = "webhook"; url = "https://h.example/k"; };
          services.keel.safeswitch.checks.tcp = [ { port = 22; } ];
          services.keel.safeswitch.checks.http = [ { url = "http://127.0.0.1:1/"; expectStatus = [ 204 ]; } ];
          services.keel.safeswitch.checks.commands = [ "true" ];
        """,
    )
    import json

    path = tmp_path / "safeswitch.json"
    path.write_text(json.dumps(config_of(result)))
    config = ss_config.load(path)
    assert config.checks is not None
    assert [type(c).__name__ for c in config.checks] == [
        "WatchCheck",
        "SystemCheck",
        "TcpCheck",
        "HttpCheck",
        "CommandCheck",
    ]
    assert config.alerts is not None
    assert config.alerts.routes == ("ops",)
    assert config.timer == "systemd"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            "services.keel.safeswitch = { gate = 60; deadline = 60; };",
            "services.keel.safeswitch.deadline (60) must be longer than gate (60)",
            id="deadline-not-longer-than-gate",
        ),
        pytest.param(
            "services.keel.safeswitch.checks.watch = true;",
            "services.keel.safeswitch.checks.watch needs services.keel.watch.enable",
            id="watch-check-without-watch",
        ),
        pytest.param(
            'services.keel.watch.enable = true; services.keel.safeswitch.alerts.routes = [ "nope" ];',
            "services.keel.safeswitch.alerts.routes: nope: no such route",
            id="unknown-route",
        ),
        pytest.param(
            "services.keel.safeswitch.targets.x = { };",
            "services.keel.safeswitch.targets: x: a target's name is 1 to 32",
            id="target-of-nothing",
        ),
        pytest.param(
            'services.keel.safeswitch.targets.x = { specialisation = "a"; system = "/b"; };',
            "it sets exactly one of specialisation or system",
            id="target-of-two-things",
        ),
        pytest.param(
            'services.keel.safeswitch.targets."-x".specialisation = "a";',
            "services.keel.safeswitch.targets: -x: a target's name",
            id="target-name",
        ),
        pytest.param(
            'services.keel.safeswitch.requesters = [ "keel-chat" ];',
            "services.keel.safeswitch.requesters is set but no targets are declared",
            id="requesters-without-targets",
        ),
        pytest.param(
            TARGETS + 'services.keel.safeswitch.requesters = [ "nobody-here" ];',
            "services.keel.safeswitch.requesters: nobody-here: no such user",
            id="unknown-requester",
        ),
        pytest.param(
            'services.keel.safeswitch.checks.commands = [ { command = "true"; user = "ghost"; } ];',
            "services.keel.safeswitch.checks.commands: user ghost: no such user",
            id="unknown-check-user",
        ),
        pytest.param(
            "services.keel.safeswitch.bootCounting.enable = true;",
            "services.keel.safeswitch.bootCounting.enable needs boot.loader.systemd-boot.bootCounting.enable",
            id="boot-check-without-boot-counting",
        ),
    ],
)
def test_bad_settings_fail_with_a_message(
    nix_instantiate: str, nixpkgs_tree: Path, body: str, message: str
) -> None:
    failed = safeswitch(nix_instantiate, nixpkgs_tree, body)["failedAssertions"]
    assert any(message in text for text in failed), failed


def test_with_boot_counting_the_gate_blesses_the_boot(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    result = safeswitch(
        nix_instantiate,
        nixpkgs_tree,
        "services.keel.watch.enable = true; services.keel.safeswitch.bootCounting.rebootOnFailure = true;",
        boot_counting=True,
    )
    assert result["failedAssertions"] == []
    unit = result["services"]["keel-safeswitch-boot-check"]
    service = unit["serviceConfig"]
    command = service["ExecStart"].split()
    assert command[0].endswith("/bin/keel")
    assert command[1:4] == ["switch", "check", "--config"]
    assert command[4].endswith("-safeswitch.json")
    # gate 30 + settle 300; the system check is left to boot assessment itself (while
    # this unit runs, systemd is still "starting").
    assert command[5:] == ["--deadline", "330", "--skip-check", "system"]
    assert service["Type"] == "oneshot"
    assert unit["after"] == ["multi-user.target", "keel-watch.service"]
    assert unit["requiredBy"] == ["boot-complete.target"]
    assert unit["before"] == ["boot-complete.target"]
    assert unit["unitConfig"]["FailureAction"] == "reboot"
    assert unit["unitConfig"]["ConditionPathExists"].startswith(
        "/sys/firmware/efi/efivars/LoaderBootCountPath-"
    )
    # The unit file NixOS writes from it.
    text = result["units"]["keel-safeswitch-boot-check.service"]
    assert "Before=boot-complete.target" in text
    assert "ConditionPathExists=/sys/firmware/efi/efivars/LoaderBootCountPath-" in text
    assert "FailureAction=reboot" in text
    # Checks only: the daemons' sandbox, no capabilities.
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    assert service["NoNewPrivileges"] is True


def test_boot_counting_follows_systemd_boot_and_can_be_declined(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    on = safeswitch(nix_instantiate, nixpkgs_tree, boot_counting=True)
    assert "keel-safeswitch-boot-check" in on["services"]
    assert "FailureAction" not in on["services"]["keel-safeswitch-boot-check"]["unitConfig"]
    off = safeswitch(
        nix_instantiate,
        nixpkgs_tree,
        "services.keel.safeswitch.bootCounting.enable = false;",
        boot_counting=True,
    )
    assert set(off["services"]) == {"keel-ledger-key", "keel-safeswitch-reconcile"}  # no boot check
