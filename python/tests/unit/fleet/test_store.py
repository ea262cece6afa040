"""The fleet's state file: what it keeps, how much, and what it refuses to open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from keel.fleet.store import Cosignature, FleetStore, StoreError
from keel.fleet.witness import FORKED, Alarm, Witnessed


def record(node: str, size: int, at: int = 1) -> Witnessed:
    return Witnessed(node, "key", size, bytes([size % 256]) * 32, f"note {size}\n", at)


def test_witnessed_records_and_their_history(tmp_path: Path) -> None:
    store = FleetStore.open(tmp_path / "fleet.db")
    assert store.witnessed("n") is None
    for size in (1, 2, 2, 3, 4, 5):
        store.save_witnessed(record("n", size), keep=3)
    assert store.witnessed("n") == record("n", 5)
    assert [size for size, _, _ in store.history("n")] == [3, 4, 5]  # the same size is kept once
    store.save_witnessed(record("m", 9), keep=3)
    assert [w.node for w in store.all_witnessed()] == ["m", "n"]
    store.close()
    again = FleetStore.open(tmp_path / "fleet.db")
    assert again.witnessed("n") == record("n", 5)


def test_alarms_are_kept_once_per_evidence_and_forgotten_on_request(tmp_path: Path) -> None:
    store = FleetStore.open(tmp_path / "fleet.db")
    alarm = Alarm("n", FORKED, "it forked", record("n", 5), "bad note\n", "key")
    first = store.add_alarm(alarm, 10.0)
    assert store.add_alarm(alarm, 11.0) == first
    other = store.add_alarm(Alarm("n", FORKED, "again", record("n", 5), "worse\n", "key"), 12.0)
    assert [a.id for a in store.alarms("n")] == [first.id, other.id]
    assert store.alarms("m") == []
    assert first.to_json()["presented"] == {"ledger_key": "key", "note": "bad note\n"}
    store.save_witnessed(record("n", 5), keep=3)
    assert store.forget("n") == (1, 2)
    assert store.alarms() == []
    assert store.witnessed("n") is None
    assert store.history("n") == []


def test_pins_cosignatures_and_reports(tmp_path: Path) -> None:
    store = FleetStore.open(tmp_path / "fleet.db")
    assert store.pin_witness_key("w", "k1", 1.0) == "k1"
    assert store.pin_witness_key("w", "k2", 2.0) == "k1"
    assert store.unpin("w")
    assert store.pin_witness_key("w", "k2", 3.0) == "k2"
    store.save_cosignature(Cosignature("w", "k2", 5, "note\n", 7))
    store.save_cosignature(Cosignature("w", "k2", 6, "note2\n", 8))
    assert store.cosignatures() == [Cosignature("w", "k2", 6, "note2\n", 8)]
    store.save_report("n", {"host": "h"}, 4.0)
    seen = store.reports()["n"]
    assert (seen.report, seen.at) == ({"host": "h"}, 4.0)


def test_files_that_are_not_fleet_state_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE x (y)")
    with pytest.raises(StoreError, match="not a keel fleet state file"):
        FleetStore.open(other)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        FleetStore.open(garbage)
    newer = tmp_path / "newer.db"
    FleetStore.open(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer keel"):
        FleetStore.open(newer)
