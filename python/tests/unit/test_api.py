from __future__ import annotations

import asyncio
import contextlib
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


@pytest.mark.allow_traceback(
    "a verb handler with a bug: the daemon logs its traceback for the operator, the client "
    "gets one line (`internal error in 'crash'`)",
    match=r'raise RuntimeError\("bug"\)',
)
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


async def _forbid(args: dict[str, Any], peer: api.Peer) -> Any:
    from keel.errors import Forbidden

    raise Forbidden("`remove` needs root or the group keel-operators")


async def _bad_args(args: dict[str, Any], peer: api.Peer) -> Any:
    from keel.errors import UsageError

    raise UsageError("agent: required")


@pytest.mark.allow_traceback(
    "the 'crash' verb has a bug on purpose: logged for the operator, one line to the client",
    match=r'raise RuntimeError\("bug"\)',
)
def test_clients_tell_refusals_apart_by_type(tmp_path: Path) -> None:
    from keel.errors import BadRequest, Forbidden, Refused, Unavailable

    path = tmp_path / "t.sock"
    handlers = {**HANDLERS, "forbid": _forbid, "bad": _bad_args}

    async def scenario() -> None:
        async with api.ControlServer(path, handlers):
            cases: list[tuple[str, type[ApiError]]] = [
                ("refuse", Refused),
                ("crash", Refused),
                ("forbid", Forbidden),
                ("bad", BadRequest),
                ("nope", BadRequest),
            ]
            for verb, error in cases:
                with pytest.raises(error) as caught:
                    await api.acall(path, verb)
                assert not isinstance(caught.value, Unavailable)
                with pytest.raises(error):
                    await asyncio.to_thread(api.call, path, verb)
            assert not issubclass(BadRequest, Refused)
            assert issubclass(Forbidden, Refused)

    asyncio.run(scenario())
    with pytest.raises(Unavailable) as caught:
        api.call(path, "status")
    assert isinstance(caught.value.__cause__, FileNotFoundError | ConnectionRefusedError)


def test_requests_with_duplicate_keys_or_deep_nesting_are_bad_requests(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"

    async def scenario() -> None:
        async with api.ControlServer(path, HANDLERS):
            reader, writer = await asyncio.open_unix_connection(str(path))
            for line in (
                b'{"verb": "echo", "verb": "crash"}\n',
                b'{"verb": "echo", "args": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
                b'{"verb": "echo", "args": {"x": NaN}}\n',
            ):
                writer.write(line)
                await writer.drain()
                answer = json.loads(await reader.readline())
                assert answer["ok"] is False
                assert answer["kind"] == "bad_request"
                assert answer["error"].startswith("malformed request: ")
            writer.close()

    asyncio.run(scenario())


def test_a_connection_is_kept_and_survives_a_daemon_restart(tmp_path: Path) -> None:
    from keel.errors import Unavailable

    path = tmp_path / "t.sock"

    async def scenario() -> None:
        connection = api.Connection(path, service="test")
        async with api.ControlServer(path, HANDLERS):
            first = await asyncio.to_thread(connection.call, "echo", {"n": 1})
            second = await asyncio.to_thread(connection.call, "echo", {"n": 2})
            assert first["args"] == {"n": 1}
            assert second["args"] == {"n": 2}
        with pytest.raises(Unavailable, match="cannot reach the test daemon"):
            await asyncio.to_thread(connection.call, "echo")
        async with api.ControlServer(path, HANDLERS):  # the daemon is back
            assert (await asyncio.to_thread(connection.call, "echo", {"n": 3}))["args"] == {"n": 3}
        connection.close()

        async with api.AsyncConnection(path) as aconn:
            async with api.ControlServer(path, HANDLERS):
                assert (await aconn.call("echo", {"a": 1}))["args"] == {"a": 1}
                assert (await aconn.call("echo", {"a": 2}))["args"] == {"a": 2}
            with pytest.raises(Unavailable):
                await aconn.call("echo")
            async with api.ControlServer(path, HANDLERS):
                assert (await aconn.call("echo", {"a": 3}))["args"] == {"a": 3}

    asyncio.run(scenario())


def test_connection_upgrade_hands_the_socket_over(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"

    async def scenario() -> None:
        async with api.ControlServer(path, HANDLERS):

            def client() -> bytes:
                with api.Connection(path) as connection:
                    assert connection.call("echo")["args"] == {}
                    result, sock, rest = connection.upgrade("upgrade", {"to": "raw"})
                    assert result == {"upgraded": "raw"}
                    assert rest == b""
                    with sock:
                        sock.sendall(b"abc")
                        return sock.recv(3)

            assert await asyncio.to_thread(client) == b"cba"

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


def test_a_request_line_up_to_the_limit_is_served_and_a_longer_one_refused(
    tmp_path: Path,
) -> None:
    """The mesh's `send` carries 960 KiB as base64 (1.25 MiB of JSON): one line must hold it."""
    path = tmp_path / "run" / "test.sock"
    payload = "x" * (983_040 * 4 // 3)

    async def scenario() -> None:
        async with api.ControlServer(path, HANDLERS, mode=0o600):
            result = await api.acall(path, "echo", {"data": payload})
            assert result["args"]["data"] == payload
            reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 16)
            writer.write(b'{"verb": "echo", "args": {"data": "' + b"x" * api.MAX_REQUEST + b'"}}\n')
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            answer = json.loads(await reader.readline())
            assert answer["ok"] is False
            assert f"request too large (at most {api.MAX_REQUEST} bytes a line)" in str(answer)
            assert await reader.read() == b""  # and the connection is closed
            writer.close()

    asyncio.run(scenario())
