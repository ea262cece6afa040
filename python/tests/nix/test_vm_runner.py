"""pkgs/keel-vm.nix, the `nix run .#vm` runner, run for real around a stand-in VM.

The runner's script is evaluated from pkgs/keel-vm.nix (with nixpkgs' lib)
and run by bash as writeShellApplication runs it (errexit, nounset,
pipefail); the VM it starts is a script that writes down its environment
and arguments, where QEMU would boot.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.nix.nixeval import HERE, nix_eval_expr, nix_string

VM_SCRIPT = """#!/bin/sh
env > "$(dirname "$0")/../env.txt"
printf '%s\\n' "$@" > "$(dirname "$0")/../args.txt"
"""


@pytest.fixture
def runner(nix_instantiate: str, nixpkgs_lib: Path, tmp_path: Path) -> Path:
    vm = tmp_path / "vm"
    (vm / "bin").mkdir(parents=True)
    (vm / "bin" / "run-keel-vm").write_text(VM_SCRIPT)
    (vm / "bin" / "run-keel-vm").chmod(0o755)
    script = nix_eval_expr(
        nix_instantiate,
        f"""
        let
          lib = import {nix_string(nixpkgs_lib)};
          pkgs = import {nix_string(HERE / "stub-pkgs.nix")} {{ inherit lib; }};
          vm = {{ type = "derivation"; name = "nixos-vm"; outPath = "{vm}"; meta.mainProgram = "run-keel-vm"; }};
          runner = pkgs.callPackage ./pkgs/keel-vm.nix {{ inherit vm; coreutils = pkgs.coreutils; }};
        in {{ inherit (runner) name; text = runner.keelScript; description = runner.meta.description or ""; }}
        """,
    )
    assert script["name"] == "keel-vm"
    path = tmp_path / "keel-vm"
    path.write_text("#!/bin/bash\nset -o errexit -o nounset -o pipefail\n" + script["text"])
    path.chmod(0o755)
    return path


def run(
    runner: Path, home: Path, **env: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, str], list[str]]:
    base = {"PATH": os.environ["PATH"], "HOME": str(home)}
    proc = subprocess.run(
        [str(runner), "-nographic-extra"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    vm = runner.parent / "vm"
    if not (vm / "env.txt").exists():
        return proc, {}, []
    seen = dict(
        line.split("=", 1) for line in (vm / "env.txt").read_text().splitlines() if "=" in line
    )
    return proc, seen, (vm / "args.txt").read_text().splitlines()


def test_the_vm_gets_the_key_the_port_and_a_kept_disk(runner: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ecdsa.pub").write_text("ecdsa-sha2-nistp256 AAAA me\n")
    (home / ".ssh" / "id_rsa.pub").write_text("ssh-rsa AAAA other\n")
    proc, env, args = run(runner, home, KEEL_MESH_INVITE="keelinv1.token")
    assert proc.returncode == 0, proc.stderr
    state = home / ".local" / "state" / "keel-vm"
    seed = Path(env["KEEL_SEED_DIR"])
    assert seed == state / "seed"
    # The first key that exists, and the invite, for the first-boot seed.
    assert (seed / "authorized_keys").read_text() == "ecdsa-sha2-nistp256 AAAA me\n"
    assert (seed / "mesh-invite").read_text() == "keelinv1.token\n"
    assert env["NIX_DISK_IMAGE"] == str(state / "keel.qcow2")
    assert env["QEMU_NET_OPTS"] == "hostfwd=tcp:127.0.0.1:2222-:22"
    assert args == ["-nographic-extra"]
    assert "ssh -p 2222 root@127.0.0.1" in proc.stderr


def test_the_operator_chooses_key_port_and_more_qemu_options(runner: Path, tmp_path: Path) -> None:
    key = tmp_path / "ops.pub"
    key.write_text("ssh-ed25519 AAAA ops\n")
    proc, env, _ = run(
        runner,
        tmp_path / "home",
        KEEL_SSH_KEY=str(key),
        KEEL_SSH_PORT="2200",
        KEEL_SEED_DIR=str(tmp_path / "myseed"),
        QEMU_NET_OPTS="hostfwd=tcp:127.0.0.1:7400-:7400",
    )
    assert proc.returncode == 0, proc.stderr
    assert env["QEMU_NET_OPTS"] == "hostfwd=tcp:127.0.0.1:2200-:22,hostfwd=tcp:127.0.0.1:7400-:7400"
    assert (tmp_path / "myseed" / "authorized_keys").read_text() == "ssh-ed25519 AAAA ops\n"
    assert not (tmp_path / "myseed" / "mesh-invite").exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KEEL_SSH_PORT": "22x"}, "keel-vm: KEEL_SSH_PORT must be a port number, got '22x'"),
        (
            {"KEEL_SSH_KEY": "/nonexistent.pub"},
            "keel-vm: KEEL_SSH_KEY=/nonexistent.pub: no such file",
        ),
    ],
)
def test_bad_settings_stop_it_with_one_line(
    runner: Path, tmp_path: Path, env: dict[str, str], message: str
) -> None:
    proc, seen, _ = run(runner, tmp_path / "home", **env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
    assert seen == {}


def test_without_a_key_it_still_boots_and_says_how_to_log_in(runner: Path, tmp_path: Path) -> None:
    proc, env, _ = run(runner, tmp_path / "home")
    assert proc.returncode == 0
    assert "set KEEL_SSH_KEY=FILE" in proc.stderr
    assert not (Path(env["KEEL_SEED_DIR"]) / "authorized_keys").exists()
    assert env, "the VM was not started"
