"""The agents' client without a mesh: what it imports, and its errors told apart by type."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keel import api
from keel.errors import BadRequest, Refused, Unavailable, UsageError
from keel.mesh import local
from keel.mesh.client import MeshClient, SendRefused

NODE = "b" * 32


def test_importing_the_client_loads_no_cryptography() -> None:
    probe = (
        "import json, sys; import keel.mesh.client; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('keel', 'cryptography')))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout)
    assert not [m for m in loaded if m.startswith("cryptography")], loaded
    for heavy in ("keel.mesh.identity", "keel.mesh.noise", "keel.mesh.session", "keel.mesh.kem"):
        assert heavy not in loaded


def test_a_directory_is_not_a_socket(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a directory: MeshClient takes the node's control"):
        MeshClient(tmp_path)


def test_no_daemon_is_unavailable_and_keeps_its_cause(tmp_path: Path) -> None:
    client = MeshClient(tmp_path / "absent.sock", timeout=2)
    with pytest.raises(Unavailable) as caught:
        client.status()
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    with pytest.raises(Unavailable):
        client.send(NODE, "t", b"x")
    sender = client.sender()
    sender.send(NODE, "t", b"x")  # batched, not sent yet
    with pytest.raises(SendRefused, match="cannot reach the mesh daemon") as unconfirmed:
        sender.flush()  # the connection cannot be made: the ids are named, unconfirmed
    assert len(unconfirmed.value.ids) == 1


@pytest.fixture
def refusing_daemon(tmp_path: Path) -> Iterator[Path]:
    """A control socket whose stream refuses every SEND, as a daemon would a bad recipient."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readexactly(local.FRAME.size)
            except asyncio.IncompleteReadError:
                return
            kind, length = local.read_frame_head(head)
            body = await reader.readexactly(length)
            if kind == local.Kind.SEND:
                request, _ = local.decode_send(body)
                writer.write(local.encode_sent(request, local.Status.REFUSED, "not a member"))
            else:
                writer.write(local.frame(local.Kind.ERROR, b"malformed frame: not here"))
                await writer.drain()
                return
            await writer.drain()

    async def stream(args: dict[str, Any], peer: api.Peer) -> api.Upgrade:
        return api.Upgrade({"stream": 1, "node": NODE}, serve)

    path = tmp_path / "mesh.sock"
    loop = asyncio.new_event_loop()
    server = api.ControlServer(path, {"stream": stream})
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_refusals_and_bad_requests_are_told_apart_by_type(refusing_daemon: Path) -> None:
    client = MeshClient(refusing_daemon, timeout=5)
    with pytest.raises(Refused, match="not a member"):
        client.send(NODE, "t", b"x")
    with pytest.raises(SendRefused, match="not a member") as refused, client.sender() as out:
        first = out.send(NODE, "t", b"one")
        second = out.send(NODE, "t", b"two")
    assert refused.value.ids == [first, second]
    assert not refused.value.busy
    with pytest.raises(BadRequest, match="not here"):
        client.subscribe("t").recv(wait=1)
    with pytest.raises(BadRequest, match="at most 983,040 bytes"):
        client.send(NODE, "t", b"x" * (960 * 1024 + 1))
    with pytest.raises(BadRequest, match="to 'short' is not a node id"):
        client.send("short", "t", b"x")
    with pytest.raises(BadRequest, match="topic 'bad topic' must be 1 to 128"):
        client.send_many([(NODE, "bad topic", b"x")])
    with pytest.raises(BadRequest, match="unknown verb"):
        client.status()  # this daemon has no status verb: its answer says so, by kind
    client.close()


@pytest.fixture
def hanging_up_daemon(tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    """A control socket whose first stream hangs up on its first frame; later ones queue all.

    Yields the socket and the kinds of the frames the streams read, in order.
    """
    kinds: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                kind, length = local.read_frame_head(await reader.readexactly(local.FRAME.size))
                body = await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                return
            kinds.append(kind)
            if len(kinds) == 1:
                return  # as a daemon that dies with the batch unconfirmed
            request, _ = local.decode_send(body, to_agents=kind == local.Kind.SEND_TO)
            writer.write(local.encode_sent(request))
            await writer.drain()

    async def stream(args: dict[str, Any], peer: api.Peer) -> api.Upgrade:
        return api.Upgrade({"stream": 1, "node": NODE}, serve)

    path = tmp_path / "mesh.sock"
    loop = asyncio.new_event_loop()
    server = api.ControlServer(path, {"stream": stream})
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield path, kinds
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_a_batch_for_an_agent_is_sent_again_as_it_was_after_a_reconnect(
    hanging_up_daemon: tuple[Path, list[int]],
) -> None:
    path, kinds = hanging_up_daemon
    with MeshClient(path, timeout=5).sender(retry=10) as out:
        out.send(f"scout@{NODE}", "t", b"for an agent")
    assert kinds == [local.Kind.SEND_TO, local.Kind.SEND_TO]


def test_the_default_socket_is_the_agents_one_for_a_process_that_cannot_open_the_control_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keel import paths
    from keel.mesh.client import mesh_client

    control = tmp_path / "run" / "keel" / "mesh.sock"
    agents = tmp_path / "run" / "keel-mesh" / "agents.sock"
    monkeypatch.setattr(paths, "dev_mode", lambda: False)
    monkeypatch.setattr(paths, "socket_file", lambda service: control)
    monkeypatch.setattr(mesh_client, "AGENTS_SOCKET", agents)
    # neither there: the control socket (whose error names the daemon to start)
    assert mesh_client.default_socket() == control
    # /run/keel hidden from the process (a tier-2 sandbox), the agents' socket there
    agents.parent.mkdir(parents=True)
    agents.touch()
    assert mesh_client.default_socket() == agents
    assert MeshClient().path == agents
    # the control socket within reach: that one
    control.parent.mkdir(parents=True)
    control.touch()
    assert mesh_client.default_socket() == control
    # dev mode: always ./.keel/run/mesh.sock
    control.unlink()
    monkeypatch.setattr(paths, "dev_mode", lambda: True)
    assert mesh_client.default_socket() == control
