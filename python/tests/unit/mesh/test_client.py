"""The agents' client without a mesh: what it imports, and its errors told apart by type."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
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
from keel.mesh.client import MeshClient, Sender, SendRefused
from keel.mesh.client import sender as sender_module
from keel.mesh.client.messages import Received, Returned, received
from keel.mesh.client.transport import Stream

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


@contextlib.contextmanager
def recording_daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, bytes]]]:
    """A Sender's stream to a thread that records each frame and answers each SEND with a
    SENT, as the daemon does; the frames are complete once the block is left."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    monkeypatch.setattr(
        sender_module, "Stream", lambda path, timeout: Stream(path, timeout, sock=ours)
    )
    frames: list[tuple[int, bytes]] = []

    def daemon() -> None:
        data = b""
        while chunk := theirs.recv(1 << 16):
            data += chunk
            while len(data) >= local.FRAME.size:
                kind, length = local.read_frame_head(data[: local.FRAME.size])
                if len(data) < local.FRAME.size + length:
                    break
                body, data = (
                    data[local.FRAME.size : local.FRAME.size + length],
                    data[local.FRAME.size + length :],
                )
                frames.append((kind, body))
                theirs.sendall(local.encode_sent(int.from_bytes(body[:4], "big")))

    thread = threading.Thread(target=daemon, daemon=True)
    thread.start()
    try:
        yield frames
    finally:
        theirs.shutdown(socket.SHUT_WR)
        thread.join(timeout=10)
        theirs.close()


def test_a_sender_encodes_each_recipient_once_and_its_frames_decode_to_the_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Sender builds entry heads from a (recipient, topic) pair's encoded route and a
    fresh id: the frames are what ``encode_send`` makes of the same messages."""
    with recording_daemon(monkeypatch) as frames:
        given = "0123456789abcdef" * 2
        with Sender(tmp_path / "mesh.sock", timeout=5, ttl=2.5) as out:
            with pytest.raises(BadRequest, match="not 32 hex digits"):
                out.send(NODE, "jobs", b"x", id="not an id")
            for _ in range(2):  # refused each time: a bad pair is not remembered
                with pytest.raises(BadRequest, match="topic"):
                    out.send(NODE, "bad topic", b"x")
            first = out.send(NODE, "jobs", b"one")
            second = out.send(f"scout@{NODE}", "jobs", b"two")
            third = out.send(NODE, "jobs", b"three", id=given)
    assert third == given
    assert len({first, second}) == 2
    assert [kind for kind, _ in frames] == [local.Kind.SEND, local.Kind.SEND_TO]
    assert local.decode_send(frames[0][1]) == (
        1,
        [local.SendEntry(first, NODE, "jobs", b"one", 2500)],
    )
    assert local.decode_send(frames[1][1], to_agents=True) == (
        2,
        [
            local.SendEntry(second, NODE, "jobs", b"two", 2500, "scout"),
            local.SendEntry(given, NODE, "jobs", b"three", 2500),
        ],
    )


@pytest.mark.parametrize("agent", [None, "scout"])
def test_a_senders_frames_stay_within_their_bytes_so_each_fits_one_msgs_packet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent: str | None
) -> None:
    """Sixteen 64 KiB messages are just over 1 MiB: a frame takes fifteen, and the
    sixteenth begins the next (of the same kind), where one frame of sixteen became a
    packet of 15 and a packet of 1 on the daemon's side."""
    to = NODE if agent is None else f"{agent}@{NODE}"
    payloads = [bytes([n]) * 65536 for n in range(40)]
    with recording_daemon(monkeypatch) as frames, Sender(tmp_path / "mesh.sock", timeout=5) as out:
        ids = [out.send(to, "bulk", payload) for payload in payloads]
    kind = local.Kind.SEND if agent is None else local.Kind.SEND_TO
    assert [k for k, _ in frames] == [kind] * 3
    decoded = [local.decode_send(body, to_agents=agent is not None)[1] for _, body in frames]
    assert [len(entries) for entries in decoded] == [15, 15, 10]
    assert all(len(body) <= sender_module.SEND_BATCH_BYTES + 4 for _, body in frames)
    entries = [entry for frame in decoded for entry in frame]
    assert [e.id for e in entries] == ids
    assert [bytes(e.payload) for e in entries] == payloads
    assert {e.to_agent for e in entries} == {agent}


def test_a_delivered_message_is_handed_out_as_the_received_its_constructor_makes() -> None:
    item = local.Delivered(7, "0123456789abcdef" * 2, NODE, 1.5, None, b"data", "scout")
    made = received(item, "jobs")
    assert made == Received("0123456789abcdef" * 2, NODE, "jobs", None, b"data", 1.5, "scout")
    assert hash(made) == hash(Received(item.id, NODE, "jobs", None, b"data", 1.5, "scout"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.data = b"other"  # type: ignore[misc]


def test_what_was_returned_is_remembered_in_order_under_one_lock_a_frame() -> None:
    returned = Returned(remember=3)
    assert returned.first_times([("a", "1"), ("a", "2"), ("a", "1")]) == [True, True, False]
    assert returned.first_time("b", "1")
    assert returned.first_times([("a", "1"), ("c", "1")]) == [False, True]
    assert not returned.first_time("c", "1")
    assert returned.first_time("a", "1")  # the oldest of four, forgotten
