"""The ruleset as data: what the transaction holds, and reading the table back."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from keel.egress import ruleset
from keel.egress.ruleset import AgentRules, Table, read_table, replace, stale_elements

SCOUT = AgentRules("scout", 1001, 5301, enforced=True)
AUDITED = AgentRules("web-2", 1002, 5302, enforced=False)


def commands(document: dict[str, Any], verb: str, kind: str) -> list[dict[str, Any]]:
    return [c[verb][kind] for c in document["nftables"] if verb in c and kind in c[verb]]


def rules(document: dict[str, Any], chain: str) -> list[list[dict[str, Any]]]:
    return [r["expr"] for r in commands(document, "add", "rule") if r["chain"] == chain]


def test_everything_is_in_keels_table_only() -> None:
    document = replace([SCOUT, AUDITED], log_group=17)
    for command in document["nftables"]:
        for body in command.values():
            for item in body.values():
                if isinstance(item, dict) and "family" in item:
                    assert (item["family"], item.get("table", item.get("name"))) == ("inet", "keel")
    assert "flush" not in json.dumps(commands(document, "flush", "ruleset"))


def test_per_agent_sets_counters_and_chains() -> None:
    document = replace([SCOUT, AUDITED], log_group=17)
    sets = {s["name"]: (s["type"], s["flags"]) for s in commands(document, "add", "set")}
    assert sets == {
        "scout_v4": ("ipv4_addr", ["timeout"]),
        "scout_v6": ("ipv6_addr", ["timeout"]),
        "web-2_v4": ("ipv4_addr", ["timeout"]),
        "web-2_v6": ("ipv6_addr", ["timeout"]),
    }
    assert {c["name"] for c in commands(document, "add", "counter")} == {
        "scout_blocked",
        "web-2_blocked",
    }
    base = {
        c["name"]: (c.get("type"), c.get("hook"), c.get("prio"))
        for c in commands(document, "add", "chain")
    }
    assert base["redirect"] == ("nat", "output", -100)
    assert base["output"] == ("filter", "output", 0)
    assert base["agent_scout"] == (None, None, None)


def test_dns_of_agents_goes_to_their_own_port() -> None:
    [redirect] = rules(replace([SCOUT, AUDITED], log_group=17), "redirect")
    assert redirect[0]["match"]["right"] == {"set": ["tcp", "udp"]}
    assert redirect[1]["match"]["right"] == 53
    assert redirect[2]["match"]["right"] == {"set": [1001, 1002]}
    assert redirect[3]["redirect"]["port"]["map"]["data"]["set"] == [[1001, 5301], [1002, 5302]]


def test_output_accepts_established_then_dispatches_on_the_uid() -> None:
    tcp, opened, dispatch = rules(replace([SCOUT], log_group=17), "output")
    # Established in the direction the sender opened it (an agent's own flows:
    # its zone), and TCP either way (replies of an agent's servers).
    assert opened[0]["match"]["right"] == ["established", "related"]
    assert opened[1]["match"] == {
        "op": "==",
        "left": {"ct": {"key": "direction"}},
        "right": "original",
    }
    assert tcp[0]["match"]["right"] == ["established", "related"]
    assert tcp[1]["match"] == {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}
    assert dispatch[0]["vmap"]["data"]["set"] == [[1001, {"jump": {"target": "agent_scout"}}]]


def test_each_agent_tracks_its_own_udp_and_icmp_in_a_zone_of_its_own() -> None:
    document = replace([SCOUT, AUDITED], log_group=17)
    base = {
        c["name"]: (c.get("type"), c.get("hook"), c.get("prio"))
        for c in commands(document, "add", "chain")
    }
    assert base["zones"] == ("filter", "output", -300)  # before conntrack (-200)
    [zones] = rules(document, "zones")
    assert zones[0] == {"match": {"op": "!=", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    mangle = zones[1]["mangle"]
    assert mangle["key"] == {"ct": {"key": "zone", "dir": "original"}}
    assert mangle["value"]["map"]["key"] == {"meta": {"key": "skuid"}}
    assert mangle["value"]["map"]["data"]["set"] == [[1001, 51001], [1002, 51002]]
    assert ruleset.conntrack_zones([AUDITED, SCOUT]) == {"scout": 51001, "web-2": 51002}


def test_an_enforced_agent_drops_what_is_not_in_its_sets() -> None:
    chain = rules(replace([SCOUT], log_group=17), "agent_scout")
    assert chain[0] == [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": "@scout_v4",
            }
        },
        {"accept": None},
    ]
    assert chain[1][0]["match"]["right"] == "@scout_v6"
    assert chain[2][0]["match"]["right"] == "127.0.0.1"
    assert chain[2][2]["match"]["right"] == 5301
    assert chain[3][0]["match"]["right"] == "::1"
    assert chain[4] == [
        {"limit": {"rate": 10, "per": "second", "burst": 20}},
        {"log": {"group": 17, "prefix": "keel-egress scout enforce"}},
    ]
    assert chain[5] == [{"counter": "scout_blocked"}, {"drop": None}]
    assert len(chain) == 6


def test_an_audited_agent_logs_and_accepts() -> None:
    chain = rules(replace([AUDITED], log_group=9), "agent_web-2")
    assert chain[4][1] == {"log": {"group": 9, "prefix": "keel-egress web-2 audit"}}
    assert chain[5] == [{"counter": "web-2_blocked"}, {"accept": None}]


def test_no_agents_still_makes_a_harmless_table() -> None:
    document = replace([], log_group=17)
    assert rules(document, "redirect") == []
    assert rules(document, "zones") == []
    assert len(rules(document, "output")) == 2


def test_replacing_keeps_sets_and_removes_what_is_gone() -> None:
    current = Table(
        chains={"redirect", "output", "agent_scout", "agent_old"},
        sets={"scout_v4": [], "scout_v6": [], "old_v4": [], "old_v6": []},
        counters={"scout_blocked": (5, 300), "old_blocked": (1, 60)},
    )
    document = replace([SCOUT], log_group=17, current=current)
    order = [
        next(iter(c)) + " " + next(iter(next(iter(c.values())))) for c in document["nftables"][1:]
    ]
    flushed = [c["name"] for c in commands(document, "flush", "chain")]
    assert sorted(flushed) == ["agent_old", "agent_scout", "output", "redirect"]
    assert "zones" in {c["name"] for c in commands(document, "add", "chain")}
    assert [c["name"] for c in commands(document, "delete", "chain")] == ["agent_old"]
    assert [c["name"] for c in commands(document, "delete", "set")] == ["old_v4", "old_v6"]
    assert [c["name"] for c in commands(document, "delete", "counter")] == ["old_blocked"]
    assert "delete set" not in " ".join(o for o in order if "scout" in o)
    # Every flush comes before the first deletion, which comes before the first rule.
    last_flush = max(i for i, o in enumerate(order) if o.startswith("flush"))
    first_delete = min(i for i, o in enumerate(order) if o.startswith("delete"))
    first_rule = min(i for i, o in enumerate(order) if o == "add rule")
    assert last_flush < first_delete < first_rule


def test_stale_elements_are_found_by_their_name_and_deleted_together() -> None:
    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    c = ipaddress.ip_address("2001:db8::3")
    current = Table(
        chains={"output"},
        sets={
            "scout_v4": [ruleset.Element(a, 30, "keep.test"), ruleset.Element(b, 30, "gone.test")],
            "scout_v6": [ruleset.Element(c, 30, "")],  # not written by keel: goes too
        },
    )
    stale = stale_elements(current, [SCOUT], lambda agent, name: name == "keep.test")
    assert stale == {"scout_v4": [b], "scout_v6": [c]}
    assert ruleset.delete_elements(stale) == {
        "nftables": [
            {
                "delete": {
                    "element": {
                        "family": "inet",
                        "table": "keel",
                        "name": "scout_v4",
                        "elem": ["192.0.2.2"],
                    }
                }
            },
            {
                "delete": {
                    "element": {
                        "family": "inet",
                        "table": "keel",
                        "name": "scout_v6",
                        "elem": ["2001:db8::3"],
                    }
                }
            },
        ]
    }
    assert ruleset.agent_of_set("web_v2_v6") == "web_v2"


def test_replacing_never_touches_elements() -> None:
    current = Table(
        chains={"output"},
        sets={"scout_v4": [ruleset.Element(ipaddress.ip_address("192.0.2.1"), 30, "x")]},
    )
    document = replace([SCOUT], log_group=17, current=current)
    assert commands(document, "delete", "element") == []
    assert commands(document, "flush", "set") == []


def test_reading_the_table_back() -> None:
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "keel", "handle": 1}},
            {
                "counter": {
                    "family": "inet",
                    "name": "scout_blocked",
                    "table": "keel",
                    "packets": 3,
                    "bytes": 180,
                }
            },
            {
                "set": {
                    "family": "inet",
                    "name": "scout_v4",
                    "table": "keel",
                    "type": "ipv4_addr",
                    "flags": ["timeout"],
                    "elem": [
                        {
                            "elem": {
                                "val": "192.0.2.7",
                                "timeout": 90,
                                "expires": 89,
                                "comment": "x.test",
                            }
                        },
                        "192.0.2.8",
                        {"elem": {"val": "not an address"}},
                    ],
                }
            },
            {"chain": {"family": "inet", "table": "keel", "name": "agent_scout"}},
            {"chain": {"family": "inet", "table": "other", "name": "input"}},
            {"chain": {"family": "ip", "table": "keel", "name": "ip-family"}},
        ]
    }
    table = read_table(listing)
    assert table.chains == {"agent_scout"}
    assert table.counters == {"scout_blocked": (3, 180)}
    assert table.sets["scout_v4"] == [
        ruleset.Element(ipaddress.ip_address("192.0.2.7"), 89.0, "x.test"),
        ruleset.Element(ipaddress.ip_address("192.0.2.8"), 0.0, ""),
    ]


def test_log_prefixes_round_trip() -> None:
    assert ruleset.parse_log_prefix(ruleset.log_prefix("web-2", False)) == ("web-2", False)
    assert ruleset.parse_log_prefix("keel-egress scout enforce\0") == ("scout", True)
    assert ruleset.parse_log_prefix("somebody else") is None
    assert ruleset.parse_log_prefix("keel-egress scout maybe") is None


def test_an_address_stays_while_any_of_its_names_is_allowed() -> None:
    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    c = ipaddress.ip_address("192.0.2.3")
    current = Table(
        sets={
            "scout_v4": [
                ruleset.Element(a, 30, "twin.test www.test"),  # newest first
                ruleset.Element(b, 30, "gone.test other.test"),
                ruleset.Element(c, 30, "gone.test ..."),  # the rest did not fit
            ]
        }
    )
    allowed = {"www.test", "other.test", "old.test"}
    stale = stale_elements(current, [SCOUT], lambda agent, name: name in allowed)
    assert stale == {"scout_v4": [c]}  # c's other names cannot be judged: resolved again


def test_the_allowlist_fingerprint_vouches_for_the_sets() -> None:
    fingerprint = ruleset.allowlist_fingerprint(["b.test", "*.a.test"])
    assert fingerprint == ruleset.allowlist_fingerprint(["*.a.test", "b.test", "b.test"])
    assert fingerprint != ruleset.allowlist_fingerprint(["*.a.test"])
    scout = AgentRules("scout", 1001, 5301, enforced=True, fingerprint=fingerprint)
    document = replace([scout], log_group=17)
    counters = {c["name"] for c in commands(document, "add", "counter")}
    assert counters == {"scout_blocked", f"scout_allow_{fingerprint}"}
    old = Table(sets={"scout_v4": [], "scout_v6": []}, counters={"scout_allow_0123": (0, 0)})
    assert ruleset.unvouched(old, [scout]) == [scout]  # its allowlist changed: read its sets
    same = Table(sets={"scout_v4": []}, counters={f"scout_allow_{fingerprint}": (0, 0)})
    assert ruleset.unvouched(same, [scout]) == []
    assert ruleset.unvouched(Table(), [scout]) == []  # no sets yet: nothing to judge
    assert ruleset.unvouched(None, [scout]) == []
    # The old fingerprint goes with the transaction that adds the new one.
    replaced = replace([scout], log_group=17, current=old)
    assert [c["name"] for c in commands(replaced, "delete", "counter")] == ["scout_allow_0123"]


def test_stale_elements_leave_in_the_transaction_that_replaces_the_rules() -> None:
    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    kept = ruleset.Element(a, 29.4, "www.test")
    document = replace(
        [SCOUT],
        log_group=17,
        current=Table(chains={"output"}, sets={"scout_v4": [kept, ruleset.Element(b, 30, "x")]}),
        refill={"scout_v4": [kept], "scout_v6": []},
    )
    order = [next(iter(c)) + " " + next(iter(next(iter(c.values())))) for c in document["nftables"]]
    assert [c["name"] for c in commands(document, "flush", "set")] == ["scout_v4", "scout_v6"]
    [added] = commands(document, "add", "element")
    assert added["name"] == "scout_v4"
    assert added["elem"] == [{"elem": {"val": "192.0.2.1", "timeout": 30, "comment": "www.test"}}]
    # The sets are refilled before the first rule is added: one transaction, no gap.
    assert order.index("add element") < order.index("add rule")
