"""systemd containers: real systemd as PID 1 in ``systemd-nspawn --boot``.

Three layers, each made once and shared:

1. **rootfs** (:func:`ensure_rootfs`): Debian 12 from ``debootstrap``, cached in
   ``/var/cache/keel-test/rootfs-<key>`` (``KEEL_TEST_CACHE`` overrides), where
   ``<key>`` hashes the package list and the preparation steps. Built under a
   file lock, in a temporary directory renamed into place when complete, so
   concurrent runs wait for one build and never see half of one.
2. **keel layer** (:func:`build_keel_layer`), once per test session: the keel
   wheel built on the host and its dependencies as wheels (:func:`build_wheelhouse`),
   installed offline into ``/opt/keel`` (a venv; ``/usr/local/bin/keel`` links
   to its CLI). It is an overlayfs upper directory laid on the rootfs.
3. **container** (:class:`Container`): a fresh overlayfs upper directory over
   both, so containers share nothing they write and start in a second or two.

Each ``systemd-nspawn`` runs in a cgroup of its own (:func:`_join_own_cgroup`),
``keel-harness/<container name>`` under this process's cgroup in the
hierarchies nspawn nests containers in (the named ``systemd`` one of cgroup v1,
and cgroup v2). With ``--keep-unit`` and no systemd on the host, nspawn puts its
container in ``<its own cgroup>/payload``: without a cgroup per container, every
container of every run on the machine shared ``/payload``, and one container's
systemd removed the cgroups of another's units (``Failed to attach ... to
cgroup: No such file or directory``; boots "degraded", units failing mid-test).

A container is never on the host's network: it gets ``--private-network``
(loopback only) or joins a host of :mod:`tests.harness.netns`
(``--network-namespace-path``), i.e. it *is* that host and is reachable over
the test's topology. There is no machined on test machines, so commands run
inside through ``nsenter`` into the container's namespaces
(:meth:`Container.run`); they are not part of the container's cgroups, so
anything long-lived belongs in a unit (``systemd-run`` inside).

    image = Image.build(workdir)              # rootfs + keel layer (session fixture)
    box = Container("a", image, workdir)      # or the ``containers`` fixture
    box.start()                               # waits for `systemctl is-system-running`
    box.run("keel", "--version")
    box.write_file("/etc/keel/agents/x.json", text)
    box.stop()
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.common import (
    RUN_ID,
    HarnessError,
    dies_with_us,
    report_output,
    run,
    stale,
)
from tests.harness.netns import NETNS_DIR, Host

REPO = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("KEEL_TEST_CACHE", "/var/cache/keel-test"))
WORK_ROOT = Path(os.environ.get("KEEL_TEST_WORKDIR", "/var/tmp/keel-harness"))
MIRROR = os.environ.get("KEEL_TEST_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
PROPAGATE = Path("/run/systemd/nspawn/propagate")

# Everyone's system tests share one cached rootfs: add a package here rather
# than building a second rootfs with other packages.
DEFAULT_PACKAGES: tuple[str, ...] = (
    "systemd", "systemd-sysv", "dbus", "libpam-systemd",
    "python3", "python3-venv",
    "iproute2", "iputils-ping", "nftables", "netcat-openbsd",
    "openssh-server", "procps", "sqlite3", "ca-certificates",
)  # fmt: skip

# Timers and gettys that only add noise and load to a test container.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
    "e2scrub_all.timer", "fstrim.timer", "console-getty.service",
    "getty@.service", "systemd-timesyncd.service",
    # Fails now and then under load in a container (no hugetlbfs to mount), and a
    # failed unit makes a boot "degraded": nothing keel tests needs huge pages.
    "dev-hugepages.mount",
)  # fmt: skip
PREPARATION = 2  # bump when _prepare_rootfs changes what it does
VENV = "/opt/keel"
IN_CONTAINER_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

timings: dict[str, float] = {}
"""Seconds spent on the expensive steps of this run (shown in the test summary)."""
boots: list[float] = []
"""Seconds from ``systemd-nspawn`` to a running system, per container booted."""


def missing_prerequisite() -> str | None:
    """Why containers cannot run here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn containers need root"
    for tool, package in (
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"),
    ):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install {package})"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


