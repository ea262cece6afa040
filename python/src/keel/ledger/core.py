"""The ledger's pure core: Merkle maths, canonical entries, signed checkpoints.

Nothing here does I/O; the clock and the key seed are parameters.

**Merkle tree** (RFC 9162 §2.1, SHA-256): a leaf hashes as
``SHA-256(0x00 || entry)``, an interior node as ``SHA-256(0x01 || left ||
right)``, and the root of ``n > 1`` leaves splits them at the largest power of
two below ``n``. The empty tree's root is ``SHA-256("")``.

The tree is stored as its *perfect subtrees*: ``(level, index)`` names the
subtree of ``2**level`` leaves starting at leaf ``index << level`` (level 0 is
a leaf). Every such subtree is complete the moment its last leaf is appended,
so storage is append-only: the row of leaf ``i`` holds the leaf hash followed
by the hashes of the subtrees that leaf completes (one per trailing 1-bit of
``i``, so two hashes per leaf on average); see :func:`stored_location`. Any
root, inclusion or consistency proof then needs ``O(log n)`` lookups of stored
hashes, which the functions below take as a :data:`HashLookup` callback.

**Entries** are canonical JSON: the object ``{data, kind, source, subject,
ts}`` with sorted keys, no insignificant whitespace, UTF-8 (non-ASCII
characters are written as themselves, not ``\\u`` escapes). ``ts`` is an RFC
3339 UTC timestamp with exactly six fractional digits and a ``Z`` suffix
(``2026-11-21T21:29:00.123456Z``), so timestamps sort as strings. ``data`` is
a JSON object nested at most 64 levels deep; floats must be finite. The
leaf is exactly these bytes, at most 64 KiB.

**Checkpoints** follow C2SP ``tlog-checkpoint`` (origin line, decimal tree
size, base64 root hash, optional extension lines) and are signed as C2SP
``signed-note`` notes with Ed25519 (signature type ``0x01``; key id = first 4
bytes of ``SHA-256(name || 0x0A || 0x01 || public key)``). Keys are written in
the formats of Go's ``golang.org/x/mod/sumdb/note``: verifier keys
``name+hexid+base64(0x01 || public key)``, signer keys
``PRIVATE+KEY+name+hexid+base64(0x01 || seed)``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keel.config import MAX_DEPTH, parse_json
from keel.errors import ConfigError
from keel.ledger.errors import EntryError, MalformedError, ProofError, shown

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

HashLookup = Callable[[int, int], bytes]
"""``lookup(level, index)``: the stored hash of perfect subtree ``(level, index)``."""


# --------------------------------------------------------------------------
# Merkle tree
# --------------------------------------------------------------------------


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _trailing_ones(n: int) -> int:
    return ((n ^ (n + 1)).bit_length()) - 1


def stored_location(level: int, index: int) -> tuple[int, int]:
    """Where perfect subtree ``(level, index)`` is stored: ``(leaf row, slot)``.

    The subtree is completed by its last leaf, ``((index + 1) << level) - 1``;
    that leaf's row holds it in slot ``level``.
    """
    return ((index + 1) << level) - 1, level


def hashes_per_row(index: int) -> int:
    """How many hashes the row of leaf ``index`` holds: the leaf and the subtrees it completes."""
    return 1 + _trailing_ones(index)


def frontier_positions(size: int) -> list[tuple[int, int]]:
    """The perfect subtrees that make up the first ``size`` leaves, largest first."""
    positions = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            positions.append((level, start >> level))
            start += 1 << level
    return positions


class TreeBuilder:
    """Appends leaf hashes and says which subtree hashes each append completes.

    It holds only the *frontier*: the hashes of the perfect subtrees of
    :func:`frontier_positions` (``O(log n)`` of them), so it can resume on a
    tree of any size from those few stored hashes.
    """

    def __init__(self, size: int = 0, frontier: Sequence[bytes] = ()) -> None:
        if len(frontier) != size.bit_count():
            raise ValueError(f"a tree of {size} leaves has {size.bit_count()} frontier hashes")
        self.size = size
        self._frontier = list(frontier)

    @classmethod
    def resume(cls, size: int, lookup: HashLookup) -> TreeBuilder:
        return cls(size, [lookup(level, index) for level, index in frontier_positions(size)])

    def append(self, leaf: bytes) -> list[bytes]:
        """Add one leaf hash; returns the leaf's row: its hash and the subtrees it completes."""
        row = [leaf]
        current = leaf
        size = self.size
        while size & 1:
            current = node_hash(self._frontier.pop(), current)
            row.append(current)
            size >>= 1
        self._frontier.append(current)
        self.size += 1
        return row

    def append_entries(self, entries: Iterable[bytes]) -> list[bytes]:
        """Add leaves for canonical ``entries``; returns each row's hashes, concatenated.

        The same as :meth:`append` of each leaf hash, unrolled for batches.
        """
        sha256 = hashlib.sha256
        frontier = self._frontier
        size = self.size
        rows = []
        for entry in entries:
            current = sha256(b"\x00" + entry).digest()
            if size & 1:
                parts = [current]
                pending = size
                while pending & 1:
                    current = sha256(b"\x01" + frontier.pop() + current).digest()
                    parts.append(current)
                    pending >>= 1
                rows.append(b"".join(parts))
            else:
                rows.append(current)
            frontier.append(current)
            size += 1
        self.size = size
        return rows

    def root(self) -> bytes:
        if not self._frontier:
            return EMPTY_ROOT
        current = self._frontier[-1]
        for left in reversed(self._frontier[:-1]):
            current = node_hash(left, current)
        return current


