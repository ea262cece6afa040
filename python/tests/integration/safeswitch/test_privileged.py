"""safeswitch at the root boundary: requests from others, reboots, checks as a user.

- ``keel switch request INSTANCE`` (what ``keel-switch@INSTANCE.service`` runs
  as root) switches only to a declared target, only from the system and to
  the system the request names, and refuses everything else before touching
  anything, on the record;
- a switch cut short by a reboot leaves its trace in the state directory, and
  ``keel switch reconcile`` records it as ``interrupted`` at the next boot;
- a command check with ``user`` runs as that user, not as root;
- a rollback to an older generation does not stop on a hangup.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from keel.safeswitch import requests
from keel.watch.children import pidfd_supported

from tests.integration.safeswitch.lab import KEEL, Lab, wait_for

pytestmark = pytest.mark.skipif(
    not pidfd_supported(), reason="activations run as pidfd-watched children (Linux 5.3+)"
)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    lab = Lab(tmp_path / "lab")
    old = lab.system("gen-a")
    lab.system("gen-b")
    (old / "specialisation").mkdir()
    (old / "specialisation" / "next").symlink_to(lab.root / "systems" / "gen-b")
    lab.boot(old)
    lab.config(targets={"next": {"specialisation": "next"}})
    return lab


def entries(lab: Lab, kind: str) -> list[dict[str, object]]:
    return [e for e in lab.ledger_entries() if e["source"] == "safeswitch" and e["kind"] == kind]


def request(lab: Lab, escaped: str) -> subprocess.CompletedProcess[str]:
    return lab.keel("switch", "request", "--config", str(lab.config_path), "--json", escaped)


def instance(lab: Lab, name: str = "next", *, old: str | None = None, new: str | None = None,
             request_id: str = "0123456789abcdef") -> str:  # fmt: skip
    running = lab.running()
    target = str(lab.root / "systems" / "gen-b")
    made = requests.Instance(
        name, requests.digest(old or running), requests.digest(new or target), request_id
    )
    return made.unit().removeprefix("keel-switch@").removesuffix(".service")


def test_a_request_for_what_was_confirmed_switches(lab: Lab) -> None:
    old, new = lab.running(), str(lab.root / "systems" / "gen-b")
    result = request(lab, instance(lab))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["state"], report["outcome"]) == ("done", "committed")
    assert report["request"] == "0123456789abcdef"
    assert lab.running() == new
    stored = json.loads((lab.run_dir / "requests" / "0123456789abcdef.json").read_text())
    assert stored == report
    assert (lab.run_dir / "requests" / "0123456789abcdef.json").stat().st_mode & 0o777 == 0o640
    (taken,) = entries(lab, "request")
    assert taken["subject"] == "0123456789abcdef"
    assert taken["data"] == {
        "target": "next",
        "unit": f"keel-switch@{instance(lab, old=old)}.service",
        "old": old,
        "new": new,
    }
    assert [e["kind"] for e in lab.ledger_entries()] == ["request", "started", "committed"]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda lab: instance(lab, "nope"), "no target 'nope' is declared in"),
        (
            lambda lab: instance(lab, old="/nix/store/somewhere-else"),
            "the running system changed since the switch was confirmed: it is now",
        ),
        (
            lambda lab: instance(lab, new="/nix/store/somewhere-else"),
            "next (specialisation next) is now",
        ),
    ],
    ids=["undeclared", "running-changed", "target-changed"],
)
def test_a_request_that_does_not_hold_changes_nothing(lab: Lab, make: object, reason: str) -> None:
    before = lab.running()
    result = request(lab, make(lab))  # type: ignore[operator]
    assert result.returncode == 2, result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "refused"
    assert reason in report["reason"]
    assert lab.running() == before
    assert lab.calls() == []
    (taken,) = entries(lab, "request")
    assert reason in str(taken["data"]["refused"])  # type: ignore[index]
    assert [e["kind"] for e in lab.ledger_entries()] == ["request"]


@pytest.mark.parametrize(
    "escaped",
    ["next", "../../etc/passwd", "next:x:y:z", "next-gen:" + "0" * 32 + ":" + "0" * 32 + ":" + "0" * 16],
)  # fmt: skip
def test_a_malformed_instance_is_one_line_and_nothing_else(lab: Lab, escaped: str) -> None:
    result = request(lab, escaped)
    assert result.returncode == 2
    assert result.stderr.startswith("keel: error: instance ")
    assert result.stderr.count("\n") == 1
    assert "is not a keel switch request" in result.stderr
    assert result.stdout == ""
    assert not (lab.run_dir / "requests").exists()
    assert lab.ledger_entries() == []


def test_a_switch_cut_short_by_a_reboot_is_recorded_at_the_next_boot(lab: Lab) -> None:
    old = lab.running()
    lab.behave("gen-b", "hang")
    switcher = lab.spawn_switch(lab.root / "systems" / "gen-b")
    trace_dir = lab.state_dir / "unfinished"
    trace = wait_for(lambda: next(trace_dir.glob("*.json"), None), "the switch's trace")
    wait_for(
        lambda: (
            json.loads(trace.read_text())["phase"] == "activating"
            and len(json.loads(trace.read_text())["gcroots"]) == 2
        ),
        "the trace to say activating, with both GC roots",
    )
    # The host goes down: every process of the switch dies at once, /run is emptied.
    state = lab.state()
    assert state is not None
    for pid in (switcher.pid, state["timer"]["pid"], (state.get("activation") or {}).get("pid")):
        if pid:
            with_group = pid != switcher.pid
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if with_group else os.kill)(pid, signal.SIGKILL)
    switcher.wait()
    subprocess.run(["rm", "-rf", str(lab.run_dir)], check=True)
    # The file was written in the boot before this one.
    value = json.loads(trace.read_text())
    value["boot_id"] = "the-boot-before"
    trace.write_text(json.dumps(value))
    switch_id = value["id"]
    result = lab.keel(
        "switch", "reconcile", "--config", str(lab.config_path), "--json",
        "--booted", str(lab.current),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (done,) = json.loads(result.stdout)
    assert done["outcome"] == "interrupted"
    assert done["id"] == switch_id
    (interrupted,) = entries(lab, "interrupted")
    assert interrupted["subject"] == switch_id
    data = interrupted["data"]
    assert data["phase"] == "activating"  # type: ignore[index]
    assert data["old"] == old  # type: ignore[index]
    assert data["by"] == "reboot"  # type: ignore[index]
    assert data["booted"] == lab.running()  # type: ignore[index]
    assert list(trace_dir.glob("*.json")) == []
    assert list(lab.gcroots.iterdir()) == []  # nothing will roll back to it any more
    history = lab.keel("switch", "history", "--config", str(lab.config_path), "--json")
    (row,) = json.loads(history.stdout)
    assert (row["id"], row["outcome"], row["by"]) == (switch_id, "interrupted", "reboot")
    again = lab.keel("switch", "reconcile", "--config", str(lab.config_path))
    assert (again.returncode, again.stdout) == (0, "no interrupted switch\n")


def test_a_decided_switch_leaves_no_trace_and_a_damaged_one_is_set_aside(lab: Lab) -> None:
    result = lab.switch(lab.root / "systems" / "gen-b")
    assert result.returncode == 0, result.stderr
    trace_dir = lab.state_dir / "unfinished"
    assert list(trace_dir.iterdir()) == []
    (trace_dir / "x.json").write_text('{"version": 1, "id": ')
    result = lab.keel("switch", "reconcile", "--config", str(lab.config_path))
    assert result.returncode == 1
    assert "unreadable" in result.stdout
    assert (trace_dir / "x.json.damaged").exists()
    assert not (trace_dir / "x.json").exists()
    assert entries(lab, "interrupted") == []


def test_a_command_check_runs_as_its_user(lab: Lab) -> None:
    as_nobody = 'test "$(id -u)" = 65534 && test "$HOME" = /nonexistent'
    lab.config(checks=[{"type": "command", "command": as_nobody, "user": "nobody", "name": "u"}])
    result = lab.switch(lab.root / "systems" / "gen-b", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    lab.config(checks=[{"type": "command", "command": as_nobody, "name": "u"}])  # as root
    result = lab.keel("switch", "rollback", "--config", str(lab.config_path))
    assert result.returncode == 0, result.stderr
    result = lab.switch(lab.root / "systems" / "gen-b", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["reason"].startswith("check u failed")
    lab.config(checks=[{"type": "command", "command": "true", "user": "no-such-user-here"}])
    result = lab.switch(lab.root / "systems" / "gen-b")
    assert result.returncode == 2
    assert 'checks[0].user: no such user "no-such-user-here" on this host' in result.stderr


def test_a_rollback_to_an_older_generation_goes_on_after_a_hangup(lab: Lab) -> None:
    old = lab.running()
    assert lab.switch(lab.root / "systems" / "gen-b").returncode == 0
    lab.behave("gen-a", "slow")  # a second's work: the hangup comes during it
    rollback = subprocess.Popen(
        [*KEEL, "switch", "rollback", "--config", str(lab.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    trace_dir = lab.state_dir / "unfinished"
    wait_for(lambda: next(trace_dir.glob("*.json"), None), "the rollback's trace")
    rollback.send_signal(signal.SIGHUP)
    output, _ = rollback.communicate(timeout=120)
    assert rollback.returncode == 0, output
    assert lab.running() == old
    assert lab.boot_default() == old
    assert list(trace_dir.glob("*.json")) == []
