"""The fleet audit: every node's current checkpoint against what the others hold.

Pure: the shell gathers the answers over the mesh, this module judges them.

What goes in:

- :class:`Presented`: each reachable node's current checkpoint (signed with
  its ledger key, fresh) and consistency proofs from every size asked about
  to its current size;
- :class:`HeldNote`: every checkpoint of a node that someone else holds:
  the largest one each witness cosigned, and the evidence notes kept with a
  witness's alarms. Each is signed by the node itself, so what it proves does
  not depend on trusting the holder: the holder's cosignature only adds *who
  saw it, and when*.

What comes out, per node (:class:`NodeAudit`), the worst that applies:

- ``forked``: two checkpoints the node signed that cannot both be true: the
  same size with different roots (provable from the two notes alone, also
  while the node is down), or its current tree and a held checkpoint that its
  own consistency proof does not connect;
- ``went-back``: the node's current tree is smaller than one it signed before;
- ``key-changed``: the node signs with another key than the one a witness (or
  this auditor) pinned for it;
- ``unreachable``: the node did not answer; only the held checkpoints were
  checked against each other;
- ``unwitnessed``: the node answered but nobody holds a checkpoint of it yet;
- ``consistent``: the node's current tree extends every checkpoint others hold.

A holder's record that does not verify (a damaged note, a cosignature that
fails) is reported as such and proves nothing either way.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from keel.fleet.cosign import CosignatureVerifier, cosignatures
from keel.fleet.witness import FORKED, KEY_CHANGED, WENT_BACK, consistency_problem
from keel.ledger import core
from keel.ledger.errors import LedgerError

CONSISTENT = "consistent"
UNREACHABLE = "unreachable"
UNWITNESSED = "unwitnessed"
# Worst first: a node's verdict is the first of these that applies.
VERDICTS = (FORKED, WENT_BACK, KEY_CHANGED, UNREACHABLE, UNWITNESSED, CONSISTENT)
PROBLEMS = (FORKED, WENT_BACK, KEY_CHANGED)

EXIT_CLEAN = 0
EXIT_PROBLEM = 1  # a node forked, went back or changed its key
EXIT_INCOMPLETE = 3  # nothing wrong found, but not every node or witness answered


@dataclass(frozen=True)
class Presented:
    """A node's answer: its current checkpoint and proofs from the sizes asked about."""

    node: str
    ledger_key: str
    note: str
    proofs: Mapping[int, Sequence[bytes] | None]  # None: the size is beyond the node's tree


@dataclass(frozen=True)
class HeldNote:
    """A checkpoint of ``node``, signed by ``node``, held by ``holder``."""

    node: str
    holder: str  # the node id of the witness that keeps it
    ledger_key: str  # the key the holder pinned for ``node``
    note: str
    holder_key: str | None = (
        None  # the holder's cosignature key, if the note carries its cosignature
    )
    source: str = "witnessed"  # or "alarm": evidence kept with a witness's alarm


@dataclass(frozen=True)
class Finding:
    kind: str  # a verdict of VERDICTS, or "invalid" for a record that proves nothing
    detail: str
    holder: str | None = None
    evidence: tuple[str, ...] = ()  # the signed notes that show it


@dataclass(frozen=True)
class Held:
    """A verified held note: the checkpoint and, if cosigned, when its holder saw it."""

    held_note: HeldNote
    checkpoint: core.Checkpoint
    at: int | None


@dataclass
class NodeAudit:
    node: str
    verdict: str
    reachable: bool
    current: core.Checkpoint | None
    ledger_key: str | None
    held: list[Held] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        latest = max(self.held, key=lambda h: h.checkpoint.size, default=None)
        return {
            "node": self.node,
            "verdict": self.verdict,
            "reachable": self.reachable,
            "ledger_key": self.ledger_key,
            "current": None if self.current is None else _checkpoint_json(self.current),
            "witnessed_by": sorted(
                {h.held_note.holder for h in self.held if h.held_note.source == "witnessed"}
            ),
            "latest_witnessed": None
            if latest is None
            else {
                **_checkpoint_json(latest.checkpoint),
                "holder": latest.held_note.holder,
                "at": latest.at,
            },
            "findings": [
                {
                    "kind": f.kind,
                    "detail": f.detail,
                    "holder": f.holder,
                    "evidence": list(f.evidence),
                }
                for f in self.findings
            ],
        }


@dataclass
class Audit:
    nodes: list[NodeAudit]
    silent_witnesses: list[str]  # members that did not say what they hold

    @property
    def problems(self) -> list[NodeAudit]:
        return [n for n in self.nodes if n.verdict in PROBLEMS]

    @property
    def exit_code(self) -> int:
        if self.problems:
            return EXIT_PROBLEM
        if self.silent_witnesses or any(n.verdict == UNREACHABLE for n in self.nodes):
            return EXIT_INCOMPLETE
        return EXIT_CLEAN

    def to_json(self) -> dict[str, object]:
        return {
            "nodes": [n.to_json() for n in self.nodes],
            "problems": [n.node for n in self.problems],
            "silent_witnesses": self.silent_witnesses,
            "exit_code": self.exit_code,
        }


def sizes_to_prove(held_notes: Iterable[HeldNote], node: str) -> list[int]:
    """The tree sizes of ``node`` held by others: what to ask ``node`` to prove consistency from."""
    sizes = set()
    for held_note in held_notes:
        if held_note.node != node:
            continue
        try:
            sizes.add(core.Checkpoint.parse(core.split_note(held_note.note)[0]).size)
        except LedgerError:
            continue
    return sorted(sizes)


