"""The witness's decision: cosign another node's checkpoint, or raise an alarm.

Pure: no I/O; the time and the witness key are parameters.

Every node witnesses the ledger of every other node it hears over the mesh.
For each of them it keeps one :class:`Witnessed` record: the node's ledger key
(pinned the first time: trust on first use, or set by the operator), and the
largest checkpoint it has cosigned. When the node answers a witnessing round
with its current signed checkpoint and a consistency proof from the witnessed
size, :func:`witness` decides:

- :class:`Cosigned`: the checkpoint verifies under the pinned key and
  extends the witnessed one (or is the first one seen): the witness cosigns
  it (C2SP ``tlog-cosignature``) and it becomes the new record. The same
  checkpoint again is cosigned again with a fresh time (a cosignature says
  "as of this time, this is the largest tree I have seen").
- :class:`Alarm`: the node's log went back (a smaller tree than one it
  signed before), forked (a tree the proof does not connect to the witnessed
  one: the same size with another root, or a proof that fails), or its
  ledger key changed. The record stays as it was: a witness never cosigns
  past a fork, and the two notes signed by the node are kept as evidence.
- :class:`Invalid`: the answer is malformed or its signature does not verify.
  Nothing changes; the round is retried later. (The mesh authenticates the
  sender, so this is a bug or a damaged ledger key, not evidence.)
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

from keel.fleet.cosign import Cosigner, cosign
from keel.ledger import core
from keel.ledger.errors import LedgerError

FORKED = "forked"
WENT_BACK = "went-back"
KEY_CHANGED = "key-changed"
ALARM_KINDS = (FORKED, WENT_BACK, KEY_CHANGED)


@dataclass(frozen=True)
class Witnessed:
    """The largest checkpoint of ``node``'s ledger this witness has cosigned."""

    node: str  # the mesh node id (authenticated by the mesh session)
    ledger_key: str  # the node's ledger verifier key, pinned
    size: int
    root: bytes
    note: str  # the checkpoint signed by the node, with this witness's cosignature
    at: int  # the time of that cosignature (POSIX seconds)

    def describe(self) -> str:
        return f"size {self.size}, root {base64.b64encode(self.root).decode()}"


@dataclass(frozen=True)
class Cosigned:
    witnessed: Witnessed
    first: bool  # no checkpoint of this node had been witnessed before (its key is now pinned)
    grew: int  # entries added since the previous record


@dataclass(frozen=True)
class Alarm:
    node: str
    kind: str  # one of ALARM_KINDS
    detail: str
    witnessed: Witnessed  # what this witness had cosigned
    presented: str  # the checkpoint note the node presented now
    presented_key: str


@dataclass(frozen=True)
class Invalid:
    node: str
    reason: str


Decision = Cosigned | Alarm | Invalid


def witness(
    previous: Witnessed | None,
    *,
    node: str,
    ledger_key: str,
    note: str,
    proof: Sequence[bytes],
    cosigner: Cosigner,
    now: float,
    pinned_key: str | None = None,
) -> Decision:
    """Judge ``node``'s answer (its ledger key, checkpoint ``note`` and the proof from
    ``previous.size``) and cosign or refuse; ``pinned_key``, if the operator set one,
    is the only key accepted for a node seen for the first time.
    """
    try:
        verifier = core.Verifier.parse(ledger_key)
    except LedgerError as exc:
        return Invalid(node, f"its ledger key is malformed: {exc}")
    presented_key = str(verifier)
    expected = previous.ledger_key if previous is not None else pinned_key
    if expected is not None and presented_key != expected:
        if previous is None:
            return Invalid(node, f"its ledger key {presented_key} is not the pinned {expected}")
        return Alarm(
            node,
            KEY_CHANGED,
            f"the node now signs with {presented_key}, not the key {previous.ledger_key} "
            f"its witnessed checkpoint ({previous.describe()}) was signed with",
            previous,
            note,
            presented_key,
        )
    try:
        checkpoint = core.open_checkpoint(note, verifier)
    except LedgerError as exc:
        return Invalid(node, f"its checkpoint does not verify: {exc}")
    timestamp = int(now)
    cosigned = cosign(_strip_to_log_signature(note, verifier), cosigner, timestamp)
    if previous is None:
        return Cosigned(
            Witnessed(node, presented_key, checkpoint.size, checkpoint.root, cosigned, timestamp),
            first=True,
            grew=checkpoint.size,
        )
    problem = consistency_problem(previous.size, previous.root, checkpoint, proof)
    if problem is not None:
        kind, detail = problem
        return Alarm(node, kind, detail, previous, note, presented_key)
    return Cosigned(
        Witnessed(node, previous.ledger_key, checkpoint.size, checkpoint.root, cosigned, timestamp),
        first=False,
        grew=checkpoint.size - previous.size,
    )


def consistency_problem(
    size: int, root: bytes, current: core.Checkpoint, proof: Sequence[bytes]
) -> tuple[str, str] | None:
    """Why ``current`` does not extend the tree of ``size``/``root``, or None if it does.

    Returns ``(kind, detail)``: :data:`WENT_BACK` for a smaller tree,
    :data:`FORKED` for the same size with another root or a proof that fails.
    """
    old = f"size {size}, root {base64.b64encode(root).decode()}"
    new = f"size {current.size}, root {base64.b64encode(current.root).decode()}"
    if current.size < size:
        return WENT_BACK, f"its log went back: it now has {new}, after it had signed {old}"
    if current.size == size:
        if current.root != root:
            return FORKED, f"its log forked: {new}, after it had signed the same size with {old}"
        return None
    if size == 0:
        return None  # every tree extends the empty one
    try:
        core.verify_consistency(size, current.size, proof, root, current.root)
    except LedgerError as exc:
        return FORKED, f"its log forked: {new} does not extend {old} ({exc})"
    return None


def _strip_to_log_signature(note: str, verifier: core.Verifier) -> str:
    """The note with the log's own signature only (cosignatures of others are not ours to keep)."""
    text, signatures = core.split_note(note)
    own = [s for s in signatures if (s.name, s.key_id) == (verifier.name, verifier.key_id)]
    return text + "\n" + "".join(s.line() for s in own)
