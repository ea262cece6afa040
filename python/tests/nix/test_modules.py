"""keel's NixOS modules, evaluated against the real NixOS option declarations."""

from __future__ import annotations

from pathlib import Path

from tests import systemd_syntax
from tests.conftest import REPO
from tests.nix.nixeval import evaluate_modules, nix_eval_expr

MODULES = REPO / "modules"


# What keel's modules make of a host configuration (a Nix expression),
# against the real NixOS declarations: tests.nix.nixeval.evaluate_modules.
evaluate = evaluate_modules


def test_the_aggregate_imports_every_module(nix_instantiate: str) -> None:
    imported = nix_eval_expr(
        nix_instantiate, "map (p: baseNameOf (toString p)) (import ./modules).imports"
    )
    on_disk = sorted(p.name for p in MODULES.glob("*.nix") if p.name != "default.nix")
    assert sorted(imported) == on_disk


def test_nothing_happens_until_a_service_is_enabled(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    result = evaluate(nix_instantiate, nixpkgs_tree)
    assert result["failedAssertions"] == []
    assert result["services"] == {}
    assert result["users"] == {}
    assert result["etc"] == {}


def test_a_failing_assertion_is_reported(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    # The harness itself must be able to fail: a user without a group.
    result = evaluate(
        nix_instantiate, nixpkgs_tree, "{ users.users.keel-probe.isSystemUser = true; }"
    )
    # NixOS' own assertion (config/users-groups.nix), not one of keel's.
    assert any(
        text.startswith("users.users.keel-probe.group is unset")
        for text in result["failedAssertions"]
    ), result["failedAssertions"]


def test_the_shared_parts_appear_with_the_first_service(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    result = evaluate(
        nix_instantiate, nixpkgs_tree, '{ services.keel.enabledServices = [ "probe" ]; }'
    )
    assert result["failedAssertions"] == []
    assert result["groups"] == ["keel"]
    assert result["tmpfiles"] == [
        "d /etc/keel 0755 root root - -",
        "d /var/lib/keel 2770 root keel - -",
        "d /run/keel 2770 root keel - -",
    ]
    # keel is not in nixpkgs: the default package is built from pkgs/keel.nix.
    assert result["systemPackages"] == ["keel-0.1.0"]


def test_an_overlay_keel_is_preferred(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = evaluate(
        nix_instantiate,
        nixpkgs_tree,
        '{ services.keel.enabledServices = [ "probe" ]; }',
        overlay='final: prev: { keel = prev.writeText "keel-from-overlay" ""; }',
    )
    assert result["systemPackages"] == ["keel-from-overlay"]


def test_the_ledger_key_is_roots_and_made_before_the_daemons(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    # watch and fleet run as root and sign; the mesh and chat run as their own users
    # and only append: the key unit orders itself before all of them.
    result = evaluate(
        nix_instantiate,
        nixpkgs_tree,
        '{ services.keel.enabledServices = [ "watch" "mesh" "chat" "safeswitch" ]; }',
    )
    assert result["failedAssertions"] == []
    unit = result["services"]["keel-ledger-key"]
    daemons = ["keel-watch.service", "keel-mesh.service", "keel-chat.service"]
    assert unit["before"] == daemons  # safeswitch has no daemon
    assert unit["wantedBy"] == ["multi-user.target", *daemons]
    assert unit["requires"] == []  # a daemon starts (and appends) even if this failed
    service = unit["serviceConfig"]
    assert service["Type"] == "oneshot"
    assert "User" not in service  # root: the owner of /var/lib/keel, so of the key
    assert service["CapabilityBoundingSet"] == ["CAP_CHOWN"]
    argv, _ = systemd_syntax.service_values(result["units"]["keel-ledger-key.service"])
    assert argv[0].endswith("-keel-0.1.0/bin/keel")
    assert argv[1:] == ["ledger", "key", "--provision", "--db", "/var/lib/keel/ledger.db"]
