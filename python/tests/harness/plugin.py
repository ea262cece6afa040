"""The harness's pytest fixtures (loaded by ``tests/conftest.py``).

- ``network`` (per test): a :class:`~tests.harness.netns.Network`; skips
  without root, ``ip``, ``tc`` or ``nft``; closed after the test, pass or fail.
- ``image`` (per session): the cached rootfs plus a keel layer built from this
  checkout (:class:`~tests.harness.nspawn.Image`); skips without root,
  ``systemd-nspawn``, ``debootstrap`` or overlayfs.
- ``containers`` (per test): ``containers.boot(label, host=None)`` boots a
  :class:`~tests.harness.nspawn.Container`, on a private network or inside a
  host of the test's ``network``; every container is stopped after the test.
- ``processes`` (per test): ``processes.popen(argv, ...)`` starts a process
  that dies with pytest and is stopped, with its process group, when the test
  ends (:mod:`tests.harness.processes`).

After every test, a child process that the test's body started and left
running is killed with all its descendants, and the test gets a warning
naming it: a failing assertion can never leave an orphan behind.

At session start, leftovers of earlier runs that were killed are removed; at
session end, anything of this run still present (a namespace, a container, a
mount) is removed and reported as an error, so a leak cannot pass unnoticed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.harness import netns, nspawn
from tests.harness.common import RUN_ID, HarnessError
from tests.harness.netns import Host, Network
from tests.harness.nspawn import Container, Image
from tests.harness.processes import Processes, children, kill_trees

swept: list[str] = []


@pytest.fixture(scope="session")
def harness_run() -> Iterator[None]:
    """Sweeps dead runs' leftovers first; fails the session if this run leaks."""
    if netns.missing_prerequisite() is None:
        swept.extend(f"netns {name}" for name in netns.sweep_stale())
    if nspawn.missing_prerequisite() is None:
        swept.extend(f"containers of run {run}" for run in nspawn.sweep_stale())
    yield
    left: list[str] = []
    if netns.missing_prerequisite() is None:
        left += [f"netns {name}" for name in netns.leftovers()]
        for name in netns.leftovers():
            netns.remove_namespace(name)
    if nspawn.missing_prerequisite() is None:
        left += nspawn.leftovers()
        nspawn.remove()
    if left:
        pytest.fail(f"the harness left these behind (now removed): {'; '.join(left)}")


@pytest.fixture
def network(harness_run: None, tmp_path: Path) -> Iterator[Network]:
    reason = netns.missing_prerequisite()
    if reason is not None:
        pytest.skip(reason)
    net = Network(tmp_path)
    try:
        yield net
    finally:
        net.close()


@pytest.fixture(scope="session")
def image(harness_run: None) -> Iterator[Image]:
    reason = nspawn.missing_prerequisite()
    if reason is not None:
        pytest.skip(reason)
    workdir = nspawn.WORK_ROOT / f"{RUN_ID}-image"
    try:
        yield Image.build(workdir)
    finally:
        nspawn.remove_workdir(workdir)


class Containers:
    """Boots containers for one test and stops them all at its end."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.booted: list[Container] = []

    def boot(
        self,
        label: str,
        *,
        host: Host | None = None,
        binds: Sequence[tuple[Path, str]] = (),
        timeout: float = 120,
    ) -> Container:
        """A running container; ``host`` puts it inside that namespace host."""
        container = Container(label, self.image, host=host, binds=binds)
        self.booted.append(container)
        container.start(timeout=timeout)
        return container

    def stop_all(self) -> None:
        errors = []
        for container in reversed(self.booted):
            try:
                container.stop()
            except Exception as exc:
                errors.append(f"{container.name}: {exc}")
        if errors:
            raise HarnessError("; ".join(errors))


@pytest.fixture
def containers(image: Image, network: Network) -> Iterator[Containers]:
    # Depends on ``network`` so that containers inside its hosts stop first.
    boxes = Containers(image)
    try:
        yield boxes
    finally:
        boxes.stop_all()


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.stop_all()


_STARTED = pytest.StashKey[set[int]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    before = children()
    yield
    item.stash[_STARTED] = children() - before


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    # After the fixtures' own finalizers: what is still running was left behind.
    leftover = item.stash.get(_STARTED, set()) & children()
    if leftover:
        killed = kill_trees(leftover)
        for pid in leftover:  # our own children: reaped, or each stays a zombie of pytest
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if killed:
            item.warn(
                pytest.PytestWarning(
                    f"{item.nodeid} left processes running; killed: {'; '.join(killed)}"
                )
            )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not nspawn.timings and not swept:
        return
    terminalreporter.section("keel test harness")
    labels = {
        "debootstrap": "debootstrap of the rootfs (first run only)",
        "wheelhouse": "keel wheel and dependency wheels",
        "keel layer": "keel installed offline in a layer",
    }
    for key, label in labels.items():
        if key in nspawn.timings:
            terminalreporter.write_line(f"{label:<44} {nspawn.timings[key]:7.1f} s")
    if nspawn.boots:
        terminalreporter.write_line(
            f"{'container boots':<44} {len(nspawn.boots):7d}, "
            f"median {sorted(nspawn.boots)[len(nspawn.boots) // 2]:.1f} s"
        )
    for item in swept:
        terminalreporter.write_line(f"removed leftovers of a dead run: {item}")
