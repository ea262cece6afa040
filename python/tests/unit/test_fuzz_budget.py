"""KEEL_FUZZ_EXAMPLES raises the fuzz tests' example counts, never lowers them (tests/fuzz.py)."""

from __future__ import annotations

import pytest

from tests.fuzz import examples


def test_the_default_unless_more_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_FUZZ_EXAMPLES", raising=False)
    assert examples(300) == 300
    monkeypatch.setenv("KEEL_FUZZ_EXAMPLES", "20000")
    assert examples(300) == 20000
    monkeypatch.setenv("KEEL_FUZZ_EXAMPLES", "10")
    assert examples(300) == 300
    monkeypatch.setenv("KEEL_FUZZ_EXAMPLES", "lots")
    with pytest.raises(SystemExit, match="KEEL_FUZZ_EXAMPLES='lots': expected a whole number"):
        examples(300)
