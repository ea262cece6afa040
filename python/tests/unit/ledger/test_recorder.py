"""The recorder: batching, the ledger policy (degraded, never fatal), gaps, checkpoints."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
from keel.ledger import Ledger
from keel.ledger.recorder import MAX_ENTRY, LedgerUnavailable, Recorder


def entries(db: Path) -> list[dict[str, object]]:
    with Ledger.open(db, create=False) as ledger:
        return [e.as_dict() for _, e in ledger.entries()]


async def wait_for(condition: object, what: str, timeout: float = 20.0) -> None:
    assert callable(condition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_records_are_written_in_order_and_counted(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"

    async def scenario() -> None:
        recorder = Recorder(db, "watch", checkpoint_every=None)
        await recorder.start()
        assert recorder.state == "ok"
        for i in range(2500):
            recorder.record("restart", "web", {"n": i})
        assert await recorder.flush()
        assert recorder.status()["appended"] == 2500
        assert recorder.status()["pending"] == 0
        await recorder.close()

    asyncio.run(scenario())
    written = entries(db)
    assert [e["data"] for e in written] == [{"n": i} for i in range(2500)]
    assert {e["source"] for e in written} == {"watch"}


def test_a_ledger_that_cannot_be_opened_degrades_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the ledger's directory should be")
    db = blocker / "ledger.db"

    async def scenario() -> None:
        recorder = Recorder(db, "egress", checkpoint_every=None, retry_every=0.02)
        await recorder.start()  # never raises: the daemon goes on
        assert recorder.state == "degraded"
        assert "cannot open" in str(recorder.status()["problem"])
        recorder.record("denied", "agent-a", {"name": "evil.example"})
        assert recorder.status()["pending"] == 1
        blocker.unlink()
        blocker.mkdir()
        await wait_for(lambda: recorder.status()["appended"] == 1, "the ledger to recover")
        assert recorder.state == "ok"
        assert recorder.status()["problem"] is None
        await recorder.close()

    asyncio.run(scenario())
    assert [e["kind"] for e in entries(db)] == ["denied"]


def test_entries_past_the_bound_are_dropped_and_counted_in_a_gap_entry(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("")
    db = blocker / "ledger.db"

    async def scenario() -> None:
        recorder = Recorder(db, "mesh", checkpoint_every=None, retry_every=0.02, max_pending=10)
        await recorder.start()
        for i in range(25):
            recorder.record("sent", "peer", {"i": i})
        assert recorder.status()["pending"] == 10
        assert recorder.status()["dropped"] == 15
        with pytest.raises(LedgerUnavailable):
            await recorder.record_durable("committed", "x", {}, timeout=0.05)
        blocker.unlink()
        blocker.mkdir()
        await wait_for(lambda: recorder.status()["appended"] == 10, "the backlog")
        await recorder.close()

    asyncio.run(scenario())
    written = entries(db)
    assert written[0]["kind"] == "ledger_gap"
    assert written[0]["data"]["dropped"] == 16  # type: ignore[index]
    assert [e["data"] for e in written[1:]] == [{"i": i} for i in range(10)]


def test_oversized_and_malformed_entries_are_refused_not_written(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"

    async def scenario() -> None:
        recorder = Recorder(db, "mcp", checkpoint_every=None)
        await recorder.start()
        recorder.record("call", "tool", {"result": "x" * MAX_ENTRY})
        recorder.record("bad kind with spaces", "tool", {})
        recorder.record("call", "tool", {"ok": True})
        with pytest.raises(LedgerUnavailable, match="metadata only"):
            await recorder.record_durable("call", "tool", {"blob": "y" * MAX_ENTRY})
        assert await recorder.flush()
        assert recorder.status()["refused"] == 2
        await recorder.close()

    asyncio.run(scenario())
    assert [e["data"] for e in entries(db)] == [{"ok": True}]


def test_durable_records_return_their_index(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"

    async def scenario() -> None:
        recorder = Recorder(db, "safeswitch", checkpoint_every=None)
        await recorder.start()
        recorder.record("begin", "host")
        index = await recorder.record_durable("committed", "host", {"new": "/nix/store/x"})
        assert index == 1
        await recorder.close()
        off = Recorder(None, "safeswitch")
        await off.start()
        off.record("ignored")
        assert off.state == "off"
        with pytest.raises(LedgerUnavailable, match="no ledger"):
            await off.record_durable("committed")
        await off.close()

    asyncio.run(scenario())


def test_checkpoints_are_signed_on_a_schedule_and_at_close(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"

    async def scenario() -> None:
        recorder = Recorder(db, "watch", checkpoint_every=0.05)
        await recorder.start()
        recorder.record("start", "host")
        await wait_for(lambda: recorder.status()["checkpoints"] >= 1, "a periodic checkpoint")
        assert recorder.status()["last_checkpoint_size"] == 1
        recorder.record("stop", "host")
        await recorder.close()
        assert recorder.status()["last_checkpoint_size"] == 2

    asyncio.run(scenario())
    key = db.with_name("ledger.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with Ledger.open(db, create=False) as ledger:
        sizes = [c.size for c in ledger.checkpoints()]
    assert sizes[-1] == 2
    assert sizes == sorted(set(sizes))  # an unchanged head is not stored twice


def test_close_gives_up_after_its_timeout_and_counts_what_was_lost(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("")

    async def scenario() -> None:
        recorder = Recorder(blocker / "ledger.db", "watch", checkpoint_every=None, retry_every=60)
        await recorder.start()
        recorder.record("stop", "host")
        await recorder.close(timeout=0.5)
        assert recorder.stats.lost_at_close == 1

    asyncio.run(scenario())


def test_a_lost_key_is_reported_never_silently_replaced(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"

    async def scenario() -> None:
        first = Recorder(db, "watch", checkpoint_every=60)
        await first.start()
        first.record("start", "host")
        await first.close()  # signs a checkpoint with a new key
        key = db.with_name("ledger.key")
        assert key.exists()
        key.unlink()
        second = Recorder(db, "watch", checkpoint_every=60)
        await second.start()
        second.record("more", "host")
        await second.close()
        assert not key.exists()
        assert "restore the key file" in str(second.status()["checkpoint_problem"])

    asyncio.run(scenario())