def subtree_hash(start: int, end: int, lookup: HashLookup) -> bytes:
    """``MTH(D[start:end])`` for a range that occurs in the RFC 9162 recursion.

    Such a range is either a perfect, aligned subtree (one lookup) or splits
    into a perfect left part and a shorter right part, so the cost is at most
    ``log2(end - start) + 1`` lookups.
    """
    n = end - start
    if n <= 0:
        raise ValueError(f"empty range {start}..{end}")
    if n & (n - 1) == 0 and start % n == 0:
        level = n.bit_length() - 1
        return lookup(level, start >> level)
    k = _split(n)
    return node_hash(subtree_hash(start, start + k, lookup), subtree_hash(start + k, end, lookup))


def tree_root(size: int, lookup: HashLookup) -> bytes:
    return EMPTY_ROOT if size == 0 else subtree_hash(0, size, lookup)


def inclusion_proof(index: int, size: int, lookup: HashLookup) -> list[bytes]:
    """RFC 9162 §2.1.3.1 ``PATH(index, D[size])``, leaf-side first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    siblings: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            siblings.append(subtree_hash(start + k, end, lookup))
            end = start + k
        else:
            siblings.append(subtree_hash(start, start + k, lookup))
            start += k
    siblings.reverse()
    return siblings


def consistency_proof(size1: int, size2: int, lookup: HashLookup) -> list[bytes]:
    """RFC 9162 §2.1.4.1 ``PROOF(size1, D[size2])``, leaf-side first."""
    if not 0 < size1 <= size2:
        raise ValueError(f"no consistency proof from size {size1} to size {size2}")
    nodes: list[bytes] = []
    start, end, m, whole = 0, size2, size1, True
    while True:
        if m == end - start:
            if not whole:
                nodes.append(subtree_hash(start, end, lookup))
            break
        k = _split(end - start)
        if m <= k:
            nodes.append(subtree_hash(start + k, end, lookup))
            end = start + k
        else:
            nodes.append(subtree_hash(start, start + k, lookup))
            start += k
            m -= k
            whole = False
    nodes.reverse()
    return nodes


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, a SHA-256 hash is {HASH_SIZE}")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2: the root an inclusion proof leads to; :class:`ProofError` if none."""
    if index < 0 or index >= size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    _check_hash(leaf, "the leaf hash")
    fn, sn = index, size - 1
    r = leaf
    for position, p in enumerate(proof):
        _check_hash(p, f"proof[{position}]")
        if sn == 0:
            raise ProofError(f"the proof is longer than a tree of size {size} needs")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"the proof is shorter than a tree of size {size} needs")
    return r


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf`` is leaf ``index`` of the tree of ``size`` with ``root``."""
    _check_hash(root, "the root")
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise ProofError(f"the proof does not lead from leaf {index} to the given root")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """RFC 9162 §2.1.4.2: check that tree ``size2``/``root2`` extends ``size1``/``root1``.

    Equal sizes need an empty proof and equal roots; a proof from the empty
    tree proves nothing and is refused.
    """
    if size1 < 0 or size2 < 0:
        raise ProofError("tree sizes cannot be negative")
    if size1 > size2:
        raise ProofError(f"size1 ({size1}) is larger than size2 ({size2})")
    if size1 == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise ProofError("equal sizes need an empty proof")
        if root1 != root2:
            raise ProofError("equal sizes but different roots")
        return
    _check_hash(root1, "root1")
    _check_hash(root2, "root2")
    if not proof:
        raise ProofError("the proof is empty")
    for position, p in enumerate(proof):
        _check_hash(p, f"proof[{position}]")
    path = list(proof)
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"the proof is longer than sizes {size1} and {size2} need")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"the proof is shorter than sizes {size1} and {size2} need")
    if fr != root1:
        raise ProofError("the proof does not lead to root1")
    if sr != root2:
        raise ProofError("the proof does not lead to root2")


# --------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------

ENTRY_FIELDS = ("data", "kind", "source", "subject", "ts")
MAX_ENTRY_BYTES = 64 * 1024
_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@functools.lru_cache(maxsize=16)
def _ts_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def format_ts(seconds: float) -> str:
    """A POSIX time as the entry timestamp: RFC 3339, UTC, microseconds, ``Z``."""
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return f"{_ts_second(whole)}.{micros:06d}Z"


# One encoder for every entry: json.dumps() would build a new one per call.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, finite numbers only."""
    return _CANONICAL.encode(value).encode("utf-8")


