"""``keel.ledger.store`` and ``keel.ledger.keys`` on real SQLite files."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from keel.ledger import AsyncLedger, EntryError, Ledger, StoreError, TamperError, core
from keel.ledger.errors import KeyFileError, LedgerError, MalformedError
from keel.ledger.keys import create_signer, load_signer, load_verifier, signer_for


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


def test_open_append_close(tmp_path: Path) -> None:
    db = tmp_path / "deep" / "state" / "ledger.db"
    ledger = Ledger.open(db, clock=FakeClock())
    assert ledger.size() == 0
    assert ledger.root() == core.EMPTY_ROOT
    assert ledger.append(source="watch", kind="restart", subject="web", data={"n": 1}) == 0
    assert ledger.append(source="egress", kind="blocked") == 1
    indices = ledger.append_many(
        [{"source": "mesh", "kind": "sent", "data": {"i": i}} for i in range(5)]
    )
    assert indices == range(2, 7)
    ledger.close()
    ledger.close()  # idempotent

    connection = sqlite3.connect(db)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA application_id").fetchone()[0] == 0x6B65656C
    connection.close()

    with Ledger.open(db, create=False) as ledger:
        entries = ledger.entries()
        assert [i for i, _ in entries] == list(range(7))
        first = entries[0][1]
        assert (first.source, first.kind, first.subject, first.data) == (
            "watch",
            "restart",
            "web",
            {"n": 1},
        )
        assert first.ts == "2023-11-14T22:13:20.500000Z"
        assert [i for i, _ in ledger.tail(2)] == [5, 6]
        assert ledger.tail(0) == []
        # The root from stored subtrees is the root of the entries.
        leaves = [core.leaf_hash(entry.canonical()) for _, entry in entries]
        builder = core.TreeBuilder()
        for leaf in leaves:
            builder.append(leaf)
        assert ledger.root() == builder.root()
    with pytest.raises(StoreError, match="closed"):
        ledger.size()


def test_bad_batches_write_nothing(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        ledger.append(source="a", kind="b")
        with pytest.raises(EntryError, match="entry data must be a JSON object"):
            ledger.append_many(
                [{"source": "a", "kind": "b"}, {"source": "a", "kind": "b", "data": [1]}]
            )
        with pytest.raises(EntryError, match="unknown field 'colour'"):
            ledger.append_many([{"source": "a", "kind": "b", "colour": "red"}])
        with pytest.raises(EntryError, match="source must be"):
            ledger.append_many([{"kind": "b"}])
        assert ledger.append_many([]) == range(1, 1)
        assert ledger.size() == 1


def test_proofs_from_the_store(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        ledger.append_many({"source": "s", "kind": "k", "data": {"i": i}} for i in range(300))
        for index, size in [(0, 1), (0, 300), (299, 300), (128, 129), (77, 200)]:
            proof = ledger.inclusion_proof(index, size)
            assert proof.root == ledger.root(size)
            proof.verify()
        for size1, size2 in [(1, 300), (128, 256), (100, 101), (300, 300), (7, 9)]:
            consistency = ledger.consistency_proof(size1, size2)
            assert (consistency.root1, consistency.root2) == (
                ledger.root(size1),
                ledger.root(size2),
            )
            consistency.verify()
        with pytest.raises(LedgerError, match="out of range"):
            ledger.root(301)
        with pytest.raises(LedgerError, match="not in a tree"):
            ledger.inclusion_proof(5, 5)
        with pytest.raises(LedgerError, match="0 < OLD <= NEW"):
            ledger.consistency_proof(0, 5)


def test_checkpoints_and_verify(tmp_path: Path) -> None:
    signer = core.Signer("test/keel/ledger", bytes(range(32)))
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        empty = ledger.checkpoint(signer)
        assert core.open_checkpoint(empty.note, signer.verifier).size == 0
        ledger.append_many({"source": "s", "kind": "k"} for _ in range(10))
        first = ledger.checkpoint(signer)
        assert ledger.checkpoint(signer) == first  # nothing new to sign
        head = core.open_checkpoint(first.note, signer.verifier)
        assert (head.size, head.root) == (10, ledger.root())
        ledger.append(source="s", kind="k")
        report = ledger.verify(signer.verifier, [("kept copy", first.note)])
        assert (report.size, report.checkpoints, report.external) == (11, 2, 1)
        # Without a key, roots are still checked but signatures cannot be.
        assert not ledger.verify(None).signatures_checked
        stranger = core.Signer("test/keel/ledger", bytes(32))
        with pytest.raises(TamperError, match="not signed by a trusted key") as caught:
            ledger.verify(stranger.verifier)
        assert caught.value.index == 0


def test_foreign_files_via_the_api(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x00" * 100 + b"not sqlite" * 100)
    with pytest.raises(StoreError, match="not a SQLite database"):
        Ledger.open(junk)
    with pytest.raises(StoreError, match="no ledger at"):
        Ledger.open(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(StoreError, match="is a directory"):
        Ledger.open(tmp_path)
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StoreError, match="empty database"):
        Ledger.open(empty, create=False)
    Ledger.open(empty).close()  # but opening to append makes it a ledger
    assert Ledger.open(empty, create=False).size() == 0


def test_threads_share_one_ledger(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        got: list[int] = []

        def work(name: str) -> None:
            for i in range(25):
                got.append(ledger.append(source=name, kind="tick", data={"i": i}))

        threads = [threading.Thread(target=work, args=(f"t{n}",)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(got) == list(range(100))

        async def from_asyncio() -> list[int]:
            return list(
                await asyncio.gather(
                    *(asyncio.to_thread(ledger.append, source="a", kind="b") for _ in range(10))
                )
            )

        assert sorted(asyncio.run(from_asyncio())) == list(range(100, 110))
        assert ledger.verify(None).size == 110


def test_async_ledger_group_commits(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"

    async def scenario() -> None:
        async with await AsyncLedger.open(db) as ledger:
            transactions = []
            append_raw = ledger.ledger.append_raw

            def counting(raws: Sequence[bytes]) -> int:
                transactions.append(len(raws))
                return append_raw(raws)

            ledger.ledger.append_raw = counting  # type: ignore[method-assign]
            indices = await asyncio.gather(
                *(ledger.append(source="mesh", kind="sent", data={"i": i}) for i in range(300))
            )
            assert sorted(indices) == list(range(300))
            # Appends made while a transaction was in flight shared the next one.
            assert sum(transactions) == 300
            assert len(transactions) < 300
            with pytest.raises(EntryError):
                await ledger.append(source="", kind="sent")
            # The loop keeps running while appends are in flight.
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(ticker())
            await asyncio.gather(*(ledger.append(source="a", kind="b") for _ in range(50)))
            task.cancel()
            assert ticks > 0
            # Appends queued right before closing are still written.
            pending = [asyncio.ensure_future(ledger.append(source="late", kind="k"))]
            await asyncio.sleep(0)
        assert sorted([await p for p in pending]) == [350]
        with pytest.raises(StoreError, match="closed"):
            await ledger.append(source="a", kind="b")

    asyncio.run(scenario())
    with Ledger.open(db, create=False) as ledger:
        assert ledger.verify(None).size == 351
        by_source = [entry.source for _, entry in ledger.entries()]
        assert by_source.count("mesh") == 300
        assert sorted(entry.data.get("i", -1) for _, entry in ledger.entries()[:300]) == list(
            range(300)
        )


def test_size_mismatch_blocks_appends(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        ledger.append_many({"source": "s", "kind": "k"} for _ in range(10))
    connection = sqlite3.connect(db)
    with connection:
        connection.execute("DELETE FROM leaves WHERE idx = 9")
    connection.close()
    with Ledger.open(db) as ledger, pytest.raises(TamperError, match="records 10 entries"):
        ledger.append(source="s", kind="k")


def test_key_file_created_private_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "ledger.key"
    # A directory that does not exist is a typo, not a place to make a key in.
    with pytest.raises(KeyFileError, match=r"there is no directory .*/keys \(a mistyped"):
        create_signer(path, "host/keel/ledger")
    assert not path.parent.exists()
    path.parent.mkdir()
    old_umask = os.umask(0)
    try:
        signer = create_signer(path, "host/keel/ledger")
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_signer(path) == signer
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind
    # A second creator finds the first key and keeps it.
    assert create_signer(path, "other/name") == signer

    racers: list[core.Signer] = []
    raced = tmp_path / "raced.key"
    threads = [
        threading.Thread(target=lambda: racers.append(create_signer(raced, "race/log")))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(racers)) == 1
    assert load_signer(raced) == racers[0]


def test_key_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no signing key"):
        load_signer(tmp_path / "none.key")
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"\xff\xfe")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_signer(bad)
    signer = create_signer(tmp_path / "good.key", "host/keel/ledger")
    vkey = tmp_path / "good.vkey"
    vkey.write_text(f"{signer.verifier}\n")
    assert load_verifier(str(vkey)) == signer.verifier
    assert load_verifier(str(signer.verifier)) == signer.verifier
    vkey.write_text("nonsense\n")
    with pytest.raises(MalformedError, match=r"good\.vkey"):
        load_verifier(str(vkey))


def test_checkpoint_if_grown_signs_only_what_is_new(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with Ledger.open(db, clock=FakeClock()) as ledger:
        signer = signer_for(ledger)
        assert ledger.checkpoint_if_grown(signer) is None  # an empty ledger: nothing to hold
        assert not ledger.head_path.exists()
        ledger.append(source="s", kind="k")
        first = ledger.checkpoint_if_grown(signer)
        assert first is not None
        assert first.size == 1
        assert ledger.head_path == tmp_path / "ledger.db.head"
        assert ledger.head_path.read_text() == first.note
        assert ledger.checkpoint_if_grown(signer) is None  # nothing appended since
        ledger.append_many([{"source": "s", "kind": "k"}] * 3)
        second = ledger.checkpoint_if_grown(signer)
        assert second is not None
        assert second.size == 4
        assert ledger.head_path.read_text() == second.note
        # A missing head file (a ledger from before it existed) is written, with no new row.
        ledger.head_path.unlink()
        assert ledger.checkpoint_if_grown(signer) == second
        assert ledger.head_path.read_text() == second.note
        assert [c.size for c in ledger.checkpoints()] == [1, 4]
        assert ledger.verify(signer.verifier).head == 4
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "ledger.db",
            "ledger.db-shm",
            "ledger.db-wal",
            "ledger.db.head",
            "ledger.key",
        ]  # no temporary file left behind


def test_async_checkpoint_between_batches(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        async with await AsyncLedger.open(tmp_path / "ledger.db") as ledger:
            signer = signer_for(ledger.ledger)
            appends = [ledger.append(source="s", kind="k", data={"n": n}) for n in range(50)]
            await asyncio.gather(*appends[:25])
            signed = await ledger.checkpoint_if_grown(signer)
            await asyncio.gather(*appends[25:])
            last = await ledger.checkpoint_if_grown(signer)
            assert signed is not None
            assert last is not None
            assert await ledger.checkpoint_if_grown(signer) is None
            return [signed.size, last.size]

    sizes = asyncio.run(scenario())
    assert 25 <= sizes[0] <= 50
    assert sizes[1] == 50
    with Ledger.open(tmp_path / "ledger.db", read_only=True) as ledger:
        assert ledger.verify(load_signer(tmp_path / "ledger.key").verifier).head == 50


def test_signer_for_refuses_a_new_key_for_a_signed_ledger(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        ledger.append(source="s", kind="k")
        signer = signer_for(ledger)
        assert (tmp_path / "ledger.key").is_file()
        assert signer_for(ledger) == signer
        ledger.checkpoint(signer)
        (tmp_path / "ledger.key").unlink()
        with pytest.raises(KeyFileError, match="holds 1 checkpoint signed with one: restore"):
            signer_for(ledger)
        assert not (tmp_path / "ledger.key").exists()
