"""``keel ledger`` end to end in real processes: round trip, tampering, bad input."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from keel.ledger import Ledger, core

from tests.harness.processes import Lines, Processes

from .conftest import Populated, assert_one_line_error, keel, ok


def sql(db: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    """What an attacker with write access to the file does."""
    connection = sqlite3.connect(db)
    with connection:
        for statement, parameters in statements:
            connection.execute(statement, parameters)
    connection.close()


def rows(db: Path) -> list[tuple[int, bytes, bytes]]:
    connection = sqlite3.connect(db)
    found = connection.execute("SELECT idx, entry, hashes FROM leaves ORDER BY idx").fetchall()
    connection.close()
    return found


def edited(raw: bytes) -> bytes:
    return raw.replace(b'"kind":"restart"', b'"kind":"stopped"')


def rehash_everything(db: Path) -> None:
    """A thorough attacker: recompute every stored hash from the (edited) entries."""
    builder = core.TreeBuilder()
    updates = [
        (
            "UPDATE leaves SET hashes = ? WHERE idx = ?",
            (b"".join(builder.append(core.leaf_hash(entry))), index),
        )
        for index, entry, _ in rows(db)
    ]
    sql(db, *updates)


def verify(populated: Populated, *extra: str | Path) -> tuple[int, str, str]:
    result = keel("ledger", "verify", "--db", populated.db, *extra)
    return result.returncode, result.stdout, result.stderr


def assert_bad(populated: Populated, index: int, needle: str, *extra: str | Path) -> None:
    code, _, err = verify(populated, *extra)
    assert code == 1, err
    assert_one_line_error(err, needle)
    # The JSON form names the same first bad index.
    result = keel("ledger", "verify", "--db", populated.db, "--json", *extra)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["firstBadIndex"] == index, report


def test_round_trip(populated: Populated, tmp_path: Path) -> None:
    db = populated.db
    out = ok("ledger", "verify", "--db", db, "--checkpoint", populated.checkpoints[12])
    assert out.startswith("ok: 20 entries, root ")
    assert "3 stored checkpoints" in out
    assert "extends the 1 checkpoint file given" in out

    lines = ok("ledger", "tail", "--db", db, "-n", "3", "--json").splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["index"] for e in entries] == [17, 18, 19]
    assert entries[-1]["data"] == {"attempt": 19}
    assert entries[-1]["source"] == "watch"
    assert entries[-1]["subject"] == "agent1"
    human = ok("ledger", "tail", "--db", db, "-n", "2")
    assert '{"attempt":19}' in human.splitlines()[-1]

    # Proofs printed by `prove` check out offline, against the signed roots.
    signed = populated.checkpoints[12].read_text().split("\n")
    proof_file = tmp_path / "inclusion.json"
    proof_file.write_text(ok("ledger", "prove", "inclusion", "5", "--size", "12", "--db", db))
    proof = json.loads(proof_file.read_text())
    assert set(proof) == {"leafIdx", "treeSize", "root", "leafHash", "proof"}
    assert proof["root"] == signed[2]
    assert proof["treeSize"] == int(signed[1]) == 12
    assert ok("ledger", "verify-proof", proof_file).startswith("valid: leaf 5")
    proof_file.write_text(ok("ledger", "prove", "consistency", "4", "12", "--db", db))
    proof = json.loads(proof_file.read_text())
    assert set(proof) == {"size1", "size2", "root1", "root2", "proof"}
    assert proof["root1"] == populated.checkpoints[4].read_text().split("\n")[2]
    assert ok("ledger", "verify-proof", proof_file).startswith("valid: the tree of size 12")
    bad = keel("ledger", "prove", "inclusion", "20", "--db", db)
    assert bad.returncode == 1
    assert "not in a tree of size 20" in bad.stderr

    # Offline: a copy of the database and the exported verifier key, no signing key.
    vkey = ok("ledger", "key", "--db", db).strip()
    assert json.loads(ok("ledger", "key", "--db", db, "--json"))["verifierKey"] == vkey
    offline = tmp_path / "offline"
    offline.mkdir()
    (offline / "ledger.db").write_bytes(db.read_bytes())
    (offline / "log.vkey").write_text(vkey + "\n")
    for key in (vkey, str(offline / "log.vkey")):
        out = ok(
            "ledger",
            "verify",
            "--db",
            offline / "ledger.db",
            "--verifier-key",
            key,
            "--checkpoint",
            populated.checkpoints[20],
        )
        assert out.startswith("ok: 20 entries")
    no_key = keel("ledger", "verify", "--db", offline / "ledger.db")
    assert no_key.returncode == 1
    assert "--verifier-key" in no_key.stderr


def test_key_file_is_private(populated: Populated) -> None:
    assert populated.key.stat().st_mode & 0o777 == 0o600
    assert populated.key.read_text().startswith("PRIVATE+KEY+")


def test_edited_entry(populated: Populated) -> None:
    raw = rows(populated.db)[7][1]
    sql(populated.db, ("UPDATE leaves SET entry = ? WHERE idx = 7", (edited(raw),)))
    assert_bad(populated, 7, "entry 7 does not match its stored leaf hash")


def test_edited_entry_with_its_leaf_hash(populated: Populated) -> None:
    _, raw, hashes = rows(populated.db)[7]
    new = edited(raw)
    sql(
        populated.db,
        (
            "UPDATE leaves SET entry = ?, hashes = ? WHERE idx = 7",
            (new, core.leaf_hash(new) + hashes[32:]),
        ),
    )
    # Leaf 7 completes the subtree 6..7, whose stored hash no longer matches.
    assert_bad(populated, 6, "entries 6..7 do not match their stored subtree hash")


def test_edited_entry_with_the_whole_tree_rehashed(populated: Populated) -> None:
    raw = rows(populated.db)[9][1]
    sql(populated.db, ("UPDATE leaves SET entry = ? WHERE idx = 9", (edited(raw),)))
    rehash_everything(populated.db)
    # Only the signatures are left to tell: the checkpoint at 4 holds, the one at 12 fails.
    assert_bad(populated, 4, "do not match stored checkpoint")


def test_deleted_entry(populated: Populated) -> None:
    sql(populated.db, ("DELETE FROM leaves WHERE idx = 9", ()))
    assert_bad(populated, 9, "entry 9 is missing (deleted)")


def test_deleted_entry_with_renumbering(populated: Populated) -> None:
    sql(
        populated.db,
        ("DELETE FROM leaves WHERE idx = 9", ()),
        ("UPDATE leaves SET idx = idx - 1 WHERE idx > 9", ()),
        ("UPDATE meta SET value = '19' WHERE key = 'size'", ()),
    )
    rehash_everything(populated.db)
    assert_bad(populated, 4, "stored checkpoint")


def test_reordered_entries(populated: Populated) -> None:
    found = rows(populated.db)
    a, b = found[3], found[10]
    # Swap the entries together with their leaf hashes; the subtree hashes stay.
    sql(
        populated.db,
        ("UPDATE leaves SET entry = ?, hashes = ? WHERE idx = 3", (b[1], b[2][:32] + a[2][32:])),
        ("UPDATE leaves SET entry = ?, hashes = ? WHERE idx = 10", (a[1], a[2][:32] + b[2][32:])),
    )
    assert_bad(populated, 2, "entries 2..3 do not match their stored subtree hash")


def test_reordered_entries_with_the_whole_tree_rehashed(populated: Populated) -> None:
    found = rows(populated.db)
    sql(
        populated.db,
        ("UPDATE leaves SET entry = ? WHERE idx = 1", (found[2][1],)),
        ("UPDATE leaves SET entry = ? WHERE idx = 2", (found[1][1],)),
    )
    rehash_everything(populated.db)
    assert_bad(populated, 0, "first 4 entries do not match stored checkpoint")


def test_truncated_ledger(populated: Populated) -> None:
    sql(populated.db, ("DELETE FROM leaves WHERE idx >= 15", ()))
    assert_bad(populated, 15, "records 20 entries but holds 15")


def test_truncated_ledger_with_its_tracks_covered(populated: Populated) -> None:
    sql(
        populated.db,
        ("DELETE FROM leaves WHERE idx >= 15", ()),
        ("DELETE FROM checkpoints WHERE size > 15", ()),
        ("UPDATE meta SET value = '15' WHERE key = 'size'", ()),
    )
    # What is left is a valid tree of 15 entries, but the head file beside the
    # database still holds the checkpoint of size 20...
    assert_bad(populated, 15, "the ledger went back: it holds 15 entries")
    # ...and without it (the editor removed it too) the tree verifies...
    head = populated.db.with_name("ledger.db.head")
    head.unlink()
    assert verify(populated)[0] == 0
    # ...but is not the tree the auditor's checkpoint of size 20 committed to.
    checkpoint = populated.checkpoints[20]
    assert_bad(populated, 15, "commits to 20", "--checkpoint", checkpoint)


def test_bad_signature_on_a_stored_checkpoint(populated: Populated) -> None:
    connection = sqlite3.connect(populated.db)
    (note,) = connection.execute("SELECT note FROM checkpoints WHERE size = 12").fetchone()
    connection.close()
    forged = note.replace("\n12\n", "\n11\n")
    sql(populated.db, ("UPDATE checkpoints SET note = ?, size = 11 WHERE size = 12", (forged,)))
    assert_bad(populated, 11, "does not verify")


def test_checkpoint_file_from_another_log(populated: Populated, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    ok("ledger", "append", "--db", other, "--source", "x", "--kind", "y")
    foreign = tmp_path / "foreign.txt"
    foreign.write_text(ok("ledger", "checkpoint", "--db", other, "--key", tmp_path / "other.key"))
    code, _, err = verify(populated, "--checkpoint", foreign)
    assert code == 1
    assert "not signed by a trusted key" in err
    foreign.write_text("garbage\n")
    code, _, err = verify(populated, "--checkpoint", foreign)
    assert code == 1
    assert "checkpoint file" in err
    assert err.count("\n") == 1


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


COMMANDS = [
    ["append", "--source", "s", "--kind", "k"],
    ["tail"],
    ["checkpoint"],
    ["verify"],
    ["prove", "inclusion", "0"],
    ["key"],
]


def foreign_files(folder: Path) -> dict[str, Path]:
    not_sqlite = folder / "random.db"
    not_sqlite.write_bytes(bytes(range(256)) * 64)
    other_app = folder / "app.db"
    connection = sqlite3.connect(other_app)
    connection.execute("CREATE TABLE leaves (x)")
    connection.commit()
    connection.close()
    future = folder / "future.db"
    connection = sqlite3.connect(future)
    connection.execute("PRAGMA application_id = 1801807212")
    connection.execute("PRAGMA user_version = 99")
    connection.execute("CREATE TABLE leaves (x)")
    connection.commit()
    connection.close()
    return {
        "not a SQLite database": not_sqlite,
        "not a keel ledger": other_app,
        "schema version 99": future,
    }


@pytest.mark.parametrize(
    "command", COMMANDS, ids=lambda c: c[0] + (f"-{c[1]}" if c[0] == "prove" else "")
)
def test_foreign_databases_are_refused_untouched(tmp_path: Path, command: list[str]) -> None:
    files = foreign_files(tmp_path)
    for needle, db in files.items():
        before = snapshot(tmp_path)
        result = keel("ledger", *command, "--db", db)
        assert result.returncode != 0, (needle, result.stdout)
        assert result.stderr.startswith("keel: error: ")
        assert result.stderr.count("\n") == 1
        assert needle in result.stderr, result.stderr
        assert snapshot(tmp_path) == before, f"{command} modified {db.name}"


def test_corrupt_ledger(populated: Populated) -> None:
    data = bytearray(populated.db.read_bytes())
    assert len(data) > 3 * 4096
    data[4096 : 3 * 4096] = b"\xa5" * (2 * 4096)  # two pages of garbage
    populated.db.write_bytes(bytes(data))
    for command in (["verify"], ["tail"], ["append", "--source", "s", "--kind", "k"]):
        result = keel("ledger", *command, "--db", populated.db)
        assert result.returncode == 1, (command, result.stdout)
        assert_one_line_error(result.stderr)


def test_tail_follow(populated: Populated, processes: Processes) -> None:
    argv = ["ledger", "tail", "--follow", "--json", "-n", "1", "--db", str(populated.db)]
    follower = processes.popen(
        [sys.executable, "-m", "keel", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines = Lines(follower.stdout)
    assert json.loads(lines.next())["index"] == 19
    ok("ledger", "append", "--db", populated.db, "--source", "s", "--kind", "late")
    ok("ledger", "append", "--db", populated.db, "--source", "s", "--kind", "later")
    seen = [json.loads(lines.next()) for _ in range(2)]
    assert [(e["index"], e["kind"]) for e in seen] == [(20, "late"), (21, "later")]
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=60)
    assert follower.returncode == 130
    assert err == b""


def test_missing_ledger(tmp_path: Path) -> None:
    for command in (["tail"], ["verify"], ["checkpoint"], ["prove", "consistency", "1", "2"]):
        result = keel("ledger", *command, "--db", tmp_path / "none.db")
        assert result.returncode == 1
        assert "no ledger at" in result.stderr
    assert list(tmp_path.iterdir()) == []


def checkpoint_count(db: Path) -> int:
    connection = sqlite3.connect(db)
    (count,) = connection.execute("SELECT count(*) FROM checkpoints").fetchone()
    connection.close()
    return int(count)


def test_missing_key_is_not_silently_replaced(populated: Populated) -> None:
    populated.key.unlink()
    result = keel("ledger", "checkpoint", "--db", populated.db)
    assert result.returncode == 1
    assert "restore the key file" in result.stderr
    assert not populated.key.exists()
    assert checkpoint_count(populated.db) == 3
    result = keel("ledger", "verify", "--db", populated.db)
    assert result.returncode == 1
    assert "no signing key" in result.stderr


@pytest.mark.parametrize("damage", ["garbage", "directory", "too open"])
def test_unusable_key(populated: Populated, damage: str) -> None:
    if damage == "garbage":
        populated.key.write_text("PRIVATE+KEY+nonsense\n")
        needle = "malformed"
    elif damage == "directory":
        populated.key.unlink()
        populated.key.mkdir()
        needle = "is a directory"
    else:
        populated.key.chmod(0o644)
        needle = "chmod 600"
    for command in (["checkpoint"], ["verify"], ["key"]):
        result = keel("ledger", *command, "--db", populated.db)
        assert result.returncode == 1, (command, result.stdout)
        assert_one_line_error(result.stderr, needle)
    assert checkpoint_count(populated.db) == 3


def test_replaced_key(populated: Populated) -> None:
    name = core.Signer.parse(populated.key.read_text()).name
    populated.key.write_text(str(core.Signer(name, bytes(32))) + "\n")
    code, _, err = verify(populated)
    assert code == 1
    assert "not signed by a trusted key" in err


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ("{bad", "--data: invalid JSON at line 1 column 2"),
        ("[1, 2]", "--data must be a JSON object"),
        ('{"x": NaN}', "--data: NaN is not a JSON value"),
        ('{"x": 1, "x": 2}', '--data: key "x" appears twice'),
        # Deep enough for a RecursionError, short enough for one argument (128 KiB).
        ('{"x":' + "[" * 60_000 + "]" * 60_000 + "}", "--data: nested more than 64 levels"),
        ('{"x": ' * 65 + "1" + "}" * 65, "--data: nested more than 64 levels"),
        ('{"x": "' + "y" * 70000 + '"}', "the limit is"),
    ],
)
def test_malformed_data(populated: Populated, data: str, needle: str) -> None:
    before = snapshot(populated.db.parent)
    result = keel(
        "ledger", "append", "--db", populated.db, "--source", "s", "--kind", "k", "--data", data
    )
    assert result.returncode == 2
    assert result.stderr.startswith("keel: error: ")
    assert result.stderr.count("\n") == 1
    assert needle in result.stderr, result.stderr
    assert snapshot(populated.db.parent) == before
    # And nothing is created for a ledger that does not exist yet.
    fresh = populated.db.parent / "fresh" / "ledger.db"
    result = keel("ledger", "append", "--db", fresh, "--source", "s", "--kind", "k", "--data", data)
    assert result.returncode == 2
    assert not fresh.parent.exists()


def test_bad_fields(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    result = keel("ledger", "append", "--db", db, "--source", "two words", "--kind", "k")
    assert result.returncode == 2
    assert "source must be" in result.stderr
    result = keel("ledger", "tail", "--db", db, "-n", "-1")
    assert result.returncode == 2


def test_dev_mode_default_path(tmp_path: Path) -> None:
    result = keel("ledger", "append", "--source", "demo", "--kind", "hello", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".keel" / "ledger.db").is_file()
    result = keel("ledger", "checkpoint", cwd=tmp_path)
    assert result.returncode == 0
    assert (tmp_path / ".keel" / "ledger.key").is_file()


def test_long_values_are_not_echoed_back(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    for option in ("--subject", "--source", "--kind"):
        args = {"--source": "s", "--kind": "k", option: "x" * 100_000}
        result = keel("ledger", "append", "--db", db, *[a for pair in args.items() for a in pair])
        assert result.returncode == 2, option
        assert_one_line_error(result.stderr, f"entry {option[2:]} must be")
        assert len(result.stderr) < 300, (option, len(result.stderr))
    assert not db.exists()


def test_mistyped_paths_make_no_directories(tmp_path: Path) -> None:
    typo = tmp_path / "typo" / "deeper"
    commands: list[list[str | Path]] = [
        ["key", "--db", typo / "ledger.db"],
        ["checkpoint", "--db", tmp_path / "none.db", "--key", typo / "ledger.key"],
        ["append", "--db", typo / "ledger.db", "--source", "s", "--kind", "k"],
    ]
    for command in commands:
        result = keel("ledger", *command)
        assert result.returncode in (1, 2), command
        assert_one_line_error(result.stderr)
        if command[0] != "checkpoint":  # that one stops at the missing ledger
            assert f"there is no directory {typo}" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # An existing directory is fine: the key is made there, before any entry.
    result = keel("ledger", "key", "--db", tmp_path / "ledger.db")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ledger.key").is_file()


LONG_FIELD = json.dumps(
    {"leafIdx": "x" * 100_000, "treeSize": 1, "root": "", "leafHash": "", "proof": []}
)


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested more than 64 levels deep"),
        ('{"leafIdx": 1, "leafIdx": 2}', 'key "leafIdx" appears twice'),
        ('{"leafIdx": ' + "9" * 5000 + "}", "an integer of 5000 digits is too long"),
        ('{"size1": NaN}', "NaN is not a JSON value"),
        (LONG_FIELD, "'leafIdx' must be a non-negative integer"),
        (" " * (1024 * 1024 + 1), "larger than 1048576 bytes"),
        (b"\xff\xfe{}", "not UTF-8 text"),
    ],
    ids=["deep", "duplicate", "digits", "nan", "long", "large", "binary"],
)
def test_verify_proof_refuses_hostile_files(
    tmp_path: Path, document: str | bytes, needle: str
) -> None:
    proof = tmp_path / "proof.json"
    if isinstance(document, bytes):
        proof.write_bytes(document)
    else:
        proof.write_text(document)
    for source in (str(proof), "-"):
        result = subprocess.run(
            [sys.executable, "-m", "keel", "ledger", "verify-proof", source],
            stdin=proof.open("rb"),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 2, (source, result.stderr)
        assert_one_line_error(result.stderr, needle)
        assert len(result.stderr) < 400


def test_tail_shows_control_characters_escaped(tmp_path: Path) -> None:
    """An entry's subject or data cannot move the cursor or reorder an auditor's screen."""
    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        ledger.append(source="s", kind="k", subject="\x1b[2J\rfake\n", data={"x": "\u202eevil"})
    out = ok("ledger", "tail", "--db", db)
    assert out.count("\n") == 1
    assert out.isascii()
    assert "\\u001b[2J\\rfake\\n" in out
    assert "\\u202eevil" in out


def test_the_state_directory_is_made_on_first_use(tmp_path: Path) -> None:
    """./.keel (and /var/lib/keel) are keel's own: named with --db, they are still made."""
    result = keel("ledger", "append", "--db", ".keel/ledger.db", "--source", "s", "--kind", "k",
                  cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".keel" / "ledger.db").is_file()
    (tmp_path / ".keel" / "ledger.db").unlink()
    (tmp_path / ".keel").rmdir()
    result = keel("ledger", "key", "--db", ".keel/ledger.db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".keel" / "ledger.key").is_file()


def test_search_finds_entries_by_their_text_and_they_prove(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    wanted = "0123456789abcdef0123456789abcdef"
    with Ledger.open(db) as ledger:
        ledger.append(source="watch", kind="restart", subject="web", data={"n": 1})
        ledger.append(source="mesh", kind="sent-batch", subject="p", data={"ids": [wanted]})
        ledger.append(source="mesh", kind="received-batch", subject="p", data={"ids": ["x"]})
        ledger.append(source="mesh", kind="delivered-batch", subject="p", data={"ids": [wanted]})
        ledger.append(source="other", kind="note", subject=wanted)
    lines = ok("ledger", "search", wanted, "--db", db, "--json").splitlines()
    found = [json.loads(line) for line in lines]
    assert [e["index"] for e in found] == [1, 3, 4]
    assert [e["index"] for e in map(json.loads, ok(
        "ledger", "search", wanted, "--db", db, "--json", "--source", "mesh", "-n", "1"
    ).splitlines())] == [1]  # fmt: skip
    assert ok("ledger", "search", wanted, "--db", db, "--kind", "delivered-batch").startswith(
        "      3  "
    )
    assert ok("ledger", "search", "not there", "--db", db) == ""
    proof = json.loads(ok("ledger", "prove", "inclusion", "3", "--db", db))
    assert proof["leafHash"] == found[1]["leafHash"]
    entry = {k: v for k, v in found[1].items() if k not in ("index", "leafHash")}
    leaf = core.leaf_hash(core.canonical_json(entry))
    assert core.InclusionProof.from_json(proof).leaf_hash == leaf
    (tmp_path / "proof.json").write_text(json.dumps(proof))
    assert keel("ledger", "verify-proof", tmp_path / "proof.json").returncode == 0
    bad = keel("ledger", "search", "", "--db", db)
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr, "TEXT must not be empty")
    bad = keel("ledger", "search", wanted, "--db", db, "-n", "0")
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr, "-n must be 1 or more")
