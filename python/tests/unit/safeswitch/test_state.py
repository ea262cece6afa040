"""The state file: what survives the switcher, read back whole or refused with the field named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from keel.errors import KeelError
from keel.safeswitch.machine import Limits, Phase
from keel.safeswitch.state import Lock, ProcessRef, Runner, StateFile, SwitchState


def sample() -> SwitchState:
    return SwitchState(
        id="20260101T000000-abcdef",
        phase=Phase.GATING,
        old="/nix/store/a-old",
        new="/nix/store/b-new",
        profile="/nix/var/nix/profiles/system",
        current="/run/current-system",
        limits=Limits(gate=30, deadline=300),
        started_at=1.5,
        deadline_at=301.5,
        armed_monotonic=12.25,
        switcher=ProcessRef(10, 20),
        timer=Runner("systemd", unit="keel-safeswitch-rollback-x.timer", log="/run/x.log"),
        activation=Runner("process", process=ProcessRef(11, 21), log="/run/a.log"),
        gcroots=["/nix/var/nix/gcroots/keel-safeswitch/x-old"],
        checks=[{"name": "watch", "verdict": "pass", "detail": "1 agent healthy", "results": 3}],
        alerts={"watch_config": "/etc/keel/watch.json", "routes": None},
        ledger="/var/lib/keel/ledger.db",
        host="web1",
        run_dir="/run/keel/safeswitch",
    )


def test_a_state_reads_back_as_written(tmp_path: Path) -> None:
    files = StateFile(tmp_path / "run")
    assert files.read() is None
    state = sample()
    files.write(state)
    again = files.read()
    assert again == state
    assert again is not None
    assert again.in_progress
    assert not again.finished
    assert oct(os.stat(files.path).st_mode & 0o777) == "0o640"
    assert [p.name for p in files.run_dir.iterdir()] == ["state.json"]  # no temporary left


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": 2}, "version"),
        ({"phase": "dancing"}, "phase"),
        ({"old": 3}, "old"),
        ({"limits": {"gate": 1}}, "limits"),
        ({"limits": {"gate": "1", "deadline": 2, "commit_timeout": 3, "rollback_timeout": 4}},
         "limits.gate"),
        ({"switcher": {"pid": "1"}}, "switcher"),
        ({"timer": {"kind": "cron"}}, "timer"),
        ({"gcroots": "x"}, "gcroots"),
        ({"surprise": 1}, "surprise"),
        ({"started_at": True}, "started_at"),
    ],
)  # fmt: skip
def test_a_damaged_state_is_refused_naming_the_field(
    tmp_path: Path, change: dict[str, object], field: str
) -> None:
    files = StateFile(tmp_path)
    data = sample().to_json() | change
    files.path.write_text(json.dumps(data))
    with pytest.raises(KeelError, match=rf"state.json: {field}\b.*damaged"):
        files.read()


@pytest.mark.parametrize("text", ["", "{", '{"a": 1, "a": 2}', "[]"])
def test_a_truncated_or_garbled_state_is_refused(tmp_path: Path, text: str) -> None:
    files = StateFile(tmp_path)
    files.path.write_text(text)
    with pytest.raises(KeelError, match="damaged"):
        files.read()


def test_the_lock_is_exclusive_and_seen_from_outside(tmp_path: Path) -> None:
    first, second = Lock(tmp_path), Lock(tmp_path)
    assert not second.held_elsewhere()
    assert first.try_acquire()
    assert second.held_elsewhere()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()


def test_a_process_reference_outlives_pid_reuse() -> None:
    me = ProcessRef.of(os.getpid())
    assert me is not None
    assert me.alive()
    assert not ProcessRef(me.pid, me.start + 1).alive()  # same pid, another process
    assert not ProcessRef(me.pid, me.start + 1).signal(0)


def test_a_state_from_an_earlier_boot_is_not_in_progress(tmp_path: Path) -> None:
    files = StateFile(tmp_path)
    state = sample()
    assert state.in_progress  # written by this boot
    state.boot_id = "00000000-0000-0000-0000-000000000000"
    files.write(state)
    again = files.read()
    assert again is not None
    assert not again.in_progress
    assert again.interrupted_by_reboot
    assert not again.finished
