"""Real processes appending at once, and killed with SIGKILL in the middle of it."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from keel.ledger import Ledger

from .conftest import ok

# A child appends forever (or COUNT times), printing each acknowledged index.
# BATCH > 1 appends with append_many, which must be all or nothing.
CHILD = """
import sys
from keel.ledger import Ledger

db, name, count, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ledger = Ledger.open(db)
n = 0
while count < 0 or n < count:
    if batch == 1:
        index = ledger.append(source=name, kind="tick", subject="crash-test", data={"n": n})
        print(index, n, flush=True)
        n += 1
    else:
        indices = ledger.append_many(
            {"source": name, "kind": "tick", "data": {"n": n + i}} for i in range(batch)
        )
        print(indices[0], n, flush=True)
        n += batch
ledger.close()
"""


def start_child(db: Path, name: str, count: int = -1, batch: int = 1) -> subprocess.Popen[str]:
    # stderr goes to a file: read through one buffered stdout object only, or
    # lines read ahead by readline() would be lost to a second reader.
    with (db.parent / f"{name}.stderr").open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), name, str(count), str(batch)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def finish(child: subprocess.Popen[str], timeout: float) -> str:
    """The rest of the child's stdout, once it has exited."""
    assert child.stdout is not None
    child.wait(timeout=timeout)
    rest = child.stdout.read()
    child.stdout.close()
    return rest


def read_acks(child: subprocess.Popen[str], at_least: int, timeout: float = 60) -> list[str]:
    """Lines the child printed, waiting until there are ``at_least`` of them."""
    assert child.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len(lines) < at_least:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"child printed only {len(lines)} lines"
        ready, _, _ = select.select([child.stdout], [], [], remaining)
        if ready:
            line = child.stdout.readline()
            assert line, f"child exited early (exit {child.poll()})"
            lines.append(line)
    return lines


def entries_by_source(db: Path) -> dict[str, list[tuple[int, int]]]:
    """``source -> [(index, n)]`` in index order."""
    with Ledger.open(db, create=False) as ledger:
        found: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for index, entry in ledger.entries():
            found[entry.source].append((index, entry.data["n"]))
    return found


def test_sigkill_mid_append_leaves_a_verified_prefix(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    acknowledged: dict[str, set[tuple[int, int]]] = defaultdict(set)
    batches = {}
    rng = random.Random(os.getpid())
    for round_number in range(3):
        children = {}
        for number in range(3):
            batch = 1 if number < 2 else 25
            name = f"r{round_number}c{number}"
            batches[name] = batch
            children[name] = start_child(db, name, batch=batch)
        printed = {name: read_acks(child, 5) for name, child in children.items()}
        # Let them run on a little, then kill each at a random moment, mid-append.
        for child in children.values():
            time.sleep(rng.uniform(0.0, 0.3))
            child.send_signal(signal.SIGKILL)
        for name, child in children.items():
            out = finish(child, timeout=30)
            assert child.returncode == -signal.SIGKILL
            # A line cut off by the kill (no newline) was not acknowledged.
            complete = "".join(printed[name]) + out
            for line in complete.splitlines(keepends=True):
                if not line.endswith("\n"):
                    continue
                index, n = map(int, line.split())
                acknowledged[name].add((index, n))
        # Whatever was cut off, the ledger verifies...
        ok("ledger", "verify", "--db", db)
        # ...and holds, for each writer, a prefix of what it appended, in order,
        # including everything that was acknowledged.
        found = entries_by_source(db)
        for name in children:
            ns = [n for _, n in found[name]]
            assert ns == list(range(len(ns))), f"{name} holds a non-prefix {ns[:5]}..."
            assert len(ns) % batches[name] == 0, f"{name}: a batch was half written"
            first_of_batch = {(i, n) for i, n in found[name] if n % batches[name] == 0}
            assert acknowledged[name] <= first_of_batch, f"{name} lost acknowledged entries"
    # A checkpoint over the survivors, and the whole ledger still verifies.
    ok("ledger", "checkpoint", "--db", db)
    assert ok("ledger", "verify", "--db", db).startswith("ok: ")


def test_concurrent_appends_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    per_child = 150
    plan = {"single0": 1, "single1": 1, "single2": 1, "batched": 10}
    children = {name: start_child(db, name, per_child, batch) for name, batch in plan.items()}
    # Meanwhile, a reader: every snapshot it takes is a consistent, verifiable tree.
    reads = 0
    with Ledger.open(db) as reader:
        while any(child.poll() is None for child in children.values()):
            report = reader.verify(None)
            if report.size:
                proof = reader.inclusion_proof(report.size - 1, report.size)
                assert proof.root == report.root
                proof.verify()
            before = reader.size()
            last = [index for index, _ in reader.tail(5)]
            # The tail of a tree at least as large as the one seen before.
            assert min(5, before) <= len(last) <= 5
            if last:
                assert last == list(range(last[0], last[0] + len(last)))
                assert last[-1] >= before - 1
            else:
                assert before == 0
            reads += 1
    assert reads > 0
    for name, child in children.items():
        out = finish(child, timeout=300)
        err = (db.parent / f"{name}.stderr").read_text()
        assert child.returncode == 0, f"{name}: {err}"
        assert len(out.splitlines()) == per_child // plan[name]
    report = json.loads(ok("ledger", "verify", "--db", db, "--json"))
    assert report["ok"] is True
    assert report["size"] == per_child * len(plan)
    found = entries_by_source(db)
    indices = sorted(index for entries in found.values() for index, _ in entries)
    assert indices == list(range(per_child * len(plan)))
    for name in plan:
        assert [n for _, n in found[name]] == list(range(per_child)), name
    # Batches stay contiguous even with other writers interleaving.
    batched = [index for index, _ in found["batched"]]
    for start in range(0, per_child, 10):
        assert batched[start + 9] - batched[start] == 9
