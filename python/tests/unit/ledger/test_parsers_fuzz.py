"""A bounded fuzz of every ledger parser of outside input (issue 8).

Stored entries, checkpoints and signed notes (stored, in the head file, given
with ``--checkpoint``), proofs in the transparency-dev vector format (what
``verify-proof`` reads), and signer and verifier keys. Whatever the input, a
parser returns a value or raises a :class:`LedgerError` (or keel's
:class:`ConfigError` for JSON) whose message is one line of bounded length:
never another exception, never a whole hostile value echoed back.

Inputs are arbitrary bytes and text, and valid documents with mutations
(bytes flipped, cut, repeated, fields swapped for any JSON value), so the
fuzz reaches past the first check.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from keel.config import parse_json
from keel.errors import KeelError
from keel.ledger import core
from keel.ledger.errors import LedgerError

SIGNER = core.Signer("fuzz.example/keel/ledger", bytes(range(32)))
VERIFIER = SIGNER.verifier
ENTRY = core.make_entry(
    ts=1_700_000_000.5, source="watch", kind="restart", subject="web", data={"n": [1, 2.5, None]}
)
CHECKPOINT = core.sign_checkpoint(core.Checkpoint(SIGNER.name, 42, bytes(range(32))), SIGNER)
LEAVES = [core.leaf_hash(bytes([i])) for i in range(11)]


def lookup(level: int, index: int) -> bytes:
    """The hash of perfect subtree ``(level, index)`` of LEAVES, from its two halves."""
    if level == 0:
        return LEAVES[index]
    return core.node_hash(lookup(level - 1, 2 * index), lookup(level - 1, 2 * index + 1))


INCLUSION = core.InclusionProof(
    5, 11, core.tree_root(11, lookup), LEAVES[5], tuple(core.inclusion_proof(5, 11, lookup))
).to_json()
CONSISTENCY = core.ConsistencyProof(
    3,
    11,
    core.tree_root(3, lookup),
    core.tree_root(11, lookup),
    tuple(core.consistency_proof(3, 11, lookup)),
).to_json()

FUZZ = settings(max_examples=300, deadline=None)
MAX_MESSAGE = 400


def clean(parse: Callable[[], object], *allowed: type[Exception]) -> object:
    """Run ``parse``; an error must be one of keel's, one line, not too long."""
    expected: tuple[type[Exception], ...] = (LedgerError, *allowed)
    try:
        return parse()
    except expected as exc:
        check_message(str(exc))
        return None


