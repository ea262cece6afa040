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
SYSTEMS = ["aarch64-linux", "x86_64-linux"]

# PyPI requirement of python/pyproject.toml -> python3Packages attribute that
# pkgs/keel.nix must list among its dependencies. A new runtime requirement
# fails test_package_covers_the_runtime_requirements until it is added here
# and to pkgs/keel.nix (Nix's own runtime-deps check would refuse the build).
PYPI_TO_NIXPKGS = {
    "cryptography": "cryptography",
    "jeepney": "jeepney",
    "mcp": "mcp",
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
          systems = attrs: builtins.mapAttrs (_: builtins.attrNames) attrs;
        in {
          top = builtins.attrNames outputs;
          packages = systems outputs.packages;
          apps = systems outputs.apps;
          checks = builtins.attrNames outputs.checks;
          formatter = builtins.attrNames outputs.formatter;
          nixosModules = builtins.attrNames outputs.nixosModules;
          nixosConfigurations = builtins.attrNames outputs.nixosConfigurations;
          overlays = builtins.attrNames outputs.overlays;
          templates = builtins.attrNames outputs.templates;
        }
        """,
    )
    packages = ["default", "image-qcow2", "image-raw-efi", "keel"]
    assert names == {
        "top": [
            "apps",
            "checks",
            "formatter",
            "nixosConfigurations",
            "nixosModules",
            "overlays",
            "packages",
            "templates",
        ],
        "packages": dict.fromkeys(SYSTEMS, packages),
        "apps": {system: ["vm"] for system in SYSTEMS},
        "checks": SYSTEMS,
        "formatter": SYSTEMS,
        "nixosModules": ["appliance", "default"],
        "nixosConfigurations": ["appliance", "appliance-aarch64"],
        "overlays": ["default"],
        "templates": ["appliance"],
    }


@pytest.fixture(scope="module")
def flake_summary(nix_instantiate: str, nixpkgs_lib: Path) -> dict[str, Any]:
    summary: dict[str, Any] = nix_eval_expr(
        nix_instantiate,
        f"(import {HERE / 'eval-flake.nix'} {{ repo = {nix_string(REPO)}; "
        f"nixpkgsLib = {nix_string(nixpkgs_lib)}; }}).package",
    )
    return summary


@pytest.fixture(scope="module")
def flake_systems(nix_instantiate: str, nixpkgs_tree: Path) -> dict[str, Any]:
    """Per system: the appliance, its images, checks and apps, against real NixOS."""
    systems: dict[str, Any] = nix_eval_expr(
        nix_instantiate,
        f"(import {HERE / 'eval-flake.nix'} {{ repo = {nix_string(REPO)}; "
        f"nixpkgsLib = {nix_string(nixpkgs_tree / 'lib')}; nixpkgs = {nix_string(nixpkgs_tree)}; }})"
        ".systems",
        timeout=300,
    )
    return systems


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
    dropped += ["devState", "flake", "vmTests", "packages", "hosts"]
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
    assert {k: Path(v) for k, v in flake_summary["nixosModules"].items()} == {
        "default": REPO / "modules",
        "appliance": REPO / "hosts" / "appliance.nix",
    }
    (template,) = flake_summary["templates"].values()
    assert Path(template["path"]) == REPO / "templates" / "appliance"
    assert "nixos-anywhere" in template["description"]
    assert flake_summary["formatter"] == "nixfmt-tree"


def test_every_vm_test_file_is_a_check(flake_summary: dict[str, Any]) -> None:
    files = sorted(p.name for p in (REPO / "vm-tests").glob("*.nix") if p.name != "default.nix")
    expected = {f"vm-{Path(name).stem}": name for name in files}
    assert flake_summary["vmTests"] == expected


@pytest.mark.parametrize("system", SYSTEMS)
def test_the_appliance_evaluates_against_real_nixos(
    flake_systems: dict[str, Any], system: str
) -> None:
    appliance = flake_systems[system]
    assert appliance["platform"] == system
    assert appliance["failedAssertions"] == []
    assert appliance["warnings"] == []
    assert appliance["configuration"] == ("appliance" if system == SYSTEM else "appliance-aarch64")
    assert {
        "keel-agent-hello",
        "keel-mesh",
        "keel-watch",
        "keel-seed-keys",
        "keel-seed-mesh",
    } <= set(appliance["keelServices"])
    checks = {"keel", "appliance-toplevel"}
    if system == SYSTEM:
        vm_tests = sorted(p.stem for p in (REPO / "vm-tests").glob("*.nix") if p.stem != "default")
        checks |= {f"vm-{name}" for name in vm_tests}
    assert set(appliance["checkNames"]) == checks
    assert appliance["formatter"] == "nixfmt-tree"


@pytest.mark.parametrize("system", SYSTEMS)
def test_the_images_are_variants_of_the_pinned_image_framework(
    flake_systems: dict[str, Any], system: str
) -> None:
    # packages.<system>.image-* are config.system.build.images.<variant> of
    # the real nixos/modules/image/images.nix, evaluated down to the real
    # make-disk-image.nix (built in a VM, as a disk image is).
    appliance = flake_systems[system]
    assert {"raw-efi", "qemu-efi"} <= set(appliance["imageVariants"])
    raw, qcow2 = appliance["images"]["image-raw-efi"], appliance["images"]["image-qcow2"]
    assert (raw["format"], raw["efiSupport"], raw["builtInVM"]) == ("raw", True, True)
    assert (qcow2["format"], qcow2["efiSupport"], qcow2["builtInVM"]) == ("qcow2", True, True)
    assert raw["filePath"].endswith(f"-{system}.img"), raw
    assert qcow2["filePath"].endswith(f"-{system}.qcow2"), qcow2


@pytest.mark.parametrize("system", SYSTEMS)
def test_the_vm_app_shares_the_seed_it_writes(flake_systems: dict[str, Any], system: str) -> None:
    appliance = flake_systems[system]
    assert appliance["app"]["type"] == "app"
    assert "QEMU" in appliance["app"]["description"]
    vm = appliance["vm"]
    assert vm["seedDirectory"] == vm["share"]["target"] == "/mnt/keel-seed"
    # The runner exports KEEL_SEED_DIR (pkgs/keel-vm.nix); the share reads it.
    assert "${KEEL_SEED_DIR:-" in vm["share"]["source"]
    assert 'export KEEL_SEED_DIR="$seed"' in (REPO / "pkgs" / "keel-vm.nix").read_text()
    assert vm["systemName"] == "keel"


# --- every nixpkgs attribute keel uses, checked against nixpkgs itself ---------

NIX_SOURCES = ["flake.nix", "modules", "hosts", "vm-tests", "templates", "pkgs"]
# What every pkgs has (lib, the package-set machinery), not packages.
PKGS_MACHINERY = {"lib", "callPackage", "python3Packages", "path", "stdenv", "system"}
# Names keel's Nix writes as pkgs.NAME that are no nixpkgs attributes, by design.
NOT_NIXPKGS = {
    "keel",  # `pkgs.keel or (callPackage ../pkgs/keel.nix)`: the flake's overlay adds it
    "my-agent",  # placeholders in options' examples (modules/agents.nix)
    "my-scout",
}


def used_package_attributes(nix_instantiate: str) -> dict[str, set[str]]:
    """The attribute paths of pkgs and of python3Packages that keel's Nix uses.

    Read from keel's own files, not listed by hand: the arguments of the
    callPackage'd files of pkgs/ (functionArgs, each scope apart) and every
    ``pkgs.NAME`` / ``pkgs.NAME.SUB`` in the flake, modules, hosts, VM tests
    and templates.
    """
    top: set[str] = set()
    for path in [REPO / "flake.nix"] + [
        p for d in NIX_SOURCES[1:] for p in (REPO / d).rglob("*.nix")
    ]:
        text = path.read_text()
        for match in re.finditer(
            r"(?:\bpkgs|\(pkgsFor system\))\.([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)?)", text
        ):
            top.add(match.group(1))
    python: set[str] = set()
    python_files = ["pkgs/keel.nix", "pkgs/kyber-py.nix"]
    # keel's Python package set (pkgs/python): each package's arguments come
    # from that set, so the packages it defines itself need not be in nixpkgs.
    python_files += [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "pkgs" / "python").glob("*.nix"))
        if p.name not in {"default.nix", "overrides.nix"}
    ]
    for name in python_files:
        args = nix_eval_expr(nix_instantiate, f"builtins.functionArgs (import ./{name})")
        # an argument with a default (`liboqs-python ? null`) is optional: used if there
        python |= {a for a, optional in args.items() if not optional} - {"lib", "callPackage"}
    python -= set(
        nix_eval_expr(
            nix_instantiate, "builtins.attrNames (import ./pkgs/python/overrides.nix { } { })"
        )
    )
    for name in ("keel-vm.nix", "python/default.nix"):
        args = nix_eval_expr(nix_instantiate, f"builtins.functionArgs (import ./pkgs/{name})")
        top |= set(args) - {"lib", "vm"}
    # pkgs.python3Packages.X in modules count as python packages.
    python |= {p.split(".", 1)[1] for p in top if p.startswith("python3Packages.")}
    python -= PKGS_MACHINERY
    top = {p for p in top if p.split(".")[0] not in PKGS_MACHINERY | NOT_NIXPKGS}
    return {"pkgs": top, "python3Packages": python}


def _defines(path: Path, attribute: str) -> bool:
    """Whether the Nix file at ``path`` binds ``attribute`` (at any indentation: nixfmt's or not)."""
    return path.is_file() and (
        re.search(rf"^\s+{re.escape(attribute)} =", path.read_text(), re.M) is not None
    )


def _inherits(path: Path, attribute: str) -> bool:
    """Whether the Nix file at ``path`` has ``attribute`` in an ``inherit`` (nixfmt splits them)."""
    if not path.is_file():
        return False
    return any(
        attribute in match.group(1).split()
        for match in re.finditer(r"\binherit\b(?:\s*\([^)]*\))?([^;]*);", path.read_text())
    )


def tree_has(tree: Path, scope: str, attribute: str) -> bool | None:
    """Whether the nixpkgs tree has ``attribute``; None when this tree cannot tell.

    Looks where nixpkgs defines it: pkgs/by-name, pkgs/top-level, the
    python-modules directory, the testers and trivial builders, at any
    indentation (nixfmt's or the older style). A trimmed tree (some
    nixpkgs-slim snapshots lack pkgs/top-level and most of pkgs/development)
    answers for what it holds only.
    """
    pkgs = tree / "pkgs"
    if scope == "python3Packages":
        if (pkgs / "development/python-modules" / attribute).is_dir():
            return True
        listings = [
            pkgs / "top-level/python-packages.nix",
            pkgs / "development/interpreters/python/python-packages-base.nix",
        ]
        if not listings[0].is_file():
            return None
        if any(_defines(path, attribute) for path in listings):
            return True
        # what the interpreter passes on (pythonOlder...)
        if _inherits(listings[1], attribute):
            return True
        # the python scope's callPackage sees pkgs too (fetchPypi, for one)
        return tree_has(tree, "pkgs", attribute)
    head, _, sub = attribute.partition(".")
    if head == "testers":
        testers = (pkgs / "build-support/testers/default.nix").read_text()
        return re.search(rf"^  {re.escape(sub)} =", testers, re.M) is not None
    if (pkgs / "by-name" / head[:2] / head / "package.nix").is_file():
        return True
    for name in ("top-level/all-packages.nix", "top-level/aliases.nix", "pkgs-lib/default.nix"):
        if _defines(pkgs / name, head):
            return True
    trivial = pkgs / "build-support/trivial-builders/default.nix"
    if trivial.is_file() and re.search(rf"^  {re.escape(head)} =", trivial.read_text(), re.M):
        return True
    if (pkgs / "top-level/all-packages.nix").is_file():
        return False
    return None


def test_the_attributes_keel_uses_are_found(nix_instantiate: str) -> None:
    used = used_package_attributes(nix_instantiate)
    # What keel's Nix is known to use: the collection itself must see them.
    assert {"testers.runNixOSTest", "python3", "jq", "writeShellApplication"} <= used["pkgs"]
    assert {"cryptography", "jeepney", "systemd-python", "hatchling"} <= used["python3Packages"]
    # pkgs/python's packages' own dependencies and build systems
    assert {"pydantic", "uv-dynamic-versioning", "flit-core", "h11"} <= used["python3Packages"]
    # what pkgs/python defines is not looked for in nixpkgs (mcp-types is not there)
    assert "mcp-types" not in used["python3Packages"]
    # liboqs-python, the fallback KEM backend, is optional (`liboqs-python ? null`)
    assert "liboqs-python" not in used["python3Packages"]


def test_package_attributes_exist_in_the_nixpkgs_tree(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    used = used_package_attributes(nix_instantiate)
    verdicts = {
        (scope, name): tree_has(nixpkgs_tree, scope, name)
        for scope, names in used.items()
        for name in sorted(names)
    }
    missing = [f"{scope}.{name}" for (scope, name), found in verdicts.items() if found is False]
    assert not missing, f"not in {nixpkgs_tree}: {missing}"
    found = {f"{scope}.{name}" for (scope, name), ok in verdicts.items() if ok}
    # What the trimmed tree of the development machine answers for (its
    # pkgs/by-name, testers and trivial builders); the rest is checked
    # against the locked nixpkgs below, where Nix can fetch it.
    assert {"pkgs.testers.runNixOSTest", "pkgs.jq", "pkgs.nixfmt-tree"} <= found, found


def test_package_attributes_exist_in_the_locked_nixpkgs(nix_instantiate: str) -> None:
    nix_build_or_skip()
    used = used_package_attributes(nix_instantiate)
    paths = [name.split(".") for name in sorted(used["pkgs"])]
    paths += [["python3Packages", name] for name in sorted(used["python3Packages"])]
    expression = (
        f'let flake = builtins.getFlake "git+file://{REPO}"; '
        "pkgs = flake.inputs.nixpkgs.legacyPackages.x86_64-linux; "
        f"in map (p: pkgs.lib.hasAttrByPath p pkgs) (builtins.fromJSON ''{json.dumps(paths)}'')"
    )
    proc = run_nix("eval", "--json", "--impure", "--expr", expression, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = [".".join(p) for p, ok in zip(paths, json.loads(proc.stdout), strict=True) if not ok]
    assert not missing, f"not in the locked nixpkgs: {missing}"


def test_what_nix_2_8_cannot_evaluate_is_read_from_the_tree(nixpkgs_tree: Path) -> None:
    # misc/nixpkgs.nix (nixpkgs.hostPlatform, which the flake sets) imports
    # nixpkgs' default.nix, which needs Nix >= 2.18; qemu-vm.nix (the VM of
    # `nix run .#vm`) needs builtins.addDrvOutputDependencies (Nix >= 2.18).
    modules = nixpkgs_tree / "nixos" / "modules"
    nixpkgs_module = (modules / "misc/nixpkgs.nix").read_text()
    assert re.search(r"^\s+hostPlatform = (lib\.)?mkOption", nixpkgs_module, re.M)
    qemu_vm = (modules / "virtualisation/qemu-vm.nix").read_text()
    # The runner forwards SSH through QEMU_NET_OPTS and runs run-<name>-vm.
    assert '\\"$QEMU_NET_OPTS\\"' in qemu_vm
    assert 'meta.mainProgram = "run-${config.system.name}-vm";' in qemu_vm
    assert "NIX_DISK_IMAGE" in qemu_vm


def test_liboqs_python_is_optional(nix_instantiate: str, nixpkgs_lib: Path) -> None:
    # A nixpkgs without liboqs-python still builds keel (ML-KEM from
    # cryptography alone); with it, keel depends on it.
    deps = nix_eval_expr(
        nix_instantiate,
        f"""
        let
          lib = import {nix_string(nixpkgs_lib)};
          pkgs = import {nix_string(HERE / "stub-pkgs.nix")} {{ inherit lib; }};
          without = removeAttrs pkgs.python3Packages [ "liboqs-python" ];
          keel = scope: (scope.callPackage ./pkgs/keel.nix {{ }}).dependencies;
        in {{
          present = map (p: p.pname) (keel pkgs.python3Packages);
          absent = map (p: p.pname) (keel (without // {{
            callPackage = fn: args: (import ./pkgs/keel.nix) (
              builtins.intersectAttrs (builtins.functionArgs (import ./pkgs/keel.nix)) (without // {{ inherit lib; }})
              // args);
          }}));
        }}
        """,
    )
    assert deps["present"] == [
        "cryptography", "jeepney", "mcp", "dnspython", "idna", "systemd-python", "liboqs-python",
    ]  # fmt: skip
    assert deps["absent"] == [
        "cryptography",
        "jeepney",
        "mcp",
        "dnspython",
        "idna",
        "systemd-python",
    ]


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


def evaluate_template(nix_instantiate: str, nixpkgs_tree: Path, *, with_key: bool) -> Any:
    return nix_eval_file(
        nix_instantiate,
        HERE / "eval-template.nix",
        args={
            "repo": Path(nix_string(REPO)),
            "nixpkgs": Path(nix_string(nixpkgs_tree)),
            "withKey": "true" if with_key else "false",
        },
        timeout=300,
    )


# NixOS quotes the option name with typographic quotes.
GRUB_DEVICES = "You must set the option \u2018boot.loader.grub.devices\u2019"


def test_the_template_host_needs_only_its_key_and_disko(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    # templates/appliance as `nix flake init` gives it: keel's modules and
    # appliance host, the operator's own part, a disko layout.
    fresh = evaluate_template(nix_instantiate, nixpkgs_tree, with_key=False)
    assert fresh["inputs"] == ["disko", "keel", "nixpkgs"]
    assert fresh["followsNixpkgs"] == {"disko": "nixpkgs", "keel": "nixpkgs"}
    assert fresh["platform"] == SYSTEM
    # Without the operator's key it refuses to build, saying so.
    assert any("put your SSH public key" in m for m in fresh["failedAssertions"])
    keyed = evaluate_template(nix_instantiate, nixpkgs_tree, with_key=True)
    # What remains is what disko's module provides (for an EF02 partition
    # it sets boot.loader.grub.devices; the stand-in here does not).
    (remaining,) = keyed["failedAssertions"]
    assert remaining.startswith(GRUB_DEVICES), remaining
    assert keyed["partitions"] == {"boot": "EF02", "ESP": "EF00", "root": None}
    assert keyed["grub"] == {"enable": True, "efiSupport": True, "efiInstallAsRemovable": True}
    assert keyed["systemdBoot"] is False
    assert {"keel-mesh", "keel-watch", "keel-agent-hello"} <= set(keyed["keelServices"])


def test_the_template_follows_the_pinned_nixos_release(nix_instantiate: str) -> None:
    inputs = nix_eval_expr(nix_instantiate, "(import ./templates/appliance/flake.nix).inputs")
    assert inputs["nixpkgs"]["url"] == nix_eval_expr(
        nix_instantiate, "(import ./flake.nix).inputs.nixpkgs.url"
    )


def test_the_ci_workflow_runs_flake_check_with_kvm() -> None:
    workflow = (REPO / ".github" / "workflows" / "nix.yml").read_text()
    steps = [line.strip() for line in workflow.splitlines()]
    assert "runs-on: ubuntu-latest" in steps
    assert any(s.startswith("uses: cachix/install-nix-action@v") for s in steps)
    assert "run: nix flake check -L --show-trace" in steps
    assert "run: test -c /dev/kvm && test -w /dev/kvm" in steps
    assert any("system-features" in s and "kvm" in s and "nixos-test" in s for s in steps)
    # Tabs are not YAML indentation.
    assert "\t" not in workflow


def test_the_docs_walk_through_the_three_ways() -> None:
    install = (REPO / "docs" / "install.md").read_text()
    for needle in (
        "nix build github:OWNER/keel#image-raw-efi",
        "nix flake init -t github:OWNER/keel#appliance",
        "nixos-anywhere -- --flake .#appliance root@SERVER",
        "keel.nixosModules.default",
        "ssh root@SERVER keel status",
        "nix run github:OWNER/keel#vm",
        "keel-seed/authorized_keys",
    ):
        assert needle in install, needle
    assert "docs/install.md" in (REPO / "README.md").read_text()