# --- layer 1: the cached rootfs -----------------------------------------------


def rootfs_key(packages: Sequence[str]) -> str:
    text = "\n".join([SUITE, "minbase", str(PREPARATION), *sorted(set(packages))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare_rootfs(root: Path, packages: Sequence[str]) -> None:
    # The machine name given to nspawn becomes the hostname; a fresh machine-id
    # is made at each boot (empty file), so containers never share one.
    (root / "etc/hostname").unlink(missing_ok=True)
    (root / "etc/machine-id").write_text("")
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (root / "etc/keel-test-rootfs").write_text("\n".join(sorted(packages)) + "\n")
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)


def ensure_rootfs(packages: Sequence[str] = DEFAULT_PACKAGES) -> Path:
    """The cached Debian 12 rootfs with ``packages``, debootstrapped on first use."""
    key = rootfs_key(packages)
    final = CACHE / f"rootfs-{key}"
    if final.is_dir():
        return final
    with _locked(CACHE / f"rootfs-{key}.lock"):
        if final.is_dir():  # another run built it while we waited
            return final
        building = CACHE / f"rootfs-{key}.building"
        shutil.rmtree(building, ignore_errors=True)
        started = time.monotonic()
        log = CACHE / f"rootfs-{key}.log"
        with log.open("w") as out:
            proc = subprocess.run(
                [
                    "debootstrap", "--variant=minbase", f"--include={','.join(sorted(packages))}",
                    SUITE, str(building), MIRROR,
                ],
                stdout=out, stderr=subprocess.STDOUT, check=False, timeout=1800,
            )  # fmt: skip
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise HarnessError(
                f"debootstrap of {SUITE} from {MIRROR} failed (log {log}): " + " | ".join(tail)
            )
        _prepare_rootfs(building, packages)
        building.rename(final)
        timings["debootstrap"] = time.monotonic() - started
        (final / "etc/keel-test-rootfs-seconds").write_text(f"{timings['debootstrap']:.1f}\n")
    return final


# --- overlay mounts ------------------------------------------------------------


def _mount_overlay(lower: Sequence[Path], upper: Path, work: Path, merged: Path) -> None:
    for directory in (upper, work, merged):
        directory.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(p) for p in lower)
    run(
        [
            "mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={lowerdir},upperdir={upper},workdir={work}", str(merged),
        ]
    )  # fmt: skip


def _unmount(path: Path) -> None:
    if run(["mountpoint", "-q", str(path)], check=False).returncode != 0:
        return
    for _ in range(20):
        if run(["umount", str(path)], check=False).returncode == 0:
            return
        time.sleep(0.25)
    run(["umount", "--lazy", str(path)])