def _too_deep() -> EntryError:
    return EntryError(f"entry data is nested more than {MAX_DEPTH} levels deep")


def _encode_entry(value: dict[str, Any]) -> bytes:
    try:
        raw = canonical_json(value)
    except RecursionError:
        raise _too_deep() from None
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise EntryError(f"entry data is not plain JSON: {shown(str(exc))}") from None
    if len(raw) > MAX_ENTRY_BYTES:
        raise EntryError(
            f"entry is {len(raw)} bytes, the limit is {MAX_ENTRY_BYTES} "
            "(ledger entries carry metadata, not payloads)"
        )
    return raw


@dataclass(frozen=True)
class Entry:
    """One ledger entry; :meth:`canonical` is the leaf."""

    ts: str
    source: str
    kind: str
    subject: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "data": dict(self.data),
            "kind": self.kind,
            "source": self.source,
            "subject": self.subject,
            "ts": self.ts,
        }

    def canonical(self) -> bytes:
        return _encode_entry(self.as_dict())


def make_entry(
    *, ts: float, source: str, kind: str, subject: str = "", data: Mapping[str, Any] | None = None
) -> bytes:
    """Validate the fields and return the canonical entry bytes (the leaf)."""
    for name, value in (("source", source), ("kind", kind)):
        if type(value) is not str or not _NAME.fullmatch(value):
            raise EntryError(
                f"entry {name} must be 1-128 characters without spaces or control "
                f"characters, got {shown(value)}"
            )
    if type(subject) is not str or len(subject) > 1024 or "\x00" in subject:
        raise EntryError(
            f"entry subject must be a string of at most 1024 characters without NUL, "
            f"got {shown(subject)}"
        )
    if data is None:
        data = {}
    elif type(data) is not dict:
        if not isinstance(data, Mapping):
            raise EntryError(f"entry data must be a JSON object, got {type(data).__name__}")
        data = dict(data)
    for key in data:
        if type(key) is not str:
            raise EntryError(f"entry data keys must be strings, got {shown(key)}")
    if not math.isfinite(ts):
        raise EntryError(f"entry time must be finite, got {ts}")
    raw = _encode_entry(
        {"data": data, "kind": kind, "source": source, "subject": subject, "ts": format_ts(ts)}
    )
    # Only an entry with this many brackets can nest too deep: the check costs
    # nothing for the small entries daemons append.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH + 1:
        _parse_entry_json(raw)
    return raw


