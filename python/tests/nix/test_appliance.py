"""modules/appliance.nix: srvos-style defaults that any host can override."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests import systemd_syntax
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


def unit_directives(text: str) -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for d in systemd_syntax.directives(text):
        found.setdefault((d.section, d.key), []).append(d.value)
    return found


def test_the_seed_is_applied_at_boot(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = appliance(
        nix_instantiate,
        nixpkgs_tree,
        'services.keel.mesh = { enable = true; listen = "0.0.0.0:7400"; };',
    )
    assert result["failedAssertions"] == []
    keys = result["units"]["keel-seed-keys.service"]
    argv, _ = systemd_syntax.service_values(keys)
    assert argv[0].endswith("/bin/keel")
    assert argv[1:] == ["appliance", "seed", "--dir", "/boot/keel-seed", "--only", "keys"]
    found = unit_directives(keys)
    assert found["Unit", "ConditionPathExists"] == ["/boot/keel-seed/authorized_keys"]
    assert found["Unit", "RequiresMountsFor"] == ["/boot/keel-seed"]
    assert set(found["Unit", "Before"][0].split()) == {"sshd.service", "sshd.socket"}
    assert found["Service", "Type"] == ["oneshot"]
    mesh = unit_directives(result["units"]["keel-seed-mesh.service"])
    assert mesh["Unit", "After"] == ["keel-mesh.service"]
    assert mesh["Unit", "ConditionPathExists"] == ["/boot/keel-seed/mesh-invite"]
    assert mesh["Service", "Restart"] == ["on-failure"]
    # The seed needs the keel package even on a host without a keel daemon.
    assert "keel-0.1.0" in result["systemPackages"]


def test_the_seed_follows_its_options(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    moved = appliance(
        nix_instantiate, nixpkgs_tree, 'services.keel.appliance.seed.directory = "/mnt/seed";'
    )
    # no mesh, no mesh seed; the ledger's key is provisioned on every keel host
    assert set(moved["units"]) == {"keel-seed-keys.service", "keel-ledger-key.service"}
    argv, _ = systemd_syntax.service_values(moved["units"]["keel-seed-keys.service"])
    assert argv[argv.index("--dir") + 1] == "/mnt/seed"
    off = appliance(nix_instantiate, nixpkgs_tree, "services.keel.appliance.seed.enable = false;")
    assert off["units"] == {}
    bad = appliance(
        nix_instantiate, nixpkgs_tree, 'services.keel.appliance.seed.directory = "seed dir";'
    )
    assert any("services.keel.appliance.seed.directory" in m for m in bad["failedAssertions"])


def test_a_host_whose_sshd_ignores_home_keys_is_warned(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    # The seed adds to /root/.ssh/authorized_keys, which sshd reads only
    # with authorizedKeysInHomedir (NixOS' default).
    assert appliance(nix_instantiate, nixpkgs_tree)["warnings"] == []
    off = appliance(
        nix_instantiate, nixpkgs_tree, "services.openssh.authorizedKeysInHomedir = false;"
    )
    assert any("authorizedKeysInHomedir is false" in w for w in off["warnings"]), off["warnings"]
