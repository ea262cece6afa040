"""Tier 4 fixtures: ``nix_instantiate``, ``nixpkgs_lib`` and ``nixpkgs_tree``.

Each skips with its reason when what it needs is missing (docs/nix.md,
"Running tier 4"): ``nix-instantiate`` from Debian's nix-bin; ``NIXPKGS_LIB``,
a checkout of nixpkgs' lib (or the lib of ``KEEL_NIXPKGS``); ``KEEL_NIXPKGS``,
a nixpkgs tree whose NixOS modules keel's modules are evaluated against.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.nix.nixeval import nix_instantiate_path, resolve_nixpkgs_lib, resolve_nixpkgs_tree

TREE_NEEDED = (
    "KEEL_NIXPKGS is not set: the module tests evaluate keel's modules against the real "
    "NixOS option declarations of a nixpkgs tree (docs/nix.md, 'Running tier 4')"
)


@pytest.fixture(scope="session")
def nix_instantiate() -> str:
    path = nix_instantiate_path()
    if path is None:
        pytest.skip(
            "nix-instantiate not found (Debian's nix-bin provides it; `make test` installs it)"
        )
    return path


@pytest.fixture(scope="session")
def nixpkgs_tree() -> Path:
    value = os.environ.get("KEEL_NIXPKGS")
    if not value:
        pytest.skip(TREE_NEEDED)
    tree = resolve_nixpkgs_tree(value)
    if tree is None:
        pytest.fail(
            f"KEEL_NIXPKGS={value} is not a nixpkgs tree (it needs lib/, nixos/modules, "
            "nixos/lib and pkgs/pkgs-lib)"
        )
    return tree


@pytest.fixture(scope="session")
def nixpkgs_lib() -> Path:
    value = os.environ.get("NIXPKGS_LIB") or os.environ.get("KEEL_NIXPKGS")
    if not value:
        pytest.skip(
            "neither NIXPKGS_LIB nor KEEL_NIXPKGS is set: evaluating the flake needs nixpkgs' "
            "lib (github:nix-community/nixpkgs.lib, or a nixpkgs tree)"
        )
    lib = resolve_nixpkgs_lib(value)
    if lib is None:
        pytest.fail(f"{value} holds no nixpkgs lib (no lib/default.nix, lib/modules.nix)")
    return lib
