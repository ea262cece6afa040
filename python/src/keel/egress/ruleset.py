"""keel's nftables table as data: the config in, one JSON transaction out.

Everything egress puts in the kernel lives in one table, ``inet keel``; no
other table is read or written. Per agent (matched on ``meta skuid``):

- ``zones`` (raw, output, priority -300): its packets other than TCP are
  tracked in a conntrack zone of its own (original direction), so that it
  can never ride on a UDP or ICMP flow someone else opened by sending from
  the same port to the same address (it would pass as "established");
- ``redirect`` (nat, output, priority -100): its DNS (UDP and TCP port 53, to
  any resolver) goes to its proxy port on loopback;
- ``output`` (filter, output, priority 0): established and related traffic
  in its original direction passes (a flow the sender opened: its zone makes
  it the agent's own), and TCP in either direction (conntrack's TCP tracking
  gives a connection's packets to its own socket only: replies of an agent's
  servers); a verdict map on the uid jumps to the agent's own chain, so a
  packet costs one hash lookup however many agents there are (other users'
  packets find no entry and pass untouched). An agent's UDP sent as the
  "reply" of a flow it did not open (an unsolicited datagram from outside,
  answered) goes through its chain like anything new;
- ``agent_<name>``: addresses in ``<name>_v4`` / ``<name>_v6`` (sets with
  per-element timeouts, filled by the proxy) pass, so does its DNS to its own
  proxy; everything else (other resolvers, DoT on 853, QUIC on UDP 443,
  direct connections to addresses no allowed name resolved to) is logged
  at a limited rate to an NFLOG group and counted in ``<name>_blocked``, then
  dropped (``enforce``) or let through (``audit``).

:func:`replace` builds the transaction that turns whatever the table holds
now (:class:`Table`, read from ``nft -j list table``) into that, atomically:
it flushes and rewrites the chains but keeps the sets and their elements
(a restarted daemon keeps what agents already resolved), deletes the sets
and chains of agents that are gone and, in the same transaction, the
elements the new allowlists no longer cover (:func:`stale_elements`), so
that no moment exists in which the new rules accept an address of a name
that was dropped. Which agents' sets must be read for that is told by a
counter per agent, ``<name>_allow_<fingerprint>``, that names the allowlist
its elements were opened under (:func:`unvouched`): a restart with the same
allowlists serves at once, whatever the sets hold. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.egress.answers import IPAddress
from keel.egress.sets import names_of

FAMILY = "inet"
TABLE = "keel"
ZONES_CHAIN = "zones"
REDIRECT_CHAIN = "redirect"
OUTPUT_CHAIN = "output"
ZONE_BASE = 51000  # agents' conntrack zones: ZONE_BASE + 1, + 2, ... in the order of their names
LOG_RATE = 10  # log lines per second per agent (the ledger aggregates further)
LOG_BURST = 20
LOG_PREFIX = "keel-egress"  # NFLOG prefix: "keel-egress <agent> <mode>"

Json = dict[str, Any]


@dataclass(frozen=True)
class AgentRules:
    """What the kernel needs to know of one agent."""

    name: str
    uid: int
    port: int
    enforced: bool
    fingerprint: str = ""  # of the allowlist (allowlist_fingerprint); "" for none


def allowlist_fingerprint(entries: Iterable[str]) -> str:
    """A short, stable digest of an allowlist (its entries in canonical form, any order)."""
    text = "\n".join(sorted(set(entries)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def chain_name(agent: str) -> str:
    return f"agent_{agent}"


def set_name(agent: str, family: int) -> str:
    return f"{agent}_v{family}"


def counter_name(agent: str) -> str:
    return f"{agent}_blocked"


def fingerprint_counter(agent: str, fingerprint: str) -> str:
    """The counter whose name says which allowlist the agent's elements were opened under."""
    return f"{agent}_allow_{fingerprint}"


def log_prefix(agent: str, enforced: bool) -> str:
    return f"{LOG_PREFIX} {agent} {'enforce' if enforced else 'audit'}"


