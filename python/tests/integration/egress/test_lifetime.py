"""How long an address stays open, and what survives the daemon: expiry, refresh, kill, restart."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from keel.errors import ApiError

from .test_enforce import assert_blocked
from .world import AGENT_UID, World, wait_until

ALLOW = [
    "www.allowed.test",
    "dual.allowed.test",
    "short.allowed.test",
    "cached.allowed.test",
]


def start(world: World, *, allow: list[str] | None = None, **settings: Any) -> None:
    world.start_internet(short=1, cached=6)
    world.configure(
        {"scout": {"uid": AGENT_UID, "port": 5301, "allow": allow or ALLOW}}, **settings
    )
    world.start_daemon()


def test_after_expiry_new_connections_are_blocked_while_established_ones_continue(
    world: World,
) -> None:
    start(world, min_ttl=0, grace=1)
    agent = world.agent()
    assert agent.resolve("short.allowed.test", server=world.dns_v4)["addresses"] == ["192.0.2.12"]
    assert agent.do("open", id="kept", address="192.0.2.12", port=9000)["ok"] is True
    assert agent.do("talk", id="kept")["reply"] == "192.0.2.12 9000 still there"
    # TTL 1 s, min_ttl 0, grace 1 s: the element lives 2 s.
    wait_until(
        lambda: "192.0.2.12" not in world.elements("scout_v4"),
        timeout=30,
        what="the address to expire from the set",
    )
    assert_blocked(agent, "192.0.2.12", 9000)
    assert agent.do("talk", id="kept") == {"ok": True, "reply": "192.0.2.12 9000 still there"}


def test_an_answer_from_the_cache_refreshes_the_timeout(world: World) -> None:
    # TTL 6 s, min_ttl 6 s, grace 1 s: the first answer opens the address for 7 s.
    start(world, min_ttl=6, grace=1)
    agent = world.agent()
    first = time.monotonic()
    assert agent.resolve("cached.allowed.test", server=world.dns_v4)["addresses"] == ["192.0.2.19"]
    assert world.queries("cached.allowed.test") == 1
    wait_until(
        lambda: world.elements("scout_v4").get("192.0.2.19", 99) <= 3,
        timeout=30,
        what="the element to come close to its expiry",
    )
    before = world.elements("scout_v4")["192.0.2.19"]
    again = agent.resolve("cached.allowed.test", server=world.dns_v4)
    assert again["addresses"] == ["192.0.2.19"]
    assert again["ttls"][0] < 6  # what was left of the cached TTL
    assert world.queries("cached.allowed.test") == 1  # served from keel's cache
    after = world.elements("scout_v4")["192.0.2.19"]
    assert after >= before + 2  # max(remaining TTL, min_ttl 6) + grace 1 from now
    # Past the first answer's expiry the address is still open.
    wait_until(lambda: time.monotonic() > first + 8, timeout=30, what="the first expiry to pass")
    assert agent.connect("192.0.2.19", 80)["ok"] is True


def test_sigkill_under_load_keeps_resolved_names_and_opens_nothing(world: World) -> None:
    start(world)
    agent = world.agent()
    for name, rdtype in (
        ("www.allowed.test", "A"),
        ("dual.allowed.test", "A"),
        ("dual.allowed.test", "AAAA"),
    ):
        assert agent.resolve(name, rdtype, server=world.dns_v4)["rcode"] == "NOERROR"
    good = [["192.0.2.10", 80], ["192.0.2.11", 80], ["2001:db8::11", 80]]
    bad = [["192.0.2.14", 80], ["2001:db8::14", 80], ["192.0.2.13", 9000]]
    agent.do("load_start", good=good, bad=bad)

    def good_ok() -> int:
        count: int = agent.do("load_count")["good_ok"]
        return count

    wait_until(lambda: good_ok() >= 30, timeout=60, what="the load to run")
    world.kill_daemon()
    # The proxy is dead: nothing new resolves, the rules and sets stay.
    dead = agent.resolve("www.allowed.test", server=world.dns_v4)
    assert "error" in dead or dead["rcode"] != "NOERROR"
    assert set(world.elements("scout_v4")) == {"192.0.2.10", "192.0.2.11"}
    mark = good_ok()
    wait_until(
        lambda: good_ok() >= mark + 30, timeout=60, what="the load to go on without the daemon"
    )
    restarted = time.monotonic()
    world.start_daemon(wait=False)
    wait_until(
        lambda: (
            agent.resolve("www.allowed.test", server=world.dns_v4, tcp=False).get("rcode")
            == "NOERROR"
        ),
        timeout=30,
        what="the restarted proxy to answer",
    )
    print(f"restarted proxy answered after {time.monotonic() - restarted:.2f} s")
    mark = good_ok()
    wait_until(
        lambda: good_ok() >= mark + 30, timeout=60, what="the load to go on after the restart"
    )
    counts = agent.do("load_stop")
    assert counts["good_failed"] == 0, counts["failures"]
    assert counts["bad_ok"] == 0, counts["failures"]
    assert counts["bad_failed"] > 0


def test_a_restart_keeps_the_sets_and_drops_what_the_new_allowlist_does_not_cover(
    world: World,
) -> None:
    start(world)
    agent = world.agent()
    agent.resolve("www.allowed.test", server=world.dns_v4)
    agent.resolve("dual.allowed.test", server=world.dns_v4)
    agent.resolve("dual.allowed.test", "AAAA", server=world.dns_v4)
    kept_before = world.elements("scout_v4")["192.0.2.10"]
    assert world.stop_daemon() == 0
    # on_stop "keep": the rules and the sets outlive the daemon.
    assert set(world.elements("scout_v4")) == {"192.0.2.10", "192.0.2.11"}
    assert agent.connect("192.0.2.11", 80)["ok"] is True

    world.configure({"scout": {"uid": AGENT_UID, "port": 5301, "allow": ["www.allowed.test"]}})
    world.start_daemon()
    # The rules are replaced at once; what is no longer allowed goes right after.
    wait_until(
        lambda: set(world.elements("scout_v4")) == {"192.0.2.10"},
        timeout=30,
        what="dual.allowed.test's address to go",
    )
    assert world.elements("scout_v6") == {}
    assert world.elements("scout_v4")["192.0.2.10"] <= kept_before  # kept, not re-inserted
    assert agent.connect("192.0.2.10", 80)["ok"] is True
    assert_blocked(agent, "192.0.2.11", 80)
    sets = json.loads(
        world.keel("egress", "sets", "scout", "--socket", str(world.socket), "--json").stdout
    )
    assert [(e["address"], e["name"]) for e in sets["elements"]] == [
        ("192.0.2.10", "www.allowed.test")
    ]
    world.stop_daemon()
    rules = [e for e in world.ledger_entries() if e["kind"] == "egress.rules"]
    subjects = [e["subject"] for e in rules]
    assert subjects == ["applied", "adopted", "kept", "applied", "adopted", "kept"]
    assert rules[4]["data"] == {"kept_addresses": 1, "removed_addresses": 2}


def test_on_stop_remove_takes_the_table_away(world: World) -> None:
    start(world, on_stop="remove")
    assert world.nft_json("table", "inet", "keel")
    assert world.stop_daemon() == 0
    assert world.nft_json("table", "inet", "keel") == []
    agent = world.agent()
    assert agent.connect("192.0.2.14", 80)["ok"] is True


def test_a_removed_table_is_put_back(world: World) -> None:
    start(world, table_check=0.5)
    agent = world.agent()
    agent.resolve("www.allowed.test", server=world.dns_v4)
    world.host.run("nft", "delete", "table", "inet", "keel")
    wait_until(
        lambda: world.nft_json("chain", "inet", "keel", "agent_scout"),
        timeout=30,
        what="keel to restore its table",
    )
    assert_blocked(agent, "192.0.2.14", 80)
    world.stop_daemon()
    assert "restored" in [
        e["subject"] for e in world.ledger_entries() if e["kind"] == "egress.rules"
    ]


def test_other_tables_are_never_touched(world: World) -> None:
    world.host.nft(
        "table inet mine {\n  set keep { type ipv4_addr; elements = { 192.0.2.99 } }\n}\n"
    )
    before = world.host.run("nft", "list", "table", "inet", "mine").stdout
    start(world, on_stop="remove")
    world.stop_daemon()
    assert world.host.run("nft", "list", "table", "inet", "mine").stdout == before


def sets_of(world: World) -> list[tuple[str, list[str]]]:
    listed = json.loads(
        world.keel("egress", "sets", "scout", "--socket", str(world.socket), "--json").stdout
    )
    return [(e["address"], e["names"]) for e in listed["elements"]]


def test_an_address_two_names_share_stays_while_either_name_is_allowed(world: World) -> None:
    # www.allowed.test and twin.allowed.test are both 192.0.2.10.
    start(world, allow=["www.allowed.test", "twin.allowed.test"])
    agent = world.agent()
    assert agent.resolve("www.allowed.test", server=world.dns_v4)["addresses"] == ["192.0.2.10"]
    assert agent.resolve("twin.allowed.test", server=world.dns_v4)["addresses"] == ["192.0.2.10"]
    assert sets_of(world) == [("192.0.2.10", ["www.allowed.test", "twin.allowed.test"])]
    # Each name in turn leaves the allowlist; the other keeps the address open.
    for allow in (["twin.allowed.test"], ["www.allowed.test"]):
        assert world.stop_daemon() == 0
        world.configure({"scout": {"uid": AGENT_UID, "port": 5301, "allow": allow}})
        world.start_daemon()
        wait_until(lambda: world.status()["sets_adopted"], timeout=30, what="the sets to be read")
        assert set(world.elements("scout_v4")) == {"192.0.2.10"}
        assert agent.connect("192.0.2.10", 80)["ok"] is True
    # Neither allowed: it goes.
    assert world.stop_daemon() == 0
    world.configure({"scout": {"uid": AGENT_UID, "port": 5301, "allow": ["dual.allowed.test"]}})
    world.start_daemon()
    assert world.elements("scout_v4") == {}
    assert_blocked(agent, "192.0.2.10", 80)


FILL = """
import ipaddress, sys
from keel.egress.netlink import SetWriter
from keel.egress.sets import Insert
writer = SetWriter()
base = ipaddress.ip_address("10.123.0.0")
inserts = [Insert(base + n, 600, ("dual.allowed.test",), False) for n in range(int(sys.argv[1]))]
for at in range(0, len(inserts), 250):
    writer.write("scout", inserts[at : at + 250])
