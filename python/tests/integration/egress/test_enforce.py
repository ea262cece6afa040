"""egress in real network namespaces: what an agent can and cannot reach, through the kernel.

Every test runs the real daemon (``keel egress serve``) as root in the keel
host's namespace, real nftables, and the agent as a process under its own
uid that resolves through whatever resolver it likes and connects with plain
sockets. A dropped datagram fails its ``send`` with EPERM at once; a TCP
connect whose SYN is dropped never completes (the agent sees its own
timeout), and the kernel's counter and the NFLOG record show the drop.
"""

from __future__ import annotations

import sys
from typing import Any

from .world import AGENT_UID, FAR_RESOLVER, OTHER_UID, Agent, World, wait_until

ALLOW = ["www.allowed.test", "dual.allowed.test", "alias.allowed.test", "*.wild.test"]


def assert_blocked(agent: Agent, address: str, port: int = 80, proto: str = "tcp") -> None:
    """A dropped first packet: EPERM for a datagram, a connect that never completes for TCP."""
    result = agent.connect(address, port, proto=proto, timeout=1.0)
    assert result["ok"] is False, (address, port, proto, result)
    assert result["error"] in ("EPERM", "timeout"), result


def start(world: World, allow: list[str] | None = None, **settings: Any) -> None:
    world.start_internet()
    world.configure(
        {"scout": {"uid": AGENT_UID, "port": 5301, "allow": ALLOW if allow is None else allow}},
        **settings,
    )
    world.start_daemon()


def test_an_allowed_name_connects_over_v4_and_v6(world: World) -> None:
    start(world)
    agent = world.agent()
    v4 = agent.resolve("dual.allowed.test", "A", server=world.dns_v4)
    v6 = agent.resolve("dual.allowed.test", "AAAA", server=world.dns_v6)
    assert v4["rcode"] == "NOERROR"
    assert v4["addresses"] == ["192.0.2.11"]
    assert v6["rcode"] == "NOERROR"
    assert v6["addresses"] == ["2001:db8::11"]
    # The addresses were in the sets before the answers came back.
    assert "192.0.2.11" in world.elements("scout_v4")
    assert "2001:db8::11" in world.elements("scout_v6")
    assert agent.connect("192.0.2.11", 80) == {"ok": True, "reply": "192.0.2.11 80 hello"}
    assert agent.connect("2001:db8::11", 80) == {"ok": True, "reply": "2001:db8::11 80 hello"}
    # Only what was resolved: the v4 answer opened no other address.
    assert_blocked(agent, "192.0.2.10", 80)


def test_an_unlisted_name_gets_nxdomain_and_is_recorded(world: World) -> None:
    start(world)
    agent = world.agent()
    answer = agent.resolve("www.other.test", server=world.dns_v4)
    assert answer == {"rcode": "NXDOMAIN", "addresses": [], "names": [], "ttls": []}
    assert world.queries("www.other.test") == 0  # never even asked upstream
    assert world.elements("scout_v4") == {}
    recent = world.status()["agents"]["scout"]["recent"]
    assert recent[0]["what"] == "denied"
    assert recent[0]["detail"] == "www.other.test (A)"
    world.stop_daemon()
    denied = [e for e in world.ledger_entries() if e["kind"] == "egress.denied"]
    assert denied[0]["subject"] == "scout"
    assert denied[0]["data"] == {
        "name": "www.other.test",
        "type": "A",
        "mode": "enforce",
        "count": 1,
    }


