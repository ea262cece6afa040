"""Audit mode, `keel egress status|suggest|check`, the ledger's aggregation, and bad configs."""

from __future__ import annotations

import json
from typing import Any

from .world import AGENT_UID, SECOND_AGENT_UID, World, wait_until


def test_audit_mode_allows_everything_and_records_what_enforce_would_block(world: World) -> None:
    world.start_internet()
    world.configure(
        {
            "scout": {
                "uid": AGENT_UID,
                "port": 5301,
                "mode": "audit",
                "allow": ["www.allowed.test"],
            },
            "strict": {"uid": SECOND_AGENT_UID, "port": 5302, "allow": ["www.allowed.test"]},
        }
    )
    world.start_daemon()
    scout = world.agent(AGENT_UID)
    for name in ("www.other.test", "a.wild.test", "a.b.wild.test", "dual.allowed.test"):
        answer = scout.resolve(name, server=world.dns_v4)
        assert answer["rcode"] == "NOERROR", (name, answer)
        assert answer["addresses"], (name, answer)
    assert scout.resolve("www.allowed.test", server=world.dns_v4)["addresses"] == ["192.0.2.10"]
    # Allowed names still fill the sets; the others do not, and their traffic is logged.
    assert set(world.elements("scout_v4")) == {"192.0.2.10"}
    assert scout.connect("192.0.2.14", 80)["ok"] is True
    assert scout.connect("192.0.2.10", 80)["ok"] is True
    wait_until(
        lambda: any(r["what"] == "blocked" for r in world.status()["agents"]["scout"]["recent"]),
        timeout=10,
        what="the would-be drop to be reported",
    )
    # The agent in enforce mode beside it is not affected by the audit.
    strict = world.agent(SECOND_AGENT_UID)
    assert strict.resolve("www.other.test", server=world.dns_v4)["rcode"] == "NXDOMAIN"

    status = json.loads(
        world.keel("egress", "status", "--socket", str(world.socket), "--json").stdout
    )
    assert status["agents"]["scout"]["mode"] == "audit"
    assert status["agents"]["scout"]["sets"] == {"v4": 1, "v6": 0}
    assert status["agents"]["scout"]["blocked"]["packets"] >= 1
    table = world.keel("egress", "status", "--socket", str(world.socket), check=True).stdout
    assert table.splitlines()[0].split()[:4] == ["AGENT", "MODE", "UID", "PORT"]
    assert "audit" in table
    assert "enforce" in table

    suggested = world.keel("egress", "suggest", "scout", "--socket", str(world.socket), check=True)
    lines = [line for line in suggested.stdout.splitlines() if not line.startswith("#")]
    names = [line.split()[0] for line in lines]
    assert names[0] == "www.allowed.test"  # the current entries come first
    assert sorted(names[1:]) == [
        "a.b.wild.test",
        "a.wild.test",
        "dual.allowed.test",
        "www.other.test",
    ]
    collapsed = json.loads(
        world.keel(
            "egress", "suggest", "scout", "--collapse", "2", "--json", "--socket", str(world.socket)
        ).stdout
    )
    assert collapsed["current"] == ["www.allowed.test"]
    assert "*.wild.test" not in collapsed["add"]  # a.wild.test and a.b.wild.test: other parents
    assert "192.0.2.14" in collapsed["addresses"]

    world.stop_daemon()
    entries = world.ledger_entries()
    denied = [e for e in entries if e["kind"] == "egress.denied" and e["subject"] == "scout"]
    assert {e["data"]["name"] for e in denied} == {
        "www.other.test",
        "a.wild.test",
        "a.b.wild.test",
        "dual.allowed.test",
    }
    assert all(e["data"]["mode"] == "audit" for e in denied)
    blocked = [e["data"] for e in entries if e["kind"] == "egress.blocked"]
    assert {
        "protocol": "tcp",
        "address": "192.0.2.14",
        "port": 80,
        "mode": "audit",
        "count": 1,
    } in blocked


