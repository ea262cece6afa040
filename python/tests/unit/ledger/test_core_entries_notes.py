"""Canonical entries, C2SP signed notes and tlog checkpoints in ``keel.ledger.core``."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from keel.ledger import core
from keel.ledger.errors import EntryError, MalformedError, ProofError

# Known answers from golang.org/x/mod/sumdb/note (package documentation and
# note_test.go) and from the example of the C2SP signed-note specification.
GO_SIGNER = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VERIFIER = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT
    + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNX"
    "gKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_VERIFIER = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
SPEC_VERIFIER = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n\n\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6Tf"
    "Xppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)


# ---- entries ----------------------------------------------------------------


def test_entry_is_canonical_json() -> None:
    raw = core.make_entry(
        ts=1_700_000_000.25,
        source="watch",
        kind="restart",
        subject="web",
        data={"z": 1, "a": {"y": [1, 2.5, None, True], "b": "zé \u2014"}},
    )
    assert (
        raw
        == (
            '{"data":{"a":{"b":"zé \u2014","y":[1,2.5,null,true]},"z":1},"kind":"restart",'
            '"source":"watch","subject":"web","ts":"2023-11-14T22:13:20.250000Z"}'
        ).encode()
    )
    entry = core.parse_entry(raw)
    assert entry.ts == "2023-11-14T22:13:20.250000Z"
    assert entry.canonical() == raw


def test_timestamps_are_fixed_width_utc() -> None:
    assert core.format_ts(0) == "1970-01-01T00:00:00.000000Z"
    assert core.format_ts(1.9999999) == "1970-01-01T00:00:02.000000Z"
    assert core.format_ts(86399.000001) == "1970-01-01T23:59:59.000001Z"


@given(st.floats(min_value=0, max_value=4e9), st.floats(min_value=0, max_value=4e9))
def test_timestamps_sort_as_strings(a: float, b: float) -> None:
    if a <= b:
        assert core.format_ts(a) <= core.format_ts(b)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def has_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    return False


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5), st.text(max_size=40))
def test_any_json_data_round_trips(data: dict[str, object], subject: str) -> None:
    subject = subject.replace("\x00", "")
    if has_surrogate(data) or has_surrogate(subject):
        # Strings that UTF-8 cannot carry are refused.
        with pytest.raises(EntryError, match="not plain JSON"):
            core.make_entry(ts=12.5, source="mesh", kind="sent", subject=subject, data=data)
        return
    raw = core.make_entry(ts=12.5, source="mesh", kind="sent", subject=subject, data=data)
    entry = core.parse_entry(raw)
    assert entry.canonical() == raw
    assert json.loads(raw) == {
        "ts": "1970-01-01T00:00:12.500000Z",
        "source": "mesh",
        "kind": "sent",
        "subject": subject,
        "data": data,
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": ""}, "source must be"),
        ({"source": "two words"}, "source must be"),
        ({"kind": "a\nb"}, "kind must be"),
        ({"kind": 3}, "kind must be"),
        ({"subject": None}, "subject must be"),
        ({"subject": "x" * 1025}, "subject must be"),
        ({"data": [1, 2]}, "data must be a JSON object"),
        ({"data": {1: "x"}}, "keys must be strings"),
        ({"data": {"x": float("nan")}}, "not plain JSON"),
        ({"data": {"x": b"bytes"}}, "not plain JSON"),
        ({"data": {"x": "\ud800"}}, "not plain JSON"),
        ({"data": {"blob": "x" * 70_000}}, "the limit is"),
        ({"ts": float("inf")}, "time must be finite"),
    ],
)
def test_bad_entries_are_refused(fields: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"ts": 1.0, "source": "watch", "kind": "restart"}
    arguments.update(fields)
    with pytest.raises(EntryError, match=message):
        core.make_entry(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"data":{},"kind":"k","source":"s","subject":"","ts":"1970-01-01T00:00:00Z"}',
        b'{"data":{},"kind":"k","source":"s","subject":"","ts":"1970-01-01T00:00:00.000000Z","x":1}',
        b'{"kind":"k","data":{},"source":"s","subject":"","ts":"1970-01-01T00:00:00.000000Z"}',
        b'{"data":{}, "kind":"k","source":"s","subject":"","ts":"1970-01-01T00:00:00.000000Z"}',
        b'{"data":{"a":"\\u00e9"},"kind":"k","source":"s","subject":"","ts":"1970-01-01T00:00:00.000000Z"}',
        b'{"data":[],"kind":"k","source":"s","subject":"","ts":"1970-01-01T00:00:00.000000Z"}',
    ],
)
def test_non_canonical_entries_are_refused(raw: bytes) -> None:
    with pytest.raises(EntryError):
        core.parse_entry(raw)


# ---- keys and signed notes ------------------------------------------------------


def test_go_known_answers() -> None:
    signer = core.Signer.parse(GO_SIGNER)
    assert str(signer) == GO_SIGNER
    assert str(signer.verifier) == GO_VERIFIER
    assert signer.verifier.key_id == 0xC74F20A3
    # Ed25519 is deterministic: signing the same text reproduces the published note.
    assert core.sign_note(GO_TEXT, [signer]) == GO_NOTE
    opened = core.open_note(GO_NOTE, [core.Verifier.parse(GO_VERIFIER)])
    assert opened.text == GO_TEXT
    assert opened.verified_by == ("PeterNeumann",)


def test_signed_note_spec_example() -> None:
    verifier = core.Verifier.parse(SPEC_VERIFIER)
    assert verifier.key_id == 0x530D903A
    assert str(verifier) == SPEC_VERIFIER
    assert core.open_note(SPEC_NOTE, [verifier]).text == "This is an example message.\n"


def test_key_id_is_sha256_of_name_type_and_key() -> None:
    import hashlib

    verifier = core.Verifier.parse(GO_VERIFIER)
    digest = hashlib.sha256(b"PeterNeumann\n\x01" + verifier.public_key).digest()
    assert verifier.key_id == int.from_bytes(digest[:4], "big")


@pytest.mark.parametrize(
    "key",
    [
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong id
        "PeterNeumann+c74f20a3+AhpczQcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong type
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10",  # short key
        "PeterNeumann+c74f20a3",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3+!!!",
    ],
)
def test_malformed_verifier_keys(key: str) -> None:
    with pytest.raises(MalformedError):
        core.Verifier.parse(key)


def test_malformed_signer_keys() -> None:
    for key in [
        GO_SIGNER.replace("PRIVATE+KEY", "PUBLIC+KEY"),
        GO_SIGNER.replace("c74f20a3", "c74f20a4"),
        GO_SIGNER[:-4],
        "PRIVATE+KEY+name",
    ]:
        with pytest.raises(MalformedError):
            core.Signer.parse(key)


def test_tampered_notes_fail() -> None:
    verifier = core.Verifier.parse(GO_VERIFIER)
    with pytest.raises(ProofError, match="does not verify"):
        core.open_note(GO_NOTE.replace("cryptography", "cryptographY"), [verifier])
    sig = GO_NOTE.rsplit(" ", 1)[1].strip()
    blob = bytearray(base64.b64decode(sig))
    blob[10] ^= 1
    bad = GO_NOTE.replace(sig, base64.b64encode(bytes(blob)).decode())
    with pytest.raises(ProofError, match="does not verify"):
        core.open_note(bad, [verifier])
    # Signed, but not by a key we trust.
    with pytest.raises(ProofError, match="not signed by a trusted key"):
        core.open_note(GO_NOTE, [core.Verifier.parse(ENOCH_VERIFIER)])


def test_unknown_signatures_are_ignored() -> None:
    other = core.Signer("other.example/log", bytes(range(32)))
    both = core.sign_note(GO_TEXT, [other, core.Signer.parse(GO_SIGNER)])
    opened = core.open_note(both, [core.Verifier.parse(GO_VERIFIER)])
    assert opened.verified_by == ("PeterNeumann",)


@pytest.mark.parametrize(
    "note",
    [
        GO_TEXT,  # no signatures
        GO_NOTE.rstrip("\n"),  # no final newline
        GO_NOTE.replace("\u2014 ", "- "),
        GO_NOTE.replace("\u2014 PeterNeumann ", "\u2014 PeterNeumann  "),
        GO_NOTE.replace("x08go", "x08g!"),
        GO_TEXT + "\n\u2014 PeterNeumann AAA=\n",
        "a\x01b\n\n" + GO_NOTE.split("\n\n")[1],
    ],
)
def test_malformed_notes(note: str) -> None:
    with pytest.raises(MalformedError):
        core.open_note(note, [core.Verifier.parse(GO_VERIFIER)])


@given(
    st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), max_size=200),
    st.binary(min_size=32, max_size=32),
)
def test_any_text_signs_and_opens(text: str, seed: bytes) -> None:
    signer = core.Signer("example.org/log", seed)
    note = core.sign_note(text + "\n", [signer])
    assert core.open_note(note, [signer.verifier]).text == text + "\n"


# ---- checkpoints ----------------------------------------------------------------


def test_checkpoint_text_format() -> None:
    root = bytes(range(32))
    checkpoint = core.Checkpoint("example.com/log", 1234, root, ("ext one",))
    assert checkpoint.text() == (
        f"example.com/log\n1234\n{base64.b64encode(root).decode()}\next one\n"
    )
    assert core.Checkpoint.parse(checkpoint.text()) == checkpoint


@pytest.mark.parametrize(
    "text",
    [
        "example.com/log\n12\n",
        "example.com/log\n012\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        "example.com/log\n-1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        "example.com/log\n12\nAAAA\n",
        "example.com/log\n12\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "\n12\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        "example.com/log\n12\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n",
    ],
)
def test_malformed_checkpoints(text: str) -> None:
    with pytest.raises(MalformedError):
        core.Checkpoint.parse(text)


def test_signed_checkpoint_round_trip_and_origin_binding() -> None:
    signer = core.Signer("host/keel/ledger", bytes(32))
    checkpoint = core.Checkpoint("host/keel/ledger", 7, bytes(range(32)))
    note = core.sign_checkpoint(checkpoint, signer)
    assert note.startswith(checkpoint.text() + "\n\u2014 host/keel/ledger ")
    assert core.open_checkpoint(note, signer.verifier) == checkpoint
    foreign = core.sign_checkpoint(core.Checkpoint("elsewhere/log", 7, bytes(32)), signer)
    with pytest.raises(ProofError, match="origin"):
        core.open_checkpoint(foreign, signer.verifier)
    with pytest.raises(ProofError):
        core.open_checkpoint(note.replace("\n7\n", "\n8\n"), signer.verifier)