def test_a_direct_connection_to_an_unlisted_address_is_blocked_and_recorded(world: World) -> None:
    start(world)
    agent = world.agent()
    for address in ("192.0.2.14", "2001:db8::14"):
        assert_blocked(agent, address, 80)
    wait_until(
        lambda: world.status()["agents"]["scout"]["blocked"]["packets"] >= 2,
        timeout=10,
        what="the drops to be counted",
    )
    # Both addresses' drops, not any two: the IPv4 SYN's retransmissions are drops too,
    # and may all come in before the IPv6 one does.
    wanted = {"tcp 192.0.2.14:80", "tcp [2001:db8::14]:80"}
    wait_until(
        lambda: (
            wanted
            <= {
                r["detail"]
                for r in world.status()["agents"]["scout"]["recent"]
                if r["what"] == "blocked"
            }
        ),
        timeout=10,
        what="the drops of both addresses to reach the daemon over NFLOG",
    )
    world.stop_daemon()
    blocked = [e["data"] for e in world.ledger_entries() if e["kind"] == "egress.blocked"]
    assert {
        "protocol": "tcp",
        "address": "192.0.2.14",
        "port": 80,
        "mode": "enforce",
        "count": 1,
    } in blocked


def test_dns_to_any_other_resolver_is_answered_by_keel(world: World) -> None:
    start(world)
    agent = world.agent()
    for tcp in (False, True):
        for server in (FAR_RESOLVER, "2001:db8::53", world.dns_v4, "127.0.0.53"):
            denied = agent.resolve("www.other.test", server=server, tcp=tcp)
            assert denied["rcode"] == "NXDOMAIN", (server, tcp, denied)
            allowed = agent.resolve("www.allowed.test", server=server, tcp=tcp)
            assert allowed["addresses"] == ["192.0.2.10"], (server, tcp, allowed)
    # Nothing of it reached the authoritative server but keel's own questions.
    assert world.queries("www.other.test") == 0


def test_dot_and_quic_to_unlisted_addresses_are_blocked(world: World) -> None:
    start(world)
    agent = world.agent()
    assert_blocked(agent, "192.0.2.14", 853)
    assert_blocked(agent, "2001:db8::14", 853)
    assert_blocked(agent, "192.0.2.14", 443, proto="udp")
    assert_blocked(agent, "2001:db8::14", 443, proto="udp")
    # To an allowed address the same ports work: the rule is the address.
    agent.resolve("www.allowed.test", server=world.dns_v4)
    assert agent.connect("192.0.2.10", 853)["ok"] is True
    assert agent.connect("192.0.2.10", 443, proto="udp") == {"ok": True, "reply": "echo hello"}


def test_cname_chains_allow_from_their_start_only(world: World) -> None:
    start(world)
    agent = world.agent()
    # alias.allowed.test -> edge.cdn.test: the chain starts at an allowed name.
    alias = agent.resolve("alias.allowed.test", server=world.dns_v4)
    assert alias["rcode"] == "NOERROR"
    assert alias["names"] == ["alias.allowed.test", "edge.cdn.test"]
    assert alias["addresses"] == ["192.0.2.13"]
    assert agent.connect("192.0.2.13", 80)["ok"] is True
    # into.other.test -> www.allowed.test: ending at an allowed name does not help.
    into = agent.resolve("into.other.test", server=world.dns_v4)
    assert into["rcode"] == "NXDOMAIN"
    assert "192.0.2.10" not in world.elements("scout_v4")
    assert_blocked(agent, "192.0.2.10", 80)
    # Nor is the chain's end an allowed name of its own.
    assert agent.resolve("edge.cdn.test", server=world.dns_v4)["rcode"] == "NXDOMAIN"


def test_wildcards_match_one_or_more_labels_only(world: World) -> None:
    start(world)
    agent = world.agent()
    assert agent.resolve("a.wild.test", server=world.dns_v4)["addresses"] == ["192.0.2.16"]
    assert agent.resolve("a.b.wild.test", server=world.dns_v4)["addresses"] == ["192.0.2.17"]
    assert agent.resolve("A.WILD.TEST.", server=world.dns_v4)["addresses"] == ["192.0.2.16"]
    assert agent.resolve("wild.test", server=world.dns_v4)["rcode"] == "NXDOMAIN"
    assert agent.resolve("badwild.test", server=world.dns_v4)["rcode"] == "NXDOMAIN"
    assert set(world.elements("scout_v4")) == {"192.0.2.16", "192.0.2.17"}