def parse_log_prefix(prefix: str) -> tuple[str, bool] | None:
    """(agent, enforced) from an NFLOG prefix of ours, or None."""
    parts = prefix.rstrip("\0").split(" ")
    if len(parts) != 3 or parts[0] != LOG_PREFIX or parts[2] not in ("enforce", "audit"):
        return None
    return parts[1], parts[2] == "enforce"


# --- the table as it is --------------------------------------------------------


@dataclass(frozen=True)
class Element:
    address: IPAddress
    expires: float  # seconds left
    comment: str


@dataclass
class Table:
    """What ``nft -j list table inet keel`` shows of keel's table."""

    chains: set[str] = field(default_factory=set)
    sets: dict[str, list[Element]] = field(default_factory=dict)
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # packets, bytes


def read_table(document: Mapping[str, Any]) -> Table:
    """Parse an ``nft -j list table`` document (objects of other tables are ignored)."""
    table = Table()
    for item in document.get("nftables", []):
        if not isinstance(item, dict) or len(item) != 1:
            continue
        kind, body = next(iter(item.items()))
        if not isinstance(body, dict) or body.get("table") != TABLE:
            continue
        if body.get("family") != FAMILY:
            continue
        name = str(body.get("name", ""))
        if kind == "chain":
            table.chains.add(name)
        elif kind == "set":
            table.sets[name] = [e for e in map(_element, body.get("elem", [])) if e is not None]
        elif kind == "counter":
            table.counters[name] = (int(body.get("packets", 0)), int(body.get("bytes", 0)))
    return table


def _element(raw: Any) -> Element | None:
    if isinstance(raw, dict) and isinstance(raw.get("elem"), dict):
        body = raw["elem"]
        value, expires, comment = body.get("val"), body.get("expires", 0), body.get("comment", "")
    else:  # an element without timeout or comment is listed bare
        value, expires, comment = raw, 0, ""
    try:
        address = ipaddress.ip_address(str(value))
    except ValueError:
        return None
    return Element(address, float(expires or 0), str(comment))


# --- the table as it should be -----------------------------------------------


def _ref(kind: str, name: str, **more: Any) -> Json:
    return {kind: {"family": FAMILY, "table": TABLE, "name": name, **more}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field_name: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field_name}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


TCP_UDP = {"set": ["tcp", "udp"]}


def _rule(chain: str, *expr: Json) -> Json:
    return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "expr": list(expr)}}}


# Per address family: the payload protocol, the set suffix, the loopback address.
FAMILIES = (("ip", 4, "127.0.0.1"), ("ip6", 6, "::1"))


def agent_rules(agent: AgentRules, log_group: int) -> list[Json]:
    chain = chain_name(agent.name)
    accept: Json = {"accept": None}
    verdict: Json = {"drop": None} if agent.enforced else accept
    allowed = [
        _rule(chain, _match(_payload(proto, "daddr"), f"@{set_name(agent.name, family)}"), accept)
        for proto, family, _ in FAMILIES
    ]
    own_dns = [
        _rule(
            chain,
            _match(_payload(proto, "daddr"), loopback),
            _match(_meta("l4proto"), TCP_UDP),
            _match(_payload("th", "dport"), agent.port),
            accept,
        )
        for proto, _, loopback in FAMILIES
    ]
    logged = _rule(
        chain,
        {"limit": {"rate": LOG_RATE, "per": "second", "burst": LOG_BURST}},
        {"log": {"group": log_group, "prefix": log_prefix(agent.name, agent.enforced)}},
    )
    return [
        *allowed,
        *own_dns,
        logged,
        _rule(chain, {"counter": counter_name(agent.name)}, verdict),
    ]


def conntrack_zones(agents: Sequence[AgentRules]) -> dict[str, int]:
    """Each agent's conntrack zone: its own, distinct from every other agent's and from
    the zone 0 everyone else's flows are tracked in."""
    return {a.name: ZONE_BASE + i for i, a in enumerate(sorted(agents, key=lambda a: a.name), 1)}


