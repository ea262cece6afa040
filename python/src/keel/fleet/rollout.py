"""A rolling safe switch across nodes: canary first, then batches, halt on the first failure.

Pure: a state machine fed with what each node's safe switch ended in; it says
which nodes to switch (or switch back) next and, at the end, what happened.

1. The canary (the first node given, or the one named) switches alone.
2. If it committed, the others switch in batches of ``batch`` nodes at once,
   in the order given.
3. The first node whose switch did not commit (it rolled back by itself, was
   refused, needs an operator, or did not report within the deadline) halts
   the rollout: no further node starts; the switches already running in its
   batch are waited for (each is a safe switch of its own, never cut short).
4. Halted, with ``revert`` asked: every node that committed is switched back
   to the generation it ran before (``keel switch rollback``), all at once.

A node's outcome is one of :data:`OUTCOMES`; the report names the nodes
switched, the one that halted the rollout and why, those never started and,
if asked, those switched back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# What a node's switch can end in (``keel switch --json``'s outcome, or the fleet's verdict).
COMMITTED = "committed"
ROLLED_BACK = "rolled-back"  # the gate failed; the node rolled itself back
REFUSED = "refused"  # nothing was changed on the node
NEEDS_OPERATOR = "needs-operator"  # its rollback failed
LOST = "lost"  # no outcome within the deadline (unreachable, or the switch never reported)
OUTCOMES = (COMMITTED, ROLLED_BACK, REFUSED, NEEDS_OPERATOR, LOST)

# What switching a node back can end in.
REVERTED = "reverted"
REVERT_FAILED = "revert-failed"


@dataclass(frozen=True)
class Switch:
    node: str


@dataclass(frozen=True)
class Revert:
    node: str


@dataclass(frozen=True)
class Finished:
    """The rollout is over; :meth:`Rollout.report` says how."""


Step = Switch | Revert | Finished


@dataclass
class Rollout:
    nodes: Sequence[str]
    batch: int = 1
    revert: bool = False
    outcomes: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    reverts: dict[str, str] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    reverting: set[str] = field(default_factory=set)
    halted_by: str | None = None
    _next: int = 0

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a rollout needs at least one node")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("a node is named twice")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")

    @property
    def canary(self) -> str:
        return self.nodes[0]

    def start(self) -> list[Step]:
        """The first steps: the canary's switch."""
        return self._advance()

    def finished(self, node: str, outcome: str, reason: str = "") -> list[Step]:
        """Node ``node``'s switch ended in ``outcome``; returns what to do next."""
        if node not in self.running:
            raise ValueError(f"{node} has no switch running")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.running.discard(node)
        self.outcomes[node] = outcome
        if reason:
            self.reasons[node] = reason
        if outcome != COMMITTED and self.halted_by is None:
            self.halted_by = node
        return self._advance()

    def reverted(self, node: str, ok: bool, reason: str = "") -> list[Step]:
        """Switching ``node`` back ended; returns what to do next."""
        if node not in self.reverting:
            raise ValueError(f"{node} is not being switched back")
        self.reverting.discard(node)
        self.reverts[node] = REVERTED if ok else REVERT_FAILED
        if reason:
            self.reasons[node] = reason
        return self._advance()

    def _advance(self) -> list[Step]:
        if self.running or self.reverting:
            return []  # a batch ends when all its switches (or reverts) have
        if self.halted_by is None and self._next < len(self.nodes):
            size = 1 if self._next == 0 else self.batch
            batch = self.nodes[self._next : self._next + size]
            self._next += len(batch)
            self.running.update(batch)
            return [Switch(node) for node in batch]
        if self.halted_by is not None and self.revert and not self.reverts:
            back = [n for n in self.nodes if self.outcomes.get(n) == COMMITTED]
            if back:
                self.reverting.update(back)
                return [Revert(node) for node in back]
        return [Finished()]

    @property
    def switched(self) -> list[str]:
        """The nodes that committed the new configuration (and were not switched back)."""
        return [
            n
            for n in self.nodes
            if self.outcomes.get(n) == COMMITTED and self.reverts.get(n) != REVERTED
        ]

    def report(self) -> dict[str, object]:
        not_started = [n for n in self.nodes if n not in self.outcomes and n not in self.running]
        return {
            "outcome": "completed" if self.halted_by is None else "halted",
            "canary": self.canary,
            "halted_by": self.halted_by,
            "reason": None if self.halted_by is None else self.reasons.get(self.halted_by),
            "nodes": {
                n: {
                    "switch": self.outcomes.get(n),
                    "revert": self.reverts.get(n),
                    "reason": self.reasons.get(n),
                }
                for n in self.nodes
            },
            "switched": self.switched,
            "not_started": not_started,
            "reverted": [n for n in self.nodes if self.reverts.get(n) == REVERTED],
            "revert_failed": [n for n in self.nodes if self.reverts.get(n) == REVERT_FAILED],
        }
