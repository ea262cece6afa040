"""The flake: its lock, its outputs, and (where Nix can build) its checks."""

from __future__ import annotations

import base64
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.nix.nixeval import (
    HERE,
    NixEvalError,
    nix_build_blocker,
    nix_command_blocker,
    nix_eval_expr,
    nix_eval_file,
    nix_string,
    run_nix,
)

LOCK = REPO / "flake.lock"
SYSTEM = "x86_64-linux"

# PyPI requirement of python/pyproject.toml -> python3Packages attribute that
# pkgs/keel.nix must list among its dependencies. A new runtime requirement
# fails test_package_covers_the_runtime_requirements until it is added here
# and to pkgs/keel.nix (Nix's own runtime-deps check would refuse the build).
PYPI_TO_NIXPKGS = {
    "cryptography": "cryptography",
    "jeepney": "jeepney",
    "dnspython": "dnspython",
    "idna": "idna",
    "systemd-python": "systemd-python",
}


def load_lock() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(LOCK.read_text())
    return data


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def test_lock_is_a_complete_version_7_lock() -> None:
    lock = load_lock()
    assert lock["version"] == 7
    assert lock["root"] == "root"
    nodes = lock["nodes"]
    assert set(nodes) == {"root", "nixpkgs"}
    assert nodes["root"] == {"inputs": {"nixpkgs": "nixpkgs"}}
    locked = nodes["nixpkgs"]["locked"]
    assert set(locked) == {"lastModified", "narHash", "owner", "repo", "rev", "type"}
    assert locked["type"] == "github"
    assert (locked["owner"], locked["repo"]) == ("NixOS", "nixpkgs")
    assert re.fullmatch(r"[0-9a-f]{40}", locked["rev"])
    assert isinstance(locked["lastModified"], int)
    # 2026-04-24, when cryptography 47 (ML-KEM) reached nixpkgs, or later.
    assert locked["lastModified"] >= 1776988800
    algorithm, _, digest = locked["narHash"].partition("-")
    assert algorithm == "sha256"
    assert len(base64.b64decode(digest, validate=True)) == 32
    assert nodes["nixpkgs"]["original"] == {
        "owner": "NixOS",
        "ref": "nixos-26.05",
        "repo": "nixpkgs",
        "type": "github",
    }


def test_lock_matches_the_flake_inputs(nix_instantiate: str) -> None:
    inputs = nix_eval_expr(nix_instantiate, "(import ./flake.nix).inputs")
    assert set(inputs) == set(load_lock()["nodes"]["root"]["inputs"])
    kind, _, rest = inputs["nixpkgs"]["url"].partition(":")
    owner, repo, ref = rest.split("/")
    assert {"type": kind, "owner": owner, "repo": repo, "ref": ref} == load_lock()["nodes"][
        "nixpkgs"
    ]["original"]


def test_docs_record_where_the_lock_comes_from() -> None:
    docs = (REPO / "docs" / "nix.md").read_text()
    locked = load_lock()["nodes"]["nixpkgs"]["locked"]
    for value in (locked["rev"], locked["narHash"], str(locked["lastModified"])):
        assert value in docs, f"docs/nix.md does not record {value}"


def test_outputs_have_the_expected_names_without_nixpkgs(nix_instantiate: str) -> None:
    # The outputs' names must not depend on nixpkgs: an input that throws
    # when touched proves they don't.
    names = nix_eval_expr(
        nix_instantiate,
        """
        let
          outputs = (import ./flake.nix).outputs {
            self = outputs;
            nixpkgs = throw "nixpkgs was evaluated";
          };
        in {
          top = builtins.attrNames outputs;
          packages = builtins.attrNames outputs.packages;
          packageNames = builtins.attrNames outputs.packages.x86_64-linux;
          checks = builtins.attrNames outputs.checks;
          formatter = builtins.attrNames outputs.formatter;
          nixosModules = builtins.attrNames outputs.nixosModules;
          overlays = builtins.attrNames outputs.overlays;
        }
        """,
    )
    assert names == {
        "top": ["checks", "formatter", "nixosModules", "overlays", "packages"],
        "packages": [SYSTEM],
        "packageNames": ["default", "keel"],
        "checks": [SYSTEM],
        "formatter": [SYSTEM],
        "nixosModules": ["default"],
        "overlays": ["default"],
    }