def test_an_empty_allowlist_means_no_egress_at_all(world: World) -> None:
    start(world, allow=[])
    agent = world.agent()
    assert agent.resolve("www.allowed.test", server=world.dns_v4)["rcode"] == "NXDOMAIN"
    assert_blocked(agent, "192.0.2.10", 80)


def test_another_users_traffic_is_untouched(world: World) -> None:
    start(world)
    other = world.agent(OTHER_UID)
    assert other.connect("192.0.2.14", 80)["ok"] is True
    assert other.connect("2001:db8::14", 853)["ok"] is True
    # Its DNS goes where it sends it: the authoritative server answers.
    answer = other.resolve("www.other.test", server=world.dns_v4)
    assert answer["addresses"] == ["192.0.2.14"]
    assert world.queries("www.other.test") == 1
    assert world.elements("scout_v4") == {}


def test_the_agent_cannot_change_the_rules(world: World) -> None:
    start(world)
    agent = world.agent()
    before = world.ruleset_text()
    for argv in (
        ["nft", "flush", "table", "inet", "keel"],
        ["nft", "delete", "table", "inet", "keel"],
        ["nft", "add", "element", "inet", "keel", "scout_v4", "{ 192.0.2.14 }"],
        ["nft", "add", "table", "inet", "mine"],
    ):
        result = agent.do("run", argv=argv)
        assert result["rc"] != 0, argv
        assert "Operation not permitted" in result["stderr"], result
    assert world.ruleset_text() == before
    assert_blocked(agent, "192.0.2.14", 80)


def test_the_agent_cannot_ride_on_a_udp_flow_someone_else_opened(world: World) -> None:
    # Another user's flows are tracked by conntrack, which knows ports, not
    # users: an agent sending from the same port to the same address must not
    # pass as that flow's "established" packets.
    start(world)
    other, agent = world.agent(OTHER_UID), world.agent()
    mine = other.resolve("www.other.test", server=world.dns_v4, source_port=40002)
    assert mine["addresses"] == ["192.0.2.14"]
    hijack = agent.resolve("www.other.test", server=world.dns_v4, source_port=40002)
    assert hijack["rcode"] == "NXDOMAIN"  # keel's answer: its DNS still went to keel
    assert world.queries("www.other.test") == 1
    assert other.do("datagram", source_port=40003, address="192.0.2.14", port=443)["ok"] is True
    riding = agent.do("datagram", source_port=40003, address="192.0.2.14", port=443)
    assert riding["ok"] is False
    assert riding["error"] == "EPERM"


def test_an_unsolicited_datagram_opens_no_way_back(world: World) -> None:
    # A datagram from outside to a free port leaves a conntrack entry whose
    # "reply" an agent could send from that port: it is judged as new.
    start(world)
    knock = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.bind(('192.0.2.14', 7777)); s.sendto(b'knock', (sys.argv[1], 45000))"
    )
    world.inet.run(sys.executable, "-c", knock, world.host.address)
    agent = world.agent()
    answer = agent.do("datagram", source_port=45000, address="192.0.2.14", port=7777)
    assert answer == {"ok": False, "error": "EPERM"}


def test_the_agents_own_tcp_server_answers_whoever_connects(world: World) -> None:
    start(world)
    agent = world.agent()
    assert agent.do("serve", port=8080)["ok"] is True
    ask = (
        "import socket, sys; c = socket.create_connection((sys.argv[1], 8080), timeout=3); "
        "c.sendall(b'ping\\n'); print(c.recv(100).decode().strip())"
    )
    answer = world.inet.run(sys.executable, "-c", ask, world.host.address).stdout.strip()
    assert answer == "agent 8080 ping"
