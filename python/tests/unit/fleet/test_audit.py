"""The audit's judgement of every node against what the others hold."""

from __future__ import annotations

from keel.fleet import audit
from keel.fleet.audit import HeldNote, Presented, judge, sizes_to_prove
from keel.fleet.cosign import Cosigner
from keel.fleet.witness import FORKED, KEY_CHANGED, WENT_BACK, Cosigned, witness

from .logs import MemoryLog, cosigner, signer

WA, WB = cosigner("a/keel/witness", 11), cosigner("b/keel/witness", 12)


def held(log: MemoryLog, by: str, key: Cosigner, size: int | None = None) -> HeldNote:
    """What witness ``by`` keeps after cosigning ``log`` at ``size``."""
    snapshot = MemoryLog(log.key, log.entries[: log.size if size is None else size])
    decision = witness(
        None,
        node="n",
        ledger_key=snapshot.ledger_key,
        note=snapshot.note(),
        proof=[],
        cosigner=key,
        now=5000,
    )
    assert isinstance(decision, Cosigned)
    return HeldNote("n", by, snapshot.ledger_key, decision.witnessed.note, str(key.verifier))


def present(log: MemoryLog, sizes: list[int]) -> Presented:
    proofs = {s: (log.proof(s) if s <= log.size else None) for s in sizes}
    return Presented("n", log.ledger_key, log.note(), proofs)


def test_a_grown_log_is_consistent_with_every_witness() -> None:
    log = MemoryLog(signer("n/keel/ledger", 1)).append(10)
    held_notes = [held(log, "a", WA, 4), held(log, "b", WB, 10)]
    log.append(7)
    assert sizes_to_prove(held_notes, "n") == [4, 10]
    result = judge(["n"], {"n": present(log, [4, 10])}, held_notes)
    [node] = result.nodes
    assert node.verdict == audit.CONSISTENT
    assert node.findings == []
    assert result.exit_code == audit.EXIT_CLEAN
    out = node.to_json()
    assert out["witnessed_by"] == ["a", "b"]
    latest = out["latest_witnessed"]
    assert isinstance(latest, dict)
    assert latest["size"] == 10
    assert latest["at"] == 5000


def test_a_rewritten_log_is_named_forked_with_the_evidence() -> None:
    log = MemoryLog(signer("n/keel/ledger", 1)).append(10)
    held_note = held(log, "a", WA)
    rewritten = MemoryLog(log.key, log.entries[:3]).append(12, tag="evil")
    result = judge(["n"], {"n": present(rewritten, [10])}, [held_note])
    [node] = result.nodes
    assert node.verdict == FORKED
    [finding] = node.findings
    assert finding.holder == "a"
    assert "held by a, cosigned at" in finding.detail
    assert finding.evidence == (held_note.note, rewritten.note())
    assert result.problems == [node]
    assert result.exit_code == audit.EXIT_PROBLEM


def test_a_truncated_log_went_back() -> None:
    log = MemoryLog(signer("n", 1)).append(10)
    result = judge(["n"], {"n": present(log.copy(), [10])}, [held(log, "a", WA)])
    assert result.nodes[0].verdict == audit.CONSISTENT
    short = MemoryLog(log.key, log.entries[:7])
    result = judge(["n"], {"n": present(short, [10])}, [held(log, "a", WA)])
    assert result.nodes[0].verdict == WENT_BACK


def test_a_withheld_proof_counts_as_a_fork() -> None:
    log = MemoryLog(signer("n", 1)).append(10)
    held_note = held(log, "a", WA, 5)
    answer = Presented("n", log.ledger_key, log.note(), {})
    [node] = judge(["n"], {"n": answer}, [held_note]).nodes
    assert node.verdict == FORKED
    assert "no consistency proof" in node.findings[0].detail


