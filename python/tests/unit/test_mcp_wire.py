from __future__ import annotations

import asyncio
import hashlib
import json

import mcp_types as types
import pytest
from keel.errors import UsageError
from keel.mcp.cli import parse_call_arguments
from keel.mcp.wire import classify_bad_line, digest, error_line, message_streams


def test_bad_lines_get_the_json_rpc_error_that_fits() -> None:
    assert classify_bad_line(b"{nope")[:1] == (types.PARSE_ERROR,)
    assert classify_bad_line(b"[1, 2]")[0] == types.INVALID_REQUEST
    code, message, request_id = classify_bad_line(b'{"id": 7, "method": 3}')
    assert (code, request_id) == (types.INVALID_REQUEST, 7)
    assert "JSON-RPC 2.0" in message
    assert classify_bad_line(b'{"id": true}')[2] is None
    assert classify_bad_line(b"[" * 100_000)[0] == types.PARSE_ERROR


def test_error_lines_are_json_rpc_errors() -> None:
    line = error_line(-32600, "bad", 3)
    assert line.endswith(b"\n")
    assert json.loads(line) == {
        "jsonrpc": "2.0",
        "id": 3,
        "error": {"code": -32600, "message": "bad"},
    }


def test_digests_are_sha256_of_canonical_json() -> None:
    assert digest({"b": 1, "a": "é"}) == hashlib.sha256('{"a":"é","b":1}'.encode()).hexdigest()
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})


def test_call_arguments_from_the_command_line() -> None:
    assert parse_call_arguments(["n=3", "s=hello", 'j={"x": [1]}'], '{"a": true}') == {
        "a": True,
        "n": 3,
        "s": "hello",
        "j": {"x": [1]},
    }
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        parse_call_arguments(["novalue"], None)
    with pytest.raises(UsageError, match="expected a JSON object"):
        parse_call_arguments([], "[1]")


def test_a_malformed_line_is_answered_and_the_connection_goes_on() -> None:
    async def scenario() -> list[bytes]:
        reader = asyncio.StreamReader()
        written: list[bytes] = []

        class Writer:
            transport = None

            def write(self, data: bytes) -> None:
                written.append(data)

            async def drain(self) -> None:
                return None

            def close(self) -> None:
                return None

            async def wait_closed(self) -> None:
                return None

        reader.feed_data(b"not json\n")
        reader.feed_data(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n')
        reader.feed_eof()
        async with message_streams(reader, Writer(), answer_errors=True) as (read, _write):  # type: ignore[arg-type]
            item = await read.receive()
        assert not isinstance(item, Exception)
        assert isinstance(item.message, types.JSONRPCRequest)
        assert item.message.method == "ping"
        return written

    written = asyncio.run(scenario())
    assert json.loads(written[0])["error"]["code"] == types.PARSE_ERROR