def wanted_objects(agents: Sequence[AgentRules]) -> tuple[list[str], list[str], list[str]]:
    """(chains, sets, counters) the table must have for ``agents``."""
    chains = [ZONES_CHAIN, REDIRECT_CHAIN, OUTPUT_CHAIN] + [chain_name(a.name) for a in agents]
    sets = [set_name(a.name, family) for a in agents for family in (4, 6)]
    counters = [counter_name(a.name) for a in agents]
    counters += [fingerprint_counter(a.name, a.fingerprint) for a in agents if a.fingerprint]
    return chains, sets, counters


def unvouched(current: Table | None, agents: Sequence[AgentRules]) -> list[AgentRules]:
    """The agents whose sets exist but whose allowlist may have changed since their elements
    were written (no counter with their allowlist's fingerprint): their sets must be
    read, and what they no longer allow deleted, in the transaction that replaces the rules."""
    if current is None:
        return []
    return [
        agent
        for agent in agents
        if (set_name(agent.name, 4) in current.sets or set_name(agent.name, 6) in current.sets)
        and fingerprint_counter(agent.name, agent.fingerprint) not in current.counters
    ]


def replace(
    agents: Sequence[AgentRules],
    *,
    log_group: int,
    current: Table | None = None,
    refill: Mapping[str, Sequence[Element]] | None = None,
) -> Json:
    """The one transaction that makes keel's table enforce ``agents``.

    ``current`` is the table as listed just before (None when there is no
    table; its sets' elements are not needed: they stay). ``refill`` names
    sets to empty and fill again with the given elements, in the same
    transaction: what is left out of them (:func:`stale_elements`) is gone
    when the new rules apply. (Emptied and refilled, never deleted element
    by element: an element that expires meanwhile would fail the deletion.)
    """
    current = current or Table()
    chains, sets, counters = wanted_objects(agents)
    commands: list[Json] = [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
    ]
    # Rules go first, so that nothing refers to what is deleted next.
    commands += [{"flush": _ref("chain", name)} for name in sorted(current.chains)]
    commands += [{"delete": _ref("chain", name)} for name in sorted(current.chains - set(chains))]
    commands += [{"delete": _ref("set", name)} for name in sorted(set(current.sets) - set(sets))]
    commands += [
        {"delete": _ref("counter", name)} for name in sorted(set(current.counters) - set(counters))
    ]
    for agent in agents:
        for family, key in ((4, "ipv4_addr"), (6, "ipv6_addr")):
            commands.append(
                {"add": _ref("set", set_name(agent.name, family), type=key, flags=["timeout"])}
            )
        commands.append({"add": _ref("counter", counter_name(agent.name))})
        if agent.fingerprint:
            commands.append(
                {"add": _ref("counter", fingerprint_counter(agent.name, agent.fingerprint))}
            )
    for name, elements in sorted((refill or {}).items()):
        commands += refill_set(name, elements)
    commands.append(
        {
            "add": _ref(
                "chain", ZONES_CHAIN, type="filter", hook="output", prio=-300, policy="accept"
            )
        }
    )
    commands.append(
        {
            "add": _ref(
                "chain", REDIRECT_CHAIN, type="nat", hook="output", prio=-100, policy="accept"
            )
        }
    )
    commands.append(
        {"add": _ref("chain", OUTPUT_CHAIN, type="filter", hook="output", prio=0, policy="accept")}
    )
    commands += [{"add": _ref("chain", chain_name(a.name))} for a in agents]
    # TCP first: the bulk of the traffic, passed by one rule.
    established = _match({"ct": {"key": "state"}}, ["established", "related"], op="in")
    commands.append(
        _rule(OUTPUT_CHAIN, established, _match(_meta("l4proto"), "tcp"), {"accept": None})
    )
    commands.append(
        _rule(
            OUTPUT_CHAIN,
            established,
            _match({"ct": {"key": "direction"}}, "original"),
            {"accept": None},
        )
    )
    if agents:
        by_uid = sorted(agents, key=lambda a: a.uid)
        zones = conntrack_zones(agents)
        commands.append(
            _rule(
                ZONES_CHAIN,
                _match(_meta("l4proto"), "tcp", op="!="),
                {
                    "mangle": {
                        "key": {"ct": {"key": "zone", "dir": "original"}},
                        "value": {
                            "map": {
                                "key": _meta("skuid"),
                                "data": {"set": [[a.uid, zones[a.name]] for a in by_uid]},
                            }
                        },
                    }
                },
            )
        )
        commands.append(
            _rule(
                REDIRECT_CHAIN,
                _match(_meta("l4proto"), TCP_UDP),
                _match(_payload("th", "dport"), 53),
                _match(_meta("skuid"), {"set": [a.uid for a in by_uid]}),
                {
                    "redirect": {
                        "port": {
                            "map": {
                                "key": _meta("skuid"),
                                "data": {"set": [[a.uid, a.port] for a in by_uid]},
                            }
                        }
                    }
                },
            )
        )
        commands.append(
            _rule(
                OUTPUT_CHAIN,
                {
                    "vmap": {
                        "key": _meta("skuid"),
                        "data": {
                            "set": [
                                [a.uid, {"jump": {"target": chain_name(a.name)}}] for a in by_uid
                            ]
                        },
                    }
                },
            )
        )
    for agent in agents:
        commands += agent_rules(agent, log_group)
    return {"nftables": commands}