def test_two_witnesses_holding_different_trees_of_one_size_prove_a_fork_while_the_node_is_down() -> (
    None
):
    log = MemoryLog(signer("n", 1)).append(6)
    split = MemoryLog(log.key, log.entries[:5]).append(1, tag="split")
    result = judge(["n"], {}, [held(log, "a", WA), held(split, "b", WB)])
    [node] = result.nodes
    assert node.verdict == FORKED
    assert not node.reachable
    assert "different roots" in node.findings[0].detail
    assert len(node.findings[0].evidence) == 2


def test_an_unreachable_node_with_agreeing_witnesses_is_unreachable_not_clean() -> None:
    log = MemoryLog(signer("n", 1)).append(6)
    result = judge(["n"], {}, [held(log, "a", WA, 3), held(log, "b", WB, 6)])
    assert result.nodes[0].verdict == audit.UNREACHABLE
    assert result.exit_code == audit.EXIT_INCOMPLETE


def test_key_changes_against_a_witness_and_against_the_auditors_pin() -> None:
    log = MemoryLog(signer("n", 1)).append(6)
    held_note = held(log, "a", WA)
    rekeyed = MemoryLog(signer("n", 2), log.entries).append(1)
    [node] = judge(["n"], {"n": present(rekeyed, [6])}, [held_note]).nodes
    assert node.verdict == KEY_CHANGED
    [node] = judge(["n"], {"n": present(rekeyed, [])}, [], pinned={"n": log.ledger_key}).nodes
    assert node.verdict == KEY_CHANGED
    assert "this auditor pinned" in node.findings[0].detail


def test_unwitnessed_and_silent_witnesses() -> None:
    log = MemoryLog(signer("n", 1)).append(2)
    result = judge(["n"], {"n": present(log, [])}, [], silent=["x"])
    assert result.nodes[0].verdict == audit.UNWITNESSED
    assert result.silent_witnesses == ["x"]
    assert result.exit_code == audit.EXIT_INCOMPLETE


def test_a_forged_record_proves_nothing_either_way() -> None:
    log = MemoryLog(signer("n", 1)).append(6)
    good = held(log, "a", WA)
    # a record whose cosignature is not the holder's
    stolen = HeldNote("n", "b", good.ledger_key, good.note, str(WB.verifier))
    # a record whose checkpoint the node never signed
    other = MemoryLog(signer("n", 3)).append(9)
    fake = HeldNote("n", "c", log.ledger_key, other.note())
    [node] = judge(["n"], {"n": present(log.copy().append(1), [6])}, [good, stolen, fake]).nodes
    assert node.verdict == audit.CONSISTENT
    kinds = sorted((f.holder, f.kind) for f in node.findings)
    assert kinds == [("b", "invalid"), ("c", "invalid")]


def test_evidence_of_an_old_alarm_is_checked_against_the_current_tree() -> None:
    # a node once presented a forked head to a witness (kept as alarm evidence),
    # and is back on its real log now: the forked note it signed still convicts it
    log = MemoryLog(signer("n", 1)).append(8)
    forked = MemoryLog(log.key, log.entries[:4]).append(6, tag="f")
    evidence = HeldNote("n", "a", log.ledger_key, forked.note(), None, source="alarm")
    [node] = judge(["n"], {"n": present(log, [10])}, [held(log, "a", WA, 8), evidence]).nodes
    assert node.verdict == WENT_BACK  # the node's tree (8) is smaller than the 10 it signed


def test_the_order_of_verdicts() -> None:
    assert audit.VERDICTS[:3] == audit.PROBLEMS


def test_why_a_node_presented_nothing_is_said() -> None:
    log = MemoryLog(signer("n", 1)).append(3)
    result = judge(["n"], {}, [held(log, "a", WA)], missing={"n": "it refused: ledger tampered"})
    [node] = result.nodes
    assert node.verdict == audit.UNREACHABLE
    assert [f.detail for f in node.findings] == [
        "its current checkpoint is unknown: it refused: ledger tampered"
    ]