def _mounts_under(prefix: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point.startswith(prefix):
                out.append(point)
    return out


def remove_workdir(path: Path) -> None:
    for point in sorted(_mounts_under(str(path)), key=len, reverse=True):
        _unmount(Path(point))
    shutil.rmtree(path, ignore_errors=True)
    # work/ of an overlay keeps a root-owned, mode-000 "work" directory.
    if path.exists():
        run(["rm", "-rf", "--one-file-system", str(path)], check=False)


# --- layer 2: keel, installed offline ----------------------------------------


def build_wheelhouse(dest: Path) -> Path:
    """The keel wheel (built from this checkout) and its dependencies, as wheels.

    The build runs on a copy of ``python/`` and ``modules/`` laid out as in the
    checkout (so ``keel/data/tiers.json``, a symlink to ``modules/tiers.json``,
    resolves the same way) without the checkout's ``build/`` and
    ``*.egg-info``, whose stale files would otherwise end up in the wheel.
    """
    started = time.monotonic()
    source = dest / "source"
    shutil.copytree(
        REPO / "python",
        source / "python",
        symlinks=True,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*_cache", "tests"),
    )
    shutil.copytree(REPO / "modules", source / "modules")
    wheels = dest / "wheels"
    run(
        [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
            "--wheel-dir", str(wheels), str(source / "python"),
        ],
        timeout=600,
    )  # fmt: skip
    shutil.rmtree(source)
    timings["wheelhouse"] = time.monotonic() - started
    return wheels


def keel_wheel(wheelhouse: Path) -> Path:
    wheels = sorted(wheelhouse.glob("keel-*.whl"))
    if not wheels:
        raise HarnessError(f"{wheelhouse}: no keel wheel in it")
    return wheels[-1]


# --- a cgroup per container ----------------------------------------------------------

CGROUP_GROUP = "keel-harness"
# Run argv with this shell's pid first written to each cgroup.procs file named before "--".
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1"; shift; done; shift; exec "$@"'


def _nspawn_cgroup_parents() -> list[Path]:
    """``keel-harness`` under this process's cgroup in the hierarchies nspawn nests in."""
    mounts: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, kind = left.split(), right.split()
            if len(fields) < 5 or len(kind) < 3:
                continue
            if kind[0] == "cgroup2":
                mounts.setdefault("", (fields[3], fields[4]))
            elif kind[0] == "cgroup" and "name=systemd" in kind[2].split(","):
                mounts.setdefault("name=systemd", (fields[3], fields[4]))
    parents = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            ident, controllers, path = line.rstrip("\n").split(":", 2)
            key = "" if ident == "0" else controllers
            if key in mounts:
                root, mountpoint = mounts[key]
                relative = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
                if not relative.startswith(".."):
                    parents.append(Path(mountpoint) / relative / CGROUP_GROUP)
    return parents


def _join_own_cgroup(name: str, argv: Sequence[str]) -> list[str]:
    """``argv`` (an nspawn command) started in cgroup ``keel-harness/<name>`` of its own.

    Where the cgroups cannot be made (a read-only cgroupfs), ``argv`` as it is.
    """
    procs = []
    for parent in _nspawn_cgroup_parents():
        try:
            (parent / name).mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        procs.append(str(parent / name / "cgroup.procs"))
    if not procs:
        return list(argv)
    return ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *procs, "--", *argv]


def _remove_cgroups(name: str) -> list[str]:
    """Remove container ``name``'s cgroups, deepest first; those that still hold processes."""
    busy = []
    for parent in _nspawn_cgroup_parents():
        top = parent / name
        if not top.is_dir():
            continue
        inner = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for directory in [*inner, top]:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                busy.append(str(directory))
    return busy


def _cgroup_names() -> set[str]:
    return {
        p.name for parent in _nspawn_cgroup_parents() if parent.is_dir() for p in parent.iterdir()
        if p.is_dir()
    }  # fmt: skip


def nspawn_command(
    root: Path, name: str, argv: Sequence[str], binds: Sequence[tuple[Path, str]] = ()
) -> list[str]:
    """A one-shot command in ``root`` (no boot, no network), as machine ``name``."""
    return _join_own_cgroup(name, [
        "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-network",
        f"--machine={name}", f"--directory={root}",
        *[f"--bind-ro={src}:{dst}" for src, dst in binds],
        f"--setenv=PATH={IN_CONTAINER_PATH}",
        *argv,
    ])  # fmt: skip


def _remove_propagation_dir(name: str) -> None:
    # nspawn cannot remove it itself where /run is not a tmpfs (as on test VMs).
    propagate = PROPAGATE / name
    if propagate.is_dir() and not _mounts_under(str(propagate)):
        shutil.rmtree(propagate, ignore_errors=True)