def _parse_entry_json(raw: bytes) -> Any:
    """``raw`` as JSON: strictly (see :func:`keel.config.parse_json`), data at most 64 deep."""
    try:
        return parse_json(raw.decode("utf-8"), source="entry", max_depth=MAX_DEPTH + 1)
    except UnicodeDecodeError as exc:
        raise EntryError(f"entry is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ConfigError as exc:
        if "levels deep" in str(exc):
            raise _too_deep() from None
        raise EntryError(str(exc)) from None


def parse_entry(raw: bytes) -> Entry:
    """Parse stored entry bytes, checking that they are a canonical entry."""
    if type(raw) is not bytes:
        raise EntryError(f"an entry is stored as bytes, not {type(raw).__name__}")
    if len(raw) > MAX_ENTRY_BYTES:
        raise EntryError(f"entry is {len(raw)} bytes, the limit is {MAX_ENTRY_BYTES}")
    value = _parse_entry_json(raw)
    if not isinstance(value, dict) or sorted(value) != list(ENTRY_FIELDS):
        raise EntryError(f"an entry is an object with exactly the keys {', '.join(ENTRY_FIELDS)}")
    ts, source, kind, subject, data = (
        value[k] for k in ("ts", "source", "kind", "subject", "data")
    )
    if not isinstance(ts, str) or not TIMESTAMP.fullmatch(ts):
        raise EntryError(
            f"entry ts must be an RFC 3339 UTC time like {format_ts(0)}, got {shown(ts)}"
        )
    if not all(isinstance(v, str) for v in (source, kind, subject)) or not isinstance(data, dict):
        raise EntryError("entry source, kind and subject must be strings and data an object")
    entry = Entry(ts, source, kind, subject, data)
    try:
        canonical = entry.canonical()
    except EntryError:
        canonical = b""
    if canonical != raw:  # also refuses duplicate keys and escaped non-ASCII
        raise EntryError("entry is not in canonical form (sorted keys, no spaces, UTF-8)")
    return entry


# --------------------------------------------------------------------------
# Signed notes and checkpoints
# --------------------------------------------------------------------------

ED25519 = 0x01
SIGNATURE_PREFIX = "\u2014 "  # an em dash and a space open each signature line
MAX_SIGNATURES = 100


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MalformedError(f"{what} is not valid base64") from None


def _check_key_name(name: str) -> None:
    if not name or "+" in name or any(c.isspace() for c in name) or not name.isprintable():
        raise MalformedError(
            f"key name {shown(name)} must be non-empty, without spaces, '+' or control characters"
        )


def key_id(name: str, public_key: bytes, algorithm: int = ED25519) -> int:
    """C2SP signed-note key id: the first 4 bytes of SHA-256(name || LF || type || key)."""
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([algorithm]) + public_key)
    return int.from_bytes(digest.digest()[:4], "big")


