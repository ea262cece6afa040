"""Systems, the system profile and its generations, and GC roots.

A *system* is a built NixOS toplevel: a directory with an executable
``bin/switch-to-configuration``. The *profile* (``/nix/var/nix/profiles/system``)
is a symlink to its current generation, ``system-N-link``, itself a symlink
to a system; the boot loader offers the profile's generations, its default
being the one ``switch-to-configuration boot`` was last run for.

keel adds a generation the way Nix does. When ``nix-env`` exists, the system
is in the Nix store and the profile is a Nix profile (absent, or a link to a
``NAME-N-link`` beside it), it runs ``nix-env --profile P --set SYSTEM``,
which also registers the generation with Nix. Otherwise (a host or a test
without Nix) it makes ``NAME-(N+1)-link -> SYSTEM`` and re-points the profile
at it atomically (a new symlink renamed over the old one), which is what
``nix-env`` does on disk. Restoring the profile after a failed commit is the
same atomic re-point in both cases, plus removing the generation added.

GC roots are symlinks in a ``gcroots`` directory (``/nix/var/nix/gcroots/
keel-safeswitch``; Nix scans ``/nix/var/nix/gcroots`` for them): while a
switch is in progress both systems are rooted there, so a rollback never
needs the network or a build, even for an old system no profile holds.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from keel.errors import KeelError

SWITCH = "bin/switch-to-configuration"


def store_dir() -> str:
    return os.environ.get("NIX_STORE_DIR", "/nix/store").rstrip("/") or "/nix/store"


def system_problem(path: Path) -> str | None:
    """Why ``path`` is not a built system, or None."""
    text = str(path)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return f"{text!r}: a path with control characters is not a system keel will run"
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is not a directory"
    switch = path / SWITCH
    if not switch.is_file():
        return f"{path} is not a NixOS system: it has no {SWITCH}"
    if not os.access(switch, os.X_OK):
        return f"{path}/{SWITCH} is not executable"
    return None


def resolve_system(path: Path) -> str:
    """The real path of a system link; KeelError says why it is not one."""
    problem = system_problem(path)
    if problem is not None:
        raise KeelError(problem)
    return os.path.realpath(path)


@dataclass(frozen=True)
class Generation:
    number: int
    link: str  # the link's name, beside the profile
    system: str  # where it points (resolved)


class Profile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.dir = path.parent
        self.name = path.name
        self._pattern = re.compile(rf"^{re.escape(self.name)}-(\d+)-link$")

    def problem(self) -> str | None:
        if not self.dir.is_dir():
            return f"the profile's directory {self.dir} does not exist (--profile)"
        if self.path.exists() and not self.path.is_symlink():
            return f"{self.path} is not a symlink: not a system profile (--profile)"
        return None

    def generations(self) -> list[Generation]:
        found: list[Generation] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.dir):
                match = self._pattern.match(entry.name)
                if match and entry.is_symlink():
                    found.append(
                        Generation(int(match[1]), entry.name, os.path.realpath(entry.path))
                    )
        return sorted(found, key=lambda g: g.number)

    def target(self) -> str | None:
        """What the profile link names (``system-41-link``), or None when it does not exist."""
        try:
            return os.readlink(self.path)
        except FileNotFoundError:
            return None

    def current(self) -> Generation | None:
        target = self.target()
        if target is None:
            return None
        name = os.path.basename(target)
        for generation in self.generations():
            if generation.link == name:
                return generation
        return None

    def system(self) -> str | None:
        """The system the profile points at now (resolved), or None."""
        return os.path.realpath(self.path) if self.path.exists() else None

    def previous(self) -> Generation | None:
        """The newest generation older than the current one."""
        current = self.current()
        older = [g for g in self.generations() if current is None or g.number < current.number]
        return older[-1] if older else None

    def is_nix_profile(self) -> bool:
        target = self.target()
        return target is None or self._pattern.match(os.path.basename(target)) is not None

    # --- changing it -------------------------------------------------------------------

    def add(self, system: str, *, nix_env: str | None) -> str:
        """Make ``system`` the profile's new current generation; return its link's name."""
        if nix_env is not None:
            return self._add_with_nix_env(system, nix_env)
        numbers = [g.number for g in self.generations()]
        link = f"{self.name}-{max(numbers, default=0) + 1}-link"
        tmp = self.dir / f".{link}.keel-tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(system, tmp)
        os.replace(tmp, self.dir / link)
        self.point_to(link)
        return link

    def _add_with_nix_env(self, system: str, nix_env: str) -> str:
        result = subprocess.run(
            [nix_env, "--profile", str(self.path), "--set", system],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if result.returncode != 0:
            said = result.stderr.strip().splitlines()
            raise KeelError(
                f"nix-env --profile {self.path} --set {system} exited {result.returncode}"
                + (f": {said[-1]}" if said else "")
            )
        link = self.target()
        if link is None:
            raise KeelError(f"nix-env --set left no profile at {self.path}")
        return os.path.basename(link)

    def point_to(self, link: str) -> None:
        """Atomically re-point the profile at ``link`` (a generation's name)."""
        tmp = self.dir / f".{self.name}.keel-tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(link, tmp)
        os.replace(tmp, self.path)
        _sync_dir(self.dir)

    def remove(self, link: str) -> None:
        if self._pattern.match(link) is None:
            raise KeelError(f"{link} is not a generation of {self.path}")
        with contextlib.suppress(FileNotFoundError):
            (self.dir / link).unlink()


def nix_env_for(profile: Profile, system: str) -> str | None:
    """``nix-env`` when it should add the generation (see the module docstring), else None."""
    nix_env = shutil.which("nix-env")
    if nix_env is None or not profile.is_nix_profile():
        return None
    if not system.startswith(store_dir() + "/"):
        return None
    return nix_env


def _sync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class GcRoots:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def add(self, name: str, target: str) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, path)
        return str(path)

    @staticmethod
    def remove(paths: list[str]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