def build_keel_layer(rootfs: Path, wheelhouse: Path, dest: Path) -> Path:
    """An overlay layer with keel installed into ``/opt/keel`` from ``wheelhouse``, offline.

    The venv is made without pip (ensurepip alone takes ~10 s) and filled by
    Debian's own pip wheel, run straight from the wheel file.
    """
    started = time.monotonic()
    upper, work, merged = dest / "upper", dest / "work", dest / "merged"
    name = f"{RUN_ID}-layer"
    _mount_overlay([rootfs], upper, work, merged)
    try:
        script = (
            f"set -e; python3 -m venv --without-pip {VENV}; "
            "pip=$(ls /usr/share/python-wheels/pip-*.whl | tail -n 1); "
            f'{VENV}/bin/python "$pip/pip" install --quiet --no-index --disable-pip-version-check '
            "--no-cache-dir --find-links /run/keel-wheels keel; "
            f"ln -sf {VENV}/bin/keel /usr/local/bin/keel"
        )
        run(
            nspawn_command(
                merged, name, ["/bin/sh", "-c", script], [(wheelhouse, "/run/keel-wheels")]
            ),
            timeout=600,
        )
    finally:
        _unmount(merged)
        _remove_propagation_dir(name)
        _remove_cgroups(name)
    shutil.rmtree(work, ignore_errors=True)
    timings["keel layer"] = time.monotonic() - started
    return upper


@dataclass(frozen=True)
class Image:
    """The layers a container boots from, lowest last (overlayfs ``lowerdir`` order)."""

    layers: tuple[Path, ...]
    wheelhouse: Path | None = None

    @classmethod
    def build(cls, workdir: Path, packages: Sequence[str] = DEFAULT_PACKAGES) -> Image:
        """The cached rootfs plus a keel layer made from this checkout."""
        rootfs = ensure_rootfs(packages)
        wheelhouse = build_wheelhouse(workdir)
        layer = build_keel_layer(rootfs, wheelhouse, workdir / "keel-layer")
        return cls((layer, rootfs), wheelhouse)


# --- layer 3: containers --------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []
    return found