def check_message(message: str) -> None:
    assert message
    assert "\n" not in message, message[:200]
    assert "\r" not in message, message[:200]
    assert len(message) <= MAX_MESSAGE, message[:200]


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` with a few bytes replaced, inserted, removed, or a slice repeated."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            where = draw(st.integers(0, len(data)))
            action = draw(st.sampled_from(["replace", "insert", "delete", "repeat", "cut"]))
            if action == "replace" and where < len(data):
                data[where] = draw(st.integers(0, 255))
            elif action == "insert":
                data[where:where] = draw(st.binary(min_size=1, max_size=8))
            elif action == "delete":
                del data[where : where + draw(st.integers(1, 8))]
            elif action == "repeat":
                data[where:where] = data[where : where + 16] * draw(st.integers(2, 50))
            else:
                del data[where:]
        return bytes(data)

    return mutate()


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


# ---- entries ------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300) | mutated(ENTRY))
def test_stored_entries(raw: bytes) -> None:
    entry = clean(lambda: core.parse_entry(raw))
    if entry is not None:  # what parses is canonical: it encodes back to the same bytes
        assert isinstance(entry, core.Entry)
        assert entry.canonical() == raw


@FUZZ
@given(JSON_VALUES, st.text(max_size=200), st.text(max_size=2000))
def test_entries_made_from_any_values(data: Any, source: str, subject: str) -> None:
    def make() -> object:
        raw = core.make_entry(ts=0.0, source=source, kind="k", subject=subject, data=data)
        # What is made can be read back.
        assert core.parse_entry(raw).data == (data if data is not None else {})
        return raw

    clean(make)


def test_deep_entries_are_refused_both_ways() -> None:
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    assert clean(lambda: core.make_entry(ts=0.0, source="s", kind="k", data={"d": deep})) is None
    for depth in (63, 64, 1000, 50_000):
        raw = b'{"data":{"d":' + b"[" * depth + b"]" * depth + b'},"kind":"k","source":"s",'
        raw += b'"subject":"","ts":"2023-11-14T22:13:20.000000Z"}'
        parsed = clean(functools.partial(core.parse_entry, raw))
        assert (parsed is not None) == (depth < 64), depth


# ---- checkpoints and signed notes ---------------------------------------------


def text_of(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")  # what a hostile file can give


@FUZZ
@given(st.text(max_size=300) | mutated(CHECKPOINT.encode()).map(text_of))
def test_checkpoints_and_notes(note: str) -> None:
    clean(lambda: core.open_note(note, [VERIFIER]))
    opened = clean(lambda: core.open_checkpoint(note, VERIFIER))
    if opened is not None:
        assert isinstance(opened, core.Checkpoint)
    if "\n\n" in note:
        clean(lambda: core.Checkpoint.parse(note[: note.rindex("\n\n") + 1]))
    clean(lambda: core.Checkpoint.parse(note))


@FUZZ
@given(
    st.lists(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
        | st.sampled_from(["", "0", "18446744073709551616", "9" * 25, "-1", "+1", "0x10"]),
        min_size=0,
        max_size=6,
    )
)
def test_checkpoint_lines(lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    clean(lambda: core.Checkpoint.parse(text))
    signed = clean(lambda: core.sign_note(text, [SIGNER]))
    if isinstance(signed, str):
        clean(lambda: core.open_checkpoint(signed, VERIFIER))


# ---- proofs (verify-proof) --------------------------------------------------


def proof_pipeline(text: str | bytes) -> object:
    """What ``keel ledger verify-proof`` does with a file: parse, check the shape, verify."""
    document = parse_json(text, source="proof.json")
    proof = core.parse_proof(document)
    proof.verify()
    return proof


@st.composite
def proofs_with_a_field_changed(draw: st.DrawFn) -> dict[str, Any]:
    document = dict(draw(st.sampled_from([INCLUSION, CONSISTENCY])))
    key = draw(st.sampled_from([*document, "desc", "wantErr", "extra"]))
    choice = draw(st.integers(0, 3))
    if choice == 0:
        document[key] = draw(JSON_VALUES)
    elif choice == 1:
        document.pop(key, None)
    elif choice == 2 and isinstance(document.get("proof"), list):
        hashes = list(document["proof"])
        document["proof"] = draw(st.permutations(hashes)) + draw(
            st.lists(st.sampled_from([base64.b64encode(h).decode() for h in LEAVES]), max_size=3)
        )
    else:
        document[key] = draw(st.integers(min_value=-(2**80), max_value=2**80))
    return document


@FUZZ
@given(st.binary(max_size=300) | mutated(repr(INCLUSION).replace("'", '"').encode()))
def test_proof_files(data: bytes) -> None:
    clean(lambda: proof_pipeline(data), KeelError)


@FUZZ
@given(proofs_with_a_field_changed())
def test_proofs_with_any_field(document: dict[str, Any]) -> None:
    clean(lambda: core.parse_proof(document).verify())


def test_published_proof_shapes_still_verify() -> None:
    for document in (INCLUSION, CONSISTENCY):
        proof = core.parse_proof(document)
        assert clean(proof.verify) is None
        proof.verify()


# ---- keys ---------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=200) | mutated(str(SIGNER).encode()).map(text_of))
def test_signer_keys(text: str) -> None:
    parsed = clean(lambda: core.Signer.parse(text))
    if parsed is not None:
        assert str(parsed) == text.strip()


@FUZZ
@given(st.text(max_size=200) | mutated(str(VERIFIER).encode()).map(text_of))
def test_verifier_keys(text: str) -> None:
    parsed = clean(lambda: core.Verifier.parse(text))
    if parsed is not None:
        assert str(parsed) == text.strip()