def judge(
    members: Sequence[str],
    presented: Mapping[str, Presented],
    held_notes: Sequence[HeldNote],
    *,
    silent: Sequence[str] = (),
    pinned: Mapping[str, str] | None = None,
    missing: Mapping[str, str] | None = None,
) -> Audit:
    """Audit every node of ``members``: ``presented`` holds the nodes that answered,
    ``missing`` why the others did not present a checkpoint, ``silent`` the members
    that did not say what they hold, ``pinned`` the ledger keys this auditor has
    pinned itself.
    """
    pinned = pinned or {}
    missing = missing or {}
    nodes = []
    for node in members:
        mine = [t for t in held_notes if t.node == node]
        audit = _judge_node(node, presented.get(node), mine, pinned.get(node))
        if node not in presented:
            reason = missing.get(node, "no answer")
            audit.findings.append(
                Finding(UNREACHABLE, f"its current checkpoint is unknown: {reason}")
            )
        nodes.append(audit)
    return Audit(nodes, sorted(set(silent)))


def _judge_node(
    node: str, answer: Presented | None, held_notes: list[HeldNote], pinned: str | None
) -> NodeAudit:
    findings: list[Finding] = []
    held = []
    for held_note in held_notes:
        verified = _verify(held_note)
        if isinstance(verified, Finding):
            findings.append(verified)
        else:
            held.append(verified)
    findings += _conflicts_among(held)
    current = None
    key = None
    if answer is not None:
        current, key, problems = _check_current(answer, held, pinned)
        findings += problems
    audit = NodeAudit(node, CONSISTENT, answer is not None, current, key, held, findings)
    kinds = {f.kind for f in findings}
    for verdict in PROBLEMS:
        if verdict in kinds:
            audit.verdict = verdict
            return audit
    if answer is None:
        audit.verdict = UNREACHABLE
    elif not any(h.held_note.source == "witnessed" for h in held):
        audit.verdict = UNWITNESSED
    return audit


def _verify(held_note: HeldNote) -> Held | Finding:
    """The held checkpoint, checked against the node's key (and the holder's cosignature)."""
    what = f"{held_note.holder}'s {held_note.source} record of {held_note.node}"
    try:
        verifier = core.Verifier.parse(held_note.ledger_key)
        checkpoint = core.open_checkpoint(held_note.note, verifier)
    except LedgerError as exc:
        return Finding("invalid", f"{what} does not verify: {exc}", held_note.holder)
    at = None
    if held_note.holder_key is not None:
        try:
            witness_key = CosignatureVerifier.parse(held_note.holder_key)
            found = cosignatures(held_note.note, [witness_key])
        except LedgerError as exc:
            return Finding(
                "invalid", f"{what}: its cosignature does not verify: {exc}", held_note.holder
            )
        if not found:
            return Finding(
                "invalid", f"{what} carries no cosignature of its holder", held_note.holder
            )
        at = found[0].timestamp
    return Held(held_note, checkpoint, at)


def _conflicts_among(held: list[Held]) -> list[Finding]:
    """Two held checkpoints of one size with different roots, under one key: a proven fork."""
    findings = []
    by_size: dict[tuple[str, int], Held] = {}
    for item in sorted(held, key=lambda h: (h.checkpoint.size, h.held_note.holder)):
        key = (item.held_note.ledger_key, item.checkpoint.size)
        other = by_size.setdefault(key, item)
        if other.checkpoint.root != item.checkpoint.root:
            findings.append(
                Finding(
                    FORKED,
                    f"two checkpoints of size {item.checkpoint.size} signed by the node with "
                    f"different roots: {_root(other.checkpoint)} (held by {other.held_note.holder}) "
                    f"and {_root(item.checkpoint)} (held by {item.held_note.holder})",
                    item.held_note.holder,
                    (other.held_note.note, item.held_note.note),
                )
            )
    return findings


def _check_current(
    answer: Presented, held: list[Held], pinned: str | None
) -> tuple[core.Checkpoint | None, str | None, list[Finding]]:
    try:
        verifier = core.Verifier.parse(answer.ledger_key)
        current = core.open_checkpoint(answer.note, verifier)
    except LedgerError as exc:
        return None, None, [Finding("invalid", f"its current checkpoint does not verify: {exc}")]
    key = str(verifier)
    findings = []
    if pinned is not None and pinned != key:
        findings.append(
            Finding(KEY_CHANGED, f"it signs with {key}, but this auditor pinned {pinned} for it")
        )
    for item in held:
        held_note = item.held_note
        holder = held_note.holder
        seen = f" (held by {holder}{_at(item.at)})"
        if held_note.ledger_key != key:
            findings.append(
                Finding(
                    KEY_CHANGED,
                    f"it signs with {key}, but {holder} holds a checkpoint of it signed with "
                    f"{held_note.ledger_key}{seen}",
                    holder,
                    (held_note.note, answer.note),
                )
            )
            continue
        old = item.checkpoint
        proof = answer.proofs.get(old.size)
        if proof is None and 0 < old.size < current.size:
            findings.append(
                Finding(
                    FORKED,
                    f"it gave no consistency proof from size {old.size} to {current.size}, "
                    f"a checkpoint it signed{seen}",
                    holder,
                    (held_note.note, answer.note),
                )
            )
            continue
        problem = consistency_problem(old.size, old.root, current, proof or ())
        if problem is not None:
            kind, detail = problem
            findings.append(Finding(kind, detail + seen, holder, (held_note.note, answer.note)))
    return current, key, findings


def _checkpoint_json(checkpoint: core.Checkpoint) -> dict[str, object]:
    return {"origin": checkpoint.origin, "size": checkpoint.size, "root": _root(checkpoint)}


def _root(checkpoint: core.Checkpoint) -> str:
    return base64.b64encode(checkpoint.root).decode()


def _at(at: int | None) -> str:
    return "" if at is None else f", cosigned at {core.format_ts(at)}"