@pytest.fixture(scope="module")
def flake_summary(nix_instantiate: str, nixpkgs_lib: Path) -> dict[str, Any]:
    summary: dict[str, Any] = nix_eval_file(
        nix_instantiate,
        HERE / "eval-flake.nix",
        args={"repo": Path(nix_string(REPO)), "nixpkgsLib": Path(nix_string(nixpkgs_lib))},
    )
    return summary


def test_package_is_a_pyproject_application(flake_summary: dict[str, Any]) -> None:
    keel = flake_summary["keel"]
    pyproject = tomllib.loads((REPO / "python" / "pyproject.toml").read_text())
    assert keel["pname"] == "keel"
    assert keel["version"] == pyproject["project"]["version"]
    assert keel["pyproject"] is True
    assert keel["build-system"] == ["setuptools"]
    assert keel["pythonImportsCheck"] == ["keel"]
    assert keel["mainProgram"] == "keel"
    # The check phase runs the unit tier, with what it imports.
    assert keel["enabledTestPaths"] == ["tests/unit"]
    assert {"pytestCheckHook", "hypothesis"} <= set(keel["nativeCheckInputs"])
    # The mesh's fallback KEM backend (liboqs) is part of the Nix package.
    assert "liboqs-python" in keel["dependencies"]


def test_package_covers_the_runtime_requirements(flake_summary: dict[str, Any]) -> None:
    project = tomllib.loads((REPO / "python" / "pyproject.toml").read_text())["project"]
    required = [requirement_name(r) for r in project["dependencies"]]
    required += [requirement_name(r) for r in project["optional-dependencies"]["systemd"]]
    unmapped = [name for name in required if name not in PYPI_TO_NIXPKGS]
    assert not unmapped, f"add {unmapped} to PYPI_TO_NIXPKGS and pkgs/keel.nix"
    missing = {PYPI_TO_NIXPKGS[name] for name in required} - set(
        flake_summary["keel"]["dependencies"]
    )
    assert not missing, f"pkgs/keel.nix lacks python3Packages {sorted(missing)}"


def test_package_source_is_what_it_is_built_from(flake_summary: dict[str, Any]) -> None:
    keeps = flake_summary["sourceKeeps"]
    # python/ and what the package and its tests read beside it.
    kept = ("pyproject", "module", "unitTest", "tiersJson", "examples", "docs")
    assert all(keeps[name] for name in kept), keeps
    assert flake_summary["keel"]["sourceRoot"] == "keel-source/python"
    # Neither working-tree junk nor the Nix files (a change to a module must
    # not rebuild the package).
    dropped = ["pycache", "pyc", "eggInfo", "pytestCache", "hypothesis", "build", "venv"]
    dropped += ["devState", "flake", "vmTests", "packages"]
    assert not any(keeps[name] for name in dropped), keeps


def test_kyber_py_is_packaged_for_the_check_phase(flake_summary: dict[str, Any]) -> None:
    # Not in nixpkgs; the mesh's KEM tests cross-check against it.
    assert "kyber-py" in flake_summary["keel"]["nativeCheckInputs"]
    kyber = flake_summary["kyberPy"]
    assert kyber == {
        "pname": "kyber-py",
        "version": kyber["version"],
        "pyproject": True,
        "pythonImportsCheck": ["kyber_py.ml_kem"],
        "src": f"kyber_py-{kyber['version']}.tar.gz",
        "build-system": ["hatchling"],
    }


def test_outputs_wire_package_overlay_modules_and_checks(flake_summary: dict[str, Any]) -> None:
    assert flake_summary["defaultIsKeel"] is True
    assert flake_summary["overlayKeel"] == flake_summary["keel"]
    assert flake_summary["checkKeelIsPackage"] is True
    assert Path(flake_summary["nixosModule"]) == REPO / "modules"
    assert flake_summary["formatter"] == "nixfmt-tree"


