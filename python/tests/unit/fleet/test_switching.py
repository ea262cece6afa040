"""Switches a node starts for an operator: targets, the detached run, its outcome."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from keel.errors import BadRequest, Refused, UsageError
from keel.fleet import rollout, switching
from keel.fleet.switching import Switches, Target, outcome_of, parse_target


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("web", "one of"),
        ({"flake": "a", "system": "/b"}, "one of"),
        ({"image": "x"}, "unknown target"),
        ({"system": "relative"}, "absolute path"),
        ({"specialisation": "../up"}, "not a specialisation name"),
        ({"flake": "#web1"}, "expected REF#HOST"),
        ({"flake": "ref#bad host"}, "not a host name"),
        ({"system": "/x\n"}, "printable"),
        ({"system": 5}, "unknown target"),
    ],
)
def test_bad_targets(value: Any, problem: str) -> None:
    with pytest.raises((BadRequest, UsageError), match=problem):
        parse_target(value)


def test_targets_and_limits() -> None:
    assert parse_target({"flake": "github:org/fleet#web1"}) == Target(
        "flake", "github:org/fleet#web1"
    )
    assert parse_target({"flake": "/etc/nixos"}).value == "/etc/nixos"  # each node's own host name
    assert parse_target({"specialisation": "bad"}).to_json() == {"specialisation": "bad"}
    assert switching.limits({"gate": 10, "deadline": 60.5}) == [
        "--gate",
        "10",
        "--deadline",
        "60.5",
    ]
    for bad in ({"gate": -1}, {"deadline": True}, {"gate": "5"}, {"deadline": 1e9}):
        with pytest.raises(BadRequest):
            switching.limits(bad)


@pytest.mark.parametrize(
    ("state", "kind", "expected"),
    [
        ({"state": "done", "exit_code": 0}, "switch", rollout.COMMITTED),
        (
            {"state": "done", "exit_code": 1, "result": {"reason": "check health failed"}},
            "switch",
            rollout.ROLLED_BACK,
        ),
        ({"state": "done", "exit_code": 2}, "switch", rollout.REFUSED),
        ({"state": "done", "exit_code": 3}, "switch", rollout.NEEDS_OPERATOR),
        ({"state": "done", "exit_code": 9}, "switch", rollout.LOST),
        ({"state": "lost", "reason": "gone"}, "switch", rollout.LOST),
        ({"state": "done", "exit_code": 0}, "revert", rollout.REVERTED),
        ({"state": "done", "exit_code": 3}, "revert", rollout.REVERT_FAILED),
        ({"state": "lost"}, "revert", rollout.REVERT_FAILED),
    ],
)
def test_outcomes(state: dict[str, Any], kind: str, expected: str) -> None:
    assert outcome_of(state, kind)[0] == expected


def switches(tmp_path: Path, script: str) -> Switches:
    """A node whose `keel` is a shell script (its arguments after the verb are ignored)."""
    current = tmp_path / "current"
    (tmp_path / "base" / "specialisation" / "good").mkdir(parents=True)
    if not current.exists():
        current.symlink_to(tmp_path / "base")
    return Switches(
        tmp_path / "switches",
        keel=["/bin/sh", "-c", script, "keel"],
        runner="process",
        safeswitch_config=tmp_path / "safeswitch.json",
        current_system=current,
    )


def wait_state(node: Switches, run: switching.Run, wanted: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        state = node.state(run)
        if state["state"] == wanted:
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.02)


def test_a_switch_runs_detached_and_leaves_its_outcome(tmp_path: Path) -> None:
    earlier = set(zombies())  # an earlier test's unreaped child is not this test's
    node = switches(
        tmp_path, 'echo "$@" >&2; echo \'{"outcome": "rolled-back", "reason": "health"}\'; exit 1'
    )
    run = asyncio.run(
        node.start_switch(Target("specialisation", "good"), ["--gate", "5"], "op", 1.0)
    )
    assert run.old == str(tmp_path / "base")
    assert run.argv[-1] == str(tmp_path / "base" / "specialisation" / "good")
    assert run.argv[4:] == ["switch", "--config", str(tmp_path / "safeswitch.json"), "--gate", "5",
                            "--json", str(tmp_path / "base" / "specialisation" / "good")]  # fmt: skip
    state = wait_state(node, run, "done")
    assert state["exit_code"] == 1
    assert state["result"] == {"outcome": "rolled-back", "reason": "health"}
    assert outcome_of(state, "switch") == (rollout.ROLLED_BACK, "health")
    log = (tmp_path / "switches" / f"{run.id}.log").read_text()
    assert "--gate 5" in log
    assert node.unrecorded() == [run]
    node.mark_recorded(run)
    assert node.unrecorded() == []
    # switching back returns to the system that ran before
    back = asyncio.run(node.start_revert(run.id, "op", 2.0))
    assert back.id == f"{run.id}-back"
    assert back.argv[4:6] == ["switch", "rollback"]
    assert back.argv[-2:] == [str(tmp_path / "base"), "--json"]
    wait_state(node, back, "done")
    assert set(zombies()) - earlier == set()  # every finished run was reaped


def zombies() -> list[int]:
    """This process's children that ended and were never waited for."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                found.append(int(entry.name))
    return found


def test_one_switch_at_a_time_and_a_vanished_one_is_lost(tmp_path: Path) -> None:
    earlier = set(zombies())
    node = switches(tmp_path, "sleep 60")
    run = asyncio.run(node.start_switch(Target("system", "/nix/store/x"), [], "op", 1.0))
    assert node.state(run)["state"] == "running"
    with pytest.raises(Refused, match="a switch runs on this node already"):
        asyncio.run(node.start_switch(Target("system", "/nix/store/y"), [], "op", 1.0))
    assert run.pid is not None
    os.killpg(run.pid, signal.SIGKILL)  # the switch dies without an outcome
    state = wait_state(node, run, "lost")
    assert "without an outcome" in state["reason"]
    assert set(zombies()) - earlier == set()


def test_unknown_runs_and_targets_are_refused(tmp_path: Path) -> None:
    node = switches(tmp_path, "exit 0")
    with pytest.raises(Refused, match="no switch"):
        node.run("0123456789abcdef")
    with pytest.raises(BadRequest, match="switch id"):
        node.run("../../etc/passwd")
    with pytest.raises(Refused, match="no specialisation 'nope'"):
        asyncio.run(node.start_switch(Target("specialisation", "nope"), [], "op", 1.0))
