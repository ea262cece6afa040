"""The fleet audit with real mesh nodes in network namespaces.

Every node witnesses the others' ledgers over the mesh; a node whose ledger is
rewritten after a peer witnessed it is named by ``keel fleet audit``, and a
partition that heals leaves no false alarm behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from keel.ledger import core
from keel.ledger.keys import default_key_path, load_signer
from keel.ledger.store import Ledger, head_path

from tests.harness.netns import Network
from tests.integration.mesh.nodes import wait_until

from .conftest import FleetFactory
from .fleet_nodes import FleetHost, mesh_of, wait_witnessed


def started(fleet_hosts: FleetFactory, labels: str) -> list[FleetHost]:
    hosts = fleet_hosts(labels)
    for host in hosts:
        host.mesh.start()
    mesh_of(hosts)
    for host in hosts:
        host.start()
    for host in hosts:
        wait_witnessed(host, [h for h in hosts if h is not host])
    return hosts


def audit(host: FleetHost) -> tuple[int, dict[str, object]]:
    done = host.cli("audit", "--json", "--timeout", "5")
    assert done.stderr == "", done.stderr
    return done.returncode, json.loads(done.stdout)


def verdicts(result: dict[str, object]) -> dict[str, str]:
    nodes = result["nodes"]
    assert isinstance(nodes, list)
    return {n["node"]: n["verdict"] for n in nodes}


def rewrite(path: Path, keep: int, extra: int) -> None:
    """What a root on the host could do: a new ledger, the first ``keep`` entries kept,
    ``extra`` forged ones after them, every hash recomputed and a checkpoint signed with
    the host's own key, swapped in for the real one.
    """
    with Ledger.open(path, create=False) as ledger:
        raws = [entry.canonical() for _, entry in ledger.entries(0, keep)]
    forged = path.with_name("forged.db")
    with Ledger.open(forged) as ledger:
        ledger.append_raw(raws)
        for i in range(extra):
            ledger.append(source="watch", kind="restart", subject=f"nothing-{i}", data={})
        ledger.checkpoint(load_signer(default_key_path(path)))
    for suffix in ("", "-wal", "-shm", ".head"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.move(forged, path)
    shutil.move(head_path(forged), head_path(path))  # the head file too: nothing is left to compare


def test_a_rewritten_ledger_is_named_by_the_audit_and_raises_alarms(
    fleet_hosts: FleetFactory,
) -> None:
    a, b, c = started(fleet_hosts, "abc")
    code, result = audit(a)
    assert code == 0, result
    assert set(verdicts(result).values()) == {"consistent"}

    # c's ledger grows and both witnesses cosign it beyond the entries the rewrite keeps
    # (a witness that held only c's first entries could prove nothing)
    with Ledger.open(c.ledger, create=False) as ledger:
        for i in range(10):
            ledger.append(source="watch", kind="restart", subject=f"agent-{i}", data={})
    for witness in (a, b):
        wait_witnessed(witness, [c], above={c.node_id: 10})
    # c's ledger is rewritten under its daemons (the witnessed entries are changed)
    witnessed = b.witnessed()[c.node_id]["size"]
    c.kill()
    rewrite(c.ledger, keep=2, extra=witnessed + 20)
    c.mesh.start()
    c.start()
    c.mesh.wait_connected(a.mesh, b.mesh)

    code, result = audit(a)
    assert code == 1, result
    assert result["problems"] == [c.node_id]
    assert verdicts(result)[c.node_id] == "forked"
    assert verdicts(result)[a.node_id] == "consistent"
    assert verdicts(result)[b.node_id] == "consistent"
    # the finding names the witnesses and carries the notes c signed
    finding = next(n for n in result["nodes"] if n["node"] == c.node_id)["findings"][0]  # type: ignore[attr-defined]
    assert finding["holder"] in (a.node_id, b.node_id, c.node_id)
    assert len(finding["evidence"]) == 2

    # the witnesses raise alarms of their own on their next rounds, and keep them
    for witness in (a, b):
        alarms = wait_until(witness.alarms, timeout=30, what=f"{witness.label}'s alarm")
        assert [(x["node"], x["kind"]) for x in alarms] == [(c.node_id, "forked")]
        # the alarm is answered before the recorder writes its entry: wait for that
        entries = wait_until(
            lambda w=witness: w.ledger_entries("witness_alarm"),  # type: ignore[misc]
            timeout=30,
            what=f"{witness.label}'s witness_alarm entry",
        )
        assert entries[0]["subject"] == c.node_id
    # both audits are in the auditor's ledger (its recorder writes them in the background:
    # the CLI's answer comes first)
    audits = wait_until(
        lambda: (found := a.ledger_entries("audit"))[1:] and found,
        timeout=30,
        what="a's second audit entry",
    )
    assert [x["data"]["problems"] for x in audits] == [{}, {c.node_id: "forked"}]
    # a human reads it too
    plain = a.cli("audit", "--timeout", "5")
    assert plain.returncode == 1
    assert f"{c.node_id}: forked" in plain.stdout


def test_a_truncated_ledger_went_back(fleet_hosts: FleetFactory) -> None:
    a, b, c = started(fleet_hosts, "abc")
    with Ledger.open(c.ledger, create=False) as ledger:
        for i in range(100):
            ledger.append(source="watch", kind="restart", subject=f"agent-{i}", data={})
    wait_witnessed(b, [c], above={c.node_id: 100})
    c.kill()
    rewrite(c.ledger, keep=1, extra=0)
    c.mesh.start()
    c.start()
    c.mesh.wait_connected(a.mesh, b.mesh)
    code, result = audit(b)
    assert code == 1
    node = next(n for n in result["nodes"] if n["node"] == c.node_id)  # type: ignore[attr-defined]
    assert node["current"]["size"] < 100
    kinds = {f["kind"] for f in node["findings"]}
    # Smaller than what the witnesses hold: went back. If a witness also holds an old
    # checkpoint of exactly the regrown size (signed before the 100 entries), the two
    # roots differ and the fork is provable too, and named first (the worse verdict).
    assert "went-back" in kinds, node
    assert kinds <= {"went-back", "forked"}, node
    assert node["verdict"] == ("forked" if "forked" in kinds else "went-back")


def test_a_partition_heals_without_false_alarms(
    network: Network, fleet_hosts: FleetFactory
) -> None:
    a, b, c = started(fleet_hosts, "abc")
    before = {h.node_id: s["size"] for h, s in ((a, b.witnessed()[a.node_id]),)}
    network.partition(a.host, [b.host, c.host])
    # a's ledger grows while nobody can witness it
    with Ledger.open(a.ledger, create=False) as ledger:
        for i in range(50):
            ledger.append(source="watch", kind="restart", subject=f"during-{i}", data={})
    wait_until(
        lambda: not any(p["connected"] for p in b.mesh.client.peers() if p["id"] == a.node_id),
        timeout=30,
        what="b to notice the partition",
    )
    code, result = audit(b)
    assert code == 3, result  # incomplete, nothing wrong
    assert verdicts(result)[a.node_id] == "unreachable"
    assert result["problems"] == []

    network.heal()
    wait_witnessed(b, [a], above=before)
    wait_witnessed(c, [a], above=before)
    code, result = audit(b)
    assert code == 0, result
    assert set(verdicts(result).values()) == {"consistent"}
    for host in (a, b, c):
        assert host.alarms() == []
        assert host.ledger_entries("witness_alarm") == []


def test_each_node_keeps_the_cosignatures_of_its_checkpoints(fleet_hosts: FleetFactory) -> None:
    a, _b, _c = started(fleet_hosts, "abc")
    wait_until(
        lambda: len(a.call("witness")["cosigned_by"]) == 2, timeout=30, what="two cosignatures"
    )
    done = a.cli("checkpoint")
    assert done.returncode == 0, done.stderr
    note = done.stdout
    text, signatures = core.split_note(note)
    assert len(signatures) == 3  # a's own and one per witness
    checkpoint = core.Checkpoint.parse(text)
    # the ledger extends it: `keel ledger verify --checkpoint` takes the cosigned note as it is
    saved = a.directory / "cosigned.note"
    saved.write_text(note)
    verify = subprocess.run(
        [sys.executable, "-m", "keel", "ledger", "verify", "--db", str(a.ledger),
         "--checkpoint", str(saved)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert checkpoint.size > 0
