"""keel's nftables table as data: the config in, one JSON transaction out.

Everything egress puts in the kernel lives in one table, ``inet keel``; no
other table is read or written. Per agent (matched on ``meta skuid``):

- ``redirect`` (nat, output, priority -100): its DNS (UDP and TCP port 53, to
  any resolver) goes to its proxy port on loopback;
- ``output`` (filter, output, priority 0): established and related traffic
  passes; a verdict map on the uid jumps to the agent's own chain, so a
  packet costs one hash lookup however many agents there are (other users'
  packets find no entry and pass untouched);
- ``agent_<name>``: addresses in ``<name>_v4`` / ``<name>_v6`` (sets with
  per-element timeouts, filled by the proxy) pass, so does its DNS to its own
  proxy; everything else (other resolvers, DoT on 853, QUIC on UDP 443,
  direct connections to addresses no allowed name resolved to) is logged
  at a limited rate to an NFLOG group and counted in ``<name>_blocked``, then
  dropped (``enforce``) or let through (``audit``).

:func:`replace` builds the transaction that turns whatever the table holds
now (:class:`Table`, read from ``nft -j list table``) into that, atomically:
it flushes and rewrites the chains but keeps the sets and their elements
(a restarted daemon keeps what agents already resolved) and deletes the sets
and chains of agents that are gone. :func:`delete_elements` then takes out,
in a transaction of its own, what the new allowlists no longer cover
(:func:`stale_elements`). Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.egress.answers import IPAddress

FAMILY = "inet"
TABLE = "keel"
REDIRECT_CHAIN = "redirect"
OUTPUT_CHAIN = "output"
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


def chain_name(agent: str) -> str:
    return f"agent_{agent}"


def set_name(agent: str, family: int) -> str:
    return f"{agent}_v{family}"


def counter_name(agent: str) -> str:
    return f"{agent}_blocked"


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


def wanted_objects(agents: Sequence[AgentRules]) -> tuple[list[str], list[str], list[str]]:
    """(chains, sets, counters) the table must have for ``agents``."""
    chains = [REDIRECT_CHAIN, OUTPUT_CHAIN] + [chain_name(a.name) for a in agents]
    sets = [set_name(a.name, family) for a in agents for family in (4, 6)]
    counters = [counter_name(a.name) for a in agents]
    return chains, sets, counters


def replace(
    agents: Sequence[AgentRules],
    *,
    log_group: int,
    current: Table | None = None,
) -> Json:
    """The one transaction that makes keel's table enforce ``agents``.

    ``current`` is the table as listed just before (None when there is no
    table; its sets' elements are not needed: they all stay).
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
    commands.append(
        _rule(
            OUTPUT_CHAIN,
            _match({"ct": {"key": "state"}}, ["established", "related"], op="in"),
            {"accept": None},
        )
    )
    if agents:
        by_uid = sorted(agents, key=lambda a: a.uid)
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
    """Per set, the elements whose name (their comment) ``agent`` may no longer resolve.

    ``still_allowed(agent, name)`` is the new allowlist's verdict. An element
    without a comment was not put there by keel and goes too.
    """
    stale: dict[str, list[IPAddress]] = {}
    for agent in agents:
        for family in (4, 6):
            name = set_name(agent.name, family)
            gone = [
                e.address
                for e in current.sets.get(name, [])
                if not e.comment or not still_allowed(agent.name, e.comment)
            ]
            if gone:
                stale[name] = gone
    return stale


def rule_count(document: Json) -> int:
    return sum(1 for command in document["nftables"] if "rule" in command.get("add", {}))