def test_a_flood_of_denials_gives_a_bounded_ledger(world: World) -> None:
    world.start_internet()
    world.configure({"scout": {"uid": AGENT_UID, "port": 5301, "allow": []}})
    world.start_daemon()
    agent = world.agent()
    for _ in range(300):
        assert agent.resolve("www.other.test", server=world.dns_v4)["rcode"] == "NXDOMAIN"
    for i in range(120):
        agent.resolve(f"n{i}.other.test", server=world.dns_v4)
    assert world.stop_daemon() == 0
    entries = [e for e in world.ledger_entries() if e["subject"] == "scout"]
    repeated = [e for e in entries if e["data"].get("name") == "www.other.test"]
    # The first denial at once, the 299 repeats as one count when the window closed.
    assert [e["data"]["count"] for e in repeated] == [1, 299]
    suppressed = [e for e in entries if e["kind"] == "egress.suppressed"]
    assert len(suppressed) == 1
    assert suppressed[0]["data"]["count"] == 121 - 50
    assert len(entries) <= 2 * 50 + 1


def check(world: World, *args: str) -> tuple[int, str, str]:
    result = world.keel("egress", "check", "--config", str(world.config_path), *args)
    return result.returncode, result.stdout.strip(), result.stderr.strip()


def test_check_uses_the_same_decision(world: World) -> None:
    world.configure(
        {"scout": {"uid": AGENT_UID, "port": 5301, "allow": ["example.com", "*.bücher.example"]}}
    )
    assert check(world, "scout", "example.com") == (0, "allow", "")
    assert check(world, "scout", "EXAMPLE.com.") == (0, "allow", "")
    assert check(world, "scout", "a.example.com")[:2] == (1, "deny")
    assert check(world, "scout", "a.xn--bcher-kva.example")[:2] == (0, "allow")
    assert check(world, "scout", "b.a.Bücher.example")[:2] == (0, "allow")
    assert check(world, "scout", "bücher.example")[:2] == (1, "deny")
    code, _out, err = check(world, "nobody", "example.com")
    assert code == 2
    assert "no agent 'nobody'" in err
    code, out, _err = check(world, "scout", "example.com", "--json")
    assert code == 0
    assert json.loads(out)["decision"] == "allow"


def serve_fails(world: World, config: dict[str, Any]) -> str:
    world.config_path.write_text(json.dumps(config))
    result = world.keel("egress", "serve", "--config", str(world.config_path))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_configs_stop_the_start_naming_the_key(world: World) -> None:
    base: dict[str, Any] = {"socket": str(world.socket), "ledger": None, "upstream": ["192.0.2.53"]}

    def agents(**agent: Any) -> dict[str, Any]:
        return {**base, "agents": {"scout": {"uid": AGENT_UID, "port": 5301, **agent}}}

    assert "agents.scout.allow[1]: '*.com'" in serve_fails(
        world, agents(allow=["ok.test", "*.com"])
    )
    assert "agents.scout.mode: expected one of" in serve_fails(world, agents(mode="log"))
    assert "agents.scout.colour: unknown key" in serve_fails(world, agents(colour="red"))
    assert "upstream[0]: 'dns.google'" in serve_fails(world, {**base, "upstream": ["dns.google"]})
    assert "min_ttl: must be at least 0" in serve_fails(world, {**base, "min_ttl": -1})
    assert "on_stop: expected one of" in serve_fails(world, {**base, "on_stop": "flush"})
    assert "agents.scout.port: 53" in serve_fails(world, agents(port=53))
    assert "agents.scout.uid: give exactly one" in serve_fails(
        world, {**base, "agents": {"scout": {"port": 5301}}}
    )
    two = {
        **base,
        "agents": {
            "a": {"uid": AGENT_UID, "port": 5301},
            "b": {"uid": AGENT_UID, "port": 5302},
        },
    }
    assert "agents.b.uid: 64001 is also 'a'" in serve_fails(world, two)
    # Nothing was installed by any of them.
    assert world.nft_json("table", "inet", "keel") == []


def test_an_unknown_user_stops_the_start(world: World) -> None:
    world.configure({"scout": {"user": "keel-agent-nosuchuser", "port": 5301}})
    result = world.keel("egress", "serve", "--config", str(world.config_path))
    assert result.returncode == 1
    assert "agents.scout.user: no such user 'keel-agent-nosuchuser'" in result.stderr
    assert "Traceback" not in result.stderr
