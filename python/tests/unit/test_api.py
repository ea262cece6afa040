from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from keel import api
from keel.errors import ApiError, KeelError


async def _echo(args: dict[str, Any], peer: api.Peer) -> Any:
    return {"args": args, "uid": peer.uid}


async def _refuse(args: dict[str, Any], peer: api.Peer) -> Any:
    raise KeelError("no such agent 'web'")


async def _crash(args: dict[str, Any], peer: api.Peer) -> Any:
    raise RuntimeError("bug")


async def _upgrade(args: dict[str, Any], peer: api.Peer) -> Any:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):  # a byte echo, reversed: not JSON any more
            writer.write(data[::-1])
            await writer.drain()

    return api.Upgrade({"upgraded": args.get("to")}, serve)


HANDLERS = {"echo": _echo, "refuse": _refuse, "crash": _crash, "upgrade": _upgrade}


def test_round_trip_errors_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "run" / "test.sock"

    async def scenario() -> None:
        async with api.ControlServer(path, HANDLERS, mode=0o600):
            assert oct(path.stat().st_mode & 0o777) == "0o600"
            result = await api.acall(path, "echo", {"x": 1})
            assert result == {"args": {"x": 1}, "uid": os.getuid()}
            # The blocking client, from a thread so the loop keeps serving.
            assert await asyncio.to_thread(api.call, path, "echo") == {
                "args": {},
                "uid": os.getuid(),
            }
            with pytest.raises(ApiError, match="no such agent 'web'"):
                await api.acall(path, "refuse")
            with pytest.raises(ApiError, match="internal error in 'crash'"):
                await api.acall(path, "crash")
            with pytest.raises(
                ApiError, match=r"unknown verb 'nope'.*crash, echo, refuse, upgrade"
            ):
                await api.acall(path, "nope")
            # Garbage gets an error line and the connection stays usable.
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"\xff not json\n")
            await writer.drain()
            assert json.loads(await reader.readline())["ok"] is False
            writer.write(b'{"verb": "echo", "args": {"y": 2}}\n')
            await writer.drain()
            assert json.loads(await reader.readline())["result"]["args"] == {"y": 2}
            writer.close()
        assert not path.exists()

    asyncio.run(scenario())


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a dead daemon's socket file

    async def scenario() -> None:
        async with api.ControlServer(path, HANDLERS):
            with pytest.raises(KeelError, match="already serving"):
                await api.ControlServer(path, HANDLERS).start()

    asyncio.run(scenario())


def test_unreachable_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ApiError, match=r"cannot reach the watch daemon at .*is `keel watch serve`"):
        api.call(tmp_path / "none.sock", "status", service="watch")


def test_a_handler_can_take_the_connection_over(tmp_path: Path) -> None:
    path = tmp_path / "test.sock"

    async def scenario() -> None:
        async with api.ControlServer(path, HANDLERS):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"verb": "echo"}\n{"verb": "upgrade", "args": {"to": "bytes"}}\n')
            await writer.drain()
            assert json.loads(await reader.readline())["ok"] is True
            assert json.loads(await reader.readline()) == {
                "ok": True,
                "result": {"upgraded": "bytes"},
            }
            writer.write(b'{"verb": "echo"}\n')  # no longer a request: just bytes
            await writer.drain()
            assert await reader.readexactly(17) == b'{"verb": "echo"}\n'[::-1]
            writer.write_eof()
            assert await reader.read() == b""  # serve returned: the server hung up
            writer.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"verb": "echo", "verb": "crash"}', 'malformed request: key "verb" appears twice'),
        (b'{"verb": "echo", "args": {"ttl": NaN}}', "malformed request: NaN is not a JSON value"),
        (b'{"verb": "echo", "args": ' + b"[" * 100 + b"]" * 100 + b"}", "nested more than 64"),
        (b'{"verb": "echo", "args": ' + b"[" * 100_000 + b"}", "malformed request: "),
        (b"\xff not json", "malformed request: not UTF-8"),
        (b'["echo"]', 'expected {"verb": ..., "args": {...}}'),
    ],
)
def test_requests_are_parsed_strictly_with_one_line_errors(
    tmp_path: Path, line: bytes, error: str
) -> None:
    path = tmp_path / "strict.sock"

    async def scenario() -> None:
        async with api.ControlServer(path, HANDLERS):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(line + b"\n")
            await writer.drain()
            answer = json.loads(await reader.readline())
            assert answer["ok"] is False
            assert error in answer["error"]
            assert "\n" not in answer["error"]
            writer.write(b'{"verb": "echo"}\n')  # the connection stays usable
            await writer.drain()
            assert json.loads(await reader.readline())["ok"] is True
            writer.close()

    asyncio.run(scenario())


def test_handlers_see_the_callers_groups(tmp_path: Path) -> None:
    path = tmp_path / "groups.sock"
    seen: list[api.Peer] = []

    async def who(args: dict[str, Any], peer: api.Peer) -> Any:
        seen.append(peer)
        return None

    async def scenario() -> None:
        async with api.ControlServer(path, {"who": who}):
            await api.acall(path, "who")

    asyncio.run(scenario())
    assert seen[0].pid == os.getpid()
    assert (seen[0].uid, seen[0].gid) == (os.getuid(), os.getgid())
    assert seen[0].groups == frozenset(os.getgroups())
    assert api._proc_groups(os.getpid()) == frozenset(os.getgroups())
