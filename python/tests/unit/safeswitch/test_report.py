"""The words people read: history rows, the host's state after a failed rollback, status."""

from __future__ import annotations

import io

from keel.safeswitch.report import (
    HostFacts,
    Output,
    history,
    history_table,
    host_state,
    short,
    status_lines,
)


def entry(kind: str, subject: str, **data: object) -> dict[str, object]:
    return {
        "kind": kind,
        "subject": subject,
        "ts": f"2026-01-01T00:00:0{len(subject) % 10}.000000Z",
        "data": data,
    }


def test_history_pairs_each_start_with_its_outcome() -> None:
    rows = history(
        [
            entry("started", "a", old="/o", new="/n1"),
            entry("committed", "a", old="/o", new="/n1"),
            entry("started", "b", old="/n1", new="/n2"),
            entry("rolled-back", "b", old="/n1", new="/n2", reason="check x failed", by="switcher",
                  failed_checks=[{"name": "x", "detail": "exit 1"}]),
            entry("started", "c", old="/n1", new="/n3"),
            entry("started", "d", old="/n1", new="/n4"),
        ],
        in_progress="d",
    )  # fmt: skip
    assert [(r["id"], r["outcome"]) for r in rows] == [
        ("a", "committed"),
        ("b", "rolled-back"),
        ("c", "interrupted"),
        ("d", "in-progress"),
    ]
    assert rows[1]["reason"] == "check x failed"
    assert rows[1]["failed_checks"] == [{"name": "x", "detail": "exit 1"}]
    headers, table = history_table(rows)
    assert headers[2] == "outcome"
    assert table[2][2] == "interrupted (no outcome recorded: reboot?)"
    assert table[1][3] == "n1 -> n2"


def test_store_paths_are_shortened_without_their_hash() -> None:
    assert short("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web1-26.05") == (
        "nixos-system-web1-26.05"
    )
    assert short("/tmp/lab/systems/gen-a") == "gen-a"
    assert short(None) == "-"


def test_the_host_state_after_a_failed_rollback_names_every_way_out() -> None:
    facts = HostFacts(
        running="/nix/store/new",
        current_link="/run/current-system",
        profile="/nix/var/nix/profiles/system",
        profile_system="/nix/store/old",
        profile_link="system-41-link",
    )
    text = "\n".join(host_state(facts, old="/nix/store/old", gcroot="/gc/x-old", log="/run/r.log"))
    assert "running now:   /nix/store/new (/run/current-system)" in text
    assert "boot default:  /nix/store/old (/nix/var/nix/profiles/system -> system-41-link" in text
    assert "(kept alive by /gc/x-old)" in text
    assert "/nix/store/old/bin/switch-to-configuration test" in text
    assert "reboot                          (starts the old system)" in text
    assert "rollback log:  /run/r.log" in text


def test_status_of_a_switch_whose_switcher_died() -> None:
    status = {
        "system": {"running": "/n", "profile_link": "system-2-link", "profile_system": "/o"},
        "switch": {
            "id": "s", "phase": "gating", "in_progress": True, "old": "/o", "new": "/n",
            "started_at": 0, "deadline_at": 100, "seconds_left": 42.0,
            "timer": {"kind": "systemd", "unit": "keel-safeswitch-rollback-s.timer", "armed": True},
            "switcher": {"pid": 7, "alive": False},
            "checks": [{"name": "watch", "verdict": "pass", "detail": "1 agent healthy"}],
        },
    }  # fmt: skip
    text = "\n".join(status_lines(status))
    assert "switch s: IN PROGRESS (gating)" in text
    assert "(42s left)" in text
    assert "timer:    systemd keel-safeswitch-rollback-s.timer (armed)" in text
    assert "pid 7 is gone" in text
    assert "check watch: pass: 1 agent healthy" in text
    assert status_lines({"system": {}, "switch": None})[-1] == "no switch since boot"


class Gone(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(5, "Input/output error")


def test_output_goes_quiet_when_the_terminal_is_gone() -> None:
    out = Output(json_mode=False, stream=Gone())
    out.line("first")
    assert out.detached
    out.line("second")  # no exception, nothing written
