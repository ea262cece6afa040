"""modules/appliance.nix: srvos-style defaults that any host can override."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.nix.test_modules import evaluate

# Each setting of the profile: option path, the profile's value, and another
# value a host might choose instead.
SETTINGS: list[tuple[list[str], Any, Any]] = [
    (["systemd", "settings", "Manager", "RuntimeWatchdogSec"], "15s", "1min"),
    (["systemd", "settings", "Manager", "RebootWatchdogSec"], "30s", "10min"),
    (["systemd", "enableEmergencyMode"], False, True),
    (["boot", "kernel", "sysctl", "kernel.panic"], 10, 0),
    (["boot", "tmp", "cleanOnBoot"], True, False),
    (["boot", "loader", "grub", "configurationLimit"], 10, 50),
    (["boot", "loader", "systemd-boot", "configurationLimit"], 10, 50),
    (["networking", "firewall", "enable"], True, False),
    (["services", "openssh", "enable"], True, False),
    (["services", "openssh", "settings", "PasswordAuthentication"], False, True),
    (["services", "openssh", "settings", "KbdInteractiveAuthentication"], False, True),
    (["services", "openssh", "settings", "PermitRootLogin"], "prohibit-password", "no"),
    (["nix", "settings", "experimental-features"], ["nix-command", "flakes"], ["flakes"]),
    (["nix", "gc", "automatic"], True, False),
    (["nix", "gc", "options"], "--delete-older-than 30d", "--delete-older-than 7d"),
    (["time", "timeZone"], "UTC", "Europe/Berlin"),
    (["documentation", "enable"], False, True),
    (["fonts", "fontconfig", "enable"], False, True),
    (["programs", "command-not-found", "enable"], False, True),
]
PATHS = [path for path, _, _ in SETTINGS]


def nix_paths() -> str:
    return (
        "[ "
        + " ".join("[ " + " ".join(json.dumps(p) for p in path) + " ]" for path in PATHS)
        + " ]"
    )


def nix_attr(path: list[str], value: Any) -> str:
    return ".".join(json.dumps(p) for p in path) + " = " + nix_value(value) + ";"


def nix_value(value: Any) -> str:
    if isinstance(value, list):
        return "[ " + " ".join(nix_value(v) for v in value) + " ]"
    return json.dumps(value)


def appliance(nix_instantiate: str, nixpkgs_tree: Path, *extra: str) -> dict[str, Any]:
    host = "{ services.keel.appliance.enable = true; " + " ".join(extra) + " }"
    return evaluate(nix_instantiate, nixpkgs_tree, host, paths=nix_paths())


def test_the_profile_sets_its_defaults(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = appliance(nix_instantiate, nixpkgs_tree)
    assert result["failedAssertions"] == []
    assert result["values"] == [value for _, value, _ in SETTINGS]


def test_a_host_overrides_every_setting(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    # A plain definition in the host wins over each of the profile's: every
    # one of them is mkDefault (a plain one would conflict and fail here).
    overrides = [nix_attr(path, other) for path, _, other in SETTINGS]
    result = appliance(nix_instantiate, nixpkgs_tree, *overrides)
    assert result["values"] == [other for _, _, other in SETTINGS]


def test_the_profile_is_inert_until_enabled(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    disabled = evaluate(nix_instantiate, nixpkgs_tree, paths=nix_paths())
    without_keel = evaluate(nix_instantiate, nixpkgs_tree, paths=nix_paths(), with_keel=False)
    assert disabled["values"] == without_keel["values"]