@dataclass(frozen=True)
class Verifier:
    """An Ed25519 note verifier key: ``name+hexid+base64(0x01 || public key)``."""

    name: str
    public_key: bytes

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.public_key)

    @classmethod
    def parse(cls, text: str) -> Verifier:
        parts = text.strip().split("+", 2)  # base64 may contain '+', names may not
        if len(parts) != 3:
            raise MalformedError("a verifier key has the form name+hexkeyid+base64key")
        name, hex_id, material = parts
        _check_key_name(name)
        raw = _b64decode(material, "the verifier key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise MalformedError("the verifier key is not an Ed25519 key (type 0x01, 32 bytes)")
        verifier = cls(name, raw[1:])
        if not re.fullmatch(r"[0-9a-f]{8}", hex_id) or int(hex_id, 16) != verifier.key_id:
            raise MalformedError(
                f"the verifier key's id {shown(hex_id)} does not match its name and key"
            )
        return verifier

    def __str__(self) -> str:
        material = base64.b64encode(bytes([ED25519]) + self.public_key).decode()
        return f"{self.name}+{self.key_id:08x}+{material}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class Signer:
    """An Ed25519 note signer key: ``PRIVATE+KEY+name+hexid+base64(0x01 || seed)``."""

    name: str
    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_key_name(self.name)
        if len(self.seed) != 32:
            raise MalformedError("an Ed25519 seed is 32 bytes")

    @property
    def verifier(self) -> Verifier:
        public = (
            Ed25519PrivateKey.from_private_bytes(self.seed)
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        return Verifier(self.name, public)

    @classmethod
    def parse(cls, text: str) -> Signer:
        parts = text.strip().split("+", 4)  # base64 may contain '+', names may not
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise MalformedError("a signer key has the form PRIVATE+KEY+name+hexkeyid+base64key")
        name, hex_id, material = parts[2:]
        _check_key_name(name)
        raw = _b64decode(material, "the signer key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise MalformedError("the signer key is not an Ed25519 key (type 0x01, 32 bytes)")
        signer = cls(name, raw[1:])
        if not re.fullmatch(r"[0-9a-f]{8}", hex_id) or int(hex_id, 16) != signer.verifier.key_id:
            raise MalformedError(
                f"the signer key's id {shown(hex_id)} does not match its name and key"
            )
        return signer

    def __str__(self) -> str:
        material = base64.b64encode(bytes([ED25519]) + self.seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_id:08x}+{material}"

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(message)


def _check_note_text(text: str) -> None:
    if not text.endswith("\n"):
        raise MalformedError("note text must end with a newline")
    if any((ord(c) < 0x20 and c != "\n") or c == "\x7f" for c in text):
        raise MalformedError("note text must not contain control characters other than newline")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, from text read with surrogateescape
        raise MalformedError("note text is not valid Unicode") from None


def sign_note(text: str, signers: Iterable[Signer]) -> str:
    """C2SP signed-note: the text, a blank line, one signature line per signer."""
    _check_note_text(text)
    message = text.encode("utf-8")
    lines = []
    for signer in signers:
        blob = signer.verifier.key_id.to_bytes(4, "big") + signer.sign(message)
        lines.append(NoteSignature(signer.name, blob).line())
    if not lines:
        raise ValueError("a signed note needs at least one signer")
    return text + "\n" + "".join(lines)


@dataclass(frozen=True)
class OpenedNote:
    text: str
    verified_by: tuple[str, ...]


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a signed note: the key name and the decoded blob."""

    name: str
    blob: bytes  # 4-byte key id || the signature (its layout depends on the key's type)

    @property
    def key_id(self) -> int:
        return int.from_bytes(self.blob[:4], "big")

    def line(self) -> str:
        return f"{SIGNATURE_PREFIX}{self.name} {base64.b64encode(self.blob).decode()}\n"


def split_note(note: str) -> tuple[str, list[NoteSignature]]:
    """A signed note's text and its signature lines, checked for form only.

    :class:`MalformedError` for anything that is not a signed note; no
    signature is verified here (:func:`open_note` does that).
    """
    if not note.endswith("\n") or "\n\n" not in note:
        raise MalformedError("a signed note is text, a blank line and signature lines")
    split = note.rindex("\n\n")
    text, block = note[: split + 1], note[split + 2 :]
    _check_note_text(text)
    signature_lines = block.splitlines()
    if not signature_lines or len(signature_lines) > MAX_SIGNATURES:
        raise MalformedError(f"a signed note carries 1 to {MAX_SIGNATURES} signatures")
    signatures = []
    for line in signature_lines:
        if not line.startswith(SIGNATURE_PREFIX) or line.count(" ") != 2:
            raise MalformedError(f"malformed signature line {shown(line)}")
        name, encoded = line[len(SIGNATURE_PREFIX) :].split(" ")
        _check_key_name(name)
        blob = _b64decode(encoded, f"the signature of {shown(name)}")
        if len(blob) < 5:
            raise MalformedError(f"the signature of {shown(name)} is too short")
        signatures.append(NoteSignature(name, blob))
    return text, signatures


def open_note(note: str, verifiers: Sequence[Verifier]) -> OpenedNote:
    """Parse a signed note and check its signatures against the trusted ``verifiers``.

    Signatures by unknown keys are ignored; a signature by a known key that
    does not verify is a :class:`ProofError`, and so is a note that no known
    key signed. Malformed notes raise :class:`MalformedError`.
    """
    text, signatures = split_note(note)
    message = text.encode("utf-8")
    known = {(v.name, v.key_id): v for v in verifiers}
    verified: list[str] = []
    for signature in signatures:
        name, blob = signature.name, signature.blob
        verifier = known.get((name, signature.key_id))
        if verifier is None:
            continue
        if not verifier.verify(message, blob[4:]):
            raise ProofError(f"the signature of {name} ({verifier.key_id:08x}) does not verify")
        verified.append(name)
    if not verified:
        names = ", ".join(f"{v.name}+{v.key_id:08x}" for v in verifiers) or "none"
        raise ProofError(f"the note is not signed by a trusted key (trusted: {names})")
    return OpenedNote(text, tuple(verified))


@dataclass(frozen=True)
class Checkpoint:
    """A C2SP tlog-checkpoint: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode()]
        return "".join(line + "\n" for line in (*lines, *self.extensions))

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        if not text.endswith("\n"):
            raise MalformedError("a checkpoint ends with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedError("a checkpoint has an origin, a size and a root hash line")
        origin, size_text, root_text, *extensions = lines
        if not origin:
            raise MalformedError("the checkpoint origin line is empty")
        if not re.fullmatch(r"0|[1-9][0-9]{0,19}", size_text):
            raise MalformedError(f"the checkpoint size {shown(size_text)} is not a decimal number")
        root = _b64decode(root_text, "the checkpoint root hash")
        if len(root) != HASH_SIZE:
            raise MalformedError(f"the checkpoint root hash is {len(root)} bytes, not {HASH_SIZE}")
        if any(not line for line in extensions):
            raise MalformedError("checkpoint extension lines must not be empty")
        return cls(origin, int(size_text), root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> str:
    return sign_note(checkpoint.text(), [signer])


def open_checkpoint(note: str, verifier: Verifier) -> Checkpoint:
    """Verify a signed checkpoint note with ``verifier``; its origin must be the key name."""
    checkpoint = Checkpoint.parse(open_note(note, [verifier]).text)
    if checkpoint.origin != verifier.name:
        raise ProofError(
            f"the checkpoint origin {shown(checkpoint.origin)} is not the key name "
            f"{shown(verifier.name)}"
        )
    return checkpoint


# --------------------------------------------------------------------------
# Proofs as JSON (the format of the published test vectors)
# --------------------------------------------------------------------------


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _json_int(document: Mapping[str, Any], key: str) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedError(f"{key!r} must be a non-negative integer, got {shown(value)}")
    return value


def _json_bytes(document: Mapping[str, Any], key: str) -> bytes:
    value = document.get(key)
    if not isinstance(value, str):
        raise MalformedError(f"{key!r} must be a base64 string, got {shown(value)}")
    return _b64decode(value, repr(key))


def _json_hashes(document: Mapping[str, Any], key: str) -> list[bytes]:
    value = document.get(key)
    if value is None:  # the vectors write an empty proof as null
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise MalformedError(f"{key!r} must be a list of base64 strings or null")
    return [_b64decode(item, f"{key}[{i}]") for i, item in enumerate(value)]


def _check_keys(document: Any, required: set[str]) -> Mapping[str, Any]:
    if not isinstance(document, dict):
        raise MalformedError("a proof is a JSON object")
    # The vector files also carry a description and the expected outcome.
    allowed = required | {"desc", "wantErr"}
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise MalformedError(f"unknown key {shown(unknown[0])} in proof")
    missing = sorted(required - set(document))
    if missing:
        raise MalformedError(f"the proof lacks {missing[0]!r}")
    return document


INCLUSION_KEYS = {"leafIdx", "treeSize", "root", "leafHash", "proof"}
CONSISTENCY_KEYS = {"size1", "size2", "root1", "root2", "proof"}


@dataclass(frozen=True)
class InclusionProof:
    leaf_index: int
    tree_size: int
    root: bytes
    leaf_hash: bytes
    proof: tuple[bytes, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "leafIdx": self.leaf_index,
            "treeSize": self.tree_size,
            "root": _b64(self.root),
            "leafHash": _b64(self.leaf_hash),
            "proof": [_b64(p) for p in self.proof],
        }

    @classmethod
    def from_json(cls, document: Any) -> InclusionProof:
        doc = _check_keys(document, INCLUSION_KEYS)
        return cls(
            _json_int(doc, "leafIdx"),
            _json_int(doc, "treeSize"),
            _json_bytes(doc, "root"),
            _json_bytes(doc, "leafHash"),
            tuple(_json_hashes(doc, "proof")),
        )

    def verify(self) -> None:
        verify_inclusion(self.leaf_index, self.tree_size, self.leaf_hash, self.proof, self.root)


@dataclass(frozen=True)
class ConsistencyProof:
    size1: int
    size2: int
    root1: bytes
    root2: bytes
    proof: tuple[bytes, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "size1": self.size1,
            "size2": self.size2,
            "root1": _b64(self.root1),
            "root2": _b64(self.root2),
            "proof": [_b64(p) for p in self.proof],
        }

    @classmethod
    def from_json(cls, document: Any) -> ConsistencyProof:
        doc = _check_keys(document, CONSISTENCY_KEYS)
        return cls(
            _json_int(doc, "size1"),
            _json_int(doc, "size2"),
            _json_bytes(doc, "root1"),
            _json_bytes(doc, "root2"),
            tuple(_json_hashes(doc, "proof")),
        )

    def verify(self) -> None:
        verify_consistency(self.size1, self.size2, self.proof, self.root1, self.root2)


def parse_proof(document: Any) -> InclusionProof | ConsistencyProof:
    """An inclusion or consistency proof, told apart by its keys."""
    if isinstance(document, dict) and "leafIdx" in document:
        return InclusionProof.from_json(document)
    if isinstance(document, dict) and "size1" in document:
        return ConsistencyProof.from_json(document)
    raise MalformedError("not a proof: expected the keys leafIdx/treeSize/... or size1/size2/...")