def test_every_vm_test_file_is_a_check(flake_summary: dict[str, Any]) -> None:
    files = sorted(p.name for p in (REPO / "vm-tests").glob("*.nix") if p.name != "default.nix")
    expected = {f"vm-{Path(name).stem}": name for name in files}
    assert flake_summary["vmTests"] == expected
    assert set(flake_summary["checkNames"]) == {"keel", *expected}


def test_pkgs_keel_asks_only_for_attributes_nixpkgs_has(nix_instantiate: str) -> None:
    args = nix_eval_expr(nix_instantiate, "builtins.functionArgs (import ./pkgs/keel.nix)")
    known = nix_eval_expr(
        nix_instantiate,
        "let lib = { genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = n; }) names); "
        "fixedWidthString = w: c: s: s; }; "
        f"in builtins.attrNames (import {nix_string(HERE / 'stub-pkgs.nix')} {{ inherit lib; }}).python3Packages",
    )
    assert set(args) - {"lib"} <= set(known)


def test_nix_takes_the_lock_as_it_is() -> None:
    # With a lock that matches flake.nix, Nix resolves the flake offline and
    # writes nothing; a stale or malformed lock makes it re-lock (network) or
    # fail, and --no-update-lock-file turns that into an error.
    blocker = nix_command_blocker()
    if blocker is not None:
        pytest.skip(blocker)
    proc = run_nix(
        "flake", "metadata", "--json", "--no-update-lock-file", f"git+file://{REPO}", timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["locks"] == load_lock()


def test_a_stale_lock_is_refused(tmp_path: Path) -> None:
    blocker = nix_command_blocker()
    if blocker is not None:
        pytest.skip(blocker)
    flake = tmp_path / "flake"
    flake.mkdir()
    (flake / "flake.nix").write_text(
        (REPO / "flake.nix").read_text().replace("nixos-26.05", "nixos-25.11")
    )
    (flake / "flake.lock").write_text(LOCK.read_text())
    proc = run_nix("flake", "metadata", "--no-update-lock-file", f"path:{flake}", timeout=120)
    assert proc.returncode != 0
    # Offline Nix tries to resolve the new branch; online it refuses to
    # update the lock. Either way it did not take the stale lock.
    assert "nixos-25.11" in proc.stderr or "lock file" in proc.stderr, proc.stderr


def nix_build_or_skip() -> None:
    blocker = nix_build_blocker()
    if blocker is not None:
        pytest.skip(f"Nix cannot build here: {blocker}")


def test_package_builds_and_passes_its_unit_tier() -> None:
    nix_build_or_skip()
    proc = run_nix(
        "build", "--no-link", "-L", f"git+file://{REPO}#checks.{SYSTEM}.keel", timeout=3600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_flake_check() -> None:
    nix_build_or_skip()
    if not Path("/dev/kvm").exists():
        pytest.skip("Nix cannot build here: no /dev/kvm for the NixOS VM tests")
    proc = run_nix("flake", "check", "-L", f"git+file://{REPO}", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_eval_errors_are_reported(nix_instantiate: str) -> None:
    with pytest.raises(NixEvalError, match="nixpkgs was evaluated"):
        nix_eval_expr(
            nix_instantiate,
            '((import ./flake.nix).outputs { self = {}; nixpkgs = throw "nixpkgs was evaluated"; })'
            ".packages.x86_64-linux.keel.name",
        )


def test_links_in_the_package_stay_inside_its_source(flake_summary: dict[str, Any]) -> None:
    # A link out of python/ (src/keel/data/tiers.json -> modules/tiers.json)
    # must land in a tree the package's source keeps, or the build sees a
    # dangling link.
    root = REPO.resolve()
    links = [p for p in (REPO / "python" / "src").rglob("*") if p.is_symlink()]
    assert links, "python/src/keel/data/tiers.json is expected to link to modules/tiers.json"
    for link in links:
        target = link.resolve().relative_to(root)
        assert target.parts[0] in {"python", "modules", "examples", "docs"}, (link, target)
    assert flake_summary["sourceKeeps"]["tiersJson"]
