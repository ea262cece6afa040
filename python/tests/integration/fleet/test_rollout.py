"""``keel fleet switch``: a rolling safe switch over real mesh nodes in namespaces.

Each switched node is a safeswitch lab (tests/integration/safeswitch/lab.py):
generations that record what they are asked to do and re-point the node's
running-system link, with a health check the gate reads; ``keel switch`` runs
for real, with its process timer. The operator node drives the rollout
through its fleet daemon; each node switches itself.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
from keel.watch.children import pidfd_supported

from tests.integration.mesh.nodes import wait_until
from tests.integration.safeswitch.lab import Lab

from .conftest import FleetFactory
from .fleet_nodes import FleetHost, mesh_of

pytestmark = pytest.mark.skipif(
    not pidfd_supported(), reason="safe switches run their activations as pidfd-watched children"
)


def fleet_with_labs(
    fleet_hosts: FleetFactory, bad: Collection[str] = ()
) -> tuple[FleetHost, list[FleetHost], dict[str, Lab]]:
    """An operator host and three hosts whose running system has specialisations good and bad."""
    hosts = fleet_hosts("oabc")
    operator, targets = hosts[0], hosts[1:]
    labs = {}
    for host in targets:
        lab = Lab(host.directory / "lab")
        base = lab.system("base")
        lab.system("good", "break" if host.label in bad else "ok", where=base / "specialisation")
        lab.system("bad", "break", where=base / "specialisation")
        lab.boot(base)
        lab.config()
        labs[host.label] = lab
    for host in hosts:
        host.mesh.start()
    mesh_of(hosts)
    for host in targets:
        lab = labs[host.label]
        host.settings.update(
            operators=[operator.node_id],
            safeswitch=str(lab.config_path),
            switch_runner="process",
            switch_poll=0.2,
            current_system=str(lab.current),
            profile=str(lab.profile),
        )
        host.write_config()
    for host in hosts:
        host.start()
    return operator, targets, labs


def rollout(operator: FleetHost, *args: str) -> tuple[int, dict[str, Any]]:
    done = operator.cli("switch", "--json", *args, timeout=300)
    assert done.stderr == "", done.stderr
    return done.returncode, json.loads(done.stdout)


def fleet_entries(host: FleetHost, kind: str) -> list[dict[str, Any]]:
    return [e for e in host.ledger_entries(kind) if e["source"] == "fleet"]


def test_a_bad_configuration_stops_at_the_canary_which_is_back_on_its_old_system(
    fleet_hosts: FleetFactory,
) -> None:
    operator, (a, b, c), labs = fleet_with_labs(fleet_hosts)
    before = {label: lab.running() for label, lab in labs.items()}
    code, report = rollout(operator, "--specialisation", "bad", "--nodes", "a,b,c", "--batch", "2")
    assert code == 1
    assert report["outcome"] == "halted"
    assert report["canary"] == a.node_id
    assert report["halted_by"] == a.node_id
    assert "health" in report["reason"]
    assert report["nodes"][a.node_id]["switch"] == "rolled-back"
    assert report["switched"] == []
    assert report["not_started"] == [b.node_id, c.node_id]
    # the canary is back on its old system, its profile untouched; the others never moved
    assert labs["a"].running() == before["a"]
    assert labs["a"].generations() == ["system-1-link"]
    assert labs["a"].calls() == ["test bad", "test base"]
    for label in ("b", "c"):
        assert labs[label].calls() == []
        assert labs[label].running() == before[label]
    # the asking node and the canary both recorded it
    assert [e["data"]["outcome"] for e in fleet_entries(operator, "rollout_node")] == [
        "rolled-back"
    ]
    assert fleet_entries(operator, "rollout_result")[-1]["data"]["halted_by"] == a.node_id
    wait_until(lambda: fleet_entries(a, "switch_result"), timeout=30, what="a's switch_result")
    (started,) = fleet_entries(a, "switch")
    assert started["data"]["by"] == operator.node_id
    assert fleet_entries(a, "switch_result")[0]["data"]["outcome"] == "rolled-back"
    # a's status tells the last switch and how it ended
    row = next(r for r in operator.call("fleet_status")["nodes"] if r["node"] == a.node_id)
    assert row["report"]["switch"]["outcome"] == "rolled-back"
    # and the report stays for `keel fleet rollout`
    shown = operator.cli("rollout")
    assert shown.returncode == 0
    assert "halted by" in shown.stdout


def test_a_good_configuration_rolls_out_canary_first_then_in_batches(
    fleet_hosts: FleetFactory,
) -> None:
    operator, (a, b, c), labs = fleet_with_labs(fleet_hosts)
    code, report = rollout(operator, "--specialisation", "good", "--nodes", "a,b,c", "--batch", "2")
    assert code == 0, report
    assert report["outcome"] == "completed"
    assert report["switched"] == [a.node_id, b.node_id, c.node_id]
    for label, lab in labs.items():
        assert lab.running().endswith("/specialisation/good"), label
        assert lab.generations() == ["system-1-link", "system-2-link"]
    # the canary finished before the batch began
    switched_at = [(e["data"]["node"], e["ts"]) for e in fleet_entries(operator, "rollout_node")]
    assert switched_at[0][0] == a.node_id
    assert {node for node, _ in switched_at[1:]} == {b.node_id, c.node_id}
    starts = {e["subject"]: e["ts"] for h in (b, c) for e in fleet_entries(h, "switch")}
    assert all(ts > switched_at[0][1] for ts in starts.values())


def test_a_failure_in_a_batch_halts_and_the_switched_nodes_go_back_when_asked(
    fleet_hosts: FleetFactory,
) -> None:
    operator, (a, b, c), labs = fleet_with_labs(fleet_hosts, bad={"b"})
    before = {label: lab.running() for label, lab in labs.items()}
    code, report = rollout(
        operator, "--specialisation", "good", "--nodes", "a,b,c", "--batch", "2", "--rollback"
    )
    assert code == 1
    assert report["halted_by"] == b.node_id
    assert report["nodes"][b.node_id]["switch"] == "rolled-back"
    assert report["nodes"][a.node_id]["switch"] == "committed"
    assert report["nodes"][c.node_id]["switch"] == "committed"  # it ran in b's batch
    assert sorted(report["reverted"]) == sorted([a.node_id, c.node_id])
    assert report["switched"] == []
    for label, lab in labs.items():
        assert lab.running() == before[label], label
    reverts = [e for e in fleet_entries(a, "switch") if e["data"].get("revert")]
    assert reverts
    assert reverts[0]["data"]["to"] == before["a"]


def test_only_operators_may_switch_a_node(fleet_hosts: FleetFactory) -> None:
    operator, (a, b, _c), labs = fleet_with_labs(fleet_hosts)
    # b is no operator of a: a refuses, the rollout halts at once, nothing changed
    code, report = rollout(b, "--specialisation", "good", "--nodes", "a,c")
    assert code == 1
    assert report["nodes"][a.node_id]["switch"] == "refused"
    assert "is not an operator of node" in report["reason"]
    assert labs["a"].calls() == []
    assert fleet_entries(a, "command_refused")[-1]["data"]["by"] == b.node_id
    # bad requests are one clear line each
    for args, message in (
        (("--specialisation", "good", "--nodes", "o"), "cannot switch itself"),
        (("--specialisation", "../x", "--nodes", "a"), "is not a specialisation name"),
        (("--system", "relative/path", "--nodes", "a"), "absolute path"),
        (("--flake", "#web1", "--nodes", "a"), "expected REF#HOST"),
        (("--specialisation", "good", "--nodes", "a,a"), "named twice"),
    ):
        done = operator.cli("switch", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") == 1
    assert Path(labs["a"].root / "calls").exists() is False