def _nspawn_processes() -> dict[int, str]:
    """pid -> machine name of every systemd-nspawn on the machine."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"systemd-nspawn"):
            continue
        for arg in argv:
            if arg.startswith(b"--machine="):
                found[int(entry)] = arg.removeprefix(b"--machine=").decode()
    return found


def _kill_nspawn(pid: int) -> None:
    """Kill a container for good: its PID 1 (and so its PID namespace), then nspawn."""
    for child in _children(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Container:
    """One booted Debian 12 with systemd as PID 1, in its own overlay."""

    def __init__(
        self,
        label: str,
        image: Image,
        *,
        host: Host | None = None,
        binds: Sequence[tuple[Path, str]] = (),
        workdir: Path | None = None,
    ) -> None:
        self.label = label
        self.name = f"{RUN_ID}-{label}"
        if len(self.name) > 60 or not label.replace("-", "").isalnum():
            raise HarnessError(
                f"container label {label!r}: use a short name of letters, digits and '-'"
            )
        self.image = image
        self.host = host
        self.binds = list(binds)
        self.workdir = workdir or WORK_ROOT / self.name
        self.root = self.workdir / "merged"
        self.console_log = self.workdir / "console.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    def __repr__(self) -> str:
        return f"<Container {self.name} leader={self.leader}>"

    # --- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        """Boot and wait until systemd says the system is running."""
        if self.workdir.exists():
            raise HarnessError(f"{self.workdir}: exists; is container {self.name} already running?")
        started = time.monotonic()
        _mount_overlay(self.image.layers, self.workdir / "upper", self.workdir / "work", self.root)
        if self.host is not None:
            network = [f"--network-namespace-path={NETNS_DIR / self.host.netns}"]
        else:
            network = ["--private-network"]
        argv = [
            "systemd-nspawn", "--boot", "--register=no", "--keep-unit",
            f"--machine={self.name}", f"--directory={self.root}",
            "--console=read-only", "--capability=CAP_NET_ADMIN",
            *network,
            *[f"--bind-ro={src}:{dst}" for src, dst in self.binds],
        ]  # fmt: skip
        with self.console_log.open("wb") as out:
            self.process = subprocess.Popen(
                dies_with_us(_join_own_cgroup(self.name, argv), "TERM"), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._wait_for_leader(started + timeout)
        self._wait_for_boot(started + timeout)
        boots.append(time.monotonic() - started)

    def _fail(self, message: str) -> HarnessError:
        tail = self.console_log.read_text(errors="replace").strip().splitlines()[-15:]
        return HarnessError(f"container {self.name}: {message}; console:\n" + "\n".join(tail))

    def _wait_for_leader(self, deadline: float) -> None:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._fail(f"systemd-nspawn exited with {self.process.returncode}")
            for child in _children(self.process.pid):
                try:
                    with open(f"/proc/{child}/status") as f:
                        status = f.read()
                except FileNotFoundError:
                    continue
                nspid = next(
                    (ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), []
                )
                if nspid[-1:] == ["1"]:
                    self.leader = child
                    return
            time.sleep(0.05)
        raise self._fail("PID 1 did not appear")

    def _wait_for_boot(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            remaining = max(1.0, deadline - time.monotonic())
            result = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=remaining
            )
            state = result.stdout.strip()
            if state == "running":
                return
            if state == "degraded":
                failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
                raise self._fail(f"booted degraded; failed units: {failed.strip()}")
            time.sleep(0.2)  # the manager is not answering yet
        raise self._fail(f"not booted within the timeout (state {state or 'unknown'!r})")

    def stop(self, timeout: float = 20) -> None:
        """Power off (SIGTERM to nspawn), kill if it hangs, remove the overlay."""
        if self.process is not None:
            if self.process.poll() is None and self.leader is not None:
                journal = self.run(
                    "journalctl", "--no-pager", "--quiet", "--boot", check=False, timeout=30
                )
                report_output(f"container {self.name}'s journal", journal.stdout)
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _kill_nspawn(self.process.pid)
                    self.process.wait(timeout=10)
            self.process = None
        if self.leader is not None:
            # PID 1 outliving nspawn would keep the whole container alive.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
            self.leader = None
        remove_workdir(self.workdir)
        _remove_propagation_dir(self.name)
        busy = _remove_cgroups(self.name)
        if busy:
            raise HarnessError(f"container {self.name}: processes left in {', '.join(busy)}")

    def __enter__(self) -> Container:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- inside ------------------------------------------------------------------

    def argv(self, argv: Sequence[str], *, user: str | None = None) -> list[str]:
        """``argv`` wrapped to run inside the container (as ``user``, default root)."""
        if self.leader is None:
            raise HarnessError(f"container {self.name} is not running")
        if user is not None:
            switch = 'u="$1"; shift; exec setpriv --reuid="$u" --regid="$(id -g "$u")" --init-groups -- "$@"'
            argv = ["/bin/sh", "-c", switch, "sh", user, *argv]
        return [
            "nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net",
            "--pid", "--cgroup", "--root", "--wd",
            "/usr/bin/env", "-i", f"PATH={IN_CONTAINER_PATH}", "LANG=C.UTF-8",
            f"HOME={'/root' if user is None else '/'}",
            *argv,
        ]  # fmt: skip

    def run(
        self,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60,
        input: str | bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside and wait; a failure raises with its output."""
        return run(self.argv(argv, user=user), check=check, timeout=timeout, input=input)

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """``sh -c script`` inside (same keywords as :meth:`run`)."""
        return self.run("/bin/sh", "-c", script, **kwargs)  # type: ignore[arg-type]

    def write_file(
        self, path: str, content: str | bytes, *, mode: int = 0o644, owner: str = "root"
    ) -> None:
        """Create or replace a file inside (parent directories made as needed)."""
        self.run(
            "/bin/sh", "-c",
            'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1" && chown "$3:" "$1"',
            "write_file", path, f"{mode:o}", owner,
            input=content,
        )  # fmt: skip

    def read_file(self, path: str) -> str:
        return self.run("cat", path).stdout

    def copy_in(self, source: Path, dest: str) -> None:
        """Copy a host file or directory tree to ``dest`` inside (owned by root)."""
        tar = self.workdir / "copy-in.tar"
        with tarfile.open(tar, "w") as archive:
            archive.add(source, arcname=".", filter=_root_owned)
        try:
            self.run("mkdir", "-p", dest)
            self.run("tar", "-x", "-C", dest, input=tar.read_bytes())
        finally:
            tar.unlink()

    def wait_until(
        self, condition: Callable[[], bool], *, timeout: float = 30, what: str = "condition"
    ) -> None:
        """Poll ``condition`` every 0.1 s until it holds; raise naming ``what`` otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.1)
        raise HarnessError(f"container {self.name}: {what} did not happen within {timeout:g} s")

    def unit_properties(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show -p ...`` of a unit, as a dict."""
        out = self.run("systemctl", "show", unit, *[f"--property={p}" for p in properties]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, lines: int = 100) -> str:
        argv = ["journalctl", "--no-pager", "-n", str(lines), "-b"]
        return self.run(*argv, *(["-u", unit] if unit else []), check=False).stdout