"""


def test_a_restart_opens_nothing_the_new_allowlist_drops_not_even_for_a_moment(
    world: World,
) -> None:
    start(world)
    agent = world.agent()
    assert agent.resolve("www.allowed.test", server=world.dns_v4)["rcode"] == "NOERROR"
    assert agent.resolve("dual.allowed.test", server=world.dns_v4)["rcode"] == "NOERROR"
    assert world.stop_daemon() == 0
    # Thousands more addresses of the name about to be dropped: a cleanup made
    # after the new rules, rather than with them, would leave a window to see.
    world.host.run(sys.executable, "-c", FILL, "5000", timeout=120)

    def rule_handles(listing: list[dict[str, Any]]) -> list[int]:
        return [
            item["rule"]["handle"]
            for item in listing
            if "rule" in item and item["rule"]["chain"] == "agent_scout"
        ]

    old_rules = max(rule_handles(world.nft_json("table", "inet", "keel")))
    world.configure({"scout": {"uid": AGENT_UID, "port": 5301, "allow": ["www.allowed.test"]}})
    # The agent keeps connecting to dual.allowed.test's address all along.
    agent.do("load_start", good=[["192.0.2.10", 80]], bad=[["192.0.2.11", 80]])
    wait_until(
        lambda: agent.do("load_count")["bad_ok"] > 0, timeout=30, what="the agent to connect"
    )
    world.start_daemon(wait=False)
    new_rules_seen: float | None = None
    snapshots = 0

    def adopted() -> bool:
        try:
            return bool(world.status()["sets_adopted"])
        except ApiError:
            return False

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listing = world.nft_json("table", "inet", "keel")  # one generation of the ruleset
        seen = time.monotonic()
        snapshots += 1
        new_rules = any(handle > old_rules for handle in rule_handles(listing))
        dropped_there = any(
            element == "192.0.2.11"
            or (isinstance(element, dict) and element["elem"]["val"] == "192.0.2.11")
            for item in listing
            if item.get("set", {}).get("name") == "scout_v4"
            for element in item["set"].get("elem", [])
        )
        assert not (new_rules and dropped_there), "the new rules accepted a dropped name's address"
        if new_rules and new_rules_seen is None:
            new_rules_seen = seen
        if new_rules_seen is not None and adopted():
            break
    assert new_rules_seen is not None, f"no new rules in {snapshots} snapshots:\n{world.log()}"
    counts = agent.do("load_stop")
    assert counts["bad_ok"] > 0  # the agent did reach it under the old allowlist
    assert [at for at in counts["bad_ok_at"] if at > new_rules_seen] == []
    assert counts["good_failed"] == 0, counts["failures"]
    assert_blocked(agent, "192.0.2.11", 80)
    assert len(world.elements("scout_v4")) == 1
