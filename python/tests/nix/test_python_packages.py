"""keel's Python package set (pkgs/python): the MCP SDK 2.x on the pinned nixpkgs.

nixpkgs' python3Packages.mcp is the 1.x series; keel mcp needs 2.x. pkgs/python
packages the SDK and what it needs that nixpkgs lacks or has too old, and
applies them as the python3's ``packageOverrides`` (docs/nix.md, "The MCP SDK
packages"). Checked here without the network:

- each pin equals what pip installed for keel in the venv, and satisfies
  python/pyproject.toml and the other pins' requirements;
- with nixpkgs' lib: the package set as Nix evaluates it (against the stand-in
  pkgs), each package's ``dependencies`` exactly its requirements on Linux, and
  keel's closure holding one version of each package;
- with a nixpkgs tree: every requirement the pins leave to nixpkgs is met by
  the tree's version.
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO
from tests.nix.nixeval import HERE, nix_eval_expr, nix_string

PKGS_PYTHON = REPO / "pkgs" / "python"
NOT_PACKAGES = {"default.nix", "overrides.nix"}
UPDATE = "docs/nix.md, 'The MCP SDK packages', says how to update a pin"
# Where the Nix package runs: Linux, CPython, nixpkgs' python3 (3.13 on
# nixos-26.05 and in the mid-2026 tree; test_the_tree_python_is_the_one_assumed).
PYTHON_VERSION = "3.13"
MARKER_ENV = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "platform_python_implementation": "CPython",
    "implementation_name": "cpython",
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.0",
}


def nix_string_value(text: str, name: str) -> list[str]:
    return re.findall(rf'^\s*{re.escape(name)} = "([^"]*)";', text, re.M)


@functools.cache
def pins() -> dict[str, dict[str, str]]:
    """Per package file of pkgs/python: its pname, version, sdist name and hash, as written."""
    found: dict[str, dict[str, str]] = {}
    for path in sorted(PKGS_PYTHON.glob("*.nix")):
        if path.name in NOT_PACKAGES:
            continue
        text = path.read_text()
        pnames, versions = nix_string_value(text, "pname"), nix_string_value(text, "version")
        hashes = nix_string_value(text, "hash")
        assert len(versions) == 1, f"{path.name}: one `version = ...;` expected"
        assert len(hashes) == 1, f"{path.name}: one `hash = ...;` expected"
        # `pname` of the package, then (fetchPypi) of the sdist when it differs
        assert 1 <= len(pnames) <= 2, f"{path.name}: {pnames}"
        sdist = pnames[-1]
        found[path.stem] = {
            "pname": pnames[0],
            "version": versions[0],
            "src": f"{sdist}-{versions[0]}.tar.gz",
            "hash": hashes[0],
        }
    return found


def markers_hold(requirement: Requirement, extra: str = "") -> bool:
    return requirement.marker is None or requirement.marker.evaluate({**MARKER_ENV, "extra": extra})


def runtime_requirements(distribution: str) -> list[Requirement]:
    """A distribution's requirements on the Nix package's platform, without extras."""
    return [
        requirement
        for text in importlib.metadata.requires(distribution) or []
        if markers_hold(requirement := Requirement(text))
    ]


def extra_requirements(requirement: Requirement) -> list[Requirement]:
    """What the extras of ``requirement`` add (``pyjwt[crypto]``: cryptography)."""
    return [
        extra_requirement
        for text in importlib.metadata.requires(requirement.name) or []
        for extra in sorted(requirement.extras)
        if markers_hold(extra_requirement := Requirement(text), extra)
        and not markers_hold(extra_requirement)
    ]


def with_extras(requirements: list[Requirement]) -> list[Requirement]:
    return requirements + [e for r in requirements for e in extra_requirements(r)]


def keel_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "python" / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def requirements_on_pins() -> list[tuple[str, Requirement]]:
    """(who requires, requirement) for every requirement naming a pinned package."""
    pinned = {canonicalize_name(pin["pname"]) for pin in pins().values()}
    found = [("python/pyproject.toml", r) for r in keel_requirements()]
    for pin in pins().values():
        found += [(pin["pname"], r) for r in runtime_requirements(pin["pname"])]
    return [(who, r) for who, r in found if canonicalize_name(r.name) in pinned]


def test_every_package_file_is_an_override() -> None:
    overrides = (PKGS_PYTHON / "overrides.nix").read_text()
    wired = dict(
        re.findall(r"^\s+([\w-]+) = final\.callPackage \./([\w-]+)\.nix \{ \};", overrides, re.M)
    )
    assert set(wired.values()) == set(pins()), "pkgs/python/overrides.nix and the files differ"
    for attribute, stem in wired.items():
        # the attribute is nixpkgs' name for the package: its PyPI name
        assert attribute == stem == canonicalize_name(pins()[stem]["pname"])
    assert {"mcp", "mcp-types"} <= set(wired)


def test_pins_match_what_pip_installed_for_keel() -> None:
    # The venv is keel's (`make venv`): pip resolved python/pyproject.toml.
    assert any(
        canonicalize_name(Requirement(r).name) == "mcp"
        for r in importlib.metadata.requires("keel") or []
    )
    for stem, pin in pins().items():
        installed = importlib.metadata.version(pin["pname"])
        assert installed == pin["version"], (
            f"pkgs/python/{stem}.nix pins {pin['pname']} {pin['version']}, "
            f"pip installed {installed} for keel; {UPDATE}"
        )


def test_pins_satisfy_every_requirement_on_them() -> None:
    found = requirements_on_pins()
    by_name = {canonicalize_name(pin["pname"]): pin for pin in pins().values()}
    for who, requirement in found:
        version = by_name[canonicalize_name(requirement.name)]["version"]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{who} requires {requirement}, pkgs/python pins {version}; {UPDATE}"
        )
    # Every pin is there because keel or another pin needs it.
    required = {canonicalize_name(r.name) for _, r in found}
    assert set(by_name) <= required, f"pinned but required by nothing: {set(by_name) - required}"


def test_pins_fetch_pypi_sdists_by_sha256() -> None:
    for stem, pin in pins().items():
        algorithm, _, digest = pin["hash"].partition("-")
        assert algorithm == "sha256", stem
        assert len(base64.b64decode(digest, validate=True)) == 32, stem
        # PyPI names an sdist after the normalised project name (PEP 625).
        assert (
            pin["src"]
            == f"{canonicalize_name(pin['pname']).replace('-', '_')}-{pin['version']}.tar.gz"
        )
    assert len({pin["hash"] for pin in pins().values()}) == len(pins())


# --- with nixpkgs' lib: the package set as Nix evaluates it ----------------------


@pytest.fixture(scope="module")
def package_set(nix_instantiate: str, nixpkgs_lib: Path) -> dict[str, Any]:
    summary: dict[str, Any] = nix_eval_expr(
        nix_instantiate,
        f"import {HERE / 'eval-python.nix'} {{ repo = {nix_string(REPO)}; "
        f"nixpkgsLib = {nix_string(nixpkgs_lib)}; }}",
    )
    return summary


def test_nix_evaluates_the_pins_as_written(package_set: dict[str, Any]) -> None:
    assert sorted(package_set["defined"]) == sorted(pins())
    for stem, pin in pins().items():
        package = package_set["packages"][stem]
        assert (package["pname"], package["version"]) == (pin["pname"], pin["version"])
        assert (package["src"], package["hash"]) == (pin["src"], pin["hash"])
        assert package["pythonImportsCheck"], stem
        assert package["build-system"], stem


def test_dependencies_are_the_requirements_on_linux(package_set: dict[str, Any]) -> None:
    # What buildPythonPackage's runtime-deps check holds a wheel to: every
    # requirement (on Linux, nixpkgs' python3) among `dependencies`, by name.
    for stem, pin in pins().items():
        wanted = {
            canonicalize_name(r.name) for r in with_extras(runtime_requirements(pin["pname"]))
        }
        assert set(package_set["packages"][stem]["dependencies"]) == wanted, stem


def test_uv_dynamic_versioning_packages_relax_only_its_floor(package_set: dict[str, Any]) -> None:
    for stem in ("httpx2", "httpcore2"):
        package = package_set["packages"][stem]
        assert "uv-dynamic-versioning" in package["build-system"]
        assert (
            "'\"uv-dynamic-versioning>=0.14.1\"' '\"uv-dynamic-versioning\"'"
            in package["postPatch"]
        )


def test_keel_takes_one_version_of_each_package(package_set: dict[str, Any]) -> None:
    for name in ("flakeClosure", "overlayClosure"):
        closure = package_set[name]
        versions: dict[str, set[str]] = {}
        for package in closure:
            versions.setdefault(package["pname"], set()).add(package["version"])
        # catchConflictsHook refuses two versions of one package in a closure
        assert {p: v for p, v in versions.items() if len(v) > 1} == {}, name
        pinned = {pin["pname"]: {pin["version"]} for pin in pins().values()}
        assert {p: versions.get(p) for p in pinned} == pinned, name
    assert package_set["overlayClosure"] == package_set["flakeClosure"]


def test_the_rest_of_nixpkgs_keeps_its_own(package_set: dict[str, Any]) -> None:
    # pkgs.python3Packages is untouched (the stand-in's own markers) ...
    assert package_set["nixpkgsMcp"] == package_set["nixpkgsIdna"] == "0"
    # ... and a host's own packageOverrides stay, composed with keel's.
    assert package_set["hostKeeps"] == {"jeepney": "from-host", "mcp": pins()["mcp"]["version"]}


# --- with a nixpkgs tree: what the pins leave to nixpkgs --------------------------


def tree_version(tree: Path, attribute: str) -> str | None:
    path = tree / "pkgs" / "development" / "python-modules" / attribute / "default.nix"
    if not path.is_file():
        return None
    versions = nix_string_value(path.read_text(), "version")
    return versions[0] if versions else None


def test_the_tree_python_is_the_one_assumed(nixpkgs_tree: Path) -> None:
    packages = nixpkgs_tree / "pkgs" / "top-level" / "all-packages.nix"
    if not packages.is_file():
        pytest.skip(f"{nixpkgs_tree} has no pkgs/top-level/all-packages.nix")
    match = re.search(r"^\s+python3 = python3(\d+);", packages.read_text(), re.M)
    assert match, "python3 = python3XX; not found"
    assert f"3.{match.group(1)}" == PYTHON_VERSION


def test_the_tree_meets_what_the_pins_leave_to_nixpkgs(nixpkgs_tree: Path) -> None:
    # The tree is newer than the pinned nixos-26.05: a version too old here is
    # too old there (docs/nix.md says which versions 26.05 is taken to have).
    pinned = {canonicalize_name(pin["pname"]) for pin in pins().values()}
    checked: dict[str, str] = {}
    for pin in pins().values():
        for need in with_extras(runtime_requirements(pin["pname"])):
            name = canonicalize_name(need.name)
            if name in pinned:
                continue
            version = tree_version(nixpkgs_tree, name)
            assert version is not None, f"{name} ({pin['pname']} needs {need}) not in the tree"
            assert need.specifier.contains(Version(version), prereleases=True), (
                f"{pin['pname']} needs {need}; the tree has {name} {version}"
            )
            checked[name] = version
    assert {"pydantic", "starlette", "uvicorn", "anyio", "truststore", "h11"} <= set(checked)


def test_the_tree_lacks_or_has_too_old_what_is_pinned(nixpkgs_tree: Path) -> None:
    # Why each pin exists, on the tree: absent, or older than a requirement.
    # (A newer tree meeting one would not mean 26.05 does, so the pin stays.)
    needs: dict[str, list[Requirement]] = {}
    for _, requirement in requirements_on_pins():
        needs.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    reasons = {}
    for name, requirements in needs.items():
        version = tree_version(nixpkgs_tree, name)
        unmet = [str(r) for r in requirements if version and not r.specifier.contains(version)]
        reasons[name] = "absent" if version is None else (f"{version}: {unmet}" if unmet else "met")
    assert reasons["mcp-types"] == "absent", reasons
    for name in ("mcp", "httpx2", "httpcore2", "idna"):
        assert reasons[name] != "met", (
            f"this tree meets every requirement on {name}: if the locked nixpkgs has that "
            f"version too, pkgs/python/{name}.nix can go ({reasons})"
        )
