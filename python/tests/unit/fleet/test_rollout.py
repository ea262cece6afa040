"""The rolling switch's state machine: canary, batches, halt, revert."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from keel.fleet.rollout import (
    COMMITTED,
    LOST,
    NEEDS_OPERATOR,
    OUTCOMES,
    REFUSED,
    ROLLED_BACK,
    Finished,
    Revert,
    Rollout,
    Step,
    Switch,
)

NODES = ["n1", "n2", "n3", "n4", "n5", "n6"]


def test_canary_alone_then_batches_in_order() -> None:
    rollout = Rollout(NODES, batch=2)
    assert rollout.start() == [Switch("n1")]
    assert rollout.finished("n1", COMMITTED) == [Switch("n2"), Switch("n3")]
    assert rollout.finished("n3", COMMITTED) == []  # n2 still runs
    assert rollout.finished("n2", COMMITTED) == [Switch("n4"), Switch("n5")]
    rollout.finished("n4", COMMITTED)
    assert rollout.finished("n5", COMMITTED) == [Switch("n6")]
    assert rollout.finished("n6", COMMITTED) == [Finished()]
    report = rollout.report()
    assert report["outcome"] == "completed"
    assert report["switched"] == NODES
    assert report["not_started"] == []


@pytest.mark.parametrize("failure", [ROLLED_BACK, REFUSED, NEEDS_OPERATOR, LOST])
def test_a_failed_canary_stops_everything(failure: str) -> None:
    rollout = Rollout(NODES, batch=3, revert=True)
    rollout.start()
    assert rollout.finished("n1", failure, "check web failed") == [Finished()]
    report = rollout.report()
    assert report["outcome"] == "halted"
    assert report["halted_by"] == "n1"
    assert report["reason"] == "check web failed"
    assert report["switched"] == []
    assert report["not_started"] == NODES[1:]


def test_a_failure_in_a_batch_waits_for_the_batch_then_halts() -> None:
    rollout = Rollout(NODES, batch=3)
    rollout.start()
    rollout.finished("n1", COMMITTED)
    assert rollout.finished("n2", ROLLED_BACK, "agent db backoff") == []  # n3, n4 still run
    assert rollout.finished("n3", COMMITTED) == []
    assert rollout.finished("n4", COMMITTED) == [Finished()]  # no revert asked
    report = rollout.report()
    assert report["halted_by"] == "n2"
    assert report["switched"] == ["n1", "n3", "n4"]  # reported: these run the new configuration
    assert report["not_started"] == ["n5", "n6"]
    assert report["reverted"] == []


def test_halted_with_revert_switches_every_committed_node_back() -> None:
    rollout = Rollout(NODES, batch=2, revert=True)
    rollout.start()
    rollout.finished("n1", COMMITTED)
    rollout.finished("n2", COMMITTED)
    steps = rollout.finished("n3", LOST, "no outcome within 600 s")
    assert steps == [Revert("n1"), Revert("n2")]
    assert rollout.reverted("n1", True) == []
    assert rollout.reverted("n2", False, "rollback exited 3") == [Finished()]
    report = rollout.report()
    assert report["reverted"] == ["n1"]
    assert report["revert_failed"] == ["n2"]
    assert report["switched"] == ["n2"]  # still on the new configuration
    assert report["nodes"]["n2"] == {  # type: ignore[index]
        "switch": COMMITTED,
        "revert": "revert-failed",
        "reason": "rollback exited 3",
    }


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one node"):
        Rollout([])
    with pytest.raises(ValueError, match="twice"):
        Rollout(["a", "a"])
    with pytest.raises(ValueError, match="batch"):
        Rollout(["a"], batch=0)
    rollout = Rollout(["a", "b"])
    rollout.start()
    with pytest.raises(ValueError, match="no switch running"):
        rollout.finished("b", COMMITTED)
    with pytest.raises(ValueError, match="unknown outcome"):
        rollout.finished("a", "great")
    with pytest.raises(ValueError, match="not being switched back"):
        rollout.reverted("a", True)


@given(
    st.integers(1, 8),
    st.integers(1, 4),
    st.booleans(),
    st.lists(st.sampled_from(OUTCOMES), min_size=8, max_size=8),
    st.randoms(use_true_random=False),
)
def test_any_run_ends_and_never_starts_a_node_after_a_failure(
    count: int, batch: int, revert: bool, outcomes: list[str], rng: object
) -> None:
    import random

    assert isinstance(rng, random.Random)
    nodes = [f"n{i}" for i in range(count)]
    rollout = Rollout(nodes, batch=batch, revert=revert)
    failed = False

    def emitted(steps: list[Step]) -> list[Step]:
        if failed:
            assert not any(isinstance(s, Switch) for s in steps), "a node started after a failure"
        return steps

    pending = emitted(rollout.start())
    started: list[str] = []
    finished = False
    while pending:
        rng.shuffle(pending)
        step = pending.pop()
        if isinstance(step, Finished):
            finished = True
            continue
        if isinstance(step, Switch):
            started.append(step.node)
            outcome = outcomes[int(step.node[1:])]
            failed = failed or outcome != COMMITTED
            pending += emitted(rollout.finished(step.node, outcome))
        else:
            pending += emitted(rollout.reverted(step.node, True))
    assert finished
    assert started[0] == "n0"
    report = rollout.report()
    assert sorted(started) == sorted(n for n in nodes if n not in report["not_started"])  # type: ignore[operator]
    if revert and report["halted_by"] is not None:
        assert report["switched"] == []
