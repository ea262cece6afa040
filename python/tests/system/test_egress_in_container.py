"""keel egress under real systemd: a tier-2 agent from a rendered unit, egress enforced.

The container joins the keel host of the egress test world (network
namespaces: an "internet" with authoritative DNS and services on IPv4 and
IPv6). Inside, ``keel agents install`` renders the agent's tier-2 unit from
tiers.json, keel-egress runs as a notify unit with CAP_NET_ADMIN only, and
the agent, in its full sandbox, reports what the network let it do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.harness.netns import Network
from tests.harness.nspawn import Container
from tests.harness.plugin import Containers
from tests.integration.egress.world import World

AGENT = Path(__file__).with_name("egress_agent.py")

EGRESS_UNIT = """\
[Unit]
Description=keel egress
Before=keel-agent-scout.service

[Service]
Type=notify
NotifyAccess=main
ExecStart=/opt/keel/bin/keel egress serve --config /etc/keel/egress.json
Restart=always
RestartSec=200ms
WatchdogSec=10s
CapabilityBoundingSet=CAP_NET_ADMIN
AmbientCapabilities=CAP_NET_ADMIN
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
RuntimeDirectory=keel
RuntimeDirectoryPreserve=yes
StateDirectory=keel
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def plan(world: World) -> dict[str, Any]:
    return {
        "resolve": [
            ["www.allowed.test", world.dns_v4, False],
            ["dual.allowed.test", world.dns_v6, False],
            ["www.other.test", world.dns_v4, False],
            ["www.other.test", "9.9.9.9", True],
            ["a.wild.test", "198.51.100.53", False],
        ],
        "libc": ["www.allowed.test", "www.other.test"],
        "connect": [
            ["192.0.2.10", 80],
            ["2001:db8::11", 80],
            ["192.0.2.16", 80],
            ["192.0.2.14", 80],
            ["2001:db8::14", 853],
        ],
    }


def report(box: Container) -> dict[str, Any]:
    path = "/var/lib/keel-agents/scout/egress-report.json"

    def written() -> bool:
        pid = box.unit_properties("keel-agent-scout.service", "MainPID")["MainPID"]
        text = box.run("cat", path, check=False).stdout
        try:
            return bool(json.loads(text)["pid"] == int(pid))
        except (ValueError, KeyError):
            return False

    box.wait_until(written, timeout=60, what="the agent's report")
    value: dict[str, Any] = json.loads(box.read_file(path))
    return value


def test_a_tier_2_agent_reaches_exactly_its_allowlist(
    network: Network, containers: Containers
) -> None:
    world = World(network)
    try:
        world.start_internet()
        box = containers.boot("egress", host=world.host)
        box.write_file("/opt/keel-examples/egress_agent.py", AGENT.read_text())
        allow = ["www.allowed.test", "dual.allowed.test", "*.wild.test"]
        spec = {
            "name": "scout",
            "command": [
                "/opt/keel/bin/python",
                "/opt/keel-examples/egress_agent.py",
                json.dumps(plan(world)),
            ],
            "tier": 2,
            "egress": {"allow": allow},
        }
        box.write_file("/root/scout.json", json.dumps(spec))
        # Installed (and started) first: egress finds its user by name. The
        # report that counts is the one of the agent restarted under egress.
        box.run("keel", "agents", "install", "/root/scout.json")
        config = {
            "upstream": [world.dns_v4],
            "min_ttl": 30,
            "grace": 5,
            "agents": {
                "scout": {
                    "user": "keel-agent-scout",
                    "port": 5301,
                    "allow": allow,
                }
            },
        }
        box.write_file("/etc/keel/egress.json", json.dumps(config))
        box.write_file("/etc/systemd/system/keel-egress.service", EGRESS_UNIT)
        box.run("systemctl", "daemon-reload")
        started = box.run("systemctl", "start", "keel-egress.service", timeout=60, check=False)
        assert started.returncode == 0, box.journal("keel-egress.service")[-3000:]
        box.run("systemctl", "restart", "keel-agent-scout.service")
        seen = report(box)

        assert seen["uid"] != 0
        resolved = seen["resolve"]
        assert resolved[f"www.allowed.test@{world.dns_v4}"] == {
            "rcode": "NOERROR",
            "addresses": ["192.0.2.10"],
        }
        assert resolved[f"dual.allowed.test@{world.dns_v6}"] == {
            "rcode": "NOERROR",
            "addresses": ["2001:db8::11"],
        }
        assert resolved[f"www.other.test@{world.dns_v4}"]["rcode"] == "NXDOMAIN"
        assert resolved["www.other.test@9.9.9.9/tcp"]["rcode"] == "NXDOMAIN"
        assert resolved["a.wild.test@198.51.100.53"] == {
            "rcode": "NOERROR",
            "addresses": ["192.0.2.16"],
        }
        # The libc resolver of the sandboxed agent is caught the same way.
        assert seen["libc"]["www.allowed.test"] == ["192.0.2.10", "2001:db8::10"]
        assert str(seen["libc"]["www.other.test"]).startswith("gaierror")
        connected = seen["connect"]
        assert connected["192.0.2.10:80"] == "192.0.2.10 80 hello"
        assert connected["2001:db8::11:80"] == "2001:db8::11 80 hello"
        assert connected["192.0.2.16:80"] == "192.0.2.16 80 hello"
        assert connected["192.0.2.14:80"] in ("timeout", "EPERM")
        assert connected["2001:db8::14:853"] in ("timeout", "EPERM")

        # The daemon: CAP_NET_ADMIN only, and it says what it stopped.
        caps = box.unit_properties("keel-egress.service", "CapabilityBoundingSet")
        assert caps["CapabilityBoundingSet"] == "cap_net_admin"
        status = json.loads(box.run("keel", "egress", "status", "--json").stdout)
        assert status["agents"]["scout"]["uid"] == int(
            box.run("id", "-u", "keel-agent-scout").stdout
        )
        assert status["agents"]["scout"]["dns"]["denied"] >= 2

        # The agent cannot touch the rules, even from inside its unit's sandbox.
        attempt = box.run(
            "systemd-run", "--wait", "--pipe", "-p", "User=keel-agent-scout",
            "nft", "flush", "table", "inet", "keel", check=False,
        )  # fmt: skip
        assert attempt.returncode != 0
        assert "chain agent_scout" in box.run("nft", "list", "table", "inet", "keel").stdout

        # Stopping egress keeps the rules: fail closed.
        box.run("systemctl", "stop", "keel-egress.service")
        box.run("systemctl", "restart", "keel-agent-scout.service")
        after = report(box)
        assert after["resolve"][f"www.allowed.test@{world.dns_v4}"] in ("timeout", "ECONNREFUSED")
        assert after["connect"]["192.0.2.10:80"] == "192.0.2.10 80 hello"  # still in the set
        assert after["connect"]["192.0.2.14:80"] in ("timeout", "EPERM")
        kinds = {
            json.loads(line)["kind"]
            for line in box.run("keel", "ledger", "tail", "-n", "500", "--json").stdout.splitlines()
        }
        assert {"egress.rules", "egress.denied", "egress.blocked"} <= kinds
    finally:
        world.close()
