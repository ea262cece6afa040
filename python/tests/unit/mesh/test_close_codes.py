"""docs/mesh-protocol.md names exactly the CLOSE codes the reference sends (§10 and §15)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from keel.errors import KeelError
from keel.mesh.invite import InviteRecord

ROOT = Path(__file__).resolve().parents[4]
DOC = ROOT / "docs" / "mesh-protocol.md"
SOURCE = ROOT / "python" / "src" / "keel" / "mesh"

# A reason in `<code>: <text>` form where the daemon closes or refuses a connection.
_SENT = re.compile(r'(?:Refuse\(|\.close\(|\.close, |reason = )f?"([a-z]+(?:-[a-z]+)*): ')


def table_codes() -> set[str]:
    section = DOC.read_text().split("## 10. Errors", 1)[1].split("## 11.", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]
    codes = {row.rstrip(" |").rsplit("|", 1)[1].strip() for row in rows}
    codes.discard("none")
    assert all(c.startswith("`") and c.endswith("`") for c in codes), codes
    return {c.strip("`") for c in codes}


def section_15_codes() -> set[str]:
    text = DOC.read_text().split("**CLOSE reasons** are", 1)[1].split("## 16.", 1)[0]
    listed = text.split("(the node cannot", 1)[0]
    return set(re.findall(r"`([a-z-]+)`", listed)) - {"code"}


def sent_codes() -> set[str]:
    found: set[str] = set()
    for path in SOURCE.glob("*.py"):
        found |= set(_SENT.findall(path.read_text()))
    # admission.py sends `invite-{reason}` for what InviteRecord.redeem raises
    assert 'Refuse(f"invite-{exc.reason}: {exc}")' in (SOURCE / "admission.py").read_text()
    for record, now in (
        (InviteRecord(b"i" * 16, b"s" * 32, expires=10, uses_left=1), 10.0),
        (InviteRecord(b"i" * 16, b"s" * 32, expires=10, uses_left=0), 0.0),
    ):
        with pytest.raises(KeelError) as caught:
            record.redeem(now)
        found.add(f"invite-{caught.value.reason}")  # type: ignore[attr-defined]
    return found


def test_the_documented_close_codes_are_those_sent() -> None:
    sent = sent_codes()
    assert "invite-revoked" in sent
    assert table_codes() == sent
    assert section_15_codes() == sent
