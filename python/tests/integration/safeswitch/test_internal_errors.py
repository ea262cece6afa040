"""A bug in keel during a switch is a failure the machine handles, never a switch left hanging.

The switch runs in this process (so a part of it can be made to raise); its
systems are the fixtures of lab.py and its timer a real detached process.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keel.safeswitch import config as ss_config
from keel.safeswitch.generations import Profile
from keel.safeswitch.probing import Prober
from keel.safeswitch.report import Output
from keel.safeswitch.switcher import Executor, Request, Result, switch
from keel.watch.children import pidfd_supported

from tests.integration.safeswitch.lab import Lab, wait_for
from tests.integration.watch_support import zombie_children

pytestmark = pytest.mark.skipif(not pidfd_supported(), reason="needs Linux 5.3+ (pidfd_open)")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab")
    lab.boot(lab.system("gen-a"))
    lab.config(gate=1, deadline=4)
    hangup = signal.getsignal(signal.SIGHUP)
    yield lab
    signal.signal(signal.SIGHUP, hangup)  # the switch ignores hangups from now on
    # The switch ran in this process: the rollback timer it started, once it is
    # done, must not stay behind as a zombie (a long-lived caller would collect one
    # per switch).
    wait_for(lambda: not zombie_children(), "the switch's processes collected", 60)


def pidfds_open() -> int:
    return sum(
        os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


def run(lab: Lab, system: Path) -> tuple[Result, str]:
    out = io.StringIO()
    config = ss_config.load(lab.config_path)
    result = asyncio.run(switch(Request(system, config), Output(json_mode=False, stream=out)))
    return result, out.getvalue()


@pytest.mark.allow_traceback(
    "a check that raises (a keel bug): logged with its traceback, the gate fails",
    match=r'raise RuntimeError\("boom"\)',
)
def test_a_check_that_cannot_run_fails_the_gate(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = Prober.run

    async def flaky(self: Prober, name: str, spec: Any) -> tuple[str, str]:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("boom")
        return await real(self, name, spec)

    monkeypatch.setattr(Prober, "run", flaky)
    result, _ = run(lab, lab.system("gen-b"))
    assert result.exit_code == 1
    assert result.state is not None
    assert "keel could not run the check: RuntimeError: boom" in result.state.reason
    assert lab.running().endswith("gen-a")


@pytest.mark.allow_traceback(
    "a commit that raises (a keel bug): logged with its traceback, the switch rolls back",
    match=r'raise RuntimeError\("disk on fire"\)',
)
def test_a_bug_in_the_commit_rolls_back(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Profile, system: str, *, nix_env: str | None) -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Profile, "add", broken)
    result, _ = run(lab, lab.system("gen-b"))
    assert result.exit_code == 1
    assert result.state is not None
    assert (
        result.state.reason == "commit failed: internal error in keel: RuntimeError: disk on fire"
    )
    assert lab.running().endswith("gen-a")
    assert lab.generations() == ["system-1-link"]


def test_a_bug_in_the_switcher_leaves_the_host_to_the_timer(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Executor, actions: list[Any]) -> None:
        await self.execute(actions)  # the activation starts...
        raise RuntimeError("a bug")  # ...and the switcher's loop dies

    monkeypatch.setattr(Executor, "drive", broken)
    pidfds = pidfds_open()
    result, said = run(lab, lab.system("gen-b"))
    assert result.exit_code == 3
    # The activation left running is no longer watched from here: no pidfd stays open
    # (and the fixture checks that no zombie stays either).
    assert pidfds_open() == pidfds
    assert "internal error in keel (a bug; the traceback is in" in said
    assert "the rollback timer rolls the switch back at" in said
    assert result.state is not None
    error_log = lab.run_dir / f"{result.state.id}-error.log"
    assert "RuntimeError: a bug" in error_log.read_text()
    # The timer, a process of its own, does what the switcher could not.
    final = wait_for(
        lambda: (s := lab.state()) and s["phase"] == "rolled-back" and s, "the timer", 60
    )
    assert final["rolled_back_by"] == "timer"
    assert lab.running().endswith("gen-a")
    timer = result.state.timer
    assert timer is not None
    assert timer.process is not None
    process = timer.process
    wait_for(lambda: not process.alive(), "the timer process to end", 60)