@contextlib.contextmanager
def standalone(prefix: str) -> Iterator[Container]:
    """A booted container outside any test session (the benchmarks use it).

    Named ``<prefix><pid>-box``, outside the harness's ``kh<pid>-`` scheme, so
    that a test session's sweep of dead runs never mistakes it for one; its
    image and overlay are removed on leaving.
    """
    name = f"{prefix}{os.getpid()}"
    workdir = WORK_ROOT / name
    try:
        image = Image.build(workdir / "image")
        box = Container("bench", image, workdir=workdir / "box")
        box.name = f"{name}-box"
        try:
            box.start()
            yield box
        finally:
            box.stop()
    finally:
        remove_workdir(workdir)


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


# --- leftovers ---------------------------------------------------------------------


def leftovers(run_id: str = RUN_ID) -> list[str]:
    """What run ``run_id`` left behind: live containers, mounts, work directories."""
    found = [
        f"container {name} (nspawn pid {pid})"
        for pid, name in _nspawn_processes().items()
        if name.startswith(f"{run_id}-")
    ]
    found += [f"mount {point}" for point in _mounts_under(str(WORK_ROOT / f"{run_id}-"))]
    if WORK_ROOT.is_dir():
        found += [f"directory {p}" for p in WORK_ROOT.iterdir() if p.name.startswith(f"{run_id}-")]
    if PROPAGATE.is_dir():
        found += [f"directory {p}" for p in PROPAGATE.iterdir() if p.name.startswith(f"{run_id}-")]
    found += [f"cgroup {name}" for name in sorted(_cgroup_names()) if name.startswith(f"{run_id}-")]
    return found


def remove(run_id: str = RUN_ID) -> None:
    """Kill and remove everything of run ``run_id`` (cleanup of last resort)."""
    for pid, name in _nspawn_processes().items():
        if name.startswith(f"{run_id}-"):
            _kill_nspawn(pid)
    time.sleep(0.2)
    if WORK_ROOT.is_dir():
        for path in WORK_ROOT.iterdir():
            if path.name.startswith(f"{run_id}-"):
                remove_workdir(path)
    if PROPAGATE.is_dir():
        for path in PROPAGATE.iterdir():
            if path.name.startswith(f"{run_id}-"):
                _remove_propagation_dir(path.name)
    for name in _cgroup_names():
        if name.startswith(f"{run_id}-"):
            _remove_cgroups(name)


def sweep_stale() -> list[str]:
    """Remove containers and work directories of earlier runs that died uncleanly."""
    runs = {name.split("-", 1)[0] for name in _nspawn_processes().values() if stale(name)}
    for directory in (WORK_ROOT, PROPAGATE):
        if directory.is_dir():
            runs |= {p.name.split("-", 1)[0] for p in directory.iterdir() if stale(p.name)}
    runs |= {name.split("-", 1)[0] for name in _cgroup_names() if stale(name)}
    for run_id in sorted(runs):
        remove(run_id)
    return sorted(runs)
