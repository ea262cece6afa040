"""``keel switch`` against generation fixtures, as an operator runs it (``--timer process``).

Every test drives the real CLI in its own process; the systems are the
fixtures of lab.py, which record what they were asked to do and re-point the
running-system link. Nothing waits on a fixed sleep: the tests wait for the
state file, the running link or the ledger to say what happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from keel.watch.children import pidfd_supported

from tests.integration.safeswitch.lab import Lab, wait_for
from tests.integration.watch_support import http_stub

pytestmark = pytest.mark.skipif(
    not pidfd_supported(), reason="activations run as pidfd-watched children (Linux 5.3+)"
)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    lab = Lab(tmp_path / "lab")
    lab.boot(lab.system("gen-a"))
    lab.config()
    return lab


def timer_pid(lab: Lab) -> int:
    state = lab.state()
    assert state is not None
    return int(state["timer"]["pid"])


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def entries(lab: Lab, kind: str) -> list[dict[str, object]]:
    return [e for e in lab.ledger_entries() if e["source"] == "safeswitch" and e["kind"] == kind]


def test_a_good_switch_commits(lab: Lab) -> None:
    old, new = lab.running(), str(lab.system("gen-b"))
    result = lab.switch(Path(new), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "committed"
    assert report["old"] == old
    assert report["new"] == new
    assert report["generation"] == "system-2-link"
    # Activated with `test` (never `switch`), made the boot default only after the gate.
    assert lab.calls() == ["test gen-b", "boot gen-b"]
    assert lab.running() == new
    assert lab.profile_system() == new
    assert lab.generations() == ["system-1-link", "system-2-link"]
    assert lab.boot_default() == new
    # The timer is disarmed, the GC roots are gone, the ledger has both systems.
    state = lab.state()
    assert state is not None
    assert state["phase"] == "committed"
    wait_for(lambda: not pid_alive(state["timer"]["pid"]), "the timer process to be gone", 10)
    assert list(lab.gcroots.iterdir()) == []
    (committed,) = entries(lab, "committed")
    assert committed["data"]["old"] == old  # type: ignore[index]
    assert committed["data"]["new"] == new  # type: ignore[index]
    assert committed["subject"] == report["id"]
    assert [e["kind"] for e in lab.ledger_entries()] == ["started", "committed"]


def test_a_failing_check_rolls_back_and_alerts(lab: Lab) -> None:
    with http_stub(lambda server, path, body: (200, {"ok": True})) as hook:
        watch_json = lab.root / "watch.json"
        watch_json.write_text(
            json.dumps({"alerts": {"ops": {"type": "webhook", "url": f"{hook.url}/hook"}}})
        )
        lab.config(alerts={"watch_config": str(watch_json), "routes": ["ops"]})
        bad = lab.system("gen-b", "break")
        result = lab.switch(bad, "--json")
        assert result.returncode == 1, result.stderr
        report = json.loads(result.stdout)
        assert report["outcome"] == "rolled-back"
        assert report["reason"] == "check health failed: exited with status 1"
        assert lab.calls() == ["test gen-b", "test gen-a"]
        assert lab.running() == report["old"]
        assert lab.generations() == ["system-1-link"]  # the profile as it was
        assert lab.profile_system() == report["old"]
        (rolled,) = entries(lab, "rolled-back")
        data = rolled["data"]
        assert data["old"] == report["old"]  # type: ignore[index]
        assert data["new"] == str(bad)  # type: ignore[index]
        assert data["failed_checks"] == [  # type: ignore[index]
            {"name": "health", "detail": "exited with status 1"}
        ]
        # The alert went through watch's route before the switch exited.
        (_, path, body) = hook.requests[0]
        assert path == "/hook"
        assert body["source"] == "keel-safeswitch"
        assert body["kind"] == "rolled-back"
        assert body["incident"] == report["id"]
        assert "check health failed" in body["text"]
    kinds = [(e["kind"], e["data"].get("outcome")) for e in lab.ledger_entries()]
    assert ("alert", "sent") in kinds


def test_an_activation_that_exits_non_zero_rolls_back(lab: Lab) -> None:
    result = lab.switch(lab.system("gen-b", "fail"))
    assert result.returncode == 1
    assert "activation failed: switch-to-configuration test exited with status 1" in result.stdout
    assert "a unit did not start" in result.stdout  # the log's tail is shown
    assert lab.calls() == ["test gen-b", "test gen-a"]
    assert lab.running().endswith("gen-a")
    assert lab.generations() == ["system-1-link"]


def test_a_hanging_activation_rolls_back_at_the_deadline(lab: Lab) -> None:
    lab.config(gate=1, deadline=3)
    started = time.monotonic()
    result = lab.switch(lab.system("gen-b", "hang"))
    assert result.returncode == 1
    assert time.monotonic() - started >= 3
    assert "activation did not finish within the deadline (3 s)" in result.stdout
    assert lab.running().endswith("gen-a")
    # The hung activation was stopped, its process group with it.
    hung = subprocess.run(["pgrep", "-f", f"{lab.root}.*gen-b"], capture_output=True, check=False)
    assert hung.returncode == 1, hung.stdout


def test_sigkill_mid_gate_is_rolled_back_by_the_process_timer(lab: Lab) -> None:
    # A check that never answers keeps the gate open until the deadline, however
    # slowly this test gets to the kill.
    slow = {"type": "command", "command": "sleep 60", "timeout": 90, "name": "slow"}
    lab.config(gate=1, deadline=10, checks=[slow])
    new = lab.system("gen-b")
    switcher = lab.spawn_switch(new)
    wait_for(lambda: (lab.state() or {}).get("phase") == "gating", "the gate to open")
    assert lab.running() == str(new)
    switcher.send_signal(signal.SIGKILL)
    switcher.wait()
    # The switcher is gone; its timer process is not.
    assert pid_alive(timer_pid(lab))
    status = json.loads(
        lab.keel("switch", "status", "--config", str(lab.config_path), "--json").stdout
    )
    assert status["switch"]["in_progress"]
    assert not status["switch"]["switcher"]["alive"]
    assert status["switch"]["timer"]["armed"]
    wait_for(lambda: lab.running().endswith("gen-a"), "the timer's rollback", timeout=120)
    final = wait_for(
        lambda: (s := lab.state()) and s["phase"] == "rolled-back" and s, "the final state", 30
    )
    assert final["rolled_back_by"] == "timer"
    assert "the rollback timer fired" in final["reason"]
    assert lab.calls() == ["test gen-b", "test gen-a"]
    assert lab.generations() == ["system-1-link"]
    (rolled,) = entries(lab, "rolled-back")
    assert rolled["data"]["by"] == "timer"  # type: ignore[index]
    # The check the dead switcher ran was its child: gone with the kill or left to finish,
    # it changes nothing.


def test_two_switches_at_once_the_second_is_refused(lab: Lab) -> None:
    lab.config(gate=60, deadline=90)
    first = lab.spawn_switch(lab.system("gen-b"))
    try:
        wait_for(lambda: (lab.state() or {}).get("phase") == "gating", "the first gate")
        second = lab.switch(lab.system("gen-c"))
        assert second.returncode == 2
        assert "refused: another switch is in progress (pid" in second.stdout
        assert "gen-c" not in " ".join(lab.calls())
    finally:
        first.send_signal(signal.SIGTERM)  # roll the first one back
        assert first.wait(timeout=60) == 1
    assert lab.running().endswith("gen-a")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda lab: lab.root / "missing", "does not exist"),
        (lambda lab: lab.root, "is not a NixOS system: it has no bin/switch-to-configuration"),
        (lambda lab: lab.root / "calls-file", "is not a directory"),
        (lambda lab: lab.root / "a\nb", "a path with control characters"),
    ],
)
def test_a_missing_or_bogus_toplevel_changes_nothing(lab: Lab, make: object, message: str) -> None:
    (lab.root / "calls-file").write_text("")
    before = sorted(str(p) for p in lab.root.rglob("*"))
    result = lab.switch(make(lab))  # type: ignore[operator]
    assert result.returncode == 2
    assert message in result.stdout
    assert "Traceback" not in result.stderr
    assert sorted(str(p) for p in lab.root.rglob("*")) == before
    assert lab.calls() == []
    assert lab.state() is None


def test_an_unknown_running_system_is_refused(lab: Lab) -> None:
    result = lab.switch(lab.system("gen-b"), "--current", str(lab.root / "nowhere"))
    assert result.returncode == 2
    assert "the running system is unknown" in result.stdout
    assert lab.calls() == []


def test_a_rollback_that_fails_exits_3_naming_the_state(lab: Lab) -> None:
    lab.behave("gen-a", "fail")  # the old system cannot be activated any more
    result = lab.switch(lab.system("gen-b", "break"))
    assert result.returncode == 3
    out = result.stdout
    assert "ROLLBACK FAILED, the host needs an operator" in out
    assert f"running now:   {lab.root}/systems/gen-a" in out  # the failed activation re-pointed
    assert f"boot default:  {lab.root}/systems/gen-a" in out
    assert "kept alive by" in out
    assert "keel switch rollback" in out
    state = lab.state()
    assert state is not None
    assert state["phase"] == "needs-operator"
    # The old system stays rooted for the operator.
    assert any(p.name.endswith("-old") for p in lab.gcroots.iterdir())
    (failed,) = entries(lab, "rollback-failed")
    assert "then the rollback failed" in failed["data"]["reason"]  # type: ignore[index]


def test_a_failed_commit_restores_the_profile(lab: Lab) -> None:
    result = lab.switch(lab.system("gen-b", "fail-boot"))
    assert result.returncode == 1
    assert "commit failed: switch-to-configuration boot exited with status 1" in result.stdout
    assert lab.calls() == ["test gen-b", "boot gen-b", "test gen-a", "boot gen-a"]
    assert lab.generations() == ["system-1-link"]
    assert lab.profile_system().endswith("gen-a")
    assert lab.boot_default().endswith("gen-a")


def test_interrupting_the_switcher_rolls_back(lab: Lab) -> None:
    lab.config(gate=60, deadline=90)
    switcher = lab.spawn_switch(lab.system("gen-b"))
    wait_for(lambda: (lab.state() or {}).get("phase") == "gating", "the gate")
    switcher.send_signal(signal.SIGINT)
    assert switcher.wait(timeout=60) == 1
    assert lab.state()["reason"] == "interrupted by SIGINT"  # type: ignore[index]
    assert lab.running().endswith("gen-a")


def test_a_hangup_does_not_stop_a_switch(lab: Lab) -> None:
    lab.config(gate=2, deadline=30)
    switcher = lab.spawn_switch(lab.system("gen-b"))
    wait_for(lambda: (lab.state() or {}).get("phase") == "gating", "the gate")
    switcher.send_signal(signal.SIGHUP)  # the operator's SSH session dropped
    assert switcher.wait(timeout=60) == 0
    assert lab.running().endswith("gen-b")


def test_an_operator_rollback_during_the_gate(lab: Lab) -> None:
    lab.config(gate=60, deadline=90)
    switcher = lab.spawn_switch(lab.system("gen-b"))
    wait_for(lambda: (lab.state() or {}).get("phase") == "gating", "the gate")
    result = lab.keel("switch", "rollback", "--config", str(lab.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "asking its switcher" in result.stdout
    assert switcher.wait(timeout=30) == 1
    assert lab.running().endswith("gen-a")


def test_an_interrupted_switch_blocks_the_next_until_rolled_back(lab: Lab) -> None:
    lab.config(gate=60, deadline=120)
    switcher = lab.spawn_switch(lab.system("gen-b"))
    wait_for(lambda: (lab.state() or {}).get("phase") == "gating", "the gate")
    switcher.kill()
    switcher.wait()
    refused = lab.switch(lab.system("gen-c"))
    assert refused.returncode == 2
    assert "was interrupted (gating) and is not rolled back yet" in refused.stdout
    # An operator does not wait for the timer.
    taken = lab.keel("switch", "rollback", "--config", str(lab.config_path))
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert "rolled back by an operator" in taken.stdout
    assert lab.running().endswith("gen-a")
    wait_for(lambda: not pid_alive(timer_pid(lab)), "the timer to be disarmed", 10)
    lab.config(gate=0.5, deadline=30)
    assert lab.switch(lab.system("gen-c")).returncode == 0


def test_rollback_with_no_switch_returns_to_the_previous_generation(lab: Lab) -> None:
    assert lab.switch(lab.system("gen-b")).returncode == 0
    result = lab.keel("switch", "rollback", "--config", str(lab.config_path), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["outcome"] == "rolled-back"
    assert lab.running().endswith("gen-a")
    assert lab.profile_system().endswith("gen-a")
    assert os.readlink(lab.profile) == "system-1-link"
    assert lab.boot_default().endswith("gen-a")
    # Nothing older than generation 1: refused.
    again = lab.keel("switch", "rollback", "--config", str(lab.config_path))
    assert again.returncode == 2
    assert "no generation older than the current one" in again.stdout


def test_status_and_history(lab: Lab) -> None:
    empty = lab.keel("switch", "status", "--config", str(lab.config_path))
    assert "no switch since boot" in empty.stdout
    assert lab.switch(lab.system("gen-b")).returncode == 0
    assert lab.switch(lab.system("gen-c", "break")).returncode == 1
    status = json.loads(
        lab.keel("switch", "status", "--config", str(lab.config_path), "--json").stdout
    )
    assert status["switch"]["phase"] == "rolled-back"
    assert status["system"]["profile_link"] == "system-2-link"
    history = json.loads(
        lab.keel("switch", "history", "--config", str(lab.config_path), "--json").stdout
    )
    assert [(h["outcome"], Path(h["new"]).name) for h in history] == [
        ("committed", "gen-b"),
        ("rolled-back", "gen-c"),
    ]
    table = lab.keel("switch", "history", "--config", str(lab.config_path)).stdout
    assert "gen-b -> gen-c" in table
    assert "check health failed" in table


def test_a_damaged_state_file_is_named_and_refuses(lab: Lab) -> None:
    (lab.run_dir / "state.json").write_text('{"version": 1, "phase": "gat')
    result = lab.switch(lab.system("gen-b"))
    assert result.returncode == 2
    assert "state.json: invalid JSON" in result.stdout
    assert "damaged" in result.stdout
    status = lab.keel("switch", "status", "--config", str(lab.config_path))
    assert status.returncode == 1
    assert "damaged" in status.stderr
    assert "Traceback" not in status.stderr


def test_bad_options_are_refused_before_anything(lab: Lab) -> None:
    result = lab.switch(lab.system("gen-b"), "--gate", "30", "--deadline", "10")
    assert result.returncode == 2
    assert "--gate/--deadline: the deadline (10 s) must be longer than the gate (30 s)" in (
        result.stderr
    )
    assert lab.calls() == []


def test_the_gate_alone(lab: Lab) -> None:
    config = str(lab.config_path)
    held = lab.keel("switch", "check", "--config", config, "--gate", "0.5", "--json")
    assert held.returncode == 0, held.stdout + held.stderr
    report = json.loads(held.stdout)
    assert report["held"]
    assert report["checks"][0]["verdict"] == "pass"
    (lab.root / "health").write_text("broken\n")
    failed = lab.keel("switch", "check", "--config", config, "--gate", "0.5")
    assert failed.returncode == 1
    assert "gate failed: health: exited with status 1" in failed.stdout
    skipped = lab.keel(
        "switch", "check", "--config", config, "--gate", "0.5", "--skip-check", "health"
    )
    assert skipped.returncode == 0
    unknown = lab.keel("switch", "check", "--config", config, "--skip-check", "nope")
    assert unknown.returncode == 2
    assert "--skip-check nope: no such check (the checks: health)" in unknown.stderr
    assert lab.calls() == []  # nothing was switched
