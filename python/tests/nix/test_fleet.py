"""modules/fleet.nix: /etc/keel/fleet.json and keel-fleet.service from the options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from keel.config import Section
from keel.fleet import config as fleet_config

from tests import systemd_syntax
from tests.nix.nixeval import NixEvalError
from tests.nix.test_modules import evaluate

OPERATOR = "m5x2bq7hz4kcw3yd6rtp2vnq5jslf3ua"
HOST = """
  services.keel.mesh = { enable = true; listen = "0.0.0.0:7400"; };
  services.keel.fleet.enable = true;
"""


def fleet(nix_instantiate: str, nixpkgs_tree: Path, body: str = "") -> dict[str, Any]:
    return evaluate(nix_instantiate, nixpkgs_tree, "{ " + HOST + body + " }")


def fleet_json(result: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = result["etc"]["keel/fleet.json"]["json"]
    return config


def test_defaults_make_a_config_keel_fleet_reads(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = fleet(nix_instantiate, nixpkgs_tree, "services.keel.watch.enable = true;")
    assert result["failedAssertions"] == []
    config = fleet_json(result)
    keel = config.pop("keel")
    assert len(keel) == 1
    assert keel[0].endswith("-keel-0.1.0/bin/keel")  # by its store path, never the new system's
    assert config == {
        "socket": "/run/keel/fleet.sock",
        "ledger": "/var/lib/keel/ledger.db",
        "mesh": "/run/keel/mesh.sock",
        "state": "/var/lib/keel/fleet",
        "watch": "/run/keel/watch.sock",
        "services": ["watch", "mesh"],
        "operators": [],
        "pinned": {},
        "witness_every": 60,
        "status_timeout": 1,
        "request_timeout": 10,
        "control_timeout": 60,
        "switch_runner": "systemd",
        "switch_timeout": 3600,
    }
    config["keel"] = keel
    # the daemon's own reader takes what the module wrote, key for key
    parsed = fleet_config.parse(Section(config, source="/etc/keel/fleet.json"))
    assert parsed.watch == Path("/run/keel/watch.sock")
    assert set(parsed.services) == {"watch", "mesh"}


def test_without_watch_there_is_no_watch_to_ask(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    config = fleet_json(fleet(nix_instantiate, nixpkgs_tree))
    assert config["watch"] is None
    assert config["services"] == ["mesh"]
    assert fleet_config.parse(Section(config, source="fleet.json")).watch is None


def test_the_unit_is_a_hardened_notify_service(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = fleet(nix_instantiate, nixpkgs_tree)
    unit = result["services"]["keel-fleet"]
    service = unit["serviceConfig"]
    argv, _ = systemd_syntax.service_values(result["units"]["keel-fleet.service"])
    assert argv[0].endswith("-keel-0.1.0/bin/keel")
    assert argv[1:4] == ["fleet", "serve", "--config"]
    assert argv[4].endswith("-fleet.json")
    assert service["Type"] == "notify"
    assert service["WatchdogSec"] == "30s"
    assert service["Restart"] == "always"
    assert service["CapabilityBoundingSet"] == ""
    assert service["AmbientCapabilities"] == ""
    assert service["NoNewPrivileges"] is True
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == ["/var/lib/keel", "/run/keel"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]  # the mesh node carries the rest
    assert service["IPAddressDeny"] == "any"
    assert service["Group"] == "keel"
    assert service["StateDirectory"] == "keel/fleet"
    assert unit["after"] == ["keel-mesh.service", "keel-watch.service"]
    assert unit["wants"] == ["keel-mesh.service"]
    assert unit["stopIfChanged"] is False
    assert result["enabledServices"].count("fleet") == 1


def test_operators_and_settings(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = fleet(
        nix_instantiate,
        nixpkgs_tree,
        f"""
          services.keel.fleet.operators = [ "{OPERATOR}" ];
          services.keel.fleet.settings = {{ witness_every = 30; keep = 50; }};
        """,
    )
    config = fleet_json(result)
    assert config["operators"] == [OPERATOR]
    assert config["witness_every"] == 30
    assert config["keep"] == 50
    parsed = fleet_config.parse(Section(config, source="fleet.json"))
    assert parsed.operators == {OPERATOR}
    assert parsed.keep == 50


@pytest.mark.parametrize(
    ("body", "option"),
    [
        ('services.keel.fleet.operators = [ "web1" ];', "services.keel.fleet.operators"),
        ("services.keel.fleet.settings.witness_every = 0;", "witness_every"),
        (
            'services.keel.fleet.settings.services = [ "fleet" ];',
            "services.keel.fleet.settings.services",
        ),
    ],
)
def test_bad_values_are_type_errors(
    nix_instantiate: str, nixpkgs_tree: Path, body: str, option: str
) -> None:
    with pytest.raises(NixEvalError, match=option.replace(".", r"\.")):
        fleet(nix_instantiate, nixpkgs_tree, body)


def test_the_fleet_needs_the_mesh_and_a_short_status_timeout(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    result = evaluate(
        nix_instantiate,
        nixpkgs_tree,
        "{ services.keel.fleet = { enable = true; settings.status_timeout = 5; }; }",
    )
    messages = result["failedAssertions"]
    assert any("enable services.keel.mesh too" in m for m in messages), messages
    assert any("status_timeout: keep it under 2 s" in m for m in messages), messages


def test_operators_without_safeswitch_are_warned_of(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    body = f'services.keel.fleet.operators = [ "{OPERATOR}" ];'
    warned = fleet(nix_instantiate, nixpkgs_tree, body)["warnings"]
    assert any("services.keel.safeswitch is not enabled" in w for w in warned), warned
    quiet = fleet(nix_instantiate, nixpkgs_tree, body + " services.keel.safeswitch.enable = true;")
    assert not any("safeswitch" in w for w in quiet["warnings"]), quiet["warnings"]
