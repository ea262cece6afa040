"""Tool calls between gateways across the mesh: the payloads and the names. Pure.

A calling gateway sends a :class:`Request` to the hosting node on
:data:`CALL_TOPIC`, as the calling agent (the mesh's ``as_agent``); the
hosting gateway answers with an :class:`Answer` on :data:`ANSWER_TOPIC`.
Both are canonical JSON (sorted keys, compact, ASCII), at most one mesh
message (``keel.mesh.packets.MAX_PAYLOAD``). Who is calling is never in the
payload: the hosting gateway takes the node and the agent from the mesh
message, as the mesh authenticated them (docs/mcp.md, "Across the mesh").

Request: ``{"v": 1, "id": ID, "kind": "list", "deadline": T}`` or
``{"v": 1, "id": ID, "kind": "call", "server": S, "tool": T, "arguments": {...},
"deadline": T}``; ``deadline`` is Unix seconds on the caller's clock (the mesh's
message expiry is on the sender's clock too). A caller that gives up sends
``{"v": 1, "id": ID, "kind": "cancel", "deadline": T}`` on the same topic, as
the same agent, with the id and deadline of the request it cancels; it gets
no answer. Answer: ``{"v": 1, "id": ID,
"result": {...}}`` (a ``tools/call`` result, or ``{"tools": [...]}``) or
``{"v": 1, "id": ID, "error": {"code": N, "message": M}}``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from keel.config import parse_json
from keel.errors import ConfigError
from keel.mcp.policy import SEPARATOR, split
from keel.mcp.spec import check_server_name, check_tool
from keel.mesh.packets import MAX_PAYLOAD

CALL_TOPIC: Final = "keel.mcp.call"
ANSWER_TOPIC: Final = "keel.mcp.answer"
VERSION: Final = 1
MAX_MESSAGE_CHARS: Final = 4096  # an error message is cut to this

_ID = re.compile(r"[0-9a-f]{32}\Z")

Kind = Literal["list", "call", "cancel"]


class BadPayload(ValueError):
    """A payload that is not a request or answer of this protocol."""


@dataclass(frozen=True)
class Request:
    id: str
    kind: Kind
    deadline: float
    server: str = ""
    tool: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": VERSION, "id": self.id, "kind": self.kind}
        out["deadline"] = self.deadline
        if self.kind == "call":
            out.update(server=self.server, tool=self.tool, arguments=self.arguments)
        return out


@dataclass(frozen=True)
class Answer:
    id: str
    result: dict[str, Any] | None = None
    code: int = 0  # the JSON-RPC error code when result is None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.result is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": VERSION, "id": self.id}
        if self.result is not None:
            out["result"] = self.result
        else:
            out["error"] = {"code": self.code, "message": self.message}
        return out


def encode(value: Request | Answer) -> bytes:
    """The payload's bytes; :class:`BadPayload` if it does not fit one mesh message."""
    data = json.dumps(
        value.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()
    if len(data) > MAX_PAYLOAD:
        what = "request" if isinstance(value, Request) else "answer"
        raise BadPayload(
            f"the {what} is {len(data):,} bytes, more than one mesh message carries "
            f"({MAX_PAYLOAD:,})"
        )
    return data


def _object(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_PAYLOAD:
        raise BadPayload(f"{what} of {len(data):,} bytes is over the limit")
    try:
        value = parse_json(data, source=what)
    except ConfigError as exc:
        raise BadPayload(str(exc)) from None
    if not isinstance(value, dict):
        raise BadPayload(f"{what} is not a JSON object")
    if value.get("v") != VERSION:
        raise BadPayload(f"{what} is not version {VERSION} of keel's MCP-over-mesh payloads")
    return value


def _keys(value: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(value) - allowed)
    if extra:
        raise BadPayload(f"{what} has an unknown key {extra[0]!r}")


def request_id_of(data: bytes) -> str | None:
    """The id of a payload that may be malformed (to answer its sender), or None."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    found = value.get("id") if isinstance(value, dict) else None
    return found if isinstance(found, str) and _ID.match(found) else None


def _id(value: dict[str, Any], what: str) -> str:
    found = value.get("id")
    if not isinstance(found, str) or not _ID.match(found):
        raise BadPayload(f"{what}'s id must be 32 lowercase hex digits")
    return found


def decode_request(data: bytes) -> Request:
    value = _object(data, "request")
    request_id = _id(value, "request")
    kind = value.get("kind")
    deadline = value.get("deadline")
    if (
        isinstance(deadline, bool)
        or not isinstance(deadline, int | float)
        or not math.isfinite(deadline)
    ):
        raise BadPayload("request's deadline must be a number (Unix seconds)")
    if kind in ("list", "cancel"):
        _keys(value, {"v", "id", "kind", "deadline"}, f"a {kind} request")
        return Request(request_id, "list" if kind == "list" else "cancel", float(deadline))
    if kind != "call":
        raise BadPayload('request\'s kind must be "list", "call" or "cancel"')
    _keys(value, {"v", "id", "kind", "deadline", "server", "tool", "arguments"}, "a call request")
    server, tool, arguments = value.get("server"), value.get("tool"), value.get("arguments")
    if not isinstance(server, str) or check_server_name(server) is not None:
        raise BadPayload("request's server is not an MCP server's name")
    if not isinstance(tool, str) or check_tool(tool) is not None:
        raise BadPayload("request's tool is not an MCP tool name")
    if not isinstance(arguments, dict):
        raise BadPayload("request's arguments must be a JSON object")
    return Request(request_id, "call", float(deadline), server, tool, arguments)


def decode_answer(data: bytes) -> Answer:
    value = _object(data, "answer")
    answer_id = _id(value, "answer")
    _keys(value, {"v", "id", "result", "error"}, "an answer")
    if ("result" in value) == ("error" in value):
        raise BadPayload("an answer has exactly one of result and error")
    if "result" in value:
        result = value["result"]
        if not isinstance(result, dict):
            raise BadPayload("an answer's result must be a JSON object")
        return Answer(answer_id, result)
    error = value["error"]
    if not isinstance(error, dict):
        raise BadPayload("an answer's error must be a JSON object")
    _keys(error, {"code", "message"}, "an answer's error")
    code, message = error.get("code"), error.get("message")
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(message, str):
        raise BadPayload("an answer's error needs an integer code and a message")
    return Answer(answer_id, None, code, message[:MAX_MESSAGE_CHARS])


# --- names ----------------------------------------------------------------------------


def remote_name(label: str, server: str, tool: str) -> str:
    """What local agents see: ``LABEL.SERVER.TOOL``."""
    return f"{label}{SEPARATOR}{server}{SEPARATOR}{tool}"


def split_remote(name: str, labels: Any) -> tuple[str, str, str] | None:
    """``LABEL.SERVER.TOOL`` -> (label, server, tool) when LABEL is one of ``labels``."""
    label, sep, rest = name.partition(SEPARATOR)
    if not sep or label not in labels:
        return None
    parts = split(rest)
    if parts is None:
        return None
    return label, parts[0], parts[1]
