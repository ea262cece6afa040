"""keel chat over the fleet: ``/fleet`` and ``/restart AGENT@NODE`` against real nodes.

Two keel hosts in namespaces (mesh, fleet daemon; b runs a watch with one
agent and names a as its operator), and a chat daemon speaking for a,
through a's fleet socket, to the Bot API stand-in on loopback.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from keel import service
from keel.api import call
from keel.chat import config as chat_config
from keel.chat.daemon import Chat

from tests.integration.chat.botapi import BotApi, Sent, bot_api
from tests.integration.chat.support import ALICE, TOKEN, write_chat_config
from tests.integration.mesh.nodes import wait_until
from tests.integration.watch_support import until

from .conftest import FleetFactory
from .fleet_nodes import FleetHost, mesh_of


def two_hosts(fleet_hosts: FleetFactory) -> tuple[FleetHost, FleetHost]:
    a, b = fleet_hosts("ab", per_host={"b": {"watch_agents": ["web"]}})
    for host in (a, b):
        host.mesh.start()
    mesh_of([a, b])
    b.settings["operators"] = [a.node_id]
    b.write_config()
    for host in (a, b):
        host.start()

    def web_healthy() -> bool:
        rows = {row["node"]: row for row in a.call("fleet_status")["nodes"]}
        report = rows[b.node_id].get("report") or {}
        return bool(report.get("agents", {}).get("web", {}).get("state") == "healthy")

    wait_until(web_healthy, timeout=60, what="web healthy on b, as a's fleet sees it")
    return a, b


def web(b: FleetHost) -> dict[str, Any]:
    agents: dict[str, Any] = call(b.directory / "watch.sock", "status")["agents"]
    return dict(agents["web"])


async def reply(api: BotApi, after: int, what: str) -> Sent:
    await until(lambda: len(api.to(ALICE)) > after, what=what)
    return api.to(ALICE)[after]


def test_fleet_and_a_restart_on_another_node_from_the_chat(
    fleet_hosts: FleetFactory, tmp_path: Path
) -> None:
    a, b = two_hosts(fleet_hosts)
    before = web(b)

    async def scenario(api: BotApi) -> None:
        path = write_chat_config(
            tmp_path, api.url, host="a", fleet_socket=str(a.socket),
            commands=["status", "fleet", "restart"],
        )  # fmt: skip
        config = chat_config.load(path)
        daemon = Chat(config)
        async with service.running("chat", daemon, config.common):
            await until(lambda: daemon.bot is not None, what="the bot to know its name")
            api.message(ALICE, "/fleet")
            fleet = await reply(api, 0, "the fleet")
            assert fleet.text.startswith("Fleet: 2 of 2 nodes healthy."), fleet.text
            assert "a (this node): healthy, 0 agents, 0 not healthy" in fleet.text
            assert "b: healthy, 1 agent, 0 not healthy" in fleet.text

            api.message(ALICE, "/restart nothing@b")
            unknown = await reply(api, 1, "the refusal")
            assert "node b has no agent nothing (it has: web)" in unknown.text
            api.message(ALICE, "/restart web@nowhere")
            nowhere = await reply(api, 2, "the refusal")
            assert "no node of the fleet is 'nowhere'" in nowhere.text

            api.message(ALICE, "/restart web@b")
            offer = await reply(api, 3, "the confirmation")
            assert "Restart web@b?" in offer.text
            assert "Now: healthy, 0 restarts" in offer.text
            query = api.press(ALICE, offer)
            await until(lambda: api.answers.get(query) is not None, what="the button's answer")
            assert api.answers[query] == "Approved: restart web@b."
            result = await reply(api, 4, "the result")
            assert result.text.startswith("Restarted web on b"), result.text

    with bot_api(TOKEN) as api:
        asyncio.run(scenario(api))
    after = web(b)
    assert after["pid"] != before["pid"]
    # b carried it out for a, and both fleets recorded it; the chat recorded the approval
    acted = [e for e in b.ledger_entries() if e["source"] == "fleet" and e["kind"] == "command"]
    assert [(e["data"]["by"], e["data"]["verb"]) for e in acted] == [(a.node_id, "restart")]
    asked = [e for e in a.ledger_entries("command_result") if e["source"] == "fleet"]
    assert [(e["subject"], e["data"]["outcome"]) for e in asked] == [(f"web@{b.node_id}", "done")]
