"""keel's NixOS modules, evaluated with nixpkgs' lib and NixOS option stand-ins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import REPO
from tests.nix.nixeval import HERE, nix_eval_expr, nix_eval_file, nix_string

MODULES = REPO / "modules"


def evaluate(
    nix_instantiate: str,
    nixpkgs_lib: Path,
    host_config: str = "{ }",
    *,
    paths: str = "[ ]",
    with_keel: bool = True,
    overlay: str = "final: prev: { }",
) -> dict[str, Any]:
    """What keel's modules make of a host configuration (a Nix expression).

    ``paths`` is a Nix list of option paths whose values come back in ``values``.
    """
    result: dict[str, Any] = nix_eval_file(
        nix_instantiate,
        HERE / "eval-modules.nix",
        args={
            "repo": Path(nix_string(REPO)),
            "nixpkgsLib": Path(nix_string(nixpkgs_lib)),
            "hostConfig": host_config,
            "paths": paths,
            "withKeel": "true" if with_keel else "false",
            "overlay": overlay,
        },
    )
    return result


def test_the_aggregate_imports_every_module(nix_instantiate: str) -> None:
    imported = nix_eval_expr(
        nix_instantiate, "map (p: baseNameOf (toString p)) (import ./modules).imports"
    )
    on_disk = sorted(p.name for p in MODULES.glob("*.nix") if p.name != "default.nix")
    assert sorted(imported) == on_disk


def test_nothing_happens_until_a_service_is_enabled(
    nix_instantiate: str, nixpkgs_lib: Path
) -> None:
    result = evaluate(nix_instantiate, nixpkgs_lib)
    assert result["failedAssertions"] == []
    assert result["services"] == {}
    assert result["users"] == {}
    assert result["etc"] == {}


def test_a_failing_assertion_is_reported(nix_instantiate: str, nixpkgs_lib: Path) -> None:
    # The harness itself must be able to fail: a user without a group.
    result = evaluate(
        nix_instantiate, nixpkgs_lib, "{ users.users.keel-probe.isSystemUser = true; }"
    )
    assert "users.users.keel-probe.group is unset" in result["failedAssertions"]


def test_the_shared_parts_appear_with_the_first_service(
    nix_instantiate: str, nixpkgs_lib: Path
) -> None:
    result = evaluate(
        nix_instantiate, nixpkgs_lib, '{ services.keel.enabledServices = [ "probe" ]; }'
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


def test_an_overlay_keel_is_preferred(nix_instantiate: str, nixpkgs_lib: Path) -> None:
    result = evaluate(
        nix_instantiate,
        nixpkgs_lib,
        '{ services.keel.enabledServices = [ "probe" ]; }',
        overlay='final: prev: { keel = prev.writeText "keel-from-overlay" ""; }',
    )
    assert result["systemPackages"] == ["keel-from-overlay"]
