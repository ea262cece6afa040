"""The fleet daemon's logic, several daemons in one loop over an in-memory message bus.

The real mesh carries these messages in the integration tests; here a bus
that delivers (or drops) them lets the tests forge what a hostile member
could send and check what the daemon does with it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from keel import service
from keel.api import Peer
from keel.fleet import config as fleet_config
from keel.fleet.daemon import Fleet
from keel.fleet.link import Incoming, Link
from keel.fleet.protocol import Reply, Request
from keel.ledger.store import Ledger

ROOT = Peer(1, 0, 0)


class Bus:
    def __init__(self) -> None:
        self.links: dict[str, BusLink] = {}
        self.down: set[str] = set()
        self.sent: list[tuple[str, str, bytes]] = []

    def link(self, node: str) -> Callable[[fleet_config.FleetConfig], Link]:
        def make(config: fleet_config.FleetConfig) -> Link:
            self.links[node] = BusLink(self, node)
            return self.links[node]

        return make

    def deliver(self, sender: str, to: str, data: bytes) -> None:
        self.sent.append((sender, to, data))
        target = self.links.get(to)
        if target is None or to in self.down or sender in self.down:
            return
        deliver = target.deliver
        assert deliver is not None
        asyncio.get_running_loop().call_soon(deliver, Incoming(sender, data))


class BusLink:
    def __init__(self, bus: Bus, node: str) -> None:
        self.bus = bus
        self.node_id: str | None = node
        self.problem: str | None = None
        self.deliver: Callable[[Incoming], None] | None = None

    def start(self, deliver: Callable[[Incoming], None]) -> None:
        self.deliver = deliver

    async def wait_ready(self, timeout: float) -> bool:
        return True

    async def send(self, messages: Sequence[tuple[str, bytes]], *, ttl: float) -> None:
        assert self.node_id is not None
        for node, data in messages:
            self.bus.deliver(self.node_id, node, data)

    async def peers(self) -> list[dict[str, Any]]:
        return [
            {"id": node, "connected": node not in self.bus.down}
            for node in sorted(self.bus.links)
            if node != self.node_id
        ]

    async def status(self) -> dict[str, Any]:
        return {"node": self.node_id}

    def close(self) -> None:
        pass


NODES = ["a" * 32, "b" * 32, "c" * 32]


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (pytest is sync here)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@asynccontextmanager
async def fleet(
    directory: Path, bus: Bus, nodes: Sequence[str] = NODES, **settings: Any
) -> AsyncIterator[dict[str, Fleet]]:
    daemons = {}
    async with AsyncExitStack() as stack:
        for node in nodes:
            home = directory / node[:1]
            home.mkdir()
            path = home / "fleet.json"
            values = {
                "socket": str(home / "fleet.sock"),
                "ledger": str(home / "ledger.db"),
                "state": str(home / "state"),
                "watch": None,
                "services": ["mesh"],
                "witness_every": 3600,
                "request_timeout": 2,
                **settings,
            }
            path.write_text(json.dumps(values))
            config = fleet_config.load(path)
            with Ledger.open(config.common.ledger or home / "ledger.db") as ledger:
                ledger.append(source="test", kind="genesis", subject=node[:1])
            daemon = Fleet(config, make_link=bus.link(node))
            await stack.enter_async_context(service.running("fleet", daemon, config.common))
            daemons[node] = daemon
        yield daemons


@in_loop
async def test_every_node_witnesses_the_others_and_hands_back_cosignatures(short_tmp: Path) -> None:
    bus = Bus()
    async with fleet(short_tmp, bus) as daemons:
        for daemon in daemons.values():
            assert daemon.witnessing is not None
            await daemon.witnessing.witness_round()
        a = daemons[NODES[0]]
        for _ in range(100):
            held = await a._verb_witness({}, ROOT)
            if len(held["cosigned_by"]) == 2:
                break
            await asyncio.sleep(0.01)
        assert {w["node"] for w in held["witnessed"]} == set(NODES[1:])
        assert {c["witness"] for c in held["cosigned_by"]} == set(NODES[1:])
        result = await a._verb_audit({}, ROOT)
        assert result["exit_code"] == 0
        assert {n["verdict"] for n in result["nodes"]} == {"consistent"}


@in_loop
async def test_a_reply_from_another_node_than_the_one_asked_is_ignored(short_tmp: Path) -> None:
    bus = Bus()
    a, b, c = NODES
    async with fleet(short_tmp, bus) as daemons:
        bus.down.add(b)
        request = Request("status", "forgery-target", {})
        asking = asyncio.ensure_future(daemons[a].ask({b: request}, 0.5))
        await asyncio.sleep(0)
        # c answers in b's place, with the right id: the mesh says it came from c
        forged = Reply("forgery-target", True, {"report": {}})
        bus.deliver(c, a, forged.encode())
        answers = await asking
        answer = answers[b]
        assert isinstance(answer, str)
        assert "no answer" in answer


@in_loop
async def test_malformed_and_unanswerable_messages_do_not_hurt(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bus = Bus()
    a, b, _ = NODES
    async with fleet(short_tmp, bus) as daemons:
        with caplog.at_level(logging.WARNING, logger="keel.fleet"):
            bus.deliver(b, a, b"\xff garbage")
            bus.deliver(b, a, b'{"v": 1, "type": "checkpoint", "id": "x", "body": {"from": [-1]}}')
            await asyncio.sleep(0.05)
        assert "a malformed message from" in caplog.text
        # the bad checkpoint request got a refusal back, naming the problem
        replies = [data for sender, to, data in bus.sent if sender == a and to == b]
        assert replies
        assert b"tree sizes" in replies[-1]
        # and the daemon still answers
        result = await daemons[b].ask({a: Request("status", "ok-1", {})}, 2)
        answer = result[a]
        assert isinstance(answer, Reply)
        assert answer.ok


@in_loop
async def test_commands_from_nodes_that_are_no_operators_are_refused_and_recorded(
    short_tmp: Path,
) -> None:
    bus = Bus()
    a, b, _ = NODES
    async with fleet(short_tmp, bus, operators=[a]) as daemons:
        request = Request("control", "cmd-1", {"verb": "stop", "agent": "web"})
        answer = (await daemons[b].ask({a: request}, 2))[a]
        assert isinstance(answer, Reply)
        assert not answer.ok
        assert f"node {b} is not an operator of node {a}" in answer.error
        # b is an operator of a (every node here lists a): a runs no watch, says so
        answer = (await daemons[a].ask({b: request}, 2))[b]
        assert isinstance(answer, Reply)
        assert "runs no watch" in answer.error
        ledger_a = daemons[a].config.common.ledger
        assert ledger_a is not None
        shell = daemons[a].shell
        assert shell is not None
        await shell.recorder.flush()
        with Ledger.open(ledger_a, create=False) as ledger:
            kinds = [(e.kind, e.data.get("by")) for _, e in ledger.entries() if e.source == "fleet"]
        assert ("command_refused", b) in kinds
