"""The Nix paths: generations added by real ``nix-env``, systems built by real ``nix build``.

Nix runs against a private store and state directory of the test
(``NIX_STORE_DIR``, ``NIX_STATE_DIR``...), so nothing of the host's own
``/nix`` is touched and no network is needed: the flake has no inputs and its
one derivation is built locally with ``/bin/sh``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.safeswitch.lab import KEEL, Lab

pytestmark = pytest.mark.skipif(
    shutil.which("nix-env") is None or shutil.which("nix-store") is None,
    reason="nix-env not found (Debian's nix-bin provides it; `make test` installs it)",
)


class NixLab(Lab):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        nix = root / "nix"
        (nix / "etc").mkdir(parents=True, exist_ok=True)
        (nix / "etc" / "nix.conf").write_text(
            "build-users-group =\nsandbox = false\nsubstituters =\n"
        )
        self.env = dict(
            os.environ,
            NIX_STORE_DIR=str(nix / "store"),
            NIX_STATE_DIR=str(nix / "var"),
            NIX_LOG_DIR=str(nix / "log"),
            NIX_CONF_DIR=str(nix / "etc"),
        )
        self.staging = root / "staging"

    def nix(self, *argv: str) -> str:
        result = subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=300, check=False
        )
        if result.returncode != 0:
            pytest.fail(f"{' '.join(argv)}: {result.stderr}")
        return result.stdout.strip()

    def store_system(self, name: str, behaviour: str = "ok") -> Path:
        staged = self.system(name, behaviour, where=self.staging)
        return Path(self.nix("nix-store", "--add", str(staged)))

    def boot_nix(self, system: Path) -> None:
        self.nix("nix-env", "--profile", str(self.profile), "--set", str(system))
        self.current.symlink_to(system)
        (self.root / "health").write_text("ok\n")

    def keel(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*KEEL, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip


@pytest.fixture
def lab(tmp_path: Path) -> NixLab:
    lab = NixLab(tmp_path / "lab")
    lab.boot_nix(lab.store_system("gen-a"))
    lab.config(gate=0.5)
    return lab


def generations(lab: NixLab) -> list[str]:
    listed = lab.nix("nix-env", "--profile", str(lab.profile), "--list-generations")
    return [line.split()[0] for line in listed.splitlines()]


def test_a_commit_adds_the_generation_with_nix_env(lab: NixLab) -> None:
    new = lab.store_system("gen-b")
    assert str(new).startswith(lab.env["NIX_STORE_DIR"])
    result = lab.switch(new)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.readlink(lab.profile) == "system-2-link"
    assert lab.profile_system() == str(new)
    assert generations(lab) == ["1", "2"]  # Nix itself lists the generation keel added
    assert lab.boot_default() == str(new)


def test_a_failed_commit_removes_the_generation_nix_env_made(lab: NixLab) -> None:
    result = lab.switch(lab.store_system("gen-b", "fail-boot"))
    assert result.returncode == 1
    assert os.readlink(lab.profile) == "system-1-link"
    assert generations(lab) == ["1"]
    assert lab.calls() == ["test gen-b", "boot gen-b", "test gen-a", "boot gen-a"]


FLAKE = """{
  outputs = { self }: {
    nixosConfigurations.box.config.system.build.toplevel = derivation {
      name = "nixos-system-box";
      system = "%s";
      builder = "/bin/sh";
      args = [ "-c" "/bin/mkdir -p $out/bin && /bin/cp ${./switch-to-configuration} $out/bin/switch-to-configuration && /bin/chmod 755 $out/bin/switch-to-configuration" ];
    };
  };
}
"""


def make_flake(lab: NixLab) -> Path:
    flake = lab.root / "flake"
    flake.mkdir()
    staged = lab.system("box", where=lab.staging)
    shutil.copy(staged / "bin" / "switch-to-configuration", flake / "switch-to-configuration")
    (flake / "flake.nix").write_text(FLAKE % f"{platform.machine()}-linux")
    return flake


def test_rebuild_builds_shows_the_change_and_switches(lab: NixLab) -> None:
    flake = make_flake(lab)
    result = lab.keel(
        "rebuild", "switch", "--flake", f"path:{flake}#box", "--config", str(lab.config_path),
        "--json",
    )  # fmt: skip
    if "error: experimental" in result.stderr or "not supported" in result.stderr:
        pytest.skip(f"this nix cannot build flakes: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "committed"
    assert report["new"].startswith(lab.env["NIX_STORE_DIR"])
    assert report["new"].endswith("-nixos-system-box")
    progress = result.stderr
    assert 'nixosConfigurations."box".config.system.build.toplevel' in progress
    assert "would restart the following units: keel-agent-box.service" in progress
    assert lab.calls() == ["dry-activate box", "test box", "boot box"]
    assert generations(lab) == ["1", "2"]


def test_rebuild_dry_run_changes_nothing(lab: NixLab) -> None:
    flake = make_flake(lab)
    result = lab.keel(
        "rebuild", "dry-run", "--flake", f"path:{flake}#box", "--config", str(lab.config_path)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would restart the following units" in result.stdout
    assert lab.calls() == ["dry-activate box"]
    assert generations(lab) == ["1"]


def test_rebuild_of_a_host_the_flake_lacks_is_refused(lab: NixLab) -> None:
    flake = make_flake(lab)
    result = lab.keel(
        "rebuild", "switch", "--flake", f"path:{flake}#nohost", "--config", str(lab.config_path)
    )
    assert result.returncode == 2
    assert "refused, nothing changed: nix build of path:" in result.stdout
    assert "nohost" in result.stdout
    assert lab.calls() == []
    bad = lab.keel("rebuild", "switch", "--flake", "path:/x#no/slash")
    assert bad.returncode == 2
    assert "is not a host name" in bad.stderr
