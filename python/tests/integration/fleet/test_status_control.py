"""``keel fleet status`` and operators' commands across real mesh nodes in namespaces."""

from __future__ import annotations

import json
from typing import Any

from keel.api import call

from tests.integration.mesh.nodes import wait_until

from .conftest import FleetFactory
from .fleet_nodes import FleetHost, mesh_of


def started(hosts: list[FleetHost]) -> list[FleetHost]:
    for host in hosts:
        host.mesh.start()
    mesh_of(hosts)
    for host in hosts:
        host.start()
    return hosts


def status(host: FleetHost, *extra: str) -> tuple[int, dict[str, Any]]:
    done = host.cli("status", "--json", *extra)
    assert done.stderr == "", done.stderr
    return done.returncode, json.loads(done.stdout)


def rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["node"]: row for row in result["nodes"]}


def test_status_from_one_node_shows_every_node_and_never_a_silent_one_as_healthy(
    fleet_hosts: FleetFactory,
) -> None:
    hosts = fleet_hosts(
        "abcd", per_host={"a": {"watch_agents": ["web"]}, "b": {"watch_agents": ["db"]}}
    )
    a, b, c, d = started(hosts)

    def all_healthy() -> dict[str, Any] | None:
        done = c.cli("status", "--json")
        return json.loads(done.stdout) if done.returncode == 0 else None

    result = wait_until(all_healthy, timeout=60, what="every node healthy", step=0.5)
    by_node = rows(result)
    assert list(by_node) == [c.node_id, *sorted(h.node_id for h in (a, b, d))]
    web = by_node[a.node_id]["report"]["agents"]["web"]
    assert web["state"] == "healthy"
    assert web["restarts"] == 0
    assert by_node[b.node_id]["report"]["agents"]["db"]["state"] == "healthy"
    assert by_node[a.node_id]["report"]["host"] == "a"
    assert by_node[a.node_id]["report"]["services"]["watch"]["state"] == "up"
    assert by_node[d.node_id]["report"]["services"]["mesh"]["state"] == "up"
    assert {row["state"] for row in by_node.values()} == {"healthy"}

    # d goes down entirely (its mesh node too); b's fleet daemon alone dies
    d.kill()
    b.fleet.kill()
    code, result = status(c, "--timeout", "1.5")
    assert code == 1
    assert result["elapsed"] < 10  # the answer is bounded by the timeout, not by the dead
    by_node = rows(result)
    for dead in (b, d):
        row = by_node[dead.node_id]
        assert row["state"] == "unreachable", row
        assert row["stale"] is True
        assert row["report"]["host"] == dead.label  # its last report, marked stale
        assert row["last_seen"] < result["time"]
    assert by_node[a.node_id]["state"] == "healthy"
    plain = c.cli("status")
    assert plain.returncode == 1
    assert "UNREACHABLE" in plain.stdout
    assert "(stale)" in plain.stdout

    # b's fleet daemon back: b answers for itself again
    b.fleet.start()

    def b_answers() -> bool:
        done = c.cli("status", "--json")
        return bool(rows(json.loads(done.stdout))[b.node_id]["state"] == "healthy")

    wait_until(b_answers, timeout=30, what="b to answer again")


def test_operators_commands_are_carried_out_and_recorded_on_both_nodes(
    fleet_hosts: FleetFactory,
) -> None:
    hosts = fleet_hosts("abc", per_host={"b": {"watch_agents": ["web"]}})
    a, b, c = hosts
    for host in hosts:
        host.mesh.start()
    mesh_of(hosts)
    b.settings["operators"] = [a.node_id]
    b.write_config()
    for host in hosts:
        host.start()
    wait_until(
        lambda: b.call("fleet_status")["nodes"][0]["report"]["agents"]["web"]["state"] == "healthy",
        timeout=60,
        what="web healthy on b",
    )

    def web() -> dict[str, Any]:
        agents: dict[str, Any] = call(b.directory / "watch.sock", "status")["agents"]
        return dict(agents["web"])

    pid = web()["pid"]
    # an operator restarts the agent, naming the node by its host name
    done = a.cli("restart", "b", "web", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["node"] == b.node_id
    assert result["verb"] == "restart"
    wait_until(
        lambda: web()["state"] == "healthy" and web()["pid"] != pid,
        timeout=30,
        what="web to run again as a new process",
    )

    acted = [
        e for e in b.ledger_entries() if e["source"] == "fleet" and e["kind"].startswith("command")
    ]
    assert [(e["kind"], e["data"]["by"], e["data"].get("outcome")) for e in acted] == [
        ("command", a.node_id, None),
        ("command_result", a.node_id, "done"),
    ]
    asked = [
        e for e in a.ledger_entries() if e["source"] == "fleet" and e["kind"].startswith("command")
    ]
    assert [(e["kind"], e["subject"], e["data"].get("outcome")) for e in asked] == [
        ("command", f"web@{b.node_id}", None),
        ("command_result", f"web@{b.node_id}", "done"),
    ]

    # a node that is not an operator of b is refused, and both ledgers say so
    refused = c.cli("stop", b.node_id[:10], "web")
    assert refused.returncode == 1
    assert "is not an operator of node" in refused.stderr
    assert b.ledger_entries("command_refused")[-1]["data"]["by"] == c.node_id
    assert c.ledger_entries("command_result")[-1]["data"]["outcome"] == "refused"
    state = b.call("fleet_status")["nodes"][0]["report"]["agents"]["web"]["state"]
    assert state != "stopped"

    # bad requests are clear errors
    unknown = a.cli("restart", "nosuchnode", "web")
    assert unknown.returncode == 2
    assert "no member of the mesh" in unknown.stderr
    bad = a.cli("stop", "b", "bad name!")
    assert bad.returncode == 2
    assert "is not an agent name" in bad.stderr


def test_the_meshs_operator_nodes_may_command_unless_a_node_declines(
    fleet_hosts: FleetFactory,
) -> None:
    hosts = fleet_hosts("abc", per_host={"b": {"watch_agents": ["web"]}})
    a, b, c = hosts
    for host in hosts:
        host.mesh.start()
    mesh_of(hosts)  # a founded the mesh: its first operator node; b's config names nobody
    for host in hosts:
        host.start()
    wait_until(
        lambda: b.call("fleet_status")["nodes"][0]["report"]["agents"]["web"]["state"] == "healthy",
        timeout=60,
        what="web healthy on b",
    )
    done = a.cli("restart", "b", "web", "--json")
    assert done.returncode == 0, done.stderr
    refused = c.cli("restart", "b", "web")
    assert refused.returncode == 1
    assert "it is no operator node of the mesh" in refused.stderr
    # the founder grants c the role in the signed records: b takes c's commands from then on
    granted = a.mesh.cli("operator", "grant", c.node_id)
    assert granted.returncode == 0, granted.stderr
    wait_until(
        lambda: {p["id"]: p["operator"] for p in b.mesh.client.peers()}[c.node_id],
        timeout=15,
        what="b to learn that c is an operator node",
    )
    again = c.cli("restart", "b", "web")
    assert again.returncode == 0, again.stderr
    # a node that declines the mesh's operators takes its own config's only
    b.fleet.kill()
    b.settings["mesh_operators"] = False
    b.write_config()
    b.start()
    declined = a.cli("restart", "b", "web")
    assert declined.returncode == 1
    assert "mesh_operators is false" in declined.stderr
