"""MCP's stdio framing over a Unix socket, for the SDK's sessions.

MCP's stdio transport is one JSON-RPC message per line (UTF-8, no embedded
newlines). The gateway speaks exactly that on Unix sockets, both to agents
(as the server) and to the stdio servers it holds (as the client), and hands
the SDK (``mcp``) the pair of message streams its sessions run on, the way
the SDK's own ``stdio_server``/``stdio_client`` do for pipes.

What a peer sends is checked here before the SDK sees it:

- a line longer than ``max_message`` bytes ends the connection (after a
  JSON-RPC error saying why, where the peer is a client): a peer cannot make
  the gateway buffer without bound;
- a line that is not JSON gets a JSON-RPC parse error (-32700), one that is
  JSON but no JSON-RPC message an invalid-request error (-32600); the
  connection goes on (JSON-RPC 2.0, section 5.1);
- a peer that does not read what it is sent for ``write_timeout`` seconds is
  disconnected: it cannot hold the gateway's memory either.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import mcp_types as types
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

log = logging.getLogger("keel.mcp")

DEFAULT_MAX_MESSAGE = 4 << 20
DEFAULT_WRITE_TIMEOUT = 10.0
_BUFFERED_MESSAGES = 32

ReadStream = MemoryObjectReceiveStream[SessionMessage | Exception]
WriteStream = MemoryObjectSendStream[SessionMessage]


class MessageTooLarge(Exception):
    """A peer sent a line longer than the limit; the connection ends."""


def error_line(code: int, message: str, request_id: Any = None) -> bytes:
    """A JSON-RPC error response as one line."""
    return (
        json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}},
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )


def classify_bad_line(line: bytes) -> tuple[int, str, Any]:
    """Why a line is not a JSON-RPC message: (code, message, request id if it had one)."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return types.PARSE_ERROR, "parse error: the line is not JSON", None
    request_id = None
    if isinstance(value, dict):
        candidate = value.get("id")
        if isinstance(candidate, str | int) and not isinstance(candidate, bool):
            request_id = candidate
    if isinstance(value, list):
        return (
            types.INVALID_REQUEST,
            "invalid request: JSON-RPC batches are not part of MCP; send one message per line",
            None,
        )
    return (
        types.INVALID_REQUEST,
        'invalid request: expected a JSON-RPC 2.0 message ({"jsonrpc": "2.0", "method": ...})',
        request_id,
    )


def digest(value: Any) -> str:
    """SHA-256 of a JSON value's canonical form (sorted keys, compact): what the ledger keeps."""
    canonical = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode()
    return hashlib.sha256(canonical).hexdigest()


async def _read_line(reader: asyncio.StreamReader, max_message: int) -> bytes | None:
    """One line without its newline; None at the end of the stream."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        if len(exc.partial) > max_message:
            raise MessageTooLarge from None
        return exc.partial  # a last message without its newline
    except asyncio.LimitOverrunError:
        raise MessageTooLarge from None
    if len(line) - 1 > max_message:
        raise MessageTooLarge
    return line[:-1]


@contextlib.asynccontextmanager
async def message_streams(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    max_message: int = DEFAULT_MAX_MESSAGE,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    answer_errors: bool,
    on_closed: Callable[[str], None] | None = None,
) -> AsyncIterator[tuple[ReadStream, WriteStream]]:
    """The SDK's (read, write) streams over one connection, for the body of the block.

    ``answer_errors``: answer malformed lines with JSON-RPC errors (the
    gateway's side facing clients); otherwise they are logged and dropped (a
    server's garbage). ``on_closed(reason)`` is called once when the peer's
    side ends (end of stream, a reset, an oversized message, a stalled read).
    Leaving the block closes the connection.
    """
    read_send, read_receive = anyio.create_memory_object_stream[SessionMessage | Exception](
        _BUFFERED_MESSAGES
    )
    write_send, write_receive = anyio.create_memory_object_stream[SessionMessage](
        _BUFFERED_MESSAGES
    )
    closed_reason: list[str] = []

    def closed(reason: str) -> None:
        if not closed_reason:
            closed_reason.append(reason)
            if on_closed is not None:
                on_closed(reason)

    async def read_loop() -> None:
        async with read_send:
            while True:
                try:
                    line = await _read_line(reader, max_message)
                except MessageTooLarge:
                    if answer_errors:
                        writer.write(
                            error_line(
                                types.INVALID_REQUEST,
                                f"message larger than {max_message} bytes; closing the connection",
                            )
                        )
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(writer.drain(), write_timeout)
                    closed(f"message larger than {max_message} bytes")
                    return
                except (ConnectionError, OSError) as exc:
                    closed(f"connection failed: {exc.strerror or type(exc).__name__}")
                    return
                if line is None:
                    closed("closed by the peer")
                    return
                if not line.strip():
                    continue
                try:
                    message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                except (ValidationError, ValueError):
                    code, text, request_id = classify_bad_line(line)
                    if answer_errors:
                        writer.write(error_line(code, text, request_id))
                    else:
                        log.warning("dropped a malformed line from an MCP server: %s", text)
                    continue
                try:
                    await read_send.send(SessionMessage(message))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return

    async def write_loop() -> None:
        async with write_receive:
            async for item in write_receive:
                data = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                writer.write(data.encode() + b"\n")
                try:
                    await asyncio.wait_for(writer.drain(), write_timeout)
                except TimeoutError:
                    closed(f"the peer read nothing for {write_timeout:g} s")
                    writer.transport.abort()
                    return
                except (ConnectionError, OSError) as exc:
                    closed(f"connection failed: {exc.strerror or type(exc).__name__}")
                    return

    async with anyio.create_task_group() as group:
        group.start_soon(read_loop)
        group.start_soon(write_loop)
        try:
            yield read_receive, write_send
        finally:
            group.cancel_scope.cancel()
            await write_send.aclose()
            await read_receive.aclose()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
