"""Tier 4 fixtures: ``nix_instantiate`` and ``nixpkgs_lib`` skip with their reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.nix.nixeval import nix_instantiate_path, resolve_nixpkgs_lib


@pytest.fixture(scope="session")
def nix_instantiate() -> str:
    path = nix_instantiate_path()
    if path is None:
        pytest.skip(
            "nix-instantiate not found (Debian's nix-bin provides it; `make test` installs it)"
        )
    return path


@pytest.fixture(scope="session")
def nixpkgs_lib() -> Path:
    value = os.environ.get("NIXPKGS_LIB")
    if not value:
        pytest.skip(
            "NIXPKGS_LIB is not set: module evaluation needs a checkout of nixpkgs' lib "
            "(github:nix-community/nixpkgs.lib or nixpkgs itself)"
        )
    lib = resolve_nixpkgs_lib(value)
    if lib is None:
        pytest.fail(
            f"NIXPKGS_LIB={value} holds no nixpkgs lib (no lib/default.nix, lib/modules.nix)"
        )
    return lib
