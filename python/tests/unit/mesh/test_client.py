"""The client against a daemon that has no binary stream (an older keel): JSON all the way."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keel import api
from keel.mesh.client import MeshClient
from keel.mesh.settings import control_path

NODE = "b" * 32


@pytest.fixture
def json_only_daemon(tmp_path: Path) -> Iterator[tuple[Path, list[tuple[str, dict[str, Any]]]]]:
    """A control socket with the JSON verbs ``send``/``send_many`` only; records every call."""
    calls: list[tuple[str, dict[str, Any]]] = []

    async def send(args: dict[str, Any], peer: api.Peer) -> Any:
        calls.append(("send", args))
        return {"id": args["id"]}

    async def send_many(args: dict[str, Any], peer: api.Peer) -> Any:
        calls.append(("send_many", args))
        return {"ids": [m["id"] for m in args["messages"]]}

    loop = asyncio.new_event_loop()
    server = api.ControlServer(control_path(tmp_path), {"send": send, "send_many": send_many})
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, calls
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_sends_fall_back_to_json_when_the_daemon_has_no_stream(
    json_only_daemon: tuple[Path, list[tuple[str, dict[str, Any]]]],
) -> None:
    directory, calls = json_only_daemon
    client = MeshClient(directory, timeout=5)
    first = client.send(NODE, "t", b"\x00one", ttl=60)
    ids = client.send_many([(NODE, "t", b"two"), (NODE, "u", b"three")])
    assert [verb for verb, _ in calls] == ["send", "send_many"]
    assert calls[0][1] == {
        "id": first,
        "to": NODE,
        "topic": "t",
        "data": base64.b64encode(b"\x00one").decode(),
        "ttl": 60,
    }
    assert [m["id"] for m in calls[1][1]["messages"]] == ids
    assert [base64.b64decode(m["data"]) for m in calls[1][1]["messages"]] == [b"two", b"three"]
    client.close()
