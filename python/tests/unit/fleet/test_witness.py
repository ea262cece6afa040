"""The witness's decisions: cosign what extends, alarm on forks, rollbacks and new keys."""

from __future__ import annotations

from typing import Any

import pytest
from keel.fleet.cosign import cosignatures
from keel.fleet.witness import (
    FORKED,
    KEY_CHANGED,
    WENT_BACK,
    Alarm,
    Cosigned,
    Decision,
    Invalid,
    Witnessed,
    witness,
)
from keel.ledger import core

from .logs import MemoryLog, cosigner, signer

W = cosigner("w/keel/witness", 9)


def judge(
    log: MemoryLog, previous: Witnessed | None, *, now: float = 1000.0, **kw: Any
) -> Decision:
    size = previous.size if previous else 0
    return witness(
        previous,
        node="n1",
        ledger_key=kw.pop("ledger_key", log.ledger_key),
        note=kw.pop("note", log.note()),
        proof=kw.pop("proof", log.proof(size)),
        cosigner=W,
        now=now,
        **kw,
    )


def first(log: MemoryLog) -> Witnessed:
    decision = judge(log, None)
    assert isinstance(decision, Cosigned)
    return decision.witnessed


def test_first_sight_pins_the_key_and_cosigns() -> None:
    log = MemoryLog(signer("h/keel/ledger", 1)).append(5)
    decision = judge(log, None, now=1234.9)
    assert isinstance(decision, Cosigned)
    assert decision.first
    assert decision.grew == 5
    record = decision.witnessed
    assert (record.size, record.root, record.ledger_key) == (5, log.root(), log.ledger_key)
    assert record.at == 1234
    [found] = cosignatures(record.note, [W.verifier])
    assert found.timestamp == 1234
    core.open_checkpoint(record.note, log.key.verifier)


def test_growth_with_a_good_proof_is_cosigned_across_any_gap() -> None:
    log = MemoryLog(signer("h", 1)).append(3)
    record = first(log)
    for extra in (1, 4, 100, 1000):
        log.append(extra)
        decision = judge(log, record)
        assert isinstance(decision, Cosigned), decision
        assert not decision.first
        assert decision.grew == extra
        record = decision.witnessed
    assert record.size == 1108


def test_the_same_checkpoint_again_is_cosigned_afresh() -> None:
    log = MemoryLog(signer("h", 1)).append(3)
    record = first(log)
    decision = judge(log, record, now=2000)
    assert isinstance(decision, Cosigned)
    assert decision.grew == 0
    assert decision.witnessed.at == 2000


def test_from_an_empty_tree_anything_extends() -> None:
    log = MemoryLog(signer("h", 1))
    record = first(log)
    assert record.size == 0
    decision = judge(log.append(4), record)
    assert isinstance(decision, Cosigned)


def test_a_rewritten_log_is_a_fork() -> None:
    log = MemoryLog(signer("h", 1)).append(10)
    record = first(log)
    rewritten = MemoryLog(log.key, log.entries[:4]).append(8, tag="forged")
    decision = judge(rewritten, record)
    assert isinstance(decision, Alarm)
    assert decision.kind == FORKED
    assert "does not extend" in decision.detail
    assert decision.witnessed == record
    # a rewrite of the same size is a fork, visible without a proof
    same = MemoryLog(log.key, log.entries[:9]).append(1, tag="x")
    decision = judge(same, record)
    assert isinstance(decision, Alarm)
    assert decision.kind == FORKED
    assert "same size" in decision.detail


def test_a_proof_from_the_real_log_does_not_save_a_rewritten_head() -> None:
    log = MemoryLog(signer("h", 1)).append(10)
    record = first(log)
    grown = log.copy().append(5)
    forged = MemoryLog(log.key, log.entries).append(5, tag="other")
    decision = judge(forged, record, proof=grown.proof(10))
    assert isinstance(decision, Alarm)
    assert decision.kind == FORKED


def test_a_truncated_log_went_back() -> None:
    log = MemoryLog(signer("h", 1)).append(10)
    record = first(log)
    decision = judge(MemoryLog(log.key, log.entries[:6]), record)
    assert isinstance(decision, Alarm)
    assert decision.kind == WENT_BACK
    assert "size 6" in decision.detail
    assert "size 10" in decision.detail


def test_a_new_key_is_an_alarm_and_a_pinned_key_is_enforced() -> None:
    log = MemoryLog(signer("h", 1)).append(3)
    record = first(log)
    other = MemoryLog(signer("h", 2), log.entries).append(1)
    decision = judge(other, record)
    assert isinstance(decision, Alarm)
    assert decision.kind == KEY_CHANGED
    # before first sight, an operator's pin decides
    assert isinstance(judge(other, None, pinned_key=log.ledger_key), Invalid)
    assert isinstance(judge(log, None, pinned_key=log.ledger_key), Cosigned)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ledger_key": "nonsense"}, "malformed"),
        ({"note": "not a note"}, "does not verify"),
        ({"note": "h\n3\nAAAA\n\n\u2014 h AAAAAAAA\n"}, "does not verify"),
    ],
)
def test_garbage_changes_nothing(change: dict[str, Any], reason: str) -> None:
    log = MemoryLog(signer("h", 1)).append(3)
    decision = judge(log, first(log), **change)
    assert isinstance(decision, Invalid)
    assert reason in decision.reason


def test_a_note_signed_by_another_key_under_the_pinned_name_is_invalid() -> None:
    log = MemoryLog(signer("h", 1)).append(3)
    record = first(log)
    impostor = MemoryLog(signer("h", 2), log.entries).append(1)
    decision = judge(log.append(1), record, note=impostor.note())
    assert isinstance(decision, Invalid)


def test_other_cosignatures_on_the_presented_note_are_not_kept() -> None:
    from keel.fleet.cosign import cosign

    log = MemoryLog(signer("h", 1)).append(3)
    other = cosigner("other", 4)
    decision = judge(log, None, note=cosign(log.note(), other, 5))
    assert isinstance(decision, Cosigned)
    assert [s.name for s in core.split_note(decision.witnessed.note)[1]] == ["h", W.name]