def refill_set(name: str, elements: Sequence[Element]) -> list[Json]:
    """Commands that empty a set and add ``elements`` back, each with what was left of its
    timeout and its comment."""
    commands: list[Json] = [{"flush": _ref("set", name)}]
    alive = [e for e in elements if e.expires > 0]
    if alive:
        items = [
            {
                "elem": {
                    "val": str(e.address),
                    "timeout": max(1, math.ceil(e.expires)),
                    "comment": e.comment,
                }
            }
            for e in alive
        ]
        commands.append({"add": {"element": {**_ref("set", name)["set"], "elem": items}}})
    return commands


def delete_elements(stale: Mapping[str, Iterable[IPAddress]]) -> Json:
    """The transaction that deletes elements, per set (all or none of them)."""
    commands: list[Json] = []
    for name, addresses in sorted(stale.items()):
        elements = sorted({str(a) for a in addresses})
        if elements:
            commands.append({"delete": {"element": {**_ref("set", name)["set"], "elem": elements}}})
    return {"nftables": commands}


def agent_of_set(name: str) -> str:
    return name.rsplit("_v", 1)[0]


def remove() -> Json:
    """The transaction that removes keel's table (``on_stop: remove``)."""
    return {
        "nftables": [
            {"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"delete": {"table": {"family": FAMILY, "name": TABLE}}},
        ]
    }


def stale_elements(
    current: Table, agents: Sequence[AgentRules], still_allowed: Callable[[str, str], bool]
) -> dict[str, list[IPAddress]]:
    """Per set, the elements none of whose names (their comment) ``agent`` may still resolve.

    ``still_allowed(agent, name)`` is the new allowlist's verdict. An element
    without a comment was not put there by keel and goes too; so does one
    whose comment could not list every name and none of those it lists is
    allowed (the others cannot be judged: the agent resolves them again).
    """
    stale: dict[str, list[IPAddress]] = {}
    for agent in agents:
        for family in (4, 6):
            name = set_name(agent.name, family)
            gone = [
                e.address
                for e in current.sets.get(name, [])
                if not any(still_allowed(agent.name, n) for n in names_of(e.comment)[0])
            ]
            if gone:
                stale[name] = gone
    return stale


def rule_count(document: Json) -> int:
    return sum(1 for command in document["nftables"] if "rule" in command.get("add", {}))
