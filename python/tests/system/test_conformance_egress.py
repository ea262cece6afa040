"""The conformance suite's egress checks on a keel host with egress on, and broken.

The host is the conformance site (``test_conformance.site``: a container with
the example agents, reached over ssh) with keel egress added: scout (tier 2)
and notes (tier 1 with an allowlist) are governed with their specs' lists.
"""

from __future__ import annotations

import json

from tests.system.test_conformance import (  # noqa: F401 - site is the fixture
    EGRESS_CHECKS,
    Site,
    conformance,
    site,
)
from tests.system.test_egress_in_container import EGRESS_UNIT

NOTES = {"user": "keel-agent-notes", "port": 5302, "allow": ["api.example.com"]}


def start_egress(site: Site, agents: dict[str, object]) -> None:  # noqa: F811
    box = site.box
    config = {"upstream": ["192.0.2.53"], "agents": {**agents, "notes": NOTES}}
    box.write_file("/etc/keel/egress.json", json.dumps(config))
    box.write_file("/etc/systemd/system/keel-egress.service", EGRESS_UNIT)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "enable", "--now", "keel-egress.service", timeout=60)


def test_egress_conformance_passes_then_catches_a_broken_table(site: Site) -> None:  # noqa: F811
    scout = {"user": "keel-agent-scout", "port": 5301, "allow": ["example.org", "*.wikipedia.org"]}
    start_egress(site, {"scout": scout})
    outcomes = conformance(site, "egress-good")
    failing = {n: o for n, o in outcomes.items() if n in EGRESS_CHECKS and o[0] != "passed"}
    assert not failing, failing

    # An operator "fixes" the firewall by hand, and widens the allowlist in the config only.
    site.box.run("nft", "flush", "chain", "inet", "keel", "agent_scout")
    scout["allow"] = ["example.org", "*.wikipedia.org", "*.example.net"]
    site.box.write_file(
        "/etc/keel/egress.json",
        json.dumps({"upstream": ["192.0.2.53"], "agents": {"scout": scout, "notes": NOTES}}),
    )
    outcomes = conformance(site, "egress-broken")
    outcome, message = outcomes["test_every_governed_agent_has_its_rules"]
    assert outcome == "failed"
    assert "scout: chain agent_scout does not end in drop (no rules)" in message
    outcome, message = outcomes["test_sandboxed_agents_are_governed"]
    assert outcome == "failed"
    assert "scout: /etc/keel/egress.json allows ['*.example.net'] beyond its spec" in message

    # Audit mode for a tier 2 agent is an open network.
    scout["allow"] = ["example.org", "*.wikipedia.org"]
    start_egress(site, {"scout": {**scout, "mode": "audit"}})
    site.box.run("systemctl", "restart", "keel-egress.service", timeout=60)
    outcomes = conformance(site, "egress-audit")
    outcome, message = outcomes["test_sandboxed_agents_are_governed"]
    assert outcome == "failed"
    assert "scout (tier 2) is in audit mode: its network is open" in message
    assert outcomes["test_every_governed_agent_has_its_rules"][0] == "passed"
